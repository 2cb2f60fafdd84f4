"""Envoy's access-log file → the ledger: the path that does not depend on costsink being up.

Envoy's gRPC access log drops what it cannot send: every entry Envoy produces while costsink is
down or restarting is gone from that stream. Each Envoy therefore also appends every entry to a
file (tollway/access_log.py), and this reconciler reads that file behind the gRPC stream:

- it reads only what Envoy wrote at least RECONCILE_DELAY ago, by which time the gRPC stream has
  normally delivered the same entry and the sink has made it durable; such lines are skipped by
  request id, without parsing the rest;
- any other line is written through the sink like a gRPC entry; the ledger ignores a request id
  it holds, so nothing is recorded twice, and spend, holds and token settlement follow a row the
  first time it is recorded, whichever path brought it;
- its position in each file is checkpointed (fsynced, renamed) only after those lines are
  durable (in the ledger or the spool), so a crash of costsink re-reads from the last
  checkpoint: at most reads twice, never skips.

The file needs no rotation: once the reconciler has checkpointed past a part of it and kept
`keep_bytes` more for an operator to read (`gateway.access_log_keep_mb`), it frees that part's
disk space by punching a hole (costsink/file_space.py). Offsets do not move, so Envoy goes on
appending where it was and the checkpoint stays valid; a reconciler that lost its checkpoint
reads the file from its first data on (the holes read as zeros). Where the filesystem cannot
punch holes the file grows, and a warning says so. A file that shrinks (truncated by log
rotation with copytruncate) is read again from its start; a file renamed away is not followed.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from envoy.data.accesslog.v3 import accesslog_pb2
from prometheus_client import Counter, Gauge

from tollway.access_log import entry_from_line, line_request_id
from tollway.keys.mirror import KeyMirror
from tollway.manifest import Manifest

from .entry import Entry, key_id_of, to_entry
from .file_space import allocated_bytes, punch_hole

log = logging.getLogger("tollway.costsink.durable_log")

RECOVERED = Counter("tollway_costsink_recovered_total",
                    "Entries the gRPC access log did not deliver, read from Envoy's file")
BEHIND = Gauge("tollway_costsink_durable_log_behind_bytes",
               "Bytes of Envoy's access-log file not yet reconciled")
DISK = Gauge("tollway_costsink_durable_log_disk_bytes",
             "Disk space Envoy's access-log file takes: what is reconciled and kept is freed")

RECONCILE_DELAY = 5.0  # seconds a line is left to the gRPC stream before the file counts
RECONCILE_INTERVAL = 1.0
# A request id made durable is remembered RECENT_MARGIN seconds after the reconciler has read
# the file past the time it was made durable (far longer than Envoy holds a line before it
# writes it to the file), and never longer than RECENT_TTL (a reconciler that cannot read
# the file, or far behind it)
RECENT_MARGIN = 60.0
RECENT_TTL = 600.0
READ_CHUNK = 4 * 1024 * 1024
# space is freed a MiB at a time: whole blocks on any filesystem, one call per ~1,000 requests
FREE_STEP = 1 << 20

Write = Callable[[list[Entry]], Awaitable[None]]  # the sink's own write: durable on return


@dataclass
class _Position:
    offset: int = 0
    inode: int = 0


class RecentIds:
    """The request ids made durable lately, by either path: the reconciler skips their lines
    unparsed, and the sink does not write again what the other path wrote meanwhile.

    They are forgotten in the order they came, a batch at a time, so that a batch costs its
    own ids and no more. They were a dict rebuilt whole once its oldest id was due, which after
    the first RECENT_TTL of uptime was at every batch: 60,000 ids at 100 requests/s, 4 ms of
    the services' event loop ten times a second; 600,000 at 1,000/s, 100 ms a batch
    (bench/recent_ids.py)."""

    def __init__(self) -> None:
        self._at: dict[str, float] = {}  # request id → when it was last made durable
        self._batches: deque[tuple[float, tuple[str, ...]]] = deque()

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._at

    def __len__(self) -> int:
        return len(self._at)

    def add(self, request_ids: Iterable[str], now: float) -> None:
        ids = tuple(request_ids)
        at = self._at
        for rid in ids:
            at[rid] = now
        self._batches.append((now, ids))

    def forget_before(self, when: float) -> None:
        """Forget the ids made durable before `when`; one made durable again since (by the
        other path) stays until its later batch is due."""
        batches, at = self._batches, self._at
        while batches and batches[0][0] < when:
            made, ids = batches.popleft()
            for rid in ids:
                if at.get(rid) == made:
                    del at[rid]


class DurableLog:
    def __init__(self, path: Path, checkpoint: Path, keep_bytes: int = 64 << 20) -> None:
        self.path = path
        self.checkpoint = checkpoint
        self.keep_bytes = keep_bytes  # reconciled bytes left on disk behind the checkpoint
        self._freed_to = 0  # below this offset, the file's space was given back (this inode)
        self._can_free = True
        self.recent = RecentIds()
        self._sizes: list[tuple[float, int]] = []  # (when, file size) samples
        # every line the file held at this time has been read (monotonic; none yet)
        self._read_to = float("-inf")
        self.position = self._load()

    # -- what either path made durable -----------------------------------------------------------

    def durable(self, request_ids: Iterable[str]) -> None:
        """Remember ids just made durable; forget those whose lines the reconciler has read
        (RECENT_MARGIN on): at full load that is about a minute of ids, not ten."""
        now = time.monotonic()
        self.recent.add(request_ids, now)
        self.recent.forget_before(max(now - RECENT_TTL, self._read_to - RECENT_MARGIN))

    # -- the checkpoint --------------------------------------------------------------------------

    def _load(self) -> _Position:
        try:
            doc = json.loads(self.checkpoint.read_text())
            return _Position(int(doc["offset"]), int(doc["inode"]))
        except (OSError, ValueError, KeyError, TypeError):
            return _Position()

    def _save(self) -> None:
        tmp = self.checkpoint.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, json.dumps({"offset": self.position.offset,
                                     "inode": self.position.inode}).encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        tmp.replace(self.checkpoint)

    def _free_read(self) -> None:
        """Give back the disk space of what the checkpoint has passed, but the last
        keep_bytes; runs in a thread, after the checkpoint is saved. The hole ends strictly
        before the checkpoint, so the line it cuts through was read (see _past_hole)."""
        end = (self.position.offset - self.keep_bytes - 1) // FREE_STEP * FREE_STEP
        if not self._can_free or end <= self._freed_to:
            return
        try:  # opened to write (fallocate needs it), never written: Envoy appends
            fd = os.open(self.path, os.O_WRONLY)
        except FileNotFoundError:
            return  # gone: the next read finds out
        except OSError as e:  # not ours to write (another user's file, a read-only mount)
            self._cannot_free(e)
            return
        try:
            if os.fstat(fd).st_ino == self.position.inode:  # not replaced since it was read
                punch_hole(fd, self._freed_to, end)
                self._freed_to = end
        except OSError as e:
            self._cannot_free(e)
        finally:
            os.close(fd)

    def _cannot_free(self, e: OSError) -> None:
        self._can_free = False
        log.warning("cannot free the space of %s already reconciled (%s): the file grows; "
                    "put it on a filesystem that can punch holes (ext4, XFS, Btrfs, tmpfs), "
                    "writable by costsink", self.path, e)

    def _commit(self) -> None:
        self._save()
        self._free_read()

    # -- reading ---------------------------------------------------------------------------------

    def _settled_size(self, size: int, delay: float) -> tuple[int, float]:
        """How far the file reached `delay` seconds ago, and when it was seen there: lines
        past that are left to the gRPC stream a little longer."""
        now = time.monotonic()
        self._sizes.append((now, size))
        settled, seen = 0, float("-inf")
        while self._sizes and self._sizes[0][0] <= now - delay:
            seen, settled = self._sizes.pop(0)
        if settled:
            self._sizes.insert(0, (seen, settled))
        return min(settled, size), seen

    def _read(self, delay: float) -> tuple[list[bytes], int]:
        """Complete lines from the checkpoint up to what settled; runs in a thread."""
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return [], self.position.offset
        if st.st_ino != self.position.inode or st.st_size < self.position.offset:
            if self.position.inode:
                log.warning("%s was replaced or truncated: reading it from its start", self.path)
            self.position = _Position(0, st.st_ino)
            self._sizes.clear()
            self._freed_to = 0
        end, seen = self._settled_size(st.st_size, delay)
        BEHIND.set(st.st_size - self.position.offset)
        DISK.set(allocated_bytes(st))
        if end <= self.position.offset:  # caught up with the file as it was then
            self._read_to = max(self._read_to, seen)
            return [], self.position.offset
        with self.path.open("rb") as f:
            f.seek(self.position.offset)
            data = f.read(min(end - self.position.offset, READ_CHUNK))
            if data[:1] == b"\0":  # a hole: no line holds a NUL byte
                return [], self._past_hole(f, self.position.offset, end)
        complete = data.rfind(b"\n") + 1  # a line Envoy is still writing waits
        return data[:complete].splitlines(), self.position.offset + complete

    def _past_hole(self, f: BinaryIO, offset: int, end: int) -> int:
        """Where reading goes on from a hole at `offset`: past the line the hole ends in.

        Only a reconciler without its checkpoint (a lost state dir) reads into a hole, which
        some checkpoint passed when it was freed; the hole ends before that checkpoint, so the
        line the hole ends in, cut or whole, was read then. Lines past it may not have been,
        and are read as a new file's would be."""
        start = offset
        try:  # the filesystem knows where the data starts again; a scan finds it otherwise
            offset = os.lseek(f.fileno(), offset, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:
                return end  # holes only, to the file's end
        f.seek(offset)
        in_hole = True
        while offset < end:
            chunk = f.read(min(end - offset, READ_CHUNK))
            if not chunk:
                break
            if in_hole:
                rest = chunk.lstrip(b"\0")
                offset += len(chunk) - len(rest)
                chunk, in_hole = rest, not rest
            newline = chunk.find(b"\n")
            if newline >= 0:
                return offset + newline + 1
            offset += len(chunk)
        return start  # that line is not whole yet: the next pass looks again

    async def reconcile(self, m: Manifest, write: Write, delay: float = RECONCILE_DELAY,
                        keys: KeyMirror | None = None) -> int:
        """Write what the gRPC stream did not deliver; returns how many entries that was."""
        recovered = 0
        while True:
            lines, end = await asyncio.to_thread(self._read, delay)
            if not lines:
                if end != self.position.offset:  # only blank lines
                    self.position.offset = end
                return recovered
            read: list[accesslog_pb2.HTTPAccessLogEntry] = []
            for line in lines:
                rid = line_request_id(line)
                if not line.strip() or (rid and rid in self.recent):
                    continue
                try:
                    read.append(entry_from_line(line))
                except Exception:
                    log.exception("unreadable line in %s at byte %d", self.path,
                                  self.position.offset)
            if keys is not None:  # a refusal names its key's owner from the mirror
                await keys.hold(key_id_of(e) for e in read)
            missing: list[Entry] = []
            for entry in read:
                try:
                    missing.append(to_entry(m, entry, keys))
                except Exception:
                    log.exception("unreadable entry %s in %s", entry.request.request_id,
                                  self.path)
            if missing:
                await write(missing)  # durable (ledger or spool) when this returns
                RECOVERED.inc(len(missing))
                recovered += len(missing)
                log.warning("recorded %d requests the gRPC access log did not deliver",
                            len(missing))
            self.position.offset = end
            await asyncio.to_thread(self._commit)
