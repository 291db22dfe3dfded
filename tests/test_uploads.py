"""Resumable, content-addressed uploads against a real switchboard: supervisor.uploads'
client sends a file in pieces (`PUT /api/v1/uploads/{digest}`), resumes after a link cut
mid-piece, and the artifact is stored once, byte-exact, under the right digest; every
refusal (wrong digest, a piece out of order, caps) says why and is counted."""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from supervisor.artifacts import switchboard_client
from supervisor.uploads import UploadError, upload_file
from tests.faults import FaultyProxy
from tests.harness import Switchboard, free_port, scaled, wait_for
from tests.scrape import sample_value, scrape

pytestmark = pytest.mark.process

MIB = 1024 * 1024


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Switchboard]:
    """Retention sweeps often, so that a stale partial upload goes within the test."""
    made = Switchboard(
        tmp_path_factory.mktemp("uploads") / "data",
        extra_args=("--retention-interval", "0.3"),
    )
    yield made
    made.stop()


@pytest.fixture(scope="module")
def capped(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Switchboard]:
    """Small caps: two unfinished uploads per token, 100 bytes of them on disk, 1000 bytes
    of artifacts."""
    made = Switchboard(
        tmp_path_factory.mktemp("capped") / "data",
        extra_args=(
            *("--max-partial-uploads", "2"),
            *("--max-partial-upload-bytes", "100"),
            *("--artifacts-quota", "1000"),
        ),
    )
    yield made
    made.stop()


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _file_digest(path: Path) -> str:
    hasher = hashlib.sha256()
    with path.open("rb") as file:
        while piece := file.read(MIB):
            hasher.update(piece)
    return "sha256:" + hasher.hexdigest()


