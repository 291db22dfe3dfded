"""Where a client connects and with which token: `--url`/`--token-file`/`--token`/`--ca-file`,
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
from pathlib import Path
from typing import Any, NamedTuple

from common.secret_files import SecretFileError, read_secret_file
from switchboard.client.errors import ClientError

DEFAULT_URL = "http://127.0.0.1:8765"


class Settings(NamedTuple):
    url: str
    token: str
    ca_file: str | None


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


def settings(
    url: str | None = None,
    token: str | None = None,
    ca_file: str | None = None,
    token_file: str | None = None,
) -> Settings:
    """Each setting from its argument, else the environment, else the config file."""
    config = _config_file()
    url = resolve(url, "SWITCHBOARD_URL", "url", config) or DEFAULT_URL
    token = _token(token, token_file, config)
    ca_file = resolve(ca_file, "SWITCHBOARD_CA_FILE", "ca_file", config)
    if not token:
        raise ClientError(
            "no token: pass --token-file FILE, set SWITCHBOARD_TOKEN_FILE or"
            f" SWITCHBOARD_TOKEN, or put token_file in {config_path()}"
        )
    return Settings(url.rstrip("/"), token, ca_file)
