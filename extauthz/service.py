"""The Envoy `ext_authz` gRPC servicer: translates CheckRequest ⇄ decision."""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime
from typing import Any

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from google.rpc import code_pb2
from prometheus_client import Counter, Histogram

from ratelimit.admission import ADMITTED, Admission
from ratelimit.backend import CounterBackend
from tollway.errors import error_body, status_of
from tollway.keys.mirror import KeyMirror
from tollway.manifest.model import Dialect
from tollway.metadata import RATE_LIMITED_BY, REQUEST, struct_dict, to_struct
from tollway.quotas import limits_apply
from tollway.reload import Live
from tollway.serve import past_deadline, time_remaining
from tollway.spend import SpendStore

from .budget import Held, settle_wait
from .decision import Allow, Deny, RequestFacts, Runtime, decide, presented_key_id
from .guessing import GuessThrottle
from .limits import Limits
from .policies import PolicyGate

log = logging.getLogger("tollway.extauthz")

IDENTITY_HEADER_PREFIX = "x-tollway-"

DECISIONS = Counter("tollway_extauthz_decisions_total", "Authorization decisions",
                    ["result", "reason"])
ALLOWED = DECISIONS.labels("allow", "ok")  # every allowed Check: the labelled child, looked up once
LATENCY = Histogram("tollway_extauthz_check_seconds", "Time to answer one Check",
                    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1))

_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD


def _add_header(headers: Any, key: str, value: str) -> None:
    """One more header option in a response's repeated field, set where it lies (a message
    passed to a constructor is copied)."""
    option = headers.add(append_action=_OVERWRITE)
    option.header.key = key
    option.header.value = value


def facts_from(request: external_auth_pb2.CheckRequest) -> RequestFacts:
    attrs = request.attributes
    namespace = attrs.metadata_context.filter_metadata.get(REQUEST)
    body = struct_dict(namespace) if namespace is not None else {}
    headers = attrs.request.http.headers
    length = headers.get("content-length", "")
    return RequestFacts(route_name=attrs.context_extensions.get("route"),
                        headers=headers, body=body,
                        # the client address Envoy trusts: the peer, or with
                        # gateway.trusted_proxy_hops the X-Forwarded-For entry it picked;
                        # Envoy overwrites any x-envoy-external-address a client sends
                        source_ip=headers.get("x-envoy-external-address")
                        or attrs.source.address.socket_address.address,
                        body_bytes=int(length) if length.isdigit() else None,
                        # Envoy sets x-request-id before ext_authz; http.id is a stream number
                        request_id=headers.get("x-request-id", ""))


def allow_response(allow: Allow, request_headers: Any, held: int,
                   limited: Admission | None = None,
                   ask_rate_limit: bool = True) -> external_auth_pb2.CheckResponse:
    """`limited`: the rate limit's answer when this Check gave it (services.rate_limit:
    check): its x-ratelimit-* headers go to the client, and when the charge was made, for
    token settlement, in the metadata beside the reservation. `ask_rate_limit`: some request
    or token limit counts this request; without one, the metadata has no reserve_tokens, so
    Envoy's rate-limit filter, missing that descriptor entry, does not call ratelimit at all
    (a round trip that could only answer OK)."""
    b = allow.binding
    rate = limited or ADMITTED
    # built in place: a message passed to a constructor is copied, and every allowed Check
    # answers one (7 against 15 us for this response, measured alone)
    response = external_auth_pb2.CheckResponse()
    response.status.SetInParent()  # code 0: OK
    ok = response.ok_response
    ok.SetInParent()
    if allow.provider.dialect is Dialect.ANTHROPIC:
        _add_header(ok.headers, "x-api-key", allow.credential)
        ok.headers_to_remove.append("authorization")
    else:
        _add_header(ok.headers, "authorization", f"Bearer {allow.credential}")
        ok.headers_to_remove.append("x-api-key")
    # identity headers are ours to set: a client must never be able to assert them, and the
    # upstream sees them only where the provider is configured to receive them
    if allow.provider.identity_headers:
        for name, value in (("org", b.org.id), ("project", b.project.id),
                            ("client", b.client.id), ("key-id", b.key.id)):
            _add_header(ok.headers, f"{IDENTITY_HEADER_PREFIX}{name}", value)
    else:
        ok.headers_to_remove.extend(h for h in request_headers
                                    if h.startswith(IDENTITY_HEADER_PREFIX))
    for k, v in rate.headers:
        _add_header(ok.response_headers_to_add, k, v)
    to_struct({
        "org": b.org.id, "project": b.project.id, "client": b.client.id, "key_id": b.key.id,
        "model": allow.model, "provider": allow.provider.name, "route": allow.route.name,
        "dialect": allow.route.dialect.value, "action": allow.route.action,
        "stream": allow.stream, "max_tokens": allow.max_tokens,
        "fail_closed": allow.route.fail_closed,
        # a string: Envoy's rate-limit descriptors read string metadata only
        "reserve_tokens": str(allow.reserve_tokens) if ask_rate_limit else None,
        "budget_hold": str(held) if held else None,  # units; costsink releases it
        "charged_at_ms": rate.metadata.get("charged_at_ms"),
        # the rate-limit filter, if this listener still has it, must not charge again
        RATE_LIMITED_BY: "check" if limited is not None else None,
    }, into=response.dynamic_metadata)
    return response


