"""The admin API (`tollway serve --services admin`): clients and keys at runtime, admin
tokens, the audit log, and GET /v1/models for key holders. gRPC here; REST/JSON through
Envoy's grpc_json_transcoder (tollway/render.py) with the descriptor set `admin.pb`, which
proto/generate.sh writes from proto/tollway/admin/v1/admin.proto."""

from __future__ import annotations

from pathlib import Path

import grpc

from tollway.refs import pepper
from tollway.reload import Compiled
from tollway.serve import ServiceContext

from ._proto import admin_pb2, admin_pb2_grpc
from .service import AdminService

DESCRIPTOR_SET = Path(__file__).resolve().parent / "admin.pb"
SERVICE = admin_pb2.DESCRIPTOR.services_by_name["Admin"].full_name


class Admin:
    grpc_names = (SERVICE,)

    def __init__(self, ctx: ServiceContext) -> None:
        self.ctx = ctx
        manifest = ctx.watcher.subscribe(Compiled(lambda m: m, ctx.manifest))
        secret = ctx.watcher.subscribe(
            Compiled(lambda m: pepper(m.storage.pepper, create=True), ctx.manifest))
        self.servicer = AdminService(manifest, ctx.key_mirror(), secret)

    def register(self, server: grpc.aio.Server) -> None:
        admin_pb2_grpc.add_AdminServicer_to_server(self.servicer, server)

    async def start(self) -> None:
        await self.ctx.start_key_mirror(required=True)

    async def stop(self) -> None:
        return None


async def build(ctx: ServiceContext) -> Admin:
    return Admin(ctx)
