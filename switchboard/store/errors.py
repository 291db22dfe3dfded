"""What the store raises: refusals a caller turns into an answer to its peer."""

from __future__ import annotations


class ArtifactMissing(Exception):
    """A submitted job names an artifact that is not stored (never uploaded, or deleted)."""

    def __init__(self, index: int, field: str, digest: str) -> None:
        super().__init__(f"{field}: artifact {digest} has not been uploaded")
        #: The job's place in its batch, and the spec field naming the artifact.
        self.index = index
        self.field = field
        self.digest = digest


class InputUnavailable(Exception):
    """A submitted job takes an input from an earlier job that can never give it (no such
    job, or it ended without keeping the file)."""

    def __init__(self, index: int, problem: str) -> None:
        super().__init__(problem)
        #: The job's place in its batch.
        self.index = index
        self.problem = problem


class BatchOutOfOrder(Exception):
    """A batch of events came to be stored before the batch ahead of it was."""


class QueueFull(Exception):
    """More jobs are queued than the switchboard accepts; try again later."""


class QueueQuotaFull(QueueFull):
    """The submitting token has as many jobs queued as one token may have."""


class ConnectRefused(Exception):
    """The store refused a supervisor connection in the step that would have accepted it.
    `why`: "token_revoked" (the connection's token was revoked meanwhile), "enrolled" (the
    id already has a host credential), "credential_taken" (the offered digest belongs to
    another token)."""

    def __init__(self, why: str) -> None:
        super().__init__(why)
        self.why = why
