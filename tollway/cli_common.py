"""What every `tollway` command module shares: its one-line error, the manifest's path, and
asyncio.run for the commands that talk to a store.

Apart from tollway.cli: `python -m tollway.cli` runs that module as __main__, and a command
module importing from it would load a second copy whose CliError main() does not catch.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


class CliError(Exception):
    """A one-line error for the user; no traceback."""


def run_async(coroutine: Coroutine[Any, Any, T]) -> T:
    """asyncio.run, importing asyncio (45 ms) only for the commands that talk to a store:
    `tollway check` and `render` of 10,000 projects have a second in all."""
    import asyncio

    return asyncio.run(coroutine)


def manifest_path(args: argparse.Namespace) -> Path:
    path = args.manifest or os.environ.get("TOLLWAY_MANIFEST")
    if not path:
        raise CliError("no manifest: pass --manifest FILE or set TOLLWAY_MANIFEST")
    return Path(path)
