"""Who may call: the authorization decision, free of gRPC so it reads (and tests) plainly.

The order matters. The secret is verified before anything about the key is revealed, so an
unauthenticated caller cannot probe whether a key id exists, is suspended or is revoked.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from tollway.errors import ErrorCode
from tollway.keys import KeyRecord, split_key, verify_secret
from tollway.keys.mirror import KeyMirror
from tollway.manifest import KeyBinding, KeyStatus, Manifest, Provider, Route
from tollway.manifest.model import Dialect
from tollway.policy import CompiledPolicies
from tollway.quotas import reserve_tokens
from tollway.refs import pepper, resolve

MAX_MODEL_LENGTH = 256


@dataclass(frozen=True)
class Runtime:
    """A manifest with the provider credentials it references resolved, ready to serve."""

    manifest: Manifest
    credentials: Mapping[str, str]
    routes: Mapping[str, Route]
    pepper: bytes  # re-read with the credentials: a rotated Secret file takes effect
    policies: CompiledPolicies | None = None


def compile_runtime(manifest: Manifest, *, secrets: bool = True) -> Runtime:
    """Resolve every provider credential and the pepper now, so a missing one refuses the
    manifest up front; parse the Cedar policies once, not per request. Without `secrets`
    (`tollway explain`, which swaps no credential and verifies no secret) neither is read."""
    credentials = {p.name: resolve(p.credential) if secrets else "(not resolved)"
                   for p in manifest.providers}
    secret = pepper(manifest.storage.pepper, create=True) if secrets else b""
    uses_policies = manifest.policies or any(
        o.policies_enabled for o in manifest.organizations)
    return Runtime(manifest=manifest, credentials=credentials,
                   routes={r.name: r for r in manifest.routes}, pepper=secret,
                   policies=CompiledPolicies(manifest) if uses_policies else None)


@dataclass(frozen=True)
class RequestFacts:
    """What Envoy tells us about one request."""

    route_name: str | None
    headers: Mapping[str, str]
    body: Mapping[str, Any]  # the json_to_metadata namespace: model, stream, max_tokens, flags
    source_ip: str
    body_bytes: int | None  # from content-length; None when the client streamed the body
    request_id: str = ""  # Envoy's x-request-id: the access log's entry carries the same


@dataclass(frozen=True)
class Allow:
    route: Route
    provider: Provider
    credential: str
    binding: KeyBinding
    model: str
    stream: bool
    max_tokens: int | None
    reserve_tokens: int


@dataclass(frozen=True)
class Deny:
    code: ErrorCode
    message: str
    dialect: Dialect
    key_id: str | None = None
    retry_after: int = 1  # seconds, for the codes answered with Retry-After (429, 503)
    headers: tuple[tuple[str, str], ...] = ()  # more to answer with (a rate limit's)


def _presented_key(headers: Mapping[str, str]) -> str | None:
    auth = (headers.get("authorization") or "").strip()
    if auth:  # an empty header counts as absent: x-api-key may still carry the key
        scheme, _, token = auth.partition(" ")
        return token.strip() if scheme.lower() == "bearer" else None
    return headers.get("x-api-key")


def presented_key_id(headers: Mapping[str, str]) -> str:
    parts = split_key(_presented_key(headers) or "")
    return parts[0] if parts else ""


def _short(value: str, limit: int = 64) -> str:
    """Echo client input in messages only in bounded, printable form."""
    clean = "".join(c if c.isprintable() else "?" for c in value[:limit])
    return clean + ("..." if len(value) > limit else "")


@dataclass(frozen=True)
class Caller:
    """Who an authenticated request comes from."""

    key_id: str
    binding: KeyBinding


def authenticate(m: Manifest, pepper: bytes, mirror: KeyMirror, headers: Mapping[str, str],
                 dialect: Dialect, now: datetime) -> Caller | Deny:
    """The key's secret, then its state (revoked, suspended, expired, at every level). The
    gateway's Check and the key holder's own endpoints (GET /v1/models) both start here."""
    d = dialect
    presented = _presented_key(headers)
    if not presented:
        return Deny("invalid_api_key", "missing API key: send Authorization: Bearer <key> "
                    "or x-api-key", d)
    parts = split_key(presented)
    if parts is None:
        return Deny("invalid_api_key", "invalid API key", d)
    key_id, secret = parts
    binding = mirror.binding(m, key_id)
    if binding is None:
        return Deny("invalid_api_key", "invalid API key", d)
    if not mirror.usable:
        return Deny("gateway_unavailable", "the gateway cannot verify keys right now; retry "
                    "shortly", d, key_id)
    record = mirror.get(key_id)
    if record is None or not verify_secret(record, pepper, secret, now):
        return Deny("invalid_api_key", "invalid API key", d)
    return key_state(record, binding, d, now)


def key_state(record: KeyRecord, binding: KeyBinding, d: Dialect, now: datetime
              ) -> Caller | Deny:
    """Revoked, suspended or expired, at any level (org, project, client, key, store)."""
    key_id = record.key_id
    status = KeyStatus.worst(record.status, binding.status)
    if status is KeyStatus.REVOKED:
        return Deny("key_revoked", f"key {key_id} has been revoked", d, key_id)
    if status is KeyStatus.SUSPENDED:
        return Deny("key_suspended", f"key {key_id} is suspended", d, key_id)
    expiries = [t for t in (record.expires_at, _parse_ts(binding.key.expires_at)) if t]
    if expiries and now >= min(expiries):
        return Deny("key_expired", f"key {key_id} expired at {min(expiries).isoformat()}",
                    d, key_id)
    return Caller(key_id, binding)


def decide(rt: Runtime, mirror: KeyMirror, facts: RequestFacts,
           now: datetime) -> Allow | Deny:
    route = rt.routes.get(facts.route_name or "")
    if route is None:
        return Deny("not_found", "no such endpoint on this gateway", Dialect.OPENAI)
    d = route.dialect
    caller = authenticate(rt.manifest, rt.pepper, mirror, facts.headers, d, now)
    if isinstance(caller, Deny):
        return caller
    return authorize(rt, route, caller, facts)


def authorize(rt: Runtime, route: Route, caller: Caller, facts: RequestFacts) -> Allow | Deny:
    """What this caller asks of this route: the body's model, stream and output cap, the
    route provider's catalogue, the key's allowlist and its role's model rules. `tollway
    explain` runs it too, after key_state (it has no secret to verify)."""
    d = route.dialect
    key_id, binding = caller.key_id, caller.binding
    body = facts.body
    if body.get("body_error"):
        return Deny("invalid_request_error", "request body is not valid JSON", d, key_id)
    model = body.get("model")
    if model is None:
        return Deny("invalid_request_error", "request body must be a JSON object with a "
                    "'model' field", d, key_id)
    if not isinstance(model, str) or not model or len(model) > MAX_MODEL_LENGTH:
        return Deny("invalid_request_error", "'model' must be a non-empty string", d, key_id)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        return Deny("invalid_request_error", "'stream' must be true or false", d, key_id)
    max_tokens = body.get("max_tokens")
    if max_tokens is not None and (isinstance(max_tokens, bool)
                                   or not isinstance(max_tokens, int | float)
                                   or max_tokens != int(max_tokens) or max_tokens < 1):
        return Deny("invalid_request_error", "'max_tokens' must be a positive integer", d,
                    key_id)

    provider = rt.manifest.provider(route.provider)
    if provider.model(model) is None:
        return Deny("model_not_allowed", f"model '{_short(model)}' is not served on "
                    f"{route.path} (provider {provider.name})", d, key_id)
    if binding.allowed_models is not None and model not in binding.allowed_models:
        return Deny("model_not_allowed", f"model '{_short(model)}' is not allowed for key "
                    f"{key_id} on {route.path}", d, key_id)

    if not binding.role_may_use(model):
        role = binding.client.user.role
        return Deny("model_not_allowed", f"model '{_short(model)}' is not enabled for "
                    f"{'role ' + repr(role) if role else 'users without a role'} in project "
                    f"{binding.project.id}", d, key_id)

    catalogue = provider.model(model)
    assert catalogue is not None
    cap = int(max_tokens) if max_tokens is not None else None
    # without a content-length, assume the largest body the gateway accepts
    size = facts.body_bytes if facts.body_bytes is not None else \
        rt.manifest.gateway.max_request_bytes
    return Allow(route=route, provider=provider, credential=rt.credentials[provider.name],
                 binding=binding, model=model, stream=stream, max_tokens=cap,
                 reserve_tokens=reserve_tokens(size, cap, catalogue.max_output_tokens))


def _parse_ts(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None
