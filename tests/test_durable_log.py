"""costsink's memory of the request ids it made durable (costsink/durable_log.py): what the
reconciler of Envoy's access-log file skips, and when an id may be forgotten. A simulated
clock stands for the minutes of uptime; the file is a real one."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from costsink import durable_log
from costsink.durable_log import RECENT_MARGIN, RECENT_TTL, DurableLog, RecentIds


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(durable_log, "time", c)
    return c


def reconcile(log: DurableLog, delay: float = 5.0) -> list[Any]:
    """One pass of the reconciler; what it would have written."""
    written: list[Any] = []

    async def write(entries: list[Any]) -> None:
        written.extend(entries)
    asyncio.run(log.reconcile(None, write, delay=delay))  # type: ignore[arg-type]
    return written


def test_ids_are_forgotten_by_batch_and_one_made_durable_again_stays() -> None:
    recent = RecentIds()
    recent.add(["a", "b"], 1.0)
    recent.add(["c"], 2.0)
    recent.add(["a", "d"], 3.0)  # "a" again, by the other path
    recent.forget_before(2.5)
    assert ["a" in recent, "b" in recent, "c" in recent, "d" in recent] == \
        [True, False, False, True]
    assert len(recent) == 2
    recent.forget_before(3.5)
    assert len(recent) == 0


def test_an_id_is_forgotten_once_the_reconciler_has_read_past_it(
        tmp_path: Path, clock: Clock) -> None:
    """Not RECENT_TTL later: at full load that was ten minutes of ids, a million of them."""
    access_log = tmp_path / "envoy-access.jsonl"
    access_log.touch()
    log = DurableLog(access_log, tmp_path / "pos")
    log.durable(["early"])
    for _ in range(10):  # the reconciler every second, the file read to its end
        clock.now += 1
        assert reconcile(log) == []
    log.durable(["later"])
    for _ in range(int(RECENT_MARGIN) + 10):  # read past "later", and the margin on
        clock.now += 1
        reconcile(log)
    log.durable(["now"])
    assert "early" not in log.recent and "later" not in log.recent and "now" in log.recent
    assert clock.now - 1000.0 < RECENT_TTL / 5


def test_a_line_written_after_its_id_was_made_durable_is_still_skipped(
        tmp_path: Path, clock: Clock, caplog: pytest.LogCaptureFixture) -> None:
    """Envoy holds a line before it writes it to the file (its flush interval): the id it
    carries is kept RECENT_MARGIN after the reconciler has read the file as it was then."""
    access_log = tmp_path / "envoy-access.jsonl"
    access_log.touch()
    log = DurableLog(access_log, tmp_path / "pos")
    log.durable(["late-line"])
    for _ in range(20):
        clock.now += 1
        reconcile(log)
    with access_log.open("a") as f:  # 20 s after the gRPC stream made it durable
        f.write(json.dumps({"request_id": "late-line"}, separators=(",", ":")) + "\n")
    for _ in range(10):
        clock.now += 1
        log.durable([])
        assert reconcile(log) == []
    assert log.position.offset == access_log.stat().st_size
    assert "unreadable" not in caplog.text  # skipped by its id: it would not parse


def test_without_the_file_an_id_is_remembered_for_recent_ttl(
        tmp_path: Path, clock: Clock) -> None:
    log = DurableLog(tmp_path / "never-written.jsonl", tmp_path / "pos")
    log.durable(["a"])
    clock.now += RECENT_TTL - 1
    reconcile(log)
    log.durable(["b"])
    assert "a" in log.recent
    clock.now += 2
    log.durable(["c"])
    assert "a" not in log.recent and "b" in log.recent
