"""Envoy's access-log file over long uptime: costsink gives back the disk space of what it has
reconciled (`gateway.access_log_keep_mb: 0` here) while the real Envoy goes on appending, and a
costsink that lost its checkpoint as well as the requests Envoy served meanwhile reads on past
the hole: every served request in the ledger once, no line misread."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from costsink.file_space import allocated_bytes

from .harness import Gateway, run_split_gateway, wait_until
from .test_metering import wait_for_rows

pytestmark = pytest.mark.e2e

MIB = 1 << 20


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    def mutate(doc: dict[str, Any]) -> None:
        doc["gateway"]["access_log_keep_mb"] = 0
    with run_split_gateway(tmp_path_factory.mktemp("space"), mutate) as g:
        yield g


def access_log(gw: Gateway) -> Path:
    return gw.manifest_path.parent / "state" / "envoy-access.jsonl"


def send(gw: Gateway, n: int) -> list[str]:
    """n requests from 8 clients at once; the ids of those served."""
    h = {"authorization": f"Bearer {gw.issued['k-main']}"}
    local = threading.local()

    def one(i: int) -> str | None:
        if not hasattr(local, "client"):
            local.client = httpx.Client(timeout=10)
        r = local.client.post(f"{gw.url}/v1/chat/completions", headers=h, json={
            "model": "gpt-5.4-mini", "max_tokens": 5,
            "messages": [{"role": "user", "content": f"request {i}"}]})
        return r.headers["x-request-id"] if r.status_code == 200 else None
    with ThreadPoolExecutor(8) as pool:
        return [rid for rid in pool.map(one, range(n)) if rid]


def test_the_reconciled_file_gives_its_space_back_and_nothing_is_lost(gw: Gateway) -> None:
    path = access_log(gw)
    served: list[str] = []
    deadline = time.monotonic() + 120
    while not path.exists() or path.stat().st_size < 2.2 * MIB:  # Envoy flushes every second
        assert time.monotonic() < deadline, "Envoy's access log did not reach 2.2 MiB"
        served += send(gw, 200)

    # costsink's reconciler, a second behind Envoy's flush and 5 s behind the gRPC stream,
    # frees the first MiB(s) it has read: the file keeps its size, the disk does not
    def freed() -> bool:
        st = path.stat()
        return allocated_bytes(st) <= st.st_size - MIB
    wait_until(freed, "the space of the reconciled MiB given back", timeout=30)
    with path.open("rb") as f:
        assert f.read(MIB) == bytes(MIB)

    # Envoy goes on appending after the hole; then costsink is killed, its checkpoint lost
    # with the state it kept, and requests are served while it is down (the gRPC access log
    # drops them): the restarted reconciler reads the file from the first data past the hole
    size = path.stat().st_size
    served += send(gw, 50)
    gw.kill("costsink")
    (path.parent / "access-log.pos").unlink()
    while_down = send(gw, 30)
    assert len(while_down) == 30
    wait_until(lambda: path.stat().st_size > size, "Envoy's lines after the hole")
    gw.start("costsink")

    rows = wait_for_rows(gw, set(served + while_down), timeout=60)
    assert len(set(served + while_down)) == len(served) + len(while_down) > 1500
    assert all(rows[rid]["status"] == 200 and rows[rid]["input_tokens"] > 0 for rid in rows)
    costsink_log = (gw.manifest_path.parent / "logs" / "costsink.log").read_text()
    assert "unreadable" not in costsink_log and "cannot free" not in costsink_log
