"""Cedar policies without Envoy: validation as `tollway check` reports it, evaluation, explain."""

from __future__ import annotations

import gc
import subprocess
import sys
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.e2e.test_policies import DEVELOPMENT, ENTERPRISE, MULTI_TENANT, PRODUCTION
from tollway.budgets import key_counters, period_labels, to_units
from tollway.explain import explain
from tollway.keys import KeyRecord
from tollway.keys.mirror import KeyMirror
from tollway.manifest import KeyStatus, ManifestError, parse
from tollway.policy import CompiledPolicies, request_context, schema_text
from tollway.spend.memory import MemorySpendStore

ROOT = Path(__file__).resolve().parent.parent


def doc(policies: dict[str, str], **client: Any) -> dict[str, Any]:
    return {
        "providers": [{"name": "openai", "dialect": "openai", "upstream": {"host": "x"},
                       "credential": "env:X",
                       "models": [{"name": "gpt-4o-mini"}, {"name": "gpt-4o"}]}],
        "routes": [{"path": "/v1/chat/completions", "provider": "openai"},
                   {"path": "/v1/embeddings", "provider": "openai"}],
        "policies": [{"id": k, "text": v} for k, v in policies.items()],
        "organizations": [{"id": "o", "metadata": {"tier": "gold"}, "projects": [
            {"id": "p", "policies": {"enabled": True}, "clients": [
                {"id": "c", "user": client or {"tenant": "tenant1"},
                 "keys": [{"id": "k", "metadata": {"team": "search", "seats": 3}}]}]}]}],
    }


def test_every_reference_policy_validates() -> None:
    m = parse(doc({"a": MULTI_TENANT, "b": ENTERPRISE, "c": DEVELOPMENT, "d": PRODUCTION}))
    assert len(m.policies) == 4
    assert 'action "completion", "embedding", "messages", "responses"' in schema_text(m)


def test_a_type_error_is_refused_naming_the_policy() -> None:
    with pytest.raises(ManifestError) as e:
        parse(doc({"fine": MULTI_TENANT,
                   "bad-types": 'permit (principal, action, resource) when '
                                '{ principal.current_daily_spend > 3 };'}))
    assert len(e.value.problems) == 1
    problem = e.value.problems[0]
    assert problem.startswith("policies[1] ('bad-types'): does not validate against the schema")
    assert "decimal" in problem.lower() or "long" in problem.lower()


@pytest.mark.parametrize(("text", "expected"), [
    ("permit (principal, action, resource) when { principal.nickname == \"x\" };",
     "does not validate"),
    ("permit (principal, action == Action::\"delete\", resource);", "does not validate"),
    ("permit (principal, action, resource) when {", "does not parse"),
    ("// only a comment", "no policy in the text"),
])
def test_unknown_attributes_actions_and_syntax_are_refused(text: str, expected: str) -> None:
    with pytest.raises(ManifestError) as e:
        parse(doc({"p1": text}))
    assert e.value.problems[0].startswith(f"policies[0] ('p1'): {expected}")


def test_tollway_check_prints_the_policy_and_its_error(tmp_path: Path) -> None:
    d = doc({"typo": 'permit (principal, action, resource) when { principal.status == 1 };'})
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump(d))
    out = subprocess.run([sys.executable, "-m", "tollway.cli", "check", "--manifest",
                          str(path)], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 2
    assert "policies[0] ('typo'): does not validate against the schema" in out.stderr


def test_metadata_is_typed_by_the_manifest() -> None:
    m = parse(doc({"gold": 'permit (principal, action, resource) when { principal.metadata has '
                           'tier && principal.metadata.tier == "gold" && principal.metadata has '
                           'seats && principal.metadata.seats > 2 };'}))
    cp = CompiledPolicies(m)
    b = m.bindings["k"]
    ctx = request_context("gpt-4o", "127.0.0.1", datetime.now(UTC), False,
                          "/v1/chat/completions")
    assert cp.evaluate(b, b.status, "completion", "gpt-4o", ctx).allowed


def test_a_forbid_wins_and_is_named_only_to_the_operator() -> None:
    m = parse(doc({"tenant1": MULTI_TENANT,
                   "no-big-models-at-night": 'forbid (principal, action, resource == '
                   'Model::"gpt-4o") when { context.time.toTime() > duration("22h") };'}))
    cp = CompiledPolicies(m)
    b = m.bindings["k"]
    night = datetime(2026, 11, 22, 23, 0, tzinfo=UTC)
    day = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)
    ctx = request_context("gpt-4o", "10.0.0.1", night, False, "/v1/chat/completions")
    d = cp.evaluate(b, b.status, "completion", "gpt-4o", ctx)
    assert (d.allowed, d.rule_class, d.determining) == (
        False, "a forbid policy matched", ("no-big-models-at-night",))
    ctx = request_context("gpt-4o", "10.0.0.1", day, False, "/v1/chat/completions")
    assert cp.evaluate(b, b.status, "completion", "gpt-4o", ctx).determining == ("tenant1",)
    # the spend caps in the tenant1 policy
    assert not cp.evaluate(b, b.status, "completion", "gpt-4o", ctx,
                           daily=Decimal("50.00001")).allowed
    assert cp.evaluate(b, b.status, "completion", "gpt-4o", ctx,
                       daily=Decimal("49.99")).allowed
    # exactly at the cap's edge, whatever Cedar's four places do to the spend
    assert cp.evaluate(b, b.status, "completion", "gpt-4o", ctx,
                       daily=Decimal("49.99999999")).allowed
    assert not cp.evaluate(b, b.status, "completion", "gpt-4o", ctx,
                           daily=Decimal("50")).allowed


