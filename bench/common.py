"""What the benchmarks share: percentiles, a closed-loop gRPC load, a no-op server runner, an
extauthz Check request and its load, runtime keys written in bulk, a bare Envoy, wrk's
figures, the serving process's garbage collections (a process's CPU and RSS: procstat.py).
Run the benchmarks from the repository root (`python bench/X.py`): the gateway's subprocesses
must import the packages, not these scripts of the same names."""

from __future__ import annotations

import asyncio
import itertools
import re
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402
import httpx  # noqa: E402
from envoy.service.auth.v3 import external_auth_pb2  # noqa: E402
from google.protobuf import struct_pb2  # noqa: E402
from procstat import cpu_seconds  # noqa: E402

from tollway.metadata import REQUEST  # noqa: E402

if TYPE_CHECKING:
    from tests.e2e.harness import Gateway


def charged_quotas() -> list[dict[str, Any]]:
    """A project's quotas that charge every request to an rpm and a tpm and never refuse one
    (gateway_http.py's child spells them itself: it runs on the checkout under test's path)."""
    return [{"name": "bench-rpm", "rpm": 10**9}, {"name": "bench-tpm", "tpm": 10**12}]


def charge_every_request(doc: dict[str, Any], rate_limit: str) -> None:
    """services.rate_limit set to `rate_limit` (filter or check), and the first project given
    charged_quotas(): every request is then charged, as it is not under the bench manifest,
    which has no quota (a request no limit counts makes no rate-limit call)."""
    doc["services"]["rate_limit"] = rate_limit
    doc["organizations"][0]["projects"][0]["quotas"] = charged_quotas()


def hold_every_request(doc: dict[str, Any]) -> None:
    """The first project given a monthly budget too high to refuse anything: every request is
    then held against it by the Check and committed by costsink (after charge_every_request,
    which sets the project's quotas)."""
    doc["organizations"][0]["projects"][0].setdefault("quotas", []).append(
        {"name": "bench-budget", "spend_per_month": 10**9})


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p / 100 * len(xs)))]


def ms(x: float) -> str:
    return f"{x * 1000:.3f} ms"


async def closed_loop(call: Callable[[], Awaitable[Any]], check: Callable[[Any], bool],
                      seconds: float, concurrency: int) -> tuple[float, list[float]]:
    """`concurrency` callers, each calling again as soon as its answer arrives, for `seconds`;
    returns calls per second and every latency. 200 warm-up calls first."""
    for _ in range(200):
        await call()
    lat: list[float] = []
    end = time.perf_counter() + seconds

    async def worker() -> None:
        while time.perf_counter() < end:
            t = time.perf_counter()
            answer = await call()
            lat.append(time.perf_counter() - t)
            assert check(answer), answer
    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return len(lat) / (time.perf_counter() - started), lat


def serve_forever(add: Callable[[Any, grpc.aio.Server], None], servicer: Any, port: int) -> None:
    """Run one servicer (the no-op baselines) until the process is terminated."""
    async def run() -> None:
        server = grpc.aio.server()
        add(servicer, server)
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        await server.wait_for_termination()
    asyncio.run(run())


def check_request(key: str, route: str) -> external_auth_pb2.CheckRequest:
    req = external_auth_pb2.CheckRequest()
    attrs = req.attributes
    attrs.context_extensions["route"] = route
    attrs.request.http.headers["authorization"] = f"Bearer {key}"
    attrs.request.http.headers["content-type"] = "application/json"
    body = struct_pb2.Struct()
    body.update({"model": "gpt-5.4-mini", "stream": False, "max_tokens": 256})
    attrs.metadata_context.filter_metadata[REQUEST].CopyFrom(body)
    return req


async def check_load(port: int, req: external_auth_pb2.CheckRequest, seconds: float,
                     concurrency: int) -> tuple[float, list[float]]:
    """Checks in a closed loop; each carries its own x-request-id, as Envoy's do (budget holds
    are keyed by it)."""
    from envoy.service.auth.v3 import external_auth_pb2_grpc

    ids = itertools.count()

    def call() -> Any:
        r = external_auth_pb2.CheckRequest()
        r.CopyFrom(req)
        r.attributes.request.http.headers["x-request-id"] = f"bench-{next(ids)}"
        return stub.Check(r)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = external_auth_pb2_grpc.AuthorizationStub(ch)
        return await closed_loop(call, lambda r: r.status.code == 0, seconds, concurrency)


