"""Mutual TLS between Envoy and the services, and costsink → ratelimit: the request path works
through it; a caller without a certificate from the CA gets nothing from any service (so no
forged access-log entry, Settle or Usage call); rotated files are picked up by the services
on the next handshake and by Envoy through its file-based SDS, without a restart of Envoy."""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import openai
import pytest
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc

from tests.certs import issue
from tollway._proto import settle_pb2, settle_pb2_grpc, usage_pb2, usage_pb2_grpc

from .harness import Gateway, free_port, run_gateway

pytestmark = pytest.mark.e2e

HEALTH_PORT = free_port()


@pytest.fixture(scope="module")
def tls_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tls")


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, tls_dir: Path) -> Iterator[Gateway]:
    files = issue(tls_dir)

    def mutate(doc: dict[str, Any]) -> None:
        services = doc["services"]
        services["tls"] = files
        # as in a pod: bind every address, while Envoy dials the one it knows (loopback here)
        services["listen"] = {n: "0.0.0.0:" + services[n].rsplit(":", 1)[1]
                              for n in ("extauthz", "ratelimit", "costsink")}
        services["health"] = f"127.0.0.1:{HEALTH_PORT}"
        services["metrics_host"] = "0.0.0.0"
        doc["gateway"]["admin_host"] = "0.0.0.0"
        doc["organizations"][0]["projects"][0]["quotas"] = [{"name": "q", "rpm": 1000}]
    with run_gateway(tmp_path_factory.mktemp("mtls"), mutate=mutate) as g:
        g.issue("k-main")
        yield g


def ports(gw: Gateway) -> dict[str, int]:
    import yaml

    services = yaml.safe_load(gw.manifest_path.read_text())["services"]
    return {n: int(services[n].rsplit(":", 1)[1]) for n in ("extauthz", "ratelimit", "costsink")}


def ledger_ids(gw: Gateway) -> set[str]:
    db = sqlite3.connect(gw.manifest_path.parent / "state" / "ledger.db")
    try:
        return {r for (r,) in db.execute("SELECT request_id FROM tollway_ledger")}
    finally:
        db.close()


def chat(gw: Gateway) -> str:
    c = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=gw.issued["k-main"], max_retries=0)
    r = c.chat.completions.with_raw_response.create(
        model="gpt-5.4-mini", messages=[{"role": "user", "content": "hi"}])
    return r.headers["x-request-id"]


def test_the_request_path_runs_over_mutual_tls(gw: Gateway) -> None:
    rid = chat(gw)  # ext_authz and rate limit over mTLS
    deadline = time.monotonic() + 10
    while rid not in ledger_ids(gw):  # the access log over mTLS
        assert time.monotonic() < deadline
        time.sleep(0.05)
    usage = json.loads(gw.cli("usage", "--", "--key", "k-main", "--format", "json"))
    assert int(next(x for x in usage["limits"] if x["name"] == "rpm")["used"]) >= 1


def calls(channel: grpc.Channel) -> dict[str, Any]:
    """One call of every API a forger would want, on one channel."""
    return {
        "Check": lambda: external_auth_pb2_grpc.AuthorizationStub(channel).Check(
            external_auth_pb2.CheckRequest(), timeout=3),
        "Settle": lambda: settle_pb2_grpc.TokenSettlementStub(channel).Settle(
            settle_pb2.SettleRequest(key_id="k-main", model="gpt-5.4-mini",
                                     reserved_tokens=10**9, actual_tokens=0), timeout=3),
        "KeyUsage": lambda: usage_pb2_grpc.UsageStub(channel).KeyUsage(
            usage_pb2.KeyUsageRequest(key_id="k-main"), timeout=3),
        "StreamAccessLogs": lambda: als_pb2_grpc.AccessLogServiceStub(channel).StreamAccessLogs(
            iter([als_pb2.StreamAccessLogsMessage()]), timeout=3),
    }


