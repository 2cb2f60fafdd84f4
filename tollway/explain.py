"""`tollway explain`: what the gateway would answer this key for this model now, and why.

It runs extauthz's own steps, not a copy of them: `key_state` (the key store's record and the
manifest's statuses, at every level), `authorize` (route, catalogue, allowlist, model rules),
the policy gate (Cedar, with the spend the counters hold), the budget rule read without
placing a hold (`budget_verdict`), then the rate limits as the rate-limit service counts them
(its Usage API). The one step it cannot take is the secret: it is given a key id, not a key.
It prints the status and error code the gateway would answer, and with policies the ones that
decided (the operator may see policy text; the client never does).
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from extauthz.budget import budget_verdict, max_hold
from extauthz.decision import (
    Allow,
    Deny,
    RequestFacts,
    Runtime,
    authorize,
    compile_runtime,
    key_state,
)
from extauthz.policies import PolicyGate
from tollway.budgets import from_units, period_labels, shown
from tollway.errors import status_of
from tollway.keys.mirror import KeyMirror
from tollway.manifest import Manifest, Route
from tollway.manifest.model import Dialect
from tollway.policy import request_context
from tollway.quotas import limits_apply
from tollway.spend import SpendStore

# the Usage API's answer for a key and model, or None when the service cannot be asked
UsageLookup = Callable[[str, str], Awaitable[dict[str, Any] | None]]


@dataclass
class Explanation:
    allowed: bool
    lines: list[str] = field(default_factory=list)
    status: int = 200
    code: str = ""

    def text(self) -> str:
        return "\n".join(self.lines)

    def as_json(self) -> str:
        return json.dumps({"allowed": self.allowed, "status": self.status,
                           "code": self.code or None, "steps": self.lines}, indent=2)

    def deny(self, d: Deny) -> Explanation:
        self.allowed, self.status, self.code = False, status_of(d.code), d.code
        self.lines.append(f"decision: DENY → {self.status} {d.code}: {d.message}")
        return self


def pick_route(m: Manifest, model: str, path: str | None) -> Route | None:
    """The route `path` names, else the first whose provider serves `model`."""
    for r in m.routes:
        if path is not None and r.path != path:
            continue
        if m.provider(r.provider).model(model) is not None or path is not None:
            return r
    return None


def check_ip(ip: str) -> str:
    try:
        return str(ipaddress.ip_address(ip))
    except ValueError:
        raise ValueError(f"--ip {ip!r} is not an IP address") from None


async def explain(m: Manifest, mirror: KeyMirror, spend: SpendStore, key_id: str, model: str,
                  *, ip: str = "127.0.0.1", path: str | None = None, stream: bool = False,
                  max_tokens: int | None = None, body_bytes: int = 1024,
                  usage: UsageLookup | None = None, now: datetime | None = None
                  ) -> Explanation:
    now = now or datetime.now(UTC)
    rt: Runtime = compile_runtime(m, secrets=False)
    out = Explanation(True)
    route = pick_route(m, model, path)
    if route is None:
        out.lines.append(f"route: no route {'at ' + path if path else 'serves ' + model}")
        return out.deny(Deny("not_found", "no such endpoint on this gateway", Dialect.OPENAI))
    d = route.dialect
    out.lines.append(f"request: {route.action} on {route.path} (route {route.name}), model "
                     f"{model}, from {ip}{', streamed' if stream else ''}")
    await mirror.hold([key_id])
    binding, record = mirror.binding(m, key_id), mirror.get(key_id)
    if binding is None or record is None:
        why = ("not in the manifest, and no runtime key of that id" if binding is None
               else "in the manifest but never issued (tollway keys issue)")
        out.lines.append(f"key {key_id}: {why}")
        return out.deny(Deny("invalid_api_key", "invalid API key", d))
    out.lines.append(f"key {key_id}: org {binding.org.id}, project {binding.project.id}, "
                     f"client {binding.client.id}"
                     f"{' (runtime key)' if record.spec else ''}; secret not checked "
                     "(explain is given the key id)")
    caller = key_state(record, binding, d, now)
    if isinstance(caller, Deny):
        return out.deny(caller)
    out.lines.append("status: active at every level (org, project, client, key, key store), "
                     "not expired")
    body: dict[str, Any] = {"model": model, "stream": stream}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    facts = RequestFacts(route_name=route.name, headers={}, body=body, source_ip=ip,
                         body_bytes=body_bytes, request_id="explain")
    allowed = authorize(rt, route, caller, facts)
    if isinstance(allowed, Deny):
        return out.deny(allowed)
    role = binding.client.user.role
    out.lines.append(f"model: {model} is served on {route.path} and allowed for this key"
                     f"{' and role ' + repr(role) if binding.model_rules else ''}")

    gate = PolicyGate(spend)
    policy_denial = await gate.check(rt, allowed, facts, now)
    await _policy_lines(out, gate, rt, allowed, facts, now)
    if policy_denial is not None:
        return out.deny(policy_denial)

    budget_denial = await budget_verdict(spend, rt, allowed, facts, now)
    amount = from_units(max_hold(rt, allowed, facts))
    currency = m.rate_card.currency if m.rate_card else ""
    out.lines.append(f"budgets: this request may cost up to {amount} {currency} "
                     f"({body_bytes} bytes, output cap {allowed.max_tokens or 'the model'}'s)")
    if budget_denial is not None:
        return out.deny(budget_denial)

    if not limits_apply(m, allowed.binding, model):
        out.lines.append("rate limits: none applies to this key and model (the gateway does "
                         "not ask ratelimit)")
    elif usage is None:
        out.lines.append("rate limits: not checked (--no-rate-limits)")
    else:
        answer = await usage(key_id, model)
        if answer is None:
            out.lines.append("rate limits: unknown (the rate-limit service did not answer)")
        else:
            for limit in answer.get("limits", []):
                if limit.get("kind") == "spend":
                    continue
                need = 1 if limit["kind"] == "requests" else allowed.reserve_tokens
                out.lines.append(f"rate limit {limit['quota']} ({limit['name']}): "
                                 f"{limit['remaining']} of {limit['limit']} left")
                if Decimal(limit["remaining"]) < need:
                    return out.deny(Deny("rate_limit_exceeded", f"quota '{limit['quota']}' "
                                         f"allows {limit['limit']} {limit['kind']} per window",
                                         d, key_id))
    out.lines.append("decision: ALLOW → 200")
    return out


async def _policy_lines(out: Explanation, gate: PolicyGate, rt: Runtime, allow: Allow,
                        facts: RequestFacts, now: datetime) -> None:
    """Which policies decided, evaluated on the inputs the gate used."""
    b = allow.binding
    if not b.project.policies_enabled or rt.policies is None:
        out.lines.append(f"policies: not enabled for project {b.project.id}")
        return
    daily, monthly = await gate.current_spend(b, period_labels(now,
                                                               rt.manifest.gateway.timezone))
    decision = rt.policies.evaluate(
        b, b.status, allow.route.action, allow.model,
        request_context(allow.model, facts.source_ip, now, allow.stream, allow.route.path),
        from_units(daily), from_units(monthly))
    currency = rt.manifest.rate_card.currency if rt.manifest.rate_card else ""
    out.lines.append(f"policies: enabled for project {b.project.id} (default deny), "
                     f"{decision.rule_class}; spend today {shown(daily)} {currency}, this "
                     f"month {shown(monthly)} {currency} (from the counters)")
    for err in decision.errors:
        out.lines.append(f"  evaluation error (the policy is skipped): {err}")
    texts = {p.id: p.text for p in rt.manifest.policies}
    for pid in decision.determining:
        out.lines.append(f"determined by policy {pid}:")
        out.lines += [f"    {line}" for line in texts.get(pid, "").strip().splitlines()]
