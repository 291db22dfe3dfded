"""The phases the user docs name are the phases the code has."""

from __future__ import annotations

import re

import pytest

from protocol.state import Phase
from tests.harness import REPO

pytestmark = pytest.mark.unit


def test_the_phase_line_of_jobs_md_names_only_real_phases():
    text = (REPO / "docs" / "jobs.md").read_text()
    section = text.split("## Phases", 1)[1].split("\n## ", 1)[0]
    line = next(ln for ln in section.splitlines() if "→" in ln)
    named = re.findall(r"[a-z_]+", line)
    assert named, line
    assert set(named) <= {p.value for p in Phase}, set(named) - {p.value for p in Phase}
    # every phase a run can be in is named
    run_phases = {p.value for p in Phase} - {"queued", "exhausted"}
    assert run_phases <= set(named), run_phases - set(named)
