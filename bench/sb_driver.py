"""The closed loop's driver against a switchboard: `python -m bench.sb_driver loop|idle ...`
(bench.closed_loop's command line), with SWITCHBOARD_URL and SWITCHBOARD_TOKEN in the
environment. A round trip submits a no-op job and waits for its end over the REST API,
one keep-alive connection per client thread (stdlib http.client: the cheapest client
there is, so the figures are the switchboard's, not the client's)."""

from __future__ import annotations

import os
import sys
from urllib.parse import urlsplit

from bench import closed_loop
from bench.e2e import Api

NOOP = {"name": "noop", "backend": {"kind": "noop"}}
TERMINAL = {"succeeded", "failed", "timed_out", "canceled", "lost", "exhausted", "rejected"}
#: Seconds a GET may wait for the job to end (a switchboard that can't wait answers at once).
WAIT_S = 30


def main() -> None:
    url = urlsplit(os.environ["SWITCHBOARD_URL"])
    api = Api(url.port or 80, os.environ["SWITCHBOARD_TOKEN"])

    def round_trip() -> None:
        job = api.call("POST", "/api/v1/jobs", NOOP)
        while job["phase"] not in TERMINAL:
            job = api.call("GET", f"/api/v1/jobs/{job['id']}?wait={WAIT_S}")
        if job["phase"] != "succeeded":
            raise RuntimeError(f"job {job['id']} ended {job['phase']}")

    closed_loop.main(round_trip, sys.argv[1:])


if __name__ == "__main__":
    main()
