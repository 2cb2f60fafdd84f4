"""A reload reads only the organizations whose text changed: the text is cut at the
`organizations:` entries only where each entry, read alone, reads as it does in its
document. Every text here is held to that: cut and read in parts, it reads as the whole."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import ROOT
from tollway.manifest import load
from tollway.manifest.beside import load_beside, load_here
from tollway.manifest.org_texts import Cutter, cut
from tollway.manifest.reading import read

TOP = "version: 1\nproviders: []\n"
TAIL = "routes: []\n"


def read_in_parts(text: str) -> Any:
    """The document as the cut reads it; None where the text is not cut."""
    parts = cut(text)
    if parts is None:
        return None
    rest = yaml.safe_load(parts.rest)
    assert rest["organizations"] is None
    orgs = [yaml.safe_load(entry) for entry in parts.entries]
    assert all(isinstance(o, list) and len(o) == 1 for o in orgs)
    return {**rest, "organizations": [o[0] for o in orgs]}


def assert_reads_alike(text: str, *, cut_expected: bool | None) -> None:
    """Cut (or not, as expected; None: either) and read in parts, it reads as the whole."""
    parts = read_in_parts(text)
    assert cut_expected is None or (parts is not None) == cut_expected, text
    if parts is not None:
        assert parts == yaml.safe_load(text)


MANIFESTS = [*(ROOT / "examples").glob("*.yaml"), *(ROOT / "deploy").rglob("manifest.yaml")]


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_the_shipped_manifests_are_cut_and_read_alike(path: Path) -> None:
    assert_reads_alike(path.read_text(), cut_expected=True)
    started = load_here(path)  # as a serving process starts: each text recorded
    assert started == load(path) and len(started.org_texts) == len(started.organizations)


@pytest.mark.parametrize("indent", [0, 2, 4])
def test_entries_at_any_indentation_with_comments_and_folded_text(indent: int) -> None:
    pad = " " * indent
    text = (f"---\n{TOP}organizations:   # all of them\n\n# a comment at column 0\n"
            f"{pad}- id: a   # the first\n"
            f"{pad}  name: \"A # not a comment\"\n"
            f"{pad}  notes: it's plain, with a quote's 'inside' and R&D and a > b\n"
            f"{pad}  projects: [{{id: p, quotes: ['[', \"{{\"]}}]\n"
            f"{pad}  folded: a plain scalar\n{pad}    that goes on\n"
            "# between entries\n\n"
            f"{pad}-\n{pad}  id: b\n{pad}  single: 'it''s'\n"
            f"{pad}- id: c\n{pad}  escaped: \"a \\\" quote\"\n\n# the end\n{TAIL}")
    assert_reads_alike(text, cut_expected=True)
    assert [o["id"] for o in read_in_parts(text)["organizations"]] == ["a", "b", "c"]


@pytest.mark.parametrize("section", [
    # a quoted scalar over two lines, its second line looking like an entry
    '  - id: a\n    name: "x\n  - id: b"\n  - id: c\n',
    "  - id: a\n    name: 'x\n  - id: b'\n",
    # a flow collection over two lines
    "  - {id: a,\n  - id: b}\n",
    "  - id: a\n    models: [x,\n  - y]\n",
    # a block scalar, whose lines may be anything
    "  - id: a\n    notes: |\n      - id: b\n",
    "  - id: a\n    notes: >-\n      text\n",
    # an anchor in one entry and its alias in another; a tag; a complex key
    "  - &org {id: a}\n  - *org\n",
    "  - id: a\n    q: &q {rpm: 1}\n  - id: b\n    q: *q\n",
    "  - !!map {id: a}\n",
    "  - ? id\n    : a\n",
    # content at the entries' indentation that is not an entry, or left of them
    "  - id: a\n  id: b\n",
    "    - id: a\n  - id: b\n",
    # the first line is not an entry
    "  -1\n",
])
def test_a_text_that_could_read_otherwise_in_parts_is_read_whole(section: str) -> None:
    text = TOP + "organizations:\n" + section + TAIL
    try:
        whole = yaml.safe_load(text)
    except yaml.YAMLError:
        whole = None  # the cut must not make it read
    assert cut(text) is None, (section, whole)


@pytest.mark.parametrize("text", [
    TOP + "organizations: []\n" + TAIL,  # flow style
    TOP + "organizations:\n" + TAIL,  # no entries
    TOP + "organizations:\n  - id: a\n" + TAIL + "---\norganizations:\n  - id: b\n",
    "%YAML 1.1\n---\n" + TOP + "organizations:\n  - id: a\n",
    TOP + "organizations:\n\t- id: a\n",
    '{"version": 1, "organizations": [{"id": "a"}]}',
])
def test_other_layouts_are_read_whole(text: str) -> None:
    assert cut(text) is None


def test_a_generated_manifest_of_many_organizations_is_cut_and_read_alike() -> None:
    doc = yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text())
    doc["organizations"] += [{"id": f"org{o}", "name": f"Org {o}: \"{o}\" #{o}", "projects": [
        {"id": f"p{p}", "quotas": [{"name": "team", "rpm": 300}, {"spend_per_month": 1.5}],
         "metadata": {"owner": f"o{p}@example.com", "cost-center": "R&D > ops"}}
        for p in range(5)]} for o in range(50)]
    # block style, deeper indentation: cut; long scalars folded over lines: cut unless a
    # line starts with an indicator ("> ops"); flow collections over lines: read whole
    for style, cut_expected in (({}, True), ({"indent": 4}, True), ({"width": 20}, None),
                                ({"default_flow_style": None, "width": 40}, False)):
        text = yaml.safe_dump(doc, sort_keys=False, **style)  # type: ignore[arg-type]
        assert_reads_alike(text, cut_expected=cut_expected)
    folded = " ".join(["folded over lines"] * 9)
    notes = {**doc, "organizations": [{"id": f"org{o}", "notes": folded} for o in range(3)]}
    assert_reads_alike(yaml.safe_dump(notes, width=20), cut_expected=True)


def test_a_reload_reads_only_the_organization_whose_text_changed(tmp_path: Path) -> None:
    """The start records each organization's text; a reload, the first included, parses
    only the entry whose text changed and takes the others from the manifest in force."""
    path = tmp_path / "m.yaml"
    doc = yaml.safe_load((ROOT / "examples" / "team-ai.yaml").read_text())
    doc["organizations"] += [{"id": f"org{i}", "projects": [{"id": "p", "quotas": [
        {"rpm": 2}]}]} for i in range(3)]
    path.write_text(yaml.safe_dump(doc))
    first = load_here(path)
    assert len(first.org_texts) == 4
    assert first.organizations == load(path).organizations

    doc["organizations"][2]["projects"][0]["quotas"][0]["rpm"] = 3
    path.write_text(yaml.safe_dump(doc))
    answer = read(str(path), set(first.compiled_orgs), first.org_texts)
    assert [sorted(o) for o in answer["organizations"]] == [
        ["known", "text"], ["known", "text"], ["document", "fingerprint", "text"],
        ["known", "text"]]
    second = load_beside(path, first.compiled_orgs, first.org_texts)
    assert [a is b for a, b in zip(first.organizations, second.organizations, strict=True)] \
        == [True, True, False, True]
    assert second.organizations == load(path).organizations
    assert second.org_texts != first.org_texts and len(second.org_texts) == 4


def test_an_entry_that_is_no_mapping_is_refused_with_its_line(tmp_path: Path) -> None:
    """Cut, `- just text` reads alone as a scalar: the text is read whole, so the problem
    is the one `tollway check` names."""
    path = tmp_path / "m.yaml"
    text = (ROOT / "examples" / "quickstart.yaml").read_text()
    path.write_text(text.replace("organizations:\n", "organizations:\n  - just text\n", 1))
    answer = read(str(path), set())
    assert "problems" not in answer and "text" not in answer["organizations"][0]
    for loaded in (lambda: load_beside(path, {}), lambda: load_here(path)):
        with pytest.raises(Exception, match=r"organizations\[0\]: must be a mapping"):
            loaded()


def test_a_process_that_serves_nothing_reloads_without_a_child(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`tollway render --watch` reads an edit in its own process (no child's Python start),
    and still only the organization whose text changed."""
    import subprocess

    from tollway.reload import ManifestWatcher

    path = tmp_path / "m.yaml"
    doc = yaml.safe_load((ROOT / "examples" / "team-ai.yaml").read_text())
    doc["organizations"] += [{"id": f"org{i}", "projects": [{"id": "p", "quotas": [
        {"rpm": 2}]}]} for i in range(3)]
    path.write_text(yaml.safe_dump(doc))
    watcher = ManifestWatcher(path, load_here(path), serving=False)
    first = watcher.manifest

    def no_child(*args: Any, **kwargs: Any) -> None:
        raise AssertionError(f"a child process was started: {args}")
    monkeypatch.setattr(subprocess, "run", no_child)
    doc["organizations"][2]["projects"][0]["quotas"][0]["rpm"] = 30
    path.write_text(yaml.safe_dump(doc))
    assert watcher.check()
    assert [a is b for a, b in zip(first.organizations, watcher.manifest.organizations,
                                   strict=True)] == [True, True, False, True]
    assert watcher.manifest.organizations == load(path).organizations


