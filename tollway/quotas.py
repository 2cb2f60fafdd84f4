"""Which request and token limits apply to a request.

Quotas are written where they apply: on the org, the project, the key, or a plan that a project
or key names (instantiated at that project's or key's scope). A quota with `models` counts only
requests for those models, all of them in one counter. Every counter of one request lives under
the request's org, which is the Redis Cluster hash tag: one slot, one atomic script.
"""

from __future__ import annotations

from dataclasses import dataclass

from tollway.manifest import Enforcement, KeyBinding, Manifest, Quota
from tollway.manifest.model import REQUEST_LIMITS, TOKEN_LIMITS


@dataclass(frozen=True)
class Rule:
    counter: str  # stable across reloads while the quota is unchanged: scope/quota/limit
    quota: str  # the quota's name, for metrics and messages
    kind: str  # "requests" or "tokens"
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
        kind = "requests" if name in REQUEST_LIMITS else "tokens"
        period = REQUEST_LIMITS.get(name) or TOKEN_LIMITS[name]
        out.append(Rule(counter=f"{scope}/{quota.name}/{name}", quota=quota.name, kind=kind,
                        limit=value, period=period,
                        enforce=quota.enforcement is Enforcement.ENFORCE))
    return out


def _levels(m: Manifest, b: KeyBinding) -> list[tuple[str, tuple[Quota, ...]]]:
    """Each scope a key's request counts in, with the quotas written there."""
    levels: list[tuple[str, tuple[Quota, ...]]] = [(f"org:{b.org.id}", b.org.quotas)]
    project_scope = f"project:{b.project.id}"
    if b.project.plan:
        levels.append((f"{project_scope}/plan:{b.project.plan}", m.plan(b.project.plan).quotas))
    levels.append((project_scope, b.project.quotas))
    key_scope = f"key:{b.key.id}"
    if b.key.plan:
        levels.append((f"{key_scope}/plan:{b.key.plan}", m.plan(b.key.plan).quotas))
    levels.append((key_scope, b.key.quotas))
    return levels


def rules_for(m: Manifest, b: KeyBinding, model: str) -> list[Rule]:
    return [r for scope, quotas in _levels(m, b) for q in quotas for r in _rules(scope, q, model)]


def limits_apply(m: Manifest, b: KeyBinding, model: str) -> bool:
    """Whether rules_for(m, b, model) has any rule, without building them: extauthz asks it
    of every allowed request, and one that no limit applies to skips the rate-limit call."""
    return any(_applies(q, model) for _, quotas in _levels(m, b) for q in quotas)


def reserve_tokens(body_bytes: int, max_tokens: int | None, max_output_tokens: int) -> int:
    """Tokens charged at request time: the prompt estimated from its size (about four bytes a
    token, an overestimate for JSON) plus the most the model may answer."""
    output = min(max_tokens, max_output_tokens) if max_tokens else max_output_tokens
    return max(1, body_bytes // 4) + output
