"""What istiod would give an ingress gateway's Envoy for `tollway render --target istio`'s
objects, built here without a cluster, so that the real Envoy can run it.

There is no Kubernetes or istiod on this machine. This module plays istiod's part for exactly
the objects Tollway emits, the way istiod builds them (checked against Istio's docs and
source): the gateway listener `0.0.0.0_<pod port>` whose HTTP connection manager takes its
routes from the route configuration `http.<server port>`, one virtual host `<host>:<port>` per
Gateway host with the VirtualService's routes; for the CUSTOM AuthorizationPolicy, an RBAC
filter in shadow mode whose policy id gates istiod's ext_authz filter (built from the
extension provider) through `filter_enabled_metadata`; Istio's outbound clusters
`outbound|PORT||HOST` for mesh Services; then the EnvoyFilter patches, applied in order with
istiod's operations (INSERT_FIRST, INSERT_BEFORE, MERGE as a protobuf merge that appends
repeated fields, ADD). Every patch must match something: istiod would skip a patch that
matches nothing silently, and the test would then prove less than it claims.

Left out, because stock Envoy lacks them or they do not touch Tollway's chain: Istio's own
filters (istio.metadata_exchange, istio.stats, istio_authn), the mesh's mTLS between the
gateway and the services (the services run on loopback here), and EDS (static endpoints).
"""

from __future__ import annotations

import copy
from typing import Any

ANY = "type.googleapis.com/"
HCM = "envoy.filters.network.http_connection_manager"
SHADOW_PREFIX = "istio_ext_authz_"


def _typed(kind: str, **fields: Any) -> dict[str, Any]:
    return {"@type": ANY + kind, **fields}


def _one(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    [found] = [o for o in objects if o["kind"] == kind]
    return found


def _rbac_shadow(policy: dict[str, Any]) -> dict[str, Any]:
    """The CUSTOM policy as istiod compiles it: a shadow rule per AuthorizationPolicy rule,
    whose id (prefix istio-ext-authz) the ext_authz filter is enabled by."""
    policies = {}
    for i, rule in enumerate(policy["spec"]["rules"]):
        permissions = []
        for to in rule["to"]:
            op = to["operation"]
            ands = []
            if "paths" in op:
                ands.append({"or_rules": {"rules": [
                    {"url_path": {"path": {"exact": p}}} for p in op["paths"]]}})
            if "hosts" in op:
                ands.append({"or_rules": {"rules": [
                    {"header": {"name": ":authority", "string_match": (
                        {"suffix": h[1:]} if h.startswith("*") else
                        {"prefix": h[:-1]} if h.endswith("*") else {"exact": h}),
                        "ignore_case": True}} for h in op["hosts"]]}})
            permissions.append({"and_rules": {"rules": ands}} if ands else {"any": True})
        name = (f"istio-ext-authz-ns[{policy['metadata']['namespace']}]-policy["
                f"{policy['metadata']['name']}]-rule[{i}]")
        policies[name] = {"permissions": permissions, "principals": [{"any": True}]}
    return {"name": "envoy.filters.http.rbac", "typed_config": _typed(
        "envoy.extensions.filters.http.rbac.v3.RBAC",
        shadow_rules={"action": "ALLOW", "policies": policies},
        shadow_rules_stat_prefix=SHADOW_PREFIX)}


def _ext_authz(provider: dict[str, Any]) -> dict[str, Any]:
    grpc = provider["envoyExtAuthzGrpc"]
    return {"name": "envoy.filters.http.ext_authz", "typed_config": _typed(
        "envoy.extensions.filters.http.ext_authz.v3.ExtAuthz",
        grpc_service={"envoy_grpc": {"cluster_name":
                                     f"outbound|{grpc['port']}||{grpc['service']}"},
                      "timeout": grpc.get("timeout", "600s")},
        transport_api_version="V3",
        failure_mode_allow=grpc.get("failOpen", False),
        status_on_error={"code": int(grpc.get("statusOnError", "403"))},
        filter_enabled_metadata={
            "filter": "envoy.filters.http.rbac",
            "path": [{"key": SHADOW_PREFIX + "shadow_effective_policy_id"}],
            "value": {"string_match": {"prefix": "istio-ext-authz"}}})}


def _mesh_cluster(name: str, local_port: int) -> dict[str, Any]:
    """A mesh Service port as istiod's CDS + EDS would resolve it (gRPC: HTTP/2)."""
    return {"name": name, "type": "STATIC", "connect_timeout": "10s",
            "typed_extension_protocol_options": {
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": _typed(
                    "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                    explicit_http_config={"http2_protocol_options": {}})},
            "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [
                {"endpoint": {"address": {"socket_address": {
                    "address": "127.0.0.1", "port_value": local_port}}}}]}]}}


