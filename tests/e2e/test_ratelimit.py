"""Rate limits end to end: examples/team-ai.yaml behind the real Envoy, with the openai SDK."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import openai
import pytest
import yaml

from tests.test_ratelimit_backends import REDIS_URL

from .harness import ROOT, Gateway, envoy_stat, redis_counters_for, run_gateway

pytestmark = pytest.mark.e2e
MESSAGES: list[Any] = [{"role": "user", "content": "hi"}]


def team_ai(counters: str, extra: Any = None) -> Any:
    """examples/team-ai.yaml as written, with the provider pointed at the mock and local ports."""
    def mutate(doc: dict[str, Any]) -> None:
        ex = yaml.safe_load((ROOT / "examples" / "team-ai.yaml").read_text())
        ex["gateway"] = doc["gateway"]
        ex["services"] = doc["services"]
        ex["storage"] = {**doc["storage"], "counters": counters}
        provider = ex["providers"][0]
        provider.update(upstream=doc["providers"][0]["upstream"], mock=True,
                        credential="env:MOCK_PROVIDER_KEY")
        if extra:
            extra(ex)
        doc.clear()
        doc.update(ex)
    return mutate


def client(gw: Gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gw.url}/v1", api_key=gw.issued["da-sk-acme-team"],
                         max_retries=0, timeout=10)


def in_check(ex: dict[str, Any]) -> None:
    """services.rate_limit: check: extauthz answers the rate limit in its Check."""
    ex["services"]["rate_limit"] = "check"


@pytest.fixture(params=["memory", "redis", "memory, in the check"])
def gw(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Gateway]:
    counters = REDIS_URL if request.param == "redis" else "memory"
    if request.param == "redis":
        redis_counters_for("acme")
    mode = in_check if request.param.endswith("in the check") else None
    with run_gateway(tmp_path, mutate=team_ai(counters, mode)) as g:
        g.issue("da-sk-acme-team")
        yield g


def seconds(duration: str) -> int:
    """OpenAI's reset duration ("1m0s", "59s") in seconds."""
    minutes, _, rest = duration.rpartition("m")
    return int(minutes or 0) * 60 + int(rest.removesuffix("s"))


def test_the_41st_gpt54_request_in_a_minute_is_refused(gw: Gateway) -> None:
    c = client(gw)
    first = time.monotonic()
    for i in range(40):
        raw = c.chat.completions.with_raw_response.create(model="gpt-5.4", messages=MESSAGES,
                                                          max_tokens=10)
        assert raw.headers["x-ratelimit-limit-requests"] == "40"
        # the window resets when the first request leaves it: a minute after it was counted,
        # so the sooner the longer these 40 take (seconds on a busy machine)
        since_first = time.monotonic() - first
        reset = seconds(raw.headers["x-ratelimit-reset-requests"])
        assert 60 - since_first - 1 <= reset <= 61, (reset, since_first)
        assert raw.headers["x-ratelimit-remaining-requests"] == str(39 - i)
        assert raw.headers["x-ratelimit-limit-tokens"] == "60000"
        assert int(raw.headers["x-ratelimit-remaining-tokens"]) < 60000
    with pytest.raises(openai.RateLimitError) as e:
        c.chat.completions.create(model="gpt-5.4", messages=MESSAGES, max_tokens=10)
    assert e.value.code == "rate_limit_exceeded"
    headers = e.value.response.headers
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert headers["x-tollway-error"] == "rate_limit_exceeded" and headers["x-request-id"]
    assert 1 <= int(headers["retry-after"]) <= 61
    assert "high-capability-model" in e.value.message
    # the other model has its own quota and still answers
    ok = c.chat.completions.with_raw_response.create(model="gpt-5.4-mini", messages=MESSAGES,
                                                     max_tokens=10)
    assert ok.headers["x-ratelimit-limit-requests"] == "260"
    assert ok.headers["x-ratelimit-remaining-requests"] == "259"


