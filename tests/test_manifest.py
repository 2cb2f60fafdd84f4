import json
import os
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import yaml

from tollway.manifest import ManifestError, load, loads, parse

EXAMPLES = sorted((Path(__file__).parent.parent / "examples").glob("*.yaml"))

MINIMAL = """
providers:
  - name: openai
    dialect: openai
    upstream: {host: api.openai.com}
    credential: env:OPENAI_API_KEY
    models: [{name: gpt-5.4-mini}, {name: gpt-5.4}]
routes:
  - {path: /v1/chat/completions, provider: openai}
organizations:
  - id: acme
    projects:
      - id: team-ai
        clients:
          - id: app
            keys: [{id: team-a}, {id: team-b, models: [gpt-5.4-mini]}]
"""


def problems(text: str) -> list[str]:
    with pytest.raises(ManifestError) as e:
        loads(text, "m.yaml")
    return e.value.problems


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_validate(path: Path) -> None:
    m = load(path)
    assert m.bindings, "every example defines keys"


ERROR_FIXTURES = sorted((Path(__file__).parent / "manifest_errors").glob("*.yaml"))


@pytest.mark.parametrize("path", ERROR_FIXTURES, ids=lambda p: p.stem)
def test_each_rule_names_its_problem_and_nothing_else(path: Path) -> None:
    """One manifest per rule (tests/manifest_errors), each wrong in one way: the problems
    parse reports are exactly the `# expect:` lines at its top, in their order. An operator
    fixing a ConfigMap reads these, so a rule's message is kept as written, and a mistake is
    not reported again as the problems it causes elsewhere."""
    text = path.read_text()
    expected = [line.removeprefix("# expect: ") for line in text.splitlines()
                if line.startswith("# expect: ")]
    assert expected, f"{path.name} states no expected problem"
    assert problems(text) == expected


def test_minimal_defaults_and_bindings() -> None:
    m = loads(MINIMAL)
    assert m.provider("openai").upstream.tls is True
    assert m.provider("openai").upstream.sni == "api.openai.com"
    assert m.routes[0].action == "completion"
    assert m.bindings["team-a"].allowed_models is None
    assert m.bindings["team-b"].allowed_models == frozenset({"gpt-5.4-mini"})
    assert m.bindings["team-b"].project.id == "team-ai"


def test_duplicate_key_id_is_named_with_its_path() -> None:
    text = MINIMAL.replace("{id: team-b, models: [gpt-5.4-mini]}", "{id: team-a}")
    assert ("organizations[0].projects[0].clients[0].keys[1].id: duplicate key id 'team-a' "
            "(first at organizations[0].projects[0].clients[0].keys[0])") in problems(text)


def test_every_problem_is_reported_at_once() -> None:
    text = MINIMAL.replace("credential: env:OPENAI_API_KEY", "credential: sk-live-123") \
                  .replace("{id: team-a}", "{id: team-a, quotas: [{tpm: -5}]}") \
                  .replace("provider: openai}", "provider: nope}")
    found = problems(text)
    assert any(p.startswith("providers[0].credential: must be a reference") for p in found)
    assert ("organizations[0].projects[0].clients[0].keys[0].quotas[0].tpm: "
            "must be a positive integer") in found
    assert "routes[0].provider: unknown provider 'nope'" in found


def test_unknown_model_plan_and_field() -> None:
    text = MINIMAL.replace("models: [gpt-5.4-mini]}", "models: [gpt-9], plan: gold, colour: x}")
    found = problems(text)
    assert ("organizations[0].projects[0].clients[0].keys[1].models[0]: unknown model 'gpt-9' "
            "(not in any provider's catalogue)") in found
    assert "organizations[0].projects[0].clients[0].keys[1].plan: unknown plan 'gold'" in found
    assert any(p.startswith("organizations[0].projects[0].clients[0].keys[1].colour: unknown "
                            "field") for p in found)


def test_not_yaml_and_not_a_mapping() -> None:
    assert problems("providers: [")[0].startswith("(document): line")
    assert problems("- a\n- b") == ["(document): must be a mapping"]


def test_prices_stay_exact_decimals() -> None:
    text = MINIMAL + """
rate_card:
  version: v1
  prices:
    - {provider: openai, model: gpt-5.4-mini, input: 0.75, output: 4.50, cached_input: 0.075}
"""
    price = loads(text).rate_card.prices[0]  # type: ignore[union-attr]
    assert price.cached_input == Decimal("0.075")  # not 0.07499999999999999722...
    assert price.output == Decimal("4.5")


