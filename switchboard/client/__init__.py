"""The switchboard's Python client: submit jobs and wait for them without polling, read
and follow their output, upload artifacts; blocking (`Client`) or asyncio (`AsyncClient`),
typed with the Structs the API itself sends. docs/client.md shows it in use; the CLI's
commands are built on it."""

from switchboard.client.aio import AsyncClient, AsyncJob
from switchboard.client.core import Retry
from switchboard.client.errors import (
    ApiError,
    BadRequest,
    ClientError,
    Conflict,
    ConnectionFailed,
    Forbidden,
    JobFailed,
    NotFound,
    TooManyRequests,
    Unauthorized,
    Unavailable,
    WaitTimeout,
)
from switchboard.client.sync import Client, Job

__all__ = [
    "ApiError",
    "AsyncClient",
    "AsyncJob",
    "BadRequest",
    "Client",
    "ClientError",
    "Conflict",
    "ConnectionFailed",
    "Forbidden",
    "Job",
    "JobFailed",
    "NotFound",
    "Retry",
    "TooManyRequests",
    "Unauthorized",
    "Unavailable",
    "WaitTimeout",
]
