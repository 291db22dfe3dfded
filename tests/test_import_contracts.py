"""The package arrows (pyproject's [tool.importlinter]) hold on this tree, and each contract
fails when a violation is planted in a copy of it: the check CI runs can fail."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness import REPO

#: Each case runs lint-imports as a child process on a copy of the tree.
pytestmark = pytest.mark.process

PACKAGES = ("protocol", "common", "connector", "supervisor", "switchboard", "tests", "bench")
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")

TYPE_ONLY_CYCLE = "import typing\nif typing.TYPE_CHECKING:\n    from protocol import codec\n"
#: (module to append to, what to append, the contract that must break)
VIOLATIONS = [
    ("protocol/limits.py", "import switchboard\n", "protocol imports nothing of ours"),
    ("common/logfmt.py", "import protocol.limits\n", "common imports nothing of ours"),
    ("connector/base.py", "import supervisor.jobs\n", "connector imports only protocol and common"),
    ("supervisor/jobs.py", "import switchboard.ids\n", "supervisor imports only protocol"),
    ("supervisor/backends/noop.py", "import connector.base\n", "backends never import connector"),
    ("switchboard/ids.py", "import connector.base\n", "switchboard imports only protocol"),
    ("switchboard/ids.py", "import supervisor.config\n", "switchboard imports only protocol"),
    # codec imports messages: a type-only import back is a cycle all the same.
    ("protocol/messages.py", TYPE_ONLY_CYCLE, "no import cycles inside a package"),
]


def lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """A copy of the packages and pyproject.toml, to plant violations in."""
    root = tmp_path_factory.mktemp("tree")
    for package in PACKAGES:
        shutil.copytree(
            REPO / package, root / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    shutil.copy(REPO / "pyproject.toml", root)
    return root


def test_the_contracts_hold_on_this_tree(pristine):
    done = lint_imports(pristine)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 broken" in done.stdout, done.stdout


@pytest.mark.parametrize(("module", "line", "contract"), VIOLATIONS)
def test_a_planted_violation_breaks_its_contract(pristine, tmp_path, module, line, contract):
    root = tmp_path / "tree"
    shutil.copytree(pristine, root)
    with (root / module).open("a") as planted:
        planted.write(line)
    done = lint_imports(root)
    assert done.returncode != 0, done.stdout
    broken = done.stdout.partition("Broken contracts")[2]
    assert contract in broken, done.stdout
