"""`costsink`: what it costs. Envoy's gRPC access-log sink, pricing every request."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import grpc
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc

from tollway.access_log import access_log_path
from tollway.manifest import Manifest
from tollway.refs import private_file, state_dir
from tollway.reload import Live
from tollway.serve import ServiceContext

from .durable_log import DurableLog
from .ledger import Ledger, open_ledger
from .service import AccessLogSink
from .settlement import settler_for
from .spend import SpendRecorder
from .spool import Spool

log = logging.getLogger("tollway.costsink")


class CostSink:
    grpc_names = (als_pb2.DESCRIPTOR.services_by_name["AccessLogService"].full_name,)

    def __init__(self, ctx: ServiceContext, manifest: Live[Manifest], ledger: Ledger,
                 spool: Spool) -> None:
        self.ctx = ctx
        self.ledger = ledger
        self.spend = SpendRecorder(ctx.spend_store(), ctx.key_mirror())
        self.sink = AccessLogSink(
            manifest, ledger, spool, self.spend,
            DurableLog(access_log_path(ctx.manifest.gateway), state_dir() / "access-log.pos",
                       keep_bytes=ctx.manifest.gateway.access_log_keep_mb << 20),
            settler=settler_for(ctx, manifest),
            shares_loop=bool(ctx.hosted & {"extauthz", "ratelimit"}))
        # present while a sink runs: found at start, the last one did not stop (drain) cleanly
        self.running = state_dir() / "costsink.running"

    def register(self, server: grpc.aio.Server) -> None:
        als_pb2_grpc.add_AccessLogServiceServicer_to_server(self.sink, server)

    async def start(self) -> None:
        await self.ctx.start_key_mirror(required=False)
        if self.running.exists():
            log.warning("costsink did not stop cleanly last time: spend will be rebuilt from "
                        "the ledger")
            self.sink.spend_behind_ledger = True
        private_file(self.running)
        # a ledger that is down at start does not stop the sink: entries go to the spool
        await self.sink.replay()
        # an in-process store starts empty, Redis may have lost its data, and a crash may have
        # left a batch's spend out: in each case the counters of this day and month are rebuilt
        # from the ledger before the first commit
        await self.sink.rebuild_spend_if_lost()
        self.ctx.tasks.append(asyncio.create_task(self.sink.write_forever(), name="ledger"))
        self.ctx.tasks.append(asyncio.create_task(self.sink.replay_forever(), name="spool"))
        self.ctx.tasks.append(asyncio.create_task(self.sink.keep_spend_true(), name="spend"))
        self.ctx.tasks.append(asyncio.create_task(self.sink.reconcile_forever(),
                                                  name="durable-log"))

    async def stop(self) -> None:
        await self.sink.drain()
        await self.sink.close()
        if self.sink.ledger_open:
            await self.ledger.close()
        self.running.unlink(missing_ok=True)


async def build(ctx: ServiceContext) -> CostSink:
    with contextlib.suppress(OSError):  # Envoy appends to it; created here, it is 0600
        private_file(access_log_path(ctx.manifest.gateway))
    manifest = ctx.watcher.subscribe(Live(lambda m: m, ctx.manifest))
    return CostSink(ctx, manifest, open_ledger(ctx.manifest.storage.ledger),
                    Spool(state_dir() / "spool"))
