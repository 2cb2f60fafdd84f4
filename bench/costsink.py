"""Benchmark costsink. Run: python bench/costsink.py [--entries 20000] [--ledger postgresql]
[--budget-crossed] [--buffer-bytes 65536]

Access-log entries per second, streamed over gRPC the way Envoy sends them, until every one is
priced and committed to the ledger: SQLite and the real PostgreSQL, each next to a no-op
AccessLogService (reads the stream, writes nothing) measured in the same run. Each entry holds
what Envoy's entries for a chat completion hold (about 1 KB), and entries are packed into
messages as an Envoy worker packs them under load: until they pass `buffer_size_bytes`
(render.ACCESS_LOG_BUFFER_BYTES unless --buffer-bytes says otherwise), since each message costs
the sink work of its own. The sink runs in its own process, as in production, adding each cost
to the spend counters in the real Redis. --budget-crossed: the project's monthly budget is so
small that every entry's cost passes both its alert thresholds, as for a project past 80% of
its budget for the rest of the month.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import grpc
import yaml
from common import ROOT, serve_forever
from envoy.config.core.v3 import base_pb2
from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc
from procstat import cpu_seconds

from tests.e2e.harness import free_port, tcp_open, wait_until
from tollway.metadata import AUTHZ, REQUEST, USAGE, to_struct
from tollway.render import ACCESS_LOG_BUFFER_BYTES

PG = os.environ.get("TOLLWAY_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/test")
REDIS = os.environ.get("TOLLWAY_BENCH_REDIS", "redis://127.0.0.1:6379/0")


class Noop(als_pb2_grpc.AccessLogServiceServicer):  # type: ignore[misc]
    async def StreamAccessLogs(self, it, context):  # type: ignore[no-untyped-def]
        async for _ in it:
            pass
        return als_pb2.StreamAccessLogsResponse()


def request_id(run: str, i: int) -> str:
    """As long as Envoy's, a UUID: 36 characters."""
    return f"{run}-{i:027d}"


def entry(i: int, run: str) -> accesslog_pb2.HTTPAccessLogEntry:
    """An entry as Envoy sends one for a chat completion without a token quota (the fields of
    one captured from the gateway in front of the mock): the metadata namespaces the gateway's
    filters write, each with every value they hold (to_entry reads them value by value), the
    timings that say the provider answered, and the rest of what Envoy fills in, which the
    sink receives and parses whether it reads it or not."""
    e = accesslog_pb2.HTTPAccessLogEntry()
    e.protocol_version = accesslog_pb2.HTTPAccessLogEntry.HTTP11
    request = e.request
    request.request_id = request_id(run, i)
    request.request_method = base_pb2.POST
    request.scheme, request.authority, request.path = "http", "gateway", "/v1/chat/completions"
    request.forwarded_for = "192.0.2.2"
    request.request_headers_bytes, request.request_body_bytes = 382, 1089
    request.upstream_header_bytes_sent, request.downstream_header_bytes_received = 373, 169
    response = e.response
    response.response_code.value = 200
    response.response_headers_bytes, response.response_body_bytes = 220, 278
    response.response_code_details = "via_upstream"
    response.upstream_header_bytes_received, response.downstream_header_bytes_sent = 165, 266
    common = e.common_properties
    common.start_time.GetCurrentTime()
    for name, ns in (("time_to_last_rx_byte", 88_000), ("time_to_first_upstream_tx_byte",
                     8_462_000), ("time_to_last_upstream_tx_byte", 8_466_000),
                     ("time_to_first_upstream_rx_byte", 10_465_000),
                     ("time_to_last_upstream_rx_byte", 10_648_000),
                     ("time_to_first_downstream_tx_byte", 10_535_000),
                     ("time_to_last_downstream_tx_byte", 10_662_000), ("duration", 10_665_000)):
        getattr(common, name).FromNanoseconds(ns)
    for name, port in (("downstream_remote_address", 40000 + i % 20000),
                       ("downstream_direct_remote_address", 40000 + i % 20000),
                       ("downstream_local_address", 8080), ("upstream_remote_address", 9000),
                       ("upstream_local_address", 30000 + i % 20000)):
        address = getattr(common, name).socket_address
        address.address, address.port_value = "10.0.0.7", port
    common.upstream_cluster, common.route_name = "provider_openai", "route0"
    common.upstream_request_attempt_count = 1
    common.stream_id = request.request_id
    common.downstream_wire_bytes_sent, common.downstream_wire_bytes_received = 580, 1301
    common.upstream_wire_bytes_sent, common.upstream_wire_bytes_received = 1500, 664
    common.access_log_type = accesslog_pb2.DownstreamEnd
    md = common.metadata.filter_metadata
    md[AUTHZ].CopyFrom(to_struct({
        "action": "completion", "org": "acme", "project": "team-ai", "client": "app",
        "key_id": "da-sk-acme-team", "model": "gpt-5.4-mini", "provider": "openai",
        "route": "route0", "dialect": "openai", "stream": False, "fail_closed": True,
        "max_tokens": 5, "ext_authz_duration": 1}))
    md[REQUEST].CopyFrom(to_struct({"model": "gpt-5.4-mini", "max_tokens": 5}))
    md[USAGE].CopyFrom(to_struct({
        "input_tokens": 1500 + i % 100, "output_tokens": 200, "cached_input_tokens": 1024,
        "reasoning_tokens": 0, "total_tokens": 1700 + i % 100, "events": 1,
        "usage_final": True}))
    return e


