"""The admin API over REST through the real Envoy (grpc_json_transcoder): clients and keys
created at runtime work with the real SDK within a second, hit their rpm and their budget,
are revoked over REST, every step is in the audit log, scopes hold, and a key holder lists its
models with `client.models.list()`. Plus reference 000's flow: a user created with tenant, rpm
and is_agent, decided on by a Cedar policy over those attributes."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import openai
import pytest

from .harness import Gateway, revoked_within, run_gateway, works_within

pytestmark = pytest.mark.e2e

ASK: list[Any] = [{"role": "user", "content": "hi"}]


def projects(doc: dict[str, Any]) -> None:
    doc["organizations"][0]["projects"] += [
        {"id": "selfserve", "models": ["gpt-5.4-mini", "gpt-5.4"]},
        {"id": "agents", "policies": {"enabled": True}}]
    doc["policies"] = [{"id": "humans-of-t1", "text": (
        'permit (principal, action, resource) when { principal.user.tenant == "t1" && '
        'principal.user.is_agent == false };')}]


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    with run_gateway(tmp_path_factory.mktemp("admin"), mutate=projects) as g:
        for token_id, scope in (("root", "*"), ("selfserve", "project:acme/selfserve"),
                                ("agents", "project:acme/agents")):
            g.issued[token_id] = g.cli("admin-tokens", "issue", "--", token_id, "--scope",
                                       scope)
        yield g


def api(gw: Gateway, token: str | None) -> httpx.Client:
    headers = {"authorization": f"Bearer {token}"} if token else {}
    return httpx.Client(base_url=f"{gw.url}/admin/v1", headers=headers, timeout=10)


def test_a_runtime_client_and_key_over_rest(gw: Gateway) -> None:
    admin = api(gw, gw.issued["selfserve"])
    r = admin.post("/orgs/acme/projects/selfserve/clients", json={
        "id": "dana", "name": "Dana", "metadata": {"team": "portal"},
        "user": {"email": "dana@example.com", "tenant": "t1", "role": "dev",
                 "is_agent": False}})
    assert r.status_code == 200, r.text
    assert r.json()["client"]["user"]["email"] == "dana@example.com"

    r = admin.post("/clients/dana/keys", json={
        "id": "rk-dana", "models": ["gpt-5.4-mini"],
        "quotas": [{"name": "dana-rpm", "rpm": 3}]})
    assert r.status_code == 200, r.text
    created = time.monotonic()
    secret = r.json()["secret"]
    assert secret.startswith("rk-dana.")
    assert admin.get("/keys/rk-dana").json()["secret"] == ""  # shown once

    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=secret, max_retries=0)
    works_within(1.0 - (time.monotonic() - created), lambda: client.chat.completions.create(
        model="gpt-5.4-mini", messages=ASK))
    # the key's own allowlist, from its document
    with pytest.raises(openai.PermissionDeniedError):
        client.chat.completions.create(model="gpt-5.4", messages=ASK)
    assert [m.id for m in client.models.list()] == ["gpt-5.4-mini"]
    # the key's own limits, with the key itself
    usage = httpx.get(f"{gw.url}/v1/tollway/usage", headers={
        "authorization": f"Bearer {secret}"})
    assert usage.status_code == 200, usage.text
    assert usage.json()["key_id"] == "rk-dana"
    [rpm] = [q for q in usage.json()["limits"] if q["quota"] == "dana-rpm"]
    assert rpm["limit"] == "3" and rpm["used"] == "1"
    assert httpx.get(f"{gw.url}/v1/tollway/usage",
                     headers={"authorization": "Bearer rk-dana.wrong"}).status_code == 401

    client.chat.completions.create(model="gpt-5.4-mini", messages=ASK)
    client.chat.completions.create(model="gpt-5.4-mini", messages=ASK)
    with pytest.raises(openai.RateLimitError) as limited:  # the 4th within the minute
        client.chat.completions.create(model="gpt-5.4-mini", messages=ASK)
    assert "dana-rpm" in str(limited.value)

    r = admin.post("/keys/rk-dana:revoke", json={"reason": "left the team"})
    assert r.status_code == 200 and r.json()["status"] == "revoked"
    revoked_within(1.0, lambda: client.chat.completions.create(model="gpt-5.4-mini",
                                                                messages=ASK))

    entries = admin.get("/audit", params={"target": "rk-dana"}).json()["entries"]
    assert [e["action"] for e in entries] == ["revoke", "issue"]
    assert {e["actor"] for e in entries} == {"admin:selfserve"}
    assert all(e["source"] for e in entries)
    assert entries[1]["after"]["key"]["quotas"][0]["rpm"] == 3
    everything = json.dumps(admin.get("/audit", params={"limit": 1000}).json())
    assert secret.split(".", 1)[1] not in everything
    created_client = admin.get("/audit", params={"kind": "client", "target": "dana"}).json()
    assert [e["action"] for e in created_client["entries"]] == ["create"]


def test_a_runtime_budget_is_402(gw: Gateway) -> None:
    admin = api(gw, gw.issued["root"])
    assert admin.post("/orgs/acme/projects/selfserve/clients",
                      json={"id": "thrifty"}).status_code == 200
    r = admin.post("/clients/thrifty/keys", json={
        "id": "rk-thrifty", "quotas": [{"name": "pennies", "spend_per_day": "0.00002"}]})
    assert r.status_code == 200, r.text
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=r.json()["secret"],
                           max_retries=0)

    def over_budget() -> None:
        client.chat.completions.create(model="gpt-5.4", max_tokens=1000, messages=ASK)
    with pytest.raises(openai.APIStatusError) as refused:
        works_within(1.0, over_budget)
    assert refused.value.status_code == 402
    assert refused.value.response.headers["x-tollway-error"] == "budget_exceeded"


def test_admin_errors_say_what_is_wrong(gw: Gateway) -> None:
    scoped = api(gw, gw.issued["selfserve"])
    assert api(gw, None).get("/clients/dana").status_code == 401
    assert api(gw, "root.not-the-secret").get("/clients/dana").status_code == 401
    # a project admin cannot reach another project
    r = scoped.post("/orgs/acme/projects/team-ai/clients", json={"id": "intruder"})
    assert r.status_code == 403 and "may not act on acme/team-ai" in r.text
    assert api(gw, gw.issued["agents"]).get("/clients/dana").status_code in (403, 404)
    assert scoped.get("/keys/no-such-key").status_code == 404
    assert scoped.post("/orgs/acme/projects/nowhere/clients", json={"id": "x"}
                       ).status_code == 404
    assert scoped.post("/orgs/acme/projects/selfserve/clients", json={"id": "dup"}
                       ).status_code == 200
    assert scoped.post("/orgs/acme/projects/selfserve/clients", json={"id": "dup"}
                       ).status_code == 409
    # the manifest's own ids are taken too
    assert api(gw, gw.issued["root"]).post("/orgs/acme/projects/team-ai/clients",
                                           json={"id": "app"}).status_code == 409
    r = scoped.post("/clients/dup/keys", json={"id": "rk-bad", "quotas": [{"rpm": "many"}]})
    assert r.status_code == 400 and "key.quotas[0].rpm" in r.text
    r = scoped.post("/clients/dup/keys", json={"id": "rk-bad", "models": ["gpt-9"]})
    assert r.status_code == 400 and "unknown model 'gpt-9'" in r.text
    r = scoped.post("/orgs/acme/projects/selfserve/clients",
                    json={"id": "bad", "user": {"is_agent": "maybe"}})
    assert r.status_code == 400 and "client.user.is_agent" in r.text


def test_reference_000_a_user_with_tenant_rpm_and_is_agent_meets_a_policy(gw: Gateway
                                                                          ) -> None:
    """Reference 000 creates users with email, name, tenant, limitRequestsPerMinute and
    isAgent; its Cedar policies then decide on those attributes."""
    admin = api(gw, gw.issued["agents"])
    keys = {}
    for name, is_agent in (("human", False), ("robot", True)):
        r = admin.post("/orgs/acme/projects/agents/clients", json={
            "id": f"u-{name}", "name": name.title(),
            "user": {"email": f"{name}@t1.example", "tenant": "t1", "is_agent": is_agent}})
        assert r.status_code == 200, r.text
        r = admin.post(f"/clients/u-{name}/keys", json={
            "id": f"rk-{name}", "quotas": [{"rpm": 100}]})
        assert r.status_code == 200, r.text
        keys[name] = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=r.json()["secret"],
                                   max_retries=0)
    works_within(1.0, lambda: keys["human"].chat.completions.create(model="gpt-5.4-mini",
                                                                   messages=ASK))
    # the Anthropic SDK lists the models of the Anthropic routes in its own shape
    claude = anthropic.Anthropic(base_url=gw.url, api_key=keys["human"].api_key,
                                 max_retries=0)
    assert [m.id for m in claude.models.list()] == ["claude-haiku", "claude-opus"]
    deadline = time.monotonic() + 1.0
    while True:
        try:
            keys["robot"].chat.completions.create(model="gpt-5.4-mini", messages=ASK)
            raise AssertionError("the policy admitted an agent")
        except openai.PermissionDeniedError as e:
            if e.code == "policy_denied":
                break
        except openai.AuthenticationError:
            pass  # not in the mirror yet
        assert time.monotonic() < deadline
        time.sleep(0.02)

    # suspending the client (the user) refuses every key it holds
    assert admin.post("/clients/u-human:suspend", json={}).status_code == 200
    works = keys["human"]
    deadline = time.monotonic() + 1.0
    while True:
        try:
            works.chat.completions.create(model="gpt-5.4-mini", messages=ASK)
        except openai.PermissionDeniedError as e:
            assert e.code == "key_suspended"
            break
        assert time.monotonic() < deadline
        time.sleep(0.02)


def test_the_cli_works_through_the_admin_api(gw: Gateway) -> None:
    env = {**gw.env, "TOLLWAY_ADMIN_TOKEN": gw.issued["selfserve"]}

    def tollway(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "tollway.cli", *args], env=env,
                              capture_output=True, text=True, timeout=30)
    made = tollway("clients", "create", "cli-user", "--project", "acme/selfserve",
                   "--server", gw.url, "--spec", '{"user": {"tenant": "t1"}}')
    assert made.returncode == 0, made.stderr
    issued = tollway("keys", "issue", "rk-cli", "--client", "cli-user", "--server", gw.url,
                     "--spec", '{"models": ["gpt-5.4-mini"]}')
    assert issued.returncode == 0 and issued.stdout.startswith("rk-cli."), issued.stderr
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=issued.stdout.strip(),
                           max_retries=0)
    works_within(1.0, lambda: client.chat.completions.create(model="gpt-5.4-mini",
                                                            messages=ASK))
    listed = tollway("clients", "keys", "cli-user", "--server", gw.url)
    assert [k["id"] for k in json.loads(listed.stdout)["keys"]] == ["rk-cli"]
    assert tollway("keys", "suspend", "rk-cli", "--server", gw.url).returncode == 0
    refused = tollway("clients", "create", "x", "--project", "acme/team-ai", "--server",
                      gw.url)
    assert refused.returncode == 1 and "403 out_of_scope" in refused.stderr
    audit = gw.cli("audit", "--", "--target", "rk-cli", "--format", "json")
    assert [e["action"] for e in json.loads(audit)] == ["suspend", "issue"]