def _random_file(path: Path, size: int) -> Path:
    with path.open("wb") as file:
        for _ in range(size // MIB):
            file.write(os.urandom(MIB))
        file.write(os.urandom(size % MIB))
    return path


def _token(server: Switchboard, role: str, supervisor_id: str | None = None) -> str:
    body: dict[str, str] = {"role": role, "name": f"{role} {supervisor_id or ''}"}
    if supervisor_id:
        body["supervisor_id"] = supervisor_id
    made = server.client().post("/api/v1/tokens", json=body)
    assert made.status_code == 201, made.text
    return made.json()["token"]


def _partials(server: Switchboard) -> list[Path]:
    return sorted((server.data_dir / "artifacts").glob(".upload-part-*"))


def _downloaded_digest(server: Switchboard, digest: str) -> tuple[str, int]:
    """The digest and size of the artifact as the switchboard serves it."""
    hasher = hashlib.sha256()
    size = 0
    with server.client().stream("GET", f"/api/v1/artifacts/{digest}") as response:
        assert response.status_code == 200, response.read()
        for piece in response.iter_bytes(MIB):
            hasher.update(piece)
            size += len(piece)
    return "sha256:" + hasher.hexdigest(), size


def _refusals(server: Switchboard, reason: str) -> float:
    return sample_value(
        scrape(f"{server.url}/metrics"), "switchboard_upload_refusals_total", reason=reason
    )


def _put(client: httpx.Client, digest: str, data: bytes, start: int, total: int) -> httpx.Response:
    end = start + len(data) - 1
    return client.put(
        f"/api/v1/uploads/{digest}",
        content=data,
        headers={"Content-Range": f"bytes {start}-{end}/{total}"},
    )


async def _upload(url: str, token: str, path: Path, **kwargs: object) -> str:
    async with switchboard_client(url, token) as client:
        return await upload_file(client, url, None, path, **kwargs)  # type: ignore[arg-type]


async def test_a_supervisor_uploads_64_mib_byte_exact(server: Switchboard, tmp_path: Path):
    """A host credential uploads (job outputs will come this way); the artifact served back
    is the file, bit for bit, under its digest; uploading it again sends nothing."""
    path = _random_file(tmp_path / "big.bin", 64 * MIB)
    token = _token(server, "supervisor", supervisor_id="upload-host")
    digest = await _upload(server.url, token, path)
    assert digest == _file_digest(path)
    assert _downloaded_digest(server, digest) == (digest, 64 * MIB)
    assert _partials(server) == []
    stored = server.client().head(f"/api/v1/uploads/{digest}")
    assert stored.headers["upload-stored"] == "true"
    assert stored.headers["upload-offset"] == str(64 * MIB)
    # The same bytes again: HEAD says stored, nothing is sent, nothing stored twice.
    assert await _upload(server.url, token, path) == digest
    assert len(re.findall(f"artifact {digest} .* uploaded in pieces", server.process.log())) == 1


async def test_a_cut_mid_piece_resumes_where_the_bytes_end(server: Switchboard, tmp_path: Path):
    size = 32 * MIB
    path = _random_file(tmp_path / "cut.bin", size)
    digest = _file_digest(path)
    proxy = FaultyProxy(server.port)
    try:
        # Two pieces of 8 MiB get through, the third is cut 3 MiB in.
        proxy.cut_after_sent(19 * MIB)
        token = _token(server, "submitter")
        url = f"http://127.0.0.1:{proxy.port}"
        assert await _upload(url, token, path, backoff_s=0.05) == digest
        assert proxy.cuts == 1
    finally:
        proxy.close()
    cut = re.findall(rf"upload of {digest} by .* cut at byte (\d+)", server.process.log())
    assert len(cut) == 1, server.process.log()[-3000:]
    # What arrived of the cut piece was kept: the resume did not start over.
    assert 16 * MIB < int(cut[0]) <= 19 * MIB
    assert _downloaded_digest(server, digest) == (digest, size)
    assert _partials(server) == []
    assert len(re.findall(f"artifact {digest} .* uploaded in pieces", server.process.log())) == 1
    files = list((server.data_dir / "artifacts" / "sha256").iterdir())
    assert [f.name for f in files].count(digest.removeprefix("sha256:")) == 1


async def test_bytes_that_dont_hash_to_the_digest_are_refused_and_discarded(
    server: Switchboard, tmp_path: Path
):
    path = tmp_path / "lie.bin"
    path.write_bytes(b"not what the digest says" * 1000)
    wrong = _digest(b"something else")
    before = _refusals(server, "digest_mismatch")
    with pytest.raises(UploadError) as refused:
        await _upload(server.url, _token(server, "submitter"), path, digest=wrong, chunk=10_000)
    assert refused.value.status == 422
    assert f"hash to {_file_digest(path)}, not {wrong}" in str(refused.value)
    assert _refusals(server, "digest_mismatch") == before + 1
    assert _partials(server) == []
    assert server.client().get(f"/api/v1/artifacts/{wrong}").status_code == 404


def test_a_piece_out_of_order_gets_409_with_the_offset(server: Switchboard):
    data = os.urandom(30)
    digest = _digest(data)
    client = server.client(_token(server, "submitter"))
    assert _put(client, digest, data[:10], 0, 30).headers["upload-offset"] == "10"
    before = _refusals(server, "offset_mismatch")
    skipped = _put(client, digest, data[20:], 20, 30)
    assert skipped.status_code == 409, skipped.text
    assert skipped.headers["upload-offset"] == "10"
    body = skipped.json()
    assert (body["error"], body["offset"]) == ("offset_mismatch", 10)
    assert "starts at byte 20, but 10 bytes are held" in body["message"]
    assert _refusals(server, "offset_mismatch") == before + 1
    again = _put(client, digest, data[:10], 0, 30)  # a piece already taken
    assert again.status_code == 409 and again.json()["offset"] == 10
    head = client.head(f"/api/v1/uploads/{digest}")
    assert (head.headers["upload-offset"], head.headers["upload-stored"]) == ("10", "false")
    done = _put(client, digest, data[10:], 10, 30)
    assert done.status_code == 201, done.text
    assert done.json() == {"digest": digest, "offset": 30, "stored": True}
    assert server.client().get(f"/api/v1/artifacts/{digest}").content == data
    assert server.process.log().count("offset_mismatch): the piece starts at byte 20") == 1


def test_malformed_pieces_are_refused_with_a_reason(server: Switchboard):
    client = server.client(_token(server, "submitter"))
    digest = _digest(b"x" * 10)
    for content_range, says in [
        ("bytes 0-9/5", "START <= END < TOTAL"),
        ("items 0-9/10", "is not bytes START-END/TOTAL"),
    ]:
        refused = client.put(
            f"/api/v1/uploads/{digest}", content=b"x" * 10, headers={"Content-Range": content_range}
        )
        assert refused.status_code == 400, refused.text
        assert refused.json()["error"] == "invalid_request"
        assert says in refused.json()["message"]
    # A body longer than its range (no Content-Length to tell in advance) is refused whole.
    longer = client.put(
        f"/api/v1/uploads/{digest}",
        content=iter([b"x" * 6, b"x" * 6]),
        headers={"Content-Range": "bytes 0-9/10"},
    )
    assert longer.status_code == 400, longer.text
    assert "longer than the 10 bytes" in longer.json()["message"]
    assert client.head(f"/api/v1/uploads/{digest}").headers["upload-offset"] == "0"
    assert client.put(f"/api/v1/uploads/{digest}", content=b"x").status_code == 400
    assert "Content-Range is required" in server.process.log()
    nope = _put(client, "sha256:nope", b"x", 0, 1)
    assert nope.status_code == 400 and "digest must be sha256:" in nope.json()["message"]


def test_past_the_largest_artifact_is_refused_before_a_byte_is_kept(server: Switchboard):
    client = server.client(_token(server, "submitter"))
    digest = _digest(b"huge")
    total = 1024 * MIB + 1  # one byte past the default largest artifact
    before = _refusals(server, "too_large")
    refused = _put(client, digest, b"h" * 1000, 0, total)
    assert refused.status_code == 413, refused.text
    assert refused.json()["error"] == "too_large"
    assert f"an artifact is at most {1024 * MIB} bytes, not {total}" in refused.json()["message"]
    assert _refusals(server, "too_large") == before + 1
    assert client.head(f"/api/v1/uploads/{digest}").headers["upload-offset"] == "0"


def test_a_viewer_may_not_upload(server: Switchboard):
    viewer = server.client(_token(server, "viewer"))
    digest = _digest(b"viewer")
    refused = _put(viewer, digest, b"viewer", 0, 6)
    assert refused.status_code == 403 and refused.json()["error"] == "forbidden"
    assert viewer.head(f"/api/v1/uploads/{digest}").status_code == 403
    assert server.client().get(f"/api/v1/artifacts/{digest}").status_code == 404


def test_a_partial_upload_survives_a_restart_and_goes_when_stale(
    server: Switchboard, tmp_path: Path
):
    data = os.urandom(100)
    digest = _digest(data)
    client = server.client(_token(server, "submitter"))
    assert _put(client, digest, data[:40], 0, 100).status_code == 200
    server.restart()
    client = httpx.Client(base_url=server.url, headers=client.headers, timeout=scaled(30))
    assert client.head(f"/api/v1/uploads/{digest}").headers["upload-offset"] == "40"
    [partial] = [p for p in _partials(server) if p.name.endswith(digest.removeprefix("sha256:"))]
    old = time.time() - 2 * 86400
    os.utime(partial, (old, old))
    wait_for(lambda: not partial.exists(), "retention to remove the stale partial upload")
    assert client.head(f"/api/v1/uploads/{digest}").headers["upload-offset"] == "0"


def test_caps_on_unfinished_uploads_and_the_quota(capped: Switchboard):
    client = capped.client(_token(capped, "submitter"))
    before = {r: _refusals(capped, r) for r in ("too_many_uploads", "partial_space", "quota")}
    for n in range(2):
        assert _put(client, _digest(b"%d" % n * 10), b"%d" % n * 5, 0, 10).status_code == 200
    third = _put(client, _digest(b"2" * 10), b"2" * 5, 0, 10)
    assert third.status_code == 429, third.text
    assert "has 2 unfinished uploads, the most it may" in third.json()["message"]
    # Another token may, until all partial uploads together hold 100 bytes.
    other = capped.client(_token(capped, "submitter"))
    assert _put(other, _digest(b"a" * 200), b"a" * 80, 0, 200).status_code == 200
    full = _put(other, _digest(b"b" * 200), b"b" * 20, 0, 200)
    assert full.status_code == 507, full.text
    assert full.json()["error"] == "insufficient_storage"
    assert "unfinished uploads hold 90 of the 100 bytes" in full.json()["message"]
    # Past the artifacts quota: refused at the first piece, before the bytes arrive.
    third_token = capped.client(_token(capped, "submitter"))
    quota = _put(third_token, _digest(b"q" * 2000), b"q" * 5, 0, 2000)
    assert quota.status_code == 507, quota.text
    assert "this one needs 2000 more" in quota.json()["message"]
    after = {r: _refusals(capped, r) for r in before}
    assert after == {r: v + 1 for r, v in before.items()}
    log = capped.process.log()
    for reason in before:
        assert log.count(f"upload refused ({reason})") == 1, reason


async def test_a_second_piece_while_one_is_written_gets_409(server: Switchboard):
    data = os.urandom(60_000)
    digest = _digest(data)
    token = _token(server, "submitter")
    first_sent = asyncio.Event()
    release = asyncio.Event()

    async def slow_body():
        yield data[:20_000]  # more than a file buffer: on disk at once
        first_sent.set()
        await release.wait()
        yield data[20_000:40_000]

    headers = {"Authorization": f"Bearer {token}"}
    url = f"{server.url}/api/v1/uploads/{digest}"
    async with (
        httpx.AsyncClient(headers=headers, timeout=scaled(30)) as a,
        httpx.AsyncClient(headers=headers, timeout=scaled(30)) as b,
    ):
        slow = asyncio.create_task(
            a.put(url, content=slow_body(), headers={"Content-Range": "bytes 0-39999/60000"})
        )
        await first_sent.wait()
        for _ in range(200):  # until the switchboard holds the slow piece's first bytes
            head = await b.head(url)
            if head.headers["upload-offset"] == "20000":
                break
            await asyncio.sleep(0.05)
        assert head.headers["upload-offset"] == "20000"
        busy = await b.put(
            url, content=data[20_000:40_000], headers={"Content-Range": "bytes 20000-39999/60000"}
        )
        assert busy.status_code == 409, busy.text
        assert busy.json()["error"] == "upload_busy"
        assert "is being written: retry" in busy.json()["message"]
        release.set()
        assert (await slow).headers["upload-offset"] == "40000"
        done = await b.put(
            url, content=data[40_000:], headers={"Content-Range": "bytes 40000-59999/60000"}
        )
        assert done.status_code == 201, done.text
    assert server.client().get(f"/api/v1/artifacts/{digest}").content == data


async def test_a_link_that_never_works_is_given_up_after_bounded_attempts(tmp_path: Path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"bytes")
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    started = time.monotonic()
    with pytest.raises(UploadError) as failed:
        await _upload(url, "sbt_unused", path, attempts=3, backoff_s=0.01)
    assert "failed 3 times in a row" in str(failed.value)
    assert failed.value.status is None
    assert time.monotonic() - started < scaled(10)
