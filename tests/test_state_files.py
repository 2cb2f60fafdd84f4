"""State files are created private (0600 in 0700), whatever the caller's umask, and files from
before that rule are closed when opened."""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path

import pytest

from costsink.ledger import LedgerRow, SqliteLedger
from costsink.spool import Spool


def mode(p: Path) -> int:
    return p.stat().st_mode & 0o777


async def test_the_ledger_and_its_directory_are_private(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        db = tmp_path / "state" / "ledger.db"
        lg = SqliteLedger(db)
        await lg.open()
        await lg.append([LedgerRow("r", datetime.now(UTC), None, None, None, None, None, None,
                                   None, 401, 0, 0, 0, 0, None, None, None, 1, False, False,
                                   "invalid_api_key")])
        await lg.close()
        assert mode(db.parent) == 0o700
        assert {p.name: mode(p) for p in db.parent.iterdir()} == {
            p.name: 0o600 for p in db.parent.iterdir()}
        db.chmod(0o644)  # a ledger from an older version
        lg = SqliteLedger(db)
        await lg.open()
        await lg.close()
        assert mode(db) == 0o600
    finally:
        os.umask(old)


async def test_spool_files_are_private(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        spool = Spool(tmp_path / "spool")
        await spool.append([LedgerRow("r", datetime.now(UTC), None, None, None, None, None,
                                      None, None, 401, 0, 0, 0, 0, None, None, None, 1, False,
                                      False, None)])
        assert mode(spool.dir) == 0o700
        assert [mode(p) for p in spool.files()] == [0o600]
    finally:
        os.umask(old)


def test_processes_starting_at_once_agree_on_one_pepper(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Several services (or workers) start together on the embedded default: one creates the
    pepper, every one reads that one, whole."""
    from concurrent.futures import ThreadPoolExecutor

    from tollway.refs import pepper

    for round_ in range(20):
        monkeypatch.setenv("TOLLWAY_STATE_DIR", str(tmp_path / str(round_)))
        with ThreadPoolExecutor(8) as pool:
            seen = set(pool.map(lambda _: pepper("file:pepper", create=True), range(8)))
        assert len(seen) == 1 and len(seen.pop()) >= 16