def messages(n: int, run: str, buffer_bytes: int) -> list[als_pb2.StreamAccessLogsMessage]:
    """The entries packed as Envoy's gRPC access logger packs them: a message is sent once
    its entries' sizes add up to buffer_size_bytes (or at the flush interval, which a
    saturating stream never waits for)."""
    out: list[als_pb2.StreamAccessLogsMessage] = []
    size = buffer_bytes
    for i in range(n):
        if size >= buffer_bytes:
            out.append(als_pb2.StreamAccessLogsMessage())
            out[-1].identifier.log_name = "tollway"
            size = 0
        e = entry(i, run)
        size += e.ByteSize()
        out[-1].http_logs.log_entry.append(e)
    return out


async def stream(port: int, sent: list[als_pb2.StreamAccessLogsMessage]) -> float:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = als_pb2_grpc.AccessLogServiceStub(ch)
        started = time.perf_counter()

        async def gen():  # type: ignore[no-untyped-def]
            for m in sent:
                yield m
        await stub.StreamAccessLogs(gen())
        return started


def wait_for_rows(ledger: str, run: str, n: int, last_at: datetime) -> None:
    """Until the ledger holds the run's `n` rows. Polled every 10 ms for the last entry by
    its key, its start time and request id (the sink writes its queue in order), then counted
    once: a count every 10 ms would scan the table on the cores the sink needs, and so would
    a new PostgreSQL connection per poll (a backend forked each time)."""
    last = request_id(run, n - 1)
    if not ledger.startswith("sqlite"):
        asyncio.run(_wait_for_pg_rows(run, last, n, last_at))
        return
    import sqlite3

    path = ledger[len("sqlite:///"):]
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if Path(path).exists():
            db = sqlite3.connect(path)
            try:
                if db.execute("SELECT 1 FROM tollway_ledger WHERE at = ? AND request_id = ?",
                              (last_at.isoformat(), last)).fetchone():
                    found = db.execute("SELECT count(*) FROM tollway_ledger WHERE request_id "
                                       "LIKE ?", (f"{run}-%",)).fetchone()[0]
                    if found != n:
                        raise SystemExit(f"the SQLite ledger holds {found} of {n} entries")
                    return
            except sqlite3.OperationalError:  # the table not created yet
                pass
            finally:
                db.close()
        time.sleep(0.01)
    raise TimeoutError("the entries did not all reach the SQLite ledger")


async def _wait_for_pg_rows(run: str, last: str, n: int, last_at: datetime) -> None:
    conn = await asyncpg.connect(PG)
    try:
        async with asyncio.timeout(600):
            while True:
                try:
                    if await conn.fetchval("SELECT 1 FROM tollway_ledger WHERE at = $1 AND "
                                           "request_id = $2", last_at, last):
                        break
                except asyncpg.UndefinedTableError:
                    pass
                await asyncio.sleep(0.01)
        found = await conn.fetchval("SELECT count(*) FROM tollway_ledger WHERE request_id "
                                    "LIKE $1", f"{run}-%")
        if found != n:
            raise SystemExit(f"the PostgreSQL ledger holds {found} of {n} entries")
    finally:
        await conn.close()


