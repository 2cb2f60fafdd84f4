"""One request's rate limit: every quota that applies, checked and charged in one step.

The decision lives here, apart from the protocol that asks for it: Envoy's rate-limit filter
asks through `ShouldRateLimit` (ratelimit/service.py) by default; with `services.rate_limit:
check`, extauthz asks in the same Check that admitted the request (one gRPC round trip per
request instead of two). Both get the same `Admission` and turn it into their own answer.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import Counter, Histogram

from tollway.keys.mirror import KeyMirror
from tollway.manifest import KeyBinding, Manifest
from tollway.manifest.model import Dialect
from tollway.quotas import Rule, rules_for

from .backend import BackendUnavailable, CounterBackend, Outcome, RuleState, Settlement

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


@dataclass(frozen=True)
class Request:
    org: str
    key_id: str
    model: str
    route: str
    dialect: Dialect
    reserve_tokens: int


@dataclass(frozen=True)
class Refusal:
    message: str
    retry_after: int  # seconds, for Retry-After
    quota: str  # the quota that refuses longest


@dataclass(frozen=True)
class Admission:
    """What the quotas said. `headers`: OpenAI's x-ratelimit-* for every answer that passed a
    rate limit. `refusal`: set when an enforced quota refuses. `unavailable`: the counters could
    not be reached and the route is fail-closed. `metadata`: what token settlement needs later
    (the reservation and when it was charged), for an admitted request."""

    headers: list[tuple[str, str]] = field(default_factory=list)
    refusal: Refusal | None = None
    unavailable: bool = False
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def allowed(self) -> bool:
        return self.refusal is None and not self.unavailable


ADMITTED = Admission()  # no quota applies, or the counters are down on a fail-open route


def _duration(seconds: float) -> str:
    if seconds == math.inf:
        return "never"
    s = max(0, math.ceil(seconds))
    return f"{s // 60}m{s % 60}s" if s >= 60 else f"{s}s"


def rate_headers(outcome: Outcome) -> list[tuple[str, str]]:
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
        headers += [(f"x-ratelimit-limit-{kind}", str(state.rule.limit)),
                    (f"x-ratelimit-remaining-{kind}", str(remaining)),
                    (f"x-ratelimit-reset-{kind}", _duration(state.reset_seconds))]
    return headers


def refusal(req: Request, worst: RuleState, cost: int) -> str:
    """The message of a refusal by `worst`, the quota that refuses longest; `cost`: what the
    request would have charged it."""
    r = worst.rule
    if worst.retry_seconds == math.inf:
        return (f"this request reserves {cost} tokens, more than quota '{r.quota}' "
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


def _report(req: Request, outcome: Outcome) -> None:
    for s in outcome.states:
        result = ("over_limit" if s.rule.enforce else "would_deny") if s.over else "ok"
        DECISIONS.labels(s.rule.quota, result).inc()
        if s.over and not s.rule.enforce:
            log.info("monitor: quota '%s' would refuse key %s (%s used of %s %s)",
                     s.rule.quota, req.key_id, s.used, s.rule.limit, s.rule.kind)


def charges(m: Manifest, binding: KeyBinding, req: Request) -> tuple[list[Rule], list[int]]:
    """Every quota of `req` and what it charges each: one request, or its token reservation."""
    rules = rules_for(m, binding, req.model)
    return rules, [1 if r.kind == "requests" else req.reserve_tokens for r in rules]


def unreachable(m: Manifest, req: Request, e: Exception) -> Admission:
    """The answer while the counters cannot be reached: the route's fail-closed or fail-open."""
    route = m.route(req.route)
    if route is None or route.fail_closed:
        BACKEND_ERRORS.labels("refused").inc()
        log.error("counter backend unavailable, refusing (fail-closed): %s", e)
        return Admission(unavailable=True)
    BACKEND_ERRORS.labels("allowed").inc()
    log.warning("counter backend unavailable, allowing (fail-open): %s", e)
    return ADMITTED


