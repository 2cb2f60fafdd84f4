"""Which request and token limits apply to a request, and the levels every quota is written at
(the walk that budgets take too).

Quotas are written where they apply: on the org, the project, the key, or a plan that a project
or key names (instantiated at that project's or key's scope). A quota with `models` counts only
requests for those models, all of them in one counter. Every counter of one request lives under
the request's org, which is the Redis Cluster hash tag: one slot, one atomic script.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from tollway.manifest import Enforcement, KeyBinding, Manifest, Quota
from tollway.manifest.model import REQUEST_LIMITS, TOKEN_LIMITS

RuleKind = Literal["requests", "tokens"]  # what a rule counts: 1 a request, or its tokens


@dataclass(frozen=True)
class Rule:
    counter: str  # stable across reloads while the quota is unchanged: scope/quota/limit
    quota: str  # the quota's name, for metrics and messages
    kind: RuleKind
    limit: int
    period: int  # seconds
    enforce: bool


def _applies(quota: Quota, model: str) -> bool:
    """The quota has a request or token limit, and counts this model."""
    return bool(quota.limits) and (not quota.models or model in quota.models)


def _rules(scope: str, quota: Quota, model: str) -> list[Rule]:
    if not _applies(quota, model):
        return []
    out = []
    for name, value in quota.limits.items():
        kind: RuleKind = "requests" if name in REQUEST_LIMITS else "tokens"
        period = REQUEST_LIMITS.get(name) or TOKEN_LIMITS[name]
        out.append(Rule(counter=f"{scope}/{quota.name}/{name}", quota=quota.name, kind=kind,
                        limit=value, period=period,
                        enforce=quota.enforcement is Enforcement.ENFORCE))
    return out


# (scope, base, quotas): where quotas are written ("org:acme", "project:team-ai/plan:pro",
# "key:k1"), the level's own counters (a plan's quotas count at its project or key), and the
# quotas. A plain tuple: several are built for every request.
Level = tuple[str, str, tuple[Quota, ...]]


def levels(m: Manifest, b: KeyBinding) -> list[Level]:
    """Every level a key's request counts at, from the widest to the narrowest: the org, the
    project's plan, the project, the key's plan, the key. Rate limits (rules_for) and budgets
    (tollway.budgets.budgets_for) both walk these."""
    org, project, key = f"org:{b.org.id}", f"project:{b.project.id}", f"key:{b.key.id}"
    out = [(org, org, b.org.quotas)]
    if b.project.plan:
        out.append((f"{project}/plan:{b.project.plan}", project, m.plan(b.project.plan).quotas))
    out.append((project, project, b.project.quotas))
    if b.key.plan:
        out.append((f"{key}/plan:{b.key.plan}", key, m.plan(b.key.plan).quotas))
    out.append((key, key, b.key.quotas))
    return out


def rules_for(m: Manifest, b: KeyBinding, model: str) -> list[Rule]:
    return [r for scope, _, quotas in levels(m, b) for q in quotas
            for r in _rules(scope, q, model)]


def limits_apply(m: Manifest, b: KeyBinding, model: str) -> bool:
    """Whether rules_for(m, b, model) has any rule, without building them: extauthz asks it
    of every allowed request, and one that no limit applies to skips the rate-limit call."""
    return any(_applies(q, model) for _, _, quotas in levels(m, b) for q in quotas)


def reserve_tokens(body_bytes: int, max_tokens: int | None, max_output_tokens: int) -> int:
    """Tokens charged at request time: the prompt estimated from its size (about four bytes a
    token, an overestimate for JSON) plus the most the model may answer."""
    output = min(max_tokens, max_output_tokens) if max_tokens else max_output_tokens
    return max(1, body_bytes // 4) + output
