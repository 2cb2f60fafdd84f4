"""Envoy's global rate-limit service (`ShouldRateLimit`) over Tollway's quotas.

Envoy sends one descriptor per request, built from `extauthz`'s dynamic metadata (org, project,
key_id, model, route, dialect, reserve_tokens); ratelimit/admission.py decides. The answer
carries OpenAI-style x-ratelimit-* headers for the tightest request and token rule, and, when
refused, the dialect's error body and Retry-After.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import grpc
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc

from tollway._proto import settle_pb2, settle_pb2_grpc
from tollway.errors import error_body
from tollway.keys.mirror import KeyMirror
from tollway.manifest import KeyBinding, Manifest
from tollway.manifest.model import Dialect
from tollway.metadata import RATE_LIMITED_BY, to_struct
from tollway.reload import Live
from tollway.serve import past_deadline

from .admission import Request, admit, lookup, refund, settle
from .backend import BackendUnavailable, CounterBackend

OK = rls_pb2.RateLimitResponse.OK
OVER_LIMIT = rls_pb2.RateLimitResponse.OVER_LIMIT


def descriptor_entries(request: rls_pb2.RateLimitRequest) -> dict[str, str]:
    """The request's descriptor entries (one descriptor per request), by key."""
    return {e.key: e.value for d in request.descriptors for e in d.entries}


def parse(entries: dict[str, str]) -> Request | None:
    try:
        return Request(org=entries["org"], key_id=entries["key_id"], model=entries["model"],
                       route=entries.get("route", ""),
                       dialect=Dialect(entries.get("dialect", "openai")),
                       reserve_tokens=max(0, int(entries.get("reserve_tokens", "0"))))
    except (KeyError, ValueError):
        return None


def charged_in_check(entries: dict[str, str], m: Manifest) -> bool:
    """extauthz charged this request in its Check: the request says so (its route's
    descriptor RATE_LIMITED_BY, from ext_authz's metadata); from a route rendered before it
    could say so, the manifest's services.rate_limit decides."""
    return entries.get(RATE_LIMITED_BY, m.services.rate_limit) == "check"


def _add_headers(field: Any, pairs: Iterable[tuple[str, str]]) -> None:
    """The headers added where they lie in the response (a message passed to a constructor
    is copied: 0.6x the cost for an admitted request's six)."""
    add = field.add
    for k, v in pairs:
        add(key=k, value=v)


class RateLimitService(rls_pb2_grpc.RateLimitServiceServicer):  # type: ignore[misc]
    def __init__(self, manifest: Live[Manifest], backend: CounterBackend,
                 keys: KeyMirror) -> None:
        self.manifest = manifest
        self.backend = backend
        self.keys = keys

    async def ShouldRateLimit(self, request: rls_pb2.RateLimitRequest,
                              context: grpc.aio.ServicerContext) -> rls_pb2.RateLimitResponse:
        m = self.manifest.value
        entries = descriptor_entries(request)
        if charged_in_check(entries, m):
            # Envoy asks only while its listener still has the filter (a switch to check on
            # its way to it): the Check answered this request's rate limit already
            return rls_pb2.RateLimitResponse(overall_code=OK)
        req = parse(entries)
        binding = await lookup(self.keys, m, req.key_id) if req else None
        if req is None or binding is None:
            return rls_pb2.RateLimitResponse(overall_code=OK)  # extauthz refused it already
        admission = await admit(self.backend, m, binding, req)
        if past_deadline(context):  # the request must not count against the limits
            await refund(self.backend, m, binding, req, admission)
        if admission.unavailable:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "counter backend unavailable")
        refused = admission.refusal
        if refused is None:
            response = rls_pb2.RateLimitResponse(overall_code=OK)
            _add_headers(response.response_headers_to_add, admission.headers)
            to_struct(admission.metadata, into=response.dynamic_metadata)
            return response
        response = rls_pb2.RateLimitResponse(
            overall_code=OVER_LIMIT,
            raw_body=error_body(req.dialect, "rate_limit_exceeded", refused.message).encode())
        _add_headers(response.response_headers_to_add, [
            *admission.headers, ("retry-after", str(refused.retry_after)),
            ("content-type", "application/json"), ("x-tollway-error", "rate_limit_exceeded")])
        to_struct({"denied_quota": refused.quota}, into=response.dynamic_metadata)
        return response


async def binding_or_abort(m: Manifest, keys: KeyMirror, key_id: str,
                           context: grpc.aio.ServicerContext) -> KeyBinding:
    binding = await lookup(keys, m, key_id)
    if binding is None:
        await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown key id {key_id}")
    assert binding is not None  # abort raised
    return binding


class TokenSettlementService(settle_pb2_grpc.TokenSettlementServicer):  # type: ignore[misc]
    """Corrects a reservation with the real usage, so TPM counts what the provider reported.
    For a costsink in another process while the counters are this process's memory; one
    beside ratelimit, or apart with Redis counters, calls `settle` directly."""

    def __init__(self, manifest: Live[Manifest], backend: CounterBackend,
                 keys: KeyMirror) -> None:
        self.manifest = manifest
        self.backend = backend
        self.keys = keys

    async def Settle(self, request: settle_pb2.SettleRequest,
                     context: grpc.aio.ServicerContext) -> settle_pb2.SettleResponse:
        try:
            counters = await settle(self.backend, self.keys, self.manifest.value,
                                    request.key_id, request.model, request.reserved_tokens,
                                    request.actual_tokens, request.charged_at_ms)
        except BackendUnavailable as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
        if counters is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown key id {request.key_id}")
        return settle_pb2.SettleResponse(delta=request.actual_tokens - request.reserved_tokens,
                                         counters=counters)
