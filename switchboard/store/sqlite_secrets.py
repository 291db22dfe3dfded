"""Secret parameter values in the SQLite store: sealed before they are written, opened
only to build a StartJob, dropped once the job has ended (the triggers in schema.py).

Every function takes the open connection and runs inside the caller's transaction.
"""

from __future__ import annotations

import logging
import sqlite3
from collections import Counter

import msgspec

from protocol.spec import JobSpec
from protocol.state import is_terminal
from switchboard.sealing import (
    Keyring,
    SecretsUnreadable,
    blob_key_id,
    has_secrets,
    split_secrets,
    with_secrets,
)
from switchboard.store.migrations import apply_schema
from switchboard.store.schema import SchemaMismatch

log = logging.getLogger("switchboard.store")

_spec_decoder = msgspec.json.Decoder(JobSpec)
_encoder = msgspec.json.Encoder()
#: Rows read at a time when re-sealing.
_PAGE = 1000


def store_sealed(conn: sqlite3.Connection, job_id: str, sealed: bytes) -> None:
    conn.execute("INSERT INTO job_secrets (job_id, sealed) VALUES (?, ?)", (job_id, sealed))


def spec_to_start(
    job_id: str, stored: bytes | JobSpec, sealed: bytes | None, keyring: Keyring
) -> JobSpec:
    """The spec a StartJob needs: the stored one with its secret values opened. Raises
    SecretsUnreadable if they can't be."""
    spec = stored if isinstance(stored, JobSpec) else _spec_decoder.decode(stored)
    if not has_secrets(spec):
        return spec
    if sealed is None:
        raise SecretsUnreadable("its secret values are gone")
    return with_secrets(spec, keyring.unseal(job_id, sealed))


def sealed_again(
    keyring: Keyring, job_id: str, sealed: bytes, unreadable: Counter[str]
) -> bytes | None:
    """A job's values sealed again with the current key; None, counted in `unreadable` by
    the id of the key that sealed them, if no key of the keyring opens them."""
    try:
        values = keyring.unseal(job_id, sealed)
    except SecretsUnreadable:
        unreadable[blob_key_id(sealed).hex()] += 1
        return None
    return keyring.seal(job_id, values)


def log_resealed(resealed: int, unreadable: Counter[str]) -> None:
    """Say what sealing again at open did."""
    if resealed:
        log.info("sealed the secret values of %d jobs again with the current key", resealed)
    if unreadable:
        log.warning(
            "%d jobs hold secret values sealed with a key this switchboard does not have"
            " (key ids %s): they will be rejected when placed; start the switchboard with"
            " the key file they were sealed with to run them",
            sum(unreadable.values()),
            ", ".join(sorted(unreadable)),
        )


def reseal(conn: sqlite3.Connection, keyring: Keyring) -> tuple[int, Counter[str]]:
    """Seal again with the current key every job's values sealed with an older key of the
    keyring (so the older key can be retired after one start). Returns how many were
    re-sealed, and how many no key of the keyring opens, by the key id that sealed them."""
    resealed, unreadable, after = 0, Counter[str](), ""
    while True:
        rows = conn.execute(
            "SELECT job_id, sealed FROM job_secrets WHERE job_id > ?"
            " AND substr(sealed, 2, 8) != ? ORDER BY job_id LIMIT ?",
            (after, keyring.current_id, _PAGE),
        ).fetchall()
        for job_id, sealed in rows:
            again = sealed_again(keyring, job_id, sealed, unreadable)
            if again is not None:
                conn.execute("UPDATE job_secrets SET sealed = ? WHERE job_id = ?", (again, job_id))
                resealed += 1
        if len(rows) < _PAGE:
            return resealed, unreadable
        after = rows[-1][0]


def seal_legacy_secrets(conn: sqlite3.Connection, keyring: Keyring | None) -> int:
    """Move the secret values a version-3 database kept inside its specs out of them: the
    values of jobs that may still run are sealed, those of ended jobs dropped. Returns how
    many specs held some. Without a keyring (a store opened for tokens only) values that
    still matter can't be sealed, and the upgrade is refused."""
    rows = conn.execute(
        "SELECT id, phase, spec FROM jobs WHERE instr(spec, '\"secret\":true') > 0"
    ).fetchall()
    found = 0
    for job_id, phase, raw in rows:
        spec = _spec_decoder.decode(raw)
        stored, values = split_secrets(spec)
        if not values:
            continue
        found += 1
        if not is_terminal(phase):
            if keyring is None:
                raise SchemaMismatch(
                    "the database was made by an older switchboard and holds the secret"
                    " parameters of jobs still to run, which only the secret key seals:"
                    " upgrade it with `switchboard db upgrade` (or `switchboard serve"
                    " --upgrade`)"
                )
            store_sealed(conn, job_id, keyring.seal(job_id, values))
        conn.execute("UPDATE jobs SET spec = ? WHERE id = ?", (_encoder.encode(stored), job_id))
    return found


def upgrade_and_reseal(
    conn: sqlite3.Connection, keyring: Keyring | None, *, upgrade: bool = False
) -> None:
    """At open: check the schema's version and, if `upgrade`, bring it up to date (moving
    secret values an older version kept in the specs out of them), then seal again with
    the current key what an older one sealed. Without a keyring, stored secrets are left
    as they are."""
    found = 0

    def legacy(conn: sqlite3.Connection, version: int) -> None:
        nonlocal found
        found = seal_legacy_secrets(conn, keyring)

    conn.execute("PRAGMA secure_delete=ON")  # the specs rewritten lose their old values
    apply_schema(conn, legacy, upgrade=upgrade)
    if found:
        # Values an older version kept in clear may linger in free pages and the WAL:
        # rewrite the file once, and empty the WAL. (The copy made before the upgrade
        # still holds them, as the database did: the log says so.)
        log.warning(
            "moved the secret values of %d jobs out of their stored specs; rewriting the"
            " database once to leave no trace of them (the copy made before the upgrade"
            " still holds them in clear: delete it once the upgrade is confirmed)",
            found,
        )
        conn.execute("VACUUM")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    if keyring is None:
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        resealed, unreadable = reseal(conn, keyring)
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    log_resealed(resealed, unreadable)
