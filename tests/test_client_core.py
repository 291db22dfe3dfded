"""The client's pure parts (switchboard.client.core): backoff and Retry-After, what a
refusal becomes, how a spec and its parameters are sent."""

from __future__ import annotations

import email.utils
import time

import msgspec
import pytest

from protocol.spec import JobSpec, NoopBackend, Parameter
from switchboard.client import ApiError, BadRequest, NotFound, Retry, TooManyRequests
from switchboard.client.core import (
    Completion,
    Deadline,
    WaitSlice,
    refusal,
    retry_after_s,
    spec_body,
)

pytestmark = pytest.mark.unit


def test_backoff_grows_with_jitter_up_to_its_cap():
    retry = Retry(first_s=0.1, max_s=2.0)
    for attempt in range(10):
        ceiling = min(2.0, 0.1 * 2**attempt)
        delays = [retry.delay(attempt) for _ in range(50)]
        assert all(0 <= d <= ceiling for d in delays)
    assert retry.delay(10_000) <= 2.0  # no overflow however many tries


def test_retry_after_wins_up_to_the_cap():
    retry = Retry(max_s=5.0)
    assert retry.delay(0, "2") == 2.0
    assert retry.delay(0, "120") == 5.0
    later = email.utils.formatdate(time.time() + 3, usegmt=True)
    assert 1.0 <= retry_after_s(later) <= 3.0
    assert retry_after_s("soon") is None
    assert retry_after_s(None) is None


def test_refusals_become_typed_errors():
    body = b'{"error": "invalid_spec", "message": "delay_s: Expected >= 0", "field": "delay_s"}'
    bad = refusal("POST", "/api/v1/jobs", 400, body)
    assert isinstance(bad, BadRequest)
    assert (bad.status, bad.kind, bad.field) == (400, "invalid_spec", "delay_s")
    assert str(bad) == (
        "POST /api/v1/jobs failed with HTTP 400: invalid_spec: delay_s: Expected >= 0"
    )
    assert isinstance(refusal("GET", "/x", 404, b'{"error":"not_found","message":"no"}'), NotFound)
    assert isinstance(refusal("POST", "/x", 429, b"{}"), TooManyRequests)
    odd = refusal("GET", "/x", 502, b"<html>bad gateway</html>")
    assert type(odd) is ApiError
    assert "bad gateway" in str(odd)


def test_spec_and_params():
    spec = JobSpec(name="a", backend=NoopBackend(), parameters={"A": Parameter(value="1")})
    sent = msgspec.json.decode(spec_body(spec, {"B": "2", "S": Parameter("x", secret=True)}))
    assert sent["parameters"] == {
        "A": {"value": "1"},
        "B": {"value": "2"},
        "S": {"value": "x", "secret": True},
    }
    as_dict = {"name": "a", "backend": {"kind": "noop"}, "parameters": {"A": {"value": "1"}}}
    sent = msgspec.json.decode(spec_body(as_dict, {"B": "2"}))
    assert sent["parameters"] == {"A": {"value": "1"}, "B": {"value": "2"}}
    raw = b'{"name": "a", "backend": {"kind": "noop"}}'
    assert spec_body(raw) is raw
    assert msgspec.json.decode(spec_body(raw, {"B": "2"}))["parameters"] == {"B": {"value": "2"}}


def test_deadline_slices():
    assert Deadline(None).slice(60) == 60
    assert not Deadline(None).over()
    short = Deadline(0.5)
    assert 0 < short.slice(60) <= 0.5
    assert Deadline(0).over()


def test_a_shorter_max_wait_halves_the_waits_asked_for():
    slices = WaitSlice()
    too_long = refusal(
        "GET", "/x", 400, b'{"error":"invalid_request","message":"m","field":"wait"}'
    )
    assert isinstance(too_long, BadRequest)
    slices.shorten(too_long, 60)
    assert slices.s == 30
    slices.shorten(too_long, 1.5)
    assert slices.s == 0.75
    other = refusal("GET", "/x", 400, b'{"error":"invalid_request","message":"m","field":"ids"}')
    assert isinstance(other, BadRequest)
    with pytest.raises(BadRequest):
        slices.shorten(other, 60)
    with pytest.raises(BadRequest):
        slices.shorten(too_long, 0.5)  # no shorter wait worth asking for


class _Job:
    def __init__(self, job_id: str) -> None:
        self.id = job_id
        self.summary = None


def test_more_than_500_jobs_are_waited_for_500_at_a_time_in_turn():
    jobs = [_Job(f"{i:024x}") for i in range(1200)]
    completion = Completion(jobs, Deadline(None))
    named = []
    for _ in range(4):
        params, timeout_s = completion.next_request(60)
        assert params["wait"] == 1.0  # a round each, so no job waits long unseen
        assert timeout_s > 1.0
        named.append(params["ids"].split(","))
    assert [len(ids) for ids in named] == [500, 500, 200, 500]
    assert named[3] == named[0]
    ended = (
        b'{"items": [{"id": "%s", "name": "n", "phase": "succeeded", "priority": 0,'
        % (jobs[3].id.encode())
        + b' "created_at": 1, "updated_at": 2}]}'
    )
    assert completion.ended(ended) == [jobs[3]]
    assert jobs[3].summary is not None and jobs[3].summary.phase == "succeeded"
    one = Completion(jobs[:10], Deadline(None))
    assert one.next_request(60)[0]["wait"] == 60  # all in one request: the whole slice
