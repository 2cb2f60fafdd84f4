"""A mock LLM provider that behaves on the wire like OpenAI and Anthropic, and keeps its own bill.

It stands in for the providers in tests, benchmarks and `tollway up`. What it does as they do:
- parses the body as a strict JSON parser (duplicate names: the last wins; NaN, trailing text,
  bad escapes: 400 in the provider's error shape);
- refuses `stream_options` unless `stream` is true, and reports usage in an OpenAI chat or
  completions stream only when `stream_options.include_usage` is true (the Responses API and
  Anthropic always report it);
- answers in the best coding the request's Accept-Encoding allows (gzip, deflate, br, zstd),
  JSON and SSE alike, an SSE stream flushed event by event;
- reports cached input (prompts of 1,024 tokens or more: their first 1,024-token multiple),
  Anthropic cache writes where the body carries `cache_control` (1-hour ones for
  `"ttl": "1h"`), and reasoning tokens where a request asks for reasoning (OpenAI counts them in
  the output);
- sends its own request id header, which the gateway's must replace.

Token counts are deterministic: input = max(1, request bytes / 4), output = min(max_tokens, 12).
It bills every request it answered with a 2xx, by the `x-request-id` the gateway sent, whether
or not the client stayed to read the answer: `GET /_mock/bill`. `GET /_mock/seen` lists what it
received (`?request_id=` for one request; `DELETE` clears both). Both hold the last `--keep`
requests (10,000 by default): a mock that runs for weeks (`tollway up`, the single pod) must
not grow without end, and each request it holds is more for the garbage collector to walk.

Test hooks (request headers): `x-mock-input-tokens: N` reports N input tokens (usage that
differs from Tollway's estimate); `x-mock-delay-ms: N` answers after N ms; `x-mock-status: 429`
(or 500, 503, 529) answers with that error as the provider does (not billed);
`x-mock-fail-after: N` ends a stream with the provider's error event after N content events
(billed for what it generated); `x-mock-force-encoding: CODING` compresses with CODING
whatever the request accepted, as a misbehaving CDN does; `x-mock-stall-ms: N` pauses N ms
after the response headers (a stream: after its first event), so a client can hang up before
the usage passes.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import time
import uuid
import zlib
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from aiohttp import web

DEFAULT_OUTPUT = 12
REASONING_PER_OUTPUT = 3  # reasoning tokens per visible output token, when reasoning is asked


# -- content codings ---------------------------------------------------------------------------

def _encoder(coding: str) -> tuple[Callable[[bytes], bytes], Callable[[], bytes]]:
    """(compress a chunk and flush it, finish) for one response in `coding`."""
    if coding in ("gzip", "deflate"):
        z = zlib.compressobj(wbits=31 if coding == "gzip" else 15)
        return (lambda b: z.compress(b) + z.flush(zlib.Z_SYNC_FLUSH)), z.flush
    if coding == "br":
        import brotli

        br = brotli.Compressor()
        return (lambda b: br.process(b) + br.flush()), br.finish
    if coding == "zstd":
        import zstandard

        zs = zstandard.ZstdCompressor().compressobj()
        return (lambda b: zs.compress(b) + zs.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)), zs.flush
    return (lambda b: b), (lambda: b"")


def _available() -> list[str]:
    out = ["gzip", "deflate"]
    for coding, module in (("br", "brotli"), ("zstd", "zstandard")):
        try:
            __import__(module)
            out.append(coding)
        except ImportError:
            pass
    return out


AVAILABLE = _available()


def negotiate(accept_encoding: str | None) -> str:
    """The coding a CDN would pick: the highest q-value this mock can produce; gzip first among
    equals; identity when nothing else is accepted (or nothing was said)."""
    best, best_q = "identity", 0.0
    for part in (accept_encoding or "").split(","):
        name, _, params = part.strip().partition(";")
        q = 1.0
        for p in params.split(";"):
            k, _, v = p.strip().partition("=")
            if k == "q":
                try:
                    q = float(v)
                except ValueError:
                    q = 0.0
        name = name.strip().lower()
        candidates = AVAILABLE if name == "*" else [name]
        for c in candidates:
            if c in AVAILABLE and (q > best_q or (q == best_q and c == "gzip")):
                best, best_q = c, q
    return best


# -- the bill ----------------------------------------------------------------------------------

@dataclass
class Billed:
    """What the provider charges one request for, in its own terms."""

    path: str
    model: str
    input_tokens: int  # OpenAI: every prompt token, cached included; Anthropic: uncached only
    output_tokens: int  # OpenAI: reasoning included
    cached_input_tokens: int = 0
    cache_creation_tokens: int = 0  # Anthropic cache writes, 5-minute and 1-hour
    cache_creation_1h_tokens: int = 0
    reasoning_tokens: int = 0


class ProviderError(Exception):
    def __init__(self, status: int, kind: str, message: str, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.kind, self.code, self.headers = status, kind, code, headers or {}


def _strict_json(raw: bytes) -> Any:
    def no_constants(name: str) -> Any:
        raise ValueError(f"{name} is not valid JSON")
    return json.loads(raw, parse_constant=no_constants)


def _find_cache_control(doc: Any) -> list[dict[str, Any]]:
    if isinstance(doc, dict):
        found = [doc["cache_control"]] if isinstance(doc.get("cache_control"), dict) else []
        return found + [c for v in doc.values() for c in _find_cache_control(v)]
    if isinstance(doc, list):
        return [c for v in doc for c in _find_cache_control(v)]
    return []


KEEP = 10_000  # requests held for GET /_mock/seen and /_mock/bill


class MockProvider:
    def __init__(self, expected_key: str | None = None, keep: int = KEEP) -> None:
        self.expected_key = expected_key
        self.keep = keep
        self.seen: deque[dict[str, Any]] = deque(maxlen=keep)
        self.bill: dict[str, Billed] = {}  # in the order billed: the oldest goes first

    # -- request -----------------------------------------------------------------------------

    def _record(self, request: web.Request, body: dict[str, Any]) -> dict[str, Any]:
        self.seen.append({
            "path": request.path,
            "authorization": request.headers.get("authorization"),
            "x-api-key": request.headers.get("x-api-key"),
            "headers": {k.lower(): v for k, v in request.headers.items()},
            "model": body.get("model"),
            "stream": body.get("stream") is True,
            "request_id": request.headers.get("x-request-id"),
            "body": body,
            "usage": None,  # what this mock reported, filled in by the handler
        })
        return self.seen[-1]

    def _credential_ok(self, request: web.Request, anthropic: bool) -> bool:
        if self.expected_key is None:
            return True
        if anthropic:
            return request.headers.get("x-api-key") == self.expected_key
        return request.headers.get("authorization") == f"Bearer {self.expected_key}"

    async def _parse(self, request: web.Request, anthropic: bool
                     ) -> tuple[bytes, dict[str, Any], dict[str, Any]]:
        raw = await request.read()
        try:
            body = _strict_json(raw)
        except ValueError as e:
            self._record(request, {})
            raise ProviderError(400, "invalid_request_error",
                                f"We could not parse the JSON body of your request: {e}") from e
        if not isinstance(body, dict):
            self._record(request, {})
            raise ProviderError(400, "invalid_request_error", "the body must be a JSON object")
        rec = self._record(request, body)
        if not self._credential_ok(request, anthropic):
            raise ProviderError(401, "authentication_error" if anthropic
                                else "invalid_request_error", "Incorrect API key provided",
                                "invalid_api_key")
        forced = request.headers.get("x-mock-status", "")
        if forced in ("429", "500", "503", "529"):
            raise _forced_error(int(forced), anthropic)
        if not anthropic and "stream_options" in body:
            opts = body["stream_options"]
            if body.get("stream") is not True and opts is not None:
                raise ProviderError(400, "invalid_request_error", "The 'stream_options' "
                                    "parameter is only allowed when 'stream' is enabled.")
            if not (opts is None or isinstance(opts, dict)) or (
                    isinstance(opts, dict) and not isinstance(opts.get("include_usage", False),
                                                              bool)):
                raise ProviderError(400, "invalid_request_error",
                                    "Invalid type for 'stream_options'")
        delay = request.headers.get("x-mock-delay-ms", "")
        if delay.isdigit():
            await asyncio.sleep(min(int(delay), 30_000) / 1000)
        return raw, body, rec

    def _count(self, request: web.Request, raw: bytes, body: dict[str, Any]) -> Billed:
        """The tokens this request costs, in OpenAI's terms (input includes cached)."""
        forced = request.headers.get("x-mock-input-tokens", "")
        # a test hook: report more prompt tokens than the bytes suggest, as CJK text does
        inp = int(forced) if forced.isdigit() else max(1, len(raw) // 4)
        cap = body.get("max_tokens") or body.get("max_completion_tokens") or body.get(
            "max_output_tokens") or DEFAULT_OUTPUT
        out = max(1, min(int(cap), DEFAULT_OUTPUT))
        reasoning = out * REASONING_PER_OUTPUT if (
            body.get("reasoning_effort") or body.get("reasoning")) else 0
        return Billed(request.path, str(body.get("model", "")), inp, out + reasoning,
                      cached_input_tokens=(inp // 1024) * 1024, reasoning_tokens=reasoning)

    def _bill(self, request: web.Request, rec: dict[str, Any], billed: Billed) -> None:
        rec["usage"] = {"input": billed.input_tokens, "output": billed.output_tokens,
                        "cached": billed.cached_input_tokens}
        self.bill[request.headers.get("x-request-id") or uuid.uuid4().hex] = billed
        if len(self.bill) > self.keep:
            del self.bill[next(iter(self.bill))]

    # -- answers -----------------------------------------------------------------------------

    @staticmethod
    def _coding(request: web.Request) -> str:
        return request.headers.get("x-mock-force-encoding") or negotiate(
            request.headers.get("accept-encoding"))

    async def _json(self, request: web.Request, doc: Any, status: int = 200,
                    headers: dict[str, str] | None = None) -> web.StreamResponse:
        coding = self._coding(request)
        compress, finish = _encoder(coding)
        data = compress(json.dumps(doc).encode()) + finish()
        out = {"content-type": "application/json", **_own_request_id(request), **(headers or {})}
        if coding != "identity":
            out["content-encoding"] = coding
        stall = _stall(request)
        if not stall:
            return web.Response(body=data, status=status, headers=out)
        resp = web.StreamResponse(status=status, headers=out)
        resp.content_length = len(data)
        await resp.prepare(request)
        try:
            await asyncio.sleep(stall)
            await resp.write(data)
            await resp.write_eof()
        except ConnectionError:
            pass  # the client (the gateway) hung up; the bill stands
        return resp

    async def _sse(self, request: web.Request, events: list[tuple[str | None, Any]],
                   fail_after: int | None = None, failure: tuple[str | None, Any] | None = None
                   ) -> web.StreamResponse:
        coding = self._coding(request)
        compress, finish = _encoder(coding)
        headers = {"content-type": "text/event-stream", "cache-control": "no-cache",
                   **_own_request_id(request)}
        if coding != "identity":
            headers["content-encoding"] = coding
        resp = web.StreamResponse(headers=headers)
        await resp.prepare(request)
        try:
            for n, (event, data) in enumerate(events):
                if fail_after is not None and n == fail_after and failure is not None:
                    event, data = failure
                payload = data if isinstance(data, str) else json.dumps(data)
                prefix = f"event: {event}\n" if event else ""
                await resp.write(compress(f"{prefix}data: {payload}\n\n".encode()))
                if fail_after is not None and n == fail_after:
                    break
                if n == 0 and _stall(request):
                    await asyncio.sleep(_stall(request))
            await resp.write(finish())
            await resp.write_eof()
        except ConnectionError:
            pass  # the client (the gateway) hung up; the bill stands
        return resp

    # -- endpoints ---------------------------------------------------------------------------

    async def chat(self, request: web.Request) -> web.StreamResponse:
        raw, body, rec = await self._parse(request, anthropic=False)
        b = self._count(request, raw, body)
        fail_after = _fail_after(request)
        stream = body.get("stream") is True
        with_usage = stream and bool((body.get("stream_options") or {}).get("include_usage"))
        visible = b.output_tokens - b.reasoning_tokens
        if fail_after is not None and stream:
            b.output_tokens = min(visible, fail_after) + b.reasoning_tokens
        self._bill(request, rec, b)
        cid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        usage = {"prompt_tokens": b.input_tokens, "completion_tokens": b.output_tokens,
                 "total_tokens": b.input_tokens + b.output_tokens,
                 "prompt_tokens_details": {"cached_tokens": b.cached_input_tokens,
                                           "audio_tokens": 0},
                 "completion_tokens_details": {"reasoning_tokens": b.reasoning_tokens,
                                               "audio_tokens": 0}}
        words = ["tok"] * visible
        if not stream:
            return await self._json(request, {
                "id": cid, "object": "chat.completion", "created": created, "model": b.model,
                "choices": [{"index": 0, "message": {"role": "assistant",
                                                     "content": " ".join(words)},
                             "finish_reason": "stop", "logprobs": None}],
                "usage": usage})
        base = {"id": cid, "object": "chat.completion.chunk", "created": created,
                "model": b.model}
        events: list[tuple[str | None, Any]] = []
        for i, w in enumerate(words):
            delta = {"role": "assistant", "content": w} if i == 0 else {"content": " " + w}
            events.append((None, {**base, "choices": [{"index": 0, "delta": delta,
                                                       "finish_reason": None}],
                                  **({"usage": None} if with_usage else {})}))
        events.append((None, {**base, "choices": [{"index": 0, "delta": {},
                                                   "finish_reason": "stop"}],
                              **({"usage": None} if with_usage else {})}))
        if with_usage:
            events.append((None, {**base, "choices": [], "usage": usage}))
        events.append((None, "[DONE]"))
        return await self._sse(request, events, fail_after, (None, {"error": {
            "message": "The server had an error while processing your request.",
            "type": "server_error", "param": None, "code": None}}))

    async def completions(self, request: web.Request) -> web.StreamResponse:
        raw, body, rec = await self._parse(request, anthropic=False)
        b = self._count(request, raw, body)
        b.cached_input_tokens = 0
        self._bill(request, rec, b)
        usage = {"prompt_tokens": b.input_tokens, "completion_tokens": b.output_tokens,
                 "total_tokens": b.input_tokens + b.output_tokens}
        doc = {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion",
               "created": int(time.time()), "model": b.model,
               "choices": [{"index": 0, "text": " ".join(["tok"] * b.output_tokens),
                            "finish_reason": "stop", "logprobs": None}]}
        if body.get("stream") is not True:
            return await self._json(request, {**doc, "usage": usage})
        events: list[tuple[str | None, Any]] = [(None, doc)]
        if (body.get("stream_options") or {}).get("include_usage"):
            events.append((None, {**doc, "choices": [], "usage": usage}))
        return await self._sse(request, [*events, (None, "[DONE]")])

    async def embeddings(self, request: web.Request) -> web.StreamResponse:
        raw, body, rec = await self._parse(request, anthropic=False)
        b = self._count(request, raw, body)
        b.output_tokens = b.cached_input_tokens = b.reasoning_tokens = 0
        self._bill(request, rec, b)
        items = body.get("input")
        n = len(items) if isinstance(items, list) else 1
        return await self._json(request, {
            "object": "list", "model": b.model,
            "data": [{"object": "embedding", "index": i, "embedding": [0.0, 0.5, 1.0]}
                     for i in range(n)],
            "usage": {"prompt_tokens": b.input_tokens, "total_tokens": b.input_tokens}})

    async def responses(self, request: web.Request) -> web.StreamResponse:
        raw, body, rec = await self._parse(request, anthropic=False)
        b = self._count(request, raw, body)
        self._bill(request, rec, b)
        rid = f"resp_{uuid.uuid4().hex[:24]}"
        text = " ".join(["tok"] * (b.output_tokens - b.reasoning_tokens))
        response = {
            "id": rid, "object": "response", "created_at": int(time.time()), "status":
            "completed", "model": b.model, "tools": body.get("tools", []),
            "metadata": body.get("metadata") or {},
            "output": [{"type": "message", "id": f"msg_{rid[5:]}", "status": "completed",
                        "role": "assistant", "content": [{"type": "output_text", "text": text,
                                                          "annotations": []}]}],
            "usage": {"input_tokens": b.input_tokens, "output_tokens": b.output_tokens,
                      "total_tokens": b.input_tokens + b.output_tokens,
                      "input_tokens_details": {"cached_tokens": b.cached_input_tokens},
                      "output_tokens_details": {"reasoning_tokens": b.reasoning_tokens}}}
        if body.get("stream") is not True:
            return await self._json(request, response)
        created = {**response, "status": "in_progress", "output": [], "usage": None}
        return await self._sse(request, [
            ("response.created", {"type": "response.created", "response": created,
                                  "sequence_number": 0}),
            ("response.output_text.delta", {"type": "response.output_text.delta",
                                            "item_id": f"msg_{rid[5:]}", "output_index": 0,
                                            "content_index": 0, "delta": text,
                                            "sequence_number": 1}),
            ("response.completed", {"type": "response.completed", "response": response,
                                    "sequence_number": 2}),
        ])

    async def messages(self, request: web.Request) -> web.StreamResponse:
        raw, body, rec = await self._parse(request, anthropic=True)
        b = self._count(request, raw, body)
        b.output_tokens -= b.reasoning_tokens  # Anthropic's thinking is not modelled
        cacheable, b.reasoning_tokens = b.cached_input_tokens, 0
        marks = _find_cache_control(body)
        if marks:  # the request writes its cacheable prefix instead of reading it
            b.cached_input_tokens, b.cache_creation_tokens = 0, cacheable
            if any(m.get("ttl") == "1h" for m in marks):
                b.cache_creation_1h_tokens = cacheable
        b.input_tokens -= cacheable  # Anthropic counts uncached input apart
        fail_after = _fail_after(request)
        stream = body.get("stream") is True
        words = ["tok"] * b.output_tokens
        if fail_after is not None and stream:
            b.output_tokens = min(b.output_tokens, fail_after)
        self._bill(request, rec, b)
        usage = {"input_tokens": b.input_tokens, "output_tokens": b.output_tokens,
                 "cache_read_input_tokens": b.cached_input_tokens,
                 "cache_creation_input_tokens": b.cache_creation_tokens,
                 "cache_creation": {
                     "ephemeral_5m_input_tokens":
                         b.cache_creation_tokens - b.cache_creation_1h_tokens,
                     "ephemeral_1h_input_tokens": b.cache_creation_1h_tokens}}
        mid = f"msg_{uuid.uuid4().hex[:24]}"
        if not stream:
            return await self._json(request, {
                "id": mid, "type": "message", "role": "assistant", "model": b.model,
                "content": [{"type": "text", "text": " ".join(words)}],
                "stop_reason": "end_turn", "stop_sequence": None, "usage": usage})
        opening: dict[str, Any] = {
            "id": mid, "type": "message", "role": "assistant", "model": b.model, "content": [],
            "stop_reason": None, "stop_sequence": None, "usage": {**usage, "output_tokens": 1}}
        events: list[tuple[str | None, Any]] = [
            ("message_start", {"type": "message_start", "message": opening}),
            ("content_block_start", {"type": "content_block_start", "index": 0,
                                     "content_block": {"type": "text", "text": ""}}),
        ]
        for i, w in enumerate(words):
            events.append(("content_block_delta", {
                "type": "content_block_delta", "index": 0,
                "delta": {"type": "text_delta", "text": w if i == 0 else " " + w}}))
        events += [
            ("content_block_stop", {"type": "content_block_stop", "index": 0}),
            ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn",
                                                                  "stop_sequence": None},
                               "usage": {"output_tokens": b.output_tokens}}),
            ("message_stop", {"type": "message_stop"}),
        ]
        return await self._sse(
            request, events, None if fail_after is None else fail_after + 2,
            ("error", {"type": "error", "error": {"type": "overloaded_error",
                                                  "message": "Overloaded"}}))

    # -- bookkeeping endpoints -----------------------------------------------------------------

    async def seen_handler(self, request: web.Request) -> web.StreamResponse:
        if request.method == "DELETE":
            self.seen.clear()
            self.bill.clear()
        rid = request.query.get("request_id")
        return web.json_response([s for s in self.seen if s["request_id"] == rid]
                                 if rid else list(self.seen))

    async def bill_handler(self, request: web.Request) -> web.StreamResponse:
        return web.json_response({rid: asdict(b) for rid, b in self.bill.items()})

    def app(self) -> web.Application:
        @web.middleware
        async def provider_errors(request: web.Request, handler: Any) -> web.StreamResponse:
            try:
                result: web.StreamResponse = await handler(request)
                return result
            except ProviderError as e:
                anthropic = request.path.startswith("/v1/messages")
                doc: dict[str, Any] = (
                    {"type": "error", "error": {"type": e.kind, "message": str(e)}}
                    if anthropic else {"error": {"message": str(e), "type": e.kind,
                                                 "param": None, "code": e.code}})
                return await self._json(request, doc, e.status, e.headers)

        app = web.Application(client_max_size=64 * 1024 * 1024, middlewares=[provider_errors])
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/embeddings", self.embeddings)
        app.router.add_post("/v1/responses", self.responses)
        app.router.add_post("/v1/messages", self.messages)
        app.router.add_route("GET", "/_mock/seen", self.seen_handler)
        app.router.add_route("DELETE", "/_mock/seen", self.seen_handler)
        app.router.add_route("GET", "/_mock/bill", self.bill_handler)
        return app


