"""Start a real gateway for a test: mock provider, `tollway serve`, and Envoy from the wheel.

Every process is a real subprocess on loopback ports chosen free at start; readiness is polled
with a deadline, never slept for.
"""

from __future__ import annotations

import gzip
import json
import os
import random
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import redis
import yaml

from tollway.render import SAFE_DUMPER
from tollway.up import envoy_args, envoy_binary

ROOT = Path(__file__).resolve().parents[2]
PROVIDER_KEY = "sk-provider-secret-0123456789"


_handed_out: set[int] = set()
# the services.workers the e2e tests run, and the ports each worker i binds at + i (and
# costsink's metrics at the metrics port + workers)
MAX_WORKERS = 2
PER_WORKER = frozenset({"extauthz", "ratelimit", "admin_api", "metrics"})
WORKER_SPAN = MAX_WORKERS + 1


def free_port(span: int = 1) -> int:
    """A port free now, below Linux's ephemeral range (32768-60999): a port the kernel picked
    from that range could be taken by an outgoing connection before our server binds it.
    `span`: the first of that many consecutive ports, all free and none handed out before, for
    a server whose processes bind the port + i (services.workers: worker i, costsink's
    metrics on the metrics port + workers)."""
    while True:
        port = random.randrange(20000, 32000 - span)
        block = range(port, port + span)
        if _handed_out.intersection(block) or not all(_bindable(p) for p in block):
            continue
        _handed_out.update(block)
        return port


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def wait_until(check: Any, what: str, timeout: float = 20.0, proc: Any = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: process exited with {proc.returncode}")
        try:
            if check():
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{what} not ready within {timeout}s")


def works_within(seconds: float, call: Any) -> float:
    """Poll `call` until it succeeds (a key issued or changed a moment ago); the time it
    took."""
    start = time.monotonic()
    while True:
        try:
            call()
            return time.monotonic() - start
        except (openai.AuthenticationError, openai.PermissionDeniedError):
            assert time.monotonic() - start < seconds, f"not working after {seconds}s"
            time.sleep(0.02)


def revoked_within(seconds: float, call: Any) -> None:
    """Poll `call` until it is refused for its key's revocation (403 key_revoked); a 429 on
    the way is the key's rpm, not yet the revocation."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            call()
        except openai.PermissionDeniedError as e:
            assert e.code == "key_revoked"
            return
        except openai.RateLimitError:
            pass
        assert time.monotonic() < deadline, f"the revocation was not honoured in {seconds} s"
        time.sleep(0.02)


def tcp_open(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=0.2):
        return True


def base_manifest(ports: dict[str, int], keys_dsn: str) -> dict[str, Any]:
    provider = {"upstream": {"host": "127.0.0.1", "port": ports["mock"]}, "mock": True,
                "credential": "env:MOCK_PROVIDER_KEY"}
    return {
        "version": 1,
        "gateway": {"listen": f"127.0.0.1:{ports['gateway']}", "admin_port": ports["admin"],
                    "max_request_bytes": 65536},
        "services": {"extauthz": f"127.0.0.1:{ports['extauthz']}",
                     "ratelimit": f"127.0.0.1:{ports['ratelimit']}",
                     "costsink": f"127.0.0.1:{ports['costsink']}",
                     **({"admin": f"127.0.0.1:{ports['admin_api']}"}
                        if "admin_api" in ports else {}),
                     "metrics_port": ports["metrics"]},
        "storage": {"keys": keys_dsn, "pepper": "file:pepper"},
        "providers": [
            {"name": "openai", "dialect": "openai", **provider,
             "models": [{"name": "gpt-5.4-mini"}, {"name": "gpt-5.4"}]},
            {"name": "anthropic", "dialect": "anthropic", **provider, "identity_headers": True,
             "models": [{"name": "claude-haiku"}, {"name": "claude-opus"}]},
        ],
        "routes": [
            {"path": "/v1/chat/completions", "provider": "openai"},
            {"path": "/v1/embeddings", "provider": "openai"},
            {"path": "/v1/responses", "provider": "openai"},
            {"path": "/v1/messages", "provider": "anthropic"},
        ],
        "rate_card": {"version": "test-2026-11", "currency": "USD", "prices": [
            {"provider": "openai", "model": "gpt-5.4-mini", "input": 0.75, "output": 4.50,
             "cached_input": 0.075},
            {"provider": "openai", "model": "gpt-5.4", "input": 2.50, "output": 15.00,
             "cached_input": 0.25},
            {"provider": "anthropic", "model": "claude-haiku", "input": 1.00, "output": 5.00,
             "cached_input": 0.10},
        ]},
        "organizations": [{"id": "acme", "projects": [{"id": "team-ai", "clients": [
            {"id": "app", "keys": [
                {"id": "k-main"}, {"id": "k-suspend"}, {"id": "k-revoke"}, {"id": "k-expire"},
                {"id": "k-rotate"}, {"id": "k-reload"},
                {"id": "k-mini", "models": ["gpt-5.4-mini", "claude-haiku"]},
                {"id": "k-never-issued"}, {"id": "k-unissued"},
            ]}]}]}],
    }


def offline_manifest() -> dict[str, Any]:
    """The base manifest on fixed ports, for tests that load or compile it without running
    anything."""
    return base_manifest({n: 1000 + i for i, n in enumerate(
        ("mock", "gateway", "admin", "extauthz", "ratelimit", "costsink", "metrics"))},
        "sqlite:///unused")


def manifest_text(doc: dict[str, Any]) -> str:
    """The manifest as YAML, by libyaml where it is built in (PyYAML's own dumper takes 2 s for
    10,000 projects, libyaml 0.7 s; the same text)."""
    return str(yaml.dump(doc, Dumper=SAFE_DUMPER))


def envoy_stat(admin_port: int, name: str) -> int:
    """One of Envoy's counters or gauges from its admin port; 0 before it first counts."""
    with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/stats?format=json&filter="
                                f"^{name}$", timeout=2) as r:
        stats = json.load(r)["stats"]
    return int(stats[0]["value"]) if stats else 0


