"""`tollway render`: the manifest → a complete Envoy bootstrap.

The request path reads top to bottom in the filter chain: compressors (the client's answer, in
an encoding it accepts) → json_to_metadata (model, stream, max_tokens from the body) → ext_authz
→ Lua usage filter → rate limit → decompressors (the provider's answer, plain for the usage
filter) → router, and every request's access-log entry goes to costsink. Route identity reaches
ext_authz as `context_extensions.route`, so the service never has to match paths itself.

Encodings: the provider is asked for `identity` (the usage filter then reads plain bytes and
Envoy decodes nothing on the hot path); a provider or CDN that compresses all the same is
decoded by the decompressors (gzip, br, zstd: every coding Envoy can decode), and the client
gets the answer re-encoded by the compressors in the best coding its Accept-Encoding allows.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any

import yaml

from tollway.access_log import FILE_FORMAT, access_log_path
from tollway.errors import ErrorCode, error_body
from tollway.manifest import Manifest
from tollway.manifest.model import Dialect, ServiceTls
from tollway.metadata import AUTHZ, RATE_LIMITED_BY, RATELIMIT, REQUEST, USAGE

ENVOY_DIR = Path(__file__).resolve().parent.parent / "envoy"
# libyaml's emitter when PyYAML has it: a big manifest's Envoy config is megabytes
SAFE_DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
EXTAUTHZ_CLUSTER = "tollway_extauthz"
EXTAUTHZ_TIMEOUT = "0.5s"
RATELIMIT_CLUSTER = "tollway_ratelimit"
COSTSINK_CLUSTER = "tollway_costsink"
ADMIN_CLUSTER = "tollway_admin"
# how long an entry may wait in Envoy before it is sent: a finished request's budget hold is
# released once its entry reaches costsink, and extauthz waits up to budget.SETTLE_WAIT for that
ACCESS_LOG_FLUSH = "0.1s"
# an Envoy worker sends its entries sooner when they pass this size: an entry is about 1 KB,
# and each message costs costsink 0.1-0.3 ms of its own beyond its entries, so with 16 KB
# (Envoy's default, ~16 entries) it spent 80-95 us an entry, with 64 KB 65-69
# (docs/performance.md#costsink); below ~650 requests/s a worker the flush comes first anyway
ACCESS_LOG_BUFFER_BYTES = 65536
RATELIMIT_TIMEOUT = "0.5s"
# Envoy asks each endpoint's gRPC health service every second, and leaves out one that failed
# to answer SERVING three times running (gone, or shutting down), until it answers again. Not
# outlier detection: that counts a slow call as a failure, and under overload it would take a
# busy process out and pile its share on the others. When every endpoint fails, Envoy uses them
# all (its panic threshold), so one endpoint is never left out.
SERVICE_HEALTH_CHECK = {
    "timeout": "1s",
    "interval": "1s",
    "no_traffic_interval": "5s",  # before the first call (Envoy's default: a minute)
    "unhealthy_threshold": 3,
    "healthy_threshold": 1,
    "grpc_health_check": {},
}
# what the rate-limit service reads from extauthz's metadata, one descriptor per request; a
# key absent from the metadata (reserve_tokens, when no request or token limit applies to the
# request) makes Envoy skip the call (no default_value, skip_if_absent false)
DESCRIPTOR_KEYS = ("org", "project", "key_id", "model", "route", "dialect", "reserve_tokens")

# body fields copied into metadata; several dialect spellings of the output cap share one key
BODY_FIELDS = [("model", "model"), ("stream", "stream"), ("max_tokens", "max_tokens"),
               ("max_completion_tokens", "max_tokens"), ("max_output_tokens", "max_tokens")]

_ANY = "type.googleapis.com/"


def _typed(kind: str, **fields: Any) -> dict[str, Any]:
    return {"@type": _ANY + kind, **fields}


def _socket(host: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": host, "port_value": port}}


# every coding Envoy has both a compressor and a decompressor for, the client's favourite first
# when its Accept-Encoding weighs them equally; deflate has neither, so a client that accepts
# only deflate gets identity (always acceptable unless it says identity;q=0)
CODINGS = [
    ("gzip", "envoy.extensions.compression.gzip.compressor.v3.Gzip",
     "envoy.extensions.compression.gzip.decompressor.v3.Gzip"),
    ("brotli", "envoy.extensions.compression.brotli.compressor.v3.Brotli",
     "envoy.extensions.compression.brotli.decompressor.v3.Brotli"),
    ("zstd", "envoy.extensions.compression.zstd.compressor.v3.Zstd",
     "envoy.extensions.compression.zstd.decompressor.v3.Zstd"),
]
# what the client's answer may be compressed as (prefixes: "; charset=..." counts too)
COMPRESSIBLE = [{"prefix": "application/json"}, {"prefix": "text/event-stream"}]


def _compressors() -> list[dict[str, Any]]:
    """The client's answer in an encoding it accepts. SSE is compressed chunk by chunk (each
    chunk is flushed), so a stream still arrives as it is generated."""
    return [{
        "name": f"envoy.filters.http.compressor.{name}",
        "typed_config": _typed(
            "envoy.extensions.filters.http.compressor.v3.Compressor",
            compressor_library={"name": name, "typed_config": _typed(library)},
            choose_first=name == "gzip",
            # each compressor reads the client's Accept-Encoding; the route then replaces it
            # with identity for the provider (see _route)
            response_direction_config={
                "common_config": {"min_content_length": 0,
                                  "content_type_matcher": COMPRESSIBLE}}),
    } for name, library, _ in CODINGS]


def _decompressors() -> list[dict[str, Any]]:
    """A provider answer that arrives compressed all the same is decoded before the usage filter
    reads it. Request bodies pass untouched, and nothing is advertised upstream."""
    return [{
        "name": f"envoy.filters.http.decompressor.{name}",
        "typed_config": _typed(
            "envoy.extensions.filters.http.decompressor.v3.Decompressor",
            decompressor_library={"name": name, "typed_config": _typed(library)},
            request_direction_config={"common_config": {"enabled": {
                "default_value": False, "runtime_key": "tollway.none"}},
                "advertise_accept_encoding": False},
            response_direction_config={"common_config": {"ignore_no_transform_header": True}}),
    } for name, _, library in CODINGS]


def _json_to_metadata() -> dict[str, Any]:
    rules = []
    for field, key in BODY_FIELDS:
        rule: dict[str, Any] = {
            "selectors": [{"key": field}],
            "on_present": {"metadata_namespace": REQUEST, "key": key,
                           "preserve_existing_metadata_value": True},
        }
        if field == "model":
            # a body that is not JSON, or not an object, is flagged for ext_authz to refuse
            rule["on_error"] = {"metadata_namespace": REQUEST, "key": "body_error",
                                "value": True}
        rules.append(rule)
    return {
        "name": "envoy.filters.http.json_to_metadata",
        "typed_config": _typed("envoy.extensions.filters.http.json_to_metadata.v3.JsonToMetadata",
                               request_rules={"rules": rules, "allow_empty_content_type": True,
                                              "allow_content_types": ["application/json"]}),
    }


def service_retry(timeout: str) -> dict[str, Any]:
    """A call that could not reach its service's process (the connection refused, or reset
    before the call went out, as when the process has just died) is sent to another of the
    service's endpoints. A call that may have been served is never sent again, not even after a
    timeout: a Check or a rate-limit call may have charged quotas, and the count must stay exact.

    `timeout` is the call's own: Envoy turns a gRPC service's retry policy into a route's and
    takes its back-off's max_interval as the per-try timeout, so a shorter max_interval would
    cut every call off at it (the back-off between tries stays under 5 and 15 ms)."""
    return {
        "retry_on": "connect-failure,refused-stream,reset-before-request",
        "num_retries": 2,
        "retry_back_off": {"base_interval": "0.005s", "max_interval": timeout},
        "retry_host_predicate": [{
            "name": "envoy.retry_host_predicates.previous_hosts",
            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.retry.host."
                                      "previous_hosts.v3.PreviousHostsPredicate"}}],
        "host_selection_retry_max_attempts": 5,
    }


def _ext_authz() -> dict[str, Any]:
    return {
        "name": AUTHZ,  # the filter's name is also the namespace it writes metadata to
        "typed_config": _typed(
            "envoy.extensions.filters.http.ext_authz.v3.ExtAuthz",
            grpc_service={"envoy_grpc": {"cluster_name": EXTAUTHZ_CLUSTER},
                          "timeout": EXTAUTHZ_TIMEOUT,
                          "retry_policy": service_retry(EXTAUTHZ_TIMEOUT)},
            transport_api_version="V3",
            failure_mode_allow=False,  # authentication is always fail-closed
            status_on_error={"code": 503},
            metadata_context_namespaces=[REQUEST],
            include_peer_certificate=False,
        ),
    }


def _ratelimit(cluster: str = RATELIMIT_CLUSTER) -> dict[str, Any]:
    return {
        "name": RATELIMIT,
        "typed_config": _typed(
            "envoy.extensions.filters.http.ratelimit.v3.RateLimit",
            domain="tollway",
            timeout=RATELIMIT_TIMEOUT,
            # the service itself applies each route's fail_closed when its backend is down;
            # if the service is unreachable, refuse (503, reshaped by local_reply_config)
            failure_mode_deny=True,
            status_on_error={"code": 503},
            rate_limit_service={"grpc_service": {"envoy_grpc": {"cluster_name": cluster},
                                                 "retry_policy": service_retry(RATELIMIT_TIMEOUT)},
                                "transport_api_version": "V3"},
        ),
    }


def _usage_lua() -> dict[str, Any]:
    return {
        "name": "envoy.filters.http.lua",
        "typed_config": _typed(
            "envoy.extensions.filters.http.lua.v3.Lua",
            default_source_code={"inline_string": (ENVOY_DIR / "lua" / "usage.lua").read_text()}),
    }


def _access_log(cluster: str = COSTSINK_CLUSTER) -> dict[str, Any]:
    return {
        "name": "envoy.access_loggers.http_grpc",
        "typed_config": _typed(
            "envoy.extensions.access_loggers.grpc.v3.HttpGrpcAccessLogConfig",
            common_config={"log_name": "tollway", "transport_api_version": "V3",
                           "grpc_service": {"envoy_grpc": {"cluster_name": cluster}},
                           "buffer_flush_interval": ACCESS_LOG_FLUSH,
                           "buffer_size_bytes": ACCESS_LOG_BUFFER_BYTES}),
    }


def _file_access_log(path: str) -> dict[str, Any]:
    """The durable twin of the gRPC access log: the same facts, appended to a local file that
    costsink reconciles into the ledger (see tollway/access_log.py)."""
    return {
        "name": "envoy.access_loggers.file",
        "typed_config": _typed(
            "envoy.extensions.access_loggers.file.v3.FileAccessLog", path=path,
            log_format={"json_format": FILE_FORMAT}),
    }


def _transcoder() -> dict[str, Any]:
    """REST/JSON ⇄ gRPC for the admin API (and GET /v1/models); every other request passes
    untouched. Placed before json_to_metadata, which then sees a gRPC body and skips it."""
    from tollway.admin import DESCRIPTOR_SET, SERVICE

    return {
        "name": "envoy.filters.http.grpc_json_transcoder",
        "typed_config": _typed(
            "envoy.extensions.filters.http.grpc_json_transcoder.v3.GrpcJsonTranscoder",
            proto_descriptor=str(DESCRIPTOR_SET), services=[SERVICE],
            print_options={"preserve_proto_field_names": True,
                           "always_print_primitive_fields": True},
            convert_grpc_status=True),
    }


def _admin_route() -> dict[str, Any]:
    """The admin API and the key holder's model list: to the admin service, which
    authenticates its callers itself (admin tokens; the key for /v1/models). The transcoder
    has already turned their REST paths into the gRPC method's path when routes match."""
    from tollway.admin import SERVICE

    off = {AUTHZ: _typed("envoy.extensions.filters.http.ext_authz.v3.ExtAuthzPerRoute",
                         disabled=True),
           "envoy.filters.http.lua": _typed("envoy.extensions.filters.http.lua.v3.LuaPerRoute",
                                            disabled=True)}
    return {"name": "admin_api", "match": {"prefix": f"/{SERVICE}/"},
            "route": {"cluster": ADMIN_CLUSTER, "timeout": "10s"},
            "typed_per_filter_config": off}