def bulk_keys(store: Path | str, pepper: bytes, keys: int, clients: int,
              place: Callable[[int], tuple[str, str]], prefix: str = "b") -> None:
    """`keys` runtime keys `{prefix}k<i>` (secret "s") of `clients` runtime clients
    `{prefix}c<c>`, client c in project place(c) = (org, project), written straight into the
    key store in one transaction: issuing them through the admin API would measure only its
    writes. Key i belongs to client i % clients. `store` is the SQLite file, or a PostgreSQL
    DSN whose search_path names the store's schema (the services must have created it)."""
    import json

    from tollway.keys import hash_secret

    secret_hash = hash_secret(pepper, "s")

    def client_docs() -> Any:
        for c in range(clients):
            org, project = place(c)
            yield f"{prefix}c{c}", json.dumps({"org": org, "project": project, "client": {
                "id": f"{prefix}c{c}", "user": {"tenant": f"t{c % 50}"}}})

    def key_specs() -> Any:
        for i in range(keys):
            org, project = place(i % clients)
            yield f"{prefix}k{i}", json.dumps({
                "org": org, "project": project, "client": f"{prefix}c{i % clients}",
                "key": {"id": f"{prefix}k{i}", "quotas": [{"rpm": 1000000}]}})
    if isinstance(store, Path):
        _bulk_sqlite(store, secret_hash, client_docs(), key_specs())
    else:
        asyncio.run(_bulk_postgres(store, secret_hash, client_docs(), key_specs()))


def _bulk_sqlite(db: Path, secret_hash: bytes, client_docs: Any, key_specs: Any) -> None:
    import sqlite3
    from datetime import UTC, datetime

    now = datetime.now(UTC).isoformat()
    con = sqlite3.connect(db)
    with con:
        seq = con.execute("SELECT seq FROM tollway_key_seq").fetchone()[0]
        seqs = itertools.count(seq + 1)
        con.executemany(
            "INSERT INTO tollway_objects (kind, id, doc, created_at, updated_at, seq) "
            "VALUES ('client', ?, ?, ?, ?, ?)",
            ((cid, doc, now, now, next(seqs)) for cid, doc in client_docs))
        con.executemany(
            "INSERT INTO tollway_keys (key_id, secret_hash, status, created_at, updated_at, "
            "seq, spec) VALUES (?, ?, 'active', ?, ?, ?, ?)",
            ((kid, secret_hash, now, now, next(seqs), spec) for kid, spec in key_specs))
        con.execute("UPDATE tollway_key_seq SET seq = ?", (next(seqs) - 1,))
    con.close()


async def _bulk_postgres(dsn: str, secret_hash: bytes, client_docs: Any,
                         key_specs: Any) -> None:
    """COPY, under the writers' lock, with sequence numbers taken from the store's sequence:
    the services' followers see the keys as any other write."""
    from datetime import UTC, datetime

    import asyncpg

    from tollway.keys.postgres import WRITE_LOCK

    now = datetime.now(UTC)
    clients, keys = list(client_docs), list(key_specs)
    conn = await asyncpg.connect(dsn)
    try:
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", WRITE_LOCK)
            last = await conn.fetchval("SELECT nextval('tollway_key_seq')")
            await conn.execute("SELECT setval('tollway_key_seq', $1)",
                               last + len(clients) + len(keys))
            seqs = itertools.count(last + 1)
            await conn.copy_records_to_table(
                "tollway_objects", columns=("kind", "id", "doc", "created_at", "updated_at",
                                            "seq"),
                records=[("client", cid, doc, now, now, next(seqs)) for cid, doc in clients])
            await conn.copy_records_to_table(
                "tollway_keys", columns=("key_id", "secret_hash", "status", "created_at",
                                         "updated_at", "seq", "spec"),
                records=[(kid, secret_hash, "active", now, now, next(seqs), spec)
                         for kid, spec in keys])
    finally:
        await conn.close()


def install_watched(path: Path, doc: dict[str, Any], gw: Gateway, applied: str) -> None:
    """Write a file the gateway's Envoy watches (lds.yaml, cds.yaml) as `tollway render`
    does, a rename its watch sees, and wait until Envoy's counter `applied` (e.g.
    `listener_manager.lds.update_success`) says it took it."""
    import yaml

    from tests.e2e.harness import envoy_stat

    admin_port = yaml.safe_load(gw.manifest_path.read_text())["gateway"]["admin_port"]
    before = envoy_stat(admin_port, applied)
    tmp = path.with_name(f".bench-{path.name}")
    tmp.write_text(yaml.safe_dump(doc))
    tmp.replace(path)
    deadline = time.monotonic() + 10
    while envoy_stat(admin_port, applied) == before:
        if time.monotonic() > deadline:
            raise SystemExit(f"Envoy did not apply {path.name} within 10 s")
        time.sleep(0.05)