def deny_response(deny: Deny) -> external_auth_pb2.CheckResponse:
    status = status_of(deny.code)
    response = external_auth_pb2.CheckResponse()
    response.status.code = code_pb2.UNAVAILABLE if status == 503 else code_pb2.PERMISSION_DENIED
    denied = response.denied_response
    denied.status.code = status
    _add_header(denied.headers, "content-type", "application/json")
    _add_header(denied.headers, "x-tollway-error", deny.code)
    if status in (429, 503):
        _add_header(denied.headers, "retry-after", str(deny.retry_after))
    for k, v in deny.headers:
        _add_header(denied.headers, k, v)
    denied.body = error_body(deny.dialect, deny.code, deny.message)
    to_struct({"deny_reason": deny.code, "key_id": deny.key_id}, into=response.dynamic_metadata)
    return response


class AuthorizationService(external_auth_pb2_grpc.AuthorizationServicer):  # type: ignore[misc]
    def __init__(self, runtime: Live[Runtime], mirror: KeyMirror,
                 spend: SpendStore, counters: CounterBackend | None = None) -> None:
        self.runtime = runtime
        self.mirror = mirror
        self.spend = spend
        self.limits = Limits(spend, counters)
        self.policies = PolicyGate(spend)
        self.guesses = GuessThrottle()

    async def Check(self, request: external_auth_pb2.CheckRequest,
                    context: grpc.aio.ServicerContext) -> external_auth_pb2.CheckResponse:
        """Who calls and what they may do (`_decide`), then what they are held to (`_take`),
        then the answer Envoy applies."""
        started = time.perf_counter()
        try:
            facts = facts_from(request)
            rt = self.runtime.value
            result = await self._decide(rt, facts)
            if isinstance(result, Allow):
                taken = await self._take(rt, result, facts, request, context)
                if not isinstance(taken, Deny):
                    held, limited = taken
                    ALLOWED.inc()
                    return allow_response(
                        result, facts.headers, held.amount, limited,
                        limits_apply(rt.manifest, result.binding, result.model))
                result = taken
            DECISIONS.labels("deny", result.code).inc()
            return deny_response(result)
        except Exception:
            # never a stack trace to the client, never an accidental allow
            log.exception("Check failed")
            DECISIONS.labels("deny", "internal_error").inc()
            return deny_response(Deny("gateway_unavailable", "internal error in the gateway",
                                      Dialect.OPENAI))
        finally:
            LATENCY.observe(time.perf_counter() - started)

    async def _decide(self, rt: Runtime, facts: RequestFacts) -> Allow | Deny:
        """`decide`, on the key as the store has it: a key refused as invalid is fetched once
        (this replica's mirror may lack it, or hold it from before a rotation) and decided
        again if the fetch changed it; a wrong secret for a known key counts towards its
        throttle."""
        if not self.mirror.complete:  # a key this replica has not used lately: one query
            await self.mirror.hold([presented_key_id(facts.headers)])
        result = decide(rt, self.mirror, facts, datetime.now(UTC))
        if not (isinstance(result, Deny) and result.code == "invalid_api_key"
                and self.mirror.usable):
            return result
        key_id = presented_key_id(facts.headers)
        if key_id not in rt.manifest.bindings and self.mirror.get(key_id) is None:
            return result
        # changed since decide read it (nothing was awaited in between): decide again
        if await self.mirror.refetch(key_id):
            result = decide(rt, self.mirror, facts, datetime.now(UTC))
        if isinstance(result, Deny) and result.code == "invalid_api_key":
            wait = self.guesses.wrong_secret(key_id)
            if wait is not None:
                return Deny("too_many_failed_attempts",
                            f"too many wrong secrets for key {key_id}; retry in {wait} s",
                            result.dialect, retry_after=wait)
        return result

    async def _take(self, rt: Runtime, allow: Allow, facts: RequestFacts,
                    request: external_auth_pb2.CheckRequest,
                    context: grpc.aio.ServicerContext
                    ) -> tuple[Held, Admission | None] | Deny:
        """The project's Cedar policies, then the request's budget hold and, when this Check
        answers it, its rate limit; all given back if Envoy has stopped waiting meanwhile."""
        now = datetime.now(UTC)
        denied = await self.policies.check(rt, allow, facts, now)
        if denied:
            return denied
        held, limited = await self.limits.take(
            rt, allow, facts, now, settle_wait(time_remaining(context)),
            request.attributes.context_extensions.get(RATE_LIMITED_BY, ""))
        if isinstance(held, Deny):
            return held
        if (held.amount or (limited and limited.metadata)) and past_deadline(context):
            # Envoy has stopped waiting: the request gets Envoy's own 503 and never reaches
            # the provider, and its log entry will not carry this hold
            await self.limits.give_back(rt, allow, held, limited)
            return Deny("gateway_unavailable", "authorization took too long; retry",
                        allow.route.dialect, allow.binding.key.id)
        return held, limited
