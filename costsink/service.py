"""Envoy's gRPC access-log sink: every request → a priced, idempotent ledger row.

Entries are queued as they stream in and written in batches by one writer task, so a slow
database never slows Envoy's log stream. A batch the ledger cannot take goes to the disk spool,
and so does every batch after it until the spool has been replayed: the ledger receives rows in
the order they came. Once a batch is durable (in the ledger or the spool), each newly recorded
request's cost is added to spend, its budget hold released and its token reservation settled,
once (a replayed entry is not new).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import grpc
from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc
from prometheus_client import Counter, Gauge

from tollway.manifest import Manifest
from tollway.reload import Live
from tollway.spend import SpendUnavailable

from .durable_log import RECONCILE_INTERVAL, DurableLog
from .entry import Entry, key_id_of, to_entry
from .ledger import Ledger, LedgerRow
from .settlement import TokenSettler
from .spend import SpendRecorder
from .spool import Spool

log = logging.getLogger("tollway.costsink")

INGESTED = Counter("tollway_costsink_entries_total", "Access-log entries ingested", ["result"])
INGESTED_QUEUED = INGESTED.labels("queued")
MESSAGES = Counter("tollway_costsink_messages_total",
                   "Access-log messages received: entries over messages is how many entries Envoy "
                   "packs in one (more cost the sink less each, docs/performance.md#costsink)")
QUEUE = Gauge("tollway_costsink_queue_depth", "Entries waiting for the ledger writer")
LAG = Gauge("tollway_costsink_lag_seconds", "Age of the newest entry written to the ledger")
SPOOL_DEPTH = Gauge("tollway_costsink_spool_depth",
                    "Entries spooled to disk, not yet in the ledger")

BATCH = 500
# entries read between two turns of a loop the Checks share: Envoy's messages hold up to 64 KB
# of entries (render.ACCESS_LOG_BUFFER_BYTES, about 64), and a Check waits no longer for a slice
# of one than it did for a whole 16 KB message (about 0.5 ms)
READ_SLICE = 16
LEDGER_TIMEOUT = 5.0  # a write slower than this goes to the spool instead
REPLAY_INTERVAL = 1.0
SPEND_CHECK_INTERVAL = 1.0  # how often missed costs are retried and the store's data checked


class AccessLogSink(als_pb2_grpc.AccessLogServiceServicer):  # type: ignore[misc]
    def __init__(self, manifest: Live[Manifest], ledger: Ledger, spool: Spool,
                 spend: SpendRecorder, durable_log: DurableLog | None = None,
                 settler: TokenSettler | None = None, *, shares_loop: bool = True) -> None:
        self.manifest = manifest
        # with Checks on this loop, a message is read READ_SLICE entries at a time; alone (the
        # gateway pod's costsink, the workers' own), whole: each turn of the loop in between
        # cost about 4 us an entry more (docs/performance.md#costsink)
        self.read_slice = READ_SLICE if shares_loop else 0
        self.settler = settler or TokenSettler(manifest)
        self.ledger = ledger
        self.spool = spool
        self.spend = spend
        self.durable_log = durable_log
        self.queue: asyncio.Queue[Entry] = asyncio.Queue()
        self.ledger_open = False
        # a sink that ended without draining (kill -9, the node lost) may have written a
        # batch to the ledger without its spend commit: the counters are then rebuilt from
        # the ledger, which holds that batch, as after a counter store that lost its data
        self.spend_behind_ledger = False
        self._inflight: list[Entry] = []
        SPOOL_DEPTH.set(spool.depth)

    async def StreamAccessLogs(self, request_iterator: AsyncIterator[
            als_pb2.StreamAccessLogsMessage], context: grpc.aio.ServicerContext
    ) -> als_pb2.StreamAccessLogsResponse:
        async for message in request_iterator:
            MESSAGES.inc()
            m = self.manifest.value
            entries = message.http_logs.log_entry
            if self.spend.keys is not None:  # a refusal names its key's owner from the mirror
                await self.spend.keys.hold(key_id_of(e) for e in entries)
            # queued once the message is read: the writer, woken by the first entry queued,
            # would otherwise write each slice as a batch of its own
            read: list[Entry] = []
            for n, entry in enumerate(entries, 1):
                self._read(m, entry, read)
                if self.read_slice and n % self.read_slice == 0 and n < len(entries):
                    try:  # let Checks sharing this loop in between slices
                        await asyncio.sleep(0)
                    except asyncio.CancelledError:
                        # shutting down: the whole message Envoy counts as delivered reaches
                        # the queue, which is drained, as every message before it did
                        for rest in entries[n:]:
                            self._read(m, rest, read)
                        self._queue(read)
                        raise
            self._queue(read)
            await asyncio.sleep(0)  # and in between messages
        return als_pb2.StreamAccessLogsResponse()

    def _read(self, m: Manifest, entry: accesslog_pb2.HTTPAccessLogEntry,
              into: list[Entry]) -> None:
        try:
            into.append(to_entry(m, entry, self.spend.keys))
        except Exception:
            INGESTED.labels("unreadable").inc()
            log.exception("unreadable access-log entry %s", entry.request.request_id)

    def _queue(self, entries: list[Entry]) -> None:
        for e in entries:
            self.queue.put_nowait(e)  # unbounded
        INGESTED_QUEUED.inc(len(entries))
        QUEUE.set(self.queue.qsize())

    async def write_forever(self) -> None:
        """The one writer. A batch that fails in a way the ledger and spool paths do not
        handle is not dropped, and the writer does not end: the batch is written again a
        second later (the ledger and spool ignore what they hold; write() has spend rebuilt
        from the ledger where the failure came after the rows were durable)."""
        while True:
            self._inflight = [await self.queue.get()]
            while len(self._inflight) < BATCH and not self.queue.empty():
                self._inflight.append(self.queue.get_nowait())
            QUEUE.set(self.queue.qsize())
            while True:
                try:
                    await self.write(self._inflight)
                    break
                except Exception:
                    log.exception("writing %d entries failed; writing them again in 1 s",
                                  len(self._inflight))
                    await asyncio.sleep(1.0)
            self._inflight = []

    async def drain(self) -> None:
        """At shutdown: whatever was taken or queued is written (or spooled), not dropped."""
        batch = self._inflight + [self.queue.get_nowait() for _ in range(self.queue.qsize())]
        self._inflight = []
        if batch:
            await self.write(batch)

    async def write(self, batch: list[Entry]) -> None:
        async with self.spend.lock:  # a rebuild never sees a row whose spend is not in yet
            if self.durable_log is not None:
                # the other path (gRPC stream or Envoy's file) may have made some of these
                # durable while this batch waited for the lock: skip them, or a spooled row
                # would count as new twice
                batch = [i for i in batch if i.row.request_id not in self.durable_log.recent]
                if not batch:
                    return
            new = await self._make_durable([item.row for item in batch])
            INGESTED.labels("recorded").inc(len(new))
            INGESTED.labels("duplicate").inc(len(batch) - len(new))
            m = self.manifest.value
            fresh = [item for item in batch if item.row.request_id in new]
            if self.durable_log is not None:  # the file's copies of these can be skipped
                self.durable_log.durable([item.row.request_id for item in batch])
            try:  # first, so holds are released as soon as possible
                await self.spend.record(m, [(item.row, item.hold) for item in fresh])
            except Exception:
                # the rows are durable and will not count as new again: spend is rebuilt
                # from the ledger instead (keep_spend_true), on either path that wrote them
                self.spend_behind_ledger = True
                raise
        await self.spend.release_orphans([item.row for item in fresh])
        await self.settler.settle([item for item in fresh if "reserved_tokens" in item.ratelimit
                                   and item.row.key_id and item.row.model])

    async def _make_durable(self, rows: list[LedgerRow]) -> set[str]:
        """Write to the ledger, or to the spool while the ledger is away or behind it.
        Returns the request ids recorded for the first time (a spooled row is new unless the
        spool holds it already; the ledger, once back, ignores what it has)."""
        already = {r.request_id for r in rows} & self.spool.request_ids
        if self.spool.empty():
            try:
                new = await self._append(rows)
                LAG.set((datetime.now(UTC) - rows[-1].at).total_seconds())
                return new
            except Exception as e:
                log.error("ledger write failed, spooling to disk until it is back: %s", e)
        while True:
            try:
                await self.spool.append(rows)
                break
            except OSError as e:  # a full disk: keep the batch, nothing is dropped
                log.error("spool write failed, retrying in 1 s: %s", e)
                await asyncio.sleep(1.0)
        SPOOL_DEPTH.set(self.spool.depth)
        return {r.request_id for r in rows} - already

    async def ensure_open(self) -> None:
        if not self.ledger_open:
            async with asyncio.timeout(LEDGER_TIMEOUT):
                await self.ledger.open()
            self.ledger_open = True

    async def _append(self, rows: list[LedgerRow]) -> set[str]:
        await self.ensure_open()
        # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation that
        # arrives as the write completes, and the writer would outlive shutdown
        async with asyncio.timeout(LEDGER_TIMEOUT):
            return await self.ledger.append(rows)

    async def replay(self) -> bool:
        """Move spooled rows into the ledger, oldest first; False if the ledger is still away."""
        for path in self.spool.files():
            rows = self.spool.read(path)
            try:
                if rows:
                    await self._append(rows)
            except Exception as e:
                log.warning("ledger still unreachable, %d entries spooled: %s",
                            self.spool.depth, e)
                return False
            self.spool.remove(path, rows)
            SPOOL_DEPTH.set(self.spool.depth)
            if self.spool.empty():
                log.info("spool replayed: the ledger is up to date")
        return True

    async def replay_forever(self) -> None:
        while True:
            await asyncio.sleep(REPLAY_INTERVAL)
            if not self.spool.empty():
                await self.replay()

    async def reconcile_forever(self) -> None:
        """Envoy's access-log file behind the gRPC stream: what the stream lost (costsink was
        down, restarting, or unreachable) reaches the ledger all the same."""
        assert self.durable_log is not None
        while True:
            await asyncio.sleep(RECONCILE_INTERVAL)
            try:
                await self.durable_log.reconcile(self.manifest.value, self.write,
                                                 keys=self.spend.keys)
            except OSError as e:
                log.error("cannot read Envoy's access-log file %s: %s",
                          self.durable_log.path, e)
            except Exception:  # never let the durable path stop quietly
                log.exception("reconciling %s failed; trying again", self.durable_log.path)

    async def keep_spend_true(self) -> None:
        """Spend converges on the ledger: costs the counter store missed are retried until
        it takes them, and when it has lost its data (a Redis restart without persistence),
        the current day's and month's counters are rebuilt from the ledger."""
        while True:
            try:
                await self.rebuild_spend_if_lost()
                await asyncio.sleep(SPEND_CHECK_INTERVAL)
                await self.spend.retry(self.manifest.value)
            except Exception:  # never let convergence stop quietly
                log.exception("keeping spend on the ledger failed; trying again")
                await asyncio.sleep(SPEND_CHECK_INTERVAL)

    async def rebuild_spend_if_lost(self) -> None:
        # the ledger lacks what is still spooled, though that spend was counted: wait for it
        if not self.spool.empty():
            return
        try:
            claimed = await self.spend.store.claim_rebuild()
        except SpendUnavailable:
            return  # retried next time
        if not (claimed or self.spend_behind_ledger):
            return
        async with self.spend.lock:
            try:
                await self.ensure_open()
                n = await self.spend.rebuild(self.manifest.value, self.ledger, datetime.now(UTC))
                self.spend_behind_ledger = False
                log.info("spend rebuilt from the ledger: %d counters of this day and month", n)
            except Exception as e:
                log.error("could not rebuild spend from the ledger, retrying: %s", e)
                if claimed:
                    await self.spend.store.unclaim_rebuild()

    async def close(self) -> None:
        await self.spend.close()
        await self.settler.close()
