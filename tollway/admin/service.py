"""The admin API's handlers: clients and keys at runtime, the audit log, and GET /v1/models.

Each call authenticates its admin token, checks its scope against the object's org and
project, validates documents with the manifest's own parser, and writes through the key store
(one audited transaction per change). Every extauthz replica's key mirror picks the change up:
within milliseconds on PostgreSQL (NOTIFY), within 0.2 s on SQLite.

Statuses, as the REST caller sees them through Envoy's transcoder: no or a wrong token 401,
out of scope 403, unknown id 404, an id taken 409, an invalid field 400 naming it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, NoReturn

import grpc
from google.api import httpbody_pb2
from google.protobuf import json_format, struct_pb2

from extauthz.decision import Caller, Deny, authenticate
from tollway._proto import admin_pb2, admin_pb2_grpc, usage_pb2, usage_pb2_grpc
from tollway.errors import status_of
from tollway.keys import AuditQuery, KeyEvent, KeyExists, KeyManager, KeyRecord
from tollway.keys import runtime as rt
from tollway.keys.mirror import KeyMirror
from tollway.manifest import KeyStatus, Manifest
from tollway.manifest.model import Dialect
from tollway.reload import Live
from tollway.tls import ServiceChannel, target

from . import tokens

# HTTP status of a refusal → the gRPC code the transcoder turns back into it
_GRPC_CODES = {400: grpc.StatusCode.INVALID_ARGUMENT, 401: grpc.StatusCode.UNAUTHENTICATED,
               403: grpc.StatusCode.PERMISSION_DENIED, 404: grpc.StatusCode.NOT_FOUND,
               409: grpc.StatusCode.ALREADY_EXISTS, 429: grpc.StatusCode.RESOURCE_EXHAUSTED,
               503: grpc.StatusCode.UNAVAILABLE}


async def _fail(context: grpc.aio.ServicerContext, status: int, code: str,
                message: str) -> NoReturn:
    context.set_trailing_metadata((("x-tollway-error", code),))
    await context.abort(_GRPC_CODES[status], message)
    raise AssertionError("abort raises")


def _plain(value: Any) -> Any:
    """Struct numbers are doubles: 60.0 → 60, so the manifest's parser sees integers."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _doc(message: struct_pb2.Struct) -> dict[str, Any]:
    result: dict[str, Any] = _plain(json_format.MessageToDict(message))
    return result


def _struct(doc: Mapping[str, Any] | None) -> struct_pb2.Struct:
    out = struct_pb2.Struct()
    if doc:
        out.update(json.loads(json.dumps(doc, default=str)))
    return out


def _ts(value: datetime | None) -> str:
    return value.isoformat() if value else ""


