"""The error contract: what a refused client sees, in its provider's own shape.

Clients use the official SDKs, which pick their exception class from the status code and read
the body in the provider's format. So every refusal Tollway makes (in `extauthz`, `ratelimit`,
or Envoy's own local replies) is rendered here, and nowhere else.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Literal

from tollway.manifest.model import Dialect

# Tollway's codes, as a type: a refusal names one of these or mypy refuses the code. The
# table below gives each its status and its type in each provider's shape.
ErrorCode = Literal[
    "invalid_api_key", "key_suspended", "key_revoked", "key_expired", "model_not_allowed",
    "policy_denied", "budget_exceeded", "rate_limit_exceeded", "budget_in_flight",
    "too_many_failed_attempts", "invalid_request_error", "request_too_large", "not_found",
    "method_not_allowed", "protocol_error", "upgrade_required", "headers_too_large",
    "gateway_unavailable", "upstream_unavailable",
]


@dataclass(frozen=True)
class ErrorKind:
    code: ErrorCode  # OpenAI's `error.code`, Anthropic's `error.code`
    status: int
    openai_type: str
    anthropic_type: str


_KINDS = [
    ErrorKind("invalid_api_key", 401, "invalid_request_error", "authentication_error"),
    ErrorKind("key_suspended", 403, "permission_error", "permission_error"),
    ErrorKind("key_revoked", 403, "permission_error", "permission_error"),
    ErrorKind("key_expired", 403, "permission_error", "permission_error"),
    ErrorKind("model_not_allowed", 403, "permission_error", "permission_error"),
    ErrorKind("policy_denied", 403, "permission_error", "permission_error"),
    ErrorKind("budget_exceeded", 402, "insufficient_quota", "billing_error"),
    ErrorKind("rate_limit_exceeded", 429, "rate_limit_error", "rate_limit_error"),
    # what is left of a budget is held by requests in flight: retry once they settle
    ErrorKind("budget_in_flight", 429, "rate_limit_error", "rate_limit_error"),
    # repeated wrong secrets for one key id (the right secret still passes)
    ErrorKind("too_many_failed_attempts", 429, "rate_limit_error", "rate_limit_error"),
    ErrorKind("invalid_request_error", 400, "invalid_request_error", "invalid_request_error"),
    ErrorKind("request_too_large", 413, "invalid_request_error", "request_too_large"),
    ErrorKind("not_found", 404, "invalid_request_error", "not_found_error"),
    ErrorKind("method_not_allowed", 405, "invalid_request_error", "invalid_request_error"),
    # Envoy's own refusals of what is not acceptable HTTP (rendered as local replies)
    ErrorKind("protocol_error", 400, "invalid_request_error", "invalid_request_error"),
    ErrorKind("upgrade_required", 426, "invalid_request_error", "invalid_request_error"),
    ErrorKind("headers_too_large", 431, "invalid_request_error", "request_too_large"),
    ErrorKind("gateway_unavailable", 503, "server_error", "api_error"),
    ErrorKind("upstream_unavailable", 503, "server_error", "api_error"),
]
KINDS: dict[str, ErrorKind] = {k.code: k for k in _KINDS}


def error_body(dialect: Dialect, code: ErrorCode, message: str) -> str:
    kind = KINDS[code]
    if dialect is Dialect.ANTHROPIC:
        doc: dict[str, object] = {"type": "error", "error": {"type": kind.anthropic_type,
                                                             "code": code, "message": message}}
    else:
        doc = {"error": {"message": message, "type": kind.openai_type, "param": None,
                         "code": code}}
    return json.dumps(doc, separators=(",", ":"))


def status_of(code: ErrorCode) -> int:
    return KINDS[code].status
