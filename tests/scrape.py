"""Reading Prometheus metrics in tests: scrape an endpoint, sum a sample, list the types."""

from __future__ import annotations

from collections.abc import Callable

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.harness import wait_for


def scrape(url: str) -> str:
    """The exposition at `url` (checked to be one)."""
    response = httpx.get(url, timeout=10)  # no token: metrics are open, like health
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=")
    return response.text


def sample_value(text: str, name: str, **labels: str) -> float:
    """The sum of the samples called `name` whose labels include `labels`."""
    total = 0.0
    seen = False
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and labels.items() <= sample.labels.items():
                total += sample.value
                seen = True
    assert seen, f"no sample {name} {labels} in:\n{text}"
    return total


def sample_value_or_zero(text: str, name: str, **labels: str) -> float:
    """Like sample_value, but 0 when there is no such sample (a histogram not yet observed)."""
    try:
        return sample_value(text, name, **labels)
    except AssertionError:
        return 0.0


def scrape_until(url: str, ok: Callable[[str], bool], what: str, timeout: float = 20.0) -> str:
    """Scrape until `ok(text)`; return that scrape. (The switchboard's counts of stored
    rows are refreshed at most once a second.)"""
    last = [""]

    def check() -> str | None:
        last[0] = scrape(url)
        return last[0] if ok(last[0]) else None

    try:
        return wait_for(check, what, timeout)
    except AssertionError:
        raise AssertionError(f"timed out waiting for {what}; last scrape:\n{last[0]}") from None


def metric_types(text: str) -> dict[str, str]:
    """Metric name (counters with their _total) -> type, from an exposition."""
    found = {}
    for family in text_string_to_metric_families(text):
        name = family.name + "_total" if family.type == "counter" else family.name
        found[name] = family.type
    return found
