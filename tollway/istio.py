"""`tollway render --target istio`: Tollway's chain on an Istio ingress gateway.

Istio owns the gateway's Envoy; Tollway adds to it what istiod lets one add:

* `meshConfig.extensionProviders` (`--target istio-mesh`): extauthz as an
  `envoyExtAuthzGrpc` provider, so istiod itself generates the ext_authz filter and dials the
  service over the mesh's mTLS;
* an `AuthorizationPolicy` with `action: CUSTOM` naming that provider, for Tollway's host and
  route paths only (other hosts on a shared gateway never reach extauthz);
* a `Gateway` server and a `VirtualService` for Tollway's host (istiod builds the virtual host
  the routes are added to);
* one `EnvoyFilter` with what the provider cannot express: ext_authz's metadata namespaces (the
  body facts json_to_metadata extracts), json_to_metadata before ext_authz, the Lua usage
  filter, rate limit and decompressors before the router, the compressors first, Tollway's
  routes (each with its ext_authz context and rate-limit descriptors) first in the virtual
  host, the provider clusters, the access logs, local replies and the HTTP hardening, and the
  Checks' retry to another pod when one could not be reached (render.service_retry).

The admin API (and GET /v1/models, which it answers) is not added to the Istio gateway: serve
it through a mesh Service of its own. The pieces are render.py's own: the same filters, routes
and clusters the plain gateway runs.
Service clusters are Istio's (`outbound|PORT||HOST`) when the manifest dials a mesh Service,
Tollway's own when it dials loopback (costsink beside the gateway, reading its access log).
"""

from __future__ import annotations

from typing import Any

from tollway.manifest import Manifest
from tollway.metadata import AUTHZ, REQUEST
from tollway.render import (
    COSTSINK_CLUSTER,
    EXTAUTHZ_TIMEOUT,
    RATELIMIT_CLUSTER,
    access_logs,
    grpc_cluster,
    http_filters,
    local_replies,
    provider_cluster,
    routes,
    service_retry,
    skeleton,
)

PROVIDER = "tollway-extauthz"
ROUTER = "envoy.filters.http.router"
HCM = "envoy.filters.network.http_connection_manager"
# what the gateway's own HTTP connection manager gets from Tollway's template
HCM_SETTINGS = ("normalize_path", "merge_slashes", "path_with_escaped_slashes_action",
                "always_set_request_id_in_response", "max_request_headers_kb",
                "request_headers_timeout", "stream_idle_timeout", "common_http_protocol_options")


def _loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


def mesh_cluster(host: str, port: int) -> str:
    """The cluster istiod generates for a Service port (the name EnvoyFilters must use)."""
    return f"outbound|{port}||{host}"


def mesh_config(m: Manifest) -> dict[str, Any]:
    host, port = m.services.extauthz
    if _loopback(host):
        raise ValueError("services.extauthz must be a mesh Service (HOST.NAMESPACE.svc..."
                         ":PORT) for Istio's extension provider, not a loopback address")
    return {"extensionProviders": [{"name": PROVIDER, "envoyExtAuthzGrpc": {
        "service": host, "port": port, "timeout": EXTAUTHZ_TIMEOUT,
        "failOpen": False,  # authentication is always fail-closed
        "statusOnError": "503"}}]}


def _patch(apply_to: str, match: dict[str, Any], operation: str,
           value: dict[str, Any] | None = None) -> dict[str, Any]:
    patch: dict[str, Any] = {"operation": operation}
    if value is not None:
        patch["value"] = value
    return {"applyTo": apply_to, "match": {"context": "GATEWAY", **match}, "patch": patch}


def _service_cluster(m: Manifest, name: str, own: str) -> tuple[str, list[dict[str, Any]]]:
    """(the cluster name to dial `name` by, the clusters Tollway must add for it)."""
    host, port = m.services.dial(name)
    if _loopback(host):
        return own, [grpc_cluster(own, host, port, None)]
    return mesh_cluster(host, port), []