def test_a_cached_decision_is_the_one_cedar_gave_and_nothing_a_collection_walks() -> None:
    m = parse(doc({"tenant1": MULTI_TENANT}))
    cp = CompiledPolicies(m)
    b = m.bindings["k"]
    day = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)
    ctx = request_context("gpt-4o", "10.0.0.1", day, False, "/v1/chat/completions")
    first = [cp.evaluate(b, b.status, "completion", "gpt-4o", ctx, daily=Decimal(d))
             for d in ("1", "50")]
    again = [cp.evaluate(b, b.status, "completion", "gpt-4o", ctx, daily=Decimal(d))
             for d in ("1", "50")]
    assert again == first and [d.allowed for d in again] == [True, False]
    gc.collect()
    gc.collect()  # a tuple goes untracked once the tuples it holds have
    assert len(cp._cache) == 2 and not any(gc.is_tracked(v) for v in cp._cache.values())


async def test_explain_prints_the_decision_and_the_determining_policy() -> None:
    m = parse(doc({"prod": PRODUCTION}, tenant="production", is_agent=True))
    mirror = KeyMirror(None)  # type: ignore[arg-type]  # filled by hand: key k is issued
    now = datetime.now(UTC)
    mirror._put(KeyRecord("k", b"h", KeyStatus.ACTIVE, None, None, None, now, now, 1))
    spend = MemorySpendStore()
    allowed = await explain(m, mirror, spend, "k", "gpt-4o-mini", ip="10.1.2.3")
    assert allowed.allowed and allowed.status == 200
    assert "determined by policy prod:" in allowed.text()
    assert 'isInRange(ip("10.0.0.0/8"))' in allowed.text()
    denied = await explain(m, mirror, spend, "k", "gpt-4o-mini", ip="192.168.0.1")
    assert not denied.allowed and (denied.status, denied.code) == (403, "policy_denied")
    assert "DENY → 403 policy_denied: denied by policy: no policy permits this request" \
        in denied.text()
    day, _ = key_counters("k", period_labels(now, "UTC"))
    await spend.set_spent("o", [(day, to_units(Decimal(1000)))])
    over = await explain(m, mirror, spend, "k", "gpt-4o-mini", ip="10.1.2.3")
    assert over.code == "policy_denied" and "spend today 1000" in over.text()


def test_a_project_enabling_policies_has_them_compiled_after_any_reload() -> None:
    """With no policy in the manifest, a project that enables them is denied by default,
    which takes them compiled: whether its organization is new in a reload or reused from
    the manifest in force (which keeps what it found out about the organization)."""
    from extauthz.decision import compile_runtime

    d = doc({})
    del d["policies"]
    other = {"id": "other", "projects": [{"id": "q"}]}
    off = {**d, "organizations": [other]}
    first = parse(off, reuse={})
    assert compile_runtime(first, secrets=False).policies is None
    enabled = parse({**d, "organizations": [other, *d["organizations"]]},
                    reuse=first.compiled_orgs)
    assert enabled.organizations[0] is first.organizations[0]
    assert compile_runtime(enabled, secrets=False).policies is not None
    again = parse({**d, "organizations": [other, *d["organizations"]]},
                  reuse=enabled.compiled_orgs)
    assert again.organizations[1] is enabled.organizations[1]
    assert compile_runtime(again, secrets=False).policies is not None
