"""Budget state for an allowed request: hold its maximum possible cost, or answer 402.

The hold is what keeps 64 requests in flight from overrunning a budget together: each one
reserves the most it can cost before it is let through, and costsink turns that into the real
cost when the access log arrives (docs/architecture.md#budgets).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import TypeVar

from prometheus_client import Counter

from tollway.budgets import (
    Budget,
    SpendCounter,
    budgets_for,
    from_units,
    period_labels,
    shown,
    to_units,
)
from tollway.pricing import max_cost
from tollway.spend import HoldOutcome, SpendStore, SpendUnavailable

from .decision import Allow, Deny, RequestFacts, Runtime

log = logging.getLogger("tollway.extauthz.budget")

BUDGET_DECISIONS = Counter("tollway_budget_decisions_total",
                           "Budget checks of allowed requests",
                           ["result"])  # held, refused, in_flight, monitor_over, no_budget,
# store_down
# the children every allowed Check counts, looked up once
NO_BUDGET, HELD = BUDGET_DECISIONS.labels("no_budget"), BUDGET_DECISIONS.labels("held")

HOLD_GRACE_MS = 60_000
# a request refused only by other requests' holds waits this long for them to settle (within
# Envoy's 0.5 s ext_authz timeout; the access log flushes every 0.1 s), polling the store
SETTLE_WAIT = 0.3
SETTLE_POLL = 0.02
# what a Check keeps of Envoy's deadline for its last hold attempt and its answer: a client
# whose request waited for holds gets 429 budget_in_flight, not Envoy's 503 for a late Check
ANSWER_RESERVE = 0.1
_REPORTED: set[str] = set()  # past the route timeout: time for the access log to arrive
T = TypeVar("T")


@dataclass(frozen=True)
class Held:
    amount: int  # in budgets.UNIT; 0 when no enforced budget applies
    org: str = ""
    request_id: str = ""
    counters: tuple[SpendCounter, ...] = ()


async def release_hold(store: SpendStore, held: Held) -> None:
    """Undo a hold for a request that will never reach the provider (Envoy gave up on its
    Check), so it does not block the budget until it expires."""
    if not held.amount:
        return
    try:
        await store.commit(held.org, held.request_id, list(held.counters), 0)
    except SpendUnavailable as e:
        log.warning("could not release the hold of %s (it expires by itself): %s",
                    held.request_id, e)


def max_hold(rt: Runtime, allow: Allow, facts: RequestFacts) -> int:
    """The request's maximum possible cost in UNIT; an unpriced model holds one unit: it has
    no countable cost, but a used-up budget still refuses it."""
    m = rt.manifest
    catalogue = allow.provider.model(allow.model)
    assert catalogue is not None
    size = facts.body_bytes if facts.body_bytes is not None else m.gateway.max_request_bytes
    output = min(allow.max_tokens or catalogue.max_output_tokens, catalogue.max_output_tokens)
    cost = max_cost(m.rate_card, allow.provider.name, allow.model, size, output)
    return max(1, to_units(cost, round_up=True)) if cost is not None else 1


def settle_wait(time_remaining: float | None) -> float:
    """How long a Check may wait for other requests' holds to settle: SETTLE_WAIT, or less
    when Envoy's deadline is nearer (a Check that began late, queued behind others under load,
    still answers in time)."""
    if time_remaining is None:
        return SETTLE_WAIT
    return max(0.0, min(SETTLE_WAIT, time_remaining - ANSWER_RESERVE))


@dataclass(frozen=True)
class HoldPlan:
    """What an allowed request holds, before it is held."""

    budgets: list[Budget]  # every budget that applies, monitors too
    amount: int
    ttl_ms: int
    held: Held  # the hold once placed: what a commit of 0 releases


def plan_hold(rt: Runtime, allow: Allow, facts: RequestFacts, now: datetime) -> HoldPlan | None:
    """None: no budget applies to the request."""
    m, b = rt.manifest, allow.binding
    budgets = budgets_for(m, b, allow.model, period_labels(now, m.gateway.timezone))
    if not budgets:
        return None
    amount = max_hold(rt, allow, facts)
    # Envoy always sets x-request-id; without one, a hold of its own (released by expiry)
    request_id = facts.request_id or f"no-request-id-{uuid.uuid4().hex}"
    return HoldPlan(budgets, amount, allow.route.timeout_seconds * 1000 + HOLD_GRACE_MS,
                    Held(amount, b.org.id, request_id,
                         tuple(dict.fromkeys(x.counter for x in budgets if x.enforce))))


async def hold_budget(store: SpendStore, rt: Runtime, allow: Allow, plan: HoldPlan | None,
                      wait: float = SETTLE_WAIT) -> Held | Deny:
    """Hold what `plan` says (None: no budget applies), or say why not: 402, 429
    budget_in_flight, or the route's answer while the store is down."""
    if plan is None:
        NO_BUDGET.inc()
        return Held(0)
    h = plan.held
    try:
        outcome = await holding(
            lambda: store.hold(h.org, h.request_id, plan.budgets, plan.amount, plan.ttl_ms),
            lambda outcome: outcome, wait)
    except asyncio.CancelledError:
        # Envoy cancelled the Check: the hold may have been placed all the same
        await asyncio.shield(release_hold(store, h))
        raise
    except SpendUnavailable as e:
        return store_down(allow, e)
    return judge_hold(rt, allow, plan, outcome)


