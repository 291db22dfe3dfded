"""Tokens and roles.

A token is `sbt_` + 43 random URL-safe characters (256 bits, protocol.tokens). Only its
SHA-256 is stored:
with that much entropy a slow password hash adds nothing, and a lookup by hash never
compares the secret itself byte by byte. The plaintext is shown once, at creation.
"""

from __future__ import annotations

import enum
import secrets
from typing import NamedTuple

from protocol import tokens
from switchboard.models import TokenView
from switchboard.store.base import Store


class Role(enum.StrEnum):
    ADMIN = "admin"
    OPERATOR = "operator"
    SUBMITTER = "submitter"
    VIEWER = "viewer"
    SUPERVISOR = "supervisor"


class Permission(enum.StrEnum):
    VIEW = "view"  # read jobs, output, supervisors
    SUBMIT = "submit"  # submit jobs, upload artifacts (and delete the ones it uploaded)
    CANCEL = "cancel"  # cancel and delete the jobs this token submitted
    CANCEL_ANY = "cancel_any"  # cancel and delete any job, whoever submitted it
    OPERATE = "operate"  # drain / resume supervisors, pause dispatch, delete any artifact
    ADMINISTER = "administer"  # tokens
    CONNECT = "connect"  # connect as a supervisor
    FETCH_ARTIFACTS = "fetch_artifacts"  # download artifacts
    UPLOAD = "upload"  # resumable uploads of artifacts (a supervisor's job outputs too)


#: The role matrix: exactly what each role may do.
ROLE_PERMISSIONS: dict[Role, frozenset[Permission]] = {
    Role.ADMIN: frozenset(
        {
            Permission.VIEW,
            Permission.SUBMIT,
            Permission.CANCEL,
            Permission.CANCEL_ANY,
            Permission.OPERATE,
            Permission.ADMINISTER,
            Permission.FETCH_ARTIFACTS,
            Permission.UPLOAD,
        }
    ),
    Role.OPERATOR: frozenset(
        {
            Permission.VIEW,
            Permission.SUBMIT,
            Permission.CANCEL,
            Permission.CANCEL_ANY,
            Permission.OPERATE,
            Permission.FETCH_ARTIFACTS,
            Permission.UPLOAD,
        }
    ),
    Role.SUBMITTER: frozenset(
        {
            Permission.VIEW,
            Permission.SUBMIT,
            Permission.CANCEL,
            Permission.FETCH_ARTIFACTS,
            Permission.UPLOAD,
        }
    ),
    Role.VIEWER: frozenset({Permission.VIEW}),
    Role.SUPERVISOR: frozenset({Permission.CONNECT, Permission.FETCH_ARTIFACTS, Permission.UPLOAD}),
}


def allows(role: str, permission: Permission) -> bool:
    return permission in ROLE_PERMISSIONS.get(Role(role), frozenset())


def new_token_id() -> str:
    return secrets.token_hex(6)


def new_token() -> tuple[str, str]:
    """A fresh (token id, plaintext token)."""
    return new_token_id(), tokens.new_token()


def token_digest(token: str) -> bytes:
    return tokens.token_sha256(token)


class TokenError(ValueError):
    """A token that may not be made (the message says why)."""


class NewToken(NamedTuple):
    id: str
    #: The plaintext: this is the only time it exists.
    token: str
    name: str


async def create_token(
    store: Store,
    role: Role,
    name: str = "",
    *,
    supervisor_id: str | None = None,
    replace_bound: bool = False,
) -> NewToken:
    """Create and store a token. `supervisor_id` binds a supervisor token to one
    supervisor; `replace_bound` also revokes the tokens bound to it before (a rotation)."""
    if supervisor_id is not None and role != Role.SUPERVISOR:
        raise TokenError("only supervisor tokens are bound to a supervisor")
    token_id, token = new_token()
    name = name or role.value
    await store.add_token(
        token_id, role.value, name, token_digest(token), supervisor_id, replace_bound=replace_bound
    )
    return NewToken(token_id, token, name)


async def authenticate(store: Store, authorization: str | None) -> TokenView | None:
    """The token named by an `Authorization: Bearer ...` header value, if valid."""
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not tokens.is_well_formed(token):
        return None
    return await store.find_token(token_digest(token))
