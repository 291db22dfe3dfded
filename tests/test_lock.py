"""The lock files cover what pyproject.toml asks for: every dependency is pinned, with its
hashes, at a version the project accepts, and both files agree. When this fails, refresh
them with `bash scripts/lock.sh`."""

from __future__ import annotations

import re
import tomllib

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from tests.harness import REPO

pytestmark = pytest.mark.unit

#: A pin: `name==version`, an optional marker, then its `--hash=` lines.
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)[^\n]*?((?:\\\n\s+--hash=\S+\s*)+)", re.M)


def _pins(lock: str) -> dict[str, Version]:
    text = (REPO / lock).read_text()
    pins = {canonicalize_name(m[1]): Version(m[2]) for m in PIN.finditer(text)}
    named = re.findall(r"^[A-Za-z0-9][^\s=]*==", text, re.M)
    assert len(pins) == len(named), f"{lock}: a pin without hashes"
    return pins


def _project() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def _requirements(section: list[str]) -> list[Requirement]:
    return [r for r in map(Requirement, section) if r.marker is None or r.marker.evaluate()]


def _missing(requirements: list[Requirement], pins: dict[str, Version]) -> list[str]:
    return [
        f"{r} (locked: {pins.get(canonicalize_name(r.name), 'nothing')})"
        for r in requirements
        if pins.get(canonicalize_name(r.name)) not in r.specifier
    ]


def test_the_run_lock_pins_every_dependency() -> None:
    assert _missing(_requirements(_project()["dependencies"]), _pins("requirements.lock")) == []


def test_the_test_lock_pins_every_dependency_and_test_tool() -> None:
    project = _project()
    wanted = _requirements(project["dependencies"] + project["optional-dependencies"]["test"])
    assert _missing(wanted, _pins("requirements-test.lock")) == []


def test_the_two_locks_agree() -> None:
    run, test = _pins("requirements.lock"), _pins("requirements-test.lock")
    assert {name: (version, test.get(name)) for name, version in run.items()} == {
        name: (version, version) for name, version in run.items()
    }
