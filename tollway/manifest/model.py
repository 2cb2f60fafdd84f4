"""The manifest's typed model.

Everything here is immutable: services swap a whole `Manifest` on reload, so a request that
started with one snapshot finishes with it, and nothing can observe a half-applied edit.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from enum import StrEnum
from types import MappingProxyType
from typing import Any


class Dialect(StrEnum):
    OPENAI = "openai"
    ANTHROPIC = "anthropic"


class KeyStatus(StrEnum):
    ACTIVE = "active"
    SUSPENDED = "suspended"
    REVOKED = "revoked"

    @staticmethod
    def worst(*statuses: KeyStatus) -> KeyStatus:
        """The most severe of a key's statuses at its levels (every Check asks)."""
        return max(statuses, key=_SEVERITY.__getitem__)


_SEVERITY = {KeyStatus.ACTIVE: 0, KeyStatus.SUSPENDED: 1, KeyStatus.REVOKED: 2}


class Enforcement(StrEnum):
    ENFORCE = "enforce"
    MONITOR = "monitor"


@dataclass(frozen=True)
class Model:
    name: str
    max_output_tokens: int
    context_window: int


@dataclass(frozen=True)
class Upstream:
    host: str
    port: int
    tls: bool
    sni: str | None


@dataclass(frozen=True)
class Provider:
    name: str
    dialect: Dialect
    upstream: Upstream
    credential: str  # a reference (`env:NAME` or `file:PATH`), never the secret itself
    models: tuple[Model, ...]
    mock: bool = False
    identity_headers: bool = False  # send x-tollway-org/-project/-client/-key-id upstream
    # by name: a Check looks its model up three times, in a catalogue of any length
    _by_name: dict[str, Model] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_name", {m.name: m for m in reversed(self.models)})

    def model(self, name: str) -> Model | None:
        """The catalogue's model of that name (the first, were a name listed twice: the
        loader refuses that)."""
        return self._by_name.get(name)


@dataclass(frozen=True)
class Route:
    name: str
    path: str
    dialect: Dialect
    provider: str
    action: str
    fail_closed: bool
    timeout_seconds: int


@dataclass(frozen=True)
class Price:
    """Per million tokens, in the rate card's currency."""

    provider: str
    model: str
    input: Decimal
    output: Decimal  # reasoning tokens are output tokens, and priced so
    cached_input: Decimal | None  # None: cache reads at the input price
    cache_write: Decimal  # Anthropic 5-minute cache writes
    cache_write_1h: Decimal  # Anthropic 1-hour cache writes


@dataclass(frozen=True)
class RateCard:
    version: str
    currency: str
    prices: tuple[Price, ...]
    # by (provider, model): each request's price is looked up twice (its budget hold, its
    # ledger row), a card may list a model of every server an operator runs
    _by_model: dict[tuple[str, str], Price] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_model", {(p.provider, p.model): p for p in self.prices})

    def price_of(self, provider: str, model: str) -> Price | None:
        """The model's price; None where the card does not list it (the loader refuses a
        model priced twice)."""
        return self._by_model.get((provider, model))


# Limit names a quota may carry; the window each one counts over is part of the name.
REQUEST_LIMITS = {
    "rpm": 60,
    "requests_per_hour": 3600,
    "requests_per_day": 86400,
    "requests_per_month": 2592000,
}
TOKEN_LIMITS = {
    "tpm": 60,
    "tokens_per_hour": 3600,
    "tokens_per_day": 86400,
    "tokens_per_month": 2592000,
}
SPEND_LIMITS = ("spend_per_day", "spend_per_month")


@dataclass(frozen=True)
class Quota:
    """Limits that apply at the level of the manifest where the quota is written."""

    name: str
    models: tuple[str, ...]  # empty: every model
    limits: MappingProxyType[str, int]  # request and token limits, by name above
    spend: MappingProxyType[str, Decimal]  # spend limits, in the rate card's currency
    enforcement: Enforcement
    alerts: tuple[Decimal, ...]


@dataclass(frozen=True)
class ModelRule:
    """Models a tenant's users may call, optionally only in some roles (reference 004)."""

    models: tuple[str, ...]
    roles_allowed: tuple[str, ...] | None  # None: every role