def bare_envoy(manifest: Path, tmp: Path) -> tuple[subprocess.Popen[bytes], str]:
    """Envoy alone, the baseline: the manifest's rendered config with the router only (no
    filters, no access log, no per-route filter settings), started; its chat completion URL."""
    import yaml

    from tests.e2e.harness import free_port, tcp_open, wait_until
    from tollway.manifest import load
    from tollway.render import render
    from tollway.up import envoy_args, envoy_binary

    doc = render(load(manifest))
    port, admin = free_port(), free_port()
    listener = doc["static_resources"]["listeners"][0]
    listener["address"]["socket_address"]["port_value"] = port
    doc["admin"]["address"]["socket_address"]["port_value"] = admin
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["http_filters"] = [f for f in hcm["http_filters"]
                           if f["name"] == "envoy.filters.http.router"]
    hcm.pop("access_log", None)
    for r in hcm["route_config"]["virtual_hosts"][0]["routes"]:
        r.pop("typed_per_filter_config", None)
        r.get("route", {}).pop("rate_limits", None)
    cfg = tmp / "bare.yaml"
    cfg.write_text(yaml.safe_dump(doc))
    # the same Envoy process as the gateway's (one worker thread), with nothing but the router
    proc = subprocess.Popen([str(envoy_binary()), "-c", str(cfg), "--log-level", "error",
                             "--base-id", str(admin), *envoy_args(1)])
    wait_until(lambda: tcp_open(port), "bare envoy", proc=proc)
    return proc, f"http://127.0.0.1:{port}/v1/chat/completions"


def wrk_figures(out: str) -> dict[str, float]:
    """wrk --latency's output: requests/s, p50, p99 and max (ms), requests, non-2xx."""
    def ms_of(pattern: str) -> float:
        m = re.search(pattern + r"\s+([\d.]+)(us|ms|s)\b", out)
        if not m:
            raise RuntimeError(f"no {pattern!r} in wrk's output:\n{out}")
        return float(m.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[m.group(2)]

    def number(pattern: str) -> float:
        m = re.search(pattern, out)
        return float(m.group(1)) if m else 0.0
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if not rps:
        raise RuntimeError(f"no Requests/sec in wrk's output:\n{out}")
    return {"rps": float(rps.group(1)), "p50": ms_of("50%"), "p99": ms_of("99%"),
            "max": ms_of(r"Latency\s+\S+\s+\S+"), "requests": number(r"(\d+) requests in"),
            "non_2xx": number(r"Non-2xx or 3xx responses: (\d+)")}



def wrk_with_cpu(wrk: list[str], url: str, seconds: int, pids: dict[str, int],
                 warm_up: int = 2) -> tuple[dict[str, float], dict[str, float]]:
    """wrk's warm-up, then its measured run (`wrk`: the command without -d and --latency):
    its figures (wrk_figures) and the CPU per request (ms) of each process in `pids`."""
    subprocess.run([*wrk, f"-d{warm_up}s", url], capture_output=True)
    before = {n: cpu_seconds(pid) for n, pid in pids.items()}
    f = wrk_figures(subprocess.run([*wrk, f"-d{seconds}s", "--latency", url],
                                   capture_output=True, text=True).stdout)
    return f, {n: 1000 * (cpu_seconds(pid) - before[n]) / f["requests"]
               for n, pid in pids.items()}

LONG_MS = 10  # a garbage collection this long shows in p99s


def collections(metrics_port: int) -> dict[str, float]:
    """The serving process's full garbage collections so far (tollway_gc_pause_seconds of
    generation 2): how many, their total seconds and how many took LONG_MS or more."""
    text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).text

    def value(name: str, labels: str) -> float:
        m = re.search(rf"^tollway_gc_pause_seconds_{name}\{{{labels}\}} ([0-9.e+]+)$", text,
                      re.M)
        assert m, f"no tollway_gc_pause_seconds_{name}{{{labels}}} in the services' metrics"
        return float(m.group(1))
    full = 'generation="2"'
    count = value("count", full)
    under = value("bucket", f'generation="2",le="{LONG_MS / 1000}"')
    return {"full": count, "seconds": value("sum", full), "long": count - under}
