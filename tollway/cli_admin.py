"""`tollway admin-tokens ...` and `tollway audit`: the admin API's tokens and the audit log,
on the key store directly (the admin API itself is `tollway serve --services admin`)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

from tollway.keys import AuditQuery, KeyExists, KeyNotFound, KeyStore, open_key_store
from tollway.manifest.keys_part import load_keys_part
from tollway.manifest.model import Storage
from tollway.refs import pepper


async def with_store(storage: Storage, fn: Callable[[KeyStore], Awaitable[int]]) -> int:
    """Run `fn` on the manifest's key store, opened for it and closed after."""
    store = open_key_store(storage.keys)
    await store.open()
    try:
        return await fn(store)
    finally:
        await store.close()


def run_with_store(storage: Storage, fn: Callable[[KeyStore], Awaitable[int]]) -> int:
    """with_store, run to its end; asyncio is imported here, not by every command (this
    module is imported to build the CLI's parsers)."""
    import asyncio

    return asyncio.run(with_store(storage, fn))


def cli_actor() -> str:
    """Who a CLI change is by, in the audit log (an admin token's changes are admin:ID)."""
    return f"cli:{os.environ.get('USER', 'unknown')}"


def cmd_tokens(args: argparse.Namespace, manifest_path: Any) -> int:
    from tollway.admin import tokens

    storage = load_keys_part(manifest_path).storage

    async def go(store: KeyStore) -> int:
        if args.tokens_action == "issue":
            token = await tokens.issue(store, pepper(storage.pepper, create=True),
                                       args.token_id, args.scope, cli_actor())
            print(token)
            print(f"# admin token {args.token_id} ({args.scope}); shown once, stored as a hash",
                  file=sys.stderr)
        else:
            await tokens.revoke(store, args.token_id, cli_actor())
            print(f"{args.token_id}: revoked")
        return 0
    try:
        return run_with_store(storage, go)
    except KeyExists:
        print(f"tollway: admin token {args.token_id} exists", file=sys.stderr)
    except KeyNotFound:
        print(f"tollway: no admin token {args.token_id}", file=sys.stderr)
    except ValueError as e:
        print(f"tollway: {e}", file=sys.stderr)
    return 1