@dataclass
class Gateway:
    url: str
    mock_url: str
    manifest_path: Path
    env: dict[str, str]
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    issued: dict[str, str] = field(default_factory=dict)
    # each process by name, and how to start it again (tests kill and restart them)
    named: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    starters: dict[str, Any] = field(default_factory=dict)

    def kill(self, name: str) -> None:
        """kill -9, as an OOM killer or a node failure does."""
        self.named[name].kill()
        self.named[name].wait()

    def start(self, name: str) -> None:
        self.starters[name]()

    def run_cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run `tollway <command...> --manifest M <rest...>`; `args` ends the command at '--'."""
        split = args.index("--") if "--" in args else len(args)
        cmd = [sys.executable, "-m", "tollway.cli", *args[:split], "--manifest",
               str(self.manifest_path), *args[split + 1:]]
        return subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=30)

    def cli(self, *args: str) -> str:
        out = self.run_cli(*args)
        if out.returncode != 0:
            raise RuntimeError(f"tollway {' '.join(args)} failed: {out.stderr}")
        return out.stdout.strip()

    def issue(self, key_id: str) -> str:
        self.issued[key_id] = self.cli("keys", "issue", "--", key_id)
        return self.issued[key_id]

    def seen(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = httpx.get(f"{self.mock_url}/_mock/seen").json()
        return result

    def write_manifest(self, doc: dict[str, Any], packed: bool = False) -> None:
        """`packed`: gzip-compressed, as a ConfigMap holds a big manifest."""
        tmp = self.manifest_path.with_suffix(".tmp")
        text = manifest_text(doc).encode()
        tmp.write_bytes(gzip.compress(text) if packed else text)
        tmp.replace(self.manifest_path)  # atomic, like a ConfigMap symlink swap

    def reload(self, doc: dict[str, Any], outcome: str = "manifest reloaded",
               packed: bool = False, timeout: float = 20.0) -> str:
        """Write the manifest, wait for the services' log line saying `outcome`, and return the
        log from that line on (a refusal lists its problems on the lines after it)."""
        log = self.manifest_path.parent / "logs" / "services.log"
        before = log.read_text().count(outcome)
        self.write_manifest(doc, packed)
        written = time.monotonic()  # after: libyaml takes 0.7 s to write 10,000 projects
        wait_until(lambda: log.read_text().count(outcome) > before, f"'{outcome}'", timeout)
        text = log.read_text()
        at = -1
        for _ in range(before + 1):
            at = text.index(outcome, at + 1)
        line = text[at:].partition("\n")[0]
        print(f"{outcome} {time.monotonic() - written:.2f} s after the write: {line[-80:]}")
        return text[at:]


class PrivateRedis:
    """A Redis of a test's own, to stall, kill and restart without touching the shared one."""

    def __init__(self, tmp: Path) -> None:
        self.port, self.dir = free_port(), tmp
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        # no persistence: a restart loses every counter, as an unconfigured Redis does
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.dir), "--enable-debug-command", "local"],
            stdout=subprocess.DEVNULL)
        wait_until(lambda: tcp_open(self.port), "redis", proc=self.proc)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()  # kill -9
        self.proc.wait()

    @property
    def url(self) -> str:
        """Its URL as a manifest's storage names it."""
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port)


