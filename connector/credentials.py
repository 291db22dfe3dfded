"""Which token a supervisor presents to the switchboard, and the credential it keeps.

A supervisor is configured with one token. It may be a *registration token* (a supervisor
token bound to no id: it enrols new ids) or a *host credential* (bound to this id). The
supervisor can't tell which; the switchboard's answers tell it.

With a directory to keep files in, the supervisor enrols. Before its first connection it
makes a credential of its own and writes it to `<dir>/<id>.new` (mode 0600); it connects
with the configured token and puts the credential's SHA-256 in its Hello. A Welcome that
says `enrolled` makes the credential its own: the file becomes `<dir>/<id>.token`, and that
credential alone is presented from then on. The credential is on disk before the
switchboard hears of it, so a Welcome lost to a cut costs nothing: the next attempt
presents the pending credential itself.

When the switchboard refuses (HTTP 401 at the upgrade, or close code 4401):
- the enrolled credential: it was revoked (an admin unenrolled or rotated the id); it is
  deleted and the supervisor enrols again with the configured token and a new credential;
- the pending credential: it is not (yet) known; enrol with it;
- the configured token, at the upgrade: the token itself is invalid, give up;
- the configured token, after the Hello (the id is enrolled with another credential, ...):
  try the pending credential once more (an enrolment whose Welcome was lost may have been
  stored meanwhile), then a new one; a second such refusal in a row is final.

A Welcome without `enrolled` means the configured token is a host credential (or the
switchboard does not enrol): it is then presented alone.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import os
from pathlib import Path
from typing import NamedTuple

from common.secret_files import (
    SecretFileError,
    private_directory,
    read_secret_file,
    sync_directory,
    write_secret_file,
)
from protocol import tokens

log = logging.getLogger("connector.credentials")


class Presented(enum.Enum):
    #: The enrolled credential (`<id>.token`).
    CREDENTIAL = "credential"
    #: The pending credential (`<id>.new`), alone: an enrolment with it may have been stored.
    PENDING = "pending credential"
    #: The configured token (with the pending credential's digest, while enrolling).
    CONFIGURED = "configured token"


class Attempt(NamedTuple):
    presented: Presented
    token: str
    #: For the Hello: SHA-256 (hex) of the credential to enrol, or None.
    credential_sha256: str | None = None


class NoCredential(Exception):
    """Nothing to present (no credential kept and no token configured), or a credential
    file that may not be used; the message says what to do."""


class HostCredentials:
    def __init__(self, supervisor_id: str, configured: str | None, directory: Path | None) -> None:
        """`configured`: the token given to the supervisor (None: only a kept credential).
        `directory`: where to keep the credential; None presents `configured` alone."""
        if configured is None and directory is None:
            raise NoCredential("no token to connect with")
        self.supervisor_id = supervisor_id
        self._configured = configured
        self._dir = directory
        #: The pending credential was presented alone since the last enrolment attempt.
        self._pending_tried = False
        #: Enrolment attempts refused after their Hello, in a row.
        self._strikes = 0
        #: A Welcome without `enrolled` answered the configured token: it is a credential.
        self._configured_is_credential = directory is None
        #: The token of the connection established last (artifact downloads use it).
        self.current = configured or ""

    @property
    def credential_path(self) -> Path | None:
        return self._dir / f"{self.supervisor_id}.token" if self._dir else None

    @property
    def pending_path(self) -> Path | None:
        return self._dir / f"{self.supervisor_id}.new" if self._dir else None

    def kept(self) -> str | None:
        """The enrolled credential, if one is kept (NoCredential if its file is unsafe)."""
        return self._read(self.credential_path)

    def next_attempt(self) -> Attempt:
        """What to present on the next connection attempt."""
        if self._configured_is_credential:
            assert self._configured is not None
            return Attempt(Presented.CONFIGURED, self._configured)
        credential = self.kept()
        if credential is not None:
            return Attempt(Presented.CREDENTIAL, credential)
        pending = self._read(self.pending_path)
        if pending is not None and not self._pending_tried:
            return Attempt(Presented.PENDING, pending)
        if self._configured is None:
            raise NoCredential(
                f"no credential for supervisor {self.supervisor_id} in {self._dir} and no"
                " token to enrol with: give a registration token (--token-file)"
            )
        if pending is None:
            pending = tokens.new_token()
            assert self.pending_path is not None
            write_secret_file(self.pending_path, pending)
        digest = tokens.token_sha256(pending).hex()
        return Attempt(Presented.CONFIGURED, self._configured, digest)

    def welcomed(self, attempt: Attempt, enrolled: bool) -> None:
        """A connection made with `attempt` was welcomed."""
        self._strikes = 0
        self._pending_tried = False
        self.current = attempt.token
        if attempt.presented is Presented.PENDING or (
            attempt.presented is Presented.CONFIGURED and enrolled
        ):
            assert self.pending_path is not None and self.credential_path is not None
            self.current = read_secret_file(self.pending_path)
            os.replace(self.pending_path, self.credential_path)
            sync_directory(self.credential_path.parent)
            log.info("enrolled: this supervisor's credential is %s", self.credential_path)
        elif attempt.credential_sha256 is not None:
            # Not enrolled: the configured token is this host's credential (bound to it),
            # or the switchboard predates enrolment. Present it alone from now on.
            self._configured_is_credential = True
            self._discard(self.pending_path)

    def refused(self, attempt: Attempt, *, at_upgrade: bool) -> bool:
        """The switchboard refused `attempt`'s token (at the upgrade, or after the Hello or
        later with close code 4401). True: present something else at once; False: nothing
        left to present."""
        match attempt.presented:
            case Presented.CREDENTIAL:
                if self._configured is None:
                    return False  # keep it: it is all there is, an operator must look
                log.warning("the switchboard refused this supervisor's credential: enrolling again")
                self._discard(self.credential_path)
                return True
            case Presented.PENDING:
                self._pending_tried = True
                if self._strikes:
                    # An enrolment was refused and this credential is not known either:
                    # it will never be ours (e.g. it was revoked). Enrol with a new one.
                    self._discard(self.pending_path)
                return self._configured is not None
            case Presented.CONFIGURED:
                if at_upgrade or attempt.credential_sha256 is None:
                    return False  # the configured token itself is not valid
                self._strikes += 1
                self._pending_tried = False
                return self._strikes < 2
        return False

    def _read(self, path: Path | None) -> str | None:
        if path is None:
            return None
        try:
            private_directory(path.parent)
            if not path.exists():
                return None
            return read_secret_file(path)
        except SecretFileError as exc:
            raise NoCredential(str(exc)) from None

    def _discard(self, path: Path | None) -> None:
        if path is None:
            return
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            sync_directory(path.parent)