def test_tpm_refuses_once_reservations_pass_it(gw: Gateway) -> None:
    c = client(gw)
    # gpt-5.4 answers at most 32768 tokens; two such reservations pass its 60,000 TPM while
    # the first is still in flight (once it ends, its real usage replaces its reservation)
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(c.chat.completions.create, model="gpt-5.4", messages=MESSAGES,
                            max_tokens=32768, extra_headers={"x-mock-delay-ms": "3000"})
        deadline = time.monotonic() + 10
        while not gw.seen():  # the first request has passed the rate limiter
            assert time.monotonic() < deadline
            time.sleep(0.02)
        with pytest.raises(openai.RateLimitError) as e:
            c.chat.completions.create(model="gpt-5.4", messages=MESSAGES, max_tokens=32768)
        first.result()
    assert "60000 tokens" in e.value.message
    c.chat.completions.create(model="gpt-5.4", messages=MESSAGES, max_tokens=10)


def test_a_reservation_alone_over_the_limit_says_so(tmp_path: Path) -> None:
    def small_key_quota(ex: dict[str, Any]) -> None:
        key = ex["organizations"][0]["projects"][0]["clients"][0]["keys"][0]
        key["quotas"] = [{"name": "tiny", "tpm": 1000}]
    with run_gateway(tmp_path, mutate=team_ai("memory", small_key_quota)) as gw:
        gw.issue("da-sk-acme-team")
        with pytest.raises(openai.RateLimitError) as e:
            client(gw).chat.completions.create(model="gpt-5.4-mini", messages=MESSAGES,
                                               max_tokens=2000)
        assert "more than quota 'tiny' allows" in e.value.message
        client(gw).chat.completions.create(model="gpt-5.4-mini", messages=MESSAGES,
                                           max_tokens=100)


def test_a_request_no_limit_counts_skips_the_rate_limit_call(tmp_path: Path) -> None:
    """No request or token limit on the key's org, project or key: the Check leaves
    reserve_tokens out of its metadata, and Envoy's rate-limit filter, its descriptor
    incomplete, does not call ratelimit. A reload that adds an rpm brings the call, and the
    limit, back; one that takes it away leaves requests uncounted again."""
    with run_gateway(tmp_path) as gw:  # the base manifest: no quota anywhere
        c = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=gw.issue("k-main"), max_retries=0,
                          timeout=10)
        doc = yaml.safe_load(gw.manifest_path.read_text())

        def asked() -> tuple[int, int]:
            """Envoy's count of ratelimit's answers: (OK, over limit)."""
            admin, stat = doc["gateway"]["admin_port"], "cluster.provider_openai.ratelimit"
            return envoy_stat(admin, f"{stat}.ok"), envoy_stat(admin, f"{stat}.over_limit")

        def chat() -> Any:
            return c.chat.completions.with_raw_response.create(
                model="gpt-5.4-mini", messages=MESSAGES, max_tokens=5)
        for _ in range(3):
            assert "x-ratelimit-limit-requests" not in chat().headers
        assert asked() == (0, 0)

        doc["organizations"][0]["projects"][0]["quotas"] = [{"name": "tight", "rpm": 2}]
        gw.reload(doc, timeout=5)
        assert chat().headers["x-ratelimit-remaining-requests"] == "1"
        assert chat().headers["x-ratelimit-remaining-requests"] == "0"
        with pytest.raises(openai.RateLimitError):
            chat()
        assert asked() == (2, 1)

        doc["organizations"][0]["projects"][0]["quotas"] = []
        gw.reload(doc, timeout=5)
        for _ in range(3):
            chat()
        assert asked() == (2, 1)


def test_monitor_mode_lets_everything_through_and_reports(tmp_path: Path) -> None:
    def monitor(ex: dict[str, Any]) -> None:
        quotas = ex["organizations"][0]["projects"][0]["quotas"]
        quotas.append({"name": "watch-only", "rpm": 3, "enforcement": "monitor"})
    with run_gateway(tmp_path, mutate=team_ai("memory", monitor)) as gw:
        gw.issue("da-sk-acme-team")
        for _ in range(6):
            client(gw).chat.completions.create(model="gpt-5.4-mini", messages=MESSAGES,
                                               max_tokens=5)
        log = (tmp_path / "logs" / "services.log").read_text()
        assert log.count("monitor: quota 'watch-only' would refuse key da-sk-acme-team") == 3


