"""One decision, two callers: for every way the gateway refuses a request, `tollway explain`
answers the same status and error code as the real gateway does at the same moment."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from .harness import Gateway, run_gateway

pytestmark = pytest.mark.e2e


def scenarios(doc: dict[str, Any]) -> None:
    def project(pid: str, key: str, client: dict[str, Any] | None = None,
                **extra: Any) -> dict[str, Any]:
        return {"id": pid, **extra, "clients": [
            {"id": f"c-{pid}", **(client or {}), "keys": [{"id": key}]}]}
    doc["organizations"][0]["projects"] += [
        project("rules", "k-role", {"user": {"role": "dev"}}, model_rules=[
            {"models": ["gpt-5.4"], "roles_allowed": ["admin"]},
            {"models": ["gpt-5.4-mini"]}]),
        project("governed", "k-policy", {"user": {"tenant": "nope"}},
                policies={"enabled": True}),
        project("capped", "k-capped", quotas=[{"name": "pennies",
                                               "spend_per_day": "0.00002"}]),
        project("limited", "k-limited", quotas=[{"name": "one-a-minute", "rpm": 1}]),
        project("frozen", "k-frozen", status="suspended"),
    ]
    doc["policies"] = [{"id": "tenant-ok", "text": 'permit (principal, action, resource) '
                        'when { principal.user.tenant == "ok" };'}]


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    with run_gateway(tmp_path_factory.mktemp("parity"), mutate=scenarios) as g:
        for key_id in ("k-main", "k-suspend", "k-revoke", "k-expire", "k-mini", "k-role",
                       "k-policy", "k-capped", "k-limited", "k-frozen"):
            g.issue(key_id)
        g.cli("keys", "suspend", "--", "k-suspend")
        g.cli("keys", "revoke", "--", "k-revoke")
        g.cli("keys", "expire", "--", "k-expire")
        yield g


def gateway_answer(gw: Gateway, key: str, model: str, path: str, max_tokens: int
                   ) -> tuple[int, str]:
    headers = {"authorization": f"Bearer {key}"}
    if path == "/v1/messages":
        headers = {"x-api-key": key, "anthropic-version": "2023-06-01"}
    r = httpx.post(f"{gw.url}{path}", headers=headers, timeout=10, json={
        "model": model, "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": "hi"}]})
    return r.status_code, r.headers.get("x-tollway-error", "")


def explain_answer(gw: Gateway, key_id: str, model: str, path: str, max_tokens: int
                   ) -> tuple[int, str]:
    out = gw.run_cli("explain", "--", "--key", key_id, "--model", model, "--path", path,
                     "--max-tokens", str(max_tokens), "--format", "json")
    assert out.returncode in (0, 3), out.stderr
    answer = json.loads(out.stdout)
    return answer["status"], answer["code"] or ""


# (key id, the key presented to the gateway or None for the issued one, model, path, expected)
CASES = [
    ("nobody", "nobody.secret", "gpt-5.4-mini", "/v1/chat/completions", (401, "invalid_api_key")),
    ("k-never-issued", "k-never-issued.x", "gpt-5.4-mini", "/v1/chat/completions",
     (401, "invalid_api_key")),
    ("k-suspend", None, "gpt-5.4-mini", "/v1/chat/completions", (403, "key_suspended")),
    ("k-revoke", None, "gpt-5.4-mini", "/v1/chat/completions", (403, "key_revoked")),
    ("k-expire", None, "gpt-5.4-mini", "/v1/chat/completions", (403, "key_expired")),
    ("k-frozen", None, "gpt-5.4-mini", "/v1/chat/completions", (403, "key_suspended")),
    ("k-mini", None, "gpt-5.4", "/v1/chat/completions", (403, "model_not_allowed")),
    # a model the route's provider does not serve, and one nobody serves
    ("k-main", None, "claude-haiku", "/v1/chat/completions", (403, "model_not_allowed")),
    ("k-main", None, "gpt-9", "/v1/chat/completions", (403, "model_not_allowed")),
    ("k-role", None, "gpt-5.4", "/v1/chat/completions", (403, "model_not_allowed")),
    ("k-policy", None, "gpt-5.4-mini", "/v1/chat/completions", (403, "policy_denied")),
    ("k-capped", None, "gpt-5.4", "/v1/chat/completions", (402, "budget_exceeded")),
    ("k-main", None, "gpt-5.4-mini", "/v1/chat/completions", (200, "")),
    ("k-main", None, "claude-haiku", "/v1/messages", (200, "")),
]


@pytest.mark.parametrize("key_id,presented,model,path,expected", CASES,
                         ids=[f"{c[0]}-{c[2]}-{c[4][1] or 'ok'}" for c in CASES])
def test_explain_answers_what_the_gateway_answers(gw: Gateway, key_id: str,
                                                  presented: str | None, model: str,
                                                  path: str, expected: tuple[int, str]) -> None:
    key = presented or gw.issued[key_id]
    explained = explain_answer(gw, key_id, model, path, 1000)
    served = gateway_answer(gw, key, model, path, 1000)
    assert explained == served == expected


def test_a_spent_rate_limit_is_explained_as_429(gw: Gateway) -> None:
    key = gw.issued["k-limited"]
    assert explain_answer(gw, "k-limited", "gpt-5.4-mini", "/v1/chat/completions", 10) \
        == (200, "")
    assert gateway_answer(gw, key, "gpt-5.4-mini", "/v1/chat/completions", 10) == (200, "")
    explained = explain_answer(gw, "k-limited", "gpt-5.4-mini", "/v1/chat/completions", 10)
    served = gateway_answer(gw, key, "gpt-5.4-mini", "/v1/chat/completions", 10)
    assert explained == served == (429, "rate_limit_exceeded")


def test_explain_says_whether_a_rate_limit_is_asked(gw: Gateway) -> None:
    """k-main's project has no quota: the gateway does not call ratelimit for it. k-limited's
    has an rpm (spent or not, by the test before: explain lists it either way)."""
    def steps(key_id: str) -> list[str]:
        out = gw.run_cli("explain", "--", "--key", key_id, "--model", "gpt-5.4-mini",
                         "--format", "json")
        assert out.returncode in (0, 3), out.stderr
        result: list[str] = json.loads(out.stdout)["steps"]
        return result
    assert "rate limits: none applies to this key and model (the gateway does not ask " \
           "ratelimit)" in steps("k-main")
    assert any(s.startswith("rate limit one-a-minute (rpm): ") for s in steps("k-limited"))


def test_explain_refuses_what_is_not_an_address(gw: Gateway) -> None:
    out = gw.run_cli("explain", "--", "--key", "k-main", "--model", "gpt-5.4-mini", "--ip",
                     "notanip")
    assert out.returncode == 1 and "'notanip' is not an IP address" in out.stderr
