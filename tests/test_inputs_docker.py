"""Job inputs in a container, end to end: real switchboard and supervisor processes and
the private Docker engine. A busybox job reads its inputs (a file, a member of an
unpacked archive) at /in, a read-only bind mount, and fails to write there."""

from __future__ import annotations

from tests.docker_engine import BUSYBOX_IMAGE
from tests.harness import start_supervisor, wait_connected, wait_job
from tests.test_inputs_e2e import stdout_of, submit, tar_of, upload

SCRIPT = (
    "cat /in/data.txt /in/suite/cases/one.txt;"
    " echo changed > /in/data.txt && echo WROTE;"
    " touch /in/new.txt && echo CREATED;"
    " stat -c '%a %n' /in /in/data.txt /in/suite/cases/one.txt;"
    " grep ' /in ' /proc/mounts"
)


def test_a_container_reads_its_inputs_and_cannot_change_them(switchboard, work_dir, docker_engine):
    client = switchboard.client()
    data = upload(switchboard, b"hello from an input\n")
    suite = upload(switchboard, tar_of({"cases/one.txt": b"case one, unpacked\n"}))
    sup = start_supervisor(
        switchboard,
        work_dir,
        name="dock-in",
        backend="docker",
        extra_args=("--docker-host", docker_engine.host),
    )
    try:
        wait_connected(client, "dock-in")
        spec = {
            "name": "reads-inputs",
            "backend": {"kind": "docker", "image": BUSYBOX_IMAGE, "command": ["sh", "-c", SCRIPT]},
            "inputs": {"data.txt": data, "suite/": suite},
        }
        job = wait_job(client, submit(switchboard, spec), timeout=120)
        out = stdout_of(switchboard, job["id"])
        err = client.get(
            f"/api/v1/jobs/{job['id']}/output", params={"stream": "stderr"}
        ).content.decode()
        assert job["phase"] == "succeeded", (job, out, err)
        assert out.startswith("hello from an input\ncase one, unpacked\n"), out
        assert "WROTE" not in out and "CREATED" not in out, out
        assert err.count("Read-only file system") == 2, err
        assert "555 /in\n444 /in/data.txt\n444 /in/suite/cases/one.txt\n" in out, out
        mount = out.splitlines()[-1].split()
        assert mount[1] == "/in" and "ro" in mount[3].split(","), out
    finally:
        sup.stop()
