"""`tollway simulate`: what a proposed manifest would have done to the traffic the ledger holds.

Every recorded request (key, model, route, time, tokens, cost) is replayed in time order
against the proposed manifest's allowlists, model rules, rate limits and budgets, with fresh
counters; each outcome is compared with what the gateway answered then. Per project and key it
reports the requests the edit would now refuse (and why, and what they cost), and those it
would now let through.

What it re-decides and how:
- allowlist and catalogue (the route's provider must serve the model), role model rules;
- rate limits: each rule's window slides over the replayed requests (requests count 1, token
  limits count the tokens the provider reported); a refused request counts nothing;
- budgets: an enforced budget refuses a request whose recorded cost would take the period's
  spend past the limit. The gateway refuses on the request's maximum possible cost (its hold),
  so this is a lower bound of what it would refuse.
What it keeps as recorded: refusals it cannot re-decide from the ledger (a wrong or revoked
key, a Cedar policy: the ledger has no client address) and requests without a key.
A request refused then and admitted now has no recorded cost: it is counted, not priced.
"""

from __future__ import annotations

import json
from collections import defaultdict, deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

from tollway.budgets import budgets_for, money, period_labels, to_units
from tollway.keys.mirror import KeyMirror
from tollway.manifest import KeyBinding, Manifest
from tollway.quotas import Rule, rules_for

# refusals the replay decides anew; any other refusal is kept as it was
REDECIDED = {None, "model_not_allowed", "rate_limit_exceeded", "budget_exceeded",
             "budget_in_flight"}
OK = "ok"


@dataclass
class Tally:
    requests: int = 0
    refused_then: int = 0
    refused_now: int = 0
    newly_refused: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    newly_allowed: int = 0
    blocked_spend: Decimal = Decimal(0)

    def as_dict(self) -> dict[str, Any]:
        return {"requests": self.requests, "refused_then": self.refused_then,
                "refused_now": self.refused_now, "newly_refused": dict(self.newly_refused),
                "newly_allowed": self.newly_allowed,
                "blocked_spend": money(self.blocked_spend)}


@dataclass
class Report:
    replayed: int = 0
    kept: int = 0  # rows whose outcome the replay does not re-decide
    by_project: dict[str, Tally] = field(default_factory=lambda: defaultdict(Tally))
    by_key: dict[str, Tally] = field(default_factory=lambda: defaultdict(Tally))

    def as_json(self) -> str:
        return json.dumps({"replayed": self.replayed, "kept_as_recorded": self.kept,
                           "projects": {k: v.as_dict() for k, v in sorted(
                               self.by_project.items())},
                           "keys": {k: v.as_dict() for k, v in sorted(self.by_key.items())}},
                          indent=2)

    def table(self, currency: str) -> str:
        lines = [f"replayed {self.replayed:,} requests ({self.kept:,} refusals kept as "
                 "recorded: keys, policies)", ""]
        header = ("SCOPE", "REQUESTS", "REFUSED THEN", "REFUSED NOW", "NEWLY REFUSED",
                  "NEWLY ALLOWED", f"BLOCKED SPEND ({currency})")
        rows = [header]
        for prefix, tallies in (("project", self.by_project), ("key", self.by_key)):
            for name, t in sorted(tallies.items()):
                why = ", ".join(f"{n} {r}" for r, n in sorted(t.newly_refused.items())) or "0"
                rows.append((f"{prefix} {name}", f"{t.requests:,}", f"{t.refused_then:,}",
                             f"{t.refused_now:,}", why, f"{t.newly_allowed:,}",
                             money(t.blocked_spend)))
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                  for r in rows]
        return "\n".join(lines)


