"""`costsink`: what it costs. Envoy's gRPC access-log sink, pricing every request."""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime

import grpc
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc

from tollway.budgets import period_starts
from tollway.manifest import Manifest
from tollway.refs import state_dir
from tollway.reload import Compiled
from tollway.serve import ServiceContext

from .ledger import Ledger, open_ledger
from .service import AccessLogSink
from .spend import SpendRecorder
from .spool import Spool

log = logging.getLogger("tollway.costsink")


class CostSink:
    grpc_names = (als_pb2.DESCRIPTOR.services_by_name["AccessLogService"].full_name,)

    def __init__(self, ctx: ServiceContext, manifest: Compiled[Manifest], ledger: Ledger,
                 spool: Spool) -> None:
        self.ctx = ctx
        self.ledger = ledger
        self.spend = SpendRecorder(ctx.spend_store())
        self.sink = AccessLogSink(manifest, ledger, spool, self.spend)

    def register(self, server: grpc.aio.Server) -> None:
        als_pb2_grpc.add_AccessLogServiceServicer_to_server(self.sink, server)

    async def start(self) -> None:
        # a ledger that is down at start does not stop the sink: entries go to the spool
        up_to_date = await self.sink.replay()
        if self.ctx.spend_store().shared_in_process:
            await self._seed_spend(up_to_date)
        self.ctx.tasks.append(asyncio.create_task(self.sink.write_forever(), name="ledger"))
        self.ctx.tasks.append(asyncio.create_task(self.sink.replay_forever(), name="spool"))

    async def _seed_spend(self, ledger_reachable: bool) -> None:
        """An in-process counter store starts empty: fill it with this day's and month's spend
        from the ledger, or a restart would hand every budget a fresh period."""
        m = self.ctx.manifest
        try:
            await self.sink.ensure_open()
        except Exception as e:
            log.error("cannot read spend from the ledger, budgets start from zero: %s", e)
            return
        now = datetime.now(UTC)
        for period, since in period_starts(now, m.gateway.timezone).items():
            totals = await self.ledger.spend_totals(since.astimezone(UTC))
            await self.spend.seed(m, totals, period, now)
        log.info("spend counters seeded from the ledger (%s)",
                 "up to date" if ledger_reachable else "spool pending")

    async def stop(self) -> None:
        await self.sink.drain()
        await self.sink.close()
        if self.sink.ledger_open:
            await self.ledger.close()


async def build(ctx: ServiceContext) -> CostSink:
    manifest = ctx.watcher.subscribe(Compiled(lambda m: m, ctx.manifest))
    return CostSink(ctx, manifest, open_ledger(ctx.manifest.storage.ledger),
                    Spool(state_dir() / "spool"))