def gateway_config(mesh: dict[str, Any], objects: list[dict[str, Any]], pod_port: int,
                   admin_port: int, endpoints: dict[str, int]) -> dict[str, Any]:
    """The gateway Envoy's bootstrap. `endpoints`: mesh `HOST:PORT` → local port."""
    gateway = _one(objects, "Gateway")
    [server] = gateway["spec"]["servers"]
    port = server["port"]["number"]
    vs = _one(objects, "VirtualService")
    policy = _one(objects, "AuthorizationPolicy")
    [provider] = [p for p in mesh["extensionProviders"]
                  if p["name"] == policy["spec"]["provider"]["name"]]
    vhosts = [{"name": f"{host}:{port}",
               "domains": ["*"] if host == "*" else [host, f"{host}:*"],
               "routes": [{"name": r["name"], "match": {"prefix": "/"}, "direct_response": {
                   "status": r["directResponse"]["status"],
                   "body": {"inline_string": r["directResponse"]["body"]["string"]}}}
                   for r in vs["spec"]["http"]]} for host in server["hosts"]]
    hcm = _typed(
        "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        stat_prefix=f"outbound_0.0.0.0_{pod_port}", use_remote_address=True,
        route_config={"name": f"http.{port}", "virtual_hosts": vhosts},
        http_filters=[
            _rbac_shadow(policy), _ext_authz(provider),
            {"name": "envoy.filters.http.cors",
             "typed_config": _typed("envoy.extensions.filters.http.cors.v3.Cors")},
            {"name": "envoy.filters.http.fault",
             "typed_config": _typed("envoy.extensions.filters.http.fault.v3.HTTPFault")},
            {"name": "envoy.filters.http.router",
             "typed_config": _typed("envoy.extensions.filters.http.router.v3.Router")}])
    return {
        "node": {"id": "router~127.0.0.1~istio-ingressgateway.istio-system~istio-system.svc"
                       ".cluster.local", "cluster": "istio-ingressgateway.istio-system"},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1",
                                                 "port_value": admin_port}}},
        "static_resources": {
            "listeners": [{
                "name": f"0.0.0.0_{pod_port}",
                "address": {"socket_address": {"address": "127.0.0.1",
                                               "port_value": pod_port}},
                "filter_chains": [{"filters": [{"name": HCM, "typed_config": hcm}]}]}],
            "clusters": [_mesh_cluster(f"outbound|{hp.rsplit(':', 1)[1]}||"
                                       f"{hp.rsplit(':', 1)[0]}", local)
                         for hp, local in endpoints.items()]}}


def merge(dst: dict[str, Any], src: dict[str, Any]) -> None:
    """Protobuf merge on the JSON form, as istiod's MERGE: messages recursively, repeated
    fields appended, scalars replaced; an Any of another type replaced whole."""
    for key, value in src.items():
        if isinstance(value, dict) and isinstance(dst.get(key), dict):
            if "@type" in value and value["@type"] != dst[key].get("@type"):
                dst[key] = copy.deepcopy(value)
            else:
                merge(dst[key], value)
        elif isinstance(value, list) and isinstance(dst.get(key), list):
            dst[key].extend(copy.deepcopy(value))
        else:
            dst[key] = copy.deepcopy(value)


def apply_envoy_filter(config: dict[str, Any], envoy_filter: dict[str, Any]) -> None:
    resources = config["static_resources"]
    for patch in envoy_filter["spec"]["configPatches"]:
        match, op = patch["match"], patch["patch"]["operation"]
        value = copy.deepcopy(patch["patch"].get("value"))
        assert match["context"] == "GATEWAY", patch
        kind = patch["applyTo"]
        if kind == "CLUSTER":
            assert op == "ADD", patch
            resources["clusters"].append(value)
            continue
        if kind == "HTTP_ROUTE":
            rc_match = match["routeConfiguration"]
            vhosts = [v for lst in resources["listeners"] for fc in lst["filter_chains"]
                      for f in fc["filters"] if f["name"] == HCM
                      for v in f["typed_config"]["route_config"]["virtual_hosts"]
                      if f["typed_config"]["route_config"]["name"] ==
                      f"http.{rc_match['portNumber']}"
                      and v["name"] == rc_match["vhost"]["name"]]
            assert vhosts, f"no virtual host for {rc_match}"
            assert op == "INSERT_FIRST", patch
            for vhost in vhosts:
                vhost["routes"].insert(0, value)
            continue
        lmatch = match["listener"]
        listeners = [lst for lst in resources["listeners"]
                     if lst["address"]["socket_address"]["port_value"] == lmatch["portNumber"]]
        assert listeners, f"no listener on port {lmatch['portNumber']}"
        if kind == "LISTENER":
            assert op == "MERGE", patch
            for lst in listeners:
                merge(lst, value)
            continue
        want = lmatch["filterChain"]["filter"]
        hcms = [f for lst in listeners for fc in lst["filter_chains"] for f in fc["filters"]
                if f["name"] == want["name"]]
        assert hcms, f"no {want['name']} on the listener"
        if kind == "NETWORK_FILTER":
            assert op == "MERGE", patch
            for f in hcms:
                merge(f, value)
            continue
        assert kind == "HTTP_FILTER", patch
        for f in hcms:
            chain = f["typed_config"]["http_filters"]
            if op == "INSERT_FIRST":
                chain.insert(0, value)
                continue
            names = [h["name"] for h in chain]
            sub = want["subFilter"]["name"]
            assert sub in names, f"no HTTP filter {sub} in {names}"
            at = names.index(sub)
            if op == "INSERT_BEFORE":
                chain.insert(at, value)
            elif op == "MERGE":
                merge(chain[at], value)
            else:
                raise AssertionError(f"operation {op} is not emulated")