@pytest.mark.parametrize("text", [
    "a: &x {b: 1}\nc: *x\n", "base: &b {x: 1}\nd:\n  <<: *b\n  y: 2\n",
    "t: 2024-01-01\nf: 1.5\nn: ~\nb: yes\ni: 0x1f\ns: '1'\nl: [a, 1, null]\n", "!!str 5",
    "x: !!binary aGk=\n", "{a: 1, b: [x, y]}", "{}", "", "- 1\n- - 2\n",
    '{"version": 1, "quotas": [{"rpm": 5}]}', "? [1, 2]\n: v\n",
    "a: !!python/name:os.system x\n", "a: 1\n---\nb: 2\n", "a: *nowhere\n",
    "a: &v 5\nb: *v\nc: [*v, {d: *v}]\n", "k:\nl: ''\nm: \"007\"\nn: !!int '7'\n",
    "- {a: [1, {b: c}]}\n- [x, [y]]\n# comment\n", "a: 1\na: 2\n", "é: ü\n", "? a\n",
    "x: .inf\ny: -.5\nz: 1_000\nw: 0o17\nv: 2001-12-14t21:59:43.10-05:00\n",
    "a: [1, 2\n", "{a: 1}\n", "[a, b]", "just a string", "~", "a: !!map {b: 1}\n",
    "a: !!float 1\nb: 1\nc: !!bool yes\nd: yes\n"])
def test_the_manifest_reader_reads_what_safe_load_reads(text: str) -> None:
    """tollway/manifest/yaml_reader.py builds plain maps, lists and strings itself and resolves
    scalars from a cache: whatever it reads must equal PyYAML's safe loader, errors included."""
    from tollway.manifest.yaml_reader import safe_load

    def read(load: Any) -> Any:
        try:
            return load(text)
        except yaml.YAMLError as e:
            return type(e)
    fast, pyyaml = read(safe_load), read(lambda t: yaml.load(t, Loader=yaml.CSafeLoader))
    assert fast == pyyaml
    assert repr(fast) == repr(pyyaml)  # the same types too: 1 == 1.0, but a count is an int


def test_the_examples_read_the_same_with_the_fast_reader() -> None:
    from tests.conftest import ROOT
    from tollway.manifest.yaml_reader import _from_events
    paths = [*(ROOT / "examples").glob("*.yaml"), *(ROOT / "deploy").rglob("manifest.yaml")]
    assert len(paths) >= 3
    for path in paths:
        text = path.read_text()
        assert _from_events(text) == yaml.safe_load(text), path  # the fast path, no fallback


def test_a_serving_process_reads_plain_and_unusual_yaml_alike(tmp_path: Path) -> None:
    """load_beside reads the manifest in a child process, a plain one and one with merge
    keys (only PyYAML's loader reads those): both as load() does."""
    from tests.e2e.harness import offline_manifest
    from tollway.manifest.beside import load_beside

    doc = offline_manifest()
    plain = tmp_path / "plain.yaml"
    plain.write_text(yaml.safe_dump(doc))
    assert load_beside(plain, {}).organizations == load(plain).organizations
    first, second = doc["providers"]
    rest = {k: v for k, v in doc.items() if k != "providers"}
    merged = tmp_path / "merged.yaml"
    merged.write_text(yaml.safe_dump(rest) + "providers:\n  - &first " + json.dumps(first)
                      + "\n  - {<<: *first, " + ", ".join(
                          f"{json.dumps(k)}: {json.dumps(v)}" for k, v in second.items()) + "}\n")
    assert load_beside(merged, {}).providers == load(plain).providers


def test_reloads_read_in_one_warm_reader_started_again_if_it_ended(tmp_path: Path) -> None:
    """Each reload's read is answered by one reader the process keeps: a reload no
    longer pays a Python start. A reader that ended (killed, say) is started again by the
    next reload; a read that fails is answered as failed (load_beside refuses the manifest)
    and the reader goes on."""
    from tests.e2e.harness import offline_manifest
    from tollway.manifest import beside

    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump(offline_manifest()))
    reader = beside._Reader()
    held = {"known": [], "texts": {}}
    first = reader.read(str(path), held)
    proc = reader._proc
    assert proc is not None and reader.read(str(path), held) == first
    assert reader._proc is proc  # the same reader: no new Python started
    proc.kill()
    proc.wait()
    assert reader.read(str(path), held) == first and reader._proc is not proc
    assert "problems" in reader.read(str(tmp_path / "missing.yaml"), held)
    failed = reader.read(str(path), {"known": None, "texts": {}})  # the child raises
    assert "TypeError" in failed["failed"] and reader.read(str(path), held) == first
    reader._stop()


