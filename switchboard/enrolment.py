"""Who may connect as which supervisor.

A supervisor token bound to one supervisor id is that host's *credential*: it connects as
that id and no other. An unbound supervisor token is a *registration token*: it connects
only to enrol an id that has no credential yet, and only with the SHA-256 of a credential
the supervisor made for itself (`credential_sha256` in its Hello). The switchboard stores
that digest as a token bound to the id in the same transaction that accepts the
connection, so two enrolments of one id can't both win, and from then on the id accepts
only its own credential. Releasing an enrolled id takes an admin (`unenroll`, or
`rotate-token`, which binds a new credential).

`admit` decides what a Hello may do with the token it came with; the store applies it
(Store.supervisor_connected) and may still refuse, with ConnectRefused, what only the
stored state can tell.
"""

from __future__ import annotations

from typing import NamedTuple

from protocol.messages import Hello
from switchboard.auth import new_token_id
from switchboard.models import Enrolment, TokenView
from switchboard.store.errors import ConnectRefused


class Refused(Exception):
    """A connection that may not go on. `reason` is one of
    metrics.SUPERVISOR_REFUSAL_REASONS, `message` what the supervisor is told."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


class Admission(NamedTuple):
    #: The tokens this session stands on: revoking any of them closes it.
    token_ids: tuple[str, ...]
    #: The credential to store as the connection is accepted (a registration token's).
    enrol: Enrolment | None = None


def admit(token: TokenView, hello: Hello) -> Admission:
    """What `hello`, on a connection authenticated with `token`, may do; Refused if nothing."""
    supervisor_id = hello.supervisor_id
    if token.supervisor_id is not None:
        if token.supervisor_id != supervisor_id:
            raise Refused(
                "other_supervisor", f"this token belongs to supervisor {token.supervisor_id!r}"
            )
        return Admission((token.id,))  # a credential: `credential_sha256` means nothing here
    if hello.credential_sha256 is None:
        raise Refused(
            "no_credential_digest",
            "a registration token (a supervisor token bound to no supervisor) only enrols a"
            " supervisor whose hello carries credential_sha256, the digest of its own new"
            " credential (protocol 1.1; docs/auth.md)",
        )
    credential = Enrolment(
        token_id=new_token_id(),
        digest=bytes.fromhex(hello.credential_sha256),
        name=f"enrolled with {token.name} ({token.id})",
    )
    return Admission((token.id, credential.token_id), credential)


def refusal(refused: ConnectRefused, supervisor_id: str) -> Refused:
    """What to tell a supervisor the store refused."""
    match refused.why:
        case "enrolled":
            return Refused(
                "enrolled",
                f"supervisor {supervisor_id!r} is enrolled: it connects only with its own"
                f" credential. To let a registration token enrol it again, an admin runs"
                f" `switchboard supervisor unenroll {supervisor_id}`",
            )
        case "credential_taken":
            return Refused(
                "credential_taken",
                "credential_sha256 is the digest of a token that exists or existed:"
                " enrol with a new credential",
            )
        case _:
            return Refused("token_revoked", "token revoked")
