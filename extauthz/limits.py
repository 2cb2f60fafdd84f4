"""An allowed request's limits: its budget hold and, with `services.rate_limit: check`, its
rate limit. Both are taken, or neither: a request refused by a rate limit holds no budget, and
one refused by a budget is charged to no rate limit.

Where the counter backend can take both in one step (Redis counters and spend in one Redis:
`CounterBackend.holding`), one call to it does; otherwise the hold comes first, and is released
when the rate limit refuses.
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import datetime

from ratelimit.admission import (
    BACKEND_LATENCY,
    Admission,
    admission,
    admit,
    charges,
    refund,
    unreachable,
)
from ratelimit.admission import Request as RateRequest
from ratelimit.backend import BackendUnavailable, CounterBackend, Outcome
from tollway.quotas import Rule
from tollway.spend import HoldOutcome, SpendStore

from .budget import (
    Held,
    HoldPlan,
    hold_budget,
    holding,
    judge_hold,
    plan_hold,
    release_hold,
    store_down,
)
from .decision import Allow, Deny, RequestFacts, Runtime

log = logging.getLogger("tollway.extauthz")


def rate_request(allow: Allow) -> RateRequest:
    b = allow.binding
    return RateRequest(org=b.org.id, key_id=b.key.id, model=allow.model, route=allow.route.name,
                       dialect=allow.route.dialect, reserve_tokens=allow.reserve_tokens)


def rate_limit_deny(allow: Allow, limited: Admission) -> Deny:
    """The refusal of a rate limit answered in the Check, as the rate-limit filter words it."""
    dialect, key_id = allow.route.dialect, allow.binding.key.id
    if limited.refusal is None:  # the counters are down and the route is fail-closed
        return Deny("gateway_unavailable", "the rate-limit counters cannot be reached; retry",
                    dialect, key_id)
    return Deny("rate_limit_exceeded", limited.refusal.message, dialect, key_id,
                retry_after=limited.refusal.retry_after, headers=tuple(limited.headers))


class Limits:
    def __init__(self, spend: SpendStore, counters: CounterBackend | None) -> None:
        self.spend = spend
        self.counters = counters  # the rate-limit counters, for services.rate_limit: check
        self.in_one_step = counters.holding(spend) if counters is not None else None

    async def take(self, rt: Runtime, allow: Allow, facts: RequestFacts, now: datetime,
                   wait: float, rendered_for: str) -> tuple[Held | Deny, Admission | None]:
        """The request's hold (or why not), and the rate limit's answer when this Check gives
        it (None: the rate-limit filter asks ratelimit). `rendered_for`: the mode of the
        listener that asks (its route says it; the manifest's for a route rendered before it
        did). Envoy's configuration, not this process's manifest, decides whether a rate-limit
        filter will ask after this Check, so a reload of either never leaves a request charged
        twice or not at all. `wait`: how long other requests' holds may keep it waiting."""
        plan = plan_hold(rt, allow, facts, now)
        if (rendered_for or rt.manifest.services.rate_limit) != "check":
            return await hold_budget(self.spend, rt, allow, plan, wait), None
        if self.counters is None:
            log.error("route %s has extauthz answer the rate limit, but the memory counters "
                      "live in the ratelimit process: refusing; serve extauthz with ratelimit "
                      "or use Redis counters", allow.route.name)
            limited = Admission(unavailable=True)
            return rate_limit_deny(allow, limited), limited
        req = rate_request(allow)
        rules, costs = charges(rt.manifest, allow.binding, req)
        if plan is not None and rules and self.in_one_step is not None:
            return await self._in_one_step(rt, allow, plan, req, rules, costs, wait)
        held = await hold_budget(self.spend, rt, allow, plan, wait)
        if not isinstance(held, Held):
            return held, None
        limited = await admit(self.counters, rt.manifest, allow.binding, req)
        if not limited.allowed:
            await release_hold(self.spend, held)
            return rate_limit_deny(allow, limited), limited
        return held, limited

    async def _in_one_step(self, rt: Runtime, allow: Allow, plan: HoldPlan, req: RateRequest,
                           rules: list[Rule], costs: list[int], wait: float
                           ) -> tuple[Held | Deny, Admission | None]:
        take, h = self.in_one_step, plan.held
        assert take is not None

        async def attempt() -> tuple[HoldOutcome, Outcome | None, int]:
            charged_at = int(time.time() * 1000)  # the bucket settlement corrects later
            started = time.perf_counter()
            try:
                return *await take(h.org, h.request_id, plan.budgets, plan.amount,
                                   plan.ttl_ms, rules, costs), charged_at
            finally:
                BACKEND_LATENCY.observe(time.perf_counter() - started)

        try:
            hold_outcome, charged, charged_at = await holding(attempt, lambda a: a[0], wait)
        except asyncio.CancelledError:
            # Envoy cancelled the Check: the hold may have been placed all the same
            await asyncio.shield(release_hold(self.spend, h))
            raise
        except BackendUnavailable as e:  # the spend store's Redis too: the route decides
            return store_down(allow, e), unreachable(rt.manifest, req, e)
        held = judge_hold(rt, allow, plan, hold_outcome)
        if charged is None:  # the budget refused: nothing charged
            return held, None
        limited = admission(req, charged, charged_at)
        if not limited.allowed:  # nothing held
            return rate_limit_deny(allow, limited), limited
        return held, limited

    async def give_back(self, rt: Runtime, allow: Allow, held: Held,
                        limited: Admission | None) -> None:
        """Undo what was taken for a request that will never reach the provider."""
        await release_hold(self.spend, held)
        if self.counters is not None and limited is not None and limited.metadata:
            await refund(self.counters, rt.manifest, allow.binding, rate_request(allow),
                         limited)
