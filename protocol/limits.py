"""Versions, sizes and identifier grammar shared by both ends of the wire.

Every number here is part of the protocol: docs/protocol.md quotes them, and a peer that
exceeds one gets a protocol error naming the limit.
"""

from __future__ import annotations

import re

#: Major version, carried in the WebSocket subprotocol name. A change here breaks peers.
PROTOCOL_MAJOR = 1
#: Highest minor version this code speaks. Minors only add optional fields and messages.
PROTOCOL_MINOR = 6
#: The one subprotocol a supervisor offers and the switchboard accepts.
SUBPROTOCOL = f"switchboard.v{PROTOCOL_MAJOR}"

#: Largest WebSocket message either side accepts (after reassembly), in bytes.
MAX_FRAME_BYTES = 1024 * 1024
#: Largest payload of one console-output event, in raw bytes (before base64).
MAX_OUTPUT_CHUNK = 256 * 1024

#: Identifiers (supervisor ids, job ids): ASCII letters, digits, `.`, `_`, `-`; 1..64 chars;
#: the first one a letter or digit.
ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$(?!\n)"
ID_MAX_LEN = 64
#: Human-readable names (job names, supervisor display names).
NAME_MAX_LEN = 128
#: Label keys: like identifiers but may contain `/` (for prefixes such as `lab.example/board`).
LABEL_KEY_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,62}$(?!\n)"
LABEL_VALUE_MAX_LEN = 128
MAX_LABELS = 64
#: Content digests of artifacts (Wasm modules, image tarballs).
DIGEST_PATTERN = r"^sha256:[0-9a-f]{64}$(?!\n)"
#: Where a job's input goes, relative to its input directory (`/in`): letters, digits and
#: `._+-` in components separated by single `/`; no `.` or `..` component, no leading `/`,
#: at most 256 characters. A trailing `/` (in a job spec) names a directory to unpack a tar
#: archive into.
INPUT_PATH_PATTERN = (
    r"^(?!(?:.*/)?\.{1,2}(?![^/]))(?!.*//)[A-Za-z0-9._+-][A-Za-z0-9._+/-]{0,255}$(?!\n)"
)
#: The digest of no bytes at all. An upload can't carry an empty file (a piece has at
#: least one byte): a switchboard always holds this artifact instead, so a supervisor
#: lists an empty output file under it without uploading anything.
EMPTY_DIGEST = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
#: Most inputs one job may name.
MAX_INPUTS = 64
#: Output globs (relative to the run's output directory): components of letters, digits,
#: `._+-` and the glob characters `*?[]!`, separated by single `/`; `**` alone matches any
#: number of directories. No leading `/`, no `.` or `..` component.
OUTPUT_GLOB_PATTERN = (
    r"^(?!(?:.*/)?\.{1,2}(?![^/]))(?!.*//)"
    r"[A-Za-z0-9._+*?\[\]!-][A-Za-z0-9._+*?\[\]!/-]{0,255}$(?!\n)"
)
#: Most output globs one job may give (outputs and reports together).
MAX_OUTPUT_GLOBS = 48
#: A collected file's path relative to the output directory.
OUTPUT_PATH_MAX_LEN = 1024
#: Most files (kept or refused) one `files` event lists: a run with more sends several.
MAX_FILES_PER_EVENT = 500
#: A bare SHA-256 in lowercase hex (the digest of a credential a supervisor enrols).
SHA256_HEX_PATTERN = r"^[0-9a-f]{64}$(?!\n)"
#: Most devices one supervisor may declare (hello.devices), and grant one run (start_job.devices).
MAX_DEVICES = 512
#: Free-text fields (status messages, error descriptions) are cut to this many characters.
MESSAGE_MAX_LEN = 4096
#: (1.5) The most of a power command's output a `power_result` carries, in characters.
POWER_OUTPUT_MAX_LEN = 4096
#: An output stream's name: `stdout`, `stderr`, `console` (backend messages), or (1.6)
#: `console:<device id>`, the serial console of a device granted to the run.
STREAM_PATTERN = r"^(?:stdout|stderr|console|console:[A-Za-z0-9][A-Za-z0-9._-]{0,63})$(?!\n)"
#: The prefix of a device console's stream name (1.6).
CONSOLE_STREAM_PREFIX = "console:"
#: (1.6) The most bytes one `console_data` carries, and one `console_input`.
MAX_CONSOLE_DATA = 64 * 1024
MAX_CONSOLE_INPUT = 4096

_ID_RE = re.compile(ID_PATTERN)
_STREAM_RE = re.compile(STREAM_PATTERN)
_DIGEST_RE = re.compile(DIGEST_PATTERN)
_INPUT_PATH_RE = re.compile(INPUT_PATH_PATTERN)


def is_valid_id(value: str) -> bool:
    """True if `value` follows the identifier grammar."""
    return bool(_ID_RE.match(value))


def is_valid_stream(value: str) -> bool:
    """True if `value` follows the stream name grammar (STREAM_PATTERN)."""
    return bool(_STREAM_RE.match(value))


def console_stream(device_id: str) -> str:
    """The name of a device console's stream (1.6): `console:<device id>`."""
    return CONSOLE_STREAM_PREFIX + device_id


def console_device(stream: str) -> str | None:
    """The device whose console `stream` is (`console:nrf-1` -> `nrf-1`), else None."""
    if stream.startswith(CONSOLE_STREAM_PREFIX):
        return stream[len(CONSOLE_STREAM_PREFIX) :]
    return None


def is_valid_digest(value: str) -> bool:
    """True if `value` looks like `sha256:<64 lowercase hex digits>`."""
    return bool(_DIGEST_RE.match(value))


def is_valid_input_path(value: str) -> bool:
    """True if `value` follows the input path grammar (INPUT_PATH_PATTERN)."""
    return bool(_INPUT_PATH_RE.match(value))


def clip_message(text: str | None) -> str | None:
    """Cut free text to MESSAGE_MAX_LEN so one chatty error can't blow the frame limit."""
    if text is None or len(text) <= MESSAGE_MAX_LEN:
        return text
    return text[: MESSAGE_MAX_LEN - 1] + "…"
