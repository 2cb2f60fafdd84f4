"""`tollway simulate` on a ledger the real gateway recorded: tightening an rpm and a budget,
and widening an allowlist, is reported request by request as the gateway would have answered."""

from __future__ import annotations

import copy
import json
import sqlite3
import subprocess
import sys
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import openai
import pytest
import yaml

from .harness import run_gateway

pytestmark = pytest.mark.e2e

ASK: list[Any] = [{"role": "user", "content": "hi"}]


def ledger_rows(state: Path, n: int) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 15
    while True:
        if (state / "ledger.db").exists():
            db = sqlite3.connect(state / "ledger.db")
            db.row_factory = sqlite3.Row
            rows = [dict(r) for r in db.execute(
                "SELECT * FROM tollway_ledger WHERE key_id IS NOT NULL ORDER BY at, request_id")]
            db.close()
            if len(rows) >= n:
                return rows
        assert time.monotonic() < deadline, "the ledger did not receive every request"
        time.sleep(0.05)


def test_simulate_tightening_an_rpm_and_a_budget(tmp_path: Path) -> None:
    with run_gateway(tmp_path) as gw:
        main = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=gw.issue("k-main"),
                             max_retries=0)
        mini = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=gw.issue("k-mini"),
                             max_retries=0)
        for _ in range(10):  # well within one minute
            main.chat.completions.create(model="gpt-5.4-mini", messages=ASK)
        for _ in range(5):
            mini.chat.completions.create(model="gpt-5.4-mini", messages=ASK)
        with pytest.raises(openai.PermissionDeniedError):  # not on k-mini's allowlist
            mini.chat.completions.create(model="gpt-5.4", messages=ASK)
        rows = ledger_rows(tmp_path / "state", 16)

        doc = yaml.safe_load(gw.manifest_path.read_text())
        proposed = copy.deepcopy(doc)
        keys = proposed["organizations"][0]["projects"][0]["clients"][0]["keys"]
        mini_costs = [Decimal(r["cost"]) for r in rows if r["key_id"] == "k-mini"
                      and r["cost"] is not None]
        cap = mini_costs[0] + mini_costs[1]  # room for exactly two of its requests
        for key in keys:
            if key["id"] == "k-main":
                key["quotas"] = [{"name": "main-rpm", "rpm": 4}]
            if key["id"] == "k-mini":
                key["models"] = ["gpt-5.4-mini", "gpt-5.4"]
                key["quotas"] = [{"name": "mini-budget", "spend_per_day": str(cap)}]
        path = tmp_path / "proposed.yaml"
        path.write_text(yaml.safe_dump(proposed))
        out = gw.run_cli("simulate", "--", "--format", "json")  # the current manifest first
        assert out.returncode == 0, out.stderr
        unchanged = json.loads(out.stdout)
        assert unchanged["keys"]["k-main"]["newly_refused"] == {}
        assert unchanged["keys"]["k-mini"]["refused_then"] == 1

        run = subprocess.run([sys.executable, "-m", "tollway.cli", "simulate", "--manifest",
                              str(path), "--format", "json"], env=gw.env, capture_output=True,
                             text=True, timeout=60)
        assert run.returncode == 0, run.stderr
        report = json.loads(run.stdout)

    main_tally, mini_tally = report["keys"]["k-main"], report["keys"]["k-mini"]
    assert main_tally["requests"] == 10
    assert main_tally["newly_refused"] == {"rate_limit_exceeded": 6}
    main_costs = [Decimal(r["cost"]) for r in rows if r["key_id"] == "k-main"]
    assert Decimal(main_tally["blocked_spend"]) == sum(main_costs[4:], Decimal(0))
    # k-mini: two requests fit the budget, three no longer do; the gpt-5.4 request it was
    # refused would now pass the widened allowlist
    assert mini_tally["newly_refused"] == {"budget_exceeded": 3}
    assert Decimal(mini_tally["blocked_spend"]) == sum(mini_costs[2:], Decimal(0))
    assert mini_tally["newly_allowed"] == 1
    team = report["projects"]["acme/team-ai"]
    assert team["requests"] == 16 and team["refused_now"] == 9
