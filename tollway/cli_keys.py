"""`tollway keys`: issue, rotate, suspend, resume, revoke, expire, show and list keys, in the
key store itself (or, with --server, through the admin API)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from datetime import UTC, datetime
from typing import Any

from tollway.cli_common import CliError, manifest_path, run_async
from tollway.keys import KeyExists, KeyManager, KeyNotFound, KeyRecord, KeyStore
from tollway.manifest import KeyStatus
from tollway.manifest.keys_part import KeyPlace, load_keys_part
from tollway.manifest.model import Storage
from tollway.refs import pepper


def _show(record: KeyRecord, place: KeyPlace | None) -> dict[str, Any]:
    """A manifest key's place is the manifest's; a runtime key's, its stored spec's (as
    `keys list` shows it), whether or not its project is still in the manifest."""
    spec = json.loads(record.spec) if place is None and record.spec else {}
    return {
        "key_id": record.key_id,
        "status": record.status.value,
        "manifest_status": place.status.value if place else None,
        "runtime": place is None and bool(spec),
        "org": place.org if place else spec.get("org"),
        "project": place.project if place else spec.get("project"),
        "client": place.client if place else spec.get("client"),
        "expires_at": record.expires_at.isoformat() if record.expires_at else None,
        "previous_secret_valid_until": record.previous_valid_until.isoformat()
        if record.previous_valid_until else None,
        "created_at": record.created_at.isoformat(),
        "updated_at": record.updated_at.isoformat(),
    }


async def _with_manager(storage: Storage, fn: Callable[[KeyManager], Awaitable[int]]
                        ) -> int:
    from tollway.cli_admin import cli_actor, with_store

    secret = pepper(storage.pepper, create=True)
    return await with_store(storage, lambda store: fn(KeyManager(store, secret, actor=cli_actor())))


async def _exists_message(storage: Storage, key_id: str) -> str:
    """What to do about an id that is taken: rotate a live key; a revoked id is gone for good."""
    from tollway.cli_admin import with_store

    async def status(store: KeyStore) -> int:
        record = await store.get(key_id)
        return 1 if record is not None and record.status is KeyStatus.REVOKED else 0
    if await with_store(storage, status):
        return (f"key {key_id} was revoked, and a revoked id is never reused: add a new key id "
                "to the manifest and issue that")
    return (f"key {key_id} already exists: `tollway keys rotate {key_id}` gives it a new "
            "secret")


LIST_PAGE = 1000  # keys read from the store at a time by `tollway keys list`


async def _listing(store: KeyStore, places: Mapping[str, KeyPlace], after: str
                   ) -> AsyncIterator[tuple[str, KeyRecord | None, KeyPlace | None]]:
    """Every key id after `after`, the store's and the manifest's merged in order, the
    store read a page at a time: a million runtime keys list in constant memory."""
    manifest = iter(sorted(k for k in places if k > after))
    pending = next(manifest, None)
    cursor = after
    while True:
        page = await store.page(cursor, LIST_PAGE)
        for record in page:
            while pending is not None and pending < record.key_id:
                yield pending, None, places[pending]
                pending = next(manifest, None)
            if pending == record.key_id:
                pending = next(manifest, None)
            yield record.key_id, record, places.get(record.key_id)
        if len(page) < LIST_PAGE:
            break
        cursor = page[-1].key_id
    while pending is not None:
        yield pending, None, places[pending]
        pending = next(manifest, None)


async def _list_keys(store: KeyStore, places: Mapping[str, KeyPlace], after: str,
                     limit: int | None) -> int:
    lines = [f"{'KEY ID':<28} {'STORE':<10} {'MANIFEST':<10} {'PROJECT':<20} EXPIRES"]
    shown, last, more = 0, after, False
    async for key_id, r, b in _listing(store, places, after):
        if limit is not None and shown == limit:
            more = True
            break
        spec = json.loads(r.spec) if r and r.spec else None  # a runtime key
        where = (f"{b.org}/{b.project}" if b else
                 f"{spec['org']}/{spec['project']}" if spec else "-")
        lines.append(f"{key_id:<28} {r.status.value if r else 'not-issued':<10} "
                     f"{b.status.value if b else 'runtime' if spec else 'absent':<10} "
                     f"{where:<20} {r.expires_at.isoformat() if r and r.expires_at else '-'}")
        shown, last = shown + 1, key_id
        if len(lines) >= LIST_PAGE:  # written a page at a time, not a call per line
            sys.stdout.write("\n".join(lines) + "\n")
            lines = []
    if lines:
        sys.stdout.write("\n".join(lines) + "\n")
    if more:
        sys.stdout.flush()  # the rows first, then where the next page starts
        print(f"# more keys follow: tollway keys list --after {last}", file=sys.stderr)
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    if getattr(args, "server", None):
        from tollway.cli_admin import keys_via_server

        return keys_via_server(args)
    # the storage section and the key ids' places only: a key command neither waits for
    # 10,000 projects to compile nor is refused by a mistake in one of them
    part = load_keys_part(manifest_path(args))
    action: str = args.keys_action

    async def go(km: KeyManager) -> int:
        if action == "list":
            return await _list_keys(km.store, part.places, args.after, args.limit)
        key_id: str = args.key_id
        if action == "issue":
            if key_id not in part.places:
                raise CliError(f"key id {key_id!r} is not in {part.source}: add it under a "
                               "client's keys first")
            expires = datetime.now(UTC) + args.expires_in if args.expires_in else None
            issued = await km.issue(key_id, expires_at=expires)
            print(issued.key)
            print(f"# issued {key_id}; this secret is shown once and stored only as a hash",
                  file=sys.stderr)
            return 0
        if action == "rotate":
            issued = await km.rotate(key_id, grace=args.grace)
            print(issued.key)
            until = issued.record.previous_valid_until
            print(f"# rotated {key_id}; the old secret "
                  f"{'works until ' + until.isoformat() if until else 'no longer works'}",
                  file=sys.stderr)
            return 0
        if action == "show":
            record = await km.store.get(key_id)
            if record is None:
                raise KeyNotFound(key_id)
            out = _show(record, part.places.get(key_id))
            out["events"] = [{"action": e.action, "at": e.at.isoformat(), "actor": e.actor,
                              "detail": e.detail} for e in await km.store.events(key_id)]
            print(json.dumps(out, indent=2))
            return 0
        if action == "expire":
            at = datetime.now(UTC) + args.in_ if args.in_ is not None else datetime.now(UTC)
            record = await km.expire(key_id, at)
            when = record.expires_at.isoformat() if record.expires_at else "-"
            print(f"{key_id}: expires at {when}")
            return 0
        status = {"suspend": KeyStatus.SUSPENDED, "resume": KeyStatus.ACTIVE,
                  "revoke": KeyStatus.REVOKED}[action]
        record = await km.set_status(key_id, status, args.reason or "")
        print(f"{key_id}: {record.status.value}")
        return 0

    try:
        return run_async(_with_manager(part.storage, go))
    except KeyNotFound as e:
        raise CliError(f"key {e} has not been issued") from None
    except KeyExists as e:
        raise CliError(run_async(_exists_message(part.storage, str(e)))) from None
    except ValueError as e:
        raise CliError(str(e)) from None
