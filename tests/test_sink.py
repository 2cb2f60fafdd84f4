"""The sink without Envoy: a batch the ledger refuses survives a restart of the sink in the disk
spool and is replayed in order, once (the real PostgreSQL outage is
tests/e2e/test_ledger_outage.py); a hold whose log entry cannot name it is released; spend a
crash left out of the counters is rebuilt from the ledger."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from envoy.service.accesslog.v3 import als_pb2
from prometheus_client import REGISTRY

from costsink.entry import Entry
from costsink.ledger import LedgerRow, SqliteLedger
from costsink.service import READ_SLICE, AccessLogSink
from costsink.spend import SpendRecorder
from costsink.spool import Spool
from tollway.budgets import Budget, SpendCounter, period_labels, to_units
from tollway.manifest import loads
from tollway.reload import Live
from tollway.spend import SpendUnavailable
from tollway.spend.memory import MemorySpendStore

MANIFEST = loads("""
providers: [{name: openai, dialect: openai, upstream: {host: x}, credential: env:X,
             models: [{name: m}]}]
routes: [{path: /v1/chat/completions, provider: openai}]
organizations: [{id: o, projects: [{id: p, clients: [{id: c, keys: [{id: k}]}]}]}]
""", "test")


def row(i: int) -> LedgerRow:
    return LedgerRow(request_id=f"r{i}", at=datetime(2027, 1, 1, tzinfo=UTC) + timedelta(
        seconds=i), org="o", project="p", client="c", key_id="k", provider="openai", model="m",
        route="route0", status=200, input_tokens=i, output_tokens=1, cached_input_tokens=0,
        cache_creation_tokens=0, cost=Decimal("0.0000012345") * i, currency="USD",
        rate_card_version="v", latency_ms=3, stream=False, client_disconnected=False,
        deny_reason=None)


class Unreachable(SqliteLedger):
    async def open(self) -> None:
        raise OSError("connection refused")


def sink(ledger: SqliteLedger, spool_dir: Path,
         store: MemorySpendStore | None = None) -> AccessLogSink:
    return AccessLogSink(Live(lambda m: m, MANIFEST), ledger, Spool(spool_dir),
                         SpendRecorder(store or MemorySpendStore()))


async def test_spooled_batches_survive_a_restart_and_replay_in_order_once(
        tmp_path: Path) -> None:
    down = sink(Unreachable(tmp_path / "ledger.db"), tmp_path / "spool")
    await down.write([Entry(row(i), 0, {}) for i in range(3)])
    await down.write([Entry(row(i), 0, {}) for i in range(3, 5)])  # behind the spool: spooled
    assert down.spool.depth == 5 and not await down.replay()

    ledger = SqliteLedger(tmp_path / "ledger.db")
    up = sink(ledger, tmp_path / "spool")  # a restarted sink finds the spool on disk
    assert up.spool.depth == 5
    await up.write([Entry(row(4), 0, {})])  # arrives while the spool is not yet replayed
    assert await up.replay() and up.spool.empty() and not up.spool.files()
    assert await up.replay()  # nothing left, nothing twice
    rows = await ledger.rows()
    assert [r.request_id for r in rows] == [f"r{i}" for i in range(5)]
    assert rows == [row(i) for i in range(5)]  # every field survives the round trip
    await ledger.close()


async def test_the_hold_of_a_check_envoy_gave_up_on_is_released(tmp_path: Path) -> None:
    store = MemorySpendStore()
    cap = Budget(SpendCounter("project:p", "day", "2027-01-01"), "project:p", "cap", 1000,
                 True, ())
    assert (await store.hold("o", "r9", [cap], 600, 600_000)).allowed
    s = sink(SqliteLedger(tmp_path / "ledger.db"), tmp_path / "spool", store)
    # Envoy answered 503 itself: the entry has no org, no key, no deny reason
    unauthorized = row(9)._replace(org=None, project=None, client=None, key_id=None,
                           provider=None, model=None, status=503, cost=None, input_tokens=0,
                           output_tokens=0)
    await s.write([Entry(unauthorized, 0, {})])
    assert await store.read("o", [cap.counter]) == [(0, 0)]
    await s.ledger.close()


async def test_a_row_spooled_twice_is_counted_once(tmp_path: Path) -> None:
    """The ledger is away and the same request arrives again (the gRPC stream and Envoy's
    access-log file both brought it, or a restarted sink re-read the file): spooled twice, the
    ledger keeps it once on replay, and its cost is added to spend once."""
    store = MemorySpendStore()
    counter = SpendCounter("key:k", "day", "2027-01-01")
    down = sink(Unreachable(tmp_path / "ledger.db"), tmp_path / "spool", store)
    await down.write([Entry(row(i), 0, {}) for i in (1, 2)])
    await down.write([Entry(row(2), 0, {}), Entry(row(3), 0, {})])
    spent = (await store.read("o", [counter]))[0][0]
    assert spent == to_units(row(1).cost + row(2).cost + row(3).cost)  # type: ignore[operator]
    restarted = sink(Unreachable(tmp_path / "ledger.db"), tmp_path / "spool", store)
    await restarted.write([Entry(row(1), 0, {})])  # the spool on disk knows it too
    assert (await store.read("o", [counter]))[0][0] == spent


async def test_spend_a_crash_left_out_is_rebuilt_from_the_ledger(tmp_path: Path) -> None:
    """A sink killed between a batch's ledger write and its spend commit: the ledger holds the
    rows, the counter store (which kept its data) lacks their cost. Told of the crash, the next
    sink sets the counters to what the ledger holds, once."""
    store = MemorySpendStore()
    assert await store.claim_rebuild()  # the store has its data: no rebuild of its own
    ledger = SqliteLedger(tmp_path / "ledger.db")
    now = datetime.now(UTC)
    rows = [row(i)._replace(at=now) for i in (1, 2)]
    await ledger.open()
    await ledger.append(rows)  # then kill -9, before the spend commit
    month = SpendCounter("project:p", "month", period_labels(now, "UTC")["month"])

    s = sink(ledger, tmp_path / "spool", store)
    await s.rebuild_spend_if_lost()
    assert await store.read("o", [month]) == [(0, 0)]  # nothing tells it of the crash
    s.spend_behind_ledger = True
    await s.rebuild_spend_if_lost()
    want = to_units(sum((r.cost for r in rows if r.cost), Decimal(0)))
    assert await store.read("o", [month]) == [(want, 0)]
    assert not s.spend_behind_ledger
    await ledger.close()


async def test_a_batch_is_settled_in_one_call_and_written_whatever_befalls_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """In process, a written batch's reservations are settled in one call to the counters,
    each with its own numbers; one whose metadata cannot be read is left out, and a call that
    fails or never answers (cut off at SETTLE_TIMEOUT) leaves the batch written."""
    from costsink import settlement
    from ratelimit.admission import Reservation

    monkeypatch.setattr(settlement, "SETTLE_TIMEOUT", 0.2)
    calls: list[list[Reservation]] = []
    trouble: str | None = None

    async def settle_here(reservations: list[Reservation]) -> None:
        calls.append(reservations)
        if trouble == "down":
            raise ConnectionError("counters down")
        if trouble == "silent":
            await asyncio.Event().wait()  # never answers

    s = AccessLogSink(Live(lambda m: m, MANIFEST), SqliteLedger(tmp_path / "ledger.db"),
                      Spool(tmp_path / "spool"), SpendRecorder(MemorySpendStore()),
                      settler=settlement.TokenSettler(Live(lambda m: m, MANIFEST), settle_here))

    def reserved(i: int, tokens: object) -> Entry:
        return Entry(row(i), 100 + i, {"reserved_tokens": tokens, "charged_at_ms": 1000.0 + i})
    await s.write([reserved(1, 30.0), reserved(3, "many"), reserved(4, 40),
                   Entry(row(5), 105, {})])  # not rate limited: nothing to settle
    assert calls == [[("k", "m", 30, 101, 1001), ("k", "m", 40, 104, 1004)]]

    for trouble in ("down", "silent"):
        calls.clear()
        started = asyncio.get_running_loop().time()
        await s.write([reserved(6 if trouble == "down" else 7, 50)])
        assert len(calls) == 1
        assert asyncio.get_running_loop().time() - started < 5  # cut off, not waited for
    assert len(await s.ledger.rows()) == 6
    await s.ledger.close()


# a project budget of 0.0001 a day, alerting at half and at 90%
ALERTING = loads("""
providers: [{name: openai, dialect: openai, upstream: {host: x}, credential: env:X,
             models: [{name: m}]}]