def _router() -> dict[str, Any]:
    return {"name": "envoy.filters.http.router",
            "typed_config": _typed("envoy.extensions.filters.http.router.v3.Router")}


def _route(m: Manifest, r: Any) -> dict[str, Any]:
    p = m.provider(r.provider)
    return {
        "name": r.name,
        # every provider endpoint Tollway meters is a POST; other methods: _wrong_method
        "match": {"path": r.path, "headers": [{"name": ":method",
                                               "string_match": {"exact": "POST"}}]},
        "route": {"cluster": f"provider_{p.name}", "timeout": f"{r.timeout_seconds}s",
                  "host_rewrite_literal": p.upstream.sni or p.upstream.host,
                  "rate_limits": [{"actions": [
                      *({"metadata": {"descriptor_key": k, "source": "DYNAMIC",
                                      "metadata_key": {"key": AUTHZ, "path": [{"key": k}]}}}
                        for k in DESCRIPTOR_KEYS),
                      {"metadata": {"descriptor_key": RATE_LIMITED_BY, "source": "DYNAMIC",
                                    "metadata_key": {"key": AUTHZ,
                                                     "path": [{"key": RATE_LIMITED_BY}]},
                                    "default_value": "filter"}}]}]},
        # the usage filter reads the provider's answer as it streams: ask for it plain
        "request_headers_to_add": [{"header": {"key": "accept-encoding", "value": "identity"},
                                    "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}],
        "metadata": {"filter_metadata": {"tollway": {
            "route": r.name, "dialect": r.dialect.value, "provider": p.name,
            "action": r.action}}},
        "typed_per_filter_config": {AUTHZ: _typed(
            "envoy.extensions.filters.http.ext_authz.v3.ExtAuthzPerRoute",
            check_settings={"context_extensions": {
                "route": r.name, RATE_LIMITED_BY: m.services.rate_limit}})},
    }


def _wrong_method(r: Any) -> dict[str, Any]:
    """A route's path with another method than POST: the gateway's own 405, never the
    provider's (a PUT with a valid key must not reach it)."""
    return {
        "name": f"{r.name}_method",
        "match": {"path": r.path},
        "direct_response": {"status": 405, "body": {"inline_string": error_body(
            r.dialect, "method_not_allowed", f"{r.path} takes POST")}},
        "response_headers_to_add": [
            {"header": {"key": k, "value": v}} for k, v in (
                ("content-type", "application/json"), ("x-tollway-error", "method_not_allowed"),
                ("allow", "POST"))],
        "typed_per_filter_config": {AUTHZ: _typed(
            "envoy.extensions.filters.http.ext_authz.v3.ExtAuthzPerRoute", disabled=True)},
    }


def _not_found() -> dict[str, Any]:
    return {
        "name": "not_found",
        "match": {"prefix": "/"},
        "direct_response": {"status": 404, "body": {"inline_string": error_body(
            Dialect.OPENAI, "not_found", "no such endpoint on this gateway")}},
        "response_headers_to_add": [{"header": {"key": "content-type",
                                                "value": "application/json"}},
                                    {"header": {"key": "x-tollway-error",
                                                "value": "not_found"}}],
        "typed_per_filter_config": {AUTHZ: _typed(
            "envoy.extensions.filters.http.ext_authz.v3.ExtAuthzPerRoute", disabled=True)},
    }


# answers Tollway's own filters give (ext_authz denials, the usage filter's 400) carry their
# reason in metadata: a mapper for a bare status must leave those as they are
_OWN_REFUSALS = [(AUTHZ, "deny_reason"), (USAGE, "refused")]


def _none_of_ours() -> dict[str, Any]:
    return {"and_filter": {"filters": [{"metadata_filter": {
        "matcher": {"filter": ns, "path": [{"key": key}],
                    "value": {"string_match": {"exact": "\u0000never"}}},
        "match_if_key_not_found": True}} for ns, key in _OWN_REFUSALS]}}


def local_replies(m: Manifest) -> dict[str, Any]:
    """Envoy's own answers (a body too large, a request that is not acceptable HTTP, the auth
    service or the provider unreachable) in the provider's error shape with x-tollway-error,
    so that the SDKs raise their usual exceptions for them too."""
    anthropic_paths = [r.path for r in m.routes if r.dialect is Dialect.ANTHROPIC]
    # status, what else must hold, code, message
    cases: list[tuple[int, dict[str, Any] | None, ErrorCode, str]] = [
        (413, None, "request_too_large",
         f"request body exceeds {m.gateway.max_request_bytes} bytes"),
        (503, {"response_flag_filter": {"flags": ["UAEX", "RLSE"]}}, "gateway_unavailable",
         "the gateway cannot authorize requests right now"),
        (503, None, "upstream_unavailable", "the provider could not be reached"),
        (504, None, "upstream_unavailable", "the provider did not answer in time"),
        # what Envoy's codec or path checks refuse (flagged DPE, but only after this runs)
        (400, _none_of_ours(), "protocol_error",
         "the request is not acceptable HTTP: a header name or value, the method, the path "
         "(escaped slashes, NUL), the host, the framing or the content-length"),
        (426, None, "upgrade_required", "use HTTP/1.1 or HTTP/2"),
        (431, None, "headers_too_large", "the request headers are too large or too many"),
    ]
    mappers = []
    for status, condition, code, message in cases:
        for dialect in (Dialect.ANTHROPIC, Dialect.OPENAI):
            filters: list[dict[str, Any]] = [{"status_code_filter": {"comparison": {
                "op": "EQ", "value": {"default_value": status, "runtime_key": "tollway.none"}}}}]
            if condition:
                filters.append(condition)
            if dialect is Dialect.ANTHROPIC:
                if not anthropic_paths:
                    continue
                filters.append({"or_filter": {"filters": [
                    {"header_filter": {"header": {"name": ":path", "string_match": {
                        "prefix": p}}}} for p in anthropic_paths]}}
                    if len(anthropic_paths) > 1 else
                    {"header_filter": {"header": {"name": ":path", "string_match": {
                        "prefix": anthropic_paths[0]}}}})
            mappers.append({
                "filter": filters[0] if len(filters) == 1
                else {"and_filter": {"filters": filters}},
                "headers_to_add": [{"header": {"key": "x-tollway-error", "value": code},
                                    "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}],
                "body_format_override": {
                    "text_format_source": {"inline_string": error_body(dialect, code, message)},
                    "content_type": "application/json"},
            })
    return {"mappers": mappers}


# beside the rendered bootstrap when services.tls is set: one file per secret (Envoy's rule)
SDS_FILES = {"tollway_client_cert": "tollway-sds-cert.yaml", "tollway_ca": "tollway-sds-ca.yaml"}
_SECRET = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"


def render_sds(tls: ServiceTls) -> dict[str, dict[str, Any]]:
    """The file-based SDS documents Envoy reads its client certificate and the CA from, by
    file name: a secret delivered this way is re-read when the files change (a static one
    never is)."""
    secrets = {
        "tollway_client_cert": {"tls_certificate": {
            "certificate_chain": {"filename": tls.cert}, "private_key": {"filename": tls.key}}},
        "tollway_ca": {"validation_context": {"trusted_ca": {"filename": tls.ca}}},
    }
    return {SDS_FILES[name]: {"resources": [{"@type": _SECRET, "name": name, **secret}]}
            for name, secret in secrets.items()}


def _mtls(tls: ServiceTls, sds_dir: str) -> dict[str, Any]:
    def source(name: str) -> dict[str, Any]:
        return {"name": name, "sds_config": {
            "path_config_source": {
                "path": str(Path(sds_dir) / SDS_FILES[name]),
                # a Kubernetes Secret is updated by swapping a symlink in its directory
                "watched_directory": {"path": str(Path(tls.cert).parent)}},
            "resource_api_version": "V3"}}
    return {"name": "envoy.transport_sockets.tls", "typed_config": _typed(
        "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
        common_tls_context={
            "alpn_protocols": ["h2"],
            "tls_certificate_sds_secret_configs": [source("tollway_client_cert")],
            "validation_context_sds_secret_config": source("tollway_ca")})}


def grpc_cluster(name: str, host: str, port: int, transport: dict[str, Any] | None,
                 workers: int = 1) -> dict[str, Any]:
    """A Tollway service; with several workers, one endpoint per worker port, and Envoy
    balances each request over them (round robin), leaving out an endpoint that fails its
    health checks (SERVICE_HEALTH_CHECK)."""
    cluster: dict[str, Any] = {
        "name": name,
        "type": "STATIC" if host[0].isdigit() or ":" in host else "STRICT_DNS",
        "connect_timeout": "0.25s",
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": _typed(
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                explicit_http_config={"http2_protocol_options": {}})},
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": _socket(host, port + i)}} for i in range(workers)]}]},
        "health_checks": [copy.deepcopy(SERVICE_HEALTH_CHECK)],
    }
    if transport:
        cluster["transport_socket"] = transport
    return cluster


def provider_cluster(p: Any) -> dict[str, Any]:
    up = p.upstream
    cluster: dict[str, Any] = {
        "name": f"provider_{p.name}",
        "type": "STATIC" if up.host[0].isdigit() else "LOGICAL_DNS",
        "dns_lookup_family": "V4_PREFERRED",
        "connect_timeout": "5s",
        "per_connection_buffer_limit_bytes": 1024 * 1024,
        "load_assignment": {"cluster_name": f"provider_{p.name}", "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": _socket(up.host, up.port)}}]}]},
    }
    if up.tls:
        cluster["transport_socket"] = {
            "name": "envoy.transport_sockets.tls",
            "typed_config": _typed(
                "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                sni=up.sni or up.host,
                common_tls_context={"validation_context": {
                    "trusted_ca": {"filename": "/etc/ssl/certs/ca-certificates.crt"},
                    "match_typed_subject_alt_names": [{"san_type": "DNS", "matcher": {
                        "exact": up.sni or up.host}}]}}),
        }
    return cluster