def static_envoy_rendered_for(mode: str) -> Any:
    """Envoy's config as an operator rendered it once (`tollway render`, a static bootstrap),
    with services.rate_limit `mode`; the services may hold another manifest since."""
    def config(manifest_path: Path, ports: dict[str, int]) -> Path:
        doc = yaml.safe_load(manifest_path.read_text())
        doc["services"]["rate_limit"] = mode
        then = manifest_path.with_name("manifest-as-rendered.yaml")
        then.write_text(yaml.safe_dump(doc))
        out = subprocess.run([sys.executable, "-m", "tollway.cli", "render", "--manifest",
                              str(then)], capture_output=True, text=True, check=True, timeout=60)
        path = manifest_path.with_name("envoy-static.yaml")
        path.write_text(out.stdout)
        return path
    return config


@pytest.mark.parametrize(("envoy_mode", "services_mode"), [("check", "filter"),
                                                           ("filter", "check")])
def test_envoy_and_the_services_disagreeing_on_the_mode_count_each_request_once(
        tmp_path: Path, envoy_mode: str, services_mode: str) -> None:
    """A switch of services.rate_limit reaches the services by reload and Envoy's listener
    when it is rendered again (at once with the watched files, later with a static bootstrap
    or an EnvoyFilter applied by hand). Whoever is behind, each request is counted once, by
    the Check if the listener has no rate-limit filter, else by the filter's call: the 41st
    gpt-5.4 request of the minute is refused, not the 21st nor never."""
    def mode(ex: dict[str, Any]) -> None:
        ex["services"]["rate_limit"] = services_mode
    with run_gateway(tmp_path, mutate=team_ai("memory", mode),
                     envoy_config=static_envoy_rendered_for(envoy_mode)) as gw:
        gw.issue("da-sk-acme-team")
        c = client(gw)
        for i in range(40):
            raw = c.chat.completions.with_raw_response.create(
                model="gpt-5.4", messages=MESSAGES, max_tokens=10)
            assert raw.headers["x-ratelimit-remaining-requests"] == str(39 - i)
        with pytest.raises(openai.RateLimitError) as e:
            c.chat.completions.create(model="gpt-5.4", messages=MESSAGES, max_tokens=10)
        assert e.value.code == "rate_limit_exceeded"


@pytest.mark.parametrize("rate_limit", ["filter", "check"])
@pytest.mark.parametrize("fail_closed", [True, False])
def test_unreachable_redis_follows_the_route_setting(tmp_path: Path, fail_closed: bool,
                                                     rate_limit: str) -> None:
    def route(ex: dict[str, Any]) -> None:
        ex["routes"][0]["fail_closed"] = fail_closed
        ex["services"]["rate_limit"] = rate_limit
    with run_gateway(tmp_path, mutate=team_ai("redis://127.0.0.1:1/0", route)) as gw:
        gw.issue("da-sk-acme-team")
        c = client(gw)
        if fail_closed:
            with pytest.raises(openai.InternalServerError) as e:
                c.chat.completions.create(model="gpt-5.4-mini", messages=MESSAGES, max_tokens=5)
            assert e.value.status_code == 503 and e.value.code == "gateway_unavailable"
        else:
            c.chat.completions.create(model="gpt-5.4-mini", messages=MESSAGES, max_tokens=5)
            metrics = (tmp_path / "logs" / "services.log").read_text()
            assert "allowing (fail-open)" in metrics


