"""services.workers: one `tollway serve` process per core, kept running by a supervisor.

Worker i listens on each service's port + i and exposes its metrics on the metrics port + i;
Envoy balances each call over the workers' ports and sends a call that could not reach one to
another (render.service_retry). So a worker that dies (kill -9, the OOM killer) costs no
request, and the supervisor starts it again. A process that fails soon after it started (a port
taken, a manifest it cannot read, a crash on every request) would only fail again: the
supervisor then stops the set and exits with that process's status, for the orchestrator to
see and restart the set as it would one process.

costsink, which must be one (one spool, one access-log file), runs in a process of its own
beside the workers, its metrics on the metrics port + workers, and is started again the same
way (Envoy's access-log file holds what its stream could not deliver meanwhile). Reading
Envoy's access-log flushes there keeps them off the loops that answer the Checks (the p99 in
docs/performance.md); with the Redis counters workers need, it settles tokens on Redis.

With services.pin_cpus each worker runs on a CPU of its own (pin_to_cpu), as a single
`tollway serve` does on one.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

log = logging.getLogger("tollway.workers")

# a worker that exits sooner than this after its start is not restarted
STEADY_AFTER = 10.0


def cpu_for(worker: int, allowed: set[int]) -> int:
    """The CPU worker `worker` is pinned to: the last of those allowed for worker 0, the one
    before for worker 1, and so on, round again past the first (CPU 0 takes the most of the
    kernel's own work)."""
    cpus = sorted(allowed, reverse=True)
    return cpus[worker % len(cpus)]


def pin_to_cpu(worker: int) -> int | None:
    """services.pin_cpus: this process and every thread it has or will start run on one CPU
    (cpu_for). Each request crosses from gRPC's poller thread, which reads the sockets, to the
    event loop and back several times; on one CPU each such wake-up is a run-queue entry, on
    two an inter-processor interrupt (bench/gateway_http.py --pin-cpus). Returns the CPU, or
    None where the platform cannot pin."""
    if not hasattr(os, "sched_setaffinity"):
        log.warning("services.pin_cpus: this platform cannot pin a process to a CPU; "
                    "running unpinned")
        return None
    allowed = os.sched_getaffinity(0)
    cpu = cpu_for(worker, allowed)
    if worker >= len(allowed):
        log.warning("services.pin_cpus: more workers than the %d CPUs this process may use; "
                    "worker %d shares CPU %d with another", len(allowed), worker, cpu)
    # the threads already started (the ones started later inherit the pin from theirs)
    for task in os.listdir("/proc/self/task"):
        with contextlib.suppress(ProcessLookupError):  # a thread that ended meanwhile
            os.sched_setaffinity(int(task), {cpu})
    log.info("pinned to CPU %d (services.pin_cpus)", cpu)
    return cpu


def _name(i: int, workers: int) -> str:
    return f"worker {i}" if i < workers else "costsink"


def supervise(manifest_path: Path, names: list[str], workers: int,
              metrics_address: tuple[str, int]) -> int:
    """Run `workers` worker processes, and costsink's own if `names` has it, until SIGTERM or
    SIGINT (then 0), or until one fails within STEADY_AFTER of its start (then its status: 128
    + N for signal N, 1 for a process that exited with 0 unasked)."""
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    host, port = metrics_address
    serve = [sys.executable, "-m", "tollway.cli", "serve", "--manifest", str(manifest_path)]
    # what each process serves: the workers', then costsink's own (the last index)
    roles = [["--services", ",".join(n for n in names if n != "costsink"), "--worker", str(i)]
             for i in range(workers)]
    if "costsink" in names:
        roles.append(["--services", "costsink"])

    def start(i: int) -> tuple[subprocess.Popen[bytes], float]:
        return subprocess.Popen([*serve, *roles[i], "--metrics", f"{host}:{port + i}"]), \
            time.monotonic()

    procs = [start(i) for i in range(len(roles))]
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True
        for proc, _started in procs:
            if proc.poll() is None:
                proc.terminate()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stop)
    status = 0
    while not stopping:
        for i, (proc, started) in enumerate(procs):
            try:
                code = proc.wait(timeout=0.5 / len(procs))
            except subprocess.TimeoutExpired:
                continue
            if stopping:
                break
            if time.monotonic() - started < STEADY_AFTER:
                log.error("%s exited with status %d %.1f s after it started; stopping the "
                          "others", _name(i, workers), code, time.monotonic() - started)
                # a worker killed by a signal: the status a shell would report
                status = 128 - code if code < 0 else code or 1
                stop()
                break
            log.error("%s exited with status %d; starting it again", _name(i, workers), code)
            procs[i] = start(i)
    for proc, _started in procs:
        proc.wait()
    return status
