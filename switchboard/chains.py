"""Chains: a job whose inputs are output files of earlier jobs (build -> test).

Such a job waits in the queue, out of placement, until every job it names has ended; then
each reference is replaced by the digest of the file that job's last run kept, and the job
is placed like any other. If a named job kept no such file (it failed before writing it,
or did not list it in its `outputs`), or no longer exists, the job is rejected with the
reason: it can never get its inputs. This module decides; `store/sqlite_chains.py` reads
the earlier jobs and applies the decision.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import msgspec

from protocol.spec import JobSpec
from protocol.state import Phase, is_terminal


class Source(NamedTuple):
    """What a chained job needs to know of a job it names: its phase, and the files its
    last run kept (path -> digest)."""

    phase: Phase
    files: Mapping[str, str]


class Resolution(NamedTuple):
    """What becomes of a chained job: `spec` with every input a digest (it may be placed),
    or `waiting_for` a job that has not ended, or `problem` (it never can run)."""

    spec: JobSpec | None = None
    waiting_for: str | None = None
    problem: str | None = None


def sources_of(spec: JobSpec) -> list[str]:
    """The jobs a spec takes inputs from, each once, in the order its inputs name them."""
    return list(dict.fromkeys(ref.from_job for ref in spec.chained_inputs().values()))


def wanted_files(spec: JobSpec) -> dict[str, set[str]]:
    """The output files a chained spec takes, by the job whose run kept them."""
    wanted: dict[str, set[str]] = {}
    for ref in spec.chained_inputs().values():
        wanted.setdefault(ref.from_job, set()).add(ref.path)
    return wanted


def waiting_reason(job_id: str) -> str:
    """The `unschedulable` note a chained job carries while it waits."""
    return f"waiting for job {job_id} to end (its output files are this job's inputs)"


def resolve(spec: JobSpec, sources: Mapping[str, Source | None]) -> Resolution:
    """Resolve a chained job's inputs against the jobs it names (None: no such job)."""
    chained = spec.chained_inputs()
    for path, ref in chained.items():
        source = sources.get(ref.from_job)
        if source is None:
            return Resolution(problem=f"inputs[{path!r}]: job {ref.from_job} does not exist")
        if not is_terminal(source.phase):
            return Resolution(waiting_for=ref.from_job)
    resolved: dict[str, str] = {}
    for path, ref in chained.items():
        source = sources[ref.from_job]
        assert source is not None
        digest = source.files.get(ref.path)
        if digest is None:
            return Resolution(
                problem=f"inputs[{path!r}]: job {ref.from_job} ended {source.phase.value}"
                f" without keeping a file {ref.path!r} (see its files and `outputs`)"
            )
        resolved[path] = digest
    inputs = {path: resolved.get(path, value) for path, value in spec.inputs.items()}
    return Resolution(spec=msgspec.structs.replace(spec, inputs=inputs))


def resolved_message(before: JobSpec, after: JobSpec) -> str:
    """The audit line saying which file each chained input became."""
    parts = [
        f"{path!r} <- job {ref.from_job} {ref.path!r} ({after.inputs[path]})"
        for path, ref in before.chained_inputs().items()
    ]
    return "inputs resolved: " + ", ".join(parts)