LINES = ["- id: a", "- ", "-", "-x", "  -", "   - q", "    projects:", "  projects:",
         "  - id: 'a''b'", '  name: "x\\"y"', "  name: [a,", "  b]", "  x: {a: 1}", "# comment",
         "  # c", "", "  ", "  k: &a x", "  k: *a", "  k: |", "  k: >-", "  k: R&D > ops",
         "  ? k", "  k: !tag", "  k: a # c", "  k: 'a # b'", "  k: `", "  k: @", "  k: v",
         "    - id: p", "  - {id: c}", "-  id: d", "- - e", "  k: 'open", "  close'",
         "  k: \"a", "  b\"", "  - x: 1", "    y: 2", "  k: 2001-01-01", "  k: yes", "  k: -1",
         "---", "...", "%TAG ! x", "k: v", " k: v", "organizations:"]


def drawn_section(rng: random.Random, entries: float, most: int) -> tuple[str, list[str]]:
    """An indentation and up to `most` lines at it: `- id: a` by the share `entries`, else
    one of LINES."""
    indent = rng.choice(["", "  ", "    "])
    return indent, [indent + ("- id: a" if rng.random() < entries else rng.choice(LINES))
                    for _ in range(rng.randint(1, most))]


@pytest.mark.parametrize("seed", range(4))
def test_random_sections_read_alike_in_parts_or_are_read_whole(seed: int) -> None:
    """Sections of lines drawn at random, at each entry indentation: wherever the text is
    cut, its parts read as the whole, and a text that is no YAML does not read in parts."""
    rng = random.Random(seed)
    cuts = 0
    for _ in range(1500):
        _, lines = drawn_section(rng, entries=0.3, most=10)
        text = TOP + "organizations:\n" + "\n".join(lines) + "\n" + rng.choice(["", TAIL])
        try:
            parts = read_in_parts(text)
        except (yaml.YAMLError, AssertionError, TypeError):
            continue  # a part that does not read alone as one entry: reading.py reads whole
        if parts is None:
            continue
        cuts += 1
        assert parts == yaml.safe_load(text), text
    assert cuts > 100  # the draw reaches texts that are cut


