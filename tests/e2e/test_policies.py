"""Reference 000's four scenarios through the real Envoy with the openai SDK, each policy as
written there; a spend cap in Cedar taking effect once the ledger passes it; reference 004's
roles_allowed model rules."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest
import yaml

from .harness import Gateway, run_gateway

pytestmark = pytest.mark.e2e

# reference 000, verbatim
MULTI_TENANT = """permit ( principal, action, resource ) when { principal.status == "active" && principal.user.tenant == "tenant1" && principal.current_daily_spend.lessThan(decimal("50.0")) && principal.current_monthly_spend.lessThan(decimal("500.0")) };"""  # noqa: E501
ENTERPRISE = """// Engineering - full access permit (principal, action, resource) when { principal.user.tenant == "engineering" && principal.status == "active" }; // Research - completions and embeddings only permit (principal, action in [Action::"completion", Action::"embedding"], resource) when { principal.user.tenant == "research" && principal.status == "active" };"""  # noqa: E501
DEVELOPMENT = """permit ( principal, action in [Action::"completion", Action::"embedding"], resource ) when { principal.status == "active" && principal.current_daily_spend.lessThan(decimal("100.0")) && ( context.model_name == "gpt-4o-mini" || context.model_name == "claude-3-haiku-20240307" ) };"""  # noqa: E501
PRODUCTION = """permit ( principal, action, resource ) when { principal.user.is_agent == true && principal.status == "active" && context.ip_address.isInRange(ip("10.0.0.0/8")) && principal.current_daily_spend.lessThan(decimal("1000.0")) && principal.current_monthly_spend.lessThan(decimal("10000.0")) };"""  # noqa: E501

# the comments of ENTERPRISE run to the end of the line in Cedar; written on one line as in the
# reference, the second policy would be commented out, so it is split where the comments begin
ENTERPRISE = ENTERPRISE.replace(" // ", "\n// ").replace("access permit", "access\npermit") \
    .replace("only permit", "only\npermit")


def scenario(policies: dict[str, str], clients: list[dict[str, Any]],
             extra: Callable[[dict[str, Any]], None] | None = None
             ) -> Callable[[dict[str, Any]], None]:
    def mutate(doc: dict[str, Any]) -> None:
        openai_p, anthropic_p = doc["providers"]
        openai_p["models"] += [{"name": "gpt-4o-mini"}, {"name": "gpt-4o"},
                               {"name": "text-embedding-3-small"}]
        anthropic_p["models"] += [{"name": "claude-3-haiku-20240307"}]
        doc["policies"] = [{"id": k, "text": v} for k, v in policies.items()]
        doc["organizations"].append({"id": "scenario", "projects": [
            {"id": "apps", "policies": {"enabled": True}, "clients": clients}]})
        if extra:
            extra(doc)
    return mutate


def ok(c: openai.OpenAI, model: str = "gpt-4o-mini", **headers: str) -> None:
    c.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}],
                              extra_headers=headers or None)


def denied(call: Callable[[], Any], code: str = "policy_denied") -> str:
    with pytest.raises(openai.PermissionDeniedError) as e:
        call()
    body = e.value.body
    assert isinstance(body, dict) and body["code"] == code, body
    return str(body["message"])


@pytest.fixture
def gateway(tmp_path: Path) -> Callable[..., Any]:
    """Start a gateway for one scenario; yields a function issuing clients for its keys."""
    stack: list[Any] = []

    def start(mutate: Callable[[dict[str, Any]], None], *keys: str) -> Gateway:
        cm = run_gateway(tmp_path, mutate=mutate)
        gw = cm.__enter__()
        stack.append(cm)
        for k in keys:
            gw.issue(k)
        return gw
    yield start
    for cm in stack:
        cm.__exit__(None, None, None)


def client(gw: Gateway, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gw.url}/v1", api_key=gw.issued[key], max_retries=0)


def test_multi_tenant_saas(gateway: Callable[..., Gateway]) -> None:
    gw = gateway(scenario({"tenant1": MULTI_TENANT}, [
        {"id": "tenant1-app", "user": {"email": "tenant1@example.com", "tenant": "tenant1"},
         "keys": [{"id": "k-tenant1", "quotas": [{"rpm": 100}]}]},
        {"id": "tenant2-app", "user": {"email": "tenant2@example.com", "tenant": "tenant2"},
         "keys": [{"id": "k-tenant2", "quotas": [{"rpm": 100}]}]},
    ]), "k-tenant1", "k-tenant2")
    ok(client(gw, "k-tenant1"))
    message = denied(lambda: ok(client(gw, "k-tenant2")))
    # the class of rule, never the policy's text or id
    assert message == "denied by policy: no policy permits this request"
    assert "tenant1" not in message


