"""Parse and validate a manifest.

Validation collects every problem, each named by its path and the rule it breaks
(`organizations[0].projects[1].quotas[2].tpm: must be a positive integer`), because an operator
fixing a ConfigMap wants the whole list at once, not one error per apply.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import replace
from datetime import UTC
from decimal import Decimal, InvalidOperation
from pathlib import Path
from types import MappingProxyType
from typing import Any, NamedTuple, TypeVar
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from .model import (
    DEFAULT_KEY_CACHE,
    REQUEST_LIMITS,
    SPEND_LIMITS,
    TOKEN_LIMITS,
    Client,
    Dialect,
    Enforcement,
    Gateway,
    Key,
    KeyBinding,
    KeyStatus,
    Manifest,
    Model,
    ModelRule,
    Organization,
    Plan,
    Policy,
    Price,
    Project,
    Provider,
    Quota,
    RateCard,
    Route,
    Services,
    ServiceTls,
    Storage,
    Upstream,
    User,
)
from .reading import ManifestError, document, fingerprint, read_text

ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
REF_RE = re.compile(r"^(env:[A-Za-z_][A-Za-z0-9_]*|file:.+)$")
DURATION_RE = re.compile(r"^(\d+)s$")
RATE_LIMIT_RE = re.compile(r"^(filter|check)$")
DEFAULT_MAX_OUTPUT = 4096
DEFAULT_CONTEXT = 128000
DEFAULT_ACTIONS = {
    "/v1/chat/completions": "completion",
    "/v1/completions": "completion",
    "/v1/embeddings": "embedding",
    "/v1/responses": "responses",
    "/v1/messages": "messages",
}

T = TypeVar("T")


# every absent or empty `metadata` (most of them): one shared view, not one object each that
# the garbage collector walks for every runtime key's binding
NO_ENTRIES: MappingProxyType[str, Any] = MappingProxyType({})


class Node:
    """A mapping in the YAML document, with its path, that reports what it reads wrong. A
    10,000-project manifest makes 70,000 of them: slots, and no dataclass machinery."""

    __slots__ = ("errors", "path", "value")

    def __init__(self, value: dict[str, Any], path: str, errors: list[str]) -> None:
        self.value = value
        self.path = path
        self.errors = errors

    def at(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def fail(self, name: str, rule: str) -> None:
        self.errors.append(f"{self.at(name)}: {rule}")

    def check_keys(self, allowed: AbstractSet[str]) -> None:
        for k in self.value:
            if k not in allowed:
                self.fail(str(k), f"unknown field (expected one of {', '.join(sorted(allowed))})")

    def has(self, name: str) -> bool:
        return self.value.get(name) is not None

    def text(self, name: str, default: str | None = None, *, pattern: re.Pattern[str] | None = None,
            rule: str = "") -> str:
        v = self.value.get(name)
        if v is None:
            if default is None:
                self.fail(name, "is required")
                return ""
            return default
        if not isinstance(v, str) or not v:
            self.fail(name, "must be a non-empty string")
            return ""
        if pattern is not None and not pattern.match(v):
            self.fail(name, rule or f"must match {pattern.pattern}")
        return v

    def opt_str(self, name: str) -> str | None:
        if self.value.get(name) is None:
            return None
        return self.text(name)

    def integer(self, name: str, default: int | None = None, *, minimum: int = 1) -> int:
        v = self.value.get(name)
        if v is None:
            if default is None:
                self.fail(name, "is required")
                return 0
            return default
        if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
            self.fail(name, "must be a positive integer" if minimum == 1
                      else f"must be an integer >= {minimum}")
            return 0
        return v

    def flag(self, name: str, default: bool) -> bool:
        v = self.value.get(name, default)
        if not isinstance(v, bool):
            self.fail(name, "must be true or false")
            return default
        return v

    def decimal(self, name: str, *, required: bool = True) -> Decimal | None:
        v = self.value.get(name)
        if v is None:
            if required:
                self.fail(name, "is required")
            return None
        try:
            # str() first: YAML floats like 0.075 must stay exactly 0.075, not its binary neighbour
            d = Decimal(str(v)) if not isinstance(v, bool) else None
        except InvalidOperation:
            d = None
        if d is None or not d.is_finite() or d < 0:
            self.fail(name, "must be a non-negative number")
            return None
        return d

    def enum(self, name: str, kind: type[T], default: T | None = None) -> T:
        v = self.value.get(name)
        if v is None and default is not None:
            return default
        try:
            return kind(v)  # type: ignore[call-arg]
        except ValueError:
            options = ", ".join(str(m.value) for m in kind)  # type: ignore[attr-defined]
            self.fail(name, f"must be one of {options}" if v is not None else "is required")
            return default if default is not None else next(iter(kind))  # type: ignore[call-overload]

    def str_list(self, name: str) -> tuple[str, ...] | None:
        v = self.value.get(name)
        if v is None:
            return None
        if not isinstance(v, list) or not all(isinstance(x, str) and x for x in v):
            self.fail(name, "must be a list of non-empty strings")
            return ()
        return tuple(v)

    def mapping(self, name: str) -> MappingProxyType[str, Any]:
        v = self.value.get(name)
        if v is None:
            return NO_ENTRIES
        if not isinstance(v, dict):
            self.fail(name, "must be a mapping")
            return NO_ENTRIES
        return MappingProxyType(dict(v)) if v else NO_ENTRIES

    def child(self, name: str, *, required: bool = False) -> Node:
        v = self.value.get(name)
        if v is None:
            if required:
                self.fail(name, "is required")
            return Node({}, self.at(name), self.errors)
        if not isinstance(v, dict):
            self.fail(name, "must be a mapping")
            return Node({}, self.at(name), self.errors)
        return Node(v, self.at(name), self.errors)

    def items(self, name: str, *, required: bool = False) -> Iterator[Node]:
        v = self.value.get(name)
        if v is None:
            if required:
                self.fail(name, "is required")
            return
        if not isinstance(v, list):
            self.fail(name, "must be a list")
            return
        base, errors = self.at(name), self.errors
        for i, item in enumerate(v):
            if not isinstance(item, dict):
                errors.append(f"{base}[{i}]: must be a mapping")
                continue
            yield Node(item, f"{base}[{i}]", errors)


def _host_port(node: Node, name: str, default: str) -> tuple[str, int]:
    raw = node.text(name, default)
    host, sep, port = raw.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        node.fail(name, "must be host:port")
        return ("127.0.0.1", 1)
    return (host.strip("[]"), int(port))


def storage_section(root: Node) -> Storage:
    """The `storage` section, read on its own: commands that only open the key store
    (`tollway keys`, `admin-tokens`, `audit`) read this and nothing else it would refuse."""
    st = root.child("storage")
    st.check_keys({"keys", "counters", "ledger", "pepper", "key_cache"})
    storage = Storage(keys=st.text("keys", "sqlite:///keys.db"),
                      counters=st.text("counters", "memory"),
                      ledger=st.text("ledger", "sqlite:///ledger.db"),
                      pepper=st.text("pepper", "file:pepper"),
                      key_cache=st.integer("key_cache", DEFAULT_KEY_CACHE))
    for name, prefixes in (("keys", ("sqlite:", "postgresql:", "postgres:", "env:")),
                           ("ledger", ("sqlite:", "postgresql:", "postgres:", "env:")),
                           ("counters", ("memory", "redis:", "rediss:", "redis+cluster:", "env:")),
                           ("pepper", ("env:", "file:"))):
        if not getattr(storage, name).startswith(prefixes):
            st.fail(name, f"must start with one of {', '.join(prefixes)}")
    return storage


def _unique(nodes: list[tuple[Node, str]], errors: list[str], what: str) -> None:
    seen: dict[str, str] = {}
    for node, value in nodes:
        if value in seen:
            errors.append(f"{node.at('id' if what != 'route' else 'path')}: duplicate {what} "
                          f"'{value}' (first at {seen[value]})")
        else:
            seen[value] = node.path


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
# Only quotas read without a problem are kept, and what _quotas checks depends on their
# document alone (repr, unlike ==, tells 2, 2.0 and true apart): a hit has nothing to report.
_QUOTAS: dict[str, tuple[Quota, ...]] = {}
_QUOTAS_MAX = 10_000


def _quotas(n: Node) -> tuple[Quota, ...]:
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


def _key(n: Node) -> Key:
    n.check_keys({"id", "status", "plan", "models", "quotas", "expires_at", "metadata", "notes"})
    return Key(
        id=n.text("id", pattern=ID_RE, rule="must be 1-64 letters, digits, '-' or '_' (no dots)"),
        status=n.enum("status", KeyStatus, KeyStatus.ACTIVE),
        plan=n.opt_str("plan"),
        models=n.str_list("models"),
        quotas=_quotas(n),
        expires_at=_expires(n),
        metadata=n.mapping("metadata"),
    )


def _client(n: Node) -> Client:
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
        keys=tuple(_key(k) for k in n.items("keys")),
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
        quotas=_quotas(n),
        metadata=n.mapping("metadata"),
        clients=tuple(_client(c) for c in n.items("clients")),
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
    quotas = _quotas(n)
    metadata = n.mapping("metadata")
    projects = tuple(_project(p) for p in n.items("projects"))
    model_rules = _model_rules(n)
    return Organization(id=org_id, name=name, status=status, quotas=quotas, metadata=metadata,
                        projects=projects, model_rules=model_rules,
                        self_contained=_self_contained(quotas, projects, model_rules))


def compile_org(document: dict[str, Any], index: int) -> tuple[Organization, list[str]]:
    """The organization at `organizations[index]` compiled from its document alone, and its
    problems: for _orgs, and for the warm reader, which compiles what it reads
    (tollway.manifest.shipped_orgs)."""
    errors: list[str] = []
    return _org(Node(document, f"organizations[{index}]", errors)), errors


def _name_models(quotas: tuple[Quota, ...]) -> bool:
    """Whether any of the quotas names models, which the manifest's catalogue must know."""
    return any(q.models for q in quotas)