def edited(lines: list[str], indent: str, rng: random.Random) -> list[str]:
    """`lines` with one to three lines deleted, inserted or changed."""
    lines = list(lines)
    for _ in range(rng.randint(1, 3)):
        at, what = rng.randrange(len(lines) + 1), rng.random()
        if what < 0.3 and lines:
            del lines[min(at, len(lines) - 1)]
        elif what < 0.6:
            lines.insert(at, indent + ("- id: b" if rng.random() < 0.4 else rng.choice(LINES)))
        elif lines:
            at = min(at, len(lines) - 1)
            lines[at] = lines[at].replace("a", "z", 1) if rng.random() < 0.5 else lines[at] + " 1"
    return lines


@pytest.mark.parametrize("seed", range(4))
def test_a_text_cut_again_after_an_edit_is_cut_as_afresh(seed: int) -> None:
    """A Cutter compares an edited text with the one it cut before and scans only what
    changed: its cut is cut()'s whatever the edit (in the section, before it, after it,
    in the entries' indentation), and the entries an edit left alone are the ones it held."""
    rng = random.Random(seed)
    kept = 0
    for _ in range(3000):
        indent, lines = drawn_section(rng, entries=0.4, most=12)
        top, tail = rng.choice([TOP, "---\n" + TOP]), rng.choice(["", TAIL, "\n" + TAIL])
        cutter = Cutter()
        before = cutter.cut(top + "organizations:\n" + "\n".join(lines) + "\n" + tail)
        if rng.random() < 0.1:  # the rest edited, some of it to a text as long
            top, tail = rng.choice([(top, tail + "x: 1\n"), ("# a comment\n" + top, tail),
                                    (top.replace("1", "2"), tail)])
        text = (top + "organizations:\n" + "\n".join(edited(lines, indent, rng))
                + rng.choice(["\n", ""]) + tail)
        again = cutter.cut(text)
        assert again == cut(text), text
        if before is not None and again is not None:
            held = {id(e) for e in before.entries}
            kept += any(id(e) in held for e in again.entries)
    assert kept > 80  # the draw reaches texts cut by comparing