class Replay:
    """The proposed manifest's state as the requests are replayed."""

    def __init__(self, m: Manifest, keys: KeyMirror | None) -> None:
        self.m = m
        self.keys = keys
        self.windows: dict[str, deque[tuple[float, int]]] = defaultdict(deque)
        self.window_totals: dict[str, int] = defaultdict(int)
        self.spent: dict[str, int] = defaultdict(int)
        self._rules: dict[tuple[str, str], list[Rule]] = {}
        self._allowed: dict[tuple[str, str, str | None], bool] = {}
        self._routes = {r.name: r for r in m.routes}

    def binding(self, key_id: str) -> KeyBinding | None:
        if self.keys is not None:
            return self.keys.binding(self.m, key_id)
        return self.m.bindings.get(key_id)

    def model_allowed(self, b: KeyBinding, model: str, route_name: str | None) -> bool:
        cached = self._allowed.get((b.key.id, model, route_name))
        if cached is not None:
            return cached
        route = self._routes.get(route_name or "")
        providers = [self.m.provider(route.provider)] if route else list(self.m.providers)
        ok = (any(p.model(model) for p in providers)
              and (b.allowed_models is None or model in b.allowed_models)
              and b.role_may_use(model))
        self._allowed[(b.key.id, model, route_name)] = ok
        return ok

    def rate_limited(self, b: KeyBinding, model: str, at: float, tokens: int) -> bool:
        rules = self._rules.get((b.key.id, model))
        if rules is None:
            rules = self._rules[(b.key.id, model)] = [
                r for r in rules_for(self.m, b, model) if r.enforce]
        charges = []
        for r in rules:
            key = f"{b.org.id}|{r.counter}"
            window = self.windows[key]
            while window and window[0][0] <= at - r.period:
                self.window_totals[key] -= window.popleft()[1]
            amount = 1 if r.kind == "requests" else tokens
            if self.window_totals[key] + amount > r.limit:
                return True
            charges.append((key, amount))
        for key, amount in charges:  # atomically across quotas, as the gateway charges
            self.windows[key].append((at, amount))
            self.window_totals[key] += amount
        return False

    def over_budget(self, b: KeyBinding, model: str, at: datetime, cost: Decimal) -> bool:
        budgets = [bg for bg in budgets_for(self.m, b, model,
                                            period_labels(at, self.m.gateway.timezone))
                   if bg.enforce]
        units = to_units(cost)
        keys = [f"{b.org.id}|{bg.counter.key}" for bg in budgets]
        if any(self.spent[k] + units > bg.limit for k, bg in zip(keys, budgets, strict=True)):
            return True
        for k in dict.fromkeys(keys):
            self.spent[k] += units
        return False

    def decide(self, row: Any) -> str:
        b = self.binding(row.key_id)
        if b is None:
            return "invalid_api_key"
        model = row.model or ""
        if not self.model_allowed(b, model, row.route):
            return "model_not_allowed"
        tokens = row.input_tokens + row.output_tokens
        if self.rate_limited(b, model, row.at.timestamp(), tokens):
            return "rate_limit_exceeded"
        if row.cost is not None and self.over_budget(b, model, row.at, row.cost):
            return "budget_exceeded"
        return OK


class Simulation:
    """Feed ledger rows in time order, batch by batch; read `report` at the end."""

    def __init__(self, m: Manifest, keys: KeyMirror | None = None) -> None:
        self.replay = Replay(m, keys)
        self.report = Report()

    def feed(self, rows: Iterable[Any]) -> None:
        replay, report = self.replay, self.report
        for row in rows:
            if not row.key_id:
                continue
            if row.deny_reason not in REDECIDED:
                report.kept += 1
                continue
            then = row.deny_reason or OK
            report.replayed += 1
            now = replay.decide(row)
            b = replay.binding(row.key_id)
            project = f"{b.org.id}/{b.project.id}" if b else f"{row.org}/{row.project}"
            for tally in (report.by_project[project], report.by_key[row.key_id]):
                tally.requests += 1
                tally.refused_then += then != OK
                tally.refused_now += now != OK
                if then == OK and now != OK:
                    tally.newly_refused[now] += 1
                    tally.blocked_spend += row.cost or Decimal(0)
                elif then != OK and now == OK:
                    tally.newly_allowed += 1


async def run(m: Manifest, since: datetime | None, until: datetime | None) -> Report:
    """Replay the ledger `m` names against `m`, with its key store's runtime keys."""
    from costsink.ledger import open_ledger
    from tollway.keys import StoreUnavailable, open_key_store

    keys: KeyMirror | None = KeyMirror(open_key_store(m.storage.keys))
    assert keys is not None
    try:
        await keys.store.open()
        await keys.refresh()
    except StoreUnavailable:
        keys = None  # the manifest's keys only
    ledger = open_ledger(m.storage.ledger)
    await ledger.open()
    simulation = Simulation(m, keys)
    try:
        async for batch in ledger.batches(since, until):
            if keys is not None:
                await keys.hold(row.key_id for row in batch if row.key_id)
            simulation.feed(batch)
    finally:
        await ledger.close()
        if keys is not None:
            await keys.store.close()
    return simulation.report
