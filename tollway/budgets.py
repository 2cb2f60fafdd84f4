"""Which spend counters a request adds to, and which budgets it must fit in.

Spend is counted per key, project and org, per calendar day and calendar month in the
manifest's time zone: the counter's name carries the period's label (`2026-11-22`, `2026-11`), so
a new day starts from zero without anyone resetting anything. A budget is a quota's
`spend_per_day` / `spend_per_month`; without `models` it reads its level's own counter (the same
number Cedar policies and `tollway usage` see), with `models` it has a counter of its own.

Money in counters is an integer of UNIT (1e-10 of the currency), exact for every price of the
rate card (per-million prices with up to four decimals), so counters never round.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import ROUND_CEILING, ROUND_HALF_EVEN, Decimal
from functools import lru_cache
from zoneinfo import ZoneInfo

from tollway.manifest import Enforcement, KeyBinding, Manifest
from tollway.quotas import levels

UNIT = Decimal("1e-10")
PERIODS = ("day", "month")
_TTL = {"day": 3 * 86400, "month": 33 * 86400}  # kept past its period, for reports of it


def to_units(amount: Decimal, *, round_up: bool = False) -> int:
    rounding = ROUND_CEILING if round_up else ROUND_HALF_EVEN
    return int((amount / UNIT).to_integral_value(rounding=rounding))


def from_units(n: int) -> Decimal:
    return (Decimal(n) * UNIT).normalize()


def money(value: Decimal | int | str) -> str:
    """An amount as every output prints it: exact (never rounded), fixed-point (never 1E+3),
    at least two decimals: 0.00, 0.000048, 0.00006285, 1000.00."""
    text = format(Decimal(value).normalize(), "f")
    whole, _, decimals = text.partition(".")
    return f"{whole}.{decimals.ljust(2, '0')}"


def shown(units: int) -> str:
    """An amount in UNIT, as money() prints it."""
    return money(from_units(units))


def period_labels(at: datetime, timezone: str) -> dict[str, str]:
    # every zone's offset is a whole number of minutes: a minute lies in one day
    return dict(_labels(int(at.timestamp()) // 60, timezone))


def period_starts(at: datetime, timezone: str) -> dict[str, datetime]:
    """When the calendar day and month containing `at` began, in the manifest's time zone."""
    day = at.astimezone(ZoneInfo(timezone)).replace(hour=0, minute=0, second=0, microsecond=0)
    return {"day": day, "month": day.replace(day=1)}


@lru_cache(maxsize=64)
def _labels(minute: int, timezone: str) -> tuple[tuple[str, str], ...]:
    local = datetime.fromtimestamp(minute * 60, ZoneInfo(timezone))
    return (("day", local.strftime("%Y-%m-%d")), ("month", local.strftime("%Y-%m")))


@dataclass(frozen=True)
class SpendCounter:
    name: str  # "key:k1", "project:p1", "org:acme", or "project:p1/quota:q" (model-narrowed)
    period: str  # "day" or "month"
    label: str  # the period it counts: "2026-11-22" or "2026-11"
    models: tuple[str, ...] = ()  # empty: every model

    @property
    def key(self) -> str:
        return f"{self.name}:{self.period}:{self.label}"

    @property
    def ttl_seconds(self) -> int:
        return _TTL[self.period]


@dataclass(frozen=True)
class Budget:
    counter: SpendCounter
    scope: str  # where the quota is written: "project:team-ai", "key:k1/plan:pro", ...
    quota: str
    limit: int  # in UNIT
    enforce: bool
    alerts: tuple[Decimal, ...]

    @property
    def label(self) -> str:
        return f"{self.scope}/{self.quota} spend_per_{self.counter.period}"


def base_counters(org: str, project: str, key_id: str, labels: dict[str, str]
                  ) -> list[SpendCounter]:
    """The key's, project's and org's own counters for the periods in `labels`."""
    return [SpendCounter(f"{level}:{ident}", period, label)
            for level, ident in (("key", key_id), ("project", project), ("org", org))
            for period, label in labels.items()]


def key_counters(key_id: str, labels: dict[str, str]) -> list[SpendCounter]:
    """The key's own counters, in the order of `labels` (what Cedar and `tollway usage` read)."""
    return [SpendCounter(f"key:{key_id}", period, label) for period, label in labels.items()]


def budgets_for(m: Manifest, b: KeyBinding, model: str, labels: dict[str, str]
                ) -> list[Budget]:
    out = []
    for scope, base, quotas in levels(m, b):
        for q in quotas:
            if q.models and model not in q.models:
                continue
            for limit_name, value in q.spend.items():
                period = limit_name.removeprefix("spend_per_")
                if period not in labels:
                    continue
                name = f"{scope}/quota:{q.name}" if q.models else base
                counter = SpendCounter(name, period, labels[period], q.models)
                out.append(Budget(counter=counter, scope=scope, quota=q.name,
                                  limit=to_units(value), alerts=q.alerts,
                                  enforce=q.enforcement is Enforcement.ENFORCE))
    return out


def spend_targets(m: Manifest, org: str, project: str, key_id: str, model: str | None,
                  labels: dict[str, str], binding: KeyBinding | None = None
                  ) -> tuple[list[SpendCounter], list[Budget]]:
    """Every counter a request's cost adds to (its key, project and org, and the counters of
    the model-narrowed budgets it falls under), and the budgets that read them (while the key
    is still in the manifest)."""
    counters = base_counters(org, project, key_id, labels)
    b = binding or m.bindings.get(key_id)  # a runtime key's binding comes from the key mirror
    budgets = budgets_for(m, b, model, labels) if model and b is not None else []
    counters += [c for c in dict.fromkeys(bg.counter for bg in budgets) if c not in counters]
    return counters, budgets


def counters_for(m: Manifest, org: str, project: str, key_id: str, model: str | None,
                 labels: dict[str, str], binding: KeyBinding | None = None
                 ) -> list[SpendCounter]:
    return spend_targets(m, org, project, key_id, model, labels, binding)[0]