routes: [{path: /v1/chat/completions, provider: openai}]
organizations: [{id: o, projects: [{id: p, clients: [{id: c, keys: [{id: k}]}],
  quotas: [{name: cap, spend_per_day: 0.0001, alerts: [0.5, 0.9]}]}]}]
""", "test")


class CountingStore(MemorySpendStore):
    """The in-process store, counting what the recorder asks it about alerts."""

    def __init__(self) -> None:
        super().__init__()
        self.alert_questions = 0

    async def first_alert(self, org: str, counter: SpendCounter, mark: str) -> bool:
        self.alert_questions += 1
        return await super().first_alert(org, counter, mark)


async def test_a_budget_past_its_thresholds_asks_the_store_once_per_threshold(
        caplog: pytest.LogCaptureFixture) -> None:
    """Every row of a project past 80% of its budget crosses the threshold: the store is asked
    whether it fired once, not once a row (a round trip each), and it fires once."""
    store = CountingStore()
    recorder = SpendRecorder(store)
    rows = [row(i)._replace(cost=Decimal("0.00001")) for i in range(1, 41)]  # 4x the cap
    await recorder.record(ALERTING, [(r, 0) for r in rows[:20]])
    assert store.alert_questions == 2  # 0.5 and 0.9, each crossed by the first batch
    await recorder.record(ALERTING, [(r, 0) for r in rows[20:]])
    assert store.alert_questions == 2  # known crossed: not asked again
    fired = [r.getMessage() for r in caplog.records if "budget alert" in r.getMessage()]
    assert len(fired) == 2, fired
    assert not recorder.pending
    assert await store.read("o", [SpendCounter("project:p", "day", "2027-01-01")]) \
        == [(to_units(Decimal("0.0004")), 0)]


async def test_an_alert_the_store_could_not_answer_is_asked_with_the_next_costs(
        caplog: pytest.LogCaptureFixture) -> None:
    """Redis gone between a batch's spend commit and its alert question: the costs are in,
    the writer goes on, and the threshold is asked about again with the next batch."""

    class Blinking(CountingStore):
        async def first_alert(self, org: str, counter: SpendCounter, mark: str) -> bool:
            if self.alert_questions == 0:
                self.alert_questions += 1
                raise SpendUnavailable("redis: connection reset")
            return await super().first_alert(org, counter, mark)

    store = Blinking()
    recorder = SpendRecorder(store)
    rows = [row(i)._replace(cost=Decimal("0.0001")) for i in range(1, 3)]
    await recorder.record(ALERTING, [(rows[0], 0)])
    assert not recorder.pending  # the cost itself was committed
    assert not [r for r in caplog.records if "budget alert" in r.getMessage()]
    await recorder.record(ALERTING, [(rows[1], 0)])
    assert len([r for r in caplog.records if "budget alert" in r.getMessage()]) == 2


async def test_the_writer_outlives_a_batch_that_failed_and_writes_it_again(
        tmp_path: Path) -> None:
    """An unexpected failure after a batch reached the ledger (here: recording its spend)
    neither ends the writer nor loses the batch; spend is then rebuilt from the ledger."""

    class FailsOnce(SpendRecorder):
        failed = False

        async def record(self, m: Any, rows: Any) -> None:
            if not self.failed:
                self.failed = True
                raise RuntimeError("a bug")
            await super().record(m, rows)

    ledger = SqliteLedger(tmp_path / "ledger.db")
    s = AccessLogSink(Live(lambda m: m, MANIFEST), ledger, Spool(tmp_path / "spool"),
                      FailsOnce(MemorySpendStore()))
    await s.ensure_open()
    writer = asyncio.create_task(s.write_forever())
    try:
        for i in range(3):
            s.queue.put_nowait(Entry(row(i), 0, {}))
        deadline = time.monotonic() + 10
        while len(await ledger.rows()) < 3 or s.queue.qsize() or s._inflight:
            assert not writer.done(), writer
            assert time.monotonic() < deadline, "the batch was not written"
            await asyncio.sleep(0.05)
        s.queue.put_nowait(Entry(row(3), 0, {}))  # and the writer takes the next ones
        while len(await ledger.rows()) < 4:
            assert time.monotonic() < deadline, "the writer stopped"
            await asyncio.sleep(0.05)
        assert s.spend_behind_ledger  # keep_spend_true rebuilds the counters from the ledger
    finally:
        writer.cancel()
        await ledger.close()


async def test_a_big_message_is_read_in_slices_and_whole_at_shutdown(tmp_path: Path) -> None:
    """A 64 KB flush (about 64 entries) lets the loop run between slices of READ_SLICE entries
    (Checks may share it) and is queued once read, for the writer to take whole; a shutdown that
    cancels the stream in between still queues the whole message, which Envoy counts as
    delivered, for the drain to write."""
    n = 3 * READ_SLICE + 5
    message = als_pb2.StreamAccessLogsMessage()
    for i in range(n):
        message.http_logs.log_entry.add().request.request_id = f"big-{i}"
    taken = asyncio.Event()

    async def stream() -> AsyncIterator[als_pb2.StreamAccessLogsMessage]:
        taken.set()
        yield message
        await asyncio.Event().wait()  # Envoy keeps its stream open

    s = sink(SqliteLedger(tmp_path / "ledger.db"), tmp_path / "spool")
    assert s.read_slice == READ_SLICE  # shares_loop, the default
    reading = asyncio.create_task(s.StreamAccessLogs(stream(), None))
    deadline = time.monotonic() + 10
    while not taken.is_set():
        assert time.monotonic() < deadline, "the message was not taken"
        await asyncio.sleep(0)
    # the loop runs in the middle of the message, before any of it is queued
    assert not reading.done() and s.queue.qsize() == 0
    reading.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reading
    assert [s.queue.get_nowait().row.request_id for _ in range(s.queue.qsize())] == [
        f"big-{i}" for i in range(n)]


async def test_a_sink_alone_on_its_loop_reads_a_message_whole(tmp_path: Path) -> None:
    """Without Checks to let in, each turn of the loop in a message would only cost time."""
    message = als_pb2.StreamAccessLogsMessage()
    for i in range(3 * READ_SLICE):
        message.http_logs.log_entry.add().request.request_id = f"big-{i}"

    async def stream() -> AsyncIterator[als_pb2.StreamAccessLogsMessage]:
        yield message

    s = AccessLogSink(Live(lambda m: m, MANIFEST), SqliteLedger(tmp_path / "ledger.db"),
                      Spool(tmp_path / "spool"), SpendRecorder(MemorySpendStore()),
                      shares_loop=False)
    before = REGISTRY.get_sample_value("tollway_costsink_messages_total") or 0
    reading = asyncio.create_task(s.StreamAccessLogs(stream(), None))
    await asyncio.sleep(0)  # one turn: the message is read and queued within it
    assert s.queue.qsize() == 3 * READ_SLICE
    await reading
    assert REGISTRY.get_sample_value("tollway_costsink_messages_total") == before + 1
