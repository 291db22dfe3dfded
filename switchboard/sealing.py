"""Secret parameter values, sealed for the store.

A job's secret values are kept apart from its spec: the spec is stored with them replaced
(as the API shows it), and the values themselves as one sealed blob per job, encrypted
with AES-256-GCM under a key the database never holds (see secret_keys.py). The job's id
is bound into each blob as associated data, so a blob copied onto another job does not
open.

A blob is: version byte, key id (8 bytes), nonce (12 bytes), ciphertext with its tag.
The key id names which key sealed it, so a keyring of several keys (the current one
first, older ones after it) opens blobs sealed before a rotation.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence

import msgspec
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from protocol.spec import JobSpec, Parameter

KEY_BYTES = 32
_VERSION = b"\x01"
_KEY_ID_BYTES = 8
_NONCE_BYTES = 12
_HEADER = len(_VERSION) + _KEY_ID_BYTES + _NONCE_BYTES
_AAD = b"switchboard job secrets\x00"

_values_decoder = msgspec.json.Decoder(dict[str, str])

#: What a secret parameter's value shows as, wherever a spec is stored or shown.
REDACTED = "********"


class SecretsUnreadable(Exception):
    """A job's secret values cannot be recovered (no key of the keyring opens them)."""


def key_id(key: bytes) -> bytes:
    """A short name for a key, stored in each blob it seals (it reveals nothing of it)."""
    return hashlib.sha256(b"switchboard secret key id\x00" + key).digest()[:_KEY_ID_BYTES]


class Keyring:
    """The keys secrets are sealed with: the first seals, any of them opens."""

    def __init__(self, keys: Sequence[bytes]) -> None:
        if not keys:
            raise ValueError("a keyring needs at least one key")
        for key in keys:
            if len(key) != KEY_BYTES:
                raise ValueError(f"a key is {KEY_BYTES} bytes, not {len(key)}")
        self._ciphers = {key_id(key): AESGCM(key) for key in keys}
        self.current_id = key_id(keys[0])
        self._current = self._ciphers[self.current_id]

    @classmethod
    def ephemeral(cls) -> Keyring:
        """A keyring of one random key that lives as long as the object (what it seals is
        unreadable to anyone else, ever)."""
        return cls([AESGCM.generate_key(bit_length=8 * KEY_BYTES)])

    def seal(self, job_id: str, values: dict[str, str]) -> bytes:
        nonce = os.urandom(_NONCE_BYTES)  # random 96-bit nonces: safe far past 2**32 seals
        sealed = self._current.encrypt(nonce, msgspec.json.encode(values), _aad(job_id))
        return _VERSION + self.current_id + nonce + sealed

    def unseal(self, job_id: str, blob: bytes) -> dict[str, str]:
        if len(blob) < _HEADER or blob[:1] != _VERSION:
            raise SecretsUnreadable("its sealed secret values are damaged")
        cipher = self._ciphers.get(blob_key_id(blob))
        if cipher is None:
            raise SecretsUnreadable(
                f"its secret values were sealed with key {blob_key_id(blob).hex()},"
                " which this switchboard does not have (wrong --secret-key-file?)"
            )
        nonce = blob[_HEADER - _NONCE_BYTES : _HEADER]
        try:
            plain = cipher.decrypt(nonce, blob[_HEADER:], _aad(job_id))
            return _values_decoder.decode(plain)
        except (InvalidTag, msgspec.DecodeError):
            raise SecretsUnreadable("its sealed secret values do not decrypt (damaged)") from None


def blob_key_id(blob: bytes) -> bytes:
    return blob[len(_VERSION) : len(_VERSION) + _KEY_ID_BYTES]


def _aad(job_id: str) -> bytes:
    return _AAD + job_id.encode()


def redacted(spec: JobSpec) -> JobSpec:
    """The spec with every secret parameter's value replaced, for showing."""
    if not any(p.secret for p in spec.parameters.values()):
        return spec
    parameters = {
        name: Parameter(value=REDACTED, secret=True) if p.secret else p
        for name, p in spec.parameters.items()
    }
    return msgspec.structs.replace(spec, parameters=parameters)


def split_secrets(spec: JobSpec) -> tuple[JobSpec, dict[str, str]]:
    """The spec as it is stored (secret values replaced) and its secret values by name."""
    values = {name: p.value for name, p in spec.parameters.items() if p.secret}
    return (redacted(spec), values) if values else (spec, {})


def has_secrets(spec: JobSpec) -> bool:
    return any(p.secret for p in spec.parameters.values())


def with_secrets(spec: JobSpec, values: dict[str, str]) -> JobSpec:
    """The stored spec with its secret values put back (for a StartJob)."""
    parameters = {}
    for name, p in spec.parameters.items():
        if p.secret:
            if name not in values:
                raise SecretsUnreadable(f"the value of its secret parameter {name} is gone")
            p = Parameter(value=values[name], secret=True)
        parameters[name] = p
    return msgspec.structs.replace(spec, parameters=parameters)
