"""limits_apply, asked by every allowed Check, agrees with rules_for, which ratelimit charges:
a request it says no limit counts skips the rate-limit call, so a disagreement would let a
limited request through uncounted."""

from __future__ import annotations

from pathlib import Path

from tollway.manifest import load
from tollway.quotas import limits_apply, rules_for

EXAMPLES = Path(__file__).parent.parent / "examples"


def test_limits_apply_exactly_when_ratelimit_has_a_rule() -> None:
    """Every example's keys (org, project, key and plan quotas, narrowed to models or not,
    spend-only ones) with every model of their catalogue and one no quota names."""
    seen = set()
    for example in ("team-ai.yaml", "saas-tiers.yaml", "quickstart.yaml"):
        m = load(EXAMPLES / example)
        models = {model.name for p in m.providers for model in p.models} | {"not-in-a-quota"}
        for binding in m.bindings.values():
            for model in models:
                expected = bool(rules_for(m, binding, model))
                assert limits_apply(m, binding, model) is expected, (example, binding.key.id,
                                                                      model)
                seen.add(expected)
    assert seen == {True, False}, "the examples should have requests on both sides"