async def forget(run: str) -> None:
    """The benchmark's rows are not spend: remove them from the shared database."""
    conn = await asyncpg.connect(PG)
    try:
        await conn.execute("DELETE FROM tollway_ledger WHERE request_id LIKE $1", f"{run}-%")
    finally:
        await conn.close()


def forget_spend() -> None:
    import redis

    r = redis.Redis.from_url(REDIS)
    for k in r.scan_iter("tollway:{acme}:sp:*"):
        r.delete(k)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--entries", type=int, default=20000)
    ap.add_argument("--ledger", choices=["sqlite", "postgresql", "both"], default="both")
    ap.add_argument("--budget-crossed", action="store_true")
    ap.add_argument("--buffer-bytes", type=int, default=ACCESS_LOG_BUFFER_BYTES,
                    help="Envoy's buffer_size_bytes: how the entries are packed into messages")
    ap.add_argument("--noop-server", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.noop_server:
        serve_forever(als_pb2_grpc.add_AccessLogServiceServicer_to_server, Noop(),
                      args.noop_server)
        return
    rows = []
    cpus: list[tuple[str, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        ledgers = [(name, dsn) for name, dsn in (("SQLite", f"sqlite:///{tmp}/ledger.db"),
                                                  ("PostgreSQL", PG))
                   if args.ledger in (name.lower(), "both")]
        for name, ledger in ledgers:
            noop_port, port = free_port(), free_port()
            doc = yaml.safe_load((ROOT / "examples" / "team-ai.yaml").read_text())
            if args.budget_crossed:
                budget = doc["organizations"][0]["projects"][0]["quotas"][0]
                assert budget["alerts"], budget  # the monthly budget, with its thresholds
                budget["spend_per_month"] = 0.000001
            # costsink alone keeps spend in Redis (memory counters need extauthz in-process)
            doc["storage"] = {"keys": "sqlite:///keys.db", "ledger": ledger,
                              "counters": REDIS}
            doc["services"] = {"costsink": f"127.0.0.1:{port}", "metrics_port": free_port()}
            manifest = Path(tmp) / f"{name}.yaml"
            manifest.write_text(yaml.safe_dump(doc))
            procs = [subprocess.Popen([sys.executable, __file__, "--noop-server",
                                       str(noop_port)]),
                     subprocess.Popen([sys.executable, "-m", "tollway.cli", "serve",
                                       "--manifest", str(manifest), "--services", "costsink"],
                                      env={**os.environ, "TOLLWAY_STATE_DIR": tmp},
                                      stderr=subprocess.DEVNULL)]
            try:
                wait_until(lambda p=noop_port: tcp_open(p), "no-op", proc=procs[0])
                wait_until(lambda p=port: tcp_open(p), "costsink", proc=procs[1])
                run = uuid.uuid4().hex[:8]
                stream_of = messages(args.entries, run, args.buffer_bytes)
                started = asyncio.run(stream(noop_port, stream_of))
                rows.append((f"no-op sink ({name} run)", args.entries /
                             (time.perf_counter() - started)))
                cpu = cpu_seconds(procs[1].pid)
                started = asyncio.run(stream(port, stream_of))
                start = stream_of[-1].http_logs.log_entry[-1].common_properties.start_time
                wait_for_rows(ledger, run, args.entries, datetime.fromtimestamp(
                    start.seconds, UTC) + timedelta(microseconds=start.nanos // 1000))
                rows.append((f"costsink → {name}", args.entries /
                             (time.perf_counter() - started)))
                cpus.append((name, (cpu_seconds(procs[1].pid) - cpu) / args.entries))
                if name == "PostgreSQL":
                    asyncio.run(forget(run))
                forget_spend()
            finally:
                for p in procs:
                    p.terminate()
                    p.wait()
    print(f"\n## Access-log entries ingested, {args.entries} entries, "
          f"{args.entries / len(stream_of):.1f} a message ({args.buffer_bytes} bytes)")
    print("| sink | entries/s |\n|---|---|")
    for name, rate in rows:
        print(f"| {name} | {rate:,.0f} |")
    for i in range(0, len(rows), 2):
        print(f"{rows[i + 1][0]} / no-op: {rows[i + 1][1] / rows[i][1]:.2f}x")
    print("costsink's CPU per entry (its process, read from /proc; steadier than entries/s on "
          "a shared machine): " + ", ".join(f"{n} {c * 1e6:.1f} us" for n, c in cpus))


if __name__ == "__main__":
    main()
