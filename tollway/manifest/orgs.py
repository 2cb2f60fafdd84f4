"""Organizations, projects, clients, keys and quotas read from their documents.

An organization compiles from its own document alone; the checks across the manifest
(unique ids, known models and plans) come after, in tollway.manifest.loader.parse. That is
what lets a reload take every unchanged organization from the manifest in force, and a
runtime client or key (tollway.keys.runtime) be read exactly as a manifest one.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from datetime import UTC
from decimal import Decimal, InvalidOperation
from types import MappingProxyType
from typing import Any, NamedTuple

from .model import (
    REQUEST_LIMITS,
    SPEND_LIMITS,
    TOKEN_LIMITS,
    Client,
    Enforcement,
    Key,
    KeyStatus,
    ModelRule,
    Organization,
    Plan,
    Project,
    Quota,
    User,
)
from .node import ID_RE, Node
from .reading import fingerprint

_COUNT_LIMITS = (*REQUEST_LIMITS, *TOKEN_LIMITS)
_LIMIT_FIELDS = (*_COUNT_LIMITS, *SPEND_LIMITS)
# built once: a 10,000-project manifest has 20,000 quotas
_QUOTA_FIELDS = frozenset({"name", "models", "enforcement", "alerts", "notes", *_LIMIT_FIELDS})


def _quota(n: Node) -> Quota:
    n.check_keys(_QUOTA_FIELDS)
    v = n.value  # which limits a quota sets: looked up in its mapping, not through n.has
    limits = {k: n.integer(k) for k in _COUNT_LIMITS if v.get(k) is not None}
    spend: dict[str, Decimal] = {}
    for k in SPEND_LIMITS:
        if v.get(k) is None:
            continue
        d = n.decimal(k)
        if d is not None:
            if d <= 0:
                n.fail(k, "must be a positive amount")
            spend[k] = d
    if not limits and not spend and not any(v.get(k) is not None for k in _LIMIT_FIELDS):
        n.errors.append(f"{n.path}: a quota needs at least one limit "
                        f"(rpm, tpm, requests_per_day, spend_per_month, ...)")
    alerts: list[Decimal] = []
    raw_alerts = n.value.get("alerts", [])
    if not isinstance(raw_alerts, list):
        n.fail("alerts", "must be a list of fractions like 0.8")
    else:
        for i, a in enumerate(raw_alerts):
            try:
                d = Decimal(str(a))
            except InvalidOperation:
                d = Decimal(-1)
            if isinstance(a, bool) or not (Decimal(0) < d <= Decimal(1)):
                n.errors.append(f"{n.at('alerts')}[{i}]: must be a fraction in (0, 1]")
            else:
                alerts.append(d)
    # an unnamed quota is called by what it limits ("rpm tpm gpt-5.4"); where it is written
    # (its scope, "project:team-ai") is shown beside it
    models = n.str_list("models") or ()
    default = " ".join([*limits, *spend, *([",".join(models)] if models else [])])
    return Quota(
        name=n.text("name", default or n.path),
        models=models,
        limits=MappingProxyType(limits),
        spend=MappingProxyType(spend),
        enforcement=n.enum("enforcement", Enforcement, Enforcement.ENFORCE),
        alerts=tuple(sorted(alerts)),
    )


# quotas compiled, by their document's repr(): 10,000 projects may write the same quotas
# ({name: team, rpm: 300}) thousands of times, and a Quota is immutable, so they share them.
# Only quotas read without a problem are kept, and what read_quotas checks depends on their
# document alone (repr, unlike ==, tells 2, 2.0 and true apart): a hit has nothing to report.
_QUOTAS: dict[str, tuple[Quota, ...]] = {}
_QUOTAS_MAX = 10_000


def read_quotas(n: Node) -> tuple[Quota, ...]:
    """A name is a quota's counter identity within its scope: two that would share one (two
    unnamed `rpm` quotas) are told apart by their place, `rpm #2`."""
    written = n.value.get("quotas")
    if written is None:
        return ()
    key = repr(written)
    known = _QUOTAS.get(key)
    if known is not None:
        return known
    errors = len(n.errors)
    quotas = [_quota(q) for q in n.items("quotas")]
    names = [q.name for q in quotas]
    compiled = tuple(replace(q, name=f"{q.name} #{i + 1}") if names.count(q.name) > 1 else q
                     for i, q in enumerate(quotas))
    if len(n.errors) == errors:
        if len(_QUOTAS) >= _QUOTAS_MAX:
            _QUOTAS.clear()
        _QUOTAS[key] = compiled
    return compiled


def _expires(n: Node) -> str | None:
    v = n.value.get("expires_at")
    if v is None:
        return None
    from datetime import datetime

    if isinstance(v, datetime):
        dt = v if v.tzinfo else v.replace(tzinfo=UTC)
        return dt.isoformat()
    if isinstance(v, str):
        try:
            parsed = datetime.fromisoformat(v.replace("Z", "+00:00"))
        except ValueError:
            parsed = None
        if parsed is not None:
            return (parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).isoformat()
    n.fail("expires_at", "must be an ISO 8601 timestamp")
    return None


def read_key(n: Node) -> Key:
    n.check_keys({"id", "status", "plan", "models", "quotas", "expires_at", "metadata", "notes"})
    return Key(
        id=n.text("id", pattern=ID_RE, rule="must be 1-64 letters, digits, '-' or '_' (no dots)"),
        status=n.enum("status", KeyStatus, KeyStatus.ACTIVE),
        plan=n.opt_str("plan"),
        models=n.str_list("models"),
        quotas=read_quotas(n),
        expires_at=_expires(n),
        metadata=n.mapping("metadata"),
    )


def read_client(n: Node) -> Client:
    n.check_keys({"id", "name", "status", "user", "metadata", "keys", "notes"})
    u = n.child("user")
    u.check_keys({"email", "role", "tenant", "is_agent"})
    return Client(
        id=n.text("id", pattern=ID_RE, rule="must be 1-64 letters, digits, '-' or '_'"),
        name=n.text("name", str(n.value.get("id") or "")),
        status=n.enum("status", KeyStatus, KeyStatus.ACTIVE),
        user=User(email=u.opt_str("email"), role=u.opt_str("role"), tenant=u.opt_str("tenant"),
                  is_agent=u.flag("is_agent", False)),
        metadata=n.mapping("metadata"),
        keys=tuple(read_key(k) for k in n.items("keys")),
    )


def _project(n: Node) -> Project:
    n.check_keys({"id", "name", "status", "plan", "models", "policies", "quotas", "metadata",
                  "clients", "notes", "model_rules"})
    pol = n.child("policies")
    pol.check_keys({"enabled"})
    return Project(
        id=n.text("id", pattern=ID_RE, rule="must be 1-64 letters, digits, '-' or '_'"),
        name=n.text("name", str(n.value.get("id") or "")),
        status=n.enum("status", KeyStatus, KeyStatus.ACTIVE),
        plan=n.opt_str("plan"),
        models=n.str_list("models"),
        policies_enabled=pol.flag("enabled", False),
        quotas=read_quotas(n),
        metadata=n.mapping("metadata"),
        clients=tuple(read_client(c) for c in n.items("clients")),
        model_rules=_model_rules(n),
    )


def _model_rules(n: Node) -> tuple[ModelRule, ...]:
    out = []
    for r in n.items("model_rules"):
        r.check_keys({"models", "roles_allowed", "notes"})
        models = r.str_list("models")
        if not models:
            r.fail("models", "must name at least one model")
        out.append(ModelRule(models=models or (), roles_allowed=r.str_list("roles_allowed")))
    return tuple(out)


def _org(n: Node) -> Organization:
    n.check_keys({"id", "name", "status", "quotas", "metadata", "projects", "notes",
                  "model_rules"})
    # read in the document's order, so that its problems are listed in that order
    org_id = n.text("id", pattern=ID_RE, rule="must be 1-64 letters, digits, '-' or '_'")
    name = n.text("name", str(n.value.get("id") or ""))
    status = n.enum("status", KeyStatus, KeyStatus.ACTIVE)
    quotas = read_quotas(n)
    metadata = n.mapping("metadata")
    projects = tuple(_project(p) for p in n.items("projects"))
    model_rules = _model_rules(n)
    return Organization(id=org_id, name=name, status=status, quotas=quotas, metadata=metadata,
                        projects=projects, model_rules=model_rules,
                        self_contained=_self_contained(quotas, projects, model_rules))


def compile_org(document: dict[str, Any], index: int) -> tuple[Organization, list[str]]:
    """The organization at `organizations[index]` compiled from its document alone, and its
    problems: for read_orgs, and for the warm reader, which compiles what it reads
    (tollway.manifest.shipped_orgs)."""
    errors: list[str] = []
    return _org(Node(document, f"organizations[{index}]", errors)), errors


def names_models(quotas: tuple[Quota, ...]) -> bool:
    """Whether any of the quotas names models, which the manifest's catalogue must know."""
    return any(q.models for q in quotas)