def test_policy_edits_apply_without_a_restart_and_a_broken_one_is_refused(
        gateway: Callable[..., Gateway]) -> None:
    gw = gateway(scenario({"tenant1": MULTI_TENANT}, [
        {"id": "tenant2-app", "user": {"tenant": "tenant2"}, "keys": [{"id": "k-tenant2"}]},
    ]), "k-tenant2")
    c = client(gw, "k-tenant2")
    denied(lambda: ok(c))
    doc = yaml.safe_load(gw.manifest_path.read_text())
    doc["policies"][0]["text"] = MULTI_TENANT.replace('"tenant1"', '"tenant2"')
    gw.write_manifest(doc)
    eventually(lambda: ok(c))
    doc["policies"][0]["text"] = 'permit (principal, action, resource) when { principal.oops };'
    gw.write_manifest(doc)
    log = gw.manifest_path.parent / "logs" / "services.log"
    eventually(lambda: "policies[0] ('tenant1'): does not validate" in log.read_text())
    ok(c)  # the last good policies stay in force


def eventually(check: Callable[[], Any], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check() is not False:
                return
        except (openai.APIStatusError, AssertionError):
            pass
        assert time.monotonic() < deadline, "did not happen in time"
        time.sleep(0.1)


def test_enterprise_gateway(gateway: Callable[..., Gateway]) -> None:
    gw = gateway(scenario({"departments": ENTERPRISE}, [
        {"id": "eng", "user": {"tenant": "engineering"}, "keys": [{"id": "k-eng"}]},
        {"id": "research", "user": {"tenant": "research"}, "keys": [{"id": "k-research"}]},
        {"id": "marketing", "user": {"tenant": "marketing"}, "keys": [{"id": "k-marketing"}]},
    ]), "k-eng", "k-research", "k-marketing")
    for key in ("k-eng", "k-research"):
        c = client(gw, key)
        ok(c, "gpt-4o")
        c.embeddings.create(model="text-embedding-3-small", input="hello")
    client(gw, "k-eng").responses.create(model="gpt-4o", input="hi")  # full access
    denied(lambda: client(gw, "k-research").responses.create(model="gpt-4o", input="hi"))
    denied(lambda: ok(client(gw, "k-marketing")))


def test_development_team_model_restriction(gateway: Callable[..., Gateway]) -> None:
    def messages_are_completions(doc: dict[str, Any]) -> None:
        for r in doc["routes"]:
            if r["path"] == "/v1/messages":
                r["action"] = "completion"
    gw = gateway(scenario({"dev-team": DEVELOPMENT}, [
        {"id": "dev", "user": {"email": "dev@team.com", "tenant": "engineering"},
         "keys": [{"id": "k-dev", "quotas": [{"rpm": 200}]}]},
    ], messages_are_completions), "k-dev")
    c = client(gw, "k-dev")
    ok(c, "gpt-4o-mini")
    denied(lambda: ok(c, "gpt-4o"))
    denied(lambda: c.embeddings.create(model="text-embedding-3-small", input="x"))
    haiku = anthropic.Anthropic(base_url=gw.url, api_key=gw.issued["k-dev"], max_retries=0)
    haiku.messages.create(model="claude-3-haiku-20240307", max_tokens=10,
                          messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(anthropic.PermissionDeniedError) as e:
        haiku.messages.create(model="claude-haiku", max_tokens=10,
                              messages=[{"role": "user", "content": "hi"}])
    assert isinstance(e.value.body, dict)
    assert e.value.body["error"]["code"] == "policy_denied"


def test_production_service_account_ip_range(gateway: Callable[..., Gateway]) -> None:
    def behind_a_load_balancer(doc: dict[str, Any]) -> None:
        doc["gateway"]["trusted_proxy_hops"] = 1
    gw = gateway(scenario({"production": PRODUCTION}, [
        {"id": "prod-app", "user": {"email": "app@example.com", "tenant": "production",
                                    "is_agent": True},
         "keys": [{"id": "k-prod", "quotas": [{"rpm": 1000}]}]},
        {"id": "operator", "user": {"email": "ops@example.com", "tenant": "production"},
         "keys": [{"id": "k-human"}]},
    ], behind_a_load_balancer), "k-prod", "k-human")
    ok(client(gw, "k-prod"), **{"x-forwarded-for": "10.20.30.40"})
    denied(lambda: ok(client(gw, "k-prod"), **{"x-forwarded-for": "192.168.1.5"}))
    denied(lambda: ok(client(gw, "k-prod")))  # the load balancer's own address: 127.0.0.1
    denied(lambda: ok(client(gw, "k-human"), **{"x-forwarded-for": "10.20.30.40"}))


def ledger_spend(gw: Gateway, key: str) -> Decimal:
    db = sqlite3.connect(gw.manifest_path.parent / "state" / "ledger.db")
    try:
        rows = db.execute("SELECT cost FROM tollway_ledger WHERE key_id = ? AND cost IS NOT "
                          "NULL", (key,)).fetchall()
    finally:
        db.close()
    return sum((Decimal(c) for (c,) in rows), Decimal(0))


def test_a_cedar_spend_cap_takes_effect_once_the_ledger_passes_it(
        gateway: Callable[..., Gateway]) -> None:
    cap = Decimal("0.0005")  # about eight requests
    policy = ('permit (principal, action, resource) when { principal.status == "active" && '
              f'principal.current_daily_spend.lessThan(decimal("{cap}")) }};')
    gw = gateway(scenario({"daily-cap": policy}, [
        {"id": "capped", "keys": [{"id": "k-capped"}]}]), "k-capped")
    c = client(gw, "k-capped")
    allowed = 0
    deadline = time.monotonic() + 30
    while True:
        assert time.monotonic() < deadline, f"never capped; ledger {ledger_spend(gw, 'k-capped')}"
        try:
            ok(c, "gpt-5.4-mini")  # priced on the harness's rate card
            allowed += 1
        except openai.PermissionDeniedError as e:
            assert isinstance(e.body, dict) and e.body["code"] == "policy_denied"
            break
    assert ledger_spend(gw, "k-capped") >= cap, "refused before the ledger reached the cap"
    assert allowed >= 7
    denied(lambda: ok(c, "gpt-5.4-mini"))  # and it stays refused
    out = gw.run_cli("explain", "--", "--key", "k-capped", "--model", "gpt-5.4-mini")
    assert out.returncode == 3, out.stderr
    assert "DENY → 403 policy_denied: denied by policy: no policy permits this request" \
        in out.stdout
    today = out.stdout.split("spend today ")[1].split()[0]
    assert Decimal(today) == ledger_spend(gw, "k-capped") >= cap


def test_roles_allowed_per_model(gateway: Callable[..., Gateway]) -> None:
    def rules(doc: dict[str, Any]) -> None:
        project = doc["organizations"][-1]["projects"][0]
        project["policies"] = {"enabled": False}
        project["model_rules"] = [{"models": ["gpt-4o"], "roles_allowed": ["admin", "member"]},
                                  {"models": ["gpt-4o-mini"]}]
        doc["organizations"][-1]["quotas"] = [{"requests_per_day": 1000,
                                               "requests_per_month": 10000}]
    gw = gateway(scenario({}, [
        {"id": "alice", "user": {"email": "alice@acme.com", "role": "admin"},
         "keys": [{"id": "k-alice"}]},
        {"id": "victor", "user": {"email": "victor@acme.com", "role": "viewer"},
         "keys": [{"id": "k-victor"}]},
    ], rules), "k-alice", "k-victor")
    ok(client(gw, "k-alice"), "gpt-4o")
    ok(client(gw, "k-victor"), "gpt-4o-mini")
    message = denied(lambda: ok(client(gw, "k-victor"), "gpt-4o"), "model_not_allowed")
    assert "role 'viewer'" in message
    # no rule names the model: default deny
    denied(lambda: client(gw, "k-alice").embeddings.create(model="text-embedding-3-small",
                                                           input="x"), "model_not_allowed")


def test_no_policy_text_leaks_into_the_ledger_or_response_headers(
        gateway: Callable[..., Gateway]) -> None:
    gw = gateway(scenario({"tenant1": MULTI_TENANT}, [
        {"id": "other", "user": {"tenant": "other"}, "keys": [{"id": "k-other"}]}]), "k-other")
    r = client(gw, "k-other").chat.completions.with_raw_response
    with pytest.raises(openai.PermissionDeniedError) as e:
        r.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
    assert e.value.response.headers["x-tollway-error"] == "policy_denied"
    assert "tenant1" not in e.value.response.text
