"""Encoding and decoding of wire messages: JSON text, one message per WebSocket message.

Encoders and decoders are built once at import. Receivers are lenient within major
version 1: a field they do not know is skipped, on both sides and in every nested object,
so a newer peer's added optional field never breaks an older one. The job spec stays
strict where people type it (`decode_job_spec`: REST bodies, spec files).

Decoding never lets a bare msgspec or Unicode error escape: anything wrong with a frame
becomes a FrameError carrying the close code to answer with and a reason that names the
problem (msgspec's message includes the JSON path of a bad field, e.g. "Expected `int`,
got `str` - at `$.seq`").
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import msgspec

from . import limits
from .exceptions import CloseCode, FrameError, MessageTooBig
from .messages import (
    INT64_MAX,
    CollectLimits,
    FromSupervisor,
    FromSwitchboard,
    LenientFromSwitchboard,
    StartJob,
    start_job,
)
from .spec import JobSpec

T = TypeVar("T")

#: The longest collect_limits a switchboard may send (measuring a StartJob's worst case).
_LONGEST_LIMITS = CollectLimits(
    max_files=99_999, max_file_bytes=INT64_MAX, max_total_bytes=INT64_MAX
)

_encoder = msgspec.json.Encoder()
_from_supervisor = msgspec.json.Decoder(FromSupervisor)
_from_switchboard = msgspec.json.Decoder(LenientFromSwitchboard)
_job_spec = msgspec.json.Decoder(JobSpec)


def encode(message: msgspec.Struct) -> bytes:
    """Encode any wire message (or spec) to JSON bytes."""
    return _encoder.encode(message)


def _decode(decoder: msgspec.json.Decoder[T], frame: bytes | str) -> T:
    try:
        data = frame.encode() if isinstance(frame, str) else frame
        if len(data) > limits.MAX_FRAME_BYTES:
            raise FrameError(
                CloseCode.MESSAGE_TOO_BIG,
                f"message of {len(data)} bytes exceeds the limit of {limits.MAX_FRAME_BYTES}",
            )
        if not data.isascii():
            data.decode()  # msgspec checks UTF-8 only in strings it keeps
        return decoder.decode(data)
    except msgspec.ValidationError as exc:
        raise FrameError(CloseCode.INVALID_PAYLOAD, f"invalid message: {exc}") from None
    except msgspec.DecodeError as exc:
        raise FrameError(CloseCode.INVALID_PAYLOAD, f"malformed JSON: {exc}") from None
    except UnicodeError:
        raise FrameError(CloseCode.INVALID_PAYLOAD, "message is not valid UTF-8") from None
    except RecursionError:
        raise FrameError(CloseCode.INVALID_PAYLOAD, "message is nested too deeply") from None


def decode_from_supervisor(frame: bytes | str) -> FromSupervisor:
    """Decode one message a supervisor sent; raise FrameError if it isn't one."""
    return _decode(_from_supervisor, frame)


def decode_from_switchboard(frame: bytes | str) -> FromSwitchboard:
    """Decode one message the switchboard sent; raise FrameError if it isn't one. Fields
    this version does not know are skipped, in the backend and parameters of a `start_job`
    too (what comes back is a plain StartJob with plain spec Structs)."""
    message = _decode(_from_switchboard, frame)
    if isinstance(message, StartJob) and type(message) is not StartJob:
        # The lenient twin: same fields, already checked; hand on the real types.
        return msgspec.convert(message, StartJob, from_attributes=True)
    return message


def decode_job_spec(data: bytes | str) -> JobSpec:
    """Decode a job spec (REST body or spec file). Raises msgspec.ValidationError /
    DecodeError with a message naming the bad field; callers turn that into their error."""
    return _job_spec.decode(data)


def encode_start_job(
    job_id: str,
    attempt: int,
    spec: JobSpec,
    collect_limits: CollectLimits | None = None,
    devices: Sequence[str] = (),
) -> bytes:
    """The encoded StartJob of a run (with `collect_limits` if it keeps files, and the
    `devices` granted to it);
    MessageTooBig if it is over the frame limit (no supervisor would take it: it must
    never be sent)."""
    frame = encode(start_job(job_id, attempt, spec, collect_limits, devices))
    if len(frame) > limits.MAX_FRAME_BYTES:
        raise MessageTooBig("the job's start_job message", len(frame), limits.MAX_FRAME_BYTES)
    return frame


#: Stands for the digest a chained input is given once resolved (they are all this long).
_ANY_DIGEST = "sha256:" + "0" * 64


def check_start_job_fits(spec: JobSpec) -> None:
    """MessageTooBig if some run of a job with this spec could not be sent: its StartJob
    is measured with the longest job id and attempt number the protocol allows (and a
    digest in place of each input an earlier job's output will fill)."""
    if chained := spec.chained_inputs():
        resolved = {**spec.inputs, **dict.fromkeys(chained, _ANY_DIGEST)}
        spec = msgspec.structs.replace(spec, inputs=resolved)
    encode_start_job("x" * limits.ID_MAX_LEN, INT64_MAX, spec, _LONGEST_LIMITS)
