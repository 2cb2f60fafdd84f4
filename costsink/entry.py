"""One access-log entry → its ledger row: the provider's usage, priced; or, where that usage was
not seen, an estimate flagged as one.

The provider bills a request it answered whether or not its usage reached the gateway: the
client may hang up before the body (Envoy then stops reading it), a stream may break, an
OpenAI-compatible server may not report usage at all. Such a request is charged an estimate
rather than nothing, and its row says `estimated` (docs/architecture.md#estimates):
- input: what the provider did report (Anthropic reports input at the start of a stream), else
  the request body's bytes / 4, as the token reservation estimates it;
- output: for a stream, the larger of what the provider reported and the events that streamed
  (about one token each), at most the request's output cap; otherwise the output cap
  (`max_tokens`, or the model's own cap): the most the provider can have billed.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple

from envoy.data.accesslog.v3 import accesslog_pb2
from google.protobuf import struct_pb2
from prometheus_client import Counter

from tollway.keys.mirror import KeyMirror
from tollway.manifest import Manifest
from tollway.manifest.model import Dialect
from tollway.metadata import AUTHZ, RATELIMIT, REQUEST, USAGE, Namespace
from tollway.pricing import Usage, price

from .ledger import LedgerRow

PRICING_MISSES = Counter("tollway_costsink_pricing_misses_total",
                         "Entries whose model is not on the rate card", ["provider", "model"])
ESTIMATES = Counter("tollway_costsink_estimated_total",
                    "Requests the provider answered whose usage the gateway did not see, "
                    "charged an estimate", ["provider", "model"])

BYTES_PER_TOKEN = 4  # the reservation's estimate of input tokens from request bytes
_DIALECTS = {d.value: d for d in Dialect}
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)  # Timestamp.ToDatetime's arithmetic, at 0.3x its cost


class Entry(NamedTuple):
    """One access-log entry, read: its ledger row and what settling its reservation needs (a
    tuple, like LedgerRow: one is made per entry)."""

    row: LedgerRow
    actual_tokens: int  # every token the provider processed, as TPM counts them
    ratelimit: dict[str, Any]  # reserved_tokens and charged_at_ms, when it was rate limited
    hold: int = 0  # the budget hold extauthz placed, in budgets.UNIT


def _namespaces(entry: accesslog_pb2.HTTPAccessLogEntry) -> Mapping[str, struct_pb2.Struct]:
    return entry.common_properties.metadata.filter_metadata  # type: ignore[no-any-return]


def key_id_of(entry: accesslog_pb2.HTTPAccessLogEntry) -> str:
    s = _namespaces(entry).get(AUTHZ)
    v = s.fields.get("key_id") if s is not None else None
    return v.string_value if v is not None else ""


def _ms(d: Any) -> int:
    return int(d.seconds * 1000 + d.nanos // 1_000_000)


def reported_usage(md: Namespace) -> Usage:
    """The provider's own numbers, as the usage filter found them."""
    n = md.number
    return Usage(input_tokens=int(n("input_tokens")), output_tokens=int(n("output_tokens")),
                 cached_input_tokens=int(n("cached_input_tokens")),
                 cache_creation_tokens=int(n("cache_creation_input_tokens")),
                 cache_creation_1h_tokens=int(n("cache_creation_1h_tokens")),
                 reasoning_tokens=int(n("reasoning_tokens")))