def routes(m: Manifest) -> list[dict[str, Any]]:
    """Every route in match order: the manifest's, their other methods, then 404."""
    return [*(_route(m, r) for r in m.routes), *(_wrong_method(r) for r in m.routes),
            _admin_route(), _not_found()]


def route_config(m: Manifest) -> dict[str, Any]:
    return {"name": "tollway",
            "virtual_hosts": [{"name": "tollway", "domains": ["*"], "routes": routes(m)}]}


def http_filters(ratelimit_cluster: str = RATELIMIT_CLUSTER, *,
                 rate_limit_filter: bool = True) -> list[dict[str, Any]]:
    """The chain in request order. Without `rate_limit_filter` (services.rate_limit: check)
    ext_authz's Check answers the rate limit too: one gRPC round trip per request, not two."""
    return [
        *_compressors(),
        _transcoder(),
        _json_to_metadata(),
        _ext_authz(),
        _usage_lua(),
        *([_ratelimit(ratelimit_cluster)] if rate_limit_filter else []),
        *_decompressors(),
        _router(),
    ]


def access_logs(m: Manifest, costsink_cluster: str = COSTSINK_CLUSTER) -> list[dict[str, Any]]:
    # the admin API's calls are audited by the admin service, not metered
    from tollway.admin import SERVICE

    not_admin = {"header_filter": {"header": {"name": ":path", "string_match": {
        "prefix": f"/{SERVICE}/"}, "invert_match": True}}}
    logs = [_access_log(costsink_cluster), _file_access_log(str(access_log_path(m.gateway)))]
    return [{**log, "filter": not_admin} for log in logs]


