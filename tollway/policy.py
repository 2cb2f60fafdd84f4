"""Cedar policies: the entity model, the schema generated from the manifest, and evaluation.

The entity model (docs/policies.md has it with examples):

* principal `Key::"<key id>"`, in `Client::"<client id>"` in `Project::"<org id>/<project id>"`
  in `Org::"<org id>"`, with `status`, `plan`,
  `user` (`tenant`, `email`, `role`, `is_agent`; empty strings when unset, so policies need no
  `has`), `current_daily_spend` / `current_monthly_spend` (Cedar decimals in the rate card's
  currency, truncated to Cedar's four places) and `metadata` (org, project, client and key
  metadata merged, the narrowest level winning);
* action `Action::"<route action>"` (`completion`, `embedding`, `responses`, `messages`, ...);
* resource `Model::"<model>"` with `provider`;
* context `model_name`, `ip_address` (the client address Envoy saw, an `ipaddr`), `time` (a
  `datetime`), `stream`, `path`.

Policies are parsed, validated and compiled once per manifest; a request builds only its key's
entity (from cached state) on top of the compiled base entities.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import ROUND_FLOOR, Decimal
from typing import Any

import cedarpy

from tollway.manifest.model import KeyBinding, KeyStatus, Manifest

BUILTIN_ACTIONS = ("completion", "embedding", "responses", "messages")
_CEDAR_TYPES = {bool: "Bool", int: "Long", str: "String"}


def metadata_of(b: KeyBinding) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for level in (b.org.metadata, b.project.metadata, b.client.metadata, b.key.metadata):
        merged.update(level)
    return merged


def _cedar_type(value: Any) -> str | None:
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return "Set<String>"
    return _CEDAR_TYPES.get(type(value))


def metadata_types(m: Manifest) -> tuple[dict[str, str], list[str]]:
    """Every metadata name the manifest uses, with its Cedar type; and type conflicts."""
    types: dict[str, str] = {}
    conflicts = []
    for b in m.bindings.values():
        for name, value in metadata_of(b).items():
            t = _cedar_type(value)
            if t is None:
                continue  # floats, maps, empty lists: not visible to policies
            if types.setdefault(name, t) != t:
                conflicts.append(f"metadata '{name}' is {types[name]} in one place and {t} in "
                                 "another: policies need one type")
    return types, conflicts


def actions(m: Manifest) -> list[str]:
    return sorted(set(BUILTIN_ACTIONS) | {r.action for r in m.routes})


def schema_text(m: Manifest) -> str:
    meta, _ = metadata_types(m)
    fields = ", ".join(f"{json.dumps(k)}?: {t}" for k, t in sorted(meta.items()))
    return "\n".join([
        "entity Org { name: String };",
        "entity Project in [Org] { name: String, plan: String };",
        "entity Client in [Project] { name: String };",
        "entity Key in [Client] {",
        "  status: String, plan: String,",
        "  user: { tenant: String, email: String, role: String, is_agent: Bool },",
        "  current_daily_spend: decimal, current_monthly_spend: decimal,",
        f"  metadata: {{ {fields} }},",
        "};",
        "entity Model { provider: String };",
        "type RequestContext = { model_name: String, ip_address: ipaddr, time: datetime, "
        "stream: Bool, path: String };",
        f"action {', '.join(json.dumps(a) for a in actions(m))} appliesTo "
        "{ principal: [Key], resource: [Model], context: RequestContext };",
    ])


def validate(m: Manifest) -> list[str]:
    """Problems with the manifest's policies, each naming the policy, as `tollway check`
    prints them."""
    if not m.policies:
        return []
    _, problems = metadata_types(m)
    schema = cedarpy.Schema.from_str(schema_text(m))
    for i, p in enumerate(m.policies):
        where = f"policies[{i}] ('{p.id}')"
        try:
            if len(cedarpy.PolicySet.from_str(p.text)) == 0:
                problems.append(f"{where}: no policy in the text")
                continue
        except ValueError as e:
            problems.append(f"{where}: does not parse: {_one_line(e)}")
            continue
        result = cedarpy.validate_policies(p.text, schema)
        for err in result.errors:
            problems.append(f"{where}: does not validate against the schema: "
                            f"{_one_line(err.error)}")
    return problems


def _one_line(e: object) -> str:
    return " ".join(str(e).split())


def _uid(kind: str, ident: str) -> dict[str, str]:
    return {"type": kind, "id": ident}


def decimal_literal(amount: Decimal) -> dict[str, Any]:
    """Cedar decimals have four places. Truncating keeps `spend.lessThan(cap)` exact: every
    cap literal has at most four places, so floor(spend) < cap exactly when spend < cap (rounding
    up would refuse up to 0.0001 before the cap is reached)."""
    text = f"{amount.quantize(Decimal('0.0001'), ROUND_FLOOR):f}"
    return {"__extn": {"fn": "decimal", "arg": text}}


@dataclass(frozen=True)
class PolicyDecision:
    allowed: bool
    rule_class: str  # "permitted", "no policy permits", "a forbid policy matched", "error"
    determining: tuple[str, ...]  # manifest policy ids that decided it
    errors: tuple[str, ...]


class CompiledPolicies:
    """One manifest's policies, parsed once, and the static part of every key's entities.

    A request parses only its own entities (org, project, client, key, model: constant in size,
    however large the manifest). Decisions are cached by everything a policy can read, so a hot
    key pays for one Cedar evaluation per distinct input; Cedar is deterministic, so a cached
    decision is exactly the one Cedar would give. `time` is part of that input only when a
    policy mentions it (to the second).
    """

    CACHE_SIZE = 10_000

    def __init__(self, m: Manifest) -> None:
        self.manifest = m
        self.ids: list[str] = []  # Cedar's policyN → the manifest's policy id
        for p in m.policies:
            self.ids += [p.id] * len(cedarpy.PolicySet.from_str(p.text))
        self.policy_set = cedarpy.PolicySet.from_str("\n".join(p.text for p in m.policies))
        self.reads_spend = any("_spend" in p.text for p in m.policies)
        self.reads_time = any("time" in p.text for p in m.policies)
        self._chain: dict[str, str] = {}  # key id → its org, project and client entities
        for b in m.bindings.values():
            self._chain[b.key.id] = self.chain(b)
        self._models = {model.name: json.dumps({"uid": _uid("Model", model.name),
                                                "attrs": {"provider": provider.name},
                                                "parents": []})
                        for provider in m.providers for model in provider.models}
        self._meta_types, _ = metadata_types(m)
        # each decision as a plain tuple, which the garbage collector stops tracking: with a
        # stream of new keys the cache fills, and 10,000 objects would add to every full
        # collection's walk
        self._cache: OrderedDict[str, tuple[bool, str, tuple[str, ...], tuple[str, ...]]] = \
            OrderedDict()

    @staticmethod
    def chain(b: KeyBinding) -> str:
        project_uid = _uid("Project", project_entity_id(b))
        return json.dumps([
            {"uid": _uid("Org", b.org.id), "attrs": {"name": b.org.name}, "parents": []},
            {"uid": project_uid, "attrs": {"name": b.project.name,
                                           "plan": b.project.plan or ""},
             "parents": [_uid("Org", b.org.id)]},
            {"uid": _uid("Client", b.client.id), "attrs": {"name": b.client.name},
             "parents": [project_uid]}])[1:-1]

    def key_entity(self, b: KeyBinding, status: KeyStatus, daily: Decimal,
                   monthly: Decimal) -> dict[str, Any]:
        u = b.client.user
        meta = {k: v for k, v in metadata_of(b).items()
                if k in self._meta_types and _cedar_type(v) == self._meta_types[k]}
        return {"uid": _uid("Key", b.key.id), "parents": [_uid("Client", b.client.id)],
                "attrs": {"status": status.value, "plan": b.key.plan or b.project.plan or "",
                          "user": {"tenant": u.tenant or "", "email": u.email or "",
                                   "role": u.role or "", "is_agent": u.is_agent},
                          "current_daily_spend": decimal_literal(daily),
                          "current_monthly_spend": decimal_literal(monthly),
                          "metadata": meta}}

    def evaluate(self, b: KeyBinding, status: KeyStatus, action: str, model: str,
                 context: Mapping[str, Any], daily: Decimal = Decimal(0),
                 monthly: Decimal = Decimal(0)) -> PolicyDecision:
        key_json = json.dumps(self.key_entity(b, status, daily, monthly))
        context_json = json.dumps(dict(context))
        seen = {k: v for k, v in context.items() if k != "time" or self.reads_time}
        cache_key = f"{key_json}|{action}|{model}|{json.dumps(seen)}"
        hit = self._cache.get(cache_key)
        if hit is not None:
            self._cache.move_to_end(cache_key)
            return PolicyDecision(*hit)
        # a runtime key (admin API) is not in the manifest's table: its chain is built here
        chain = self._chain.get(b.key.id) if b.key.id in self.manifest.bindings else None
        parts = [chain or self.chain(b), key_json] + (
            [self._models[model]] if model in self._models else [])
        entities = cedarpy.Entities.from_json_str(f"[{','.join(parts)}]")
        request = {"principal": f'Key::{json.dumps(b.key.id)}',
                   "action": f'Action::{json.dumps(action)}',
                   "resource": f'Model::{json.dumps(model)}', "context": context_json}
        decision = self._decide(cedarpy.is_authorized(request, self.policy_set, entities))
        self._cache[cache_key] = (decision.allowed, decision.rule_class, decision.determining,
                                  decision.errors)
        if len(self._cache) > self.CACHE_SIZE:
            self._cache.popitem(last=False)
        return decision

    def _decide(self, result: cedarpy.AuthzResult) -> PolicyDecision:
        reasons = tuple(dict.fromkeys(self._manifest_id(r) for r in result.diagnostics.reasons))
        errors = tuple(result.diagnostics.errors)
        if result.allowed:
            return PolicyDecision(True, "permitted", reasons, errors)
        if reasons:
            return PolicyDecision(False, "a forbid policy matched", reasons, errors)
        return PolicyDecision(False, "no policy permits this request", (), errors)

    def _manifest_id(self, cedar_id: str) -> str:
        n = cedar_id.removeprefix("policy")
        return self.ids[int(n)] if n.isdigit() and int(n) < len(self.ids) else cedar_id


def project_entity_id(b: KeyBinding) -> str:
    """Project ids are unique within their org: the entity id is `<org>/<project>`."""
    return f"{b.org.id}/{b.project.id}"


def request_context(model: str, ip: str, at: datetime, stream: bool, path: str
                    ) -> dict[str, Any]:
    return {"model_name": model, "ip_address": {"__extn": {"fn": "ip", "arg": ip or "0.0.0.0"}},
            "time": {"__extn": {"fn": "datetime",
                                "arg": at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")}},
            "stream": stream, "path": path}
