"""The supervisor under test as a child process: started from the user's command line with
its placeholders filled in, stopped for good at the end, its stderr kept for a failed
check's report.

Placeholders: `{url}` (the kit's WebSocket URL, path included), `{token_file}` (a file,
mode 0600, holding the one-line token the kit expects), `{token}` (the token itself) and
`{work_dir}` (an empty directory of its own for each start).
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
from pathlib import Path

from protocol import tokens

PLACEHOLDERS = ("url", "token_file", "token", "work_dir")


class CommandError(ValueError):
    """The command line cannot be used (unknown placeholder, bad quoting)."""


def expand(template: str, values: dict[str, str]) -> list[str]:
    """The argument list of `template` with each `{name}` replaced (quoted, so a path with
    spaces stays one argument). `{{` and `}}` stand for literal braces."""
    quoted = {name: shlex.quote(value) for name, value in values.items()}
    try:
        text = template.format(**quoted)
    except (KeyError, IndexError) as exc:
        known = ", ".join("{" + name + "}" for name in PLACEHOLDERS)
        raise CommandError(f"unknown placeholder {exc} in --command (known: {known})") from None
    except ValueError as exc:
        raise CommandError(f"--command: {exc}") from None
    try:
        argv = shlex.split(text)
    except ValueError as exc:
        raise CommandError(f"--command: {exc}") from None
    if not argv:
        raise CommandError("--command is empty")
    return argv


class SupervisorProcess:
    """Starts and stops the command under test; one process at a time."""

    def __init__(self, template: str, url: str, scratch: Path) -> None:
        self.template = template
        self.url = url
        self.scratch = scratch
        self.token = tokens.new_token()
        self.token_file = scratch / "token"
        self.token_file.write_text(self.token + "\n")
        self.token_file.chmod(0o600)
        self._process: subprocess.Popen[bytes] | None = None
        self._starts = 0
        self.log_path = scratch / "stderr.log"

    def argv(self, work_dir: Path) -> list[str]:
        return expand(
            self.template,
            {
                "url": self.url,
                "token_file": str(self.token_file),
                "token": self.token,
                "work_dir": str(work_dir),
            },
        )

    def start(self) -> None:
        """Stop the running process, if any, and start a fresh one with an empty work dir."""
        self.stop()
        self._starts += 1
        work_dir = self.scratch / f"work-{self._starts}"
        work_dir.mkdir(mode=0o700)
        argv = self.argv(work_dir)
        with self.log_path.open("ab") as log:
            log.write(f"--- start {self._starts}: {shlex.join(argv)}\n".encode())
            log.flush()
            try:
                # A session of its own: the stop reaches whatever the command started.
                self._process = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    start_new_session=True,
                )
            except OSError as exc:
                raise CommandError(f"cannot start {argv[0]}: {exc.strerror}") from None

    def exit_code(self) -> int | None:
        """None while it runs (or was never started)."""
        return None if self._process is None else self._process.poll()

    def stop(self) -> None:
        """SIGTERM to its process group, SIGKILL after 3 s."""
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(3)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        # Whatever it left behind in its group (it may have exited while children live).
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)

    def output_tail(self, lines: int = 20) -> str:
        """The last lines the command wrote (stdout and stderr together)."""
        try:
            text = self.log_path.read_bytes().decode(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])
