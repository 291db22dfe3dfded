"""Many clients waiting at once: `python -m bench.wait_driver --wait S ID...`, with
SWITCHBOARD_URL and SWITCHBOARD_TOKEN in the environment. One connection per job id, each
asking `GET /api/v1/jobs/{id}?wait=S` (plain asyncio streams: the clients cost next to
nothing); prints `sent` once every request is written, then, when every answer is in,
one JSON object: {"answered": n, "phases": {phase: count}}."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections import Counter
from urllib.parse import urlsplit


async def _one(host: str, port: int, token: str, job_id: str, wait_s: float) -> str:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        head = (
            f"GET /api/v1/jobs/{job_id}?wait={wait_s:g} HTTP/1.1\r\nHost: {host}\r\n"
            f"Authorization: Bearer {token}\r\nConnection: close\r\n\r\n"
        )
        writer.write(head.encode())
        await writer.drain()
        answer = await reader.read()  # to the server's close (Connection: close)
    finally:
        writer.close()
    _, _, body = answer.partition(b"\r\n\r\n")
    return str(json.loads(body)["phase"])


async def _all(ids: list[str], wait_s: float) -> Counter[str]:
    url = urlsplit(os.environ["SWITCHBOARD_URL"])
    host, port, token = url.hostname or "127.0.0.1", url.port or 80, os.environ["SWITCHBOARD_TOKEN"]
    tasks = [asyncio.create_task(_one(host, port, token, i, wait_s)) for i in ids]
    await asyncio.sleep(0)
    print("sent", flush=True)
    return Counter(await asyncio.gather(*tasks))


def main(argv: list[str]) -> None:
    if len(argv) < 3 or argv[0] != "--wait":
        raise SystemExit("usage: python -m bench.wait_driver --wait S ID...")
    phases = asyncio.run(_all(argv[2:], float(argv[1])))
    print(json.dumps({"answered": sum(phases.values()), "phases": dict(phases)}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