class AdminService(admin_pb2_grpc.AdminServicer):  # type: ignore[misc]
    def __init__(self, manifest: Live[Manifest], keys: KeyMirror,
                 pepper: Live[bytes]) -> None:
        self.manifest = manifest
        self.keys = keys
        self.store = keys.store
        self.pepper = pepper
        self._usage: ServiceChannel | None = None  # to the rate-limit service's Usage API

    # -- who is calling ----------------------------------------------------------------------

    @staticmethod
    def _headers(context: grpc.aio.ServicerContext) -> dict[str, str]:
        return {k.lower(): v for k, v in (context.invocation_metadata() or ())
                if isinstance(v, str)}

    def _source(self, context: grpc.aio.ServicerContext) -> str:
        h = self._headers(context)
        return h.get("x-envoy-external-address") or context.peer() or ""

    async def _admin(self, context: grpc.aio.ServicerContext) -> tokens.Admin:
        auth = self._headers(context).get("authorization", "")
        scheme, _, presented = auth.partition(" ")
        admin = await tokens.verify(self.store, self.pepper.value, presented.strip()) \
            if scheme.lower() == "bearer" else None
        if admin is None:
            await _fail(context, 401, "invalid_admin_token",
                        "missing or invalid admin token: send Authorization: Bearer <token>")
        assert admin is not None
        return admin

    async def _scope(self, admin: tokens.Admin, org: str, project: str,
                     context: grpc.aio.ServicerContext) -> None:
        if not admin.covers(org, project):
            await _fail(context, 403, "out_of_scope",
                        f"admin token {admin.token_id} ({admin.scope}) may not act on "
                        f"{org}/{project}")

    def _manager(self, admin: tokens.Admin, context: grpc.aio.ServicerContext) -> KeyManager:
        return KeyManager(self.store, self.pepper.value, actor=admin.actor,
                          source=self._source(context))

    # -- clients -----------------------------------------------------------------------------

    @staticmethod
    def _client_message(obj: Any) -> admin_pb2.Client:
        data = json.loads(obj.doc)
        return admin_pb2.Client(id=obj.id, org=data["org"], project=data["project"],
                                client=_struct(data["client"]),
                                created_at=_ts(obj.created_at), updated_at=_ts(obj.updated_at))

    async def _client(self, admin: tokens.Admin, client_id: str,
                      context: grpc.aio.ServicerContext) -> tuple[Any, dict[str, Any]]:
        obj = await self.store.get_object(rt.CLIENT, client_id)
        if obj is None:
            await _fail(context, 404, "not_found", f"no runtime client {client_id!r}")
        data: dict[str, Any] = json.loads(obj.doc)
        await self._scope(admin, data["org"], data["project"], context)
        return obj, data

    async def _write_client(self, admin: tokens.Admin, context: grpc.aio.ServicerContext,
                            action: str, org: str, project: str, doc: dict[str, Any],
                            before: dict[str, Any] | None) -> admin_pb2.Client:
        try:
            client = rt.parse_client(doc)
        except rt.FieldError as e:
            await _fail(context, 400, "invalid_field", str(e))
        stored = json.dumps({"org": org, "project": project, "client": doc})
        event = KeyEvent(client.id, action, datetime.now(UTC), admin.actor, "", kind=rt.CLIENT,
                         before=json.dumps(before) if before is not None else "",
                         after=json.dumps(doc), source=self._source(context))
        try:
            obj = await self.store.put_object(rt.CLIENT, client.id, stored, event,
                                              create=before is None)
        except KeyExists:
            await _fail(context, 409, "already_exists", f"client {client.id!r} exists")
        return self._client_message(obj)

    async def CreateClient(self, request: admin_pb2.CreateClientRequest,
                           context: grpc.aio.ServicerContext) -> admin_pb2.Client:
        admin = await self._admin(context)
        m = self.manifest.value
        if rt.find_project(m, request.org, request.project) is None:
            await _fail(context, 404, "not_found",
                        f"no project {request.org}/{request.project} in the manifest")
        await self._scope(admin, request.org, request.project, context)
        doc = _doc(request.client)
        if any(c.id == doc.get("id") for o in m.organizations for p in o.projects
               for c in p.clients):
            await _fail(context, 409, "already_exists",
                        f"client {doc.get('id')!r} is declared in the manifest")
        return await self._write_client(admin, context, "create", request.org,
                                        request.project, doc, None)

    async def ListClients(self, request: admin_pb2.ListClientsRequest,
                          context: grpc.aio.ServicerContext) -> admin_pb2.ListClientsResponse:
        admin = await self._admin(context)
        await self._scope(admin, request.org, request.project, context)
        await self.keys.refresh()
        found = [o for o in self.keys.objects(rt.CLIENT)
                 if rt.place_of(o.doc) == (request.org, request.project)]
        return admin_pb2.ListClientsResponse(
            clients=[self._client_message(o) for o in sorted(found, key=lambda o: o.id)])

    async def GetClient(self, request: admin_pb2.ClientRef,
                        context: grpc.aio.ServicerContext) -> admin_pb2.Client:
        admin = await self._admin(context)
        obj, _ = await self._client(admin, request.id, context)
        return self._client_message(obj)

    async def UpdateClient(self, request: admin_pb2.UpdateClientRequest,
                           context: grpc.aio.ServicerContext) -> admin_pb2.Client:
        admin = await self._admin(context)
        _, data = await self._client(admin, request.id, context)
        doc = {**_doc(request.client), "id": request.id}
        return await self._write_client(admin, context, "update", data["org"],
                                        data["project"], doc, data["client"])

    async def _client_status(self, request: admin_pb2.ClientRef,
                             context: grpc.aio.ServicerContext, status: KeyStatus,
                             action: str) -> admin_pb2.Client:
        admin = await self._admin(context)
        _, data = await self._client(admin, request.id, context)
        before = data["client"]
        if before.get("status") == KeyStatus.REVOKED.value:
            await _fail(context, 400, "revoked", f"client {request.id} is revoked; revocation "
                        "is final")
        doc = {**before, "status": status.value}
        return await self._write_client(admin, context, action, data["org"], data["project"],
                                        doc, before)

    async def SuspendClient(self, request: admin_pb2.ClientRef,
                            context: grpc.aio.ServicerContext) -> admin_pb2.Client:
        return await self._client_status(request, context, KeyStatus.SUSPENDED, "suspend")

    async def ResumeClient(self, request: admin_pb2.ClientRef,
                           context: grpc.aio.ServicerContext) -> admin_pb2.Client:
        return await self._client_status(request, context, KeyStatus.ACTIVE, "resume")

    async def RevokeClient(self, request: admin_pb2.ClientRef,
                           context: grpc.aio.ServicerContext) -> admin_pb2.Client:
        return await self._client_status(request, context, KeyStatus.REVOKED, "revoke")

    # -- keys --------------------------------------------------------------------------------

    @staticmethod
    def _key_message(record: KeyRecord, secret: str = "") -> admin_pb2.Key:
        spec = json.loads(record.spec or "{}")
        return admin_pb2.Key(id=record.key_id, org=spec.get("org", ""),
                             project=spec.get("project", ""), client=spec.get("client", ""),
                             status=record.status.value, key=_struct(spec.get("key")),
                             expires_at=_ts(record.expires_at),
                             created_at=_ts(record.created_at),
                             updated_at=_ts(record.updated_at), secret=secret)

    async def _key(self, admin: tokens.Admin, key_id: str,
                   context: grpc.aio.ServicerContext) -> tuple[KeyRecord, dict[str, Any]]:
        record = await self.store.get(key_id)
        if record is None or record.spec is None:
            await _fail(context, 404, "not_found", f"no runtime key {key_id!r}")
        assert record is not None and record.spec is not None
        spec: dict[str, Any] = json.loads(record.spec)
        await self._scope(admin, spec["org"], spec["project"], context)
        return record, spec

    async def _key_spec(self, context: grpc.aio.ServicerContext, data: dict[str, Any],
                        doc: dict[str, Any]) -> str:
        try:
            key = rt.parse_key(doc)
        except rt.FieldError as e:
            await _fail(context, 400, "invalid_field", str(e))
        problems = rt.check_in_manifest(self.manifest.value, key, data["org"], data["project"])
        if problems:
            await _fail(context, 400, "invalid_field", "; ".join(problems))
        return json.dumps({"org": data["org"], "project": data["project"],
                           "client": data["client"]["id"], "key": doc})

    async def CreateKey(self, request: admin_pb2.CreateKeyRequest,
                        context: grpc.aio.ServicerContext) -> admin_pb2.Key:
        admin = await self._admin(context)
        _, data = await self._client(admin, request.client, context)
        doc = _doc(request.key)
        spec = await self._key_spec(context, data, doc)
        key_id = str(doc["id"])
        if key_id in self.manifest.value.bindings:
            await _fail(context, 409, "already_exists",
                        f"key {key_id!r} is declared in the manifest")
        try:
            issued = await self._manager(admin, context).issue(key_id, spec=spec)
        except KeyExists:
            await _fail(context, 409, "already_exists", f"key {key_id!r} exists (revoked ids "
                        "are never reused)")
        return self._key_message(issued.record, issued.key)

    async def ListKeys(self, request: admin_pb2.ListKeysRequest,
                       context: grpc.aio.ServicerContext) -> admin_pb2.ListKeysResponse:
        admin = await self._admin(context)
        await self._client(admin, request.client, context)
        found = await self.store.client_keys(request.client)
        return admin_pb2.ListKeysResponse(keys=[self._key_message(r) for r in found])

    async def GetKey(self, request: admin_pb2.KeyRef,
                     context: grpc.aio.ServicerContext) -> admin_pb2.Key:
        admin = await self._admin(context)
        record, _ = await self._key(admin, request.id, context)
        return self._key_message(record)

    async def UpdateKey(self, request: admin_pb2.UpdateKeyRequest,
                        context: grpc.aio.ServicerContext) -> admin_pb2.Key:
        admin = await self._admin(context)
        _, spec = await self._key(admin, request.id, context)
        client = await self.store.get_object(rt.CLIENT, spec["client"])
        if client is None:
            await _fail(context, 404, "not_found", f"key {request.id}'s client is gone")
        data = json.loads(client.doc)
        new_spec = await self._key_spec(context, data, {**_doc(request.key), "id": request.id})
        record = await self._manager(admin, context).respecify(request.id, new_spec)
        return self._key_message(record)

    async def _key_status(self, request: admin_pb2.KeyRef, context: grpc.aio.ServicerContext,
                          status: KeyStatus) -> admin_pb2.Key:
        admin = await self._admin(context)
        await self._key(admin, request.id, context)
        try:
            record = await self._manager(admin, context).set_status(request.id, status,
                                                                    request.reason)
        except ValueError as e:
            await _fail(context, 400, "revoked", str(e))
        return self._key_message(record)

    async def SuspendKey(self, request: admin_pb2.KeyRef,
                         context: grpc.aio.ServicerContext) -> admin_pb2.Key:
        return await self._key_status(request, context, KeyStatus.SUSPENDED)

    async def ResumeKey(self, request: admin_pb2.KeyRef,
                        context: grpc.aio.ServicerContext) -> admin_pb2.Key:
        return await self._key_status(request, context, KeyStatus.ACTIVE)

    async def RevokeKey(self, request: admin_pb2.KeyRef,
                        context: grpc.aio.ServicerContext) -> admin_pb2.Key:
        return await self._key_status(request, context, KeyStatus.REVOKED)

    async def RotateKey(self, request: admin_pb2.RotateKeyRequest,
                        context: grpc.aio.ServicerContext) -> admin_pb2.Key:
        admin = await self._admin(context)
        await self._key(admin, request.id, context)
        if request.grace_seconds < 0:
            await _fail(context, 400, "invalid_field", "grace_seconds: must be 0 or more")
        try:
            issued = await self._manager(admin, context).rotate(
                request.id, grace=timedelta(seconds=request.grace_seconds))
        except ValueError as e:
            await _fail(context, 400, "revoked", str(e))
        return self._key_message(issued.record, issued.key)

    async def ExpireKey(self, request: admin_pb2.ExpireKeyRequest,
                        context: grpc.aio.ServicerContext) -> admin_pb2.Key:
        admin = await self._admin(context)
        await self._key(admin, request.id, context)
        at = datetime.now(UTC)
        if request.expires_at:
            try:
                at = datetime.fromisoformat(request.expires_at.replace("Z", "+00:00"))
            except ValueError:
                await _fail(context, 400, "invalid_field", "expires_at: must be ISO 8601")
            at = at if at.tzinfo else at.replace(tzinfo=UTC)
        record = await self._manager(admin, context).expire(request.id, at)
        return self._key_message(record)

    # -- audit -------------------------------------------------------------------------------

    def _where(self, e: KeyEvent) -> tuple[str, str] | None:
        """The org and project an audited object belongs to (None: gateway-level)."""
        if e.kind == rt.CLIENT:
            obj = self.keys.object(rt.CLIENT, e.key_id)
            return rt.place_of(obj.doc) if obj else None
        if e.kind == "key":
            b = self.keys.binding(self.manifest.value, e.key_id)
            return (b.org.id, b.project.id) if b else None
        return None

    async def ListAudit(self, request: admin_pb2.ListAuditRequest,
                        context: grpc.aio.ServicerContext) -> admin_pb2.ListAuditResponse:
        admin = await self._admin(context)
        since = None
        if request.since:
            try:
                since = datetime.fromisoformat(request.since.replace("Z", "+00:00"))
            except ValueError:
                await _fail(context, 400, "invalid_field", "since: must be ISO 8601")
        limit = request.limit or 100
        if not 1 <= limit <= 1000:
            await _fail(context, 400, "invalid_field", "limit: must be 1 to 1000")
        events = await self.store.audit(AuditQuery(
            kind=request.kind or None, target=request.target or None,
            actor=request.actor or None, action=request.action or None, since=since,
            limit=limit))
        if admin.scope != "*":
            await self.keys.refresh()
            events = [e for e in events if (where := self._where(e)) and admin.covers(*where)]

        def parsed(text: str) -> dict[str, Any] | None:
            try:
                value = json.loads(text) if text else None
            except ValueError:
                return None
            return value if isinstance(value, dict) else None
        return admin_pb2.ListAuditResponse(entries=[admin_pb2.AuditEntry(
            at=e.at.isoformat(), actor=e.actor, source=e.source, kind=e.kind, target=e.key_id,
            action=e.action, detail=e.detail, before=_struct(parsed(e.before)),
            after=_struct(parsed(e.after))) for e in events])

    # -- for the key holder ------------------------------------------------------------------

    async def _key_holder(self, context: grpc.aio.ServicerContext, dialect: Dialect
                          ) -> Caller:
        caller = authenticate(self.manifest.value, self.pepper.value, self.keys,
                              self._headers(context), dialect, datetime.now(UTC))
        if isinstance(caller, Deny):
            await _fail(context, status_of(caller.code), caller.code, caller.message)
        assert isinstance(caller, Caller)
        return caller

    async def GetOwnUsage(self, request: admin_pb2.GetOwnUsageRequest,
                          context: grpc.aio.ServicerContext) -> httpbody_pb2.HttpBody:
        caller = await self._key_holder(context, Dialect.OPENAI)
        m = self.manifest.value
        if request.model and not any(p.model(request.model) for p in m.providers):
            await _fail(context, 404, "not_found", f"no model {request.model!r} on this gateway")
        if self._usage is None:
            self._usage = ServiceChannel(target(*m.services.dial("ratelimit")), m.services.tls)
        try:
            answer = await usage_pb2_grpc.UsageStub(self._usage.get()).KeyUsage(
                usage_pb2.KeyUsageRequest(key_id=caller.key_id, model=request.model),
                timeout=5)
        except grpc.aio.AioRpcError as e:
            await _fail(context, 503, "gateway_unavailable",
                        f"the rate-limit service did not answer: {e.details()}")
        body = json_format.MessageToDict(answer, preserving_proto_field_name=True)
        return httpbody_pb2.HttpBody(content_type="application/json",
                                     data=json.dumps(body).encode())

    async def ListModels(self, request: admin_pb2.ListModelsRequest,
                         context: grpc.aio.ServicerContext) -> httpbody_pb2.HttpBody:
        dialect = (Dialect.ANTHROPIC if "anthropic-version" in self._headers(context)
                   else Dialect.OPENAI)
        m = self.manifest.value
        b = (await self._key_holder(context, dialect)).binding
        models: dict[str, str] = {}
        for route in m.routes:
            if route.dialect is not dialect:
                continue
            provider = m.provider(route.provider)
            for model in provider.models:
                if (b.allowed_models is None or model.name in b.allowed_models) \
                        and b.role_may_use(model.name):
                    models.setdefault(model.name, provider.name)
        names = sorted(models)
        if dialect is Dialect.ANTHROPIC:
            body: dict[str, Any] = {
                "data": [{"type": "model", "id": n, "display_name": n,
                          "created_at": "1970-01-01T00:00:00Z"} for n in names],
                "has_more": False, "first_id": names[0] if names else None,
                "last_id": names[-1] if names else None}
        else:
            body = {"object": "list", "data": [
                {"id": n, "object": "model", "created": 0, "owned_by": models[n]}
                for n in names]}
        return httpbody_pb2.HttpBody(content_type="application/json",
                                     data=json.dumps(body).encode())