def _own_request_id(request: web.Request) -> dict[str, str]:
    rid = f"req_{uuid.uuid4().hex[:24]}"
    return {"request-id": rid} if request.path.startswith("/v1/messages") else {
        "x-request-id": rid}


def _stall(request: web.Request) -> float:
    v = request.headers.get("x-mock-stall-ms", "")
    return min(int(v), 30_000) / 1000 if v.isdigit() else 0.0


def _fail_after(request: web.Request) -> int | None:
    v = request.headers.get("x-mock-fail-after", "")
    return int(v) if v.isdigit() else None


def _forced_error(status: int, anthropic: bool) -> ProviderError:
    if status == 429:
        headers = {"retry-after": "2"}
        if anthropic:
            headers["anthropic-ratelimit-requests-remaining"] = "0"
            return ProviderError(429, "rate_limit_error", "Number of request tokens has "
                                 "exceeded your per-minute rate limit", headers=headers)
        headers.update({"x-ratelimit-limit-requests": "500",
                        "x-ratelimit-remaining-requests": "0",
                        "x-ratelimit-reset-requests": "2s"})
        return ProviderError(429, "requests", "Rate limit reached for requests",
                             "rate_limit_exceeded", headers)
    if anthropic:
        return ProviderError(status, "overloaded_error" if status == 529 else "api_error",
                             "Overloaded" if status == 529 else "Internal server error")
    return ProviderError(status, "server_error", "The server had an error while processing "
                         "your request.")


async def start(host: str, port: int, expected_key: str | None = None, keep: int = KEEP
                ) -> web.AppRunner:
    runner = web.AppRunner(MockProvider(expected_key, keep).app(), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner


def run(args: argparse.Namespace) -> None:
    async def run() -> None:
        await start(args.host, args.port, args.expected_key, args.keep)
        # what the start built (modules, aiohttp's app) lives as long as the process: out of
        # every garbage collection from now on. A full collection of this process walked it
        # and the requests held, 27 ms during which no answer left: that was the slowest
        # request of a benchmark, whatever gateway stood in front
        gc.collect()
        gc.freeze()
        await asyncio.Event().wait()

    asyncio.run(run())


def main() -> None:
    from tollway.cli import mock_provider_arguments  # the CLI must not load aiohttp to start

    ap = argparse.ArgumentParser(description="Mock OpenAI/Anthropic provider")
    mock_provider_arguments(ap)
    run(ap.parse_args())


if __name__ == "__main__":
    main()
