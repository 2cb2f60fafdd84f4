"""`tollway admin-tokens ...` and `tollway audit`: the admin API's tokens and the audit log,
on the key store directly (the admin API itself is `tollway serve --services admin`)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

from tollway.keys import AuditQuery, KeyExists, KeyNotFound, KeyStore, open_key_store
from tollway.manifest import Manifest, load
from tollway.refs import pepper


async def _with_store(m: Manifest, fn: Callable[[KeyStore], Awaitable[int]]) -> int:
    store = open_key_store(m.storage.keys)
    await store.open()
    try:
        return await fn(store)
    finally:
        await store.close()


def _actor() -> str:
    return f"cli:{os.environ.get('USER', 'unknown')}"


def cmd_tokens(args: argparse.Namespace, manifest_path: Any) -> int:
    from tollway.admin import tokens

    m = load(manifest_path)

    async def go(store: KeyStore) -> int:
        if args.tokens_action == "issue":
            token = await tokens.issue(store, pepper(m.storage.pepper, create=True),
                                       args.token_id, args.scope, _actor())
            print(token)
            print(f"# admin token {args.token_id} ({args.scope}); shown once, stored as a hash",
                  file=sys.stderr)
        else:
            await tokens.revoke(store, args.token_id, _actor())
            print(f"{args.token_id}: revoked")
        return 0
    try:
        return asyncio.run(_with_store(m, go))
    except KeyExists:
        print(f"tollway: admin token {args.token_id} exists", file=sys.stderr)
    except KeyNotFound:
        print(f"tollway: no admin token {args.token_id}", file=sys.stderr)
    except ValueError as e:
        print(f"tollway: {e}", file=sys.stderr)
    return 1


def cmd_audit(args: argparse.Namespace, manifest_path: Any) -> int:
    m = load(manifest_path)
    since = datetime.fromisoformat(args.since) if args.since else None
    query = AuditQuery(kind=args.kind, target=args.target, actor=args.actor,
                       action=args.action, since=since, limit=args.limit)

    async def go(store: KeyStore) -> int:
        events = await store.audit(query)
        if args.format == "json":
            print(json.dumps([{"at": e.at.isoformat(), "actor": e.actor, "source": e.source,
                               "kind": e.kind, "target": e.key_id, "action": e.action,
                               "detail": e.detail, "before": e.before or None,
                               "after": e.after or None} for e in events], indent=2))
            return 0
        rows = [("AT", "ACTOR", "SOURCE", "KIND", "TARGET", "ACTION", "DETAIL")] + [
            (e.at.isoformat(timespec="seconds"), e.actor, e.source or "-", e.kind, e.key_id,
             e.action, e.detail or "-") for e in events]
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        for r in rows:
            print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
        return 0
    return asyncio.run(_with_store(m, go))


def add_parsers(sub: Any, with_manifest: Callable[[argparse.ArgumentParser], None]) -> None:
    tok = sub.add_parser(
        "admin-tokens", help="issue and revoke the admin API's tokens",
        description="Admin tokens authenticate callers of the admin API (/admin/v1/...). A "
        "token's scope is the whole gateway (*), one org (org:ORG) or one project "
        "(project:ORG/PROJECT).",
        epilog="example:\n  tollway admin-tokens issue portal --scope org:acme",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    ts = tok.add_subparsers(dest="tokens_action", required=True)
    t = ts.add_parser("issue", help="a new token (printed once)")
    with_manifest(t)
    t.add_argument("token_id", help="a name for the token, e.g. portal")
    t.add_argument("--scope", required=True, help="*, org:ORG or project:ORG/PROJECT")
    t = ts.add_parser("revoke", help="refuse a token from now on")
    with_manifest(t)
    t.add_argument("token_id")
    tok.set_defaults(admin_cmd=cmd_tokens)

    aud = sub.add_parser(
        "audit", help="the audit log: every key, client and token change",
        description="Who changed what, when, from where, before and after; newest first. "
        "Secrets never appear in it.",
        epilog="example:\n  tollway audit --target chat-app-prod --since 2026-11-01",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    with_manifest(aud)
    aud.add_argument("--kind", choices=["key", "client", "admin_token"])
    aud.add_argument("--target", help="an object's id")
    aud.add_argument("--actor", help="e.g. admin:portal or cli:alice")
    aud.add_argument("--action", help="e.g. issue, revoke, create, update")
    aud.add_argument("--since", help="ISO 8601 date or time")
    aud.add_argument("--limit", type=int, default=100, help="at most this many (default 100)")
    aud.add_argument("--format", choices=["table", "json"], default="table")
    aud.set_defaults(admin_cmd=cmd_audit)
