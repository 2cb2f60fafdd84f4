"""What the README tells a new user to type works as written."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tollway import __version__

ROOT = Path(__file__).resolve().parent.parent


def tollway(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tollway.cli", *args], capture_output=True,
                          text=True, timeout=30, env={**os.environ, **(env or {})})


def test_bare_tollway_shows_the_help() -> None:
    out = tollway()
    assert out.returncode == 0 and "usage: tollway" in out.stdout and "keys" in out.stdout


def test_version() -> None:
    out = tollway("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"tollway {__version__}"


def test_the_manifest_may_come_from_the_environment_for_up_too(tmp_path: Path) -> None:
    # up with TOLLWAY_MANIFEST reads that manifest (here: refuses a missing one by name)
    out = tollway("up", env={"TOLLWAY_MANIFEST": str(tmp_path / "nope.yaml")})
    assert out.returncode == 2 and "nope.yaml" in out.stderr
    assert "--manifest" not in out.stderr.split("manifest refused")[0]


def test_the_mock_provider_holds_the_last_requests_only() -> None:
    """It runs for weeks under `tollway up` and in the single pod: what it keeps for
    /_mock/seen and /_mock/bill is the last --keep requests, the oldest dropped first."""
    import asyncio

    from aiohttp.test_utils import TestClient, TestServer

    from tollway.mock_provider import MockProvider

    async def scenario() -> tuple[list[str | None], list[str]]:
        async with TestClient(TestServer(MockProvider(keep=3).app())) as client:
            for i in range(5):
                r = await client.post("/v1/chat/completions", headers={"x-request-id": f"r{i}"},
                                      json={"model": "mock-small", "messages": []})
                assert r.status == 200
            seen = await (await client.get("/_mock/seen")).json()
            bill = await (await client.get("/_mock/bill")).json()
        return [s["request_id"] for s in seen], list(bill)
    assert asyncio.run(scenario()) == (["r2", "r3", "r4"], ["r2", "r3", "r4"])


def test_mock_provider_takes_its_options_as_the_readme_shows() -> None:
    from tests.e2e.harness import free_port

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "tollway.cli", "mock-provider", "--port",
                             str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
                assert time.monotonic() < deadline
                time.sleep(0.05)
        r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions",
                       json={"model": "m", "messages": []})
        assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] > 0
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_usage_says_what_is_wrong_without_blaming_the_service() -> None:
    manifest = str(ROOT / "examples" / "quickstart.yaml")
    out = tollway("usage", "--manifest", manifest, "--key", "ghost")
    assert out.returncode == 1 and "no key 'ghost'" in out.stderr
    assert "rate-limit service" not in out.stderr
    out = tollway("usage", "--manifest", manifest, "--key", "demo-alice", "--model", "nope")
    assert out.returncode == 1 and "no model 'nope'" in out.stderr and "mock-small" in out.stderr


def test_every_command_and_option_says_what_it_is_for() -> None:
    import argparse

    from tollway.cli import build_parser

    def walk(parser: argparse.ArgumentParser, path: str) -> list[str]:
        missing = []
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    missing += walk(sub, f"{path} {name}")
            elif action.dest not in ("help", "version") and not action.help:
                missing.append(f"{path} {'/'.join(action.option_strings) or action.dest}")
        return missing
    parser = build_parser()
    assert walk(parser, "tollway") == []
    top = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in top.choices.items():
        assert "example" in (sub.epilog or sub.description or ""), f"{name} has no example"


def test_key_messages_agree_on_a_revoked_id(tmp_path: Path) -> None:
    env = {"TOLLWAY_STATE_DIR": str(tmp_path)}
    manifest = str(ROOT / "examples" / "quickstart.yaml")
    assert tollway("keys", "issue", "-m", manifest, "demo-alice", env=env).returncode == 0
    rotated = tollway("keys", "rotate", "-m", manifest, "demo-alice", "--grace", "0", env=env)
    assert rotated.returncode == 0 and "the old secret no longer works" in rotated.stderr
    again = tollway("keys", "issue", "-m", manifest, "demo-alice", env=env)
    assert again.returncode == 1 and "keys rotate demo-alice" in again.stderr
    assert tollway("keys", "revoke", "-m", manifest, "demo-alice", env=env).returncode == 0
    for action in ("issue", "rotate"):
        out = tollway("keys", action, "-m", manifest, "demo-alice", env=env)
        assert out.returncode == 1
        assert "add a new key id to the manifest" in out.stderr, (action, out.stderr)
        assert "use rotate" not in out.stderr and "keys rotate" not in out.stderr


def test_money_is_exact_and_alike_everywhere() -> None:
    from decimal import Decimal

    from tollway.budgets import money

    assert [money(Decimal(x)) for x in ("0", "0.0000480", "0.00006285", "1E+3", "12.5")] \
        == ["0.00", "0.000048", "0.00006285", "1000.00", "12.50"]


def test_up_says_what_holds_a_port_it_needs() -> None:
    """A server's port, and a port nothing listens on but an outgoing connection's local end
    holds (the default service ports lie in the kernel's range for those)."""
    from tollway.up import port_taken

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        assert port_taken("extauthz", "127.0.0.1", port) == (
            f"port 127.0.0.1:{port} (extauthz) is already in use")
        with socket.create_connection(("127.0.0.1", port)) as client:
            local = client.getsockname()[1]  # from the kernel's range for outgoing connections
            taken = port_taken("admin API", "127.0.0.1", local)
            assert taken is not None
            assert taken.startswith(f"port 127.0.0.1:{local} (admin API) is already in use by "
                                    "the local end of an outgoing connection")
            assert "net.ipv4.ip_local_reserved_ports" in taken
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    assert port_taken("metrics", "127.0.0.1", free) is None


def test_a_leaked_key_is_suspended_while_an_unrelated_edit_breaks_the_manifest(
        tmp_path: Path) -> None:
    """Key commands read only the storage section and the key ids' places: a colleague's
    mistake in another part of the manifest does not stop an operator from suspending a key,
    and a mistake in storage, which they do read, is named."""
    env = {"TOLLWAY_STATE_DIR": str(tmp_path)}
    good = (ROOT / "examples" / "quickstart.yaml").read_text()
    manifest = tmp_path / "manifest.yaml"
    manifest.write_text(good)
    assert tollway("keys", "issue", "-m", str(manifest), "demo-alice", env=env).returncode == 0
    manifest.write_text(good.replace("routes:", "routes:\n  - path: nowhere", 1))
    assert tollway("check", "-m", str(manifest), env=env).returncode == 2
    out = tollway("keys", "suspend", "-m", str(manifest), "demo-alice", "--reason", "leaked",
                  env=env)
    assert (out.returncode, out.stdout.strip()) == (0, "demo-alice: suspended"), out.stderr
    listed = tollway("keys", "list", "-m", str(manifest), env=env).stdout
    assert "demo-alice" in listed and "suspended" in listed
    assert tollway("audit", "-m", str(manifest), "--target", "demo-alice",
                   env=env).stdout.count("leaked") == 1
    manifest.write_text(good.replace("keys: sqlite:///keys.db", "keys: mysql://x", 1))
    out = tollway("keys", "show", "-m", str(manifest), "demo-alice", env=env)
    assert out.returncode == 2 and "storage.keys: must start with one of" in out.stderr


def test_keys_list_merges_the_store_and_the_manifest_a_page_at_a_time(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """The store is read a page at a time (a million keys in constant memory) and merged
    with the manifest's key ids in order; --limit and --after page through the listing."""
    import asyncio
    import json

    from tollway import cli, cli_keys
    from tollway.keys import KeyManager
    from tollway.keys.sqlite import SqliteKeyStore
    from tollway.refs import pepper

    monkeypatch.setenv("TOLLWAY_STATE_DIR", str(tmp_path))
    monkeypatch.setattr(cli_keys, "LIST_PAGE", 2)  # pages that end between the manifest's ids
    manifest = str(ROOT / "examples" / "quickstart.yaml")

    async def issue() -> None:
        store = SqliteKeyStore(tmp_path / "keys.db")
        await store.open()
        km = KeyManager(store, pepper("file:pepper", create=True))
        for key_id in ("a-rt", "demo-b", "demo-bb", "zz"):
            await km.issue(key_id, spec=json.dumps({"org": "demo", "project": "playground",
                                                    "client": "alice"}))
        await km.issue("demo-alice")
        await store.close()
    asyncio.run(issue())

    def listed(*args: str) -> tuple[list[list[str]], str]:
        with pytest.raises(SystemExit) as exit_:
            cli.main(["keys", "list", "-m", manifest, *args])
        out = capsys.readouterr()
        assert exit_.value.code == 0, out.err
        return [line.split()[:3] for line in out.out.splitlines()[1:]], out.err

    rows, err = listed()
    assert rows == [["a-rt", "active", "runtime"], ["demo-alice", "active", "active"],
                    ["demo-b", "active", "runtime"], ["demo-bb", "active", "runtime"],
                    ["demo-ci", "not-issued", "active"], ["zz", "active", "runtime"]]
    assert err == ""
    first, err = listed("--limit", "3")
    assert [r[0] for r in first] == ["a-rt", "demo-alice", "demo-b"]
    assert err.strip() == "# more keys follow: tollway keys list --after demo-b"
    rest, err = listed("--after", "demo-b", "--limit", "3")
    assert [r[0] for r in rest] == ["demo-bb", "demo-ci", "zz"] and err == ""


def test_keys_show_names_a_runtime_keys_place(tmp_path: Path) -> None:
    """A runtime key (made by the admin API) is in no manifest: show names its org, project
    and client from its stored spec, as `keys list` does, not nulls."""
    import asyncio
    import json

    from tollway.keys import KeyManager
    from tollway.keys.sqlite import SqliteKeyStore

    env = {"TOLLWAY_STATE_DIR": str(tmp_path)}
    manifest = str(ROOT / "examples" / "quickstart.yaml")
    assert tollway("keys", "issue", "-m", manifest, "demo-alice", env=env).returncode == 0

    async def issue_runtime_key() -> None:
        store = SqliteKeyStore(tmp_path / "keys.db")
        await store.open()
        try:
            secret = (tmp_path / "pepper").read_text().strip().encode()
            await KeyManager(store, secret).issue(
                "rt-1", spec=json.dumps({"org": "demo", "project": "playground",
                                         "client": "alice", "key": {"id": "rt-1"}}))
        finally:
            await store.close()
    asyncio.run(issue_runtime_key())

    runtime = json.loads(tollway("keys", "show", "-m", manifest, "rt-1", env=env).stdout)
    assert (runtime["runtime"], runtime["manifest_status"]) == (True, None)
    assert (runtime["org"], runtime["project"], runtime["client"]) \
        == ("demo", "playground", "alice")
    listed = json.loads(tollway("keys", "show", "-m", manifest, "demo-alice", env=env).stdout)
    assert (listed["runtime"], listed["manifest_status"], listed["client"]) \
        == (False, "active", "alice")


def test_serve_and_up_load_the_manifest_for_reloads(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A serving process's manifest records its organizations from the start, so even its
    first reload compiles only the organizations an edit touched."""
    import yaml

    from tests.e2e.harness import offline_manifest
    from tollway.cli import main

    monkeypatch.setenv("TOLLWAY_STATE_DIR", str(tmp_path / "state"))
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump(offline_manifest()))
    served: list[Any] = []
    monkeypatch.setattr("tollway.serve.run", lambda *a, manifest, **k: served.append(manifest))
    monkeypatch.setattr("tollway.up.up", lambda path, m: served.append(m))
    for command in ("serve", "up"):
        with pytest.raises(SystemExit):
            main([command, "--manifest", str(path)])
    assert [len(m.compiled_orgs) for m in served] == [1, 1]


def test_a_reader_that_stops_early_is_no_error(tmp_path: Path) -> None:
    """`tollway keys list | head -1`: the command stops quietly when its reader has gone."""
    proc = subprocess.Popen([sys.executable, "-m", "tollway.cli", "check", "--manifest",
                             str(ROOT / "examples" / "quickstart.yaml")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # before the command has printed anything
    assert proc.wait(timeout=30) == 141
    assert proc.stderr.read() == b""


def test_a_broken_connection_is_still_an_error(monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """Only the reader's pipe is let go quietly: a store's connection broken the same way is
    reported as any other error."""
    from tollway import cli

    def broken(args: Any) -> int:
        raise BrokenPipeError(32, "Broken pipe")
    monkeypatch.setattr(cli, "cmd_check", broken)
    with pytest.raises(SystemExit) as e:
        cli.main(["check", "--manifest", str(ROOT / "examples" / "quickstart.yaml")])
    assert e.value.code == 1 and "Broken pipe" in capsys.readouterr().err
