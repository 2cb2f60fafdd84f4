"""Cedar policies for a request whose project enables them: default deny, 403 policy_denied.

The client learns the class of rule that denied it (no policy permits / a forbid matched), never
the policy text or ids; the log has the ids. The principal's current spend is read only if some
policy mentions spend: from the in-process store directly, from Redis at most once a second per
key, so a policy check costs one Cedar evaluation, not a query. Spend is what costsink has
recorded, so a Cedar spend cap lags the traffic by the access-log flush (and that second);
budgets, with their holds, are the exact tool (docs/policies.md).
"""

from __future__ import annotations

import logging
import time
from datetime import datetime

from prometheus_client import Counter

from tollway.budgets import from_units, key_counters, period_labels
from tollway.manifest import KeyBinding
from tollway.policy import request_context
from tollway.spend import SpendStore, SpendUnavailable

from .decision import Allow, Deny, RequestFacts, Runtime

log = logging.getLogger("tollway.extauthz.policies")

POLICY_DECISIONS = Counter("tollway_policy_decisions_total", "Cedar policy decisions",
                           ["result"])

SPEND_CACHE_SECONDS = 1.0


class PolicyGate:
    def __init__(self, spend: SpendStore) -> None:
        self.spend = spend
        self.cache_seconds = 0.0 if spend.shared_in_process else SPEND_CACHE_SECONDS
        self._cache: dict[str, tuple[float, tuple[int, int]]] = {}
        self._reported: set[str] = set()  # evaluation errors already logged

    async def current_spend(self, b: KeyBinding, labels: dict[str, str]) -> tuple[int, int]:
        key = f"{b.key.id}:{labels['day']}"
        hit = self._cache.get(key)
        if hit and hit[0] > time.monotonic():
            return hit[1]
        day, month = key_counters(b.key.id, labels)
        ((daily, _), (monthly, _)) = await self.spend.read(b.org.id, [day, month])
        if len(self._cache) > 100_000:
            self._cache.clear()
        if self.cache_seconds:
            self._cache[key] = (time.monotonic() + self.cache_seconds, (daily, monthly))
        return daily, monthly

    async def check(self, rt: Runtime, allow: Allow, facts: RequestFacts, now: datetime
                    ) -> Deny | None:
        b = allow.binding
        if not b.project.policies_enabled:
            return None
        compiled = rt.policies
        assert compiled is not None, "compile_runtime compiles policies when a project uses them"
        daily = monthly = 0
        if compiled.reads_spend:
            try:
                daily, monthly = await self.current_spend(
                    b, period_labels(now, rt.manifest.gateway.timezone))
            except SpendUnavailable as e:
                log.error("spend store unreachable, cannot evaluate spend policies: %s", e)
                POLICY_DECISIONS.labels("store_down").inc()
                return Deny("gateway_unavailable", "the gateway cannot evaluate policies right "
                            "now; retry shortly", allow.route.dialect, b.key.id)
        decision = compiled.evaluate(
            b, b.status, allow.route.action, allow.model,
            request_context(allow.model, facts.source_ip, now, allow.stream, allow.route.path),
            from_units(daily), from_units(monthly))
        for error in decision.errors:
            POLICY_DECISIONS.labels("evaluation_error").inc()
            if error not in self._reported and len(self._reported) < 1000:
                self._reported.add(error)  # once each: a broken policy must not flood the log
                log.warning("a policy failed to evaluate and was skipped (key %s): %s",
                            b.key.id, error)
        if decision.allowed:
            POLICY_DECISIONS.labels("permit").inc()
            return None
        POLICY_DECISIONS.labels("deny").inc()
        log.info("policy denied key %s %s on %s: %s %s", b.key.id, allow.route.action,
                 allow.model, decision.rule_class, ", ".join(decision.determining))
        return Deny("policy_denied", f"denied by policy: {decision.rule_class}",
                    allow.route.dialect, b.key.id)