@pytest.mark.skipif(not hasattr(os, "sched_getscheduler"), reason="Linux scheduling policy")
def test_the_reader_reads_only_on_cores_requests_leave_idle(tmp_path: Path) -> None:
    """The warm reader is at SCHED_IDLE (and the children it forks with it): the requests in
    flight during a reload are the serving process's, which keeps its own policy. The reader
    for a read the idle one was starved of CPU for is at normal priority."""
    from tests.e2e.harness import offline_manifest
    from tollway.manifest import beside

    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump(offline_manifest()))
    for idle, policy in ((True, os.SCHED_IDLE), (False, os.SCHED_OTHER)):
        reader = beside._Reader()
        try:
            assert "doc" in reader._ask(str(path), {"known": [], "texts": {}}, idle, 30)
            assert reader._proc is not None
            assert os.sched_getscheduler(reader._proc.pid) == policy
        finally:
            reader._stop()
    assert os.sched_getscheduler(0) == os.SCHED_OTHER


def test_a_read_the_idle_reader_does_not_answer_in_time_is_read_at_normal_priority(
        tmp_path: Path) -> None:
    """A read the idle reader has not answered within `escalate` (every core held by busy
    work in its cgroup) is answered by a reader at normal priority, which then ends: the
    next read is an idle reader's again, and the same answer."""
    from tests.e2e.harness import offline_manifest
    from tollway.manifest import beside

    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump(offline_manifest()))
    held = {"known": [], "texts": {}}
    started: list[bool] = []
    reader = beside._Reader(escalate=0.0)  # no idle reader answers in no time
    running = reader._running

    def recorded(idle: bool = True) -> Any:
        if reader._proc is None:
            started.append(idle)
        return running(idle)
    reader._running = recorded  # type: ignore[method-assign]
    try:
        answer = reader.read(str(path), held)
        assert started == [True, False] and reader._proc is None  # the normal one ended
        reader.escalate = 30.0
        assert reader.read(str(path), held) == answer
        assert started == [True, False, True] and reader._proc is not None
    finally:
        reader._stop()


