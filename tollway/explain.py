"""`tollway explain`: why a key may or may not call a model, step by step, with the policies
that decided it (the operator may see policy text; the client never does).

It walks the manifest-side checks `extauthz` makes (status, allowlist, model rules, Cedar); the
principal's spend comes from the ledger, the source of truth the counters are built from.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal

from tollway.manifest import KeyStatus, Manifest, Route
from tollway.policy import CompiledPolicies, request_context


@dataclass
class Explanation:
    allowed: bool
    lines: list[str] = field(default_factory=list)

    def text(self) -> str:
        return "\n".join(self.lines)


def pick_route(m: Manifest, model: str, path: str | None) -> Route | None:
    for r in m.routes:
        if path is not None and r.path != path:
            continue
        if m.provider(r.provider).model(model) is not None or path is not None:
            return r
    return None


def explain(m: Manifest, key_id: str, model: str, *, ip: str = "127.0.0.1",
            path: str | None = None, stream: bool = False, daily: Decimal = Decimal(0),
            monthly: Decimal = Decimal(0), now: datetime | None = None) -> Explanation:
    now = now or datetime.now(UTC)
    b = m.bindings.get(key_id)
    if b is None:
        return Explanation(False, [f"key {key_id}: not in the manifest → 401 invalid_api_key"])
    route = pick_route(m, model, path)
    if route is None:
        return Explanation(False, [f"no route {'at ' + path if path else 'serves ' + model}"])
    currency = m.rate_card.currency if m.rate_card else ""
    out = Explanation(True, [
        f"key {key_id}: org {b.org.id}, project {b.project.id}, client {b.client.id}",
        f"request: {route.action} on {route.path}, model {model}, from {ip}"
        f"{', streamed' if stream else ''}"])

    def deny(step: str, code: str) -> Explanation:
        out.allowed = False
        out.lines += [step, f"decision: DENY → 403 {code}"]
        return out

    if b.status is not KeyStatus.ACTIVE:
        return deny(f"status: {b.status.value} in the manifest", f"key_{b.status.value}")
    out.lines.append("status: active in the manifest (the key store may still say otherwise: "
                     "tollway keys show)")
    provider = m.provider(route.provider)
    if provider.model(model) is None or (b.allowed_models is not None
                                         and model not in b.allowed_models):
        return deny(f"model allowlist: {model} is not allowed", "model_not_allowed")
    out.lines.append("model allowlist: allowed")
    if b.model_rules:
        if not b.role_may_use(model):
            return deny(f"model rules: role {b.client.user.role or '(none)'} may not use "
                        f"{model}", "model_not_allowed")
        out.lines.append(f"model rules: role {b.client.user.role or '(none)'} may use {model}")
    if not b.project.policies_enabled:
        out.lines += [f"policies: not enabled for project {b.project.id}", "decision: ALLOW"]
        return out

    compiled = CompiledPolicies(m)
    decision = compiled.evaluate(b, b.status, route.action, model,
                                 request_context(model, ip, now, stream, route.path),
                                 daily, monthly)
    out.lines.append(f"policies: enabled for project {b.project.id} (default deny); spend "
                     f"today {daily} {currency}, this month {monthly} {currency}")
    for err in decision.errors:
        out.lines.append(f"  evaluation error (the policy is skipped): {err}")
    out.lines.append(f"decision: {'ALLOW' if decision.allowed else 'DENY → 403 policy_denied'}"
                     f" ({decision.rule_class})")
    texts = {p.id: p.text for p in m.policies}
    for pid in decision.determining:
        out.lines.append(f"determined by policy {pid}:")
        out.lines += [f"    {line}" for line in texts.get(pid, "").strip().splitlines()]
    out.allowed = decision.allowed
    return out