def test_reload_changes_limits_and_keeps_counters(gw: Gateway) -> None:
    c = client(gw)
    for _ in range(5):
        c.chat.completions.create(model="gpt-5.4", messages=MESSAGES, max_tokens=5)
    doc = yaml.safe_load(gw.manifest_path.read_text())
    quota = doc["organizations"][0]["projects"][0]["quotas"][2]
    assert quota["name"] == "high-capability-model"
    quota["rpm"] = 7
    gw.reload(doc, timeout=5)
    raw = c.chat.completions.with_raw_response.create(model="gpt-5.4", messages=MESSAGES,
                                                      max_tokens=5)
    assert raw.headers["x-ratelimit-limit-requests"] == "7"
    used = 7 - int(raw.headers["x-ratelimit-remaining-requests"])
    assert used == 6  # the 5 before the reload still count, plus this one
    for _ in range(7 - used):
        c.chat.completions.create(model="gpt-5.4", messages=MESSAGES, max_tokens=5)
    with pytest.raises(openai.RateLimitError):
        c.chat.completions.create(model="gpt-5.4", messages=MESSAGES, max_tokens=5)


def readers_of(pid: int) -> list[int]:
    """The warm manifest readers (tollway.manifest.reading --serve) that `pid` started."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (stat.parent / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
        if ppid == pid and b"--serve" in cmdline:
            found.append(int(stat.parent.name))
    return found


def test_a_reload_after_its_reader_was_killed_starts_another(gw: Gateway) -> None:
    """An operator's kill -9 (or the OOM killer) takes the services' warm manifest reader:
    the next edit is still applied, by a reader started again."""
    services = gw.named["services"].pid
    deadline = time.monotonic() + 10
    while not (readers := readers_of(services)):  # the watcher starts it once serving
        assert time.monotonic() < deadline, "no manifest reader started"
        time.sleep(0.05)
    os.kill(readers[0], signal.SIGKILL)
    doc = yaml.safe_load(gw.manifest_path.read_text())
    doc["organizations"][0]["metadata"] = {"edited": "after the reader was killed"}
    gw.reload(doc, timeout=5)
    assert readers_of(services) and readers_of(services) != readers


@pytest.mark.parametrize(("rate_limit", "costsink"), [
    ("filter", "beside ratelimit"), ("check", "beside ratelimit"), ("check", "apart"),
    ("filter", "apart from ratelimit's memory counters")])
def test_tpm_counts_the_tokens_the_provider_reported(tmp_path: Path, rate_limit: str,
                                                     costsink: str) -> None:
    """Each request here reserves about 30 tokens, but two of them report 490 input tokens:
    once costsink has settled those, the key's 1,000 TPM quota refuses the next request, though
    all reservations together stay far below 1,000. Charged by the rate-limit filter's call or
    in extauthz's Check, the settlement corrects the same counters; a costsink beside ratelimit
    settles in its process, and so does one apart (Redis counters), on Redis; one apart from
    a ratelimit that holds memory counters calls its Settle."""
    import time

    apart = costsink == "apart"
    settle_call = costsink.startswith("apart from")
    if apart:
        redis_counters_for("acme")

    def key_tpm(ex: dict[str, Any]) -> None:
        key = ex["organizations"][0]["projects"][0]["clients"][0]["keys"][0]
        key["quotas"] = [{"name": "reported", "tpm": 1000}]
        ex["services"]["rate_limit"] = rate_limit
    counters = REDIS_URL if apart else "memory"
    with run_gateway(tmp_path, mutate=team_ai(counters, key_tpm), split=apart,
                     ratelimit_apart=settle_call) as gw:
        gw.issue("da-sk-acme-team")
        c = client(gw)
        for _ in range(2):
            c.chat.completions.create(model="gpt-5.4-mini", messages=MESSAGES, max_tokens=1,
                                      extra_headers={"x-mock-input-tokens": "490"})
        polls = 0
        deadline = time.monotonic() + 10
        while True:
            try:
                raw = c.chat.completions.with_raw_response.create(
                    model="gpt-5.4-mini", messages=MESSAGES, max_tokens=1)
            except openai.RateLimitError as e:
                assert "quota 'reported'" in e.message
                break
            polls += 1
            assert int(raw.headers["x-ratelimit-remaining-tokens"]) >= 0
            assert time.monotonic() < deadline, "reported usage never reached the TPM counter"
            time.sleep(0.05)
        # reservations alone: (2 + polls) requests of at most ~40 tokens each (a ~90-byte body
        # / 4 + max_tokens 1) could never have reached 1,000
        assert (2 + polls) * 40 < 1000, polls
