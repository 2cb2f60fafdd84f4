"""wrk's Lua script for a POST of a JSON body. Standard library only: the gateway bench's child
imports it beside another checkout's packages (as it does procstat)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# the 1 KB chat completion the throughput benches drive through the gateway
CHAT_1KB = {"model": "gpt-5.4-mini", "max_tokens": 5,
            "messages": [{"role": "user", "content": "word " * 200}]}


def post_script(path: Path, body: dict[str, Any], headers: dict[str, str],
                lua: str = "") -> Path:
    """Write the script to `path`: every request POSTs `body` as JSON with `headers`; `lua`
    is appended (wrk's hooks, e.g. a `delay()` that paces one connection)."""
    lines = ['wrk.method = "POST"', f"wrk.body = {json.dumps(json.dumps(body))}",
             *(f"wrk.headers[{json.dumps(k)}] = {json.dumps(v)}"
               for k, v in {"content-type": "application/json", **headers}.items())]
    path.write_text("\n".join(lines) + "\n" + lua)
    return path