def cmd_audit(args: argparse.Namespace, manifest_path: Any) -> int:
    storage = load_keys_part(manifest_path).storage
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
    return run_with_store(storage, go)


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
    t.add_argument("token_id", help="the token's name")
    tok.set_defaults(admin_cmd=cmd_tokens)

    aud = sub.add_parser(
        "audit", help="the audit log: every key, client and token change",
        description="Who changed what, when, from where, before and after; newest first. "
        "Secrets never appear in it.",
        epilog="example:\n  tollway audit --target chat-app-prod --since 2026-11-01",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    with_manifest(aud)
    aud.add_argument("--kind", choices=["key", "client", "admin_token"],
                     help="only changes to this kind of object")
    aud.add_argument("--target", help="an object's id")
    aud.add_argument("--actor", help="e.g. admin:portal or cli:alice")
    aud.add_argument("--action", help="e.g. issue, revoke, create, update")
    aud.add_argument("--since", help="ISO 8601 date or time")
    aud.add_argument("--limit", type=int, default=100, help="at most this many (default 100)")
    aud.add_argument("--format", choices=["table", "json"], default="table",
                     help="table (default) or json")
    aud.set_defaults(admin_cmd=cmd_audit)


# -- through the admin API (--server URL) ------------------------------------------------------

TOKEN_ENV = "TOLLWAY_ADMIN_TOKEN"


def _api(server: str) -> Any:
    import httpx

    token = os.environ.get(TOKEN_ENV)
    if not token:
        raise SystemExit(f"tollway: --server needs an admin token in ${TOKEN_ENV} "
                         "(tollway admin-tokens issue ...)")
    return httpx.Client(base_url=server.rstrip("/") + "/admin/v1", timeout=30,
                        headers={"authorization": f"Bearer {token}"})


def _answer(response: Any) -> int:
    """Print the API's answer; a refusal as `tollway: <status> <code>: <message>`."""
    if response.status_code == 200:
        body = response.json()
        secret = body.get("secret") if isinstance(body, dict) else None
        if secret:  # a new secret: alone on stdout, like `tollway keys issue`
            print(secret)
            print("# the secret is shown once and stored only as a hash", file=sys.stderr)
        else:
            print(json.dumps(body, indent=2))
        return 0
    try:
        message = response.json().get("message", response.text)
    except ValueError:
        message = response.text
    code = response.headers.get("x-tollway-error", "error")
    print(f"tollway: {response.status_code} {code}: {message}", file=sys.stderr)
    return 1


def keys_via_server(args: argparse.Namespace) -> int:
    """`tollway keys ACTION ID --server URL`: runtime keys through the admin API."""
    with _api(args.server) as api:
        action, key_id = args.keys_action, getattr(args, "key_id", None)
        if action == "issue":
            if not args.client:
                raise SystemExit("tollway: keys issue --server needs --client CLIENT_ID")
            doc = {"id": key_id, **(json.loads(args.spec) if args.spec else {})}
            if args.expires_in:
                doc["expires_at"] = (datetime.now().astimezone() + args.expires_in).isoformat()
            return _answer(api.post(f"/clients/{args.client}/keys", json=doc))
        if action == "show":
            return _answer(api.get(f"/keys/{key_id}"))
        if action == "rotate":
            return _answer(api.post(f"/keys/{key_id}:rotate", json={
                "grace_seconds": int(args.grace.total_seconds())}))
        if action == "expire":
            at = (datetime.now().astimezone() + args.in_).isoformat() if args.in_ else ""
            return _answer(api.post(f"/keys/{key_id}:expire", json={"expires_at": at}))
        if action in ("suspend", "resume", "revoke"):
            return _answer(api.post(f"/keys/{key_id}:{action}",
                                    json={"reason": args.reason or ""}))
        raise SystemExit(f"tollway: keys {action} has no --server form; list a client's keys "
                         "with `tollway clients keys CLIENT --server URL`")


def cmd_clients(args: argparse.Namespace, manifest_path: Any) -> int:
    with _api(args.server) as api:
        action = args.clients_action
        if action == "create":
            doc = {"id": args.client_id, **(json.loads(args.spec) if args.spec else {})}
            org, _, project = args.project.partition("/")
            return _answer(api.post(f"/orgs/{org}/projects/{project}/clients", json=doc))
        if action == "list":
            org, _, project = args.project.partition("/")
            return _answer(api.get(f"/orgs/{org}/projects/{project}/clients"))
        if action == "show":
            return _answer(api.get(f"/clients/{args.client_id}"))
        if action == "keys":
            return _answer(api.get(f"/clients/{args.client_id}/keys"))
        return _answer(api.post(f"/clients/{args.client_id}:{action}", json={}))


def add_client_parsers(sub: Any) -> None:
    cl = sub.add_parser(
        "clients", help="runtime clients through the admin API (--server)",
        description="Clients created at runtime inside the manifest's projects, through the "
        f"admin API; the admin token comes from ${TOKEN_ENV}. Documents are the manifest's "
        "client schema (without keys).",
        epilog="example:\n  tollway clients create dana --project acme/team-ai "
        "--server https://gw.example.com \\\n    --spec '{\"user\": {\"email\": "
        "\"dana@example.com\", \"tenant\": \"t1\"}}'",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    cs = cl.add_subparsers(dest="clients_action", required=True)
    for name, help_ in (("create", "create a client in a project"),
                        ("list", "a project's runtime clients"),
                        ("show", "one client"), ("keys", "a client's keys"),
                        ("suspend", "refuse every key of the client until resumed"),
                        ("resume", "accept the client's keys again"),
                        ("revoke", "refuse the client's keys for good")):
        c = cs.add_parser(name, help=help_)
        c.add_argument("--server", required=True, help="the gateway's URL")
        if name in ("create", "list"):
            c.add_argument("--project", required=True, help="ORG/PROJECT")
        if name != "list":
            c.add_argument("client_id", help="the client's id")
        if name == "create":
            c.add_argument("--spec", help="the client document as JSON (name, user, metadata)")
    cl.set_defaults(admin_cmd=cmd_clients)
