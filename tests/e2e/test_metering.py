"""Metering end to end: what the provider reported is what the ledger holds, to the token and
to the exact decimal, for JSON and streams, both SDKs, and clients that hang up mid-stream."""

from __future__ import annotations

import random
import sqlite3
import time
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import anthropic
import httpx
import openai
import pytest

from .harness import Gateway, run_gateway

pytestmark = pytest.mark.e2e

PRICES = {  # the harness manifest's rate card, per million tokens
    "gpt-5.4-mini": (Decimal("0.75"), Decimal("4.50"), Decimal("0.075")),
    "gpt-5.4": (Decimal("2.50"), Decimal("15.00"), Decimal("0.25")),
    "claude-haiku": (Decimal("1.00"), Decimal("5.00"), Decimal("0.10")),
}


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    with run_gateway(tmp_path_factory.mktemp("metering")) as g:
        g.issue("k-main")
        yield g


def ledger(gw: Gateway) -> dict[str, dict[str, Any]]:
    """The ledger's rows by request id; a request id twice fails the test: the ledger's key is
    (start time, request id), so twins (the gRPC stream's entry and the file's line) that read
    different start times would be one request charged twice."""
    db = sqlite3.connect(gw.manifest_path.parent / "state" / "ledger.db")
    db.row_factory = sqlite3.Row
    try:
        rows = db.execute("SELECT * FROM tollway_ledger").fetchall()
    finally:
        db.close()
    by_id = {r["request_id"]: dict(r) for r in rows}
    twice = [r["request_id"] for r in rows if by_id[r["request_id"]]["at"] != r["at"]]
    assert len(by_id) == len(rows), f"requests in the ledger twice: {twice[:3]}"
    return by_id


def wait_for_rows(gw: Gateway, ids: set[str], timeout: float = 10.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        rows = ledger(gw) if (gw.manifest_path.parent / "state" / "ledger.db").exists() else {}
        if ids <= set(rows):
            return rows
        assert time.monotonic() < deadline, f"{len(ids - set(rows))} requests not in the ledger"
        time.sleep(0.05)


def expected_cost(model: str, dialect: str, u: dict[str, int]) -> Decimal | None:
    if model not in PRICES:
        return None
    pin, pout, pcached = PRICES[model]
    uncached = u["input"] - u["cached"] if dialect == "openai" else u["input"]
    return (uncached * pin + u["cached"] * pcached + u["output"] * pout) / Decimal(1_000_000)


def test_ledger_matches_provider_usage_exactly(gw: Gateway) -> None:
    key = gw.issued["k-main"]
    oai = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=key, max_retries=0, timeout=10)
    claude = anthropic.Anthropic(base_url=gw.url, api_key=key, max_retries=0, timeout=10)
    rng = random.Random(7)
    httpx.delete(f"{gw.mock_url}/_mock/seen")
    for i in range(200):
        prompt = "word " * rng.choice([3, 50, 1500])  # the long ones report cached tokens
        max_tokens = rng.choice([5, 12, 100])
        kind = i % 7
        if kind == 0:
            oai.chat.completions.create(model="gpt-5.4-mini", max_tokens=max_tokens,
                                        messages=[{"role": "user", "content": prompt}])
        elif kind == 1:  # the client did not ask for usage: the gateway asks for it
            list(oai.chat.completions.create(model="gpt-5.4", max_tokens=max_tokens,
                                             stream=True,
                                             messages=[{"role": "user", "content": prompt}]))
        elif kind == 2:
            list(oai.chat.completions.create(model="gpt-5.4-mini", stream=True,
                                             stream_options={"include_usage": True},
                                             messages=[{"role": "user", "content": prompt}]))
        elif kind == 3:
            oai.embeddings.create(model="gpt-5.4-mini", input=[prompt, "b"])
        elif kind == 4:
            oai.responses.create(model="gpt-5.4", input=prompt, max_output_tokens=max_tokens)
        elif kind == 5:
            claude.messages.create(model="claude-haiku", max_tokens=max_tokens,
                                   messages=[{"role": "user", "content": prompt}])
        else:
            with claude.messages.stream(model=rng.choice(["claude-haiku", "claude-opus"]),
                                        max_tokens=max_tokens,
                                        messages=[{"role": "user", "content": prompt}]) as s:
                s.get_final_message()
    seen = {s["request_id"]: s for s in gw.seen()}
    assert len(seen) == 200
    rows = wait_for_rows(gw, set(seen))
    priced = 0
    for rid, s in seen.items():
        row, u = rows[rid], s["usage"]
        dialect = "anthropic" if s["path"] == "/v1/messages" else "openai"
        assert (row["input_tokens"], row["output_tokens"], row["cached_input_tokens"]) == \
            (u["input"], u["output"], u["cached"]), (s["path"], s["stream"])
        want = expected_cost(s["model"], dialect, u)
        got = Decimal(row["cost"]) if row["cost"] is not None else None
        assert got == want, (s["model"], got, want)
        priced += want is not None
        assert row["status"] == 200 and row["key_id"] == "k-main"
        assert row["rate_card_version"] == "test-2026-11" and row["currency"] == "USD"
    assert priced > 150  # the unpriced claude-opus rows are recorded, not dropped
    unpriced = [r for r in rows.values() if r["model"] == "claude-opus"]
    assert unpriced and all(r["cost"] is None for r in unpriced)


