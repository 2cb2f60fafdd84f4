"""A rotated Kubernetes Secret reaches the services without a manifest edit.

Kubernetes updates a Secret mounted as a directory by writing a new timestamped directory and
swapping the `..data` symlink; the files the manifest references are symlinks through it. The
test does exactly that on disk.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from extauthz.decision import compile_runtime
from tests.e2e.harness import offline_manifest
from tollway.manifest import load
from tollway.reload import Live, ManifestWatcher


def mount_secret(directory: Path, generation: int, files: dict[str, str]) -> None:
    """What the kubelet does: new data directory, then an atomic swap of `..data`."""
    data = directory / f"..2026_11_23_{generation}"
    data.mkdir()
    for name, value in files.items():
        (data / name).write_text(value)
        link = directory / name
        if not link.is_symlink():
            link.symlink_to(Path("..data") / name)
    tmp = directory / "..data_tmp"
    tmp.symlink_to(data.name)
    os.replace(tmp, directory / "..data")


def test_rotated_secret_files_are_reread(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                         ) -> None:
    monkeypatch.setenv("TOLLWAY_STATE_DIR", str(tmp_path / "state"))
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    mount_secret(secrets, 1, {"openai": "sk-old", "pepper": "p" * 32})
    doc = offline_manifest()
    for p in doc["providers"]:
        p["credential"] = f"file:{secrets / 'openai'}"
    doc["storage"]["pepper"] = f"file:{secrets / 'pepper'}"
    path = tmp_path / "manifest.yaml"
    path.write_text(yaml.safe_dump(doc))

    watcher = ManifestWatcher(path, load(path))
    runtime = watcher.subscribe(Live(compile_runtime, watcher.manifest))
    assert runtime.value.credentials["openai"] == "sk-old"
    assert not watcher.check()  # nothing changed: nothing recompiled

    mount_secret(secrets, 2, {"openai": "sk-new", "pepper": "q" * 32})
    assert watcher.check()
    assert runtime.value.credentials["openai"] == "sk-new"
    assert runtime.value.pepper == b"q" * 32

    # a Secret that loses its key keeps the last good credentials in force
    os.replace(secrets / "openai", secrets / "gone")
    assert not watcher.check()
    assert runtime.value.credentials["openai"] == "sk-new"


def test_the_watcher_sees_a_same_size_edit_and_leaves_collection_on(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Four stats a second find an edit at once, even one that keeps the size and the mtime;
    one the stats cannot tell (the same clock tick) is found by the content hash, every
    `hash_every` seconds. A refused manifest leaves the garbage collector on (it is off
    while a manifest compiles)."""
    import gc
    monkeypatch.setenv("TOLLWAY_STATE_DIR", str(tmp_path / "state"))
    doc = offline_manifest()
    path = tmp_path / "manifest.yaml"
    path.write_text(yaml.safe_dump(doc))
    watcher = ManifestWatcher(path, load(path), hash_every=3600)
    limit = watcher.subscribe(Live(lambda m: m.gateway.max_request_bytes, watcher.manifest))

    def edit(old: str, new: str) -> None:
        st = path.stat()
        path.write_text(path.read_text().replace(old, new))
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    edit("65536", "65537")  # same size, same mtime
    assert watcher.check() and limit.value == 65537

    same = watcher._read_stats()
    watcher._read_stats = lambda: same  # type: ignore[method-assign]  # as if in one tick
    edit("65537", "65538")
    assert not watcher.check()  # not hashed yet
    watcher.hash_every = 0
    assert watcher.check() and limit.value == 65538

    del watcher._read_stats
    path.write_text("version: [broken")
    assert gc.isenabled() and not watcher.check() and gc.isenabled()
    assert limit.value == 65538


def test_an_edit_landing_while_a_reload_reads_is_reloaded_next(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The watcher records the hash of the text it found changed, not of the file after the
    load: an edit written once the load had read the file is a change the next look finds,
    never taken for the manifest in force."""
    import tollway.reload
    monkeypatch.setenv("TOLLWAY_STATE_DIR", str(tmp_path / "state"))
    path = tmp_path / "manifest.yaml"
    path.write_text(yaml.safe_dump(offline_manifest()))
    watcher = ManifestWatcher(path, load(path), serving=False, hash_every=0)
    limit = watcher.subscribe(Live(lambda m: m.gateway.max_request_bytes, watcher.manifest))
    real_load = tollway.reload.load_here

    def load_then_edited(*args: Any) -> Any:
        manifest = real_load(*args)
        path.write_text(path.read_text().replace("65537", "65538"))  # after the read
        return manifest
    monkeypatch.setattr(tollway.reload, "load_here", load_then_edited)
    path.write_text(path.read_text().replace("65536", "65537"))
    assert watcher.check() and limit.value == 65537
    monkeypatch.setattr(tollway.reload, "load_here", real_load)
    assert watcher.check() and limit.value == 65538
    assert not watcher.check()


def test_a_pepper_created_at_first_start_is_not_a_reload(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOLLWAY_STATE_DIR", str(tmp_path / "state"))
    doc = offline_manifest()
    path = tmp_path / "manifest.yaml"
    path.write_text(yaml.safe_dump(doc))
    watcher = ManifestWatcher(path, load(path))
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "pepper").write_text("p" * 32)  # as extauthz does as it builds
    watcher.in_force()
    assert not watcher.check()
    path.write_text(path.read_text().replace("65536", "70000"))
    assert watcher.check()


def test_a_reload_recompiles_only_the_edited_organization(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The watcher hands the manifest in force to the load, which takes from it every
    organization whose document the edit left alone; even a start loaded without them."""
    monkeypatch.setenv("TOLLWAY_STATE_DIR", str(tmp_path / "state"))
    caplog.set_level("INFO", logger="tollway.reload")
    doc = offline_manifest()
    doc["organizations"].append({"id": "other", "projects": [{"id": "p", "quotas": [
        {"rpm": 5}]}]})
    path = tmp_path / "manifest.yaml"
    path.write_text(yaml.safe_dump(doc))
    watcher = ManifestWatcher(path, load(path))

    def edit(rpm: int) -> tuple[Any, ...]:
        before = watcher.manifest.organizations
        doc["organizations"][-1]["projects"][0]["quotas"][0]["rpm"] = rpm
        path.write_text(yaml.safe_dump(doc))
        assert watcher.check()
        return tuple(a is b for a, b in zip(before, watcher.manifest.organizations,
                                            strict=True))
    assert edit(6) == (False, False)  # loaded without fingerprints: all compiled once
    assert edit(7) == (True, False)
    assert "(1 of 2 organizations compiled, unchanged ones reused)" in caplog.messages[-1]
    assert watcher.manifest.organizations[-1].projects[0].quotas[0].limits["rpm"] == 7
