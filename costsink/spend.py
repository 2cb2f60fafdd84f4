"""Recorded cost → spend counters, the release of budget holds, and budget alerts.

An alert threshold (a quota's `alerts: [0.8, ...]`) fires once per budget, threshold and period:
the counter store remembers that it fired, so replicas and restarts do not repeat it. It fires
as a log line, a metric and, if `gateway.alert_webhook` is set, one JSON POST.
"""

from __future__ import annotations

import asyncio
import json
import logging
import urllib.error
import urllib.request
from collections import defaultdict
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from prometheus_client import Counter

from tollway.budgets import (
    Budget,
    SpendCounter,
    counters_for,
    from_units,
    period_labels,
    period_starts,
    spend_targets,
    to_units,
)
from tollway.keys.mirror import KeyMirror
from tollway.manifest import KeyBinding, Manifest
from tollway.spend import Commit, SpendStore, SpendUnavailable

from .ledger import Ledger, LedgerRow

log = logging.getLogger("tollway.costsink.spend")

ALERTS = Counter("tollway_budget_alerts_total", "Budget alert thresholds crossed",
                 ["scope", "quota", "period", "threshold"])
ORPHANS = Counter("tollway_costsink_orphan_holds_released_total",
                  "Budget holds of requests whose Check Envoy stopped waiting for")
SPEND_ERRORS = Counter("tollway_costsink_spend_errors_total",
                       "Spend commits that failed (the counter store was unreachable)")


WEBHOOK_TIMEOUT = 5.0  # seconds for the alert webhook's answer

# thresholds remembered as crossed: a counter key names its period, so the set only grows;
# past this many it is emptied
CROSSED_REMEMBERED = 100_000


