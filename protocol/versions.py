"""Protocol versions: which ones this code speaks, and the one two peers agree on.

Minor versions only add, so a peer offering 1.N also speaks every 1.M with M < N.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from . import limits
from .exceptions import CloseCode, FrameError

_VERSION_RE = re.compile(r"([0-9]{1,9})\.([0-9]{1,9})")


def supported_versions() -> list[str]:
    """The versions this code speaks, for a Hello."""
    return [f"{limits.PROTOCOL_MAJOR}.{minor}" for minor in range(limits.PROTOCOL_MINOR, -1, -1)]


def negotiate_version(offered: Iterable[str]) -> str:
    """Pick the highest version both sides speak, or raise FrameError (4001).

    Minor versions only add, so a peer offering 1.N also speaks every 1.M with M < N.
    """
    best: int | None = None
    for version in offered:
        match = _VERSION_RE.fullmatch(version)
        if match is None or int(match[1]) != limits.PROTOCOL_MAJOR:
            continue
        candidate = min(int(match[2]), limits.PROTOCOL_MINOR)
        if best is None or candidate > best:
            best = candidate
    if best is None:
        raise FrameError(
            CloseCode.UNSUPPORTED_VERSION,
            f"no common protocol version (this switchboard speaks {supported_versions()})",
        )
    return f"{limits.PROTOCOL_MAJOR}.{best}"


#: The minor version that added `ack.problems` (docs/protocol.md §6.5).
ACK_PROBLEMS_MINOR = 2
#: The minor version that added files: `start_job.inputs`, `start_job.collect` and the
#: `files` event (docs/protocol.md §5).
FILES_MINOR = 3
#: The minor version that added the device inventory: `hello.devices` and
#: `start_job.devices` (docs/protocol.md §5, docs/lab.md).
DEVICES_MINOR = 4
#: The minor version that added power control: the `power` request and its
#: `power_result` answer (docs/protocol.md §5, docs/lab.md).
POWER_MINOR = 5
#: The minor version that added the serial console: output streams named
#: `console:<device id>`, and the interactive attach messages (`console_attach`,
#: `console_input`, `console_detach`, `console_data`, `console_closed`) (docs/protocol.md
#: §5, §6.2, docs/lab.md "Serial console").
CONSOLE_MINOR = 6


def minor_of(version: str) -> int:
    """The minor number of a negotiated version ("1.2" -> 2; "" -> 0: not known)."""
    return int(version.partition(".")[2] or 0)
