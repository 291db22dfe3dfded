"""The token format both ends share.

A token is `sbt_` + 43 URL-safe characters (32 random bytes, 256 bits). The switchboard
makes every token it hands out in this format and stores only its SHA-256. A supervisor
that enrols makes its own credential in the same format and puts the credential's SHA-256
(lowercase hex) in its Hello, so the secret itself never travels before it is used.
"""

from __future__ import annotations

import hashlib
import secrets

TOKEN_PREFIX = "sbt_"
#: Longest token an `Authorization` header may carry; anything longer is no token at all.
TOKEN_MAX_LEN = 128


def new_token() -> str:
    """A fresh random token."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def is_well_formed(token: str) -> bool:
    """True if `token` could be a token (the prefix, printable ASCII, not too long)."""
    return (
        token.startswith(TOKEN_PREFIX)
        and len(token) <= TOKEN_MAX_LEN
        and token.isascii()
        and token.isprintable()
        and " " not in token
    )


def token_sha256(token: str) -> bytes:
    """The digest the switchboard stores and looks a token up by."""
    return hashlib.sha256(token.encode()).digest()
