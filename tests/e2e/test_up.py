"""`tollway up` takes every child down with it, on SIGHUP (a closed terminal, a dropped SSH
session) as on SIGTERM and SIGINT, so the next `up` finds its ports free."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from .harness import ROOT, free_port, tcp_open, wait_until

pytestmark = pytest.mark.e2e


def quickstart_on_free_ports(tmp: Path) -> tuple[Path, list[int]]:
    doc = yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text())
    ports = {n: free_port() for n in ("gw", "admin", "ea", "rl", "cs", "api", "metrics",
                                      "mock")}
    doc["gateway"].update(listen=f"127.0.0.1:{ports['gw']}", admin_port=ports["admin"])
    doc["services"] = {"extauthz": f"127.0.0.1:{ports['ea']}",
                       "ratelimit": f"127.0.0.1:{ports['rl']}",
                       "costsink": f"127.0.0.1:{ports['cs']}", "admin": f"127.0.0.1:{ports['api']}",
                       "metrics_port": ports["metrics"]}
    for p in doc["providers"]:
        p["upstream"]["port"] = ports["mock"]
    path = tmp / "manifest.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path, list(ports.values())


@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGTERM, signal.SIGINT],
                         ids=lambda s: signal.Signals(s).name)
def test_up_leaves_nothing_behind(tmp_path: Path, sig: signal.Signals) -> None:
    manifest, ports = quickstart_on_free_ports(tmp_path)
    env = {**os.environ, "TOLLWAY_STATE_DIR": str(tmp_path / "state")}
    up = subprocess.Popen([sys.executable, "-m", "tollway.cli", "up", "--manifest",
                           str(manifest)], env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        wait_until(lambda: all(tcp_open(p) for p in ports), "tollway up", timeout=30, proc=up)
        up.send_signal(sig)
        assert up.wait(timeout=20) is not None
        deadline = time.monotonic() + 10
        while busy := [p for p in ports if _open(p)]:
            assert time.monotonic() < deadline, f"ports still served after {sig.name}: {busy}"
            time.sleep(0.05)
    finally:
        if up.poll() is None:
            up.kill()


def _open(port: int) -> bool:
    try:
        return tcp_open(port)
    except OSError:
        return False
