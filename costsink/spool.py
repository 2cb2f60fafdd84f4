"""The disk spool: ledger rows that could not be written yet, kept until the ledger is back.

Each batch is one file, written to a temporary name, fsynced and renamed, so a crash leaves
either the whole batch or nothing. Files are named by a sequence number and replayed oldest
first; the ledger ignores a request id it already holds, so a replay interrupted halfway and
repeated records nothing twice.
"""

from __future__ import annotations

import asyncio
import json
import os
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from .ledger import LedgerRow


def row_to_json(row: LedgerRow) -> dict[str, Any]:
    d = row._asdict()
    d["at"] = row.at.isoformat()
    d["cost"] = str(row.cost) if row.cost is not None else None
    return d


def row_from_json(d: dict[str, Any]) -> LedgerRow:
    d = dict(d)
    d["at"] = datetime.fromisoformat(d["at"])
    d["cost"] = Decimal(d["cost"]) if d["cost"] is not None else None
    return LedgerRow(**d)


class Spool:
    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._seq = max((int(p.stem) for p in self.files()), default=0)
        # the request ids waiting here: a row spooled twice (the access-log file brought it
        # again) must not count as new twice
        waiting = [r.request_id for p in self.files() for r in self.read(p)]
        self.depth = len(waiting)
        self.request_ids: set[str] = set(waiting)

    def files(self) -> list[Path]:
        return sorted(self.dir.glob("*.jsonl"))

    def empty(self) -> bool:
        return self.depth == 0

    def _write(self, rows: list[LedgerRow]) -> None:
        self._seq += 1
        final = self.dir / f"{self._seq:020d}.jsonl"
        tmp = final.with_suffix(".tmp")
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
            for row in rows:
                f.write(json.dumps(row_to_json(row)) + "\n")
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(final)
        dir_fd = os.open(self.dir, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # the rename itself must survive a power cut
        finally:
            os.close(dir_fd)
        self.depth += len(rows)

    async def append(self, rows: list[LedgerRow]) -> None:
        await asyncio.to_thread(self._write, rows)
        self.request_ids.update(r.request_id for r in rows)

    @staticmethod
    def read(path: Path) -> list[LedgerRow]:
        with path.open() as f:
            return [row_from_json(json.loads(line)) for line in f if line.strip()]

    def remove(self, path: Path, rows: list[LedgerRow]) -> None:
        """The file `path`, whose `rows` the ledger now holds."""
        self.request_ids.difference_update(r.request_id for r in rows)
        path.unlink()
        self.depth -= len(rows)
