"""Envoy's gRPC access-log sink: every request → a priced, idempotent ledger row.

Entries are queued as they stream in and written in batches by one writer task, so a slow
database never slows Envoy's log stream. After a batch commits, each newly recorded request's
token reservation is settled with the rate limiter, once (a replayed entry is not new).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import grpc
from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc
from google.protobuf import json_format
from prometheus_client import Counter, Gauge

from ratelimit._proto import settle_pb2, settle_pb2_grpc
from tollway.manifest import Manifest
from tollway.manifest.model import Dialect
from tollway.metadata import AUTHZ, RATELIMIT, USAGE
from tollway.reload import Compiled

from .ledger import Ledger, LedgerRow
from .pricing import Usage, price

log = logging.getLogger("tollway.costsink")

INGESTED = Counter("tollway_costsink_entries_total", "Access-log entries ingested", ["result"])
PRICING_MISSES = Counter("tollway_costsink_pricing_misses_total",
                         "Entries whose model is not on the rate card", ["provider", "model"])
QUEUE = Gauge("tollway_costsink_queue_depth", "Entries waiting for the ledger writer")
LAG = Gauge("tollway_costsink_lag_seconds", "Age of the newest entry written to the ledger")

BATCH = 500


def _ns(entry: accesslog_pb2.HTTPAccessLogEntry, name: str) -> dict[str, Any]:
    s = entry.common_properties.metadata.filter_metadata.get(name)
    return json_format.MessageToDict(s) if s is not None else {}


def _ms(d: Any) -> int:
    return int(d.seconds * 1000 + d.nanos // 1_000_000)


@dataclass(frozen=True)
class Entry:
    """One access-log entry, read: its ledger row and what settling its reservation needs."""

    row: LedgerRow
    actual_tokens: int  # every token the provider processed, as TPM counts them
    ratelimit: dict[str, Any]  # reserved_tokens and charged_at_ms, when it was rate limited


def to_entry(m: Manifest, entry: accesslog_pb2.HTTPAccessLogEntry) -> Entry:
    authz, usage_md, rl = _ns(entry, AUTHZ), _ns(entry, USAGE), _ns(entry, RATELIMIT)
    usage = Usage(input_tokens=int(usage_md.get("input_tokens", 0)),
                  output_tokens=int(usage_md.get("output_tokens", 0)),
                  cached_input_tokens=int(usage_md.get("cached_input_tokens", 0)),
                  cache_creation_tokens=int(usage_md.get("cache_creation_input_tokens", 0)))
    provider, model = authz.get("provider"), authz.get("model")
    dialect = Dialect(authz.get("dialect", "openai"))
    card = m.rate_card
    cost = None
    if provider and model:
        cost = price(card, provider, model, dialect, usage)
        if cost is None:
            PRICING_MISSES.labels(provider, model).inc()
    common = entry.common_properties
    flags = common.response_flags
    row = LedgerRow(
        request_id=entry.request.request_id,
        at=common.start_time.ToDatetime(tzinfo=UTC) if common.HasField("start_time")
        else datetime.now(UTC),
        org=authz.get("org"), project=authz.get("project"), client=authz.get("client"),
        key_id=authz.get("key_id"), provider=provider, model=model, route=authz.get("route"),
        status=entry.response.response_code.value,
        input_tokens=usage.input_tokens, output_tokens=usage.output_tokens,
        cached_input_tokens=usage.cached_input_tokens,
        cache_creation_tokens=usage.cache_creation_tokens,
        cost=cost, currency=card.currency if card else None,
        rate_card_version=card.version if card else None,
        latency_ms=_ms(common.time_to_last_downstream_tx_byte),
        stream=bool(authz.get("stream", False)),
        client_disconnected=flags.downstream_connection_termination
        or flags.downstream_remote_reset,
        deny_reason=authz.get("deny_reason"),
    )
    return Entry(row=row, actual_tokens=usage.total(dialect), ratelimit=rl)


class AccessLogSink(als_pb2_grpc.AccessLogServiceServicer):  # type: ignore[misc]
    def __init__(self, manifest: Compiled[Manifest], ledger: Ledger) -> None:
        self.manifest = manifest
        self.ledger = ledger
        self.queue: asyncio.Queue[Entry] = asyncio.Queue()
        self._settle: settle_pb2_grpc.TokenSettlementStub | None = None
        self._channel: grpc.aio.Channel | None = None

    async def StreamAccessLogs(self, request_iterator: AsyncIterator[
            als_pb2.StreamAccessLogsMessage], context: grpc.aio.ServicerContext
    ) -> als_pb2.StreamAccessLogsResponse:
        async for message in request_iterator:
            m = self.manifest.value
            for entry in message.http_logs.log_entry:
                try:
                    await self.queue.put(to_entry(m, entry))
                    INGESTED.labels("queued").inc()
                except Exception:
                    INGESTED.labels("unreadable").inc()
                    log.exception("unreadable access-log entry %s", entry.request.request_id)
            QUEUE.set(self.queue.qsize())
        return als_pb2.StreamAccessLogsResponse()

    def _stub(self) -> settle_pb2_grpc.TokenSettlementStub:
        if self._settle is None:
            host, port = self.manifest.value.services.ratelimit
            self._channel = grpc.aio.insecure_channel(f"{host}:{port}")
            self._settle = settle_pb2_grpc.TokenSettlementStub(self._channel)
        return self._settle

    async def write_forever(self) -> None:
        while True:
            batch = [await self.queue.get()]
            while len(batch) < BATCH and not self.queue.empty():
                batch.append(self.queue.get_nowait())
            QUEUE.set(self.queue.qsize())
            await self.write(batch)

    async def write(self, batch: list[Entry]) -> None:
        while True:
            try:
                new = await self.ledger.append([item.row for item in batch])
                break
            except Exception as e:  # keep the batch; nothing is dropped while we retry
                log.error("ledger write failed, retrying in 1 s: %s", e)
                await asyncio.sleep(1.0)
        INGESTED.labels("recorded").inc(len(new))
        INGESTED.labels("duplicate").inc(len(batch) - len(new))
        LAG.set((datetime.now(UTC) - batch[-1].row.at).total_seconds())
        for item in batch:
            row = item.row
            if row.request_id in new and "reserved_tokens" in item.ratelimit and row.key_id \
                    and row.model:
                await self._settle_one(item)

    async def _settle_one(self, item: Entry) -> None:
        row, rl = item.row, item.ratelimit
        try:
            await self._stub().Settle(settle_pb2.SettleRequest(
                key_id=row.key_id, model=row.model,
                reserved_tokens=int(float(rl["reserved_tokens"])),
                actual_tokens=item.actual_tokens,
                charged_at_ms=int(float(rl["charged_at_ms"]))), timeout=2)
        except grpc.aio.AioRpcError as e:
            log.warning("could not settle %s: %s", row.request_id, e.details())

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
