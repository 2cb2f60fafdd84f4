"""Tollway on an Istio ingress gateway: `tollway render --target istio` applied the way istiod
applies it (tests/e2e/istio_shape.py), run by the real Envoy, passes the same SDK cases as the
plain gateway: the tests imported below run here against this module's `gw`.

The manifest dials extauthz and ratelimit as mesh Services (`tollway-services.tollway.svc...`,
reached through Istio's `outbound|PORT||HOST` clusters) and costsink on loopback beside the
gateway, as docs/istio.md deploys them.
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import yaml

from .harness import Gateway, run_gateway
from .istio_shape import apply_envoy_filter, gateway_config
from .test_gateway import (  # noqa: F401  (collected here, run against this module's gw)
    test_anthropic_messages_json_and_stream,
    test_client_cannot_assert_identity_headers,
    test_completion_swaps_the_credential,
    test_malformed_json_raises_the_sdk_bad_request,
    test_model_outside_the_allowlist_is_403,
    test_oversized_body_is_413_in_the_provider_shape,
    test_revocation_reaches_the_running_gateway_within_a_second,
    test_streamed_completion,
    test_unknown_key_and_wrong_secret_are_401,
)
from .test_metering import (  # noqa: F401
    test_a_client_that_hangs_up_mid_stream_is_recorded,
    test_ledger_matches_provider_usage_exactly,
    test_refused_requests_are_recorded_with_the_reason,
)

pytestmark = pytest.mark.e2e

MESH = "tollway-services.tollway.svc.cluster.local"
GATEWAY_PORT = 80  # the Gateway server's port; the pod listens on the harness's port


def render_istio(manifest_path: Path, target: str, pod_port: int) -> Any:
    """What an operator runs: the CLI, not a function call."""
    out = subprocess.run(
        [sys.executable, "-m", "tollway.cli", "render", "--manifest", str(manifest_path),
         "--target", target, "--istio-port", str(GATEWAY_PORT),
         "--istio-target-port", str(pod_port)],
        capture_output=True, text=True, check=True, timeout=60)
    return list(yaml.safe_load_all(out.stdout))


def istio_envoy(manifest_path: Path, ports: dict[str, int]) -> Path:
    [mesh] = render_istio(manifest_path, "istio-mesh", ports["gateway"])
    objects = render_istio(manifest_path, "istio", ports["gateway"])
    config = gateway_config(mesh, objects, ports["gateway"], ports["admin"], {
        f"{MESH}:{ports['extauthz']}": ports["extauthz"],
        f"{MESH}:{ports['ratelimit']}": ports["ratelimit"]})
    for o in objects:
        if o["kind"] == "EnvoyFilter":
            apply_envoy_filter(config, o)
    path = manifest_path.parent / "istio-gateway-envoy.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    (manifest_path.parent / "state").mkdir(exist_ok=True)  # for the access-log file
    return path


def mesh_manifest(doc: dict[str, Any]) -> None:
    services = doc["services"]
    for name in ("extauthz", "ratelimit"):
        port = services[name].rsplit(":", 1)[1]
        services.setdefault("listen", {})[name] = f"127.0.0.1:{port}"
        services[name] = f"{MESH}:{port}"
    doc["organizations"][0]["projects"] += [
        {"id": "limited", "quotas": [{"name": "three-a-minute", "rpm": 3}],
         "clients": [{"id": "svc", "keys": [{"id": "k-limited"}]}]},
        {"id": "capped", "quotas": [{"name": "cap", "spend_per_day": "0.00002"}],
         "clients": [{"id": "job", "keys": [{"id": "k-capped"}]}]}]


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    with run_gateway(tmp_path_factory.mktemp("istio"), mutate=mesh_manifest,
                     envoy_config=istio_envoy) as g:
        for key_id in ("k-main", "k-revoke", "k-mini", "k-limited", "k-capped"):
            g.issue(key_id)
        yield g


def config_dump(gw: Gateway) -> dict[str, Any]:
    admin = yaml.safe_load(gw.manifest_path.read_text())["gateway"]["admin_port"]
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/config_dump", timeout=5) as r:
        result: dict[str, Any] = json.load(r)
    return result


def test_the_chain_is_istios_ext_authz_gated_by_the_custom_policy(gw: Gateway) -> None:
    dump = json.dumps(config_dump(gw))
    # istiod's names, not Tollway's: the extension provider's cluster, the shadow policy
    assert "outbound|" in dump and MESH in dump
    assert "istio-ext-authz-ns[istio-system]-policy[tollway]-rule[0]" in dump
    assert "tollway_extauthz" not in dump  # Tollway added no ext_authz of its own
    listeners = config_dump(gw)["configs"][2]["static_listeners"]
    hcm = listeners[0]["listener"]["filter_chains"][0]["filters"][0]["typed_config"]
    names = [f["name"] for f in hcm["http_filters"]]
    assert names.index("envoy.filters.http.json_to_metadata") < names.index(
        "envoy.filters.http.ext_authz") < names.index("envoy.filters.http.lua") < names.index(
        "envoy.filters.http.ratelimit") < names.index("envoy.filters.http.router")
    assert names[:3] == [f"envoy.filters.http.compressor.{c}" for c in ("gzip", "brotli",
                                                                          "zstd")]
    # a Check that could not reach a pod goes to another (merged into istiod's ext_authz)
    authz = hcm["http_filters"][names.index("envoy.filters.http.ext_authz")]["typed_config"]
    retry = authz["grpc_service"]["retry_policy"]
    assert "connect-failure" in retry["retry_on"]
    assert retry["retry_back_off"]["max_interval"] == authz["grpc_service"]["timeout"]


@pytest.fixture(scope="module")
def gw_check(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """The same mesh with services.rate_limit: check: extauthz answers the rate limit."""
    def in_check(doc: dict[str, Any]) -> None:
        mesh_manifest(doc)
        doc["services"]["rate_limit"] = "check"
    with run_gateway(tmp_path_factory.mktemp("istio-check"), mutate=in_check,
                     envoy_config=istio_envoy) as g:
        for key_id in ("k-limited", "k-capped"):
            g.issue(key_id)
        yield g


def test_rpm_is_429_and_budget_is_402(gw: Gateway) -> None:
    rpm_is_429_and_budget_is_402(gw)


def test_with_the_rate_limit_in_the_check_the_chain_has_no_rate_limit_filter(
        gw_check: Gateway) -> None:
    listeners = config_dump(gw_check)["configs"][2]["static_listeners"]
    hcm = listeners[0]["listener"]["filter_chains"][0]["filters"][0]["typed_config"]
    names = [f["name"] for f in hcm["http_filters"]]
    assert "envoy.filters.http.ext_authz" in names
    assert "envoy.filters.http.ratelimit" not in names
    rpm_is_429_and_budget_is_402(gw_check)


def rpm_is_429_and_budget_is_402(gw: Gateway) -> None:
    limited = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=gw.issued["k-limited"],
                            max_retries=0, timeout=10)
    for _ in range(3):
        limited.chat.completions.create(model="gpt-5.4-mini",
                                        messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.RateLimitError) as refused:
        limited.chat.completions.create(model="gpt-5.4-mini",
                                        messages=[{"role": "user", "content": "hi"}])
    assert refused.value.response.headers["x-tollway-error"] == "rate_limit_exceeded"

    capped = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=gw.issued["k-capped"],
                           max_retries=0, timeout=10)
    with pytest.raises(openai.APIStatusError) as over:
        # gpt-5.4's hold for 1,000 output tokens alone exceeds the day's 0.00002
        capped.chat.completions.create(model="gpt-5.4", max_tokens=1000,
                                       messages=[{"role": "user", "content": "hi"}])
    assert over.value.status_code == 402
    assert over.value.response.headers["x-tollway-error"] == "budget_exceeded"
