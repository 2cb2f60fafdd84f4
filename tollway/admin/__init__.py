"""The admin API (`tollway serve --services admin`): clients and keys at runtime, admin
tokens, the audit log, and GET /v1/models for key holders. gRPC here; REST/JSON through
Envoy's grpc_json_transcoder (tollway/render.py) with the descriptor set `admin.pb`, which
proto/generate.sh writes from proto/tollway/admin/v1/admin.proto.

The package itself holds only what Envoy's configuration names (the descriptor set and the
service's name), so that `tollway render` does not load the service, its stores and gRPC
(a quarter of a second of a render); `build` loads them."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tollway.serve import ServiceContext

    from .servicer import Admin

DESCRIPTOR_SET = Path(__file__).resolve().parent / "admin.pb"
# admin.proto's package and service (tests/test_render.py holds it to the descriptor)
SERVICE = "tollway.admin.v1.Admin"


async def build(ctx: ServiceContext) -> Admin:
    from .servicer import Admin

    return Admin(ctx)
