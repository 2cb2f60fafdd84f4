"""The reconciler of Envoy's access-log file over long uptime (costsink/durable_log.py): the
request ids it remembers, what it skips and when an id may be forgotten; and the disk space of
what it has read, which it gives back while Envoy goes on appending. A simulated clock stands
for the minutes of uptime; the file is a real one, on the filesystem of the tests' tmp dir."""

from __future__ import annotations

import asyncio
import errno
import json
import os
from pathlib import Path
from typing import Any

import pytest

from costsink import durable_log
from costsink.durable_log import FREE_STEP, RECENT_MARGIN, RECENT_TTL, DurableLog, RecentIds
from costsink.file_space import allocated_bytes
from tollway.access_log import entry_from_line


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


# -- the space of what was read ------------------------------------------------------------------

LINE = 1024  # bytes a line, so that lines start on every MiB boundary


def append_lines(path: Path, ids: list[str]) -> None:
    """Envoy's way: appended (O_APPEND), whatever was freed before."""
    with path.open("ab") as f:
        for rid in ids:
            unpadded = len(json.dumps({"request_id": rid, "pad": ""}, separators=(",", ":")))
            pad = "x" * (LINE - unpadded - 1)  # the newline is the last byte
            f.write(json.dumps({"request_id": rid, "pad": pad}, separators=(",", ":")).encode()
                    + b"\n")


@pytest.fixture
def entries_by_id(monkeypatch: pytest.MonkeyPatch) -> None:
    """An entry stands for its request id: these tests are about which lines are read."""
    monkeypatch.setattr(durable_log, "to_entry", lambda m, e, keys: e.request.request_id)


def test_what_was_read_gives_its_space_back_and_offsets_stay(
        tmp_path: Path, clock: Clock, entries_by_id: None) -> None:
    access_log = tmp_path / "envoy-access.jsonl"
    ids = [f"r{i}" for i in range(4 * FREE_STEP // LINE)]  # 4 MiB
    append_lines(access_log, ids)
    log = DurableLog(access_log, tmp_path / "pos", keep_bytes=FREE_STEP)
    log.durable(ids)  # the gRPC stream brought them all
    for _ in range(10):
        clock.now += 1
        assert reconcile(log) == []
    size = access_log.stat().st_size
    assert log.position.offset == size == 4 * FREE_STEP
    # freed: all but the last MiB read (kept) and the MiB step; the size is the same
    with access_log.open("rb") as f:
        assert f.read(2 * FREE_STEP) == bytes(2 * FREE_STEP)
        assert f.read(LINE).startswith(b'{"request_id":"r2048"')
    assert allocated_bytes(access_log.stat()) <= 2 * FREE_STEP + 64 * 1024
    # Envoy's next lines land after the others, and are read
    append_lines(access_log, ["new-0", "new-1"])
    for _ in range(10):
        clock.now += 1
        written = reconcile(log)
        if written:
            break
    assert written == ["new-0", "new-1"]
    assert access_log.stat().st_size == size + 2 * LINE


def test_a_reconciler_that_lost_its_checkpoint_reads_on_past_the_hole(
        tmp_path: Path, clock: Clock, entries_by_id: None,
        caplog: pytest.LogCaptureFixture) -> None:
    """The hole ends before the checkpoint that freed it: the line it ends in was read, the
    lines after it may not have been (here: two Envoy wrote after that checkpoint)."""
    access_log = tmp_path / "envoy-access.jsonl"
    ids = [f"r{i}" for i in range(2 * FREE_STEP // LINE)]  # 2 MiB, a line at each MiB
    append_lines(access_log, ids)
    log = DurableLog(access_log, tmp_path / "pos", keep_bytes=0)
    log.durable(ids)
    for _ in range(10):
        clock.now += 1
        reconcile(log)
    assert log.position.offset == 2 * FREE_STEP
    append_lines(access_log, ["new-0", "new-1"])  # not read yet when the state dir is lost
    (tmp_path / "pos").unlink()

    again = DurableLog(access_log, tmp_path / "pos", keep_bytes=0)
    written: list[str] = []
    for _ in range(10):
        clock.now += 1
        written += reconcile(again)
    # the hole is the first MiB; the line at its end was read before; the rest is read again
    # (the ledger keeps a request id once) and the two new lines are not lost
    assert written == [*ids[FREE_STEP // LINE + 1:], "new-0", "new-1"]
    assert "unreadable" not in caplog.text


def test_where_space_cannot_be_freed_it_says_so_once_and_reading_goes_on(
        tmp_path: Path, clock: Clock, entries_by_id: None, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    calls: list[int] = []

    def unsupported(fd: int, start: int, end: int) -> None:
        calls.append(end)
        raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))
    monkeypatch.setattr(durable_log, "punch_hole", unsupported)
    access_log = tmp_path / "envoy-access.jsonl"
    log = DurableLog(access_log, tmp_path / "pos", keep_bytes=0)
    for n in range(3):  # three MiB, read one at a time
        batch = [f"m{n}-{i}" for i in range(FREE_STEP // LINE)]
        append_lines(access_log, batch)
        got: list[str] = []
        for _ in range(10):
            clock.now += 1
            got += reconcile(log)
        assert got == batch
    assert len(calls) == 1 and caplog.text.count("cannot free the space") == 1


@pytest.mark.parametrize(("written", "seconds", "nanos"), [
    ("1764936000.123456", 1764936000, 123_456_000),
    ("1764936000.999999", 1764936000, 999_999_000),  # no rounding up into the next second
    ("1764936000.000001", 1764936000, 1000),
    ("1764936000.5", 1764936000, 500_000_000),
    ("1764936000", 1764936000, 0),
])
def test_a_lines_start_time_reads_as_the_grpc_streams_to_the_microsecond(
        written: str, seconds: int, nanos: int) -> None:
    """The ledger's key is (start time, request id): a line read back must give the very start
    time the gRPC stream's entry for the same request gives, or the request is charged twice."""
    line = json.dumps({"request_id": "r", "start_time": written, "status": "200"})
    start = entry_from_line(line).common_properties.start_time
    assert (start.seconds, start.nanos) == (seconds, nanos)


def test_a_line_without_a_start_time_has_none() -> None:
    for written in ("-", "", "1764936000.12x"):
        line = json.dumps({"request_id": "r", "start_time": written})
        assert not entry_from_line(line).common_properties.HasField("start_time")