def _self_contained(quotas: tuple[Quota, ...], projects: tuple[Project, ...],
                    model_rules: tuple[ModelRule, ...]) -> bool:
    """Whether an organization holds nothing that parse's checks across the manifest look
    at (see there): a reload's parse skips such an organization in them, where they went over
    all 10,000 projects of a manifest with the serving process's requests waiting for the GIL."""
    if model_rules or _name_models(quotas):
        return False
    ids: set[str] = set()
    for p in projects:
        if p.models or p.plan or p.clients or p.model_rules or p.id in ids \
                or _name_models(p.quotas):
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


def _orgs(root: Node, reuse: Mapping[str, Organization] | None
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


def _provider(n: Node) -> Provider:
    n.check_keys({"name", "dialect", "upstream", "credential", "models", "mock",
                  "identity_headers", "notes"})
    mock = n.flag("mock", False)
    up = n.child("upstream", required=True)
    up.check_keys({"host", "port", "tls", "sni"})
    tls = up.flag("tls", not mock)
    models = []
    for m in n.items("models", required=True):
        m.check_keys({"name", "max_output_tokens", "context_window", "notes"})
        models.append(Model(name=m.text("name"),
                            max_output_tokens=m.integer("max_output_tokens", DEFAULT_MAX_OUTPUT),
                            context_window=m.integer("context_window", DEFAULT_CONTEXT)))
    seen: set[str] = set()
    for i, m2 in enumerate(models):
        if m2.name in seen:
            n.errors.append(f"{n.at('models')}[{i}].name: duplicate model '{m2.name}'")
        seen.add(m2.name)
    host = up.text("host")
    return Provider(
        name=n.text("name", pattern=ID_RE, rule="must be 1-64 letters, digits, '-' or '_'"),
        dialect=n.enum("dialect", Dialect),
        upstream=Upstream(host=host, port=up.integer("port", 443 if tls else 80), tls=tls,
                          sni=up.opt_str("sni") or (host if tls else None)),
        credential=n.text("credential", pattern=REF_RE,
                          rule="must be a reference, env:NAME or file:PATH, never the secret "
                               "itself"),
        models=tuple(models),
        mock=mock,
        identity_headers=n.flag("identity_headers", False),
    )


def _route(n: Node, providers: dict[str, Provider], index: int) -> Route:
    n.check_keys({"name", "path", "dialect", "provider", "action", "fail_closed", "timeout",
                  "notes"})
    path = n.text("path", pattern=re.compile(r"^/[A-Za-z0-9/_.-]*$"),
                 rule="must be an absolute URL path")
    provider = n.text("provider")
    p = providers.get(provider)
    if provider and p is None:
        n.fail("provider", f"unknown provider '{provider}'")
    dialect = n.enum("dialect", Dialect, p.dialect if p else Dialect.OPENAI)
    if p is not None and dialect != p.dialect:
        n.fail("dialect", f"route speaks '{dialect.value}' but provider '{provider}' speaks "
                          f"'{p.dialect.value}'")
    action = n.text("action", DEFAULT_ACTIONS.get(path, ""))
    if not action:
        n.fail("action", f"is required for a path without a default action ({path})")
    timeout = n.text("timeout", "600s", pattern=DURATION_RE, rule="must be seconds, like 600s")
    m = DURATION_RE.match(timeout)
    return Route(
        name=n.text("name", f"route{index}", pattern=ID_RE,
                   rule="must be 1-64 letters, digits, '-' or '_'"),
        path=path,
        dialect=dialect,
        provider=provider,
        action=action,
        fail_closed=n.flag("fail_closed", True),
        timeout_seconds=int(m.group(1)) if m else 600,
    )


CACHE_WRITE_5M = Decimal("1.25")  # x the input price, as Anthropic prices 5-minute cache writes
CACHE_WRITE_1H = Decimal("2")  # and 1-hour ones


def _rate_card(n: Node, providers: dict[str, Provider]) -> RateCard | None:
    if not n.value:
        return None
    n.check_keys({"version", "currency", "prices"})
    prices = []
    seen: set[tuple[str, str]] = set()
    for p in n.items("prices", required=True):
        p.check_keys({"provider", "model", "input", "output", "cached_input", "cache_write",
                      "cache_write_1h"})
        base = p.decimal("input") or Decimal(0)
        prov = providers.get(p.text("provider"))
        # Anthropic prices cache writes at published multiples of the input price; a
        # provider that never writes to a cache gets the input price (it bounds budget holds)
        anthropic = prov is not None and prov.dialect is Dialect.ANTHROPIC
        write_5m, write_1h = (p.decimal("cache_write", required=False),
                              p.decimal("cache_write_1h", required=False))
        price = Price(provider=p.text("provider"), model=p.text("model"), input=base,
                      output=p.decimal("output") or Decimal(0),
                      cached_input=p.decimal("cached_input", required=False),
                      cache_write=write_5m if write_5m is not None
                      else base * (CACHE_WRITE_5M if anthropic else 1),
                      cache_write_1h=write_1h if write_1h is not None
                      else base * (CACHE_WRITE_1H if anthropic else 1))
        if price.provider and prov is None:
            p.fail("provider", f"unknown provider '{price.provider}'")
        elif prov is not None and price.model and prov.model(price.model) is None:
            p.fail("model", f"model '{price.model}' is not in provider '{price.provider}' "
                            "catalogue")
        if (price.provider, price.model) in seen:
            p.fail("model", f"duplicate price for '{price.provider}/{price.model}'")
        seen.add((price.provider, price.model))
        prices.append(price)
    return RateCard(
        version=n.text("version"),
        currency=n.text("currency", "USD", pattern=re.compile(r"^[A-Z]{3}$"),
                       rule="must be an ISO 4217 code like USD"),
        prices=tuple(prices),
    )


def _check_models(errors: list[str], path: str, models: tuple[str, ...] | None,
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


def _resolve_bindings(m: Manifest, errors: list[str], paths: dict[str, str]) -> dict[str,
                                                                                      KeyBinding]:
    plans = {p.name: p for p in m.plans}
    out: dict[str, KeyBinding] = {}
    for org in m.organizations:
        if org.self_contained:  # no client, so no key
            continue
        for proj in org.projects:
            for client in proj.clients:
                for key in client.keys:
                    allowed = allowed_models(plans, proj, key)
                    out[key.id] = KeyBinding(org=org, project=proj, client=client, key=key,
                                             allowed_models=None if allowed is None
                                             else frozenset(allowed))
    for path, name in paths.items():
        if name not in plans:
            errors.append(f"{path}: unknown plan '{name}'")
    return out


def parse(doc: Any, source: str = "", *,
          reuse: Mapping[str, Organization] | None = None) -> Manifest:
    """Validate a decoded YAML document; raise ManifestError listing every problem.

    `reuse`, for a serving process: the organizations of the manifest in force
    (`Manifest.compiled_orgs`, empty at first) to take those whose document is unchanged,
    and the new manifest records its own. None (a one-shot command): nothing is recorded."""
    errors: list[str] = []
    if not isinstance(doc, dict):
        raise ManifestError(source, ["(document): must be a mapping"])
    root = Node(doc, "", errors)
    root.check_keys({"version", "gateway", "services", "storage", "providers", "routes",
                     "rate_card", "plans", "organizations", "policies"})
    version = root.integer("version", 1)
    if version != 1:
        root.fail("version", "must be 1")

    g = root.child("gateway")
    g.check_keys({"listen", "admin_port", "admin_host", "timezone", "max_request_bytes",
                  "alert_webhook", "trusted_proxy_hops", "access_log_file",
                  "access_log_keep_mb"})
    tz = g.text("timezone", "UTC")
    try:
        ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError):
        g.fail("timezone", f"unknown time zone '{tz}'")
    gateway = Gateway(listen=_host_port(g, "listen", "127.0.0.1:8080"),
                      admin_port=g.integer("admin_port", 9901),
                      timezone=tz,
                      max_request_bytes=g.integer("max_request_bytes", 4 * 1024 * 1024),
                      alert_webhook=g.opt_str("alert_webhook"),
                      trusted_proxy_hops=g.integer("trusted_proxy_hops", 0, minimum=0),
                      access_log_file=g.text("access_log_file", "envoy-access.jsonl"),
                      access_log_keep_mb=g.integer("access_log_keep_mb", 64, minimum=0),
                      admin_host=g.text("admin_host", "127.0.0.1"))
    if gateway.alert_webhook and not gateway.alert_webhook.startswith(("http://", "https://")):
        g.fail("alert_webhook", "must be an http:// or https:// URL")

    s = root.child("services")
    s.check_keys({"extauthz", "ratelimit", "costsink", "admin", "metrics_port", "metrics_host",
                  "tls", "listen", "health", "workers", "rate_limit", "pin_cpus"})
    listen: dict[str, tuple[str, int]] = {}
    if s.value.get("listen") is not None:
        ln = s.child("listen")
        ln.check_keys({"extauthz", "ratelimit", "costsink", "admin"})
        listen = {name: _host_port(ln, name, "") for name in ("extauthz", "ratelimit",
                                                              "costsink", "admin")
                  if ln.value.get(name) is not None}
    tls = None
    if s.value.get("tls") is not None:
        t = s.child("tls")
        t.check_keys({"ca", "cert", "key"})
        tls = ServiceTls(ca=t.text("ca"), cert=t.text("cert"), key=t.text("key"))
    services = Services(extauthz=_host_port(s, "extauthz", "127.0.0.1:50051"),
                        ratelimit=_host_port(s, "ratelimit", "127.0.0.1:50052"),
                        costsink=_host_port(s, "costsink", "127.0.0.1:50053"),
                        metrics_port=s.integer("metrics_port", 9464), tls=tls,
                        listen=MappingProxyType(listen),
                        metrics_host=s.text("metrics_host", "127.0.0.1"),
                        health=_host_port(s, "health", "") if s.value.get("health") else None,
                        admin=_host_port(s, "admin", "127.0.0.1:50054"),
                        workers=s.integer("workers", 1),
                        rate_limit=s.text("rate_limit", "filter", pattern=RATE_LIMIT_RE,
                                          rule="must be 'filter' (Envoy's rate-limit filter "
                                               "asks the ratelimit service) or 'check' "
                                               "(extauthz answers it in its Check)"),
                        pin_cpus=s.flag("pin_cpus", False))

    storage = storage_section(root)
    if services.workers > 1 and storage.counters == "memory":
        s.fail("workers", "several workers need shared counters: storage.counters must be "
               "redis:// (in memory, each worker would count apart)")

    providers_l = [_provider(p) for p in root.items("providers", required=True)]
    _unique([(Node({}, f"providers[{i}]", errors), p.name) for i, p in enumerate(providers_l)],
            errors, "provider")
    providers = {p.name: p for p in providers_l}
    catalogue = {m.name for p in providers_l for m in p.models}

    routes = [_route(r, providers, i) for i, r in enumerate(root.items("routes", required=True))]
    _unique([(Node({}, f"routes[{i}]", errors), r.path) for i, r in enumerate(routes)],
            errors, "route")
    _unique([(Node({}, f"routes[{i}]", errors), r.name) for i, r in enumerate(routes)],
            errors, "route name")

    rate_card = _rate_card(root.child("rate_card"), providers)

    plans = []
    for pn in root.items("plans"):
        pn.check_keys({"name", "models", "quotas", "notes"})
        plan = Plan(name=pn.text("name", pattern=ID_RE), models=pn.str_list("models"),
                    quotas=_quotas(pn))
        _check_models(errors, pn.at("models"), plan.models, catalogue)
        plans.append(plan)
    _unique([(Node({}, f"plans[{i}]", errors), p.name) for i, p in enumerate(plans)],
            errors, "plan")

    orgs, compiled_orgs = _orgs(root, reuse)

    # identifiers are unique where they are addressed: keys and clients globally (a key id is
    # what the client sends), projects within their org, orgs globally
    plan_refs: dict[str, str] = {}
    key_ids: list[tuple[Node, str]] = []
    client_ids: list[tuple[Node, str]] = []
    # a path is made only where it is used: a reload runs these checks over every
    # organization, with the serving process's requests waiting for the GIL meanwhile
    for oi, org in enumerate(orgs):
        if org.self_contained:
            continue
        op = f"organizations[{oi}]"
        project_ids = [p.id for p in org.projects]
        if len(set(project_ids)) < len(project_ids):
            _unique([(Node({}, f"{op}.projects[{pi}]", errors), p)
                     for pi, p in enumerate(project_ids)], errors, "project id")
        for pi, proj in enumerate(org.projects):
            if not (proj.models or proj.plan or proj.clients):
                continue
            pp = f"{op}.projects[{pi}]"
            _check_models(errors, f"{pp}.models", proj.models, catalogue)
            if proj.plan:
                plan_refs[f"{pp}.plan"] = proj.plan
            for ci, client in enumerate(proj.clients):
                cp = f"{pp}.clients[{ci}]"
                client_ids.append((Node({}, cp, errors), client.id))
                for ki, key in enumerate(client.keys):
                    kp = f"{cp}.keys[{ki}]"
                    key_ids.append((Node({}, kp, errors), key.id))
                    _check_models(errors, f"{kp}.models", key.models, catalogue)
                    if key.plan:
                        plan_refs[f"{kp}.plan"] = key.plan
    org_ids = [o.id for o in orgs]
    if len(set(org_ids)) < len(org_ids):  # a path for each only where one is twice
        _unique([(Node({}, f"organizations[{i}]", errors), o) for i, o in enumerate(org_ids)],
                errors, "organization id")
    _unique(client_ids, errors, "client id")
    _unique(key_ids, errors, "key id")
    for path, quotas in _all_quotas(plans, orgs):
        for qi, q in enumerate(quotas):
            _check_models(errors, f"{path}.quotas[{qi}].models", q.models, catalogue)

    policies = []
    for pn in root.items("policies"):
        pn.check_keys({"id", "text", "notes"})
        policies.append(Policy(id=pn.text("id", pattern=ID_RE), text=pn.text("text")))
    _unique([(Node({}, f"policies[{i}]", errors), p.id) for i, p in enumerate(policies)],
            errors, "policy id")

    manifest = Manifest(version=version, gateway=gateway, services=services, storage=storage,
                        providers=tuple(providers_l), routes=tuple(routes), rate_card=rate_card,
                        plans=tuple(plans), organizations=tuple(orgs), policies=tuple(policies),
                        source=source)
    bindings = _resolve_bindings(manifest, errors, plan_refs)
    _check_model_rules(errors, orgs, catalogue)
    if errors:
        raise ManifestError(source, errors)
    object.__setattr__(manifest, "bindings", MappingProxyType(bindings))
    if compiled_orgs is not None:
        object.__setattr__(manifest, "compiled_orgs", MappingProxyType(compiled_orgs))
    # policies are checked against a schema generated from the rest, so they come last;
    # cedarpy is imported (30 ms of every command) only for a manifest that has some
    if manifest.policies:
        from tollway.policy import validate

        problems = validate(manifest)
        if problems:
            raise ManifestError(source, problems)
    return manifest


def _check_model_rules(errors: list[str], orgs: list[Organization], catalogue: set[str]
                       ) -> None:
    for oi, org in enumerate(orgs):
        if org.self_contained:
            continue
        levels = [(f"organizations[{oi}]", org.model_rules)] if org.model_rules else []
        levels += [(f"organizations[{oi}].projects[{pi}]", p.model_rules)
                   for pi, p in enumerate(org.projects) if p.model_rules]
        for path, rules in levels:
            for ri, rule in enumerate(rules):
                _check_models(errors, f"{path}.model_rules[{ri}].models", rule.models,
                              catalogue)


def _all_quotas(plans: list[Plan], orgs: list[Organization]
                ) -> Iterator[tuple[str, tuple[Quota, ...]]]:
    """Every level's quotas that name models, with the level's path (made only for them)."""
    for i, plan in enumerate(plans):
        if _name_models(plan.quotas):
            yield f"plans[{i}]", plan.quotas
    for oi, org in enumerate(orgs):
        if org.self_contained:
            continue
        if _name_models(org.quotas):
            yield f"organizations[{oi}]", org.quotas
        for pi, proj in enumerate(org.projects):
            if _name_models(proj.quotas):
                yield f"organizations[{oi}].projects[{pi}]", proj.quotas
            for ci, client in enumerate(proj.clients):
                for ki, key in enumerate(client.keys):
                    if _name_models(key.quotas):
                        yield (f"organizations[{oi}].projects[{pi}].clients[{ci}].keys[{ki}]",
                               key.quotas)


def loads(text: str, source: str = "", *,
          reuse: Mapping[str, Organization] | None = None) -> Manifest:
    return parse(document(text, source), source, reuse=reuse)


def load(path: str | Path, *, reuse: Mapping[str, Organization] | None = None) -> Manifest:
    """The manifest at `path`; `reuse` as parse() takes it (a serving process passes {})."""
    p = Path(path)
    return loads(read_text(p), str(p), reuse=reuse)