def _self_contained(quotas: tuple[Quota, ...], projects: tuple[Project, ...],
                    model_rules: tuple[ModelRule, ...]) -> bool:
    """Whether an organization holds nothing that parse's checks across the manifest look
    at (see there): a reload's parse skips such an organization in them, where they went over
    all 10,000 projects of a manifest with the serving process's requests waiting for the GIL."""
    if model_rules or names_models(quotas):
        return False
    ids: set[str] = set()
    for p in projects:
        if p.models or p.plan or p.clients or p.model_rules or p.id in ids \
                or names_models(p.quotas):
            return False
        ids.add(p.id)
    return True


class Known(NamedTuple):
    """In place of an organization's document: the manifest in force holds it compiled."""

    fingerprint: str


class Fresh(NamedTuple):
    """An organization's document, with its fingerprint taken where it was read (a child
    process sends documents as JSON, which writes a date as its text)."""

    fingerprint: str
    document: Any


def read_orgs(root: Node, reuse: Mapping[str, Organization] | None
          ) -> tuple[list[Organization], dict[str, Organization] | None]:
    """The organizations, and with `reuse` each by its fingerprint. An organization compiles
    from its own document alone (the checks across organizations come after, over all of
    them), so one whose document is unchanged since the manifest in force is taken from it:
    a reload of 10,000 projects with one rpm edited compiles 100 of them. An item may also
    be Known or Fresh (see tollway.manifest.beside), never from the YAML itself."""
    if reuse is None:
        return [_org(o) for o in root.items("organizations", required=True)], None
    items = root.value.get("organizations")
    if not isinstance(items, list):
        return [_org(o) for o in root.items("organizations", required=True)], {}
    orgs: list[Organization] = []
    compiled: dict[str, Organization] = {}
    for i, item in enumerate(items):
        if isinstance(item, Known):
            org = reuse.get(item.fingerprint)
            if org is None:
                root.errors.append(f"organizations[{i}]: the manifest in force no longer "
                                   "holds it (load it again)")
                continue
            compiled[item.fingerprint] = org
        else:
            fresh = item if isinstance(item, Fresh) else Fresh(fingerprint(item), item)
            if not isinstance(fresh.document, dict):
                root.errors.append(f"organizations[{i}]: must be a mapping")
                continue
            org = reuse.get(fresh.fingerprint)
            if org is None:
                org, problems = compile_org(fresh.document, i)
                root.errors += problems
            compiled[fresh.fingerprint] = org
        orgs.append(org)
    return orgs, compiled


def check_models(errors: list[str], path: str, models: tuple[str, ...] | None,
                  catalogue: set[str]) -> None:
    for i, m in enumerate(models or ()):
        if m not in catalogue:
            errors.append(f"{path}[{i}]: unknown model '{m}' (not in any provider's catalogue)")


def allowed_models(plans: dict[str, Plan], proj: Project, key: Key) -> tuple[str, ...] | None:
    """The models a key may use; None: every model of the route's provider."""
    allowed: tuple[str, ...] | None = None
    for plan_name, models in ((proj.plan, proj.models), (key.plan, key.models)):
        # the most specific level that names models wins; a key narrows its project, and an
        # explicit list beats the list of the plan it names
        plan = plans.get(plan_name) if plan_name else None
        level = models if models is not None else (plan.models if plan else None)
        if level is not None:
            allowed = level
    return allowed