@functools.cache
def _bootstrap_template() -> dict[str, Any]:
    """Parsed once: `tollway render --watch` renders on every manifest edit, and PyYAML's
    reading of the template was a tenth of that."""
    doc: dict[str, Any] = yaml.safe_load((ENVOY_DIR / "templates" / "bootstrap.yaml")
                                         .read_text())
    return doc


def skeleton(m: Manifest) -> dict[str, Any]:
    doc: dict[str, Any] = copy.deepcopy(_bootstrap_template())  # the callers edit their copy
    doc["admin"]["address"] = _socket(m.gateway.admin_host, m.gateway.admin_port)
    return doc


def listener(m: Manifest, routes: dict[str, Any]) -> dict[str, Any]:
    """The gateway's listener; `routes` is its HCM's `route_config` or `rds` member."""
    result: dict[str, Any] = copy.deepcopy(_bootstrap_template()["static_resources"]
                                           ["listeners"][0])
    result["address"] = _socket(*m.gateway.listen)
    # bounds what json_to_metadata may buffer: a larger body is refused with 413
    result["per_connection_buffer_limit_bytes"] = m.gateway.max_request_bytes
    hcm = result["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["http_filters"] = http_filters(rate_limit_filter=m.services.rate_limit == "filter")
    del hcm["route_config"]
    hcm.update(routes)
    hcm["local_reply_config"] = local_replies(m)
    if m.gateway.trusted_proxy_hops:
        # behind a load balancer: the client address is taken from X-Forwarded-For, that many
        # hops from the right; Envoy reports it as x-envoy-external-address
        hcm["xff_num_trusted_hops"] = m.gateway.trusted_proxy_hops
    hcm["access_log"] = access_logs(m)
    return result


def clusters(m: Manifest, sds_dir: str | None) -> list[dict[str, Any]]:
    tls = m.services.tls
    if tls and not sds_dir:
        raise ValueError("services.tls needs the SDS files' directory (write_config writes "
                         "them all)")
    transport = _mtls(tls, sds_dir) if tls and sds_dir else None
    n = m.services.workers
    return [grpc_cluster(EXTAUTHZ_CLUSTER, *m.services.extauthz, transport, n),
            grpc_cluster(RATELIMIT_CLUSTER, *m.services.ratelimit, transport, n),
            grpc_cluster(COSTSINK_CLUSTER, *m.services.costsink, transport),
            grpc_cluster(ADMIN_CLUSTER, *m.services.admin, transport, n),
            *(provider_cluster(p) for p in m.providers)]


def render(m: Manifest, sds_dir: str | None = None) -> dict[str, Any]:
    """The whole configuration in one static bootstrap. With services.tls, `sds_dir` is where
    render_sds's documents will be (write_config puts them beside the bootstrap). A running
    Envoy takes manifest edits only from the dynamic layout (tollway/envoy_files.py)."""
    doc = skeleton(m)
    doc["static_resources"] = {"listeners": [listener(m, {"route_config": route_config(m)})],
                               "clusters": clusters(m, sds_dir)}
    return doc


def to_yaml(doc: Any) -> str:
    return str(yaml.dump(doc, Dumper=SAFE_DUMPER, sort_keys=False, width=100))


def render_yaml(m: Manifest, sds_dir: str | None = None) -> str:
    header = (f"# Rendered by `tollway render` from {m.source or 'a manifest'}; do not edit.\n")
    return header + to_yaml(render(m, sds_dir))


def write_config(m: Manifest, path: Path) -> list[Path]:
    """The bootstrap at `path`, and with services.tls the SDS documents beside it; returns
    the files written. In Kubernetes they all go into Envoy's ConfigMap."""
    tls = m.services.tls
    directory = path.absolute().parent
    path.write_text(render_yaml(m, str(directory) if tls else None))
    written = [path]
    for name, doc in (render_sds(tls) if tls else {}).items():
        (directory / name).write_text(to_yaml(doc))
        written.append(directory / name)
    return written
