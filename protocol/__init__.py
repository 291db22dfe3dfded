"""Switchboard wire protocol: message types, codec, versions, limits and job-state rules.

Pure: nothing here does I/O, and nothing here imports another package of ours. Both the
switchboard and supervisors (in any language, see docs/protocol.md) speak what this package
defines.
"""

from .exceptions import CloseCode, FrameError, JobError, JobErrorKind
from .state import InvalidTransition, Phase

__all__ = ["CloseCode", "FrameError", "InvalidTransition", "JobError", "JobErrorKind", "Phase"]
