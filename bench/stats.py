"""Summaries of repeated measurements, the machine they ran on, and the printed table."""

from __future__ import annotations

import importlib.metadata
import math
import os
import platform
import statistics
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class Summary:
    """Repeated measurements of one quantity, in `unit`."""

    unit: str
    n: int
    median: float
    p90: float
    min: float
    max: float
    p25: float = math.nan
    p75: float = math.nan
    p99: float = math.nan

    @classmethod
    def of(cls, values: list[float], unit: str) -> Summary:
        if not values:
            raise ValueError("no measurements")
        ordered = sorted(values)
        median = statistics.median(ordered)
        return cls(
            unit,
            len(ordered),
            median,
            percentile(ordered, 0.9),
            ordered[0],
            ordered[-1],
            percentile(ordered, 0.25),
            percentile(ordered, 0.75),
            percentile(ordered, 0.99),
        )

    def as_dict(self) -> dict[str, float | int | str]:
        return asdict(self)


def percentile(ordered: list[float], q: float) -> float:
    """The q-quantile of sorted values (linear interpolation between closest ranks)."""
    rank = q * (len(ordered) - 1)
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def machine() -> dict[str, str | int | float]:
    """What the numbers were measured on (the machine may be shared: see `loadavg`)."""
    model = "unknown"
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cpu_model": model,
        "nproc": len(os.sched_getaffinity(0)),
        "loadavg_1m": os.getloadavg()[0],
        "python": platform.python_version(),
        "wasmtime_py": importlib.metadata.version("wasmtime"),
        "code": _revision(),
    }


def _revision() -> str:
    """The checkout's commit, with "-dirty" when it has uncommitted changes."""
    try:
        done = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
        )
    except OSError:
        return "unknown"
    return done.stdout.strip() or "unknown"


def table(rows: list[tuple[str, Summary]]) -> str:
    """Rows of summaries as a fixed-width table."""
    width = max(len(label) for label, _ in rows)
    head = f"{'metric':<{width}}  {'unit':>6}  {'n':>5}  " + "  ".join(
        f"{h:>9}" for h in ("median", "p90", "min", "max")
    )
    lines = [head, "-" * len(head)]
    for label, s in rows:
        numbers = "  ".join(_fmt(v) for v in (s.median, s.p90, s.min, s.max))
        lines.append(f"{label:<{width}}  {s.unit:>6}  {s.n:>5}  {numbers}")
    return "\n".join(lines)


def _fmt(value: float) -> str:
    if value >= 1000:
        return f"{value:>9.0f}"
    if value >= 10:
        return f"{value:>9.1f}"
    return f"{value:>9.3f}"
