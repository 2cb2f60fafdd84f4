"""No served request missing from the ledger, none recorded twice: under steady load, costsink
is killed with -9 and kept down for 10 s, then Envoy itself is restarted. Envoy's gRPC access
log drops what it cannot send; its access-log file, reconciled by request id, brings it back.
Services run apart (costsink in a process of its own) on a Redis of the test's own."""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import httpx
import pytest
import yaml

from .harness import Gateway, run_split_gateway, wait_until
from .test_metering import ledger

pytestmark = pytest.mark.e2e

RATE = 20  # requests per second, as the issue measured


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    def mutate(doc: dict[str, Any]) -> None:
        doc["organizations"][0]["projects"][0]["quotas"] = [
            {"name": "monthly", "spend_per_month": "1000"}, {"name": "fast", "rpm": 100000}]
    with run_split_gateway(tmp_path_factory.mktemp("durable"), mutate) as g:
        yield g


class Load:
    """RATE requests a second from one client until stopped; keeps the id of every request
    the gateway served (answered 200)."""

    def __init__(self, gw: Gateway) -> None:
        self.gw, self.served, self.failed = gw, [], 0
        self.refusals: Counter[str] = Counter()  # status: body, for the failure message
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run)

    def run(self) -> None:
        h = {"authorization": f"Bearer {self.gw.issued['k-main']}"}
        with httpx.Client(timeout=5) as c:
            n, started = 0, time.monotonic()
            while not self.stop.is_set():
                n += 1
                body = {"model": "gpt-5.4-mini", "max_tokens": 5 + n % 7, "stream": n % 2 == 0,
                        "messages": [{"role": "user", "content": "word " * (n % 40 + 1)}]}
                try:
                    r = c.post(f"{self.gw.url}/v1/chat/completions", json=body, headers=h)
                    if r.status_code == 200:
                        self.served.append(r.headers["x-request-id"])
                    else:
                        self.failed += 1
                        self.refusals[f"{r.status_code}: {r.text[:200]}"] += 1
                except httpx.TransportError:
                    self.failed += 1  # Envoy restarting: not served
                # paced, not racing: the next request's time on a fixed schedule
                time.sleep(max(0.0, started + n / RATE - time.monotonic()))


def recovered_from_file(gw: Gateway) -> int:
    log = (gw.manifest_path.parent / "logs" / "costsink.log").read_text()
    return sum(int(line.split("recorded ")[1].split()[0]) for line in log.splitlines()
               if "the gRPC access log did not deliver" in line)


def restart_envoy(gw: Gateway) -> None:
    port = yaml.safe_load(gw.manifest_path.read_text())["gateway"]["admin_port"]
    gw.named["envoy"].terminate()
    gw.named["envoy"].wait(timeout=20)
    gw.start("envoy")

    def ready() -> bool:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=0.5) as r:
            return bool(r.status == 200)
    wait_until(ready, "envoy after a restart", proc=gw.named["envoy"])


def test_no_served_request_is_lost_or_doubled(gw: Gateway) -> None:
    # the gateway answers before the schedule starts (a busy machine may take a moment)
    h = {"authorization": f"Bearer {gw.issued['k-main']}"}

    def serves() -> bool:
        try:
            return httpx.post(f"{gw.url}/v1/chat/completions", headers=h, timeout=5, json={
                "model": "gpt-5.4-mini", "messages": [{"role": "user", "content": "hi"}]}
            ).status_code == 200
        except httpx.HTTPError:
            return False
    wait_until(serves, "a first served request")
    load = Load(gw)
    load.thread.start()
    try:
        time.sleep(2)  # steady load first (a schedule, not a race: the load runs meanwhile)
        gw.kill("costsink")
        down_from = len(load.served)
        time.sleep(10)
        served_while_down = len(load.served) - down_from
        gw.start("costsink")
        time.sleep(3)
        restart_envoy(gw)
        time.sleep(2)
    finally:
        load.stop.set()
        load.thread.join()
    served = set(load.served)
    assert len(served) == len(load.served) > 300 and served_while_down > 150, \
        load.refusals.most_common(3)

    deadline = time.monotonic() + 40
    while not served <= set(rows := ledger(gw)):
        assert time.monotonic() < deadline, f"{len(served - set(rows))} served requests " \
                                            f"missing from the ledger of {len(served)}"
        time.sleep(0.2)
    # once each (the request id is the ledger's key), with its real usage
    assert all(rows[rid]["status"] == 200 and rows[rid]["input_tokens"] > 0
               and not rows[rid]["estimated"] for rid in served)
    # the outage really was filled from the file (said once the rows are durable: poll)
    deadline = time.monotonic() + 10
    while (recovered := recovered_from_file(gw)) < served_while_down:
        assert time.monotonic() < deadline, f"{recovered} recovered of {served_while_down}"
        time.sleep(0.1)

    # and spend counted each once: the counters equal the ledger
    want = sum((Decimal(r["cost"]) for r in rows.values() if r["cost"]), Decimal(0))
    deadline = time.monotonic() + 10
    while True:
        out = gw.run_cli("usage", "--", "--key", "k-main", "--format", "json")
        got = Decimal(json.loads(out.stdout)["spent_this_month"]) if out.returncode == 0 else None
        if got == want:
            break
        assert time.monotonic() < deadline, f"counters {got}, ledger {want}"
        time.sleep(0.2)
    print(f"\nserved {len(served)} ({served_while_down} while costsink was down), "
          f"{load.failed} not served (Envoy restarting), {recovered} recovered from the file, "
          "0 lost, 0 doubled")


def test_state_files_are_private(gw: Gateway) -> None:
    """Keys, ledger, spool, pepper, checkpoints and Envoy's access log: 0600 in 0700."""
    state = gw.manifest_path.parent / "state"
    found = list(state.rglob("*"))
    assert any(p.name == "ledger.db" for p in found) and any(p.name == "keys.db" for p in found)
    assert any(p.name == "envoy-access.jsonl" for p in found)
    for p in [state, *found]:
        want = 0o700 if p.is_dir() else 0o600
        assert p.stat().st_mode & 0o777 == want, f"{p}: {oct(p.stat().st_mode & 0o777)}"