@pytest.mark.parametrize(("before", "after"), [
    # an entry's text found again after the start of a line, not at it
    ("- id: a\n- id: b\n", "- id: a\n- id: c, x: - id: b\n"),
    ("  - id: a\n  - id: b\n", "  - id: a\n  - {id: c}  - id: b\n"),
    # a line at the entries' indentation that is no entry; one left of them
    ("  - id: a\n  - id: b\n", "  - id: a\n  x: 1\n  - id: b\n"),
    ("  - id: a\n  - id: b\n", "  - id: a\n - id: x\n  - id: b\n"),
    ("- id: a\n- id: b\n", "- id: a\n---\n- id: b\n"),
    ("- id: a\n- id: b\n", "- id: a\norganizations: []\n- id: b\n"),
    # an entry that runs on into the next's: a block scalar, a quote, a tab
    ("- id: a\n- id: b\n", "- id: a\n  notes: |\n- id: b\n"),
    ("- id: a\n- id: b\n", "- id: a\n  notes: 'x\n- id: b\n"),
    ("- id: a\n- id: b\n", "- id: a\n- id: c\t\n- id: b\n"),
    ("- id: a\n- id: b\n", "- id: a\n- id: c\r\n- id: b\n"),
    # comments and blank lines between entries, a first entry at another indentation
    ("- id: a\n- id: b\n", "- id: a\n# a comment\n\n- id: b\n"),
    ("- id: a\n- id: b\n", "  - id: a\n- id: b\n"),
    ("- id: a\n", "- id: a\n- id: b"),
    ("- id: a\n", ""),  # no entry left
])
def test_edits_that_a_cut_by_comparing_must_not_take_as_entries(before: str, after: str
                                                                 ) -> None:
    for tail in ("", TAIL):
        cutter = Cutter()
        assert cutter.cut(TOP + "organizations:\n" + before + tail) is not None
        text = TOP + "organizations:\n" + after + tail
        assert cutter.cut(text) == cut(text), text


def test_an_edit_of_one_organization_is_cut_again_by_comparing() -> None:
    """Of 100 organizations, an edit of one: the others' texts are the ones held, unscanned
    and not hashed again; an organization added or removed likewise."""
    doc = yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text())
    doc["organizations"] += [{"id": f"org{o}", "projects": [
        {"id": f"p{p}", "quotas": [{"name": "team", "rpm": 300}]} for p in range(3)]}
        for o in range(100)]
    cutter = Cutter()
    before = cutter.cut(yaml.safe_dump(doc))
    assert before is not None
    for edit in (lambda: doc["organizations"][40]["projects"][1]["quotas"][0].update(rpm=3),
                 lambda: doc["organizations"].insert(7, {"id": "new"}),
                 lambda: doc["organizations"].pop(0)):
        edit()
        text = yaml.safe_dump(doc)
        again = cutter.cut(text)
        assert again == cut(text) and again is not None
        held = {id(e) for e in before.entries}
        assert sum(id(e) not in held for e in again.entries) == (0 if len(again.entries)
                                                                  < len(before.entries) else 1)
        before = again


def test_a_cut_that_fails_reads_the_text_whole(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """A fault of the cut's own (a full cut's or a Cutter's) is never a refused manifest or
    a failed start: the text is read whole, which is never wrong, and stderr says so."""
    from tollway.manifest import org_texts, reading

    path = tmp_path / "m.yaml"
    path.write_text(Path(ROOT / "examples" / "quickstart.yaml").read_text())
    primed = Cutter()  # one that cut the text before: it compares the next with it
    cut_answer = reading.read(str(path), set(), cutter=primed)
    assert all("text" in o for o in cut_answer["organizations"])

    def failing(*args: Any) -> Any:
        raise IndexError("a fault of the cut's own")
    monkeypatch.setattr(org_texts, "cut", failing)
    monkeypatch.setattr(org_texts, "_cut_again", failing)
    for cutter in (None, Cutter(), primed):
        answer = reading.read(str(path), set(), cutter=cutter)
        assert answer["doc"] == cut_answer["doc"]
        assert answer["organizations"] == [{k: v for k, v in o.items() if k != "text"}
                                           for o in cut_answer["organizations"]]
        assert "read whole, its cut failed: IndexError" in capsys.readouterr().err
    assert load_here(path).organizations == load(path).organizations
