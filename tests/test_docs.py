"""The docs' benchmark commands still run as written.

docs/performance.md gives the command behind every figure, and the benches' options change
as they grow: a renamed or dropped option would leave a figure no reader can reproduce.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# `python bench/NAME.py` and what follows it: options, their values, [optional parts]
COMMAND = re.compile(r"python bench/(\w+)\.py((?: +(?:\[[^\]`]*\]|--?[\w-]+"
                     r"(?:[ =](?!--)[^\s`\[\]]+)?))*)")
OPTION = re.compile(r"--[a-z][\w-]*")


def bench_commands(text: str) -> list[tuple[str, set[str]]]:
    """Each bench command in a Markdown text, with the options it names (a command may wrap
    over lines)."""
    flat = re.sub(r"\s*\n\s*", " ", text)
    return [(m.group(1), set(OPTION.findall(m.group(2)))) for m in COMMAND.finditer(flat)]


def test_the_parser_reads_a_wrapped_command_with_optional_parts() -> None:
    text = ("run `python bench/latency_rounds.py --rounds 6 --seconds\n5 [--rate-limit "
            "filter | --budget]` and `python bench/scale.py`")
    assert bench_commands(text) == [
        ("latency_rounds", {"--rounds", "--seconds", "--rate-limit", "--budget"}),
        ("scale", set())]


def test_every_bench_command_in_the_docs_names_a_script_and_options_it_has() -> None:
    found, wrong = 0, []
    for doc in DOCS:
        for script, options in bench_commands(doc.read_text()):
            found += 1
            source = ROOT / "bench" / f"{script}.py"
            if not source.exists():
                wrong.append(f"{doc.name}: bench/{script}.py does not exist")
                continue
            code = source.read_text()
            wrong += [f"{doc.name}: bench/{script}.py has no option {o}"
                      for o in sorted(options) if f'"{o}"' not in code]
    assert found > 50  # the docs' commands were found at all
    assert not wrong, "\n".join(dict.fromkeys(wrong))