def store_down(allow: Allow, e: Exception) -> Held | Deny:
    """The answer while the spend store cannot be reached: the route's fail-closed or
    fail-open (no hold)."""
    BUDGET_DECISIONS.labels("store_down").inc()
    if allow.route.fail_closed:
        log.error("spend store unreachable, refusing (fail-closed route): %s", e)
        return Deny("gateway_unavailable", "the gateway cannot check budgets right now; "
                    "retry shortly", allow.route.dialect, allow.binding.key.id)
    log.error("spend store unreachable, allowing without a hold: %s", e)
    return Held(0)


def judge_hold(rt: Runtime, allow: Allow, plan: HoldPlan, outcome: HoldOutcome) -> Held | Deny:
    """What a hold's outcome means for the request: held, 402, or 429 budget_in_flight."""
    _report_monitor_budgets(outcome, allow.binding.key.id)
    refused = outcome.refused_by
    if refused is None:
        HELD.inc()
        return plan.held if plan.held.counters else Held(0)
    over = outcome.over_budget
    if over is None:
        BUDGET_DECISIONS.labels("in_flight").inc()
        return _in_flight(rt, allow, refused.budget, refused.spent, refused.held, plan.amount)
    BUDGET_DECISIONS.labels("refused").inc()
    return _exceeded(rt, allow, over.budget, over.spent, plan.amount)


def _exceeded(rt: Runtime, allow: Allow, bg: Budget, spent: int, amount: int) -> Deny:
    currency = rt.manifest.rate_card.currency if rt.manifest.rate_card else ""
    return Deny("budget_exceeded",
                f"budget exceeded: {bg.label} is {shown(bg.limit)} {currency}; spent "
                f"{shown(spent)}, and this request may cost up to {shown(amount)}",
                allow.route.dialect, allow.binding.key.id)


def _in_flight(rt: Runtime, allow: Allow, bg: Budget, spent: int, held: int, amount: int
               ) -> Deny:
    currency = rt.manifest.rate_card.currency if rt.manifest.rate_card else ""
    return Deny("budget_in_flight",
                f"{bg.label} ({shown(bg.limit)} {currency}) has room for this request once "
                f"requests in flight settle: spent {shown(spent)}, held {shown(held)}, this "
                f"request may cost up to {shown(amount)}; retry after 1 s",
                allow.route.dialect, allow.binding.key.id)


async def budget_verdict(store: SpendStore, rt: Runtime, allow: Allow, facts: RequestFacts,
                         now: datetime) -> Deny | None:
    """What hold_budget would answer now, read without holding (`tollway explain`): 402 when
    spent + this request's maximum cost passes an enforced budget, 429 budget_in_flight when
    only other requests' holds stand in the way."""
    m, b = rt.manifest, allow.binding
    budgets = [bg for bg in budgets_for(m, b, allow.model,
                                        period_labels(now, m.gateway.timezone)) if bg.enforce]
    if not budgets:
        return None
    amount = max_hold(rt, allow, facts)
    states = await store.read(b.org.id, [bg.counter for bg in budgets])
    for bg, (spent, _) in zip(budgets, states, strict=True):
        if spent + amount > bg.limit:
            return _exceeded(rt, allow, bg, spent, amount)
    for bg, (spent, held) in zip(budgets, states, strict=True):
        if spent + held + amount > bg.limit:
            return _in_flight(rt, allow, bg, spent, held, amount)
    return None


async def holding(attempt: Callable[[], Awaitable[T]], hold_of: Callable[[T], HoldOutcome],
                  wait: float) -> T:
    """Make a hold `attempt`; where only the holds of other requests stand in the way of
    `hold_of` its answer, try again until they settle or `wait` seconds pass. A sequential
    client's previous request has finished, but its hold lasts until its access-log entry
    reaches costsink (one flush interval): that hold must not refuse the next request."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    while True:
        answer = await attempt()
        outcome = hold_of(answer)
        if (outcome.allowed or outcome.over_budget is not None
                or loop.time() + SETTLE_POLL > deadline):
            return answer
        await asyncio.sleep(SETTLE_POLL)


def _report_monitor_budgets(outcome: HoldOutcome, key_id: str) -> None:
    """Monitor budgets never refuse: count each would-be refusal, log it once per budget,
    period and key (not once a request)."""
    for s in outcome.states:
        if s.budget.enforce or s.fits(outcome.amount):
            continue
        BUDGET_DECISIONS.labels("monitor_over").inc()
        seen = f"{s.budget.counter.key}/{s.budget.quota}/{key_id}"
        if seen in _REPORTED:
            continue
        if len(_REPORTED) > 10_000:
            _REPORTED.clear()
        _REPORTED.add(seen)
        log.warning("budget %s would refuse key %s (monitor): spent %s of %s", s.budget.label,
                    key_id, from_units(s.spent), from_units(s.budget.limit))