def envoy_filter(m: Manifest, *, host: str, port: int, target_port: int,
                 selector: dict[str, str]) -> dict[str, Any]:
    listener = {"listener": {"portNumber": target_port, "filterChain": {"filter": {
        "name": HCM, "subFilter": {"name": ROUTER}}}}}
    ratelimit, added = _service_cluster(m, "ratelimit", RATELIMIT_CLUSTER)
    costsink, added_sink = _service_cluster(m, "costsink", COSTSINK_CLUSTER)
    rate_limit_filter = m.services.rate_limit == "filter"
    if not rate_limit_filter:
        added = []  # extauthz answers the rate limit; Envoy never dials ratelimit
    filters = {f["name"]: f for f in http_filters(ratelimit, rate_limit_filter=rate_limit_filter)}
    compressors = [f for name, f in filters.items() if ".compressor." in name]
    after_authz = [f for name, f in filters.items()
                   if name in ("envoy.filters.http.lua", "envoy.filters.http.ratelimit")
                   or ".decompressor." in name]

    def at(sub: str) -> dict[str, Any]:
        return {"listener": {**listener["listener"], "filterChain": {"filter": {
            "name": HCM, "subFilter": {"name": sub}}}}}

    hcm_template = skeleton(m)["static_resources"]["listeners"][0][
        "filter_chains"][0]["filters"][0]["typed_config"]
    patches = [
        # INSERT_FIRST puts each at the head: reversed, they end in render.py's order
        *(_patch("HTTP_FILTER", listener, "INSERT_FIRST", f) for f in reversed(compressors)),
        _patch("HTTP_FILTER", at(AUTHZ), "INSERT_BEFORE",
               filters["envoy.filters.http.json_to_metadata"]),
        # istiod's ext_authz, from the extension provider, learns what the provider cannot say
        _patch("HTTP_FILTER", at(AUTHZ), "MERGE", {"name": AUTHZ, "typed_config": {
            "@type": filters[AUTHZ]["typed_config"]["@type"],
            "metadata_context_namespaces": [REQUEST], "include_peer_certificate": False,
            "grpc_service": {"retry_policy": service_retry(EXTAUTHZ_TIMEOUT)}}}),
        *(_patch("HTTP_FILTER", at(ROUTER), "INSERT_BEFORE", f) for f in after_authz),
        _patch("NETWORK_FILTER", {"listener": {"portNumber": target_port, "filterChain": {
            "filter": {"name": HCM}}}}, "MERGE", {"name": HCM, "typed_config": {
                "@type": hcm_template["@type"],
                **{k: hcm_template[k] for k in HCM_SETTINGS},
                "local_reply_config": local_replies(m),
                "access_log": access_logs(m, costsink)}}),
        _patch("LISTENER", {"listener": {"portNumber": target_port}}, "MERGE",
               {"per_connection_buffer_limit_bytes": m.gateway.max_request_bytes}),
        *(_patch("CLUSTER", {}, "ADD", c) for c in
          [*added, *added_sink, *(provider_cluster(p) for p in m.providers)]),
        # INSERT_FIRST again: reversed, Tollway's routes keep their order, ahead of the
        # VirtualService's own
        *(_patch("HTTP_ROUTE", {"routeConfiguration": {
            "portNumber": port, "vhost": {"name": f"{host}:{port}"}}}, "INSERT_FIRST", r)
          for r in reversed(routes(m)) if r["name"] != "admin_api"),
    ]
    return {"apiVersion": "networking.istio.io/v1alpha3", "kind": "EnvoyFilter",
            "metadata": {"name": "tollway"},
            "spec": {"workloadSelector": {"labels": selector}, "configPatches": patches}}


def objects(m: Manifest, *, host: str = "*", port: int = 80, target_port: int = 8080,
            selector: dict[str, str] | None = None, namespace: str = "istio-system"
            ) -> list[dict[str, Any]]:
    """The Kubernetes objects, in the gateway's namespace. `port` is the Gateway server's
    port, `target_port` the gateway pod's (Istio's default gateway maps 80 to 8080)."""
    mesh_config(m)  # the AuthorizationPolicy names a provider that must be expressible
    selector = selector or {"istio": "ingressgateway"}
    meta = {"namespace": namespace}
    operation: dict[str, Any] = {"paths": sorted({r.path for r in m.routes})}
    if host != "*":
        operation["hosts"] = [host, f"{host}:*"]
    result = [
        {"apiVersion": "networking.istio.io/v1", "kind": "Gateway",
         "metadata": {"name": "tollway", **meta},
         "spec": {"selector": selector, "servers": [{
             "port": {"number": port, "name": "http-tollway", "protocol": "HTTP"},
             "hosts": [host]}]}},
        # istiod builds the virtual host Tollway's routes are added to; its own route answers
        # only what no Tollway route matches
        {"apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
         "metadata": {"name": "tollway", **meta},
         "spec": {"hosts": [host], "gateways": ["tollway"], "http": [{
             "name": "tollway-unmatched",
             "directResponse": {"status": 404, "body": {"string": "not found"}}}]}},
        {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
         "metadata": {"name": "tollway", **meta},
         "spec": {"selector": {"matchLabels": selector}, "action": "CUSTOM",
                  "provider": {"name": PROVIDER}, "rules": [{"to": [{"operation": operation}]}]}},
    ]
    ef = envoy_filter(m, host=host, port=port, target_port=target_port, selector=selector)
    ef["metadata"].update(meta)
    return [*result, ef]
