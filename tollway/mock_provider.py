"""A mock LLM provider that speaks the real wire formats (JSON and SSE, with `usage`).

It stands in for OpenAI and Anthropic in tests, benchmarks and `tollway up`, and records the
credential each request carried, so tests can prove that the client's key never reaches the
provider. Token counts are deterministic: input ≈ request bytes / 4, output = min(max_tokens,
12), and a prompt of 1,024 tokens or more reports its first 1,024-token multiple as cached.
A chat request with `x-mock-input-tokens: N` reports N input tokens instead (tests use it to
make the real usage differ from Tollway's estimate), and one with `x-mock-delay-ms: N` answers
after N ms (tests use it to keep a request in flight). `GET /_mock/seen` lists what it received.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid
from typing import Any

from aiohttp import web

DEFAULT_OUTPUT = 12


class MockProvider:
    def __init__(self, expected_key: str | None = None) -> None:
        self.expected_key = expected_key
        self.seen: list[dict[str, Any]] = []

    # -- bookkeeping ---------------------------------------------------------------------------

    def _record(self, request: web.Request, body: dict[str, Any]) -> dict[str, Any]:
        self.seen.append({
            "path": request.path,
            "authorization": request.headers.get("authorization"),
            "x-api-key": request.headers.get("x-api-key"),
            "headers": {k.lower(): v for k, v in request.headers.items()},
            "model": body.get("model"),
            "stream": bool(body.get("stream")),
            "request_id": request.headers.get("x-request-id"),
            "usage": None,  # what this mock reported, filled in by the handler
        })
        return self.seen[-1]

    def _credential_ok(self, request: web.Request, anthropic: bool) -> bool:
        if self.expected_key is None:
            return True
        if anthropic:
            return request.headers.get("x-api-key") == self.expected_key
        return request.headers.get("authorization") == f"Bearer {self.expected_key}"

    @staticmethod
    def _usage(raw: bytes, body: dict[str, Any],
               request: web.Request | None = None) -> tuple[int, int, int]:
        forced = request.headers.get("x-mock-input-tokens", "") if request else ""
        # a test hook: report more prompt tokens than the bytes suggest, as CJK text does
        inp = int(forced) if forced.isdigit() else max(1, len(raw) // 4)
        cap = body.get("max_tokens") or body.get("max_completion_tokens") or body.get(
            "max_output_tokens") or DEFAULT_OUTPUT
        out = max(1, min(int(cap), DEFAULT_OUTPUT))
        cached = (inp // 1024) * 1024
        return inp, out, cached

    # -- handlers ------------------------------------------------------------------------------

    async def _parse(self, request: web.Request,
                     anthropic: bool) -> tuple[bytes, dict[str, Any], dict[str, Any]]:
        raw = await request.read()
        try:
            body = json.loads(raw) if raw else {}
        except ValueError:
            body = {}
        rec = self._record(request, body if isinstance(body, dict) else {})
        if not self._credential_ok(request, anthropic):
            err = ({"type": "error", "error": {"type": "authentication_error",
                                               "message": "invalid x-api-key"}} if anthropic
                   else {"error": {"message": "Incorrect API key provided", "type":
                                   "invalid_request_error", "param": None,
                                   "code": "invalid_api_key"}})
            raise web.HTTPUnauthorized(text=json.dumps(err), content_type="application/json")
        return raw, body if isinstance(body, dict) else {}, rec

    @staticmethod
    async def _sse(request: web.Request,
                   events: list[tuple[str | None, Any]]) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"content-type": "text/event-stream",
                                           "cache-control": "no-cache"})
        await resp.prepare(request)
        for event, data in events:
            payload = data if isinstance(data, str) else json.dumps(data)
            prefix = f"event: {event}\n" if event else ""
            await resp.write(f"{prefix}data: {payload}\n\n".encode())
        await resp.write_eof()
        return resp

    async def chat(self, request: web.Request) -> web.StreamResponse:
        raw, body, rec = await self._parse(request, anthropic=False)
        delay = request.headers.get("x-mock-delay-ms", "")
        if delay.isdigit():
            await asyncio.sleep(min(int(delay), 30_000) / 1000)
        inp, out, cached = self._usage(raw, body, request)
        rec["usage"] = {"input": inp, "output": out, "cached": cached}
        cid, created, model = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time()), body.get(
            "model", "")
        usage = {"prompt_tokens": inp, "completion_tokens": out, "total_tokens": inp + out,
                 "prompt_tokens_details": {"cached_tokens": cached}}
        words = ["tok"] * out
        if not body.get("stream"):
            return web.json_response({
                "id": cid, "object": "chat.completion", "created": created, "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant",
                                                     "content": " ".join(words)},
                             "finish_reason": "stop", "logprobs": None}],
                "usage": usage})
        base = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model}
        with_usage = bool((body.get("stream_options") or {}).get("include_usage"))
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
        return await self._sse(request, events)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        raw, body, rec = await self._parse(request, anthropic=False)
        inp, out, _ = self._usage(raw, body)
        rec["usage"] = {"input": inp, "output": out, "cached": 0}
        return web.json_response({
            "id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion",
            "created": int(time.time()), "model": body.get("model", ""),
            "choices": [{"index": 0, "text": " ".join(["tok"] * out), "finish_reason": "stop",
                         "logprobs": None}],
            "usage": {"prompt_tokens": inp, "completion_tokens": out,
                      "total_tokens": inp + out}})

    async def embeddings(self, request: web.Request) -> web.StreamResponse:
        raw, body, rec = await self._parse(request, anthropic=False)
        inp, _, _ = self._usage(raw, body)
        rec["usage"] = {"input": inp, "output": 0, "cached": 0}
        items = body.get("input")
        n = len(items) if isinstance(items, list) else 1
        return web.json_response({
            "object": "list", "model": body.get("model", ""),
            "data": [{"object": "embedding", "index": i, "embedding": [0.0, 0.5, 1.0]}
                     for i in range(n)],
            "usage": {"prompt_tokens": inp, "total_tokens": inp}})

    async def responses(self, request: web.Request) -> web.StreamResponse:
        raw, body, rec = await self._parse(request, anthropic=False)
        inp, out, cached = self._usage(raw, body)
        rec["usage"] = {"input": inp, "output": out, "cached": cached}
        rid = f"resp_{uuid.uuid4().hex[:24]}"
        text = " ".join(["tok"] * out)
        response = {
            "id": rid, "object": "response", "created_at": int(time.time()), "status":
            "completed", "model": body.get("model", ""),
            "output": [{"type": "message", "id": f"msg_{rid[5:]}", "status": "completed",
                        "role": "assistant", "content": [{"type": "output_text", "text": text,
                                                          "annotations": []}]}],
            "usage": {"input_tokens": inp, "output_tokens": out, "total_tokens": inp + out,
                      "input_tokens_details": {"cached_tokens": cached},
                      "output_tokens_details": {"reasoning_tokens": 0}}}
        if not body.get("stream"):
            return web.json_response(response)
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
        inp, out, cached = self._usage(raw, body)
        rec["usage"] = {"input": inp - cached, "output": out, "cached": cached}
        mid, model = f"msg_{uuid.uuid4().hex[:24]}", body.get("model", "")
        usage = {"input_tokens": inp - cached, "output_tokens": out,
                 "cache_read_input_tokens": cached, "cache_creation_input_tokens": 0}
        words = ["tok"] * out
        if not body.get("stream"):
            return web.json_response({
                "id": mid, "type": "message", "role": "assistant", "model": model,
                "content": [{"type": "text", "text": " ".join(words)}],
                "stop_reason": "end_turn", "stop_sequence": None, "usage": usage})
        start = {"id": mid, "type": "message", "role": "assistant", "model": model,
                 "content": [], "stop_reason": None, "stop_sequence": None,
                 "usage": {**usage, "output_tokens": 1}}
        events: list[tuple[str | None, Any]] = [
            ("message_start", {"type": "message_start", "message": start}),
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
                               "usage": {"output_tokens": out}}),
            ("message_stop", {"type": "message_stop"}),
        ]
        return await self._sse(request, events)

    async def seen_handler(self, request: web.Request) -> web.StreamResponse:
        if request.method == "DELETE":
            self.seen.clear()
        return web.json_response(self.seen)

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/embeddings", self.embeddings)
        app.router.add_post("/v1/responses", self.responses)
        app.router.add_post("/v1/messages", self.messages)
        app.router.add_route("GET", "/_mock/seen", self.seen_handler)
        app.router.add_route("DELETE", "/_mock/seen", self.seen_handler)
        return app


async def start(host: str, port: int, expected_key: str | None = None) -> web.AppRunner:
    runner = web.AppRunner(MockProvider(expected_key).app(), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner


def main() -> None:
    ap = argparse.ArgumentParser(description="Mock OpenAI/Anthropic provider")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8081)
    ap.add_argument("--expected-key", default=None,
                    help="refuse requests that do not carry this provider key")
    args = ap.parse_args()

    async def run() -> None:
        await start(args.host, args.port, args.expected_key)
        await asyncio.Event().wait()

    asyncio.run(run())


if __name__ == "__main__":
    main()
