"""`tollway spend`: the ledger summed by org / project / key / model / day, for a period.

Sums are exact decimals in the ledger's currency; requests whose model was not on the rate
card are counted in `unpriced`, so a total is never silently short, and requests charged an
estimate (the provider's usage never reached the gateway) in `estimated`, so a total that is
partly estimated says so.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from decimal import Decimal
from zoneinfo import ZoneInfo

from tollway.budgets import money

from .ledger import LedgerRow

GROUPS = ("org", "project", "key", "model", "day")


@dataclass
class Line:
    group: tuple[str, ...]
    requests: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cached_input_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0
    cost: Decimal = field(default_factory=Decimal)
    unpriced: int = 0
    estimated: int = 0


def summarize(rows: Iterable[LedgerRow], by: list[str], tz: ZoneInfo) -> list[Line]:
    """Sum the rows given (the ledger query chose the period); unauthenticated ones are
    skipped: they belong to no key."""
    lines: dict[tuple[str, ...], Line] = {}
    for r in rows:
        if r.key_id is None:
            continue
        values = {"org": r.org or "-", "project": r.project or "-", "key": r.key_id,
                  "model": r.model or "-", "day": r.at.astimezone(tz).date().isoformat()}
        group = tuple(values[g] for g in by)
        line = lines.setdefault(group, Line(group))
        line.requests += 1
        line.input_tokens += r.input_tokens
        line.output_tokens += r.output_tokens
        line.cached_input_tokens += r.cached_input_tokens
        line.cache_write_tokens += r.cache_creation_tokens
        line.reasoning_tokens += r.reasoning_tokens
        line.estimated += r.estimated
        if r.cost is None:
            line.unpriced += r.model is not None and r.status < 400
        else:
            line.cost += r.cost
    return [lines[g] for g in sorted(lines)]


def render(lines: list[Line], by: list[str], fmt: str, currency: str) -> str:
    header = [*by, "requests", "input_tokens", "output_tokens", "cached_input_tokens",
              "cache_write_tokens", "reasoning_tokens", f"cost_{currency.lower()}", "unpriced",
              "estimated"]
    # money exact and alike in every format: 0.00, 0.000048, 0.00006285 (tollway.budgets.money)
    table = [[*ln.group, ln.requests, ln.input_tokens, ln.output_tokens,
              ln.cached_input_tokens, ln.cache_write_tokens, ln.reasoning_tokens,
              money(ln.cost), ln.unpriced, ln.estimated] for ln in lines]
    if fmt == "json":
        return json.dumps([dict(zip(header, row, strict=True)) for row in table], indent=2)
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(header)
        writer.writerows(table)
        return out.getvalue()
    cells = [header, *[[str(v) for v in row] for row in table]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) if i < len(by) else c.rjust(w)
                               for i, (c, w) in enumerate(zip(row, widths, strict=True)))
                     for row in cells)
