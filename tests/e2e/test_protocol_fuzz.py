"""Every answer the gateway itself gives is the dialect's JSON error with x-tollway-error:
2,000+ malformed requests (fixed seed) over raw sockets, from broken HTTP framing to broken
JSON, keys and headers; none gets a non-JSON error body, and no service logs a traceback.

What Envoy allows no answer for is counted, not hidden: a CONNECT is closed without a reply.
"""

from __future__ import annotations

import contextlib
import json
import random
import re
import socket
from collections import Counter
from collections.abc import Iterator

import pytest

from .harness import Gateway, run_gateway

pytestmark = pytest.mark.e2e

SEED, COUNT = 20261123, 2100


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    with run_gateway(tmp_path_factory.mktemp("fuzz")) as g:
        g.issue("k-main")
        yield g


def corpus(rng: random.Random, key: str) -> Iterator[bytes]:
    paths = ["/v1/chat/completions", "/v1/messages", "/v1/embeddings", "/v1/responses", "/x"]
    good = json.dumps({"model": "gpt-5.4-mini", "messages": [{"role": "user", "content": "hi"}]})
    bodies = [good, "", "{", "[]", "null", '{"model": 5}', '{"model":"gpt-5.4-mini",}',
              '{"model":"gpt-5.4-mini","messages":[NaN]}', "{" * 600 + "}" * 600,
              '{"model":"gpt-5.4-mini","model":"claude-haiku"}', "\xff\xfe{}",
              '{"model":"gpt-5.4-mini","stream":true,"stream_options":[1]}',
              '{"model":"gpt-5.4-mini","stream":true,"stream_options":"x"}',
              '{"model":"gpt-5.4-mini"} trailing', '{"model":"\\ud800"}', "a" * 70_000]
    auths = [f"Bearer {key}", "Bearer", "Bearer k-main.wrong", "Basic Zm9vOmJhcg==",
             "Bearer " + "k" * 5000, "Bearer k-main", "Bearer .", f"bearer {key}", ""]
    for _n in range(COUNT):
        method, path, version = "POST", rng.choice(paths), "HTTP/1.1"
        headers = [("host", "gw"), ("content-type", "application/json")]
        auth = rng.choice(auths)
        if auth:
            headers.append(("authorization", auth))
        body = rng.choice(bodies).encode("utf-8", "surrogateescape")
        framing = "cl"
        for _ in range(rng.randint(1, 3)):
            kind = rng.randrange(12)
            if kind == 0:
                method = rng.choice(["GET", "PUT", "DELETE", "F@O", "post", "PATCH", "", "X" * 40])
            elif kind == 1:
                path = rng.choice(["/v1/chat%00/completions", "/v1%2Fchat/completions",
                                   "/v1/chat completions", "/v1/../v1/chat/completions",
                                   "http://evil/v1/chat/completions", "", "*", "/" * 300,
                                   "/v1/chat/completions?" + "q=1&" * 500, "/\u00e9".encode()
                                   .decode("latin-1"), "/v1/chat/completions#frag"])
            elif kind == 2:
                version = rng.choice(["HTTP/1.0", "HTTP/9.9", "HTTP/1", "HTTPS/1.1", "",
                                      "http/1.1"])
            elif kind == 3:
                headers.append((rng.choice(["x_under", "x a", "x\x00a", "\u00e9t\u00e9", "x:y",
                                            ""]), "v"))
            elif kind == 4:
                headers.append(("x-v", rng.choice(["a\x00b", "a\x01b", "a\x7fb", "\u00e9", " "])))
            elif kind == 5:
                headers += [(f"x-h{i}", "v") for i in range(rng.choice([101, 150, 300]))]
            elif kind == 6:
                headers.append(("x-big", "a" * rng.choice([70_000, 100_000])))
            elif kind == 7:
                framing = rng.choice(["cl-bad", "cl-neg", "cl-dup", "te", "te-bad", "cl+te"])
            elif kind == 8:
                headers.append(("content-encoding", rng.choice(["gzip", "br", "bogus"])))
            elif kind == 9:
                headers.append(("x-api-key", rng.choice([key, "nope", "", "a" * 3000])))
            elif kind == 10:
                headers = [h for h in headers if h[0] != "host"]
            else:
                headers.append(("x-tollway-org", "forged"))
        if framing == "cl":
            headers.append(("content-length", str(len(body))))
        elif framing == "cl-bad":
            headers.append(("content-length", "abc"))
        elif framing == "cl-neg":
            headers.append(("content-length", "-1"))
        elif framing == "cl-dup":
            headers += [("content-length", str(len(body))), ("content-length", "1")]
        elif framing in ("te", "cl+te"):
            if framing == "cl+te":
                headers.append(("content-length", str(len(body))))
            headers.append(("transfer-encoding", "chunked"))
            body = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body) if body else b"0\r\n\r\n"
        else:
            headers.append(("transfer-encoding", "chunked"))
            body = b"zz\r\n" + body
        head = f"{method} {path} {version}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers)
        yield head.encode("utf-8", "surrogateescape") + b"\r\n" + body


def exchange(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=3) as s:
        with contextlib.suppress(OSError):  # Envoy answered and closed before taking it all
            s.sendall(request)
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
                head, sep, body = out.partition(b"\r\n\r\n")
                m = re.search(rb"\r\ncontent-length: *(\d+)", head, re.I)
                if sep and m and len(body) >= int(m.group(1)):
                    break
                if sep and not m and b"transfer-encoding: chunked" in head.lower() \
                        and body.endswith(b"0\r\n\r\n"):
                    break
        except OSError:
            pass
        return out


def test_every_refusal_is_a_json_error_with_its_code(gw: Gateway) -> None:
    port = int(gw.url.rsplit(":", 1)[1])
    outcome: Counter[str] = Counter()
    bad: list[tuple[bytes, bytes]] = []
    for request in corpus(random.Random(SEED), gw.issued["k-main"]):
        answer = exchange(port, request)
        if not answer:
            outcome["closed without an answer"] += 1
            continue
        head, _, body = answer.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        outcome[str(status)] += 1
        if status < 400:
            continue
        headers = {ln.split(b":", 1)[0].strip().lower(): ln.split(b":", 1)[1].strip()
                   for ln in head.split(b"\r\n")[1:] if b":" in ln}
        if b"chunked" in headers.get(b"transfer-encoding", b""):
            body = b"".join(body.split(b"\r\n")[1::2])
        try:
            doc = json.loads(body)
            ok = isinstance(doc, dict) and "error" in doc and b"x-tollway-error" in headers \
                and headers.get(b"content-type") == b"application/json"
        except ValueError:
            ok = False
        if not ok:
            bad.append((request[:200], answer[:300]))
    assert sum(outcome.values()) == COUNT
    assert not bad, f"{len(bad)} non-JSON or unmarked refusals, e.g. {bad[:3]}"
    assert outcome["closed without an answer"] <= COUNT // 50, outcome
    log = (gw.manifest_path.parent / "logs" / "services.log").read_text()
    assert "Traceback" not in log
    print(f"\n{COUNT} malformed requests: {dict(sorted(outcome.items()))}")
