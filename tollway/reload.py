"""Hot reload of the manifest.

A ConfigMap update replaces the mounted file (Kubernetes swaps a symlink). The watcher looks at
the files' identity, times and size four times a second (a stat each: an edit is in force
within a second, even for 10,000 projects), and at their content hash every second, which
catches even an edit of the same size within the same clock tick. The files include the secret
files the manifest references (`file:` provider credentials and pepper): a rotated Kubernetes
Secret is re-read as an edited manifest is. A new manifest is compiled by every subscriber
before anything is swapped in: if one of them refuses it, none of them sees it, and the last
good one stays in force.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Generic, TypeVar

from prometheus_client import Counter, Gauge

from tollway.heap import collection_paused, settle_heap
from tollway.manifest import Manifest, ManifestError
from tollway.manifest.beside import load_beside, load_here, prepare_reader
from tollway.manifest.org_texts import Cutter
from tollway.refs import state_dir

log = logging.getLogger("tollway.reload")

RELOADS = Counter("tollway_manifest_reloads_total", "Manifest reload attempts", ["result"])
GENERATION = Gauge("tollway_manifest_generation", "How many manifests this process has applied")

T = TypeVar("T")


def secret_files(m: Manifest) -> list[Path]:
    """The files behind the manifest's `file:` references that services read at compile."""
    refs = [p.credential for p in m.providers] + [m.storage.pepper]
    return [state_dir() / ref[5:] for ref in refs if ref.startswith("file:")]


class Live(Generic[T]):
    """The value a service reads from the manifest in force: the manifest itself, or what is
    built from it (extauthz's compiled runtime, Envoy's files). Each reload builds it again and
    swaps it as one reference: a handler that reads `value` once works on one manifest."""

    def __init__(self, build: Callable[[Manifest], T], manifest: Manifest) -> None:
        self.build = build
        self.value = build(manifest)


class ManifestWatcher:
    def __init__(self, path: str | Path, manifest: Manifest, *, interval: float = 0.25,
                 hash_every: float = 1.0, serving: bool = True) -> None:
        """`serving`: this process serves requests, so a changed manifest is read in a
        child process (tollway.manifest.beside); without, in this process."""
        self.path = Path(path)
        self.serving = serving
        self.manifest = manifest
        self.interval = interval
        self.hash_every = hash_every
        self._stats = self._read_stats()
        self._hashed_at = time.monotonic()
        self._digest = self._read_digest()
        self._subscribers: list[Live[object]] = []
        # read here (not serving): the text before, for the next cut to compare with; a
        # serving process's reader keeps its own
        self._cutter = Cutter()
        GENERATION.set(1)

    def _read_digest(self) -> tuple[str, str] | None:
        """The manifest's content hash, and its secret files' together."""
        try:
            text = self.path.read_bytes()
        except OSError:
            return None
        return hashlib.sha256(text).hexdigest(), self._secrets_digest()

    def _secrets_digest(self) -> str:
        secrets = hashlib.sha256()
        for secret in secret_files(self.manifest):
            try:
                secrets.update(secret.read_bytes())
            except OSError:
                secrets.update(b"\0missing")  # a missing file is a change; load() says so
        return secrets.hexdigest()

    def in_force(self) -> None:
        """Called once the services have compiled the manifest in force: a secret file they
        created meanwhile (the pepper, at a first start) is part of it, not an edit to reload.
        An edit of the manifest itself since it was loaded still is."""
        now = self._read_digest()
        if now is not None and self._digest is not None and now[0] == self._digest[0]:
            self._digest = now
            self._stats = self._read_stats()

    def _files(self) -> list[Path]:
        return [self.path, *secret_files(self.manifest)]

    def _read_stats(self) -> list[tuple[int, ...] | None]:
        stats: list[tuple[int, ...] | None] = []
        for f in self._files():
            try:
                st = f.stat()  # through the symlinks Kubernetes swaps
            except OSError:
                stats.append(None)
            else:
                stats.append((st.st_dev, st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_size))
        return stats

    def subscribe(self, live: Live[T]) -> Live[T]:
        self._subscribers.append(live)  # type: ignore[arg-type]
        return live

    def check(self) -> bool:
        """Reload if the file changed; True when a new manifest was applied."""
        stats, now = self._read_stats(), time.monotonic()
        if stats == self._stats and now - self._hashed_at < self.hash_every:
            return False
        self._stats, self._hashed_at = stats, now
        digest = self._read_digest()
        if digest is None or digest == self._digest:
            return False
        self._digest = digest
        log.info("manifest %s changed: reading it", self.path)  # the reload's start
        interval = sys.getswitchinterval()
        # this thread competes with the event loop for the GIL while it compiles: a waiting
        # loop takes the GIL after 0.5 ms instead of Python's default 5 ms
        sys.setswitchinterval(min(interval, 0.0005))
        try:
            with collection_paused():
                reuse, texts = self.manifest.compiled_orgs, self.manifest.org_texts
                manifest = load_beside(self.path, reuse, texts) if self.serving \
                    else load_here(self.path, reuse, texts, self._cutter)
                built = [s.build(manifest) for s in self._subscribers]
        except ManifestError as e:
            RELOADS.labels("rejected").inc()
            log.error("manifest refused, keeping the previous one in force: %s", e)
            return False
        except Exception as e:  # a subscriber's own refusal (an unresolvable credential, ...)
            RELOADS.labels("rejected").inc()
            log.error("manifest refused, keeping the previous one in force: %s: %s",
                      self.path, e)
            return False
        finally:
            sys.setswitchinterval(interval)
        for s, value in zip(self._subscribers, built, strict=True):
            s.value = value
        kept = {id(o) for o in self.manifest.organizations}
        compiled = sum(id(o) not in kept for o in manifest.organizations)
        self.manifest = manifest
        settle_heap()
        # the text's hash is the one read before the load, never the file's now: an edit
        # that landed after the load read the file is then still a change, reloaded next
        # (and a 1 MB manifest is not read and hashed again, 1 ms of CPU); the secrets'
        # hash is over the new manifest's secret files
        self._digest = (digest[0], self._secrets_digest())
        self._stats = self._read_stats()
        RELOADS.labels("applied").inc()
        GENERATION.inc()
        log.info("manifest reloaded from %s (%d of %d organizations compiled, unchanged "
                 "ones reused)", self.path, compiled, len(manifest.organizations))
        return True

    async def run(self) -> None:
        if self.serving:
            await asyncio.to_thread(prepare_reader)
        while True:
            await asyncio.sleep(self.interval)
            # hashing a small file is cheap, but keep file I/O off the event loop all the same
            await asyncio.to_thread(self.check)
