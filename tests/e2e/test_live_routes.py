"""A manifest edit changes a route on a running Envoy, under load, with no failed request.

The gateway runs as in a pod: Envoy follows the files that `tollway render --dir --watch`
re-renders. Twenty requests a second flow through the OpenAI SDK (no retries, so nothing is
hidden) while the chat route moves to another provider, then while a broken manifest is
written. Every request must succeed; the new route must take traffic; Envoy must neither
restart nor replace its listener for a route edit (which would drain connections).
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml

from .harness import PROVIDER_KEY, Gateway, envoy_stat, free_port, run_gateway, tcp_open, wait_until

pytestmark = pytest.mark.e2e

RATE = 20  # requests per second


@pytest.fixture()
def second_mock(tmp_path: Path) -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "tollway.mock_provider", "--port", str(port),
                             "--expected-key", PROVIDER_KEY], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: tcp_open(port), "second mock provider", proc=proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


class Load:
    """RATE requests a second on one keep-alive client, each one's outcome kept."""

    def __init__(self, gw: Gateway, key: str) -> None:
        self.client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=key, max_retries=0,
                                    timeout=10)
        self.results: list[tuple[float, str, str | None]] = []  # sent at, outcome, request id
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        next_at = time.monotonic()
        while not self.stop.is_set():
            sent = time.monotonic()
            try:
                raw = self.client.chat.completions.with_raw_response.create(
                    model="gpt-5.4-mini", messages=[{"role": "user", "content": "hi"}])
                self.results.append((sent, "ok", raw.headers.get("x-request-id")))
            except Exception as e:  # every failure is kept and reported
                self.results.append((sent, f"{type(e).__name__}: {e}", None))
            next_at += 1 / RATE
            self.stop.wait(max(0.0, next_at - time.monotonic()))

    def __enter__(self) -> Load:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        self.thread.join(timeout=15)


def test_route_edit_under_load_fails_no_request(tmp_path: Path, second_mock: str) -> None:
    port_b = int(second_mock.rsplit(":", 1)[1])

    def mutate(doc: dict[str, Any]) -> None:
        first = doc["providers"][0]
        doc["providers"].append({**first, "name": "openai-b",
                                 "upstream": {"host": "127.0.0.1", "port": port_b}})
        doc["rate_card"]["prices"] += [{**p, "provider": "openai-b"}
                                       for p in doc["rate_card"]["prices"]
                                       if p["provider"] == "openai"]

    with run_gateway(tmp_path, mutate=mutate) as gw:
        key = gw.issue("k-main")
        admin_port = yaml.safe_load(gw.manifest_path.read_text())["gateway"]["admin_port"]
        envoy_pid = gw.named["envoy"].pid
        doc = yaml.safe_load(gw.manifest_path.read_text())

        def reached_b(rid: str | None) -> bool:
            return bool(rid) and bool(httpx.get(f"{second_mock}/_mock/seen",
                                                params={"request_id": rid}).json())

        with Load(gw, key) as load:
            wait_until(lambda: len(load.results) >= RATE, "load before the edit")
            assert not any(reached_b(rid) for _, _, rid in load.results[:5])

            for route in doc["routes"]:
                if route["path"] == "/v1/chat/completions":
                    route["provider"] = "openai-b"
            edited_at = time.monotonic()
            gw.write_manifest(doc)
            wait_until(lambda: any(reached_b(rid) for _, _, rid in load.results[-3:]),
                       "the chat route moving to openai-b", timeout=10)
            switched = time.monotonic() - edited_at

            # a manifest that does not load changes nothing, on Envoy as on the services
            gw.manifest_path.write_text("version: 1\nroutes: [unclosed\n")
            wait_until(lambda: "manifest refused" in (tmp_path / "logs" / "renderer.log")
                       .read_text(), "the renderer refusing the broken manifest")
            seen = len(load.results)
            wait_until(lambda: len(load.results) >= seen + RATE, "load after the refusal")

        failures = [r for r in load.results if r[1] != "ok"]
        assert not failures, f"{len(failures)} of {len(load.results)} failed: {failures[:3]}"
        assert all(reached_b(rid) for _, _, rid in load.results[-RATE:])
        assert gw.named["envoy"].pid == envoy_pid and gw.named["envoy"].poll() is None
        # a route edit replaced the route table, never the listener (no connection drained)
        assert envoy_stat(admin_port, "listener_manager.listener_modified") == 0
        assert envoy_stat(admin_port, "http.tollway.rds.tollway.update_success") >= 2
        print(f"{len(load.results)} requests at {RATE}/s, none failed; route switched "
              f"{switched:.2f} s after the edit")