@contextmanager
def run_gateway(tmp: Path, keys_dsn: str = "sqlite:///keys.db", mutate: Any = None,
                split: bool = False, envoy_config: Any = None,
                ratelimit_apart: bool = False, root: Path = ROOT) -> Iterator[Gateway]:
    """`split`: costsink in a process of its own (needs Redis counters), as an operator
    running the services apart has it; `gw.kill("costsink")`, `gw.start("costsink")`.
    `ratelimit_apart`: ratelimit in a process of its own ("ratelimit"), holding memory
    counters, which costsink then settles through its Settle call.
    `envoy_config(manifest_path, ports) -> Path`: Envoy's config from elsewhere than
    `tollway render` (an Istio-shaped gateway). `root`: the checkout whose code every
    process of the gateway runs (a benchmark's baseline: another commit's worktree)."""
    # the ports services.workers adds a worker's number to (WORKER_SPAN) come in blocks
    ports = {n: free_port(WORKER_SPAN if n in PER_WORKER else 1)
             for n in ("mock", "gateway", "admin", "extauthz", "ratelimit", "costsink",
                       "metrics", "metrics2", "admin_api")}
    doc = base_manifest(ports, keys_dsn)
    # absolute: this process renders Envoy's config, and its state dir is not the gateway's
    doc["gateway"]["access_log_file"] = str(tmp / "state" / "envoy-access.jsonl")
    if mutate:
        mutate(doc)
    assert doc["services"].get("workers", 1) <= MAX_WORKERS, "raise MAX_WORKERS: ports clash"
    manifest_path = tmp / "manifest.yaml"
    manifest_path.write_text(manifest_text(doc))
    env = {**os.environ, "TOLLWAY_STATE_DIR": str(tmp / "state"),
           "MOCK_PROVIDER_KEY": PROVIDER_KEY, "PYTHONUNBUFFERED": "1"}
    gw = Gateway(url=f"http://127.0.0.1:{ports['gateway']}",
                 mock_url=f"http://127.0.0.1:{ports['mock']}", manifest_path=manifest_path,
                 env=env)
    logs = tmp / "logs"
    logs.mkdir(exist_ok=True)

    def spawn(name: str, cmd: list[str]) -> subprocess.Popen[bytes]:
        out = (logs / f"{name}.log").open("ab")
        p = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=root)
        gw.procs.append(p)
        gw.named[name] = p
        gw.starters[name] = lambda: spawn(name, cmd)
        return p

    try:
        mock = spawn("mock", [sys.executable, "-m", "tollway.mock_provider", "--port",
                              str(ports["mock"]), "--expected-key", PROVIDER_KEY])
        wait_until(lambda: tcp_open(ports["mock"]), "mock provider", proc=mock)
        serve = [sys.executable, "-m", "tollway.cli", "serve", "--manifest", str(manifest_path)]
        hosted = ["extauthz", *([] if ratelimit_apart else ["ratelimit"]),
                  *([] if split else ["costsink"]), "admin"]
        svc = spawn("services", [*serve, "--services", ",".join(hosted)])
        sink = spawn("costsink", [*serve, "--services", "costsink", "--metrics",
                                  f"127.0.0.1:{ports['metrics2']}"]) if split else svc
        limiter = spawn("ratelimit", [*serve, "--services", "ratelimit", "--metrics",
                                      "127.0.0.1:0"]) if ratelimit_apart else svc
        wait_until(lambda: tcp_open(ports["extauthz"]), "extauthz", proc=svc)
        wait_until(lambda: tcp_open(ports["ratelimit"]), "ratelimit", proc=limiter)
        wait_until(lambda: tcp_open(ports["costsink"]), "costsink", proc=sink)
        wait_until(lambda: tcp_open(ports["admin_api"]), "admin", proc=svc)
        if envoy_config:
            config = envoy_config(manifest_path, ports)
        else:
            # Envoy follows the files `tollway render --watch` keeps current, as in a pod
            config = tmp / "envoy" / "envoy.yaml"
            renderer = spawn("renderer", [sys.executable, "-m", "tollway.cli", "render",
                                          "--manifest", str(manifest_path), "--dir",
                                          str(config.parent), "--watch"])
            wait_until(config.exists, "tollway render --dir", proc=renderer)
        envoy = spawn("envoy", [str(envoy_binary()), "-c", str(config), "--log-level", "warn",
                                "--base-id", str(ports["admin"]),
                                *envoy_args(doc["services"].get("workers", 1))])

        def ready() -> bool:
            with urllib.request.urlopen(f"http://127.0.0.1:{ports['admin']}/ready",
                                        timeout=0.5) as r:
                return bool(r.status == 200) and tcp_open(ports["gateway"])
        wait_until(ready, "envoy", proc=envoy)
        yield gw
    except Exception:
        for f in sorted(logs.glob("*.log")):
            sys.stderr.write(f"--- {f.name}\n{f.read_text(errors='replace')[-4000:]}\n")
        raise
    finally:
        for p in reversed(gw.procs):
            if p.poll() is None:
                p.terminate()
        for p in gw.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
    # a failing Lua script never shows in a response; its errors only reach Envoy's log
    envoy_log = (logs / "envoy.log").read_text(errors="replace")
    lua_errors = [line for line in envoy_log.splitlines() if "][error][lua]" in line]
    assert not lua_errors, "the Lua usage filter failed:\n" + "\n".join(lua_errors[:5])