@dataclass(frozen=True)
class Plan:
    name: str
    models: tuple[str, ...] | None
    quotas: tuple[Quota, ...]


@dataclass(frozen=True)
class User:
    email: str | None
    role: str | None
    tenant: str | None
    is_agent: bool


@dataclass(frozen=True)
class Key:
    id: str
    status: KeyStatus
    plan: str | None
    models: tuple[str, ...] | None
    quotas: tuple[Quota, ...]
    expires_at: str | None  # ISO 8601, UTC
    metadata: MappingProxyType[str, Any]


@dataclass(frozen=True)
class Client:
    id: str
    name: str
    status: KeyStatus
    user: User
    metadata: MappingProxyType[str, Any]
    keys: tuple[Key, ...]


@dataclass(frozen=True)
class Project:
    id: str
    name: str
    status: KeyStatus
    plan: str | None
    models: tuple[str, ...] | None
    policies_enabled: bool
    quotas: tuple[Quota, ...]
    metadata: MappingProxyType[str, Any]
    clients: tuple[Client, ...]
    model_rules: tuple[ModelRule, ...] = ()


@dataclass(frozen=True)
class Organization:
    id: str
    name: str
    status: KeyStatus
    quotas: tuple[Quota, ...]
    metadata: MappingProxyType[str, Any]
    projects: tuple[Project, ...]
    model_rules: tuple[ModelRule, ...] = ()
    # nothing in it for the checks across the manifest (tollway.manifest.loader.parse): no
    # model, plan, client or key, no model rule, no quota naming models, no project id twice.
    # A reload takes most organizations unchanged and checks across only the others.
    self_contained: bool = field(default=False, compare=False, repr=False)

    @functools.cached_property
    def policies_enabled(self) -> bool:
        """Whether any of its projects has policies enabled. Kept with the organization,
        which a reload that leaves it unchanged reuses: asked of every project, this was a
        third of a ms for 10,000 projects, on each reload, with requests waiting for the GIL."""
        return any(p.policies_enabled for p in self.projects)


@dataclass(frozen=True)
class Policy:
    id: str
    text: str


@dataclass(frozen=True)
class ServiceTls:
    """Mutual TLS between Envoy and the services (and costsink → ratelimit): PEM files, as
    Kubernetes Secrets and cert-manager mount them (ca.crt, tls.crt, tls.key), re-read when
    they change. One certificate serves as server and client certificate alike."""

    ca: str  # the CA every peer's certificate must chain to
    cert: str
    key: str


@dataclass(frozen=True)
class Services:
    """Where Envoy reaches Tollway's gRPC services, and where they expose metrics."""

    extauthz: tuple[str, int]
    ratelimit: tuple[str, int]
    costsink: tuple[str, int]
    metrics_port: int
    tls: ServiceTls | None = None  # None: plaintext, for loopback only
    # where each service binds, when not where it is dialled (a pod binds 0.0.0.0 while Envoy
    # dials a Service name); missing names bind their dial address
    listen: MappingProxyType[str, tuple[str, int]] = field(
        default_factory=lambda: MappingProxyType({}))
    metrics_host: str = "127.0.0.1"
    # a plaintext port with the gRPC health service alone, for kubelet probes (they cannot
    # present a client certificate when services.tls is on)
    health: tuple[str, int] | None = None
    admin: tuple[str, int] = ("127.0.0.1", 50054)  # the admin API (gRPC), behind Envoy's
    # grpc_json_transcoder for REST
    # processes per `tollway serve` (one core each): worker i serves extauthz, ratelimit and
    # admin on their ports + i, and Envoy spreads requests over all of them; costsink runs
    # in a process of its own beside them (one spool, one access-log file)
    workers: int = 1
    # who answers the rate limit: "filter", Envoy's rate-limit filter asking the ratelimit
    # service (a second gRPC round trip per request); "check", extauthz in the Check that
    # admitted the request (one round trip; the counters must be shared with ratelimit, which
    # still settles tokens and answers usage queries)
    rate_limit: str = "filter"
    # each service process on one CPU of its own, its threads with it (tollway/workers.py
    # pin_to_cpu): gRPC's poller thread and the event loop then wake each other without a
    # cross-CPU interrupt. Only where those CPUs are the process's own (a dedicated VM, a
    # cpuset, Kubernetes' static CPU manager): pinned beside a busy neighbour it cannot move
    pin_cpus: bool = False

    def ports(self, name: str) -> list[int]:
        """Every port the service is served on, worker by worker."""
        port = self.dial(name)[1]
        return [port] if name == "costsink" else [port + i for i in range(self.workers)]

    def dial(self, name: str) -> tuple[str, int]:
        address: tuple[str, int] = getattr(self, name)
        return address

    def bind(self, name: str) -> tuple[str, int]:
        return self.listen.get(name) or self.dial(name)


