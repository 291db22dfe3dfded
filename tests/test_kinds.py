"""The kinds of test (tests/conftest.py): a test without one, or a unit test with another,
stops collection; a unit or slow test that starts a process fails. Checked on a throwaway
suite run in this process."""

from __future__ import annotations

import pytest

from tests.harness import REPO

pytest_plugins = ("pytester",)
# Slow, not unit: each case runs a whole throwaway session (about 1.5 s).
pytestmark = pytest.mark.slow

CONFTEST = """
import pytest
from tests.conftest import (
    pytest_collection_modifyitems,
    pytest_runtest_call,
    pytest_runtest_setup,
    pytest_runtest_teardown,
)

@pytest.fixture
def switchboard():  # stands for the real one, which starts a process
    return None
"""
INI = """
[pytest]
addopts = --strict-markers -p no:cacheprovider
asyncio_default_fixture_loop_scope = function
markers =
    unit: u
    slow: s
    process: p
"""


@pytest.fixture
def suite(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.syspathinsert(REPO)
    pytester.makeconftest(CONFTEST)
    pytester.makeini(INI)
    return pytester


def test_marked_tests_run(suite: pytest.Pytester) -> None:
    suite.makepyfile(
        """
        import pytest

        @pytest.mark.unit
        def test_pure(): pass

        def test_by_its_fixture(switchboard): pass
        """
    )
    suite.runpytest_inprocess("-m", "process").assert_outcomes(passed=1, deselected=1)


def test_a_test_without_a_kind_stops_collection(suite: pytest.Pytester) -> None:
    suite.makepyfile("def test_forgotten(): pass")
    result = suite.runpytest_inprocess("-m", "unit")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*test_forgotten: no kind*"])


def test_a_unit_test_that_uses_a_process_fixture_stops_collection(
    suite: pytest.Pytester,
) -> None:
    suite.makepyfile(
        """
        import pytest

        @pytest.mark.unit
        def test_claims_unit(switchboard): pass
        """
    )
    result = suite.runpytest_inprocess()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*test_claims_unit: process and unit: unit goes alone*"])


@pytest.mark.parametrize("kind", ["unit", "slow"])
def test_a_unit_or_slow_test_that_starts_a_process_fails(suite: pytest.Pytester, kind: str) -> None:
    suite.makepyfile(
        f"""
        import os, subprocess
        import pytest

        @pytest.mark.{kind}
        def test_runs_a_command(): subprocess.run(["true"])

        @pytest.mark.{kind}
        def test_forks(): os.fork()
        """
    )
    result = suite.runpytest_inprocess()
    result.assert_outcomes(failed=2)
    # Named by the inner test: the outer unit test's own guard would name itself.
    for name in ("test_runs_a_command", "test_forks"):
        result.stdout.fnmatch_lines([f"*::{name} may not start a process: mark it process*"])


def test_the_last_test_may_end_session_fixtures_that_stop_processes(
    suite: pytest.Pytester,
) -> None:
    """The session's last test, unit though it is, also ends the session's fixtures: a
    private engine or cluster stops its processes then, and that is allowed."""
    suite.makepyfile(
        """
        import subprocess
        import pytest

        @pytest.fixture(scope="session")
        def engine():
            yield
            try:
                subprocess.run(["true"], check=True)
            except AssertionError as refused:  # by the outer test's guard, not the inner's
                assert "test_pure_and_last" not in str(refused)

        @pytest.mark.process
        def test_uses_it(engine): pass

        @pytest.mark.unit
        def test_pure_and_last(): pass
        """
    )
    suite.runpytest_inprocess().assert_outcomes(passed=2)
