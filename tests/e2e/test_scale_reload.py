"""Ten thousand projects, edited under load: what an operator of a big tenant list does daily.

The gateway serves a manifest of 101 organizations (10,000 projects of 100 each, plus the
base manifest's) while twenty requests a second flow through the OpenAI SDK, with no retries
so that nothing is hidden. An edit of one project's rpm reaches the running services with the
other 100 organizations taken as they were compiled, and the new limit counts the requests
made before it. A broken edit is refused and the last good manifest stays in force; the
edit that mends it is written gzip-compressed, as a ConfigMap holds a big manifest. Then
every request is in the ledger, each served one at the tokens and the price of the provider's
own bill. How long each reload took is printed, not asserted: bench/reload.py measures it.
"""

from __future__ import annotations

import re
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from .harness import run_gateway, wait_until
from .test_live_routes import RATE, Load
from .test_metering import wait_for_rows
from .test_provider_bill import provider_price

pytestmark = pytest.mark.e2e

ORGS, PROJECTS = 100, 100
ASK: Any = [{"role": "user", "content": "hi"}]


def ten_thousand_projects(doc: dict[str, Any]) -> None:
    """100 organizations of 100 projects, each with an rpm and a monthly budget; project p7 of
    org42 also holds the key k-big, and its rpm is the one the test edits."""
    for o in range(ORGS):
        doc["organizations"].append({"id": f"org{o}", "projects": [
            {"id": f"p{p}", "quotas": [{"name": "team", "rpm": 1000},
                                       {"name": "budget", "spend_per_month": 10**9}]}
            for p in range(PROJECTS)]})
    big_project(doc)["clients"] = [{"id": "big-app", "keys": [{"id": "k-big"}]}]


def big_project(doc: dict[str, Any]) -> dict[str, Any]:
    project: dict[str, Any] = doc["organizations"][1 + 42]["projects"][7]
    assert project["id"] == "p7"
    return project


def ask(client: openai.OpenAI) -> tuple[str, dict[str, str]]:
    """One request: its request id, and the response's headers (the 429's for a refusal)."""
    try:
        raw = client.chat.completions.with_raw_response.create(model="gpt-5.4-mini",
                                                               messages=ASK)
    except openai.RateLimitError as e:
        return e.response.headers["x-request-id"], dict(e.response.headers)
    return raw.headers["x-request-id"], dict(raw.headers)


def test_ten_thousand_projects_edited_under_load(tmp_path: Path) -> None:
    docs: list[dict[str, Any]] = []

    def mutate(doc: dict[str, Any]) -> None:
        ten_thousand_projects(doc)
        docs.append(doc)

    started = time.monotonic()
    with run_gateway(tmp_path, mutate=mutate) as gw:
        print(f"\ngateway of {ORGS * PROJECTS:,} projects ready in "
              f"{time.monotonic() - started:.1f} s")
        doc = docs[0]
        big = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=gw.issue("k-big"), max_retries=0)
        quota = big_project(doc)["quotas"][0]
        refused: list[str] = []  # request ids the rate limit refused

        before = [ask(big) for _ in range(2)]
        assert [h["x-ratelimit-limit-requests"] for _, h in before] == ["1000"] * 2
        with Load(gw, gw.issue("k-main")) as load:
            wait_until(lambda: len(load.results) >= RATE, "load before the edit")

            quota["rpm"] = 3
            line = gw.reload(doc)
            assert f"(1 of {ORGS + 1} organizations compiled" in line
            third = ask(big)  # the third in the minute: the two before the edit count
            assert (third[1]["x-ratelimit-limit-requests"],
                    third[1]["x-ratelimit-remaining-requests"]) == ("3", "0")
            rid, headers = ask(big)
            assert headers["x-tollway-error"] == "rate_limit_exceeded", headers
            refused.append(rid)

            # a problem in one of the 100 other organizations: refused, the last good kept
            other = doc["organizations"][1 + 17]["projects"][3]["quotas"][0]
            other["rpm"] = -5
            told = gw.reload(doc, "manifest refused")
            assert re.search(r"organizations\[18\]\.projects\[3\]\.quotas\[0\]\.rpm",
                             told[:2000]), told[:2000]
            rid, headers = ask(big)
            assert headers["x-tollway-error"] == "rate_limit_exceeded", headers
            refused.append(rid)

            other["rpm"] = 1000  # mended, the edited project given room again, and written
            quota["rpm"] = 10     # gzip-compressed, as a ConfigMap holds a big manifest
            line = gw.reload(doc, packed=True)
            assert f"(1 of {ORGS + 1} organizations compiled" in line
            renderer = gw.manifest_path.parent / "logs" / "renderer.log"
            wait_until(lambda: renderer.read_text().count("manifest reloaded") >= 2,
                       "the renderer reloading the gzip")  # Envoy's files come from it too
            after = [ask(big) for _ in range(2)]
            assert all(h["x-ratelimit-limit-requests"] == "10" and "x-tollway-error" not in h
                       for _, h in after), after
            seen = len(load.results)
            wait_until(lambda: len(load.results) >= seen + RATE, "load after the edits")

        failures = [r for r in load.results if r[1] != "ok"]
        assert not failures, f"{len(failures)} of {len(load.results)} failed: {failures[:3]}"
        served_big = [rid for rid, _ in [*before, third, *after]]
        served = {rid for _, _, rid in load.results if rid} | set(served_big)
        bill: dict[str, dict[str, Any]] = httpx.get(f"{gw.mock_url}/_mock/bill").json()
        rows = wait_for_rows(gw, served | set(refused), timeout=30)
        for rid in served:
            row, b = rows[rid], bill[rid]
            assert row["status"] == 200 and not row["estimated"], row
            assert (row["input_tokens"], row["output_tokens"]) == (b["input_tokens"],
                                                                   b["output_tokens"])
            assert Decimal(row["cost"]) == provider_price(b["model"], b["path"], b)
        for rid in refused:
            assert rid not in bill
            assert (rows[rid]["status"], rows[rid]["project"]) == (429, "p7"), rows[rid]
        big_rows = [rows[rid] for rid in served_big]
        assert all((r["org"], r["project"], r["key_id"]) == ("org42", "p7", "k-big")
                   for r in big_rows), big_rows
        print(f"{len(load.results)} requests at {RATE}/s during three edits, none failed; "
              f"{len(served)} served and {len(refused)} refused, each in the ledger at the "
              "provider's bill")
