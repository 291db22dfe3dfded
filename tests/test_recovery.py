"""Recovery of devices whose health check failed (switchboard/recovery.py, docs/lab.md
"Recovery"): what follows a check, and what follows a power cycle. Pure."""

from __future__ import annotations

from pathlib import Path

import pytest

from switchboard import recovery
from switchboard.config import HealthChecksError, load_health_checks
from switchboard.recovery import Step, after_check, after_power, cycles_after

pytestmark = pytest.mark.unit


def test_a_failed_check_is_followed_by_a_power_cycle_up_to_the_attempts() -> None:
    first = after_check("fail", "bad", 0, 2, True, "c1")
    assert first == Step("cycle", "health check c1 failed: power cycle 1 of 2", 1)
    assert after_check("fail", "bad", 1, 2, True, "c2").attempt == 2
    last = after_check("fail", "bad", 2, 2, True, "c3")
    assert last.action == "maintenance"
    assert last.reason == "health check still failing after 2 power cycle(s) (last check c3)"


@pytest.mark.parametrize(
    ("result", "health", "attempts", "has_power", "reason"),
    [
        ("pass", "good", 2, True, ""),  # nothing to recover
        ("error", "unknown", 2, True, ""),  # checked again anyway, after a minute
        ("fail", "looping", 2, True, ""),  # looping stays looping, whatever it says
        ("fail", "maintenance", 2, True, ""),  # an operator took it meanwhile
        ("fail", "bad", None, True, ""),  # its class asks for no recovery
        ("fail", "bad", 2, False, "it has no power commands to recover it with"),
    ],
)
def test_nothing_is_done_unless_a_device_with_power_failed_and_its_class_says_so(
    result: str, health: str, attempts: int | None, has_power: bool, reason: str
) -> None:
    assert after_check(result, health, 0, attempts, has_power, "c1") == Step("none", reason)


def test_a_cycled_device_is_checked_again_and_one_that_could_not_be_goes_to_maintenance() -> None:
    again = after_power("ok", "", 1, 3, "c1")
    assert again.action == "recheck" and again.attempt == 1
    assert again.reason == "power-cycled (1 of 3) after failed health check c1: checking it again"
    for result, reason in [("failed", "exit status 2"), ("timed_out", "no answer in 40 s")]:
        step = after_power(result, reason, 2, 3, "c1")
        assert step.action == "maintenance"
        assert step.reason.endswith(f"did not succeed ({result}: {reason})")
    assert after_power("no_power", "", 1, 3, "c1").reason.endswith("(no_power)")


def test_a_passed_check_ends_the_series() -> None:
    assert cycles_after("pass", 2) == 0
    assert cycles_after("fail", 2) == 2
    assert cycles_after("error", 1) == 1
    assert recovery.ACTOR == "switchboard (recovery)"


def test_the_checks_file_takes_recovery_attempts_and_refuses_bad_ones(tmp_path: Path) -> None:
    path = tmp_path / "checks.toml"
    spec = 'spec = { name = "selftest", backend = { kind = "noop" } }'
    path.write_text(f"[simboard]\nrecovery_attempts = 3\n{spec}\n")
    assert load_health_checks(path)["simboard"].recovery_attempts == 3
    path.write_text(f"[simboard]\n{spec}\n")
    assert load_health_checks(path)["simboard"].recovery_attempts is None
    for bad in ("0", "11", '"twice"'):
        path.write_text(f"[simboard]\nrecovery_attempts = {bad}\n{spec}\n")
        with pytest.raises(HealthChecksError, match=r"recovery_attempts"):
            load_health_checks(path)
