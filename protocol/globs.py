"""Output globs (docs/protocol.md, `output-glob`): which paths of a run's output directory a
collect rule or a report glob names. One matcher for both sides: the supervisor picks the
files it keeps with it, the switchboard picks the test reports among them.

`*` and `?` match within one `/`-separated component (dotfiles included), `[...]` is a
character class (`[!...]` its complement), and a component `**` matches any number of
directories, none included: `out/**/*.xml` matches `out/a.xml` and `out/x/y/a.xml`.
"""

from __future__ import annotations

import fnmatch
from functools import lru_cache


def is_relative_path(path: str) -> bool:
    """A file's path as a `files` event names it, staying in its directory: no empty, `.`
    or `..` part (so no leading `/` either)."""
    return not any(part in ("", ".", "..") for part in path.split("/"))


def split(path: str) -> tuple[str, ...]:
    """A relative path or glob as its components."""
    return tuple(path.split("/"))


def matches(path: str, pattern: str) -> bool:
    """Whether the relative `path` matches the glob `pattern`."""
    return match_parts(split(path), split(pattern), prefix_only=False)


def matches_any(path: str, patterns: list[str]) -> bool:
    return any(matches(path, pattern) for pattern in patterns)


@lru_cache(maxsize=4096)
def match_parts(parts: tuple[str, ...], pattern: tuple[str, ...], *, prefix_only: bool) -> bool:
    """`parts` matched against `pattern` component by component; with `prefix_only`,
    whether `parts` can be the start of a match (more components to come)."""
    if not parts:
        return bool(pattern) if prefix_only else all(p == "**" for p in pattern)
    if not pattern:
        return False
    head, *rest = pattern
    if head == "**":
        # None of the parts, or one more of them.
        return match_parts(parts, tuple(rest), prefix_only=prefix_only) or match_parts(
            parts[1:], pattern, prefix_only=prefix_only
        )
    return fnmatch.fnmatchcase(parts[0], head) and match_parts(
        parts[1:], tuple(rest), prefix_only=prefix_only
    )