def test_the_reader_parses_a_small_read_itself_and_a_whole_text_in_a_child(
        tmp_path: Path) -> None:
    """What an edit left to parse (a few organizations) is parsed in the warm reader: a child
    cost twice the CPU, in the pages it copies from the reader. A text read whole (it cannot
    be cut, or a part does not read alone) is a child's, which takes its memory with it.
    Either way the answer is read()'s, its organizations compiled."""
    import json
    import subprocess
    import sys

    from tests.e2e.harness import offline_manifest
    from tollway.manifest.reading import read
    from tollway.manifest.shipped_orgs import received, ship

    def opened(answer: dict[str, Any]) -> dict[str, Any]:
        """The answer with each organization the reader compiled unpickled."""
        for item in answer.get("organizations", []):
            if "compiled" in item:
                item["compiled"] = received(item)
        return answer

    counting = ("import os, sys\nfork = os.fork\n"
                "def counted():\n    print('fork', file=sys.stderr, flush=True)\n"
                "    return fork()\n"
                "os.fork = counted\nfrom tollway.manifest.reading import serve\nserve()\n")
    reader = subprocess.Popen([sys.executable, "-c", counting], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert reader.stdin is not None and reader.stdout is not None
    path = tmp_path / "m.yaml"
    doc = offline_manifest()
    doc["organizations"] += [{"id": f"org{i}", "projects": [{"id": "p"}]} for i in range(3)]
    for n, text in enumerate([
            yaml.safe_dump(doc),  # cut: each entry parsed here
            yaml.safe_dump(doc).replace("id: org1", "id: org9"),  # cut again: one entry
            json.dumps(doc),  # no cut: whole, in a child
            yaml.safe_dump(doc).replace("- id: org2", "- just text\n- id: org2")]):
        path.write_text(text)
        reader.stdin.write(json.dumps({"id": n, "path": str(path), "known": [],
                                       "texts": {}}) + "\n")
        reader.stdin.flush()
        answer = json.loads(reader.stdout.readline())
        assert answer.pop("id") == n
        assert opened(answer) == opened(json.loads(json.dumps(ship(read(str(path), set())),
                                                              default=str)))
    reader.stdin.close()
    assert reader.wait(timeout=30) == 0
    assert reader.stderr is not None and reader.stderr.read().split() == ["fork", "fork"]


@pytest.mark.parametrize(("org", "expected"), [
    ({"quotas": [{"rpm": 5, "models": ["gpt-1"]}], "projects": [{"id": "a"}]},
     "organizations[1].quotas[0].models[0]: unknown model 'gpt-1'"),
    ({"model_rules": [{"models": ["gpt-2"]}], "projects": [{"id": "a"}]},
     "organizations[1].model_rules[0].models[0]: unknown model 'gpt-2'"),
    ({"projects": [{"id": "a", "models": ["gpt-3"]}]},
     "organizations[1].projects[0].models[0]: unknown model 'gpt-3'"),
    ({"projects": [{"id": "a", "plan": "gold"}]},
     "organizations[1].projects[0].plan: unknown plan 'gold'"),
    ({"projects": [{"id": "a", "model_rules": [{"models": ["gpt-4"]}]}]},
     "organizations[1].projects[0].model_rules[0].models[0]: unknown model 'gpt-4'"),
    ({"projects": [{"id": "a", "quotas": [{"rpm": 2, "models": ["gpt-5"]}]}]},
     "organizations[1].projects[0].quotas[0].models[0]: unknown model 'gpt-5'"),
    ({"projects": [{"id": "a"}, {"id": "a"}]},
     "organizations[1].projects[1].id: duplicate project id 'a'"),
    ({"projects": [{"id": "a", "clients": [{"id": "app", "keys": [{"id": "k9"}]}]}]},
     "organizations[1].projects[0].clients[0].id: duplicate client id 'app'"),
    ({"projects": [{"id": "a", "clients": [{"id": "c9", "keys": [{"id": "team-a"}]}]}]},
     "organizations[1].projects[0].clients[0].keys[0].id: duplicate key id 'team-a'"),
])
def test_each_reference_alone_takes_its_organization_through_the_checks_across(
        org: dict[str, Any], expected: str) -> None:
    """An organization with nothing for the checks across the manifest skips them (a
    reload's parse then goes over the few that have something); one reference of any kind,
    alone in its organization, is enough to be checked."""
    doc = yaml.safe_load(MINIMAL)
    doc["organizations"].append({"id": "beta", **org})
    found = problems(yaml.safe_dump(doc))
    assert any(p.startswith(expected) for p in found), (expected, found)
    doc["organizations"][1] = {"id": "beta", "projects": [{"id": "a"}, {"id": "b", "quotas": [
        {"rpm": 2}]}]}
    assert parse(doc).organizations[1].self_contained


def test_a_reloads_child_imports_only_the_reading_of_the_text() -> None:
    """The reading of the text (python -m tollway.manifest.reading) imports neither the
    model nor its compiler, which were most of a reload's child's start (the warm reader
    imports them once, when it serves). The package's names still come from where they
    live."""
    import subprocess
    import sys

    import tollway.manifest as package

    loaded = subprocess.run(
        [sys.executable, "-c", "import sys, tollway.manifest.reading; print(sorted("
         "m for m in sys.modules if m.startswith('tollway')))"],
        capture_output=True, text=True, check=True).stdout
    assert not {"tollway.manifest.model", "tollway.manifest.loader", "tollway.manifest.orgs",
                "tollway.manifest.node"} & set(eval(loaded))
    assert sorted(package.__all__) == sorted(package._HOMES)
    assert all(getattr(package, name).__name__ == name for name in package.__all__)


def test_a_reload_compiles_only_the_organizations_that_changed() -> None:
    """A serving process's reload takes from the manifest in force each organization whose
    document is unchanged, and compiles the others: including an edit that == would miss."""
    doc = yaml.safe_load(MINIMAL)
    doc["organizations"] += [{"id": f"org{i}", "projects": [{"id": "p", "quotas": [
        {"rpm": 2}], "clients": [{"id": f"c{i}", "keys": [
            {"id": f"k{i}", "expires_at": "2030-01-01T00:00:00+00:00"}]}]}]} for i in range(3)]
    assert parse(doc).compiled_orgs == {}  # a one-shot command records nothing
    first = parse(doc, reuse={})
    assert len(first.compiled_orgs) == 4

    doc["organizations"][1]["projects"][0]["quotas"][0]["rpm"] = 3
    second = parse(doc, reuse=first.compiled_orgs)
    old, new = first.organizations, second.organizations
    assert [a is b for a, b in zip(old, new, strict=True)] == [True, False, True, True]
    assert new[1].projects[0].quotas[0].limits["rpm"] == 3
    assert second.bindings["k0"].org is new[1]  # bindings name the organization in force

    # equal under == but not the same document: 2 == 2.0 == True, a date and its text
    doc["organizations"][2]["projects"][0]["quotas"][0]["rpm"] = 2.0
    with pytest.raises(ManifestError, match=r"organizations\[2\].*rpm: must be a positive"):
        parse(doc, reuse=second.compiled_orgs)
    doc["organizations"][2]["projects"][0]["quotas"][0]["rpm"] = 2
    doc["organizations"][3]["projects"][0]["clients"][0]["keys"][0]["expires_at"] = "soon"
    with pytest.raises(ManifestError, match="expires_at: must be an ISO 8601 timestamp"):
        parse(doc, reuse=second.compiled_orgs)


def test_a_reload_read_in_a_child_process_carries_only_what_changed(tmp_path: Path) -> None:
    """The child sends an organization the manifest in force holds as its fingerprint, taken
    of the document as read: a YAML timestamp, which JSON would carry as text, still matches."""
    from datetime import UTC, datetime

    from tollway.manifest.beside import load_beside
    from tollway.manifest.reading import read

    doc = yaml.safe_load(MINIMAL)
    doc["organizations"] += [{"id": f"org{i}", "projects": [{"id": "p", "quotas": [
        {"rpm": 2}], "clients": [{"id": f"c{i}", "keys": [
            {"id": f"k{i}", "expires_at": datetime(2030, 1, 1, tzinfo=UTC)}]}]}]}
        for i in range(2)]
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump(doc))
    assert "expires_at: 2030-01-01 00:00:00+00:00" in path.read_text()  # a timestamp
    first = load(path, reuse={})

    doc["organizations"][2]["projects"][0]["quotas"][0]["rpm"] = 3
    path.write_text(yaml.safe_dump(doc))
    answer = read(str(path), set(first.compiled_orgs))
    assert ["known" in o for o in answer["organizations"]] == [True, True, False]
    second = load_beside(path, first.compiled_orgs)
    assert [a is b for a, b in zip(first.organizations, second.organizations, strict=True)] \
        == [True, True, False]
    assert second.bindings["k1"].key.expires_at == "2030-01-01T00:00:00+00:00"
    assert set(second.compiled_orgs) == set(load(path, reuse={}).compiled_orgs)


