"""`Usage.KeyUsage`: a key's limits, what is left of each and when it resets.

It lives next to the rate limiter because that process holds the counters (with `counters:
memory`, the only copy of them). Rate-limit counters are read by charging zero, which takes the
same path as a real request and so reports exactly what the next request would see.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import grpc

from tollway._proto import usage_pb2, usage_pb2_grpc
from tollway.budgets import (
    Budget,
    budgets_for,
    key_counters,
    period_labels,
    period_starts,
    shown,
)
from tollway.keys.mirror import KeyMirror
from tollway.manifest import KeyBinding, Manifest
from tollway.quotas import Rule, rules_for
from tollway.reload import Live
from tollway.spend import SpendStore, SpendUnavailable

from .backend import BackendUnavailable, CounterBackend
from .service import binding_or_abort


def key_models(m: Manifest, b: KeyBinding) -> list[str]:
    if b.allowed_models is not None:
        return sorted(b.allowed_models)
    routed = {r.provider for r in m.routes}
    return sorted({x.name for p in m.providers if p.name in routed for x in p.models})


def seconds_to_next(period: str, now: datetime, timezone: str) -> float:
    start = period_starts(now, timezone)[period]
    if period == "day":
        nxt = start + timedelta(days=1)
    else:
        nxt = (start + timedelta(days=32)).replace(day=1)
    # compared in UTC: across a DST change a local day is not 24 hours
    return (nxt.astimezone(UTC) - now.astimezone(UTC)).total_seconds()


class UsageService(usage_pb2_grpc.UsageServicer):  # type: ignore[misc]
    def __init__(self, manifest: Live[Manifest], backend: CounterBackend,
                 spend: SpendStore, keys: KeyMirror) -> None:
        self.manifest = manifest
        self.backend = backend
        self.spend = spend
        self.keys = keys

    async def KeyUsage(self, request: usage_pb2.KeyUsageRequest,
                       context: grpc.aio.ServicerContext) -> usage_pb2.KeyUsageResponse:
        m = self.manifest.value
        b = await binding_or_abort(m, self.keys, request.key_id, context)
        models = [request.model] if request.model else key_models(m, b)
        now = datetime.now(ZoneInfo(m.gateway.timezone))
        try:
            limits = await self._rate_limits(m, b, models)
            spend_limits, today, month = await self._spend(m, b, models, now)
        except (BackendUnavailable, SpendUnavailable) as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
        return usage_pb2.KeyUsageResponse(
            key_id=b.key.id, org=b.org.id, project=b.project.id,
            currency=m.rate_card.currency if m.rate_card else "",
            spent_today=today, spent_this_month=month, limits=limits + spend_limits)

    async def _rate_limits(self, m: Manifest, b: KeyBinding, models: list[str]
                           ) -> list[usage_pb2.Limit]:
        rules: dict[str, tuple[Rule, list[str]]] = {}
        for model in models:
            for r in rules_for(m, b, model):
                rules.setdefault(f"{r.counter}:{r.period}", (r, []))[1].append(model)
        if not rules:
            return []
        listed = list(rules.values())
        outcome = await self.backend.charge(b.org.id, [r for r, _ in listed], [0] * len(listed))
        out = []
        for (r, applies), state in zip(listed, outcome.states, strict=True):
            scope = r.counter.rsplit("/", 2)[0]
            out.append(usage_pb2.Limit(
                scope=scope, quota=r.quota, name=r.counter.rsplit("/", 1)[1], kind=r.kind,
                models=[] if len(applies) == len(models) else applies, limit=str(r.limit),
                used=str(state.used), held="0", remaining=str(state.remaining(0)),
                resets_in_seconds=state.reset_seconds, enforced=r.enforce))
        return out

    async def _spend(self, m: Manifest, b: KeyBinding, models: list[str], now: datetime
                     ) -> tuple[list[usage_pb2.Limit], str, str]:
        labels = period_labels(now, m.gateway.timezone)
        budgets: dict[tuple[str, str, str], tuple[Budget, list[str]]] = {}
        for model in models:
            for bg in budgets_for(m, b, model, labels):
                budgets.setdefault((bg.scope, bg.quota, bg.counter.period), (bg, []))[1] \
                    .append(model)
        own = key_counters(b.key.id, labels)  # the key's day, month
        listed = list(budgets.values())
        values = await self.spend.read(b.org.id, own + [bg.counter for bg, _ in listed])
        out = []
        for (bg, applies), (spent, held) in zip(listed, values[2:], strict=True):
            out.append(usage_pb2.Limit(
                scope=bg.scope, quota=bg.quota, name=f"spend_per_{bg.counter.period}",
                kind="spend", models=[] if len(applies) == len(models) else applies,
                limit=shown(bg.limit), used=shown(spent), held=shown(held),
                remaining=shown(max(0, bg.limit - spent - held)),
                resets_in_seconds=seconds_to_next(bg.counter.period, now, m.gateway.timezone),
                enforced=bg.enforce))
        return out, shown(values[0][0]), shown(values[1][0])
