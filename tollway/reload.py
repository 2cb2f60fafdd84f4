"""Hot reload of the manifest.

A ConfigMap update replaces the mounted file (Kubernetes swaps a symlink), so the watcher polls
the content hash rather than an inode or mtime. The hash covers the secret files the manifest
references too (`file:` provider credentials and pepper): a rotated Kubernetes Secret is
re-read within a poll, as an edited manifest is. A new manifest is compiled by every subscriber
before anything is swapped in: if one of them refuses it, none of them sees it, and the last
good one stays in force.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Generic, TypeVar

from prometheus_client import Counter, Gauge

from tollway.manifest import Manifest, ManifestError
from tollway.manifest.loader import load_beside
from tollway.refs import state_dir

log = logging.getLogger("tollway.reload")

RELOADS = Counter("tollway_manifest_reloads_total", "Manifest reload attempts", ["result"])
GENERATION = Gauge("tollway_manifest_generation", "How many manifests this process has applied")

T = TypeVar("T")


def secret_files(m: Manifest) -> list[Path]:
    """The files behind the manifest's `file:` references that services read at compile."""
    refs = [p.credential for p in m.providers] + [m.storage.pepper]
    return [state_dir() / ref[5:] for ref in refs if ref.startswith("file:")]


class Compiled(Generic[T]):
    """A value built from the manifest (a service's runtime state), swapped as one reference."""

    def __init__(self, build: Callable[[Manifest], T], manifest: Manifest) -> None:
        self.build = build
        self.value = build(manifest)


class ManifestWatcher:
    def __init__(self, path: str | Path, manifest: Manifest, *, interval: float = 1.0) -> None:
        self.path = Path(path)
        self.manifest = manifest
        self.interval = interval
        self._digest = self._read_digest()
        self._subscribers: list[Compiled[object]] = []
        GENERATION.set(1)

    def _read_digest(self) -> str | None:
        digest = hashlib.sha256()
        try:
            digest.update(self.path.read_bytes())
        except OSError:
            return None
        for secret in secret_files(self.manifest):
            try:
                digest.update(secret.read_bytes())
            except OSError:
                digest.update(b"\0missing")  # a missing file is a change; load() will say so
        return digest.hexdigest()

    def subscribe(self, compiled: Compiled[T]) -> Compiled[T]:
        self._subscribers.append(compiled)  # type: ignore[arg-type]
        return compiled

    def check(self) -> bool:
        """Reload if the file changed; True when a new manifest was applied."""
        digest = self._read_digest()
        if digest is None or digest == self._digest:
            return False
        self._digest = digest
        try:
            manifest = load_beside(self.path)
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
        for s, value in zip(self._subscribers, built, strict=True):
            s.value = value
        self.manifest = manifest
        self._digest = self._read_digest() or digest  # over the new manifest's secret files
        RELOADS.labels("applied").inc()
        GENERATION.inc()
        log.info("manifest reloaded from %s", self.path)
        return True

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            # hashing a small file is cheap, but keep file I/O off the event loop all the same
            await asyncio.to_thread(self.check)