def test_the_reader_compiles_what_it_reads_and_the_serving_process_does_not(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A reload's changed organizations are compiled in the warm reader, off the serving
    process (whose every step the requests in flight wait for), and as a start compiles them:
    a YAML date in an organization's metadata stays a date (JSON made it text). A problem in
    one refuses the manifest, named as parse names it."""
    from datetime import date

    from tests.e2e.harness import offline_manifest
    from tollway.manifest import orgs
    from tollway.manifest.beside import load_beside, load_here

    doc = offline_manifest()
    doc["organizations"] += [{"id": f"org{i}", "metadata": {"since": date(2024, 1, i + 1)},
                              "projects": [{"id": "p", "quotas": [{"rpm": 2}]}]}
                             for i in range(2)]
    last = len(doc["organizations"]) - 1
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump(doc))
    first = load_here(path)

    compiled_here: list[str] = []
    compile_org = orgs._org
    monkeypatch.setattr(orgs, "_org", lambda n: compiled_here.append(n.path) or compile_org(n))
    doc["organizations"][last]["projects"][0]["quotas"][0]["rpm"] = 3
    path.write_text(yaml.safe_dump(doc))
    second = load_beside(path, first.compiled_orgs, first.org_texts)
    assert compiled_here == []
    assert [a is b for a, b in zip(first.organizations, second.organizations, strict=True)] \
        == [True] * last + [False]
    assert second.organizations[last].metadata["since"] == date(2024, 1, 2)
    assert second.organizations[last].projects[0].quotas[0].limits["rpm"] == 3
    assert second == load_here(path)  # as a start reads it

    doc["organizations"][last]["projects"][0]["id"] = "not an id"
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(ManifestError, match=rf"organizations\[{last}\]\.projects\[0\]\.id: "):
        load_beside(path, second.compiled_orgs, second.org_texts)


def test_who_answers_the_rate_limit_is_filter_or_check() -> None:
    assert loads(MINIMAL).services.rate_limit == "filter"
    assert loads(MINIMAL + "services: {rate_limit: check}\n").services.rate_limit == "check"
    assert any(p.startswith("services.rate_limit: must be 'filter'")
               for p in problems(MINIMAL + "services: {rate_limit: lua}\n"))


def test_pinning_the_services_to_cpus_is_off_unless_asked() -> None:
    assert loads(MINIMAL).services.pin_cpus is False
    assert loads(MINIMAL + "services: {pin_cpus: true}\n").services.pin_cpus is True
    assert "services.pin_cpus: must be true or false" in problems(
        MINIMAL + "services: {pin_cpus: 'yes please'}\n")


def test_a_providers_model_is_found_by_name() -> None:
    openai = loads(MINIMAL).provider("openai")
    assert openai.model("gpt-5.4") is openai.models[1]
    assert openai.model("gpt-5.4-mini") is openai.models[0]
    assert openai.model("gpt-5") is None


def test_cedar_is_loaded_only_for_a_manifest_with_policies(tmp_path: Path) -> None:
    """Importing cedarpy took 30 ms of every `tollway` command: a manifest without policies
    does not pay it, and one with a bad policy is still refused."""
    import subprocess
    import sys

    path = tmp_path / "m.yaml"
    path.write_text(MINIMAL)
    probe = ("import sys; from tollway.manifest import load; load(sys.argv[1]); "
             "print('cedarpy' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", probe, str(path)], capture_output=True,
                         text=True, check=True)
    assert out.stdout.strip() == "False"
    assert any("does not parse" in p for p in problems(
        MINIMAL + "policies: [{id: bad, text: 'permit(principal'}]\n"))


def _with_statuses(path: Path) -> dict[str, Any]:
    """The example with a status written at each level somewhere, for the reads to agree on."""
    doc = yaml.safe_load(path.read_text())
    org = doc["organizations"][-1]
    org["projects"][0]["status"] = "suspended"
    org["projects"][-1]["clients"][0]["keys"][0]["status"] = "revoked"
    doc["organizations"][0]["projects"][0]["clients"][-1]["status"] = "suspended"
    return doc


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_the_keys_part_places_keys_where_the_compile_binds_them(path: Path,
                                                                tmp_path: Path) -> None:
    """`tollway keys` reads the key ids' places without compiling the manifest: it must
    agree with the compile, status included, on every example."""
    from tollway.manifest.keys_part import load_keys_part

    written = tmp_path / path.name
    written.write_text(yaml.safe_dump(_with_statuses(path)))
    m, part = load(written), load_keys_part(written)
    assert part.storage == m.storage
    assert {k: (p.org, p.project, p.client, p.status) for k, p in part.places.items()} == {
        k: (b.org.id, b.project.id, b.client.id, b.status) for k, b in m.bindings.items()}
    assert {p.status.value for p in part.places.values()} - {"active"}  # statuses were read


def test_the_keys_part_reads_past_a_mistake_elsewhere_but_not_in_storage(
        tmp_path: Path) -> None:
    from tollway.manifest.keys_part import load_keys_part

    doc = yaml.safe_load(EXAMPLES[0].read_text())
    doc["organizations"][0]["projects"][0]["plan"] = "no-such-plan"
    doc["routes"] = "not a list"
    written = tmp_path / "m.yaml"
    written.write_text(yaml.safe_dump(doc))
    with pytest.raises(ManifestError):
        load(written)
    assert load_keys_part(written).places  # the keys are still found
    doc["storage"] = {"keys": "mysql://x", "ledger": 3}
    written.write_text(yaml.safe_dump(doc))
    with pytest.raises(ManifestError) as e:
        load_keys_part(written)
    assert set(e.value.problems) == {
        "storage.keys: must start with one of sqlite:, postgresql:, postgres:, env:",
        "storage.ledger: must be a non-empty string",
        "storage.ledger: must start with one of sqlite:, postgresql:, postgres:, env:"}


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_the_keys_part_parses_only_the_organizations_that_may_hold_keys(
        path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Most organizations of a large manifest write no key (keys belong in the store), and
    `tollway keys` took 2.6-3.4 s on 100,000 projects parsing them all. Where the text is cut
    at its organizations, only those whose text may hold a mapping key `keys` are parsed:
    the word, or a backslash (a double-quoted `"k\\x65ys"`). The places found are those of the
    whole document."""
    from tollway.manifest import reading
    from tollway.manifest.keys_part import load_keys_part, places_in
    from tollway.manifest.org_texts import cut

    doc = _with_statuses(path)
    doc["organizations"] += [{"id": "zoo", "name": "monkeys", "projects": [{"id": "p"}]}]
    doc["organizations"] += [{"id": f"org{o}", "projects": [
        {"id": f"p{p}", "quotas": [{"rpm": 300}]} for p in range(3)]} for o in range(20)]
    escaped = ('- id: escaped\n  projects:\n  - id: p\n    clients:\n    - id: c\n'
               '      "k\\x65ys":\n      - id: k-escaped\n')
    text = yaml.safe_dump(doc, sort_keys=False).replace(
        "\norganizations:\n", "\norganizations:\n" + escaped, 1)
    written = tmp_path / path.name
    written.write_text(text)
    parts = cut(text)
    assert parts is not None and len(parts.entries) == len(doc["organizations"]) + 1
    parsed: list[str] = []
    read_document = reading.document

    def counted(text: str, source: str = "") -> Any:
        parsed.append(text)
        return read_document(text, source)
    monkeypatch.setattr(reading, "document", counted)
    part = load_keys_part(written)
    whole = places_in(yaml.safe_load(text))
    assert part.places == whole and "k-escaped" in whole
    with_keys = [e for e in parts.entries if "keys" in e or "\\" in e]
    assert parsed == [parts.rest, *with_keys]  # not the 20 organizations without keys
    assert [yaml.safe_load(e)[0]["id"] for e in with_keys] == [
        "escaped", *(o["id"] for o in doc["organizations"][:-21]), "zoo"]


def test_quotas_written_alike_are_compiled_once_and_every_problem_is_still_named() -> None:
    """Quotas are compiled once per distinct document (10,000 projects may write the same
    ones) and shared; a document with a problem is never taken from what was compiled, so
    each place that writes it is named, and 2.0 is not taken for the 2 compiled before."""
    doc = yaml.safe_load(MINIMAL)
    projects = doc["organizations"][0]["projects"]
    projects += [{"id": f"p{i}", "quotas": [{"name": "team", "rpm": 300}, {"rpm": 2}]}
                 for i in range(3)]
    m = parse(doc)
    p1, p2, p3 = m.organizations[0].projects[1:]
    assert p1.quotas is p2.quotas is p3.quotas and p1.quotas[1].limits == {"rpm": 2}
    projects[1]["quotas"][1]["rpm"] = 2.0
    projects[3]["quotas"][1]["rpm"] = 2.0
    assert [p for p in problems(yaml.safe_dump(doc)) if "rpm" in p] == [
        "organizations[0].projects[1].quotas[1].rpm: must be a positive integer",
        "organizations[0].projects[3].quotas[1].rpm: must be a positive integer"]


def test_the_checks_across_organizations_name_every_place() -> None:
    """These checks run over every organization at each reload, so they make a path only
    where something is wrong: each wrong place is still named."""
    doc = yaml.safe_load(MINIMAL)
    doc["plans"] = [{"name": "pro", "quotas": [{"rpm": 5, "models": ["gpt-0"]}]}]
    doc["organizations"].append({
        "id": "beta", "quotas": [{"rpm": 5, "models": ["gpt-1"]}],
        "model_rules": [{"models": ["gpt-2"]}],
        "projects": [{"id": "a"}, {"id": "b", "models": ["gpt-3"], "plan": "gold",
                                   "model_rules": [{"models": ["gpt-4"]}],
                                   "quotas": [{"rpm": 1}, {"rpm": 2, "models": ["gpt-5"]}]},
                     {"id": "a"}]})
    found = problems(yaml.safe_dump(doc))
    for expected in (
            "plans[0].quotas[0].models[0]: unknown model 'gpt-0'",
            "organizations[1].quotas[0].models[0]: unknown model 'gpt-1'",
            "organizations[1].model_rules[0].models[0]: unknown model 'gpt-2'",
            "organizations[1].projects[1].models[0]: unknown model 'gpt-3'",
            "organizations[1].projects[1].plan: unknown plan 'gold'",
            "organizations[1].projects[1].model_rules[0].models[0]: unknown model 'gpt-4'",
            "organizations[1].projects[1].quotas[1].models[0]: unknown model 'gpt-5'",
            "organizations[1].projects[2].id: duplicate project id 'a' "
            "(first at organizations[1].projects[0])"):
        assert any(p.startswith(expected) for p in found), (expected, found)


def test_an_organization_id_written_twice_is_named_with_the_first() -> None:
    doc = yaml.safe_load(MINIMAL)
    org_id = doc["organizations"][0]["id"]
    doc["organizations"] += [{"id": "other", "projects": [{"id": "y"}]},
                             {"id": org_id, "projects": [{"id": "z"}]}]
    assert f"organizations[2].id: duplicate organization id '{org_id}' " \
        "(first at organizations[0])" in problems(yaml.safe_dump(doc))


def test_access_log_keep_mb() -> None:
    """How much of Envoy's reconciled access-log file stays on disk: 0 frees all of it."""
    assert loads(MINIMAL).gateway.access_log_keep_mb == 64
    assert loads("gateway: {access_log_keep_mb: 0}\n" + MINIMAL).gateway.access_log_keep_mb == 0
    assert "gateway.access_log_keep_mb: must be an integer >= 0" in problems(
        "gateway: {access_log_keep_mb: -1}\n" + MINIMAL)


def test_a_gzip_manifest_reads_as_its_text(tmp_path: Path) -> None:
    """A ConfigMap holds at most 1 MiB: a manifest may be gzip-compressed YAML, told from YAML
    by the gzip header, wherever a manifest is read: load, a serving process's reload by its
    reader, the keys' commands. A broken or oversized one is refused with the reason."""
    import gzip

    from tests.e2e.harness import offline_manifest
    from tollway.manifest.beside import load_beside
    from tollway.manifest.keys_part import load_keys_part
    from tollway.manifest.reading import inflate

    text = yaml.safe_dump(offline_manifest())
    plain, packed = tmp_path / "plain.yaml", tmp_path / "packed.yaml"
    plain.write_text(text)
    packed.write_bytes(gzip.compress(text.encode()))
    want = load(plain)
    assert load(packed).organizations == want.organizations
    assert load_beside(packed, {}).organizations == want.organizations
    keys, want_keys = load_keys_part(packed), load_keys_part(plain)
    assert (keys.storage, keys.places) == (want_keys.storage, want_keys.places)
    # gunzip reads the members of a file one after the other, and so does the reader
    half = len(text) // 2
    packed.write_bytes(gzip.compress(text[:half].encode()) + gzip.compress(text[half:].encode()))
    assert load(packed).providers == want.providers

    whole = gzip.compress(text.encode())
    for data, reason in ((whole[:-9], "gzip content cut short"),
                         (whole[:2] + b"\0" + whole[3:], "not valid gzip"),
                         (whole + b"trailing", "not valid gzip"),
                         (gzip.compress(b"\xff\xfe" + text.encode()), "codec can't decode")):
        packed.write_bytes(data)
        with pytest.raises(ManifestError, match=f"\\(file\\): cannot read: .*{reason}"):
            load(packed)
    with pytest.raises(ValueError, match="gzip content over 1 MiB"):
        inflate(gzip.compress(b" " * ((1 << 20) + 1)), limit=1 << 20)
    assert len(inflate(gzip.compress(b" " * (1 << 20)), limit=1 << 20)) == 1 << 20


def test_a_gzip_manifest_edited_is_reloaded_one_organization_at_a_time(tmp_path: Path) -> None:
    """The cut at organizations works on the inflated text: an edit of one organization in a
    gzip manifest compiles that organization alone, read by a serving process's reader and
    in process (`tollway render --watch`) alike."""
    import gzip

    from tollway.manifest.beside import load_here
    from tollway.reload import ManifestWatcher

    doc = yaml.safe_load(MINIMAL)
    doc["organizations"] += [{"id": f"org{i}", "projects": [{"id": "p", "quotas": [
        {"rpm": 2}]}]} for i in range(3)]
    path = tmp_path / "m.yaml"
    path.write_bytes(gzip.compress(yaml.safe_dump(doc).encode()))
    for serving in (True, False):
        watcher = ManifestWatcher(path, load_here(path), serving=serving, hash_every=0)
        before = watcher.manifest.organizations
        doc["organizations"][2]["projects"][0]["quotas"][0]["rpm"] += 1
        path.write_bytes(gzip.compress(yaml.safe_dump(doc).encode()))
        assert watcher.check()
        after = watcher.manifest.organizations
        assert [a is b for a, b in zip(before, after, strict=True)] == [True, True, False, True]
        assert after[2].projects[0].quotas[0].limits["rpm"] == doc["organizations"][2][
            "projects"][0]["quotas"][0]["rpm"]
