"""Where the key that seals secret parameter values comes from.

The key is kept apart from the database, so a copy of the data dir (a backup, a disk
taken away) does not carry what opens the secrets in it. In order:

- `SWITCHBOARD_SECRET_KEY`: the key(s) themselves (an environment variable, never a flag:
  command lines are readable by every local user);
- `--secret-key-file PATH` (or `SWITCHBOARD_SECRET_KEY_FILE`);
- else `<data dir>.key`, beside the data dir (not in it), made at the first start.

A key is 32 random bytes in base64 (urlsafe or standard). A key file holds one per line
(`#` starts a comment), the environment variable one or more separated by spaces or
commas; the first key seals, the others only open what older keys sealed (rotation).
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import re
import stat
from pathlib import Path

from common.secret_files import sync_directory
from switchboard.config import Settings
from switchboard.sealing import KEY_BYTES, Keyring

log = logging.getLogger("switchboard")


class SecretKeyError(Exception):
    """The key can't be had; the message says what to do."""


def parse_keys(text: str, where: str) -> list[bytes]:
    """The keys in `text` (key file or variable contents), the current one first."""
    keys: list[bytes] = []
    for number, line in enumerate(text.splitlines(), 1):
        for word in re.split(r"[\s,]+", line.split("#", 1)[0].strip()):
            if not word:
                continue
            try:
                key = base64.b64decode(word.replace("-", "+").replace("_", "/"), validate=True)
            except (binascii.Error, ValueError):
                key = b""
            if len(key) != KEY_BYTES:
                # Named by place, not shown: a mistyped key is still mostly the key.
                raise SecretKeyError(
                    f"{where}: key {len(keys) + 1} (line {number}) is not a key ({KEY_BYTES}"
                    " random bytes in base64; make one with: python -c 'import os, base64;"
                    " print(base64.urlsafe_b64encode(os.urandom(32)).decode())')"
                )
            keys.append(key)
    if not keys:
        raise SecretKeyError(f"{where} holds no key")
    return keys


def default_key_file(data_dir: Path) -> Path:
    """`<data dir>.key`, beside the data dir."""
    resolved = data_dir.resolve()
    if not resolved.name:
        raise SecretKeyError(f"the data dir {data_dir} has no name to put a .key beside it")
    return resolved.with_name(resolved.name + ".key")


def new_key_text() -> str:
    key = base64.urlsafe_b64encode(os.urandom(KEY_BYTES)).decode()
    return (
        "# The key that seals the secret parameter values in a switchboard's database.\n"
        "# Keep it out of the data dir's backups, and back it up apart: without it the\n"
        "# secrets of jobs not yet run cannot be used. First key seals; older keys may\n"
        "# follow it, one a line, to open what they sealed (rotation).\n"
        f"{key}\n"
    )


def _create(path: Path) -> bool:
    """Write a new key file at mode 0600; False if one appeared meanwhile."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as out:
        out.write(new_key_text())
        out.flush()
        os.fsync(out.fileno())
    sync_directory(path.parent)  # the file's name survives a crash too
    return True


def _read_private(path: Path) -> str:
    """The key file's text. Refused if other users may read or change it, as token files
    are (the key opens every secret the store keeps): checked on the file opened, not on
    whatever the path names a moment later."""
    try:
        with open(path, encoding="utf-8") as file:
            mode = os.fstat(file.fileno()).st_mode
            if mode & 0o077:
                raise SecretKeyError(
                    f"the secret key file {path} may be read or changed by other users (mode"
                    f" {stat.S_IMODE(mode):04o}): chmod 600 {path}"
                )
            return file.read()
    except OSError as exc:
        raise SecretKeyError(f"cannot read the secret key file {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise SecretKeyError(f"the secret key file {path} is not UTF-8 text") from None


def load_keyring(settings: Settings) -> Keyring:
    """The keyring the settings name, making the default key file if there is none."""
    if settings.secret_key is not None:
        if settings.secret_key_file is not None:
            raise SecretKeyError("give SWITCHBOARD_SECRET_KEY or --secret-key-file, not both")
        keys = parse_keys(settings.secret_key, "SWITCHBOARD_SECRET_KEY")
        log.info("secret parameters are sealed with the key in SWITCHBOARD_SECRET_KEY")
        return Keyring(keys)
    path = settings.secret_key_file
    if path is None:
        path = default_key_file(settings.data_dir)
        try:
            made = _create(path)
        except OSError as exc:
            raise SecretKeyError(
                f"cannot make the secret key file {path}: {exc.strerror}; give"
                " --secret-key-file PATH or SWITCHBOARD_SECRET_KEY"
            ) from None
        if made:
            log.warning(
                "made a new secret key in %s: it seals secret parameter values; keep it"
                " apart from backups of the data dir, and back it up on its own",
                path,
            )
    text = _read_private(path)
    data_dir = settings.data_dir.resolve()
    if path.resolve().is_relative_to(data_dir):
        log.warning(
            "the secret key file %s is inside the data dir: every copy of the data dir"
            " carries the key to its secrets",
            path,
        )
    keys = parse_keys(text, str(path))
    log.info("secret parameters are sealed with the key in %s (%d key(s))", path, len(keys))
    return Keyring(keys)
