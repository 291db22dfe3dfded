"""Compiled Wasm modules for the wasm backend: fetched, checked, compiled and cached.

Compiled modules live in an in-memory LRU (`module_cache_size`) in front of an optional
disk cache (`cache_dir`, wasm_cache.py, at most `cache_max_bytes`) that holds both the
module bytes (`<sha256>.wasm`) and the compiled code
(`<sha256>.<flavour>.<wasmtime version>-<arch>.cwasm`; flavour "epoch" or "fuel"), so a
module is fetched and compiled once per host, restarts included. Compiled code is only
loaded from the cache after its checksum matches; a file Wasmtime still refuses (another
version, another config) is deleted and the module compiled again.

Why a module of its own: getting from a digest to a module ready to instantiate is a
pipeline with its own state (the caches, who is compiling what, hit counts) that running a
guest doesn't need to see. A module that isn't a WASI preview 1 command is refused here,
before its run is "running".
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import logging
import platform
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import wasmtime

from protocol.exceptions import JobError, JobErrorKind
from protocol.limits import clip_message
from supervisor import metrics
from supervisor.artifacts import ArtifactSource, digest_of, verify
from supervisor.backends.base import RunContext
from supervisor.backends.keylocks import KeyLocks
from supervisor.backends.wasi_host import make_linker
from supervisor.backends.wasm_cache import DiskCache

log = logging.getLogger(__name__)

#: Names the compiled code in the disk cache: it only loads into the Wasmtime that made it.
ENGINE_ID = f"wasmtime-{importlib.metadata.version('wasmtime')}-{platform.machine()}"


class Flavour:
    """An Engine configuration, with its Linker. Compiled code only fits its own flavour."""

    def __init__(self, name: str, *, fuel: bool) -> None:
        self.name = name
        config = wasmtime.Config()
        config.epoch_interruption = True
        config.consume_fuel = fuel
        self.engine = wasmtime.Engine(config)
        self.linker = make_linker(self.engine)


class ModuleStore:
    """Modules by digest, compiled for a flavour: from memory, from disk, or fetched and
    compiled. Blocking work runs on the backend's `pool`."""

    def __init__(
        self,
        artifacts: ArtifactSource,
        pool: ThreadPoolExecutor,
        *,
        cache_dir: Path | None,
        cache_max_bytes: int,
        module_cache_size: int,
    ) -> None:
        self._artifacts = artifacts
        self._pool = pool
        self._disk = DiskCache(cache_dir, cache_max_bytes) if cache_dir is not None else None
        #: Compiled, import-resolved modules by (digest, flavour), least recently used first.
        self._compiled: OrderedDict[tuple[str, str], wasmtime.InstancePre] = OrderedDict()
        self._compiled_size = module_cache_size
        self._loading = KeyLocks()  # one compile/load per key at a time
        #: Runs whose compiled module came from a cache (memory or disk), and runs that
        #: had to compile it.
        self.cache_hits = 0
        self.cache_misses = 0
        self._closed = False

    def close(self) -> None:
        """Forget the compiled modules (the pool is shut down: touch no disk entry now)."""
        self._closed = True
        self._compiled.clear()

    async def load(self, ctx: RunContext, digest: str, flavour: Flavour) -> wasmtime.InstancePre:
        """The compiled module for `digest`: from memory, from disk, or fetched and compiled.
        Runs wanting the same module wait for each other, so it is compiled once."""
        key = (digest, flavour.name)
        async with self._loading.hold(key):
            cached = self._compiled.get(key)
            if cached is not None:
                # Content-addressed: the digest names exact bytes, so no need to fetch again.
                self._compiled.move_to_end(key)
                self.cache_hits += 1
                metrics.cache_lookup("wasm_module", hit=True)
                if self._disk is not None and not self._closed:  # in use: keep it on disk
                    self._pool.submit(self._disk.touch, _compiled_name(digest, flavour))
                await ctx.stage("cached", "module compiled by an earlier run")
                return cached
            loop = asyncio.get_running_loop()
            if self._disk is not None:
                cached = await loop.run_in_executor(self._pool, self._from_disk, digest, flavour)
                if cached is not None:
                    self._remember(key, cached)
                    self.cache_hits += 1
                    metrics.cache_lookup("wasm_module", hit=True)
                    await ctx.stage("cached", "compiled module from the disk cache")
                    return cached
            self.cache_misses += 1
            metrics.cache_lookup("wasm_module", hit=False)
            data = None
            if self._disk is not None:
                data = await loop.run_in_executor(self._pool, self._bytes_from_disk, digest)
            if data is not None:
                await ctx.stage("fetching", "module bytes from the disk cache")
                store_bytes = False
            else:
                await ctx.stage("fetching")
                data = await self._artifacts.fetch(digest)
                verify(digest, data)  # the cache trusts the digest: don't trust the source
                store_bytes = True
            await ctx.stage("compiling")
            started = time.monotonic()
            loaded = await loop.run_in_executor(
                self._pool, self._compile, digest, data, flavour, store_bytes
            )
            log.debug(
                "compiled %s for %s (%d bytes) in %.3f s",
                digest,
                flavour.name,
                len(data),
                time.monotonic() - started,
            )
            self._remember(key, loaded)
            return loaded

    def _remember(self, key: tuple[str, str], loaded: wasmtime.InstancePre) -> None:
        if self._compiled_size:
            self._compiled[key] = loaded
            while len(self._compiled) > self._compiled_size:
                self._compiled.popitem(last=False)

    def _from_disk(self, digest: str, flavour: Flavour) -> wasmtime.InstancePre | None:
        """Compiled code from the disk cache (worker thread); None on a miss."""
        assert self._disk is not None
        name = _compiled_name(digest, flavour)
        try:
            code = self._disk.get(name)
            if code is None:
                return None
            # Only checksummed bytes get here; Wasmtime checks version and config itself.
            return flavour.linker.instantiate_pre(wasmtime.Module.deserialize(flavour.engine, code))
        except wasmtime.WasmtimeError as exc:
            log.warning("disk cache: %s does not load (%s); compiling again", name, exc)
            self._disk.discard(name)
        except OSError as exc:
            log.warning("disk cache: %s", exc)
        return None

    def _bytes_from_disk(self, digest: str) -> bytes | None:
        assert self._disk is not None
        name = _bytes_name(digest)
        try:
            data = self._disk.get(name)
        except OSError as exc:
            log.warning("disk cache: %s", exc)
            return None
        if data is not None and digest_of(data) != digest:
            log.warning("disk cache: %s does not hash to its name; discarded", name)
            self._disk.discard(name)
            return None
        return data

    def _compile(
        self, digest: str, data: bytes, flavour: Flavour, store_bytes: bool
    ) -> wasmtime.InstancePre:
        """Compile and check a module, then keep it on disk (worker thread). Raises JobError."""
        if data[:4] != b"\0asm":
            # Checked here because wasmtime-py would otherwise parse non-binary input as WAT.
            raise JobError(
                JobErrorKind.IMAGE_INVALID, "not a WebAssembly binary (no \\0asm header)"
            )
        if data[6:8] == b"\x01\x00":  # layer 1: a component, not a core module
            raise JobError(
                JobErrorKind.IMAGE_NOT_COMPATIBLE,
                "this is a WebAssembly component; only WASI preview 1 core modules can run here",
            )
        try:
            module = wasmtime.Module(flavour.engine, data)
        except wasmtime.WasmtimeError as exc:
            raise JobError(
                JobErrorKind.IMAGE_INVALID,
                clip_message(f"not a valid WebAssembly module: {exc}") or "",
            ) from None
        start = next((e.type for e in module.exports if e.name == "_start"), None)
        if not (isinstance(start, wasmtime.FuncType) and not start.params and not start.results):
            raise JobError(
                JobErrorKind.IMAGE_NOT_COMPATIBLE,
                "the module exports no `_start` function: not a WASI command",
            )
        try:
            # Resolves every import now, so a non-WASI module fails before it is "running".
            loaded = flavour.linker.instantiate_pre(module)
        except wasmtime.WasmtimeError as exc:
            raise JobError(
                JobErrorKind.IMAGE_NOT_COMPATIBLE,
                clip_message(f"the module needs imports WASI preview 1 lacks: {exc}") or "",
            ) from None
        if self._disk is not None:  # only modules that will run are worth the space
            try:
                if store_bytes:
                    self._disk.put(_bytes_name(digest), data)
                self._disk.put(_compiled_name(digest, flavour), bytes(module.serialize()))
            except (OSError, wasmtime.WasmtimeError) as exc:
                log.warning("disk cache: could not store %s: %s", digest, exc)
        return loaded


def _bytes_name(digest: str) -> str:
    return digest.removeprefix("sha256:") + ".wasm"


def _compiled_name(digest: str, flavour: Flavour) -> str:
    return f"{digest.removeprefix('sha256:')}.{flavour.name}.{ENGINE_ID}.cwasm"
