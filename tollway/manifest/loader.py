"""Parse and validate a manifest.

Validation collects every problem, each named by its path and the rule it breaks
(`organizations[0].projects[1].quotas[2].tpm: must be a positive integer`), because an operator
fixing a ConfigMap wants the whole list at once, not one error per apply. Each rule's message is
kept by a manifest that breaks it in tests/manifest_errors.

Here: the gateway, services, storage, providers, routes, rate card, plans and policies, and the
checks across the whole manifest. The organizations are read in tollway.manifest.orgs, each from
its own document, and every part through tollway.manifest.node.Node.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from decimal import Decimal
from pathlib import Path
from types import MappingProxyType
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from .model import (
    DEFAULT_KEY_CACHE,
    Dialect,
    Gateway,
    KeyBinding,
    Manifest,
    Model,
    Organization,
    Plan,
    Policy,
    Price,
    Provider,
    Quota,
    RateCard,
    Route,
    Services,
    ServiceTls,
    Storage,
    Upstream,
)
from .node import ID_RE, REF_RE, Node
from .orgs import allowed_models, check_models, names_models, read_orgs, read_quotas
from .reading import ManifestError, document, read_text

DURATION_RE = re.compile(r"^(\d+)s$")
RATE_LIMIT_RE = re.compile(r"^(filter|check)$")
PATH_RE = re.compile(r"^/[A-Za-z0-9/_.-]*$")
DEFAULT_MAX_OUTPUT = 4096
DEFAULT_CONTEXT = 128000
DEFAULT_ACTIONS = {
    "/v1/chat/completions": "completion",
    "/v1/completions": "completion",
    "/v1/embeddings": "embedding",
    "/v1/responses": "responses",
    "/v1/messages": "messages",
}


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


def _unique(nodes: list[tuple[Node, str]], errors: list[str], what: str,
            field: str = "id") -> None:
    """Each value once; a repeat is named at its `field` (the one that repeats it)."""
    seen: dict[str, str] = {}
    for node, value in nodes:
        if value in seen:
            errors.append(f"{node.at(field)}: duplicate {what} '{value}' (first at {seen[value]})")
        else:
            seen[value] = node.path


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
    host = up.text("host", None if n.has("upstream") else "")  # no upstream: said once
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
    path = n.text("path", pattern=PATH_RE, rule="must be an absolute URL path")
    provider = n.text("provider")
    p = providers.get(provider)
    if provider and p is None:
        n.fail("provider", f"unknown provider '{provider}'")
    dialect = n.enum("dialect", Dialect, p.dialect if p else Dialect.OPENAI)
    if p is not None and dialect != p.dialect:
        n.fail("dialect", f"route speaks '{dialect.value}' but provider '{provider}' speaks "
                          f"'{p.dialect.value}'")
    action = n.text("action", DEFAULT_ACTIONS.get(path, ""))
    if not action and PATH_RE.match(path):  # a wrong path is problem enough
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
            p.fail("model", f"model '{price.model}' is not in the catalogue of provider "
                            f"'{price.provider}'")
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
            errors, "provider", "name")
    providers = {p.name: p for p in providers_l}
    catalogue = {m.name for p in providers_l for m in p.models}

    routes = [_route(r, providers, i) for i, r in enumerate(root.items("routes", required=True))]
    _unique([(Node({}, f"routes[{i}]", errors), r.path) for i, r in enumerate(routes)],
            errors, "route", "path")
    _unique([(Node({}, f"routes[{i}]", errors), r.name) for i, r in enumerate(routes)],
            errors, "route name", "name")

    rate_card = _rate_card(root.child("rate_card"), providers)

    plans = []
    for pn in root.items("plans"):
        pn.check_keys({"name", "models", "quotas", "notes"})
        plan = Plan(name=pn.text("name", pattern=ID_RE), models=pn.str_list("models"),
                    quotas=read_quotas(pn))
        check_models(errors, pn.at("models"), plan.models, catalogue)
        plans.append(plan)
    _unique([(Node({}, f"plans[{i}]", errors), p.name) for i, p in enumerate(plans)],
            errors, "plan", "name")

    orgs, compiled_orgs = read_orgs(root, reuse)

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
            check_models(errors, f"{pp}.models", proj.models, catalogue)
            if proj.plan:
                plan_refs[f"{pp}.plan"] = proj.plan
            for ci, client in enumerate(proj.clients):
                cp = f"{pp}.clients[{ci}]"
                client_ids.append((Node({}, cp, errors), client.id))
                for ki, key in enumerate(client.keys):
                    kp = f"{cp}.keys[{ki}]"
                    key_ids.append((Node({}, kp, errors), key.id))
                    check_models(errors, f"{kp}.models", key.models, catalogue)
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
            check_models(errors, f"{path}.quotas[{qi}].models", q.models, catalogue)

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
                check_models(errors, f"{path}.model_rules[{ri}].models", rule.models,
                              catalogue)


def _all_quotas(plans: list[Plan], orgs: list[Organization]
                ) -> Iterator[tuple[str, tuple[Quota, ...]]]:
    """Every level's quotas that name models, with the level's path (made only for them)."""
    for i, plan in enumerate(plans):
        if names_models(plan.quotas):
            yield f"plans[{i}]", plan.quotas
    for oi, org in enumerate(orgs):
        if org.self_contained:
            continue
        if names_models(org.quotas):
            yield f"organizations[{oi}]", org.quotas
        for pi, proj in enumerate(org.projects):
            if names_models(proj.quotas):
                yield f"organizations[{oi}].projects[{pi}]", proj.quotas
            for ci, client in enumerate(proj.clients):
                for ki, key in enumerate(client.keys):
                    if names_models(key.quotas):
                        yield (f"organizations[{oi}].projects[{pi}].clients[{ci}].keys[{ki}]",
                               key.quotas)


def loads(text: str, source: str = "", *,
          reuse: Mapping[str, Organization] | None = None) -> Manifest:
    return parse(document(text, source), source, reuse=reuse)


def load(path: str | Path, *, reuse: Mapping[str, Organization] | None = None) -> Manifest:
    """The manifest at `path`; `reuse` as parse() takes it (a serving process passes {})."""
    p = Path(path)
    return loads(read_text(p), str(p), reuse=reuse)