def admission(req: Request, outcome: Outcome, charged_at_ms: int) -> Admission:
    """What a charge's outcome tells the client, and settlement later."""
    _report(req, outcome)
    headers = rate_headers(outcome)
    if outcome.allowed:
        return Admission(headers, metadata={"reserved_tokens": req.reserve_tokens,
                                            "charged_at_ms": charged_at_ms})
    denied = [(s, c) for s, c in zip(outcome.states, outcome.costs, strict=True)
              if s.over and s.rule.enforce]
    worst, cost = max(denied, key=lambda sc: sc[0].retry_seconds)
    retry_after = (math.ceil(worst.retry_seconds) if worst.retry_seconds != math.inf
                   else max(s.rule.period for s, _ in denied))
    return Admission(headers, Refusal(refusal(req, worst, cost), retry_after, worst.rule.quota))


async def admit(backend: CounterBackend, m: Manifest, binding: KeyBinding,
                req: Request) -> Admission:
    """Check and charge every quota of `req` in one backend step: all are charged, or none."""
    rules, costs = charges(m, binding, req)
    if not rules:
        return ADMITTED
    charged_at = int(time.time() * 1000)
    started = time.perf_counter()
    try:
        outcome = await backend.charge(binding.org.id, rules, costs)
    except BackendUnavailable as e:
        return unreachable(m, req, e)
    finally:
        BACKEND_LATENCY.observe(time.perf_counter() - started)
    return admission(req, outcome, charged_at)


async def _settlement(keys: KeyMirror, m: Manifest, key_id: str, model: str,
                      reserved_tokens: int, actual_tokens: int,
                      charged_at_ms: int) -> Settlement | None:
    """`actual - reserved` on every token quota of the key and model; None for a key no
    longer known."""
    binding = await lookup(keys, m, key_id)
    if binding is None:
        return None
    rules = [r for r in rules_for(m, binding, model) if r.kind == "tokens"]
    return Settlement(binding.org.id, rules, charged_at_ms, actual_tokens - reserved_tokens)


def _count(delta: int) -> None:
    SETTLED.labels("down" if delta < 0 else "up").inc(abs(delta))


async def settle(backend: CounterBackend, keys: KeyMirror, m: Manifest, key_id: str,
                 model: str, reserved_tokens: int, actual_tokens: int,
                 charged_at_ms: int) -> int | None:
    """Correct a request's token reservation with what the provider reported: `actual -
    reserved` in the bucket the reservation was charged to, on every token quota of the key and
    model. Returns the number of counters corrected; None for a key no longer known. Raises
    BackendUnavailable."""
    s = await _settlement(keys, m, key_id, model, reserved_tokens, actual_tokens,
                          charged_at_ms)
    if s is None:
        return None
    await backend.settle(s.org, s.rules, s.charged_at_ms, s.delta)
    _count(s.delta)
    return len(s.rules)


# what settle_many takes of each request: key id, model, reserved, actual, charged at (ms)
Reservation = tuple[str, str, int, int, int]


async def settle_many(backend: CounterBackend, keys: KeyMirror, m: Manifest,
                      reservations: list[Reservation]) -> int:
    """settle() for a batch, in one call to the counters per org (costsink's written batch).
    Returns how many were settled (a key no longer known is not). Raises BackendUnavailable:
    then none were."""
    found = [s for s in [await _settlement(keys, m, *r) for r in reservations]
             if s is not None]
    await backend.settle_many(found)
    for s in found:
        _count(s.delta)
    return len(found)


async def refund(backend: CounterBackend, m: Manifest, binding: KeyBinding, req: Request,
                 admission: Admission) -> None:
    """Undo an admitted charge for a request that will never reach the provider (Envoy
    stopped waiting for the answer that admitted it): one request and its reservation off
    every quota, in the bucket they were charged to."""
    charged_at = admission.metadata.get("charged_at_ms")
    if not admission.allowed or charged_at is None:
        return
    rules = rules_for(m, binding, req.model)
    try:
        for kind, amount in (("requests", 1), ("tokens", req.reserve_tokens)):
            of_kind = [r for r in rules if r.kind == kind]
            if of_kind and amount:
                await backend.settle(binding.org.id, of_kind, charged_at, -amount)
    except BackendUnavailable as e:
        log.warning("could not refund the charge of a request Envoy gave up on: %s", e)
