"""Run Tollway's gRPC services: one process may host one service or all of them.

Each service package exposes `build(ctx) -> Service`. This module owns what they share: the
grpc.aio servers (one per listen address in the manifest), health and reflection, the Prometheus
endpoint, the manifest watcher, and an orderly shutdown on SIGINT/SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import importlib
import logging
import signal
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from tollway.heap import collection_paused, measure_pauses, settle_heap
from tollway.keys import StoreUnavailable, open_key_store
from tollway.keys.mirror import KeyMirror
from tollway.manifest import Manifest
from tollway.reload import ManifestWatcher
from tollway.spend import SpendStore, open_spend_store
from tollway.tls import server_credentials, target

if TYPE_CHECKING:
    from ratelimit.backend import CounterBackend

log = logging.getLogger("tollway.serve")

SERVICE_NAMES = ("extauthz", "ratelimit", "costsink", "admin")
# where each service's `build(ctx)` lives
MODULES = {"extauthz": "extauthz", "ratelimit": "ratelimit", "costsink": "costsink",
           "admin": "tollway.admin"}


@dataclass
class ServiceContext:
    manifest_path: Path
    watcher: ManifestWatcher
    hosted: frozenset[str] = frozenset()  # the services this process serves
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _spend: SpendStore | None = None
    _counters: CounterBackend | None = None
    _keys: KeyMirror | None = None
    _keys_started: bool = False

    @property
    def manifest(self) -> Manifest:
        return self.watcher.manifest

    def key_mirror(self) -> KeyMirror:
        """One per process: every service that resolves a key's binding reads the same copy
        of the key store (keys, runtime clients)."""
        if self._keys is None:
            storage = self.manifest.storage
            self._keys = KeyMirror(open_key_store(storage.keys), capacity=storage.key_cache)
        return self._keys

    async def start_key_mirror(self, *, required: bool) -> None:
        """Open the store, load it, follow it. `required` (extauthz): a store that cannot be
        read at start stops the process. Otherwise (ratelimit, costsink, which must run while
        the key database is away) the follower keeps trying in the background."""
        if self._keys_started:
            return
        self._keys_started = True
        mirror = self.key_mirror()
        try:
            await mirror.store.open()
            await mirror.refresh()
        except StoreUnavailable:
            if required:
                raise
            log.warning("key store unreachable at start; runtime keys resolve once it answers")
        self.tasks.append(asyncio.create_task(mirror.follow(), name="key-mirror"))

    def spend_store(self) -> SpendStore:
        """One per process: with `counters: memory`, extauthz's holds and costsink's commits
        must meet in the same object."""
        if self._spend is None:
            self._spend = open_spend_store(self.manifest.storage.counters)
        return self._spend

    def counter_backend(self) -> CounterBackend:
        """One per process: ratelimit's, and extauthz's when it answers the rate limit in its
        Check (`services.rate_limit: check`), so that settlement corrects the counters the
        Check charged."""
        if self._counters is None:
            from ratelimit import open_backend

            self._counters = open_backend(self.manifest.storage.counters)
        return self._counters


class Service(Protocol):
    grpc_names: tuple[str, ...]  # full service names, for health and reflection

    def register(self, server: grpc.aio.Server) -> None: ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


def time_remaining(context: grpc.aio.ServicerContext | None) -> float | None:
    """What is left of the deadline Envoy sent with a call (None: no deadline)."""
    return context.time_remaining() if context is not None else None


def past_deadline(context: grpc.aio.ServicerContext | None) -> bool:
    """Envoy has stopped waiting for this call: whatever it answers, Envoy has refused the
    request already (503), and it never reaches the provider."""
    remaining = time_remaining(context)
    return remaining is not None and remaining <= 0.005


def _address(manifest: Manifest, name: str, worker: int = 0) -> str:
    """Where the service binds: services.listen, else the address Envoy dials; worker i of
    several binds the port + i (costsink, one process of its own, its port)."""
    host, port = manifest.services.bind(name)
    return target(host, port + (worker if name != "costsink" else 0))


async def serve(manifest_path: Path, names: list[str], *, metrics: bool = True,
                metrics_address: tuple[str, int] | None = None,
                stop: asyncio.Event | None = None, worker: int = 0,
                manifest: Manifest) -> None:
    """`manifest`: the manifest at `manifest_path`, as run() loaded it (10,000 projects of
    YAML take half a second to load: once per process)."""
    watcher = ManifestWatcher(manifest_path, manifest)
    ctx = ServiceContext(manifest_path=manifest_path, watcher=watcher, hosted=frozenset(names))
    if ctx.spend_store().shared_in_process and {"extauthz", "costsink"} - set(names) \
            and {"extauthz", "costsink"} & set(names):
        raise SystemExit("storage.counters is 'memory': spend lives in one process, so "
                         "extauthz and costsink must be served together (--services "
                         "extauthz,ratelimit,costsink); use redis:// to run them apart")
    if ctx.manifest.services.rate_limit == "check" and ctx.manifest.storage.counters == "memory" \
            and len({"extauthz", "ratelimit"} & set(names)) == 1:
        raise SystemExit("services.rate_limit is 'check' and storage.counters 'memory': the "
                         "counters live in one process, so extauthz and ratelimit must be "
                         "served together; use redis:// to run them apart")
    services: dict[str, Service] = {}
    for name in names:
        module = importlib.import_module(MODULES[name])
        services[name] = await module.build(ctx)
    watcher.in_force()

    by_address: dict[str, list[str]] = defaultdict(list)
    for name in names:
        by_address[_address(ctx.manifest, name, worker)].append(name)
    servers: list[grpc.aio.Server] = []
    health_servicers: list[health.aio.HealthServicer] = []
    for address, hosted in by_address.items():
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        grpc_names = [n for name in hosted for n in services[name].grpc_names]
        for name in hosted:
            services[name].register(server)
        reflection.enable_server_reflection(
            [*grpc_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME], server)
        tls = ctx.manifest.services.tls
        bound = server.add_secure_port(address, server_credentials(tls)) if tls \
            else server.add_insecure_port(address)
        if bound == 0:
            raise OSError(f"cannot listen on {address}")
        servers.append(server)
        health_servicers.append(health_servicer)
        for n in grpc_names:
            await health_servicer.set(n, health_pb2.HealthCheckResponse.NOT_SERVING)

    health_only = await _health_port(ctx.manifest)
    with collection_paused():  # the key mirror's first load: storage.key_cache records
        for s in services.values():
            await s.start()
        # the manifest, what the services compiled from it and the key mirror's first load:
        # out of every garbage collection from now on (frozen before a collection can walk
        # them). With the mirror's records left in, each full collection walked them while
        # requests waited (34-57 ms with 100,000 records held)
        settle_heap()
    for server in servers:
        await server.start()
    for hs, (_, hosted) in zip(health_servicers, by_address.items(), strict=True):
        for mirror in (hs, *([health_only[1]] if health_only else [])):
            for name in hosted:
                for n in services[name].grpc_names:
                    await mirror.set(n, health_pb2.HealthCheckResponse.SERVING)
            await mirror.set("", health_pb2.HealthCheckResponse.SERVING)
    if metrics:
        host, port = metrics_address or (ctx.manifest.services.metrics_host,
                                         ctx.manifest.services.metrics_port)
        start_http_server(port, addr=host)
        measure_pauses()
    ctx.tasks.append(asyncio.create_task(watcher.run(), name="manifest-watcher"))
    log.info("serving %s on %s", ", ".join(names), ", ".join(by_address))

    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        # not possible off the main thread (tests run servers in their own loops)
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    await stop.wait()

    log.info("shutting down")
    for hs in (*health_servicers, *([health_only[1]] if health_only else [])):
        await hs.enter_graceful_shutdown()
    await asyncio.gather(*(server.stop(grace=5) for server in servers))
    if health_only is not None:
        await health_only[0].stop(grace=1)
    for task in ctx.tasks:
        task.cancel()
    if ctx.tasks:
        _, stuck = await asyncio.wait(ctx.tasks, timeout=5)
        for task in stuck:  # never hang a shutdown on one task; say which
            log.error("task %s did not stop within 5 s", task.get_name())
    for s in services.values():
        await s.stop()
    if ctx._keys is not None:
        await ctx._keys.store.close()
    await ctx.spend_store().close()
    if ctx._counters is not None:
        await ctx._counters.close()


async def _health_port(m: Manifest) -> tuple[grpc.aio.Server, health.aio.HealthServicer] | None:
    """The gRPC health service alone, plaintext, on services.health: kubelet probes cannot
    present a client certificate. It reports what the service ports report."""
    if m.services.health is None:
        return None
    server = grpc.aio.server()
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    address = target(*m.services.health)
    if server.add_insecure_port(address) == 0:
        raise OSError(f"cannot listen on {address} (services.health)")
    await server.start()
    return server, servicer


def run(manifest_path: Path, names: list[str],
        metrics_address: tuple[str, int] | None = None, worker: int | None = None,
        manifest: Manifest | None = None) -> int:
    """`worker` None: this process serves, or with services.workers > 1 supervises the
    workers (one process each, one core each: tollway/workers.py). `manifest`: the one at
    `manifest_path`, if the caller has loaded it (it is loaded once per process: 10,000
    projects took a second of a start on a slow machine)."""
    from tollway.manifest.beside import load_here

    m = manifest or load_here(manifest_path)
    workers = m.services.workers
    # costsink alone (served apart) is one process whatever services.workers says
    if worker is None and workers > 1 and set(names) != {"costsink"}:
        from tollway.workers import supervise

        return supervise(manifest_path, names, workers,
                         metrics_address or (m.services.metrics_host, m.services.metrics_port))
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    faulthandler.register(signal.SIGUSR1)  # `kill -USR1` prints every thread's stack
    if worker is not None:  # the supervisor runs costsink in a process of its own
        names = [n for n in names if n != "costsink"]
    if m.services.pin_cpus and set(names) != {"costsink"}:
        from tollway.workers import pin_to_cpu

        pin_to_cpu(worker or 0)
    asyncio.run(serve(manifest_path, names, metrics_address=metrics_address,
                      worker=worker or 0, manifest=m))
    return 0