@contextmanager
def run_split_gateway(tmp: Path, mutate: Any = None) -> Iterator[Gateway]:
    """A gateway whose costsink runs in a process of its own (`split`), on a Redis of its own
    (the counters must outlive costsink's kill), with key "k-main" issued: what a test that
    kills costsink under load needs. `mutate` edits the manifest after the Redis is set."""
    for d in ("redis", "gateway"):
        (tmp / d).mkdir()
    r = PrivateRedis(tmp / "redis")
    r.start()

    def with_redis(doc: dict[str, Any]) -> None:
        doc["storage"]["counters"] = r.url
        if mutate:
            mutate(doc)
    try:
        with run_gateway(tmp / "gateway", mutate=with_redis, split=True) as g:
            g.issue("k-main")
            yield g
    finally:
        r.kill()


def redis_counters_for(org: str) -> None:
    """The test Redis, without a previous run's counters for `org` (skipped without Redis,
    failed in CI)."""
    from tests.conftest import REDIS_URL, unavailable  # pytest's: not for the benches

    try:
        r = redis.Redis.from_url(REDIS_URL)
        r.ping()
        for k in r.scan_iter(f"tollway:{{{org}}}:*"):
            r.delete(k)
    except redis.RedisError as e:
        unavailable(f"Redis not reachable: {e}")