DEFAULT_KEY_CACHE = 100_000  # about 0.5 KB of memory each


@dataclass(frozen=True)
class Storage:
    keys: str  # sqlite:///path or postgresql://...; a reference (env:/file:) is allowed
    counters: str  # memory or redis://...
    ledger: str  # sqlite:///path or postgresql://...
    pepper: str  # reference to the HMAC pepper
    key_cache: int = DEFAULT_KEY_CACHE  # keys each process mirrors; more are fetched on use


@dataclass(frozen=True)
class Gateway:
    listen: tuple[str, int]
    admin_port: int
    timezone: str
    max_request_bytes: int
    alert_webhook: str | None = None  # budget alerts are POSTed here as JSON
    trusted_proxy_hops: int = 0  # proxies in front of Envoy that append to X-Forwarded-For
    # Envoy's durable access log, which costsink reconciles into the ledger; relative paths
    # live in the state dir (tollway.access_log.access_log_path)
    access_log_file: str = "envoy-access.jsonl"
    # MiB of that file, already reconciled, that stay on disk for an operator to read; costsink
    # frees the rest (costsink.durable_log.DurableLog), so the file takes bounded space
    access_log_keep_mb: int = 64
    admin_host: str = "127.0.0.1"  # Envoy's admin interface (0.0.0.0 for kubelet probes)


@dataclass(frozen=True)
class KeyBinding:
    """A key with everything it belongs to, resolved once per manifest, not per request."""

    org: Organization
    project: Project
    client: Client
    key: Key
    allowed_models: frozenset[str] | None  # None: every model in the route provider's catalogue

    @property
    def status(self) -> KeyStatus:
        return KeyStatus.worst(self.org.status, self.project.status, self.client.status,
                               self.key.status)

    @property
    def model_rules(self) -> tuple[ModelRule, ...]:
        """The project's rules, else its org's; empty: no rule restricts models."""
        return self.project.model_rules or self.org.model_rules

    def role_may_use(self, model: str) -> bool:
        rules = self.model_rules
        if not rules:
            return True
        role = self.client.user.role
        return any(model in r.models and (r.roles_allowed is None or role in r.roles_allowed)
                   for r in rules)


@dataclass(frozen=True)
class Manifest:
    version: int
    gateway: Gateway
    services: Services
    storage: Storage
    providers: tuple[Provider, ...]
    routes: tuple[Route, ...]
    rate_card: RateCard | None
    plans: tuple[Plan, ...]
    organizations: tuple[Organization, ...]
    policies: tuple[Policy, ...]
    source: str = ""  # the file it came from, for messages
    bindings: MappingProxyType[str, KeyBinding] = field(
        default_factory=lambda: MappingProxyType({})
    )
    # a serving process's manifest: each organization by its document's fingerprint, so a
    # reload compiles only the organizations that changed (tollway.manifest.loader.parse)
    compiled_orgs: Mapping[str, Organization] = field(
        default_factory=lambda: MappingProxyType({}), compare=False, repr=False
    )
    # and each organization's fingerprint by the digest of its text in the YAML, where the
    # text could be cut at them (the start and every reload record them), so a reload reads
    # only the texts that changed (tollway.manifest.beside)
    org_texts: Mapping[str, str] = field(
        default_factory=lambda: MappingProxyType({}), compare=False, repr=False
    )

    def provider(self, name: str) -> Provider:
        for p in self.providers:
            if p.name == name:
                return p
        raise KeyError(name)

    def route(self, name: str) -> Route | None:
        for r in self.routes:
            if r.name == name:
                return r
        return None

    def plan(self, name: str) -> Plan:
        for p in self.plans:
            if p.name == name:
                return p
        raise KeyError(name)