def test_a_caller_without_a_certificate_gets_nothing(gw: Gateway, tmp_path: Path) -> None:
    stranger = issue(tmp_path / "other", "another-ca")  # a valid certificate, another CA
    credentials = {
        "plaintext": None,
        "TLS, no client certificate": grpc.ssl_channel_credentials(
            root_certificates=Path(stranger["ca"]).read_bytes()),
        "a certificate from another CA": grpc.ssl_channel_credentials(
            root_certificates=Path(stranger["ca"]).read_bytes(),
            private_key=Path(stranger["key"]).read_bytes(),
            certificate_chain=Path(stranger["cert"]).read_bytes()),
    }
    for name, port in ports(gw).items():
        for how, creds in credentials.items():
            target = f"127.0.0.1:{port}"
            channel = grpc.insecure_channel(target) if creds is None \
                else grpc.secure_channel(target, creds)
            with channel:
                for call_name, call in calls(channel).items():
                    with pytest.raises(grpc.RpcError) as e:
                        call()
                    assert e.value.code() == grpc.StatusCode.UNAVAILABLE, (name, how, call_name)
    # nor through the gateway's own listener
    for path in ("/envoy.service.accesslog.v3.AccessLogService/StreamAccessLogs",
                 "/tollway.ratelimit.v1.TokenSettlement/Settle",
                 "/tollway.usage.v1.Usage/KeyUsage"):
        r = httpx.post(f"{gw.url}{path}", content=b"\x00\x00\x00\x00\x00",
                       headers={"content-type": "application/grpc"})
        # a gRPC caller gets the 404 as gRPC has it: UNIMPLEMENTED; no service sees it
        assert r.headers["grpc-status"] == "12" and r.headers["x-tollway-error"] == "not_found"


def test_rotated_certificates_are_picked_up(gw: Gateway, tls_dir: Path) -> None:
    old = {k: Path(v).read_bytes() for k, v in
           {"ca": tls_dir / "ca.crt", "cert": tls_dir / "tls.crt", "key": tls_dir / "tls.key"}
           .items()}
    issue(tls_dir, "tollway-test-ca-2")  # a new CA and certificate, renamed into place

    def usage(creds: grpc.ChannelCredentials) -> None:
        with grpc.secure_channel(f"127.0.0.1:{ports(gw)['ratelimit']}", creds) as ch:
            usage_pb2_grpc.UsageStub(ch).KeyUsage(usage_pb2.KeyUsageRequest(key_id="k-main"),
                                                 timeout=3)
    new = {k: (tls_dir / n).read_bytes() for k, n in
           (("ca", "ca.crt"), ("cert", "tls.crt"), ("key", "tls.key"))}
    # the running services take the new CA on the next handshake, and refuse the old one
    usage(grpc.ssl_channel_credentials(new["ca"], new["key"], new["cert"]))
    with pytest.raises(grpc.RpcError):
        usage(grpc.ssl_channel_credentials(new["ca"], old["key"], old["cert"]))
    # Envoy: its connections to the services are made anew after they restart; only a client
    # certificate from the new CA gets through, so a 200 proves Envoy re-read its files
    gw.kill("services")
    gw.start("services")
    deadline = time.monotonic() + 20
    while True:
        try:
            chat(gw)
            break
        except openai.APIStatusError as e:
            assert time.monotonic() < deadline, f"Envoy never reconnected: {e}"
            time.sleep(0.2)


def listening_on_any(port: int) -> bool:
    """Bound to every address, 0.0.0.0 or dual-stack [::] (gRPC's choice), by the kernel's
    own tables: nothing is sent off this machine."""
    for table, any_address in (("tcp", "0" * 8), ("tcp6", "0" * 32)):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            if state == "0A" and local == f"{any_address}:{port:04X}":
                return True
    return False


def test_services_bind_apart_from_where_envoy_dials_them(gw: Gateway) -> None:
    import yaml

    doc = yaml.safe_load(gw.manifest_path.read_text())
    for name, port in ports(gw).items():
        assert listening_on_any(port), name
    assert listening_on_any(doc["services"]["metrics_port"])
    assert listening_on_any(doc["gateway"]["admin_port"])
    chat(gw)  # Envoy dials 127.0.0.1 all the same


def test_kubelet_probes_get_health_in_plaintext(gw: Gateway) -> None:
    """A kubelet gRPC probe presents no certificate: the health port answers it."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{HEALTH_PORT}") as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        for service in ("", "envoy.service.auth.v3.Authorization",
                        "envoy.service.ratelimit.v3.RateLimitService",
                        "envoy.service.accesslog.v3.AccessLogService"):
            answer = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=3)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING, service
        with pytest.raises(grpc.RpcError) as e:
            stub.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=3)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        # and nothing but health is served there
        with pytest.raises(grpc.RpcError) as e:
            usage_pb2_grpc.UsageStub(ch).KeyUsage(usage_pb2.KeyUsageRequest(key_id="k-main"),
                                                 timeout=3)
        assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
