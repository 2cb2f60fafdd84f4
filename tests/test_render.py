"""Every example renders to a config that the real Envoy accepts (`envoy --mode validate`)."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from pathlib import Path

import pytest
import yaml

from tollway.envoy_files import follow
from tollway.manifest import load
from tollway.render import render, render_yaml
from tollway.up import envoy_binary

EXAMPLES = sorted((Path(__file__).parent.parent / "examples").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_envoy_accepts_the_rendering(path: Path, tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    # Envoy opens its access-log file at start: its directory (the state dir) must exist
    monkeypatch.setenv("TOLLWAY_STATE_DIR", str(tmp_path))
    config = tmp_path / "envoy.yaml"
    config.write_text(render_yaml(load(path)))
    out = subprocess.run([str(envoy_binary()), "--mode", "validate", "-c", str(config),
                          "--base-id", str(abs(hash(path.name)) % 50000 + 1000)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "OK" in out.stdout + out.stderr


def test_routes_carry_their_identity_to_extauthz() -> None:
    doc = render(load(EXAMPLES[0].parent / "team-ai.yaml"))
    hcm = doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    routes = hcm["typed_config"]["route_config"]["virtual_hosts"][0]["routes"]
    chat = routes[0]
    assert chat["match"]["path"] == "/v1/chat/completions"
    per_route = chat["typed_per_filter_config"]["envoy.filters.http.ext_authz"]
    # and the mode its listener was rendered for: whether a rate-limit filter asks later
    assert per_route["check_settings"]["context_extensions"] == {
        "route": "route0", "rate_limited_by": "filter"}
    actions = chat["route"]["rate_limits"][0]["actions"]
    by = next(a["metadata"] for a in actions
              if a["metadata"]["descriptor_key"] == "rate_limited_by")
    assert by["default_value"] == "filter"  # a Check that did not charge says nothing
    assert routes[-1]["name"] == "not_found"
    cluster = next(c for c in doc["static_resources"]["clusters"]
                   if c["name"] == "provider_openai")
    tls = cluster["transport_socket"]["typed_config"]
    assert tls["sni"] == "api.openai.com"
    filters = [f["name"] for f in hcm["typed_config"]["http_filters"]]
    codings = ["gzip", "brotli", "zstd"]
    # compressors first (last on the way out), decompressors just before the router (first on
    # the way back), so the usage filter always reads the provider's answer decoded
    # the admin API's transcoder before json_to_metadata, which then skips its gRPC bodies
    assert filters == [*(f"envoy.filters.http.compressor.{c}" for c in codings),
                       "envoy.filters.http.grpc_json_transcoder",
                       "envoy.filters.http.json_to_metadata", "envoy.filters.http.ext_authz",
                       "envoy.filters.http.lua", "envoy.filters.http.ratelimit",
                       *(f"envoy.filters.http.decompressor.{c}" for c in codings),
                       "envoy.filters.http.router"]
    assert chat["request_headers_to_add"][0]["header"] == {"key": "accept-encoding",
                                                           "value": "identity"}
    assert hcm["typed_config"]["access_log"][0]["name"] == "envoy.access_loggers.http_grpc"
    assert "OPENAI_API_KEY" not in yaml.safe_dump(doc)  # credentials never reach Envoy's config


def test_the_committed_openapi_description_is_the_protos() -> None:
    """docs/admin-openapi.json is generated (python -m tollway.admin.openapi): never stale."""
    import json

    from tollway.admin.openapi import openapi

    committed = json.loads((EXAMPLES[0].parent.parent / "docs" / "admin-openapi.json")
                           .read_text())
    assert committed == openapi()
    assert "/admin/v1/keys/{id}:revoke" in committed["paths"]
    assert committed["paths"]["/v1/models"]["get"]["operationId"] == "ListModels"


def test_the_admin_service_name_envoy_routes_is_the_protos() -> None:
    """`tollway render` names the admin service without loading its generated code."""
    from tollway._proto import admin_pb2
    from tollway.admin import SERVICE

    assert admin_pb2.DESCRIPTOR.services_by_name["Admin"].full_name == SERVICE


def test_with_the_rate_limit_in_the_check_envoy_has_no_rate_limit_filter(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tollway.istio import envoy_filter

    monkeypatch.setenv("TOLLWAY_STATE_DIR", str(tmp_path))
    doc = yaml.safe_load((EXAMPLES[0].parent / "team-ai.yaml").read_text())
    doc.setdefault("services", {})["rate_limit"] = "check"
    path = tmp_path / "manifest.yaml"
    path.write_text(yaml.safe_dump(doc))
    m = load(path)
    rendered = render(m)
    hcm = rendered["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    filters = [f["name"] for f in hcm["typed_config"]["http_filters"]]
    assert "envoy.filters.http.ext_authz" in filters
    assert "envoy.filters.http.ratelimit" not in filters
    routes = hcm["typed_config"]["route_config"]["virtual_hosts"][0]["routes"]
    assert routes[0]["typed_per_filter_config"]["envoy.filters.http.ext_authz"][
        "check_settings"]["context_extensions"]["rate_limited_by"] == "check"
    istio = yaml.safe_dump(envoy_filter(m, host="gw", port=80, target_port=8080,
                                        selector={"app": "gw"}))
    assert "filters.http.ratelimit.v3.RateLimit" not in istio and "envoy.filters.http.lua" in istio
    config = tmp_path / "envoy.yaml"
    config.write_text(render_yaml(m))
    out = subprocess.run([str(envoy_binary()), "--mode", "validate", "-c", str(config),
                          "--base-id", "977"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]


def test_a_call_is_sent_again_only_when_it_was_cut_off(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Checks and rate-limit calls go to another endpoint when they could not reach one, never
    once sent, not even after a timeout (the call may have charged quotas); a try is not cut
    short (Envoy takes the back-off's max_interval as the per-try timeout); every service
    cluster health-checks its endpoints."""
    monkeypatch.setenv("TOLLWAY_STATE_DIR", str(tmp_path))
    rendered = render(load(EXAMPLES[0]))
    hcm = rendered["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    filters = {f["name"]: f["typed_config"] for f in hcm["typed_config"]["http_filters"]}
    services = [filters["envoy.filters.http.ext_authz"]["grpc_service"],
                filters["envoy.filters.http.ratelimit"]["rate_limit_service"]["grpc_service"]]
    timeouts = [filters["envoy.filters.http.ext_authz"]["grpc_service"]["timeout"],
                filters["envoy.filters.http.ratelimit"]["timeout"]]
    for service, timeout in zip(services, timeouts, strict=True):
        conditions = set(service["retry_policy"]["retry_on"].split(","))
        assert conditions == {"connect-failure", "refused-stream", "reset-before-request"}
        assert service["retry_policy"]["retry_back_off"]["max_interval"] == timeout
    clusters = [c for c in rendered["static_resources"]["clusters"]
                if c["name"].startswith("tollway_")]
    assert len(clusters) == 4
    assert all("grpc_health_check" in c["health_checks"][0] for c in clusters)


@pytest.mark.skipif(not hasattr(os, "sched_getscheduler"), reason="Linux scheduling policy")
def test_following_the_manifest_runs_only_on_cores_requests_leave_idle(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`render --watch` and `tollway up`'s thread re-render at SCHED_IDLE, and only that
    thread: in `tollway up` the process's other threads keep their policy."""
    monkeypatch.setenv("TOLLWAY_STATE_DIR", str(tmp_path))
    path = EXAMPLES[0].parent / "quickstart.yaml"
    stop = threading.Event()
    thread = threading.Thread(target=follow,
                              args=(path, load(path), tmp_path / "envoy", stop, 0.01))
    thread.start()
    assert thread.native_id is not None
    try:
        deadline = time.monotonic() + 10
        while os.sched_getscheduler(thread.native_id) != os.SCHED_IDLE:
            assert time.monotonic() < deadline, "the thread never went to SCHED_IDLE"
            time.sleep(0.01)
        assert os.sched_getscheduler(0) == os.SCHED_OTHER
    finally:
        stop.set()
        thread.join()
