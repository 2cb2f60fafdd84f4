"""Envoy's global rate-limit service (`ShouldRateLimit`) over Tollway's quotas.

Envoy sends one descriptor per request, built from `extauthz`'s dynamic metadata (org, project,
key_id, model, route, dialect, reserve_tokens). Every quota that applies is checked and charged
in one backend step. The answer carries OpenAI-style x-ratelimit-* headers for the tightest
request and token rule, and, when refused, the dialect's error body and Retry-After.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc
from google.protobuf import struct_pb2
from prometheus_client import Counter, Histogram

from tollway.errors import error_body
from tollway.keys.mirror import KeyMirror
from tollway.manifest import KeyBinding, Manifest
from tollway.manifest.model import Dialect
from tollway.quotas import rules_for
from tollway.reload import Compiled

from ._proto import settle_pb2, settle_pb2_grpc
from .backend import BackendUnavailable, CounterBackend, Outcome, RuleState

log = logging.getLogger("tollway.ratelimit")

DECISIONS = Counter("tollway_ratelimit_decisions_total", "Rate-limit decisions by quota",
                    ["quota", "result"])
BACKEND_LATENCY = Histogram("tollway_ratelimit_backend_seconds", "One atomic charge",
                            buckets=(0.0002, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1,
                                     0.25))
BACKEND_ERRORS = Counter("tollway_ratelimit_backend_errors_total",
                         "Counter backend failures, by what the route decided", ["outcome"])

SETTLED = Counter("tollway_ratelimit_settled_tokens_total",
                  "Token reservations corrected with real usage", ["direction"])

OK = rls_pb2.RateLimitResponse.OK
OVER_LIMIT = rls_pb2.RateLimitResponse.OVER_LIMIT


@dataclass(frozen=True)
class Request:
    org: str
    key_id: str
    model: str
    route: str
    dialect: Dialect
    reserve_tokens: int


def parse(request: rls_pb2.RateLimitRequest) -> Request | None:
    entries = {e.key: e.value for d in request.descriptors for e in d.entries}
    try:
        return Request(org=entries["org"], key_id=entries["key_id"], model=entries["model"],
                       route=entries.get("route", ""),
                       dialect=Dialect(entries.get("dialect", "openai")),
                       reserve_tokens=max(0, int(entries.get("reserve_tokens", "0"))))
    except (KeyError, ValueError):
        return None


def _duration(seconds: float) -> str:
    if seconds == math.inf:
        return "never"
    s = max(0, math.ceil(seconds))
    return f"{s // 60}m{s % 60}s" if s >= 60 else f"{s}s"


def _header(key: str, value: str) -> base_pb2.HeaderValue:
    return base_pb2.HeaderValue(key=key, value=value)


def rate_headers(outcome: Outcome) -> list[base_pb2.HeaderValue]:
    """OpenAI's x-ratelimit-{limit,remaining,reset}-{requests,tokens}: the tightest rule of
    each kind (least remaining) among the enforced ones, else among all."""
    headers = []
    for kind in ("requests", "tokens"):
        pairs = [(s, c) for s, c in zip(outcome.states, outcome.costs, strict=True)
                 if s.rule.kind == kind]
        enforced = [(s, c) for s, c in pairs if s.rule.enforce] or pairs
        if not enforced:
            continue
        charged = outcome.allowed
        state, cost = min(enforced, key=lambda sc: sc[0].remaining(sc[1] if charged else 0))
        remaining = state.remaining(cost if charged else 0)
        headers += [_header(f"x-ratelimit-limit-{kind}", str(state.rule.limit)),
                    _header(f"x-ratelimit-remaining-{kind}", str(remaining)),
                    _header(f"x-ratelimit-reset-{kind}", _duration(state.reset_seconds))]
    return headers


def refusal(req: Request, denied: list[RuleState], costs: dict[str, int]) -> str:
    worst = max(denied, key=lambda s: s.retry_seconds)
    r = worst.rule
    if worst.retry_seconds == math.inf:
        return (f"this request reserves {costs[r.counter]} tokens, more than quota '{r.quota}' "
                f"allows in {_duration(r.period)} ({r.limit}); lower max_tokens or the prompt")
    return (f"rate limit reached for {req.model}: quota '{r.quota}' allows {r.limit} {r.kind} "
            f"per {_duration(r.period)}; retry in {_duration(worst.retry_seconds)}")


async def lookup(keys: KeyMirror, m: Manifest, key_id: str) -> KeyBinding | None:
    """A key's binding: the manifest's, else a runtime key's from the mirror, fetched now if
    this replica has not seen it yet (extauthz admitted it a moment ago)."""
    binding = keys.binding(m, key_id)
    if binding is None and key_id not in m.bindings and await keys.fetch(key_id):
        binding = keys.binding(m, key_id)
    return binding


class RateLimitService(rls_pb2_grpc.RateLimitServiceServicer):  # type: ignore[misc]
    def __init__(self, manifest: Compiled[Manifest], backend: CounterBackend,
                 keys: KeyMirror) -> None:
        self.manifest = manifest
        self.backend = backend
        self.keys = keys

    async def ShouldRateLimit(self, request: rls_pb2.RateLimitRequest,
                              context: grpc.aio.ServicerContext) -> rls_pb2.RateLimitResponse:
        m = self.manifest.value
        req = parse(request)
        binding = await lookup(self.keys, m, req.key_id) if req else None
        if req is None or binding is None:
            return rls_pb2.RateLimitResponse(overall_code=OK)  # extauthz refused it already
        rules = rules_for(m, binding, req.model)
        if not rules:
            return rls_pb2.RateLimitResponse(overall_code=OK)
        costs = [1 if r.kind == "requests" else req.reserve_tokens for r in rules]
        charged_at = int(time.time() * 1000)
        started = time.perf_counter()
        try:
            outcome = await self.backend.charge(binding.org.id, rules, costs)
        except BackendUnavailable as e:
            route = m.route(req.route)
            if route is None or route.fail_closed:
                BACKEND_ERRORS.labels("refused").inc()
                log.error("counter backend unavailable, refusing (fail-closed): %s", e)
                await context.abort(grpc.StatusCode.UNAVAILABLE, "counter backend unavailable")
            BACKEND_ERRORS.labels("allowed").inc()
            log.warning("counter backend unavailable, allowing (fail-open): %s", e)
            return rls_pb2.RateLimitResponse(overall_code=OK)
        finally:
            BACKEND_LATENCY.observe(time.perf_counter() - started)

        for s in outcome.states:
            result = ("over_limit" if s.rule.enforce else "would_deny") if s.over else "ok"
            DECISIONS.labels(s.rule.quota, result).inc()
            if s.over and not s.rule.enforce:
                log.info("monitor: quota '%s' would refuse key %s (%s used of %s %s)",
                         s.rule.quota, req.key_id, s.used, s.rule.limit, s.rule.kind)
        headers = rate_headers(outcome)
        metadata = struct_pb2.Struct()
        if not outcome.allowed:
            denied = [s for s in outcome.states if s.over and s.rule.enforce]
            retry = max(s.retry_seconds for s in denied)
            retry_after = str(math.ceil(retry) if retry != math.inf
                              else max(s.rule.period for s in denied))
            message = refusal(req, denied, {r.counter: c for r, c in zip(rules, costs,
                                                                          strict=True)})
            metadata.update({"denied_quota": max(denied, key=lambda s: s.retry_seconds)
                             .rule.quota})
            return rls_pb2.RateLimitResponse(
                overall_code=OVER_LIMIT,
                response_headers_to_add=[*headers, _header("retry-after", retry_after),
                                         _header("content-type", "application/json"),
                                         _header("x-tollway-error", "rate_limit_exceeded")],
                raw_body=error_body(req.dialect, "rate_limit_exceeded", message).encode(),
                dynamic_metadata=metadata)
        metadata.update({"reserved_tokens": req.reserve_tokens, "charged_at_ms": charged_at})
        return rls_pb2.RateLimitResponse(overall_code=OK, response_headers_to_add=headers,
                                         dynamic_metadata=metadata)


async def binding_or_abort(m: Manifest, keys: KeyMirror, key_id: str,
                           context: grpc.aio.ServicerContext) -> KeyBinding:
    binding = await lookup(keys, m, key_id)
    if binding is None:
        await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown key id {key_id}")
    assert binding is not None  # abort raised
    return binding


class TokenSettlementService(settle_pb2_grpc.TokenSettlementServicer):  # type: ignore[misc]
    """Corrects a reservation with the real usage, so TPM counts what the provider reported."""

    def __init__(self, manifest: Compiled[Manifest], backend: CounterBackend,
                 keys: KeyMirror) -> None:
        self.manifest = manifest
        self.backend = backend
        self.keys = keys

    async def Settle(self, request: settle_pb2.SettleRequest,
                     context: grpc.aio.ServicerContext) -> settle_pb2.SettleResponse:
        m = self.manifest.value
        binding = await binding_or_abort(m, self.keys, request.key_id, context)
        rules = [r for r in rules_for(m, binding, request.model) if r.kind == "tokens"]
        delta = request.actual_tokens - request.reserved_tokens
        try:
            await self.backend.settle(binding.org.id, rules, request.charged_at_ms, delta)
        except BackendUnavailable as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
        SETTLED.labels("down" if delta < 0 else "up").inc(abs(delta))
        return settle_pb2.SettleResponse(delta=delta, counters=len(rules))
