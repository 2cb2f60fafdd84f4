"""Which budgets and spend counters apply to a request: levels, plans, per-key overrides,
model-narrowed budgets, calendar periods in the manifest's time zone, the maximum cost."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

from tollway.budgets import budgets_for, counters_for, from_units, period_labels
from tollway.manifest import loads
from tollway.pricing import max_cost

MANIFEST = loads("""
gateway: {timezone: Europe/Berlin}
providers: [{name: openai, dialect: openai, upstream: {host: x}, credential: env:X,
             models: [{name: small}, {name: big}]}]
routes: [{path: /v1/chat/completions, provider: openai}]
rate_card:
  version: v1
  prices:
    - {provider: openai, model: small, input: 0.75, output: 4.50, cached_input: 0.075}
plans:
  - name: pro
    quotas: [{name: plan-cap, spend_per_day: 100, spend_per_month: 1000, alerts: [0.8]}]
organizations:
  - id: acme
    quotas: [{name: org-cap, spend_per_month: 5000, enforcement: monitor}]
    projects:
      - id: app
        plan: pro
        quotas: [{name: big-only, models: [big], spend_per_day: 20}]
        clients:
          - id: c
            keys:
              - {id: plain}
              - {id: capped, quotas: [{name: mine, spend_per_day: 1}]}
""")
LABELS = {"day": "2027-01-15", "month": "2027-01"}


def test_every_level_and_the_plan_apply_with_the_key_override() -> None:
    b = MANIFEST.bindings["capped"]
    budgets = {(x.scope, x.quota, x.counter.period): x
               for x in budgets_for(MANIFEST, b, "small", LABELS)}
    assert set(budgets) == {
        ("org:acme", "org-cap", "month"),
        ("project:app/plan:pro", "plan-cap", "day"), ("project:app/plan:pro", "plan-cap", "month"),
        ("key:capped", "mine", "day")}
    assert not budgets[("org:acme", "org-cap", "month")].enforce
    # a plan's budget at the project counts the project's own spend, the number policies see
    assert budgets[("project:app/plan:pro", "plan-cap", "day")].counter.name == "project:app"
    assert from_units(budgets[("key:capped", "mine", "day")].limit) == 1


def test_a_model_narrowed_budget_has_its_own_counter() -> None:
    b = MANIFEST.bindings["plain"]
    big = [x for x in budgets_for(MANIFEST, b, "big", LABELS) if x.quota == "big-only"]
    assert [x.counter.name for x in big] == ["project:app/quota:big-only"]
    assert not [x for x in budgets_for(MANIFEST, b, "small", LABELS) if x.quota == "big-only"]
    names = {c.name for c in counters_for(MANIFEST, "acme", "app", "plain", "big", LABELS)}
    assert names == {"key:plain", "project:app", "org:acme", "project:app/quota:big-only"}


def test_periods_are_calendar_days_and_months_in_the_manifest_time_zone() -> None:
    # 23:30 UTC on Jan 31 is already Feb 1 in Berlin
    assert period_labels(datetime(2027, 1, 31, 23, 30, tzinfo=UTC), "Europe/Berlin") == {
        "day": "2027-02-01", "month": "2027-02"}
    assert period_labels(datetime(2027, 1, 31, 22, 59, tzinfo=UTC), "Europe/Berlin") == {
        "day": "2027-01-31", "month": "2027-01"}


def test_the_maximum_cost_bounds_every_real_cost() -> None:
    card = MANIFEST.rate_card
    hold = max_cost(card, "openai", "small", body_bytes=400, max_output_tokens=10)
    assert hold == (400 * Decimal("0.75") + 10 * Decimal("4.50")) / 1_000_000
    assert max_cost(card, "openai", "big", 400, 10) is None  # not on the card
