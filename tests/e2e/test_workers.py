"""services.workers: several `tollway serve` processes (one core each) behind one Envoy, which
spreads the Checks over them; the rate limit stays exact across them (Redis counters)."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import sqlite3
from collections.abc import Iterator
from itertools import pairwise
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml

from tollway.workers import STEADY_AFTER

from .harness import Gateway, PrivateRedis, run_gateway, tcp_open, wait_until

pytestmark = pytest.mark.e2e


@contextlib.contextmanager
def two_workers(tmp_path: Path, quotas: list[dict[str, Any]] | None = None,
                **services: Any) -> Iterator[Gateway]:
    """A gateway with services.workers 2 on Redis counters of its own (several workers need
    shared counters), `services` set beside them and `quotas` on the project; the Redis is
    killed after. One `tollway serve` of every service: the supervisor runs the workers and
    costsink's own process."""
    redis = PrivateRedis(tmp_path)
    redis.start()

    def mutate(doc: dict[str, Any]) -> None:
        doc["services"].update(workers=2, **services)
        doc["storage"]["counters"] = redis.url
        if quotas is not None:
            doc["organizations"][0]["projects"][0]["quotas"] = quotas

    try:
        with run_gateway(tmp_path, mutate=mutate) as gw:
            yield gw
    finally:
        redis.kill()


def checks_served(metrics_port: int) -> float:
    text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).text
    return sum(float(v) for v in re.findall(
        r'^tollway_extauthz_decisions_total\{[^}]*\} ([0-9.e+]+)$', text, re.M))


@pytest.mark.parametrize("rate_limit", ["filter", "check"])
def test_two_workers_share_the_checks_and_one_set_of_limits(tmp_path: Path,
                                                            rate_limit: str) -> None:
    """Charged by the rate-limit filter's calls or in the Checks, spread over both workers."""
    with two_workers(tmp_path, quotas=[{"name": "thirty", "rpm": 30}],
                     rate_limit=rate_limit) as gw:
        client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=gw.issue("k-main"),
                               max_retries=0)
        outcomes = []
        for _ in range(40):
            try:
                client.chat.completions.create(model="gpt-5.4-mini", messages=[
                    {"role": "user", "content": "hi"}])
                outcomes.append(200)
            except openai.RateLimitError:
                outcomes.append(429)
        assert outcomes == [200] * 30 + [429] * 10
        metrics = yaml.safe_load(gw.manifest_path.read_text())["services"]["metrics_port"]
        served = [checks_served(metrics), checks_served(metrics + 1)]
        # Envoy balances round robin over the workers' ports
        assert all(n >= 15 for n in served), served


def _children(supervisor: int) -> Iterator[tuple[int, dict[bytes, bytes]]]:
    """The supervisor's child processes: pid, and the value of each `--option` on its command
    line (none for one that died, until the supervisor reaps it: its command line is empty)."""
    for task in Path(f"/proc/{supervisor}/task").iterdir():
        for child in (task / "children").read_text().split():
            argv = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
            yield int(child), {a: v for a, v in pairwise(argv) if a.startswith(b"--")}


def _workers(supervisor: int) -> dict[int, int]:
    """The supervisor's worker processes: worker number → pid."""
    return {int(options[b"--worker"]): pid for pid, options in _children(supervisor)
            if b"--worker" in options}


def _costsink(supervisor: int) -> int | None:
    """The supervisor's costsink process, if it has one running."""
    return next((pid for pid, options in _children(supervisor)
                 if options.get(b"--services") == b"costsink"), None)


def test_costsink_runs_beside_the_workers_and_records_every_request(tmp_path: Path) -> None:
    """costsink is one process of the supervisor's, not a worker's guest: no worker hosts it,
    every request is recorded once, and one killed is started again."""
    with two_workers(tmp_path) as gw:
        client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=gw.issue("k-main"),
                               max_retries=0)
        supervisor = gw.named["services"].pid
        workers = _workers(supervisor)
        assert set(workers) == {0, 1}
        for pid, options in _children(supervisor):
            if pid in workers.values():
                assert b"costsink" not in options[b"--services"], options
        sink = _costsink(supervisor)
        assert sink is not None
        metrics = yaml.safe_load(gw.manifest_path.read_text())["services"]["metrics_port"]
        wait_until(lambda: tcp_open(metrics + 2), "costsink's metrics on the port + workers")
        assert "tollway_costsink_entries_total" in httpx.get(
            f"http://127.0.0.1:{metrics + 2}/metrics", timeout=5).text
        ids = [client.chat.completions.with_raw_response.create(
            model="gpt-5.4-mini", messages=[{"role": "user", "content": "hi"}]
        ).headers["x-request-id"] for _ in range(6)]

        def recorded() -> list[str]:
            db = gw.manifest_path.parent / "state" / "ledger.db"
            if not db.exists():
                return []
            with contextlib.closing(sqlite3.connect(db)) as conn:
                return [r[0] for r in conn.execute("SELECT request_id FROM tollway_ledger")]
        wait_until(lambda: len(recorded()) >= len(ids), "the six requests in the ledger")
        assert sorted(recorded()) == sorted(ids)
        wait_until(lambda: _age(sink) > STEADY_AFTER, "costsink past its start",
                   timeout=STEADY_AFTER + 10)
        os.kill(sink, signal.SIGKILL)
        wait_until(lambda: _costsink(supervisor) not in (None, sink), "costsink started again",
                   proc=gw.named["services"])
        wait_until(lambda: tcp_open(int(yaml.safe_load(gw.manifest_path.read_text())[
            "services"]["costsink"].rsplit(":", 1)[1])), "costsink listening again")


