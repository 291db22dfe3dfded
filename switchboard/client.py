"""A small REST client for the switchboard, used by the `switchboard` CLI commands.

Where it connects and with which token: `--url`/`--token-file`/`--token`/`--ca-file`,
else the environment (SWITCHBOARD_URL, SWITCHBOARD_TOKEN_FILE, SWITCHBOARD_TOKEN,
SWITCHBOARD_CA_FILE), else the config file (SWITCHBOARD_CONFIG, default
~/.config/switchboard/config.toml), which may hold `url`, `token_file`, `token` and
`ca_file`. A token file, and a config file that holds a token, must be private to their
owner (mode 600): a token on a command line or in a file others can read is not secret.
"""

from __future__ import annotations

import os
import stat
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import httpx

from common.secret_files import SecretFileError, read_secret_file

DEFAULT_URL = "http://127.0.0.1:8765"


class ClientError(Exception):
    """The switchboard said no (or couldn't be reached); the message says why."""


def config_path() -> Path:
    default = Path.home() / ".config" / "switchboard" / "config.toml"
    return Path(os.environ.get("SWITCHBOARD_CONFIG", default))


def _config_file() -> dict[str, Any]:
    path = config_path()
    try:
        with path.open("rb") as file:
            config = tomllib.load(file)
            mode = stat.S_IMODE(os.fstat(file.fileno()).st_mode)
    except FileNotFoundError:
        return {}
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ClientError(f"cannot read the config file {path}: {exc}") from None
    unknown = set(config) - {"url", "token", "token_file", "ca_file"}
    if unknown:
        raise ClientError(f"{path}: unknown setting(s) {', '.join(sorted(unknown))}")
    if "token" in config and mode & 0o077:
        raise ClientError(
            f"{path} holds a token and may be read or changed by others (mode {mode:04o}):"
            f" chmod 600 {path}"
        )
    return config


def resolve(flag: str | None, env: str, key: str, config: dict[str, Any]) -> str | None:
    """A setting from its flag, else the environment, else the config file."""
    value = flag or os.environ.get(env) or config.get(key)
    return str(value) if value else None


def _token(flag: str | None, file_flag: str | None, config: dict[str, Any]) -> str | None:
    """The token: from a file or given as is, by flag, else environment, else config."""
    for path, value in (
        (file_flag, flag),
        (os.environ.get("SWITCHBOARD_TOKEN_FILE"), os.environ.get("SWITCHBOARD_TOKEN")),
        (config.get("token_file"), config.get("token")),
    ):
        if path:
            try:
                return read_secret_file(str(path))
            except SecretFileError as exc:
                raise ClientError(str(exc)) from None
        if value:
            return str(value)
    return None


class ApiClient:
    def __init__(
        self,
        url: str | None = None,
        token: str | None = None,
        ca_file: str | None = None,
        token_file: str | None = None,
    ) -> None:
        config = _config_file()
        url = resolve(url, "SWITCHBOARD_URL", "url", config) or DEFAULT_URL
        token = _token(token, token_file, config)
        ca_file = resolve(ca_file, "SWITCHBOARD_CA_FILE", "ca_file", config)
        if not token:
            raise ClientError(
                "no token: pass --token-file FILE, set SWITCHBOARD_TOKEN_FILE or"
                f" SWITCHBOARD_TOKEN, or put token_file in {config_path()}"
            )
        self.url = url.rstrip("/")
        self._http = httpx.Client(
            base_url=self.url,
            headers={"Authorization": f"Bearer {token}"},
            timeout=httpx.Timeout(30.0, read=None),  # follows wait as long as jobs run
            verify=ca_file or True,
        )

    def _call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise ClientError(f"cannot reach the switchboard at {self.url}: {exc}") from None
        if response.status_code >= 400:
            try:
                body = response.json()
                text = f"{body.get('error')}: {body.get('message')}"
            except ValueError:
                text = response.text[:200]
            raise ClientError(f"{method} {path} failed with HTTP {response.status_code}: {text}")
        return response

    def get(self, path: str, **params: Any) -> Any:
        clean = {k: v for k, v in params.items() if v not in (None, [], "")}
        return self._call("GET", path, params=clean).json()

    def post(self, path: str, body: Any = None) -> Any:
        response = self._call("POST", path, json=body)
        return response.json() if response.content else None

    def put(self, path: str, body: Any) -> Any:
        return self._call("PUT", path, json=body).json()

    def delete(self, path: str) -> None:
        self._call("DELETE", path)

    def submit(self, spec: bytes) -> dict[str, Any]:
        headers = {"content-type": "application/json"}
        return self._call("POST", "/api/v1/jobs", content=spec, headers=headers).json()

    def job(self, job_id: str) -> dict[str, Any]:
        return self.get(f"/api/v1/jobs/{job_id}")

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self.post(f"/api/v1/jobs/{job_id}/cancel")

    def output(self, job_id: str, stream: str) -> bytes:
        return self._call("GET", f"/api/v1/jobs/{job_id}/output", params={"stream": stream}).content

    def download(self, path: str, into: BinaryIO) -> None:
        """Write the body of GET `path` into the open file, as it arrives."""
        try:
            with self._http.stream("GET", path) as response:
                if response.status_code >= 400:
                    response.read()
                    raise ClientError(f"GET {path} failed with HTTP {response.status_code}")
                for chunk in response.iter_bytes():
                    into.write(chunk)
        except httpx.HTTPError as exc:
            raise ClientError(f"lost the switchboard while downloading {path}: {exc}") from None

    def follow(self, job_id: str, stream: str, attempt: int) -> Iterator[bytes]:
        """A run's stream, its bytes as they are stored, until the run ends."""
        path = f"/api/v1/jobs/{job_id}/output/follow"
        params: dict[str, str | int] = {"stream": stream, "attempt": attempt}
        try:
            with self._http.stream("GET", path, params=params) as response:
                if response.status_code >= 400:
                    response.read()
                    raise ClientError(f"following {stream} failed: HTTP {response.status_code}")
                yield from response.iter_bytes()
        except httpx.HTTPError as exc:
            raise ClientError(f"lost the switchboard while following {stream}: {exc}") from None
