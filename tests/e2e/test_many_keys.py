"""More runtime keys than a process mirrors (storage.key_cache), through the real Envoy with
the services in separate processes, each with its own partial mirror: every key works, its own
rpm is enforced by the rate-limit service (which must fetch the key), the ledger names each
request's client (costsink fetches it too, for a refusal as well), a revocation of a key that
had been evicted is honoured, and an unknown key is still a 401."""

from __future__ import annotations

import re
import sqlite3
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml

from .harness import PrivateRedis, revoked_within, run_gateway, works_within

pytestmark = pytest.mark.e2e

ASK: list[Any] = [{"role": "user", "content": "hi"}]
KEYS = 8


def ledger(state: Path, n: int, deny_reason: str | None = None) -> list[sqlite3.Row]:
    """The ledger's rows of the rk keys, once it has `n` of them (of `deny_reason`)."""
    deadline = time.monotonic() + 15
    while True:
        if (state / "ledger.db").exists():
            db = sqlite3.connect(state / "ledger.db")
            db.row_factory = sqlite3.Row
            rows = db.execute("SELECT * FROM tollway_ledger WHERE key_id LIKE 'rk%' "
                              "ORDER BY at").fetchall()
            db.close()
            if len([r for r in rows if deny_reason in (None, r["deny_reason"])]) >= n:
                return rows
        assert time.monotonic() < deadline, f"the ledger has not {n} rows"
        time.sleep(0.05)


def test_more_runtime_keys_than_the_mirror_holds(tmp_path: Path) -> None:
    redis = PrivateRedis(tmp_path)
    redis.start()

    def mutate(doc: dict[str, Any]) -> None:
        doc["storage"]["key_cache"] = 3
        doc["storage"]["counters"] = redis.url

    try:
        with run_gateway(tmp_path, mutate=mutate, split=True) as gw:
            main = openai.OpenAI(base_url=f"{gw.url}/v1", max_retries=0,
                                 api_key=gw.issue("k-main"))
            token = gw.cli("admin-tokens", "issue", "--", "root", "--scope", "*")
            admin = httpx.Client(base_url=f"{gw.url}/admin/v1", timeout=10,
                                 headers={"authorization": f"Bearer {token}"})
            r = admin.post("/orgs/acme/projects/team-ai/clients", json={"id": "many"})
            assert r.status_code == 200, r.text
            clients = []
            for i in range(KEYS):
                r = admin.post("/clients/many/keys", json={
                    "id": f"rk{i}", "quotas": [{"name": "rk-rpm", "rpm": 2}]})
                assert r.status_code == 200, r.text
                clients.append(openai.OpenAI(base_url=f"{gw.url}/v1", max_retries=0,
                                             api_key=r.json()["secret"]))
            for c in clients:  # each pass evicts every key from every process's mirror
                works_within(1.0, lambda c=c: c.chat.completions.create(
                    model="gpt-5.4-mini", messages=ASK))
            for c in clients:
                c.chat.completions.create(model="gpt-5.4-mini", messages=ASK)
            # a manifest key's record lives in the store too, and was evicted with the rest
            main.chat.completions.create(model="gpt-5.4-mini", messages=ASK)
            with pytest.raises(openai.RateLimitError) as limited:  # rk0's own rpm
                clients[0].chat.completions.create(model="gpt-5.4-mini", messages=ASK)
            assert "rk-rpm" in str(limited.value)

            rows = ledger(tmp_path / "state", 2 * KEYS + 1)
            assert {(r["org"], r["project"], r["client"]) for r in rows} \
                == {("acme", "team-ai", "many")}
            assert sorted(r["key_id"] for r in rows if r["status"] == 200) \
                == sorted(f"rk{i}" for i in range(KEYS) for _ in range(2))
            assert [r["key_id"] for r in rows if r["status"] == 429] == ["rk0"]

            listed = admin.get("/clients/many/keys").json()["keys"]
            assert [k["id"] for k in listed] == sorted(f"rk{i}" for i in range(KEYS))

            # rk1 was used long ago (evicted); its revocation must still be honoured
            assert admin.post("/keys/rk1:revoke", json={}).status_code == 200
            revoked_within(1.0, lambda: clients[1].chat.completions.create(
                model="gpt-5.4-mini", messages=ASK))
            # refused by extauthz, the entry names only the key: costsink fetches its owner
            [refused] = [r for r in ledger(tmp_path / "state", 1, "key_revoked")
                         if r["deny_reason"] == "key_revoked"]
            assert (refused["key_id"], refused["client"], refused["project"]) \
                == ("rk1", "many", "team-ai")
            stranger = openai.OpenAI(base_url=f"{gw.url}/v1", max_retries=0,
                                     api_key="rk99.not-a-secret")
            with pytest.raises(openai.AuthenticationError):
                stranger.chat.completions.create(model="gpt-5.4-mini", messages=ASK)

            port = yaml.safe_load(gw.manifest_path.read_text())["services"]["metrics_port"]
            metrics = httpx.get(f"http://127.0.0.1:{port}/metrics").text
            assert re.search(r"^tollway_keystore_mirror_complete 0\.0$", metrics, re.M)
            held = re.search(r"^tollway_keystore_keys ([0-9.]+)$", metrics, re.M)
            assert held and float(held.group(1)) <= 3
    finally:
        redis.kill()
