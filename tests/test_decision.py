"""The order of extauthz's checks, as a table: what a request with several faults is refused
for. The secret comes before anything about the key (an unauthenticated caller learns nothing
about it), the key's state before the request's content, the route's catalogue before the key's
allowlist, the allowlist before role rules."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from extauthz.decision import Allow, Deny, RequestFacts, compile_runtime, decide
from tests.e2e.harness import offline_manifest
from tollway.keys import KeyRecord, hash_secret
from tollway.keys.mirror import KeyMirror
from tollway.manifest import KeyStatus, parse

PEPPER = "p" * 32
NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)


def runtime_and_mirror() -> tuple[Any, KeyMirror]:
    os.environ.setdefault("MOCK_PROVIDER_KEY", "x")
    os.environ["TOLLWAY_TEST_PEPPER"] = PEPPER
    doc = offline_manifest()
    doc["storage"]["pepper"] = "env:TOLLWAY_TEST_PEPPER"
    project = doc["organizations"][0]["projects"][0]
    project["model_rules"] = [{"models": ["gpt-5.4"], "roles_allowed": ["admin"]},
                              {"models": ["gpt-5.4-mini", "claude-haiku"]}]
    rt = compile_runtime(parse(doc))
    mirror = KeyMirror(None)  # type: ignore[arg-type]  # filled by hand
    mirror._fresh_at = 1e18  # as if just refreshed
    states = {"k-main": (KeyStatus.ACTIVE, None), "k-revoke": (KeyStatus.REVOKED, None),
              "k-suspend": (KeyStatus.SUSPENDED, None),
              "k-expire": (KeyStatus.ACTIVE, NOW - timedelta(seconds=1)),
              "k-mini": (KeyStatus.ACTIVE, None)}
    for key_id, (status, expires) in states.items():
        mirror._put(KeyRecord(key_id, hash_secret(PEPPER.encode(), "s"), status,
                              expires, None, None, NOW, NOW, 1))
    return rt, mirror


RT, MIRROR = runtime_and_mirror()

# (key presented, body, route, expected code or "allow")
TABLE = [
    (None, {"model": "gpt-9"}, "route0", "invalid_api_key"),
    ("k-revoke.wrong", {"model": "gpt-9"}, "route0", "invalid_api_key"),  # secret first
    ("nobody.s", {"model": "gpt-5.4-mini"}, "route0", "invalid_api_key"),
    ("k-never-issued.s", {"model": "gpt-5.4-mini"}, "route0", "invalid_api_key"),
    ("k-revoke.s", {"model": "gpt-9", "body_error": True}, "route0", "key_revoked"),
    ("k-suspend.s", {"model": "gpt-9"}, "route0", "key_suspended"),
    ("k-expire.s", {"model": "gpt-9"}, "route0", "key_expired"),
    ("k-main.s", {"body_error": True}, "route0", "invalid_request_error"),
    ("k-main.s", {}, "route0", "invalid_request_error"),
    ("k-main.s", {"model": "gpt-5.4-mini", "stream": "yes"}, "route0",
     "invalid_request_error"),
    ("k-main.s", {"model": "claude-haiku"}, "route0", "model_not_allowed"),  # not served here
    ("k-mini.s", {"model": "gpt-5.4"}, "route0", "model_not_allowed"),  # the key's allowlist
    ("k-main.s", {"model": "gpt-5.4"}, "route0", "model_not_allowed"),  # the role rule
    ("k-main.s", {"model": "gpt-5.4-mini"}, "route0", "allow"),
    ("k-main.s", {"model": "gpt-5.4-mini"}, "nowhere", "not_found"),
]


@pytest.mark.parametrize("key,body,route,expected", TABLE)
def test_the_check_order(key: str | None, body: dict[str, Any], route: str,
                         expected: str) -> None:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    facts = RequestFacts(route_name=route, headers=headers, body=body, source_ip="127.0.0.1",
                         body_bytes=100)
    result = decide(RT, MIRROR, facts, NOW)
    if expected == "allow":
        assert isinstance(result, Allow), result
    else:
        assert isinstance(result, Deny) and result.code == expected, result


def test_every_error_code_has_one_row_in_the_error_table() -> None:
    """ErrorCode is what mypy checks a refusal's code against; the table is what answers it."""
    from typing import get_args

    from tollway.errors import _KINDS, ErrorCode

    assert [k.code for k in _KINDS] == list(get_args(ErrorCode))

