"""Budgets end to end: holds keep 64 concurrent clients inside an enforced budget, the SDK sees
402 budget_exceeded only when spend really leaves no room (429 budget_in_flight while requests
in flight hold the rest), monitor budgets only report, an alert threshold fires once."""

from __future__ import annotations

import json
import re
import sqlite3
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

import openai
import pytest

from tests.conftest import REDIS_URL

from .harness import Gateway, redis_counters_for, run_gateway

pytestmark = pytest.mark.e2e

BUDGET = Decimal("0.01")  # USD per day
# the most one request below can cost: its body (under 200 bytes) at the input price plus
# max_tokens=10 at the output price of gpt-5.4-mini
MAX_HOLD = (200 * Decimal("0.75") + 10 * Decimal("4.50")) / 1_000_000
SMALL = Decimal("0.05")  # the sequential client's daily budget
# Envoy's own answer when the Check came too late, and extauthz's when it saw that itself
LATE_CHECK_MESSAGES = {"the gateway cannot authorize requests right now",
                       "authorization took too long; retry"}


class Webhook(BaseHTTPRequestHandler):
    received: list[dict[str, Any]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["content-length"]))
        Webhook.received.append(json.loads(body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        return None


@pytest.fixture(scope="module")
def hook() -> Iterator[str]:
    server = HTTPServer(("127.0.0.1", 0), Webhook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/alerts"
    server.shutdown()


@pytest.fixture(scope="module", params=["memory", "redis"])
def gw(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
       hook: str) -> Iterator[Gateway]:
    """The same budgets on the in-process counters and on the real Redis."""
    counters = "memory" if request.param == "memory" else REDIS_URL
    if request.param == "redis":
        redis_counters_for("acme")
    Webhook.received.clear()

    def mutate(doc: dict[str, Any]) -> None:
        doc["storage"]["counters"] = counters
        doc["gateway"]["alert_webhook"] = hook
        doc["organizations"][0]["projects"] += [
            {"id": "tight", "quotas": [{"name": "daily-cap", "spend_per_day": str(BUDGET),
                                        "alerts": [0.5, 0.9]},
                                       {"name": "per-minute", "rpm": 100000}],
             "clients": [{"id": "tight-app", "keys": [{"id": "k-tight"}]}]},
            {"id": "watched", "quotas": [{"name": "soft-cap", "spend_per_day": "0.0001",
                                          "enforcement": "monitor"}],
             "clients": [{"id": "watched-app", "keys": [{"id": "k-watched"}]}]},
            {"id": "small", "quotas": [{"name": "small-cap", "spend_per_day": str(SMALL)}],
             "clients": [{"id": "small-app", "keys": [{"id": "k-small"}]}]},
        ]
    with run_gateway(tmp_path_factory.mktemp("budgets"), mutate=mutate) as g:
        g.issue("k-tight")
        g.issue("k-watched")
        g.issue("k-small")
        yield g


def project_spend(gw: Gateway, project: str) -> tuple[Decimal, int]:
    db = sqlite3.connect(gw.manifest_path.parent / "state" / "ledger.db")
    try:
        rows = db.execute("SELECT cost FROM tollway_ledger WHERE project = ? AND status = 200",
                          (project,)).fetchall()
    finally:
        db.close()
    return sum((Decimal(c) for (c,) in rows), Decimal(0)), len(rows)


def daily_cap(gw: Gateway) -> dict[str, Any]:
    usage = json.loads(gw.cli("usage", "--", "--key", "k-tight", "--format", "json"))
    return next(x for x in usage["limits"] if x["name"] == "spend_per_day")


def wait_for_ledger(gw: Gateway, admitted: int) -> None:
    """Until every admitted request is in the ledger and its hold has become its cost. A
    hold left behind would outlive the deadline: it expires only after the route's timeout
    plus a minute. Each poll starts the CLI, seconds on a machine busy enough."""
    deadline = time.monotonic() + 60
    while True:
        logged, held = project_spend(gw, "tight")[1], Decimal(daily_cap(gw)["held"])
        if logged >= admitted and held == 0:
            return
        assert time.monotonic() < deadline, \
            f"{logged} of {admitted} admitted requests in the ledger, {held} USD still held"
        time.sleep(0.05)


def client(gw: Gateway, key_id: str, retries: int = 0) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gw.url}/v1", api_key=gw.issued[key_id],
                         max_retries=retries)


def ask(c: openai.OpenAI) -> None:
    c.chat.completions.create(model="gpt-5.4-mini", max_tokens=10,
                              messages=[{"role": "user", "content": "Say hello."}])


def test_64_concurrent_clients_stay_within_the_budget(gw: Gateway) -> None:
    ok: list[int] = []
    refusals: list[openai.APIStatusError] = []

    def run(_: int) -> None:
        # as real clients do (the SDK's default): retry a 503 that 64 clients plus Envoy and
        # every service on two cores can cause; a 402 is final and never retried
        c = client(gw, "k-tight", retries=2)
        for _ in range(40):
            try:
                ask(c)
                ok.append(1)
            except openai.APIStatusError as e:
                refusals.append(e)
                if len(refusals) > 200:
                    return
    with ThreadPoolExecutor(64) as pool:
        list(pool.map(run, range(64)))

    assert refusals, "the budget never refused"
    # 402 when spend leaves no room; 429 while what is left is held by requests in flight;
    # and, when two cores shared by 64 clients, Envoy, every service and the mock fall behind,
    # 503 where Envoy stopped waiting for a Check (even after the SDK's two retries): never a
    # refusal of any other kind or message
    shapes = {(e.status_code, e.body["code"] if isinstance(e.body, dict) else None)
              for e in refusals}
    assert shapes <= {(402, "budget_exceeded"), (429, "budget_in_flight"),
                      (503, "gateway_unavailable")}, shapes
    late_checks = {e.body["message"] for e in refusals
                   if e.status_code == 503 and isinstance(e.body, dict)}
    assert late_checks <= LATE_CHECK_MESSAGES, late_checks
    # (on a machine that slow, every refusal can be a 429 or a 503: holds of requests still in
    # flight fill the budget until the clients give up; the sequential client below meets 402)

    # every admitted request reaches the ledger, and together they stay within the budget
    wait_for_ledger(gw, len(ok))
    assert project_spend(gw, "tight")[0] <= BUDGET
    # holds are released as the real (smaller) costs arrive: one client now uses what is left,
    # until not even one more request's maximum cost fits
    c = client(gw, "k-tight")
    for _ in range(200):
        try:
            ask(c)
            ok.append(1)
        except openai.APIStatusError as e:
            assert e.status_code == 402, e
            assert isinstance(e.body, dict) and "tight/daily-cap" in e.body["message"]
            break
    else:
        pytest.fail("the budget never refused the sequential client")
    wait_for_ledger(gw, len(ok))
    spent, count = project_spend(gw, "tight")
    assert count == len(ok)
    # the documented bound: never over the budget; and used to within one request's hold
    assert spent <= BUDGET
    assert spent > BUDGET - MAX_HOLD, f"refused with {spent} of {BUDGET} spent"

    # what reference 001 shows its customers: each limit, what is left, when it resets
    usage = json.loads(gw.cli("usage", "--", "--key", "k-tight", "--format", "json"))
    limits = {x["name"]: x for x in usage["limits"]}
    assert Decimal(usage["spent_today"]) == spent
    cap = limits["spend_per_day"]
    assert (cap["scope"], cap["quota"], cap["limit"]) == ("project:tight", "daily-cap", "0.01")
    assert Decimal(cap["used"]) == spent and Decimal(cap["held"]) == 0
    assert Decimal(cap["remaining"]) == BUDGET - spent
    assert 0 < cap["resets_in_seconds"] <= 86400
    rpm = limits["rpm"]
    # every admitted request counted once; plus, rarely under this load, one whose rate-limit
    # answer came after Envoy's 0.5 s timeout: Envoy refused it (503 RLSE), and the charge may
    # have been made or not, as Envoy's cancel reached the service before or after it
    # (documented: rate limits err towards refusing)
    late = sum(1 for line in (gw.manifest_path.parent / "state" / "envoy-access.jsonl")
               .read_text().splitlines() if json.loads(line)["flags"] == "RLSE")
    assert len(ok) <= int(rpm["used"]) <= len(ok) + late, (rpm, len(ok), late)
    assert int(rpm["remaining"]) == 100000 - int(rpm["used"])
    assert 0 < rpm["resets_in_seconds"] <= 61
    table = gw.cli("usage", "--", "--key", "k-tight")
    assert "spend_per_day 0.01 USD" in table and "daily-cap" in table


def test_a_sequential_client_is_refused_only_when_spend_leaves_no_room(gw: Gateway) -> None:
    """Nothing in flight: the previous request's hold settles within moments of its answer,
    so it never refuses the next one; the first 402 comes when the ledger's spend plus this
    request's hold passes the budget, not before."""
    c = client(gw, "k-small", retries=2)  # the SDK's default: a 429 is retried after Retry-After
    prompt = "word " * 400  # ~2 KB
    in_flight_refusals = 0
    for n in range(1000):
        try:
            r = c.chat.completions.with_raw_response.create(
                model="gpt-5.4-mini", max_tokens=12,
                messages=[{"role": "user", "content": prompt}])
            in_flight_refusals += int(r.retries_taken > 0)
        except openai.APIStatusError as e:
            assert e.status_code == 402, (n, e.status_code, e.message)
            refusal = str(e.message)
            break
    else:
        pytest.fail("the budget never refused")
    hold = Decimal(re.search(r"may cost up to ([0-9.]+)", refusal).group(1))  # type: ignore[union-attr]
    said_spent = Decimal(re.search(r"spent ([0-9.]+)", refusal).group(1))  # type: ignore[union-attr]
    deadline = time.monotonic() + 10
    while project_spend(gw, "small")[1] < n:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    spent, count = project_spend(gw, "small")
    assert count == n and spent == said_spent
    assert spent + hold > SMALL, f"402 at {spent} spent + {hold} held of {SMALL}"
    assert spent <= SMALL
    # what was once seen: a 402 at 29 % of the budget, refused by the finished requests' holds
    assert spent > SMALL - hold
    # those holds settle while the next Check waits (0.3 s); without that wait about one
    # request in twelve got a 429 here. A few are tolerated: two cores under a test suite
    assert in_flight_refusals <= 3, in_flight_refusals
    print(f"sequential client: {n} requests, first 402 at {spent} of {SMALL} "
          f"(hold {hold}); requests retried after a 429: {in_flight_refusals}")


def test_alert_thresholds_fire_once_each(gw: Gateway) -> None:
    deadline = time.monotonic() + 10
    while len(Webhook.received) < 2:
        assert time.monotonic() < deadline, f"alerts: {Webhook.received}"
        time.sleep(0.05)
    assert sorted(a["threshold"] for a in Webhook.received) == ["0.5", "0.9"]
    assert {a["quota"] for a in Webhook.received} == {"daily-cap"}
    assert all(a["limit"] == "0.01" and a["currency"] == "USD" for a in Webhook.received)


def test_a_monitor_budget_reports_but_never_refuses(gw: Gateway) -> None:
    c = client(gw, "k-watched")
    for _ in range(10):
        ask(c)
    deadline = time.monotonic() + 10
    while project_spend(gw, "watched")[1] < 10:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert project_spend(gw, "watched")[0] > Decimal("0.0001")
    log = (gw.manifest_path.parent / "logs" / "services.log").read_text()
    # logged once for the period, not once a request
    assert log.count("watched/soft-cap spend_per_day would refuse key k-watched (monitor)") == 1
