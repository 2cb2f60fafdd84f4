"""The gateway end to end: the real Envoy, the real SDKs, the mock provider."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest
import yaml

from .harness import PROVIDER_KEY, Gateway, run_gateway

pytestmark = pytest.mark.e2e

MESSAGES: list[Any] = [{"role": "user", "content": "Say hello"}]


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    with run_gateway(tmp_path_factory.mktemp("gw")) as g:
        for key_id in ("k-main", "k-suspend", "k-revoke", "k-expire", "k-rotate", "k-reload",
                       "k-mini"):
            g.issue(key_id)
        yield g


def oai(gw: Gateway, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gw.url}/v1", api_key=key, max_retries=0, timeout=10)


def claude(gw: Gateway, key: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=gw.url, api_key=key, max_retries=0, timeout=10)


def chat(client: openai.OpenAI, model: str = "gpt-5.4-mini") -> Any:
    """A call to repeat while polling."""
    return lambda: client.chat.completions.create(model=model, messages=MESSAGES)


def expect_within(seconds: float, call: Any, exc: type[openai.APIStatusError],
                  code: str) -> None:
    """Poll until `call` raises `exc` with `code`; fail if that takes longer than `seconds`
    counted from now (i.e. from the moment the CLI command returned)."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            call()
        except exc as e:
            assert e.code == code, e.body
            return
        assert time.monotonic() < deadline, f"no {code} within {seconds}s"
        time.sleep(0.02)


