"""The ledger against the provider's own bill, request by request, on the providers' real wire:
both SDKs with their default headers (gzip, deflate, br, zstd), JSON and SSE, every spelling of
stream_options a JSON parser accepts, clients that hang up, streams that break, answers a CDN
compressed whatever was asked, cached reads, cache writes and reasoning tokens.

Where the provider's usage reached the gateway, the ledger holds exactly the provider's numbers
and the rate card's exact price; where it could not (a hang-up, a broken stream, an encoding
Envoy cannot decode), the row is flagged `estimated` and charged, never free.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from typing import Any

import anthropic
import httpx
import openai
import pytest

from .harness import Gateway, run_gateway
from .test_metering import wait_for_rows

pytestmark = pytest.mark.e2e

MILLION = Decimal(1_000_000)
# the harness's rate card: input, output, cached input; cache writes at Anthropic's published
# multiples of the input price (1.25x for 5 minutes, 2x for 1 hour), as the loader defaults them
PRICES = {
    "gpt-5.4-mini": (Decimal("0.75"), Decimal("4.50"), Decimal("0.075")),
    "gpt-5.4": (Decimal("2.50"), Decimal("15.00"), Decimal("0.25")),
    "claude-haiku": (Decimal("1.00"), Decimal("5.00"), Decimal("0.10")),
}


def provider_price(model: str, path: str, b: dict[str, int]) -> Decimal | None:
    """What the provider charges, from its published rules, written apart from tollway.pricing."""
    if model not in PRICES:
        return None
    pin, pout, pcached = PRICES[model]
    if path == "/v1/messages":
        writes_1h = b["cache_creation_1h_tokens"]
        writes_5m = b["cache_creation_tokens"] - writes_1h
        cost = (b["input_tokens"] * pin + b["cached_input_tokens"] * pcached
                + writes_5m * pin * Decimal("1.25") + writes_1h * pin * 2)
    else:
        cost = ((b["input_tokens"] - b["cached_input_tokens"]) * pin
                + b["cached_input_tokens"] * pcached)
    return (cost + b["output_tokens"] * pout) / MILLION


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    def mutate(doc: dict[str, Any]) -> None:
        doc["routes"].append({"path": "/v1/completions", "provider": "openai"})
    with run_gateway(tmp_path_factory.mktemp("bill"), mutate=mutate) as g:
        g.issue("k-main")
        yield g


# -- the request kinds ---------------------------------------------------------------------------
# Each sends one request and returns (request id, expectation): "exact" when the provider's usage
# reaches the gateway, "estimated" when it cannot, "either" when a race decides (a hang-up right
# after the headers), "unbilled" when the provider refused it.

Sent = tuple[str, str]


class Kinds:
    def __init__(self, gw: Gateway, rng: random.Random) -> None:
        self.gw, self.rng, self.key = gw, rng, gw.issued["k-main"]
        self.oai = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=self.key, max_retries=0,
                                 timeout=15)
        self.claude = anthropic.Anthropic(base_url=gw.url, api_key=self.key, max_retries=0,
                                          timeout=15)
        self.http = httpx.Client(timeout=15)

    def prompt(self) -> str:
        return "word " * self.rng.choice([3, 60, 1500])  # the long ones report cached tokens

    def messages(self) -> list[dict[str, str]]:
        return [{"role": "user", "content": self.prompt()}]

    def raw(self, body: str, encoding: str | None = None, path: str = "/v1/chat/completions",
            headers: dict[str, str] | None = None) -> httpx.Response:
        h = {"authorization": f"Bearer {self.key}", "content-type": "application/json",
             **(headers or {})}
        if encoding is not None:
            h["accept-encoding"] = encoding
        return self.http.post(f"{self.gw.url}{path}", content=body, headers=h)

    # OpenAI SDK, default headers
    def chat_json(self) -> Sent:
        r = self.oai.chat.completions.with_raw_response.create(
            model="gpt-5.4-mini", max_tokens=self.rng.choice([5, 12]), messages=self.messages())
        assert r.parse().choices[0].message.content
        return r.headers["x-request-id"], "exact"

    def chat_stream_unasked(self) -> Sent:
        with self.oai.chat.completions.with_streaming_response.create(
                model="gpt-5.4", stream=True, messages=self.messages()) as r:
            chunks = list(r.parse())
            assert chunks[-1].usage is not None  # the gateway asked for it; it is passed on
            return r.headers["x-request-id"], "exact"

    def chat_stream_asked(self) -> Sent:
        with self.oai.chat.completions.with_streaming_response.create(
                model="gpt-5.4-mini", stream=True, stream_options={"include_usage": True},
                messages=self.messages()) as r:
            list(r.parse())
            return r.headers["x-request-id"], "exact"

    def chat_reasoning(self) -> Sent:
        r = self.oai.chat.completions.with_raw_response.create(
            model="gpt-5.4", reasoning_effort="low", messages=self.messages())
        assert r.parse().usage.completion_tokens_details.reasoning_tokens > 0  # type: ignore[union-attr]
        return r.headers["x-request-id"], "exact"

    def embeddings(self) -> Sent:
        r = self.oai.embeddings.with_raw_response.create(model="gpt-5.4-mini",
                                                         input=[self.prompt(), "b"])
        assert len(r.parse().data) == 2
        return r.headers["x-request-id"], "exact"

    def responses_json(self) -> Sent:
        # a tool schema whose property names are usage field names: not usage
        r = self.oai.responses.with_raw_response.create(
            model="gpt-5.4", input=self.prompt(), max_output_tokens=9, reasoning={"effort": "low"},
            tools=[{"type": "function", "name": "count", "parameters": {
                "type": "object", "properties": {"input_tokens": {"type": "integer",
                                                                  "default": 999999}}}}])
        assert r.parse().output_text
        return r.headers["x-request-id"], "exact"

    def responses_stream(self) -> Sent:
        with self.oai.responses.with_streaming_response.create(
                model="gpt-5.4-mini", input=self.prompt(), stream=True) as r:
            list(r.parse())
            return r.headers["x-request-id"], "exact"

    def completions_stream(self) -> Sent:
        with self.oai.completions.with_streaming_response.create(
                model="gpt-5.4-mini", prompt=self.prompt(), stream=True) as r:
            list(r.parse())
            return r.headers["x-request-id"], "exact"

    # Anthropic SDK, default headers
    def messages_json(self) -> Sent:
        r = self.claude.messages.with_raw_response.create(
            model=self.rng.choice(["claude-haiku", "claude-opus"]), max_tokens=10,
            messages=self.messages())  # type: ignore[arg-type]
        assert r.parse().content
        return r.headers["x-request-id"], "exact"

    def messages_stream(self) -> Sent:
        with self.claude.messages.stream(model="claude-haiku", max_tokens=12,
                                         messages=self.messages()) as s:  # type: ignore[arg-type]
            s.get_final_message()
            return s.response.headers["x-request-id"], "exact"

    def messages_cache_write(self) -> Sent:
        ttl = self.rng.choice(["5m", "1h"])
        system = [{"type": "text", "text": "word " * 1500,
                   "cache_control": {"type": "ephemeral", "ttl": ttl}}]
        r = self.claude.messages.with_raw_response.create(
            model="claude-haiku", max_tokens=8, system=system,  # type: ignore[arg-type]
            messages=[{"role": "user", "content": "hi"}])
        assert r.parse().usage.cache_creation_input_tokens
        return r.headers["x-request-id"], "exact"

    # every stream_options spelling a parser accepts, on the raw wire
    def spelled(self) -> Sent:
        msgs = json.dumps(self.messages())
        body = self.rng.choice([
            '{"model":"gpt-5.4-mini","stream":true,"stream_options":null,"messages":%s}',
            '{"model":"gpt-5.4-mini","stream":true,"stre\\u0061m_options":'
            '{"include_usage":false},"messages":%s}',
            '{"model":"gpt-5.4-mini","stream":true,"stream_options":{"include_usage":true},'
            '"stream_options":{"include_usage":false},"messages":%s}',
            '{"model":"gpt-5.4-mini","stream":true,"stream_options":{"include_\\u0075sage":'
            'false,"include_obfuscation":false},"messages":%s}',
            '{"model":"gpt-5.4-mini","stream":true,"tools":[{"type":"function","function":'
            '{"name":"f","parameters":{"type":"object","properties":{"include_usage":'
            '{"type":"boolean","default":true}}}}}],"messages":%s}',
            '{"model":"gpt-5.4-mini","stream":false,"stream":true,"messages":%s}',
            ' {\n "model" : "gpt-5.4-mini" ,\t"stream" : true , "messages" : %s }\n',
        ]) % msgs
        encoding = self.rng.choice(["gzip", "identity", "br", "zstd", "deflate"])
        r = self.raw(body, encoding)
        assert r.status_code == 200, r.text
        events = [json.loads(line[6:]) for line in r.text.splitlines()
                  if line.startswith("data: {")]
        assert events[-1]["usage"]["completion_tokens"] > 0
        # the answer comes in a coding the client accepted (deflate: none Envoy has; identity)
        assert r.headers.get("content-encoding") == (
            None if encoding in ("identity", "deflate") else encoding)
        return r.headers["x-request-id"], "exact"

    def identity_json(self) -> Sent:
        r = self.raw(json.dumps({"model": "gpt-5.4", "messages": self.messages()}), "identity")
        assert r.status_code == 200 and "content-encoding" not in r.headers
        assert json.loads(r.content)["usage"]["prompt_tokens"] > 0
        return r.headers["x-request-id"], "exact"

    def cdn_compressed(self) -> Sent:
        """The provider compresses whatever was asked: Envoy decodes gzip, br and zstd, for
        either dialect, JSON and SSE."""
        coding = self.rng.choice(["gzip", "br", "zstd"])
        stream = self.rng.random() < 0.5
        if self.rng.random() < 0.5:
            r = self.raw(json.dumps({"model": "gpt-5.4-mini", "stream": stream,
                                     "messages": self.messages()}),
                         headers={"x-mock-force-encoding": coding})
        else:
            r = self.raw(json.dumps({"model": "claude-haiku", "stream": stream,
                                     "max_tokens": 9, "messages": self.messages()}),
                         path="/v1/messages", headers={"x-mock-force-encoding": coding,
                                                       "anthropic-version": "2023-06-01"})
        assert r.status_code == 200, r.text
        return r.headers["x-request-id"], "exact"

    def cdn_deflate(self) -> Sent:
        """An encoding Envoy cannot decode: usage unseen, so estimated (and charged)."""
        r = self.raw(json.dumps({"model": "gpt-5.4-mini", "messages": self.messages()}),
                     headers={"x-mock-force-encoding": "deflate"})
        assert r.status_code == 200
        return r.headers["x-request-id"], "estimated"

    # clients that hang up, streams that break, provider refusals
    def hang_up_after_headers(self) -> Sent:
        stream = self.rng.random() < 0.5
        body = json.dumps({"model": "gpt-5.4", "stream": stream, "max_tokens": 12,
                           "messages": self.messages()})
        h = {"authorization": f"Bearer {self.key}", "content-type": "application/json",
             "x-mock-delay-ms": "30"}
        with self.http.stream("POST", f"{self.gw.url}/v1/chat/completions", content=body,
                              headers=h) as r:
            rid = r.headers["x-request-id"]  # headers only, then close
        # the body may or may not have passed Envoy before the reset reached it
        return rid, "either"

    def hang_up_before_usage(self) -> Sent:
        """The provider answers (and bills) but the client leaves before the usage passes."""
        stream = self.rng.random() < 0.5
        body = json.dumps({"model": "gpt-5.4-mini", "stream": stream,
                           "max_tokens": self.rng.choice([5, 12, 100]),
                           "messages": self.messages()})
        # the provider holds the usage back far longer than a client on a busy machine may take
        # to hang up (it has billed already; a long stall costs the test nothing)
        h = {"authorization": f"Bearer {self.key}", "content-type": "application/json",
             "x-mock-stall-ms": "2000"}
        with self.http.stream("POST", f"{self.gw.url}/v1/chat/completions", content=body,
                              headers=h) as r:
            rid = r.headers["x-request-id"]
            if stream:
                next(r.iter_raw())  # the first event, then hang up
        return rid, "estimated"

    def broken_stream(self) -> Sent:
        if self.rng.random() < 0.5:
            with self.oai.chat.completions.with_streaming_response.create(
                    model="gpt-5.4-mini", stream=True, messages=self.messages(),
                    extra_headers={"x-mock-fail-after": "3"}) as r:
                with pytest.raises(openai.APIError):
                    list(r.parse())
                return r.headers["x-request-id"], "estimated"
        with pytest.raises(anthropic.APIStatusError), self.claude.messages.stream(
                model="claude-haiku", max_tokens=12, messages=self.messages(),  # type: ignore[arg-type]
                extra_headers={"x-mock-fail-after": "3"}) as s:
            rid = s.response.headers["x-request-id"]
            s.get_final_message()
        return rid, "estimated"

    def provider_refuses(self) -> Sent:
        status = self.rng.choice(["429", "500"])
        try:
            self.oai.chat.completions.create(model="gpt-5.4-mini", messages=self.messages(),
                                             extra_headers={"x-mock-status": status})
        except openai.APIStatusError as e:
            assert e.status_code == int(status)
            return e.response.headers["x-request-id"], "unbilled"
        raise AssertionError("the provider's refusal did not reach the client")

    def all(self) -> list[Callable[[], Sent]]:
        return [self.chat_json, self.chat_stream_unasked, self.chat_stream_asked,
                self.chat_reasoning, self.embeddings, self.responses_json,
                self.responses_stream, self.completions_stream, self.messages_json,
                self.messages_stream, self.messages_cache_write, self.spelled, self.spelled,
                self.spelled, self.identity_json, self.cdn_compressed, self.cdn_deflate,
                self.hang_up_after_headers, self.hang_up_before_usage, self.broken_stream,
                self.provider_refuses]


def test_the_ledger_equals_the_providers_bill(gw: Gateway) -> None:
    httpx.delete(f"{gw.mock_url}/_mock/seen")
    total = 1100

    def run(worker: int) -> list[Sent]:
        kinds = Kinds(gw, random.Random(worker))
        plan = kinds.all()
        return [plan[(worker + i) % len(plan)]() for i in range(total // 10)]

    with ThreadPoolExecutor(10) as pool:
        sent = [s for batch in pool.map(run, range(10)) for s in batch]
    assert len(sent) == total
    expect = dict(sent)
    bill: dict[str, dict[str, Any]] = httpx.get(f"{gw.mock_url}/_mock/bill").json()
    rows = wait_for_rows(gw, set(expect), timeout=30)

    outcome: Counter[str] = Counter()
    for rid, want in expect.items():
        row = rows[rid]
        assert row["key_id"] == "k-main"
        if want == "unbilled":
            assert rid not in bill and not row["estimated"]
            assert row["cost"] in (None, "0", "0E-10") or Decimal(row["cost"]) == 0
            outcome["unbilled"] += 1
            continue
        b = bill[rid]  # the provider billed every request it answered
        if row["estimated"]:
            assert want in ("estimated", "either"), (b["path"], want, row)
            assert row["output_tokens"] > 0 and row["input_tokens"] > 0
            if b["model"] in PRICES:
                assert Decimal(row["cost"]) > 0  # charged, never free
            outcome["estimated"] += 1
            outcome[f"estimated {b['path']}"] += 1
            continue
        assert want in ("exact", "either"), (b["path"], want, row)
        got = {k: row[k] for k in ("input_tokens", "output_tokens", "cached_input_tokens",
                                   "cache_creation_tokens", "cache_creation_1h_tokens",
                                   "reasoning_tokens")}
        assert got == {k: b[k] for k in got}, (b["path"], row["stream"])
        want_cost = provider_price(b["model"], b["path"], b)
        assert (Decimal(row["cost"]) if row["cost"] is not None else None) == want_cost, (
            b["path"], b["model"])
        outcome["exact"] += 1
    # the mix really covered what it claims to
    assert outcome["exact"] >= 800 and outcome["estimated"] >= 150
    billed = [b for rid, b in bill.items() if rid in expect]
    assert sum(b["cache_creation_1h_tokens"] > 0 for b in billed) > 5
    assert sum(b["cache_creation_tokens"] > b["cache_creation_1h_tokens"] for b in billed) > 5
    assert sum(b["reasoning_tokens"] > 0 for b in billed) > 50
    assert sum(b["cached_input_tokens"] > 0 for b in billed) > 50
    seen_encodings = Counter(s["headers"].get("accept-encoding") for s in
                             httpx.get(f"{gw.mock_url}/_mock/seen").json())
    assert set(seen_encodings) == {"identity"}, seen_encodings  # asked of the provider
    # and the report says which part of the spend is estimated
    month = next(iter(rows.values()))["at"][:7]
    report = json.loads(gw.cli("spend", "--period", month, "--by", "key", "--format", "json"))
    line = next(ln for ln in report if ln["key"] == "k-main")
    assert line["estimated"] == sum(bool(r["estimated"]) for r in rows.values()
                                    if r["key_id"] == "k-main")
    assert line["reasoning_tokens"] == sum(r["reasoning_tokens"] for r in rows.values()
                                           if r["key_id"] == "k-main") > 0
    print(f"\nledger vs the provider's bill over {total} requests: {dict(outcome)}")


# -- the stream_options rewrite, against a real parser ------------------------------------------

def _spell(rng: random.Random, value: Any, depth: int = 0) -> str:
    """`value` as JSON, spelled as a client might: random white space, escaped names and
    strings, and, in objects, decoy members that a later duplicate overrides."""
    ws = lambda: rng.choice(["", " ", "\n", "\t ", "  "])  # noqa: E731

    def name(k: str) -> str:
        if rng.random() < 0.3 and k:
            i = rng.randrange(len(k))
            k = k[:i] + f"\\u{ord(k[i]):04x}" + k[i + 1:]
            return f'"{k}"'
        return json.dumps(k)
    if isinstance(value, dict):
        parts = []
        for k, v in value.items():
            if rng.random() < 0.2 and depth < 3:  # a duplicate the parser will discard
                parts.append(f"{ws()}{name(k)}{ws()}:{ws()}{_spell(rng, {'decoy': True}, 9)}")
            parts.append(f"{ws()}{name(k)}{ws()}:{ws()}{_spell(rng, v, depth + 1)}{ws()}")
        return "{" + ",".join(parts) + "}"
    if isinstance(value, list):
        return "[" + ",".join(_spell(rng, v, depth + 1) for v in value) + "]"
    return json.dumps(value, ensure_ascii=rng.random() < 0.5)


def test_what_the_provider_parses_is_what_the_client_sent_plus_usage(gw: Gateway) -> None:
    rng = random.Random(11)
    key = gw.issued["k-main"]
    http = httpx.Client(timeout=15)
    for n in range(300):
        opts = rng.choice([None, "absent", {}, {"include_usage": False},
                           {"include_usage": True}, {"include_obfuscation": False},
                           {"include_usage": False, "include_obfuscation": True}])
        doc: dict[str, Any] = {"model": "gpt-5.4-mini", "stream": True, "max_tokens": 5,
                               "messages": [{"role": "user", "content": rng.choice(
                                   ["hi", "héllo \"quoted\" \\ ✓", '{"stream_options":1}'])}]}
        if rng.random() < 0.5:
            doc["tools"] = [{"type": "function", "function": {"name": "t", "parameters": {
                "type": "object", "properties": {"include_usage": {"type": "boolean"},
                                                 "stream_options": {"type": "object"}}}}}]
        if opts != "absent":
            doc["stream_options"] = opts
        items = list(doc.items())
        rng.shuffle(items)
        body = _spell(rng, dict(items))
        r = http.post(f"{gw.url}/v1/chat/completions", content=body.encode(),
                      headers={"authorization": f"Bearer {key}",
                               "content-type": "application/json"})
        assert r.status_code == 200, (body, r.text)
        sent = json.loads(body)
        [seen] = http.get(f"{gw.mock_url}/_mock/seen",
                          params={"request_id": r.headers["x-request-id"]}).json()
        forwarded = seen["body"]
        want = dict(sent)
        want["stream_options"] = {**(sent.get("stream_options") or {}), "include_usage": True}
        assert forwarded == want, (n, body)
        assert '"completion_tokens"' in r.text  # the usage reached the client's stream too
