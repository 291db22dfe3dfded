"""The closed loop's driver against a switchboard: `python -m bench.sb_driver [--via W]
loop|idle ...` (bench.closed_loop's command line), with SWITCHBOARD_URL and
SWITCHBOARD_TOKEN in the environment. A round trip submits a no-op job and waits for its
end:

- `--via client` (the default): the Python client library, `Client.run`, one `Client`
  shared by every thread, as a user of the switchboard would write it (as Celery's app is
  shared): calls made at once share requests (a batch submission, one wait for many);
- `--via stdlib`: stdlib http.client on a keep-alive connection per thread, each trip in
  one request (`POST /api/v1/jobs?wait=`): the switchboard's cost for a job submitted and
  waited for alone.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from urllib.parse import urlsplit

from bench import closed_loop
from bench.e2e import Api
from switchboard.client import Client

NOOP = {"name": "noop", "backend": {"kind": "noop"}}
TERMINAL = {"succeeded", "failed", "timed_out", "canceled", "lost", "exhausted", "rejected"}
#: Seconds a request may wait for the job to end.
WAIT_S = 30
VIAS = ("client", "stdlib")


def _stdlib() -> Callable[[], None]:
    url = urlsplit(os.environ["SWITCHBOARD_URL"])
    api = Api(url.port or 80, os.environ["SWITCHBOARD_TOKEN"])

    def round_trip() -> None:
        created = api.call("POST", f"/api/v1/jobs?wait={WAIT_S}", NOOP)
        job = created["job"]
        while job["phase"] not in TERMINAL:
            job = api.call("GET", f"/api/v1/jobs/{job['id']}?wait={WAIT_S}")
        if job["phase"] != "succeeded":
            raise RuntimeError(f"job {job['id']} ended {job['phase']}")

    return round_trip


def _client() -> Callable[[], None]:
    client = Client()  # the environment's url and token

    def round_trip() -> None:
        client.run(NOOP)  # JobFailed unless it succeeded

    return round_trip


def main(argv: list[str]) -> None:
    via = "client"
    if argv[:1] == ["--via"]:
        via, argv = argv[1], argv[2:]
    if via not in VIAS:
        raise SystemExit(f"sb_driver: --via is one of {', '.join(VIAS)}, not {via!r}")
    closed_loop.main(_client() if via == "client" else _stdlib(), argv)


if __name__ == "__main__":
    main(sys.argv[1:])