def succeed_within(seconds: float, call: Any, refused: type[openai.APIStatusError]) -> None:
    """Poll until `call` succeeds while it is still refused with `refused`."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            call()
            return
        except refused:
            assert time.monotonic() < deadline, f"still refused after {seconds}s"
            time.sleep(0.02)


def test_completion_swaps_the_credential(gw: Gateway) -> None:
    key = gw.issued["k-main"]
    raw = oai(gw, key).chat.completions.with_raw_response.create(model="gpt-5.4-mini",
                                                                 messages=MESSAGES)
    completion = raw.parse()
    assert completion.choices[0].message.content
    assert completion.usage is not None and completion.usage.completion_tokens == 12
    seen = gw.seen()[-1]
    assert seen["authorization"] == f"Bearer {PROVIDER_KEY}"
    assert key not in str(seen["headers"]) and key.split(".")[1] not in str(seen["headers"])
    assert PROVIDER_KEY not in str(dict(raw.headers))


def test_streamed_completion(gw: Gateway) -> None:
    stream = oai(gw, gw.issued["k-main"]).chat.completions.create(
        model="gpt-5.4", messages=MESSAGES, stream=True,
        stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.split() == ["tok"] * 12
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 12
    assert gw.seen()[-1]["stream"] is True


def test_embeddings_and_responses(gw: Gateway) -> None:
    client = oai(gw, gw.issued["k-main"])
    assert len(client.embeddings.create(model="gpt-5.4-mini", input=["a", "b"]).data) == 2
    assert client.responses.create(model="gpt-5.4", input="hi").output_text


def test_anthropic_messages_json_and_stream(gw: Gateway) -> None:
    key = gw.issued["k-main"]
    client = claude(gw, key)
    msg = client.messages.create(model="claude-haiku", max_tokens=5, messages=MESSAGES)
    assert msg.usage.output_tokens == 5
    seen = gw.seen()[-1]
    assert seen["x-api-key"] == PROVIDER_KEY and seen["authorization"] is None
    with client.messages.stream(model="claude-opus", max_tokens=64, messages=MESSAGES) as s:
        final = s.get_final_message()
    assert final.usage.output_tokens == 12
    assert key not in str(gw.seen()[-1]["headers"])


def test_a_key_issued_while_running_works_on_its_first_request(gw: Gateway) -> None:
    doc = yaml.safe_load(gw.manifest_path.read_text())
    assert any(k["id"] == "k-never-issued" for k in
               doc["organizations"][0]["projects"][0]["clients"][0]["keys"])
    key = gw.issue("k-never-issued")  # in the manifest since start, issued only now
    oai(gw, key).chat.completions.create(model="gpt-5.4-mini", messages=MESSAGES)


def test_unknown_key_and_wrong_secret_are_401(gw: Gateway) -> None:
    for bad in ("nobody.secret", "k-main.wrong-secret", "k-unissued.whatever", "garbage"):
        with pytest.raises(openai.AuthenticationError) as e:
            oai(gw, bad).chat.completions.create(model="gpt-5.4-mini", messages=MESSAGES)
        assert e.value.code == "invalid_api_key"
    with pytest.raises(anthropic.AuthenticationError):
        claude(gw, "k-main.wrong").messages.create(model="claude-haiku", max_tokens=5,
                                                   messages=MESSAGES)
    r = httpx.post(f"{gw.url}/v1/chat/completions", json={"model": "gpt-5.4-mini"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


def test_suspended_then_resumed(gw: Gateway) -> None:
    client = oai(gw, gw.issued["k-suspend"])
    client.chat.completions.create(model="gpt-5.4-mini", messages=MESSAGES)
    gw.cli("keys", "suspend", "--", "k-suspend")
    expect_within(1.0, chat(client),
                  openai.PermissionDeniedError, "key_suspended")
    gw.cli("keys", "resume", "--", "k-suspend")
    succeed_within(1.0, chat(client), openai.PermissionDeniedError)


def test_revocation_reaches_the_running_gateway_within_a_second(gw: Gateway) -> None:
    client = oai(gw, gw.issued["k-revoke"])
    client.chat.completions.create(model="gpt-5.4-mini", messages=MESSAGES)
    gw.cli("keys", "revoke", "--", "k-revoke")
    expect_within(1.0, chat(client),
                  openai.PermissionDeniedError, "key_revoked")
    with pytest.raises(anthropic.PermissionDeniedError):
        claude(gw, gw.issued["k-revoke"]).messages.create(model="claude-haiku", max_tokens=5,
                                                          messages=MESSAGES)


def test_expired_key_is_403(gw: Gateway) -> None:
    client = oai(gw, gw.issued["k-expire"])
    client.chat.completions.create(model="gpt-5.4-mini", messages=MESSAGES)
    gw.cli("keys", "expire", "--", "k-expire")
    expect_within(1.0, chat(client),
                  openai.PermissionDeniedError, "key_expired")


def test_rotation_keeps_the_old_secret_during_grace(gw: Gateway) -> None:
    old = gw.issued["k-rotate"]
    new = gw.cli("keys", "rotate", "--", "k-rotate", "--grace", "1h")
    succeed_within(1.0, chat(oai(gw, new)), openai.AuthenticationError)
    oai(gw, old).chat.completions.create(model="gpt-5.4-mini", messages=MESSAGES)
    newest = gw.cli("keys", "rotate", "--", "k-rotate")  # no grace: the older ones stop
    expect_within(1.0, chat(oai(gw, new)),
                  openai.AuthenticationError, "invalid_api_key")
    oai(gw, newest).chat.completions.create(model="gpt-5.4-mini", messages=MESSAGES)


def test_model_outside_the_allowlist_is_403(gw: Gateway) -> None:
    client = oai(gw, gw.issued["k-mini"])
    client.chat.completions.create(model="gpt-5.4-mini", messages=MESSAGES)
    for model in ("gpt-5.4", "not-a-model", "claude-haiku"):
        with pytest.raises(openai.PermissionDeniedError) as e:
            client.chat.completions.create(model=model, messages=MESSAGES)
        assert e.value.code == "model_not_allowed"
    with pytest.raises(anthropic.PermissionDeniedError) as ae:
        claude(gw, gw.issued["k-mini"]).messages.create(model="claude-opus", max_tokens=5,
                                                        messages=MESSAGES)
    assert ae.value.body["error"]["code"] == "model_not_allowed"  # type: ignore[index]


def post(gw: Gateway, path: str, content: bytes, **headers: str) -> httpx.Response:
    h = {"authorization": f"Bearer {gw.issued['k-main']}", "content-type": "application/json",
         **headers}
    return httpx.post(f"{gw.url}{path}", content=content, headers=h, timeout=10)


@pytest.mark.parametrize("body", [b'{"model":', b"not json", b"[1,2]", b'{"messages": []}',
                                  b'{"model": 42}', b'{"model": "gpt-5.4", "stream": "yes"}',
                                  b'{"model": "gpt-5.4", "max_tokens": -1}',
                                  b'{"model": "gpt-5.4\xff\xfe"}', b""])
def test_malformed_bodies_are_400_in_the_provider_shape(gw: Gateway, body: bytes) -> None:
    r = post(gw, "/v1/chat/completions", body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["type"] == "invalid_request_error"
    r = post(gw, "/v1/messages", body, **{"x-api-key": gw.issued["k-main"],
                                          "authorization": ""})
    assert r.status_code == 400, r.text
    assert r.json()["type"] == "error"
    assert r.json()["error"]["type"] == "invalid_request_error"


def test_malformed_json_raises_the_sdk_bad_request(gw: Gateway) -> None:
    with pytest.raises(openai.BadRequestError):
        oai(gw, gw.issued["k-main"]).chat.completions.create(
            model="gpt-5.4-mini", messages=MESSAGES, extra_body={"stream": "not-a-bool"})


def test_oversized_body_is_413_in_the_provider_shape(gw: Gateway) -> None:
    big = b'{"model": "gpt-5.4", "messages": [{"role": "user", "content": "' + b"x" * 200_000 \
        + b'"}]}'
    r = post(gw, "/v1/chat/completions", big)
    assert r.status_code == 413
    assert r.json()["error"]["code"] == "request_too_large"


def test_absurd_headers_get_4xx_not_5xx(gw: Gateway) -> None:
    body = b'{"model": "gpt-5.4-mini", "messages": []}'
    assert post(gw, "/v1/chat/completions", body,
                authorization="Bearer " + "k" * 5000 + ".x").status_code == 401
    assert post(gw, "/v1/chat/completions", body,
                authorization="Basic dXNlcjpwYXNz").status_code == 401
    r = post(gw, "/v1/chat/completions", body, **{"x-filler": "y" * 100_000})
    assert 400 <= r.status_code < 500
    assert post(gw, "/v1/nope", body).status_code == 404


def test_client_cannot_assert_identity_headers(gw: Gateway) -> None:
    body = b'{"model": "gpt-5.4-mini", "messages": []}'
    assert post(gw, "/v1/chat/completions", body, **{"x-tollway-org": "evil",
                                                     "x-tollway-key-id": "k-admin"}
                ).status_code == 200
    headers = gw.seen()[-1]["headers"]
    assert not any(h.startswith("x-tollway-") for h in headers)


def test_client_cannot_choose_the_request_id(gw: Gateway) -> None:
    """The ledger is idempotent on the request id and holds are keyed by it: a client that
    could repeat one would have its later requests go unrecorded."""
    body = b'{"model": "gpt-5.4-mini", "messages": []}'
    ids = []
    for _ in range(2):
        r = post(gw, "/v1/chat/completions", body, **{"x-request-id": "chosen-by-client"})
        assert r.status_code == 200
        ids.append(gw.seen()[-1]["request_id"])
    assert "chosen-by-client" not in ids and len(set(ids)) == 2


def test_identity_headers_only_where_the_provider_asks_for_them(gw: Gateway) -> None:
    """The anthropic provider of the test manifest sets identity_headers: true."""
    body = b'{"model": "claude-haiku", "max_tokens": 5, "messages": []}'
    r = post(gw, "/v1/messages", body, **{"x-api-key": gw.issued["k-main"], "authorization": "",
                                          "x-tollway-org": "evil"})
    assert r.status_code == 200, r.text
    headers = gw.seen()[-1]["headers"]
    assert headers["x-tollway-org"] == "acme" and headers["x-tollway-key-id"] == "k-main"
    assert headers["x-tollway-project"] == "team-ai" and headers["x-tollway-client"] == "app"
    assert not any(h.startswith("x-tollway-") for h in r.headers)


def test_manifest_edit_takes_effect_and_a_broken_one_is_refused(gw: Gateway) -> None:
    client = oai(gw, gw.issued["k-reload"])
    client.chat.completions.create(model="gpt-5.4-mini", messages=MESSAGES)
    doc = yaml.safe_load(gw.manifest_path.read_text())
    original = yaml.safe_dump(doc)
    keys = doc["organizations"][0]["projects"][0]["clients"][0]["keys"]
    next(k for k in keys if k["id"] == "k-reload")["status"] = "suspended"
    try:
        gw.write_manifest(doc)
        expect_within(5.0, chat(client),
                      openai.PermissionDeniedError, "key_suspended")
        gw.manifest_path.write_text("providers: [")  # broken: the last good one stays
        log = Path(gw.manifest_path).parent / "logs" / "services.log"
        deadline = time.monotonic() + 5.0
        while "manifest refused, keeping the previous one in force" not in log.read_text():
            assert time.monotonic() < deadline, "the broken manifest was not refused"
            time.sleep(0.05)
        with pytest.raises(openai.PermissionDeniedError):
            client.chat.completions.create(model="gpt-5.4-mini", messages=MESSAGES)
    finally:
        gw.manifest_path.write_text(original)
    succeed_within(5.0, chat(client), openai.PermissionDeniedError)


def test_revocation_through_postgres_listen_notify(tmp_path: Path, drop_schema: str,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.conftest import PG_DSN

    dsn = f"{PG_DSN}?options=-csearch_path%3D{drop_schema}"

    def schema(doc: dict[str, Any]) -> None:
        doc["storage"]["keys"] = "env:TOLLWAY_TEST_KEYS_DSN"

    monkeypatch.setenv("TOLLWAY_TEST_KEYS_DSN", dsn)
    _create_schema(drop_schema)
    with run_gateway(tmp_path, mutate=schema) as g:
        key = g.issue("k-revoke")
        client = oai(g, key)
        client.chat.completions.create(model="gpt-5.4-mini", messages=MESSAGES)
        g.cli("keys", "revoke", "--", "k-revoke")
        expect_within(1.0, chat(client),
                      openai.PermissionDeniedError, "key_revoked")


def _create_schema(name: str) -> None:
    import asyncio

    import asyncpg

    from tests.conftest import PG_DSN

    async def go() -> None:
        conn = await asyncpg.connect(PG_DSN)
        await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{name}"')
        await conn.close()
    asyncio.run(go())


def test_wrong_secrets_are_throttled_without_locking_the_holder_out(gw: Gateway) -> None:
    """Past 10 wrong secrets a minute for one key id, wrong ones get 429 (counted); the right
    secret passes all along."""
    import yaml

    key = gw.issued["k-mini"]  # a key no other test changes
    key_id, _ = key.split(".", 1)
    oai = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=key, max_retries=0)
    statuses = []
    for n in range(30):
        r = httpx.post(f"{gw.url}/v1/chat/completions",
                       json={"model": "gpt-5.4-mini", "messages": []},
                       headers={"authorization": f"Bearer {key_id}.guess{n}"})
        statuses.append((r.status_code, r.headers["x-tollway-error"]))
        if n % 5 == 0:  # the holder, in the middle of it
            oai.chat.completions.create(model="gpt-5.4-mini",
                                        messages=[{"role": "user", "content": "hi"}])
    assert statuses[:10] == [(401, "invalid_api_key")] * 10
    assert statuses[10:] == [(429, "too_many_failed_attempts")] * 20
    assert 1 <= int(r.headers["retry-after"]) <= 60
    metrics_port = yaml.safe_load(gw.manifest_path.read_text())["services"]["metrics_port"]
    text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics").text
    assert 'tollway_extauthz_wrong_secrets_total{result="throttled"} 20.0' in text
    collections = re.search(r'^tollway_gc_pause_seconds_count\{generation="0"\} ([0-9.]+)$',
                            text, re.M)
    assert collections and float(collections.group(1)) > 0  # each one measured
