"""A PostgreSQL URI as messages and logs show it: never its password."""

from __future__ import annotations


def shown_uri(uri: str) -> str:
    """`uri` without its password (in its user part, or a `password=` parameter)."""
    scheme, sep, rest = uri.partition("://")
    if not sep:
        return uri
    place, query_sep, query = rest.partition("?")
    authority, slash, path = place.partition("/")
    user, at, host = authority.rpartition("@")
    if at and ":" in user:
        user = user.split(":", 1)[0] + ":***"
    shown = f"{scheme}{sep}{user}{at}{host}{slash}{path}"
    if query_sep:
        params = (
            "password=***" if p.lower().startswith("password=") else p for p in query.split("&")
        )
        shown += "?" + "&".join(params)
    return shown