def _stat(pid: int) -> list[str]:
    """A process's /proc stat fields after its command name (state first; proc(5)'s field
    numbers less 3)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def _age(pid: int) -> float:
    """Seconds since the process started."""
    ticks = int(_stat(pid)[19])
    uptime = float(Path("/proc/uptime").read_text().split()[0])
    return uptime - ticks / os.sysconf("SC_CLK_TCK")


def _gone(pid: int) -> bool:
    """The process has exited and its sockets are closed (a zombie until reaped, or reaped)."""
    try:
        return _stat(pid)[0] == "Z"
    except FileNotFoundError:
        return True


def test_a_worker_killed_costs_no_request_and_is_started_again(tmp_path: Path) -> None:
    """A hung worker (kill -STOP) is left out by Envoy's health checks and taken back when it
    answers again. A killed one (kill -9, as the OOM killer does): Envoy sends the calls that
    cannot reach it to the other worker, and the supervisor starts it again. A worker that
    dies again soon after its start stops the set, for the orchestrator."""
    with two_workers(tmp_path) as gw:
        client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=gw.issue("k-main"),
                               max_retries=0)

        def ask() -> None:  # raises unless the answer is a 200
            client.chat.completions.create(model="gpt-5.4-mini", messages=[
                {"role": "user", "content": "hi"}])
        doc = yaml.safe_load(gw.manifest_path.read_text())
        metrics = doc["services"]["metrics_port"]

        def stats() -> dict[str, int]:
            text = httpx.get(f"http://127.0.0.1:{doc['gateway']['admin_port']}/stats"
                             "?filter=membership_healthy").text
            return {k: int(v) for k, v in (line.split(": ") for line in text.splitlines())}

        def healthy(n: int) -> bool:  # as Envoy's gRPC health checks find the ports
            s = stats()
            return all(s[f"cluster.tollway_{c}.membership_healthy"] == n
                       for c in ("extauthz", "ratelimit"))
        wait_until(lambda: healthy(2), "both workers healthy in Envoy's eyes")
        supervisor = gw.named["services"]
        first = _workers(supervisor.pid)[1]

        # a worker that hangs (kill -STOP: its port still accepts, nothing answers) is left
        # out once its health checks fail, and taken back when it answers again
        ask()
        os.kill(first, signal.SIGSTOP)
        try:
            wait_until(lambda: healthy(1), "the hung worker left out")
            for _ in range(10):
                ask()
        finally:
            os.kill(first, signal.SIGCONT)
        wait_until(lambda: healthy(2), "the worker taken back")
        # a worker that dies in its first seconds is not started again (STEADY_AFTER)
        wait_until(lambda: _age(first) > STEADY_AFTER, "worker 1 past its start",
                   timeout=STEADY_AFTER + 10)
        ask()
        os.kill(first, signal.SIGKILL)
        wait_until(lambda: _gone(first), "worker 1 gone")
        failed = []
        for n in range(20):  # round robin gives worker 1's port every other call
            try:
                ask()
            except openai.APIStatusError as e:
                failed.append((n, e.status_code))
        # Envoy sent each call that could not reach worker 1 to worker 0. Only the first
        # call Envoy's round robin gives worker 1 after the death may fail (503, which the
        # SDKs retry by default): its Check can meet a connection to worker 1 that Envoy has
        # not yet seen closed. That is request 0 or 1, by where the round robin stands after
        # the health changes above
        assert failed in ([], [(0, 503)], [(1, 503)]), failed
        wait_until(lambda: _workers(supervisor.pid).get(1, first) != first,
                   "worker 1 started again", proc=supervisor)
        wait_until(lambda: healthy(2), "worker 1 healthy again")
        wait_until(lambda: tcp_open(metrics + 1), "worker 1's metrics")

        def served_by_the_new_worker() -> bool:
            ask()
            return checks_served(metrics + 1) > 0
        wait_until(served_by_the_new_worker, "a Check served by the new worker 1")
        assert supervisor.poll() is None

        workers = _workers(supervisor.pid)
        os.kill(workers[1], signal.SIGKILL)
        assert supervisor.wait(timeout=10) == 128 + signal.SIGKILL
        assert not Path(f"/proc/{workers[0]}").exists()  # stopped and reaped


def _cpus_of_threads(pid: int) -> list[set[int]]:
    """The CPUs each thread of the process may run on (a thread that ended meanwhile is
    left out)."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(ProcessLookupError):
            found.append(os.sched_getaffinity(int(task.name)))
    return found


def test_pinned_workers_run_each_on_a_cpu_of_its_own(tmp_path: Path) -> None:
    """services.pin_cpus: every thread of a worker, those gRPC started after the pin included,
    on one CPU; the two workers on two CPUs; the supervisor, nearly idle, left unpinned."""
    allowed = os.sched_getaffinity(0)
    with two_workers(tmp_path, pin_cpus=True) as gw:
        client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=gw.issue("k-main"),
                               max_retries=0)
        for _ in range(4):  # both workers serve (round robin), their threads all started
            client.chat.completions.create(model="gpt-5.4-mini", messages=[
                {"role": "user", "content": "hi"}])
        supervisor = gw.named["services"].pid
        workers = _workers(supervisor)
        assert set(workers) == {0, 1}
        cpus = sorted(allowed, reverse=True)
        for i, pid in workers.items():
            threads = _cpus_of_threads(pid)
            # gRPC's poller thread and the rest, not the main thread alone
            assert len(threads) > 2
            assert all(t == {cpus[i % len(cpus)]} for t in threads), (i, threads)
        assert all(t == allowed for t in _cpus_of_threads(supervisor))