def test_usage_chunk_added_for_the_client_is_passed_on(gw: Gateway) -> None:
    oai = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=gw.issued["k-main"], max_retries=0)
    chunks = list(oai.chat.completions.create(model="gpt-5.4-mini", stream=True,
                                              messages=[{"role": "user", "content": "hi"}]))
    assert chunks[-1].usage is not None and chunks[-1].choices == []


def test_a_client_that_hangs_up_mid_stream_is_recorded(gw: Gateway) -> None:
    body = {"model": "gpt-5.4", "stream": True, "max_tokens": 12,
            "messages": [{"role": "user", "content": "hi"}]}
    headers = {"authorization": f"Bearer {gw.issued['k-main']}"}
    with httpx.Client(timeout=10) as c, c.stream("POST", f"{gw.url}/v1/chat/completions",
                                                 json=body, headers=headers) as r:
        rid = r.headers["x-request-id"]
        next(r.iter_raw())  # read the first bytes, then hang up
    rows = wait_for_rows(gw, {rid})
    assert rows[rid]["key_id"] == "k-main" and rows[rid]["model"] == "gpt-5.4"


def test_refused_requests_are_recorded_with_the_reason(gw: Gateway) -> None:
    r = httpx.post(f"{gw.url}/v1/chat/completions", json={"model": "gpt-5.4"},
                   headers={"authorization": "Bearer k-main.wrong"})
    assert r.status_code == 401
    rows = wait_for_rows(gw, {r.headers["x-request-id"]})
    row = rows[r.headers["x-request-id"]]
    assert row["status"] == 401 and row["deny_reason"] == "invalid_api_key"
    assert row["cost"] is None and row["input_tokens"] == 0



def test_spend_report_sums_the_ledger_exactly(gw: Gateway) -> None:
    import json

    oai = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=gw.issued["k-main"], max_retries=0)
    r = oai.chat.completions.with_raw_response.create(
        model="gpt-5.4", max_tokens=7, messages=[{"role": "user", "content": "x"}])
    rows = wait_for_rows(gw, {r.headers["x-request-id"]})
    mine = [x for x in rows.values() if x["key_id"] == "k-main" and x["model"] == "gpt-5.4"]
    want = sum((Decimal(x["cost"]) for x in mine), Decimal(0))
    month = mine[0]["at"][:7]
    report = json.loads(gw.cli("spend", "--period", month, "--by", "key,model",
                               "--format", "json"))
    line = next(ln for ln in report if ln["key"] == "k-main" and ln["model"] == "gpt-5.4")
    assert Decimal(line["cost_usd"]) == want and want > 0
    assert line["requests"] == len(mine)
    assert line["output_tokens"] == sum(x["output_tokens"] for x in mine)
    table = gw.cli("spend", "--period", month, "--by", "model")
    assert "gpt-5.4" in table and "cost_usd" in table.splitlines()[0]