class SpendRecorder:
    def __init__(self, store: SpendStore, keys: KeyMirror | None = None) -> None:
        self.store = store
        self.keys = keys  # a runtime key's budgets come from the key mirror
        self._webhooks: set[asyncio.Task[None]] = set()
        # batches the store could not take, oldest first: each is retried as it was sent,
        # never merged with another, so the store can tell a batch it has already applied
        # (see commit_many)
        self.pending: list[list[tuple[Commit, list[Budget]]]] = []
        # held across a batch's ledger write and its spend commit, and across a rebuild: a
        # rebuild reads the ledger, so it must never see a batch whose spend is not in yet
        self.lock = asyncio.Lock()
        # (org, counter key, threshold) crossed and asked of the store already (_alert)
        self._crossed: set[tuple[str, str, str]] = set()

    def _binding(self, m: Manifest, key_id: str) -> KeyBinding | None:
        return self.keys.binding(m, key_id) if self.keys is not None else None

    async def record(self, m: Manifest, rows: list[tuple[LedgerRow, int]]) -> None:
        """Add each row's cost to its counters and release its hold (one round trip for the
        batch); fire the alerts the new totals cross. `rows`: (row, hold placed for it). What
        the store cannot take now is kept and retried (`retry`), never dropped."""
        if self.keys is not None:  # runtime keys' budgets: bindings from the mirror
            await self.keys.hold(row.key_id for row, _ in rows if row.key_id)
        batch: list[tuple[Commit, list[Budget]]] = []
        # a batch is mostly a few keys and models in one minute: their targets, once each
        targets: dict[tuple[str, str, str, str | None, int], Any] = {}
        for n, (row, hold) in enumerate(rows, 1):
            if n % 100 == 0:
                await asyncio.sleep(0)  # a big batch must not stall extauthz on this loop
            if not (row.key_id and row.org and row.project) or (not row.cost and not hold):
                continue
            memo = (row.org, row.project, row.key_id, row.model, int(row.at.timestamp()) // 60)
            if memo not in targets:
                targets[memo] = spend_targets(
                    m, row.org, row.project, row.key_id, row.model,
                    period_labels(row.at, m.gateway.timezone), self._binding(m, row.key_id))
            counters, row_budgets = targets[memo]
            batch.append((Commit(row.org, row.request_id, counters,
                                 to_units(row.cost) if row.cost else 0, held=hold > 0),
                          row_budgets if row.cost else []))
        if not batch:
            return
        if self.pending:  # the store is away: queue behind what failed before
            self.pending.append(batch)
            return
        if not await self._apply(m, batch):
            self.pending.append(batch)

    async def retry(self, m: Manifest) -> None:
        while self.pending:
            if not await self._apply(m, self.pending[0]):
                return
            self.pending.pop(0)
            if not self.pending:
                log.info("the counter store took the costs it had missed")

    async def _apply(self, m: Manifest, batch: list[tuple[Commit, list[Budget]]]) -> bool:
        try:
            results = await self.store.commit_many([c for c, _ in batch])
        except SpendUnavailable as e:
            SPEND_ERRORS.inc(len(batch))
            log.error("could not add %d costs to spend; retrying until the counter store "
                      "takes them: %s", len(batch), e)
            return False
        await self._alert(m, batch, results)
        return True

    async def _alert(self, m: Manifest, batch: list[tuple[Commit, list[Budget]]],
                     results: list[list[int]]) -> None:
        """Fire the thresholds the batch's totals cross. Each budget's thresholds are looked
        at once a batch: every commit gets its counters' values after the whole batch, so its
        rows all see the same total. A threshold crossed is asked of the store (which remembers
        what fired, across replicas) once, then remembered here: a budget past 80% would
        otherwise cost a round trip to the store for each of its rows from then on."""
        looked_at: set[tuple[str, str, str]] = set()
        for (commit, row_budgets), spent in zip(batch, results, strict=True):
            now_spent: dict[str, int] | None = None
            for b in row_budgets:
                for threshold in b.alerts:
                    mark = f"{b.scope}/{b.quota}:{threshold}"
                    seen = (commit.org, b.counter.key, mark)
                    if seen in looked_at or seen in self._crossed:
                        continue
                    looked_at.add(seen)
                    if now_spent is None:
                        now_spent = dict(zip((c.key for c in commit.counters), spent,
                                             strict=True))
                    value = now_spent[b.counter.key]
                    if value < b.limit * threshold:
                        continue
                    try:
                        first = await self.store.first_alert(commit.org, b.counter, mark)
                    except SpendUnavailable as e:  # the costs are in: ask with the next batch
                        log.warning("could not tell whether %s's %s alert fired; asking again "
                                    "with the next costs: %s", b.label, threshold, e)
                        return
                    if len(self._crossed) >= CROSSED_REMEMBERED:
                        self._crossed.clear()  # asked again at worst; the store still knows
                    self._crossed.add(seen)
                    if first:
                        self._fire(m, b.label, b.scope, b.quota, b.counter.period,
                                   b.counter.label, threshold, from_units(value),
                                   from_units(b.limit))

    async def rebuild(self, m: Manifest, ledger: Ledger, now: datetime) -> int:
        """Set every counter of the current day and month to what the ledger holds: after the
        counter store lost its data, or an in-process store's start. The caller holds `lock`;
        commits still pending are in the ledger already, so they are dropped. Returns how many
        counters were set."""
        totals: dict[tuple[str, SpendCounter], int] = defaultdict(int)
        for period, since in period_starts(now, m.gateway.timezone).items():
            labels = {period: period_labels(now, m.gateway.timezone)[period]}
            for org, project, key_id, model, cost in await ledger.spend_totals(
                    since.astimezone(UTC)):
                for c in counters_for(m, org, project, key_id, model, labels,
                                      self._binding(m, key_id)):
                    totals[(org, c)] += to_units(cost)
        by_org: dict[str, list[tuple[SpendCounter, int]]] = defaultdict(list)
        for (org, c), units in totals.items():
            by_org[org].append((c, units))
        for org, values in by_org.items():
            await self.store.set_spent(org, values)
        self.pending = []
        return len(totals)

    async def release_orphans(self, rows: list[LedgerRow]) -> None:
        """Rows Envoy answered without extauthz's metadata (it stopped waiting for the Check)
        may still have a hold, placed by a Check that finished too late: release it now rather
        than let it block a budget until it expires."""
        rids = [r.request_id for r in rows if r.org is None and r.deny_reason is None]
        try:
            found = await self.store.release_orphans(rids)
        except SpendUnavailable as e:
            log.warning("could not look up holds of %d unauthorized requests: %s", len(rids), e)
            return
        if found:
            ORPHANS.inc(found)
            log.info("released %d holds of requests Envoy stopped waiting for", found)

    def _fire(self, m: Manifest, label: str, scope: str, quota: str, period: str,
              period_label: str, threshold: Decimal, spent: Decimal, limit: Decimal) -> None:
        currency = m.rate_card.currency if m.rate_card else ""
        ALERTS.labels(scope, quota, period, str(threshold)).inc()
        log.warning("budget alert: %s reached %s%% in %s: spent %s of %s %s", label,
                    threshold * 100, period_label, spent, limit, currency)
        if m.gateway.alert_webhook:
            payload = {"alert": "budget_threshold", "scope": scope, "quota": quota,
                       "period": period, "period_label": period_label,
                       "threshold": str(threshold), "spent": str(spent), "limit": str(limit),
                       "currency": currency}
            task = asyncio.create_task(self._post(m.gateway.alert_webhook, payload))
            self._webhooks.add(task)
            task.add_done_callback(self._webhooks.discard)

    @staticmethod
    async def _post(url: str, payload: dict[str, Any]) -> None:
        """One POST on a thread of its own, with the standard library: an alert is rare, and
        importing an HTTP client library for it cost every service process 0.3-0.4 s at start."""
        try:
            status = await asyncio.to_thread(_post_json, url, payload)
            if status >= 300:
                log.error("alert webhook %s answered %s", url, status)
        except urllib.error.HTTPError as e:  # 4xx and 5xx
            log.error("alert webhook %s answered %s", url, e.code)
        except (OSError, ValueError) as e:  # unreachable, timed out, not a URL
            log.error("alert webhook %s failed: %s", url, e)

    async def close(self) -> None:
        await asyncio.gather(*self._webhooks, return_exceptions=True)


def _post_json(url: str, payload: dict[str, Any]) -> int:
    request = urllib.request.Request(url, data=json.dumps(payload).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=WEBHOOK_TIMEOUT) as answer:
        return int(answer.status)