def estimated_usage(m: Manifest, provider: str, model: str, md: Namespace,
                    request: Namespace, body_bytes: int, stream: bool) -> Usage:
    seen = reported_usage(md)
    catalogue = m.provider(provider).model(model)
    cap = catalogue.max_output_tokens if catalogue else 0
    asked = int(request.number("max_tokens"))
    if asked > 0:
        cap = min(cap, asked) if cap else asked
    # a stream the provider began answering generated at least one token, even when the
    # client hung up before the first event reached it
    output = min(cap, max(seen.output_tokens, int(md.number("events")), 1)) if stream else cap
    if "input_tokens" in md:  # reported before the answer broke off: the provider's numbers
        return Usage(seen.input_tokens, output, seen.cached_input_tokens,
                     seen.cache_creation_tokens, seen.cache_creation_1h_tokens)
    return Usage(input_tokens=-(-body_bytes // BYTES_PER_TOKEN), output_tokens=output)


def request_id_of(entry: accesslog_pb2.HTTPAccessLogEntry) -> str:
    """Envoy's request id; a request Envoy refused before it had one (a protocol error) is
    named by when and from where it came, the same from the gRPC stream and the file."""
    if entry.request.request_id:
        return str(entry.request.request_id)
    c = entry.common_properties
    sa = c.downstream_remote_address.socket_address
    micros = c.start_time.seconds * 1_000_000 + c.start_time.nanos // 1000
    return f"envoy-{micros}-{sa.address}-{sa.port_value}"


def to_entry(m: Manifest, entry: accesslog_pb2.HTTPAccessLogEntry,
             keys: KeyMirror | None = None) -> Entry:
    """`keys`: for a refused request, its key's org, project and client (a refusal's metadata
    names only the key), from the manifest or, for a runtime key, the key mirror. Each
    namespace's values are read one by one (Namespace): costsink's work per entry is mostly
    this function, and an access-log flush is read on the loop the Checks share."""
    namespaces = _namespaces(entry)
    authz = Namespace(namespaces.get(AUTHZ))
    usage_md = Namespace(namespaces.get(USAGE))
    common = entry.common_properties
    flags = common.response_flags
    status = entry.response.response_code.value
    provider, model = authz.text("provider"), authz.text("model")
    dialect = _DIALECTS[authz.text("dialect") or "openai"]
    stream = authz.flag("stream")
    deny = authz.text("deny_reason")
    # the provider was sent the request and answered it (or was cut off while it did)
    billed = bool(provider and model and not deny
                  and common.HasField("time_to_first_upstream_tx_byte")
                  and (200 <= status < 300 or status == 0))
    estimated = billed and not usage_md.flag("usage_final")
    if estimated:
        assert provider and model
        usage = estimated_usage(m, provider, model, usage_md,
                                Namespace(namespaces.get(REQUEST)),
                                entry.request.request_body_bytes, stream)
        ESTIMATES.labels(provider, model).inc()
    else:
        usage = reported_usage(usage_md)
    card = m.rate_card
    cost = None
    if provider and model:
        cost = price(card, provider, model, dialect, usage)
        if cost is None:
            PRICING_MISSES.labels(provider, model).inc()
    org, project, client = authz.text("org"), authz.text("project"), authz.text("client")
    key_id = authz.text("key_id")
    if org is None and key_id:  # refused by ext_authz: say whose request it was
        b = keys.binding(m, key_id) if keys is not None else m.bindings.get(key_id)
        if b is not None:
            org, project, client = b.org.id, b.project.id, b.client.id
    if model is None:  # what the body asked for, for a request refused before ext_authz said
        asked = Namespace(namespaces.get(REQUEST)).value("model")
        model = asked if isinstance(asked, str) and len(asked) <= 256 else None
    if not deny:
        deny = usage_md.text("refused")
    if deny is None and flags.rate_limited:
        deny = "rate_limit_exceeded"
    row = LedgerRow(
        request_id=request_id_of(entry),
        at=_EPOCH + timedelta(seconds=common.start_time.seconds,
                              microseconds=common.start_time.nanos // 1000)
        if common.HasField("start_time") else datetime.now(UTC),
        org=org, project=project, client=client,
        key_id=key_id, provider=provider, model=model, route=authz.text("route"),
        status=status,
        input_tokens=usage.input_tokens, output_tokens=usage.output_tokens,
        cached_input_tokens=usage.cached_input_tokens,
        cache_creation_tokens=usage.cache_creation_tokens,
        cost=cost, currency=card.currency if card else None,
        rate_card_version=card.version if card else None,
        latency_ms=_ms(common.time_to_last_downstream_tx_byte),
        stream=stream,
        client_disconnected=flags.downstream_connection_termination
        or flags.downstream_remote_reset,
        deny_reason=deny,
        reasoning_tokens=usage.reasoning_tokens,
        cache_creation_1h_tokens=usage.cache_creation_1h_tokens,
        estimated=estimated,
    )
    if "charged_at_ms" in authz:  # rate limited in extauthz's Check (services.rate_limit)
        rl = {"reserved_tokens": authz.value("reserve_tokens") if "reserve_tokens" in authz
              else 0,
              "charged_at_ms": authz.value("charged_at_ms")}
    else:
        limited = Namespace(namespaces.get(RATELIMIT))
        rl = {name: limited.value(name) for name in ("reserved_tokens", "charged_at_ms")
              if name in limited}
    return Entry(row=row, actual_tokens=usage.total(dialect), ratelimit=rl,
                 hold=int(authz.number("budget_hold")))
