"""`extauthz`: who may call. Envoy's ext_authz gRPC service for Tollway keys."""

from __future__ import annotations

import grpc
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc

from tollway.reload import Live
from tollway.serve import ServiceContext

from .decision import Runtime, compile_runtime
from .service import AuthorizationService


class ExtAuthz:
    grpc_names = (external_auth_pb2.DESCRIPTOR.services_by_name["Authorization"].full_name,)

    def __init__(self, ctx: ServiceContext, runtime: Live[Runtime]) -> None:
        self.ctx = ctx
        self.mirror = ctx.key_mirror()
        # memory counters are ratelimit's own: a private set here would split every count
        apart = ctx.manifest.storage.counters == "memory" and "ratelimit" not in ctx.hosted
        self.servicer = AuthorizationService(runtime, self.mirror, ctx.spend_store(),
                                             None if apart else ctx.counter_backend())

    def register(self, server: grpc.aio.Server) -> None:
        external_auth_pb2_grpc.add_AuthorizationServicer_to_server(self.servicer, server)

    async def start(self) -> None:
        await self.ctx.start_key_mirror(required=True)

    async def stop(self) -> None:
        return None


async def build(ctx: ServiceContext) -> ExtAuthz:
    m = ctx.manifest
    runtime = ctx.watcher.subscribe(Live(compile_runtime, m))
    return ExtAuthz(ctx, runtime)
