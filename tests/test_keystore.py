"""One suite, two backends: SQLite (embedded) and the real PostgreSQL on 127.0.0.1."""

from __future__ import annotations

import asyncio
import gc
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tests.conftest import PG_DSN
from tests.e2e.harness import offline_manifest
from tollway.keys import (
    AuditQuery,
    KeyEvent,
    KeyExists,
    KeyManager,
    KeyNotFound,
    KeyRecord,
    KeyStore,
    runtime,
    verify_secret,
)
from tollway.keys import mirror as mirror_module
from tollway.keys.mirror import KeyMirror
from tollway.keys.postgres import PostgresKeyStore
from tollway.keys.sqlite import SqliteKeyStore
from tollway.manifest import KeyStatus
from tollway.manifest.loader import parse

PEPPER = b"test-pepper-0123456789abcdef"


@pytest.fixture(params=["sqlite", "postgres"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[KeyStore]:
    s: KeyStore = (SqliteKeyStore(tmp_path / "keys.db") if request.param == "sqlite"
                   else PostgresKeyStore(PG_DSN, schema=request.getfixturevalue("drop_schema")))
    await s.open()
    yield s
    await s.close()


async def test_issue_stores_only_a_hash(store: KeyStore) -> None:
    km = KeyManager(store, PEPPER)
    issued = await km.issue("team-a")
    key_id, secret = issued.key.split(".", 1)
    assert key_id == "team-a" and len(secret) == 43  # 32 bytes, base64url
    record = await store.get("team-a")
    assert record is not None
    assert secret.encode() not in record.secret_hash and len(record.secret_hash) == 32
    now = datetime.now(UTC)
    assert verify_secret(record, PEPPER, secret, now)
    assert not verify_secret(record, PEPPER, secret[:-1] + "x", now)
    assert not verify_secret(record, b"another-pepper-0123456789", secret, now)


async def test_issue_twice_is_refused(store: KeyStore) -> None:
    km = KeyManager(store, PEPPER)
    await km.issue("team-a")
    with pytest.raises(KeyExists):
        await km.issue("team-a")


async def test_status_lifecycle_and_audit(store: KeyStore) -> None:
    km = KeyManager(store, PEPPER)
    await km.issue("team-a")
    assert (await km.set_status("team-a", KeyStatus.SUSPENDED, "abuse")).status \
        is KeyStatus.SUSPENDED
    assert (await km.set_status("team-a", KeyStatus.ACTIVE)).status is KeyStatus.ACTIVE
    assert (await km.set_status("team-a", KeyStatus.REVOKED)).status is KeyStatus.REVOKED
    with pytest.raises(ValueError, match="final"):
        await km.set_status("team-a", KeyStatus.ACTIVE)
    with pytest.raises(KeyNotFound):
        await km.set_status("nobody", KeyStatus.REVOKED)
    events = await store.events("team-a")
    assert [e.action for e in events] == ["issue", "suspend", "resume", "revoke"]
    assert events[1].detail == "abuse"


async def test_rotation_with_and_without_grace(store: KeyStore) -> None:
    km = KeyManager(store, PEPPER)
    old = (await km.issue("team-a")).key.split(".", 1)[1]
    new = (await km.rotate("team-a", grace=timedelta(hours=1))).key.split(".", 1)[1]
    record = await store.get("team-a")
    assert record is not None
    now = datetime.now(UTC)
    assert verify_secret(record, PEPPER, new, now)
    assert verify_secret(record, PEPPER, old, now)
    assert not verify_secret(record, PEPPER, old, now + timedelta(hours=2))
    newest = (await km.rotate("team-a")).key.split(".", 1)[1]
    record = await store.get("team-a")
    assert record is not None
    assert verify_secret(record, PEPPER, newest, now)
    assert not verify_secret(record, PEPPER, new, now)


async def test_expiry_is_stored(store: KeyStore) -> None:
    km = KeyManager(store, PEPPER)
    at = datetime.now(UTC) + timedelta(days=1)
    await km.issue("team-a", expires_at=at)
    record = await store.get("team-a")
    assert record is not None and record.expires_at is not None
    assert abs((record.expires_at - at).total_seconds()) < 0.001
    record = await km.expire("team-a", None)
    assert record.expires_at is None


async def test_change_sequence_lets_a_mirror_catch_up(store: KeyStore) -> None:
    km = KeyManager(store, PEPPER)
    await km.issue("a")
    await km.issue("b")
    first = await store.changes_since(0)
    assert [r.key_id for r in first] == ["a", "b"]
    seq = max(r.seq for r in first)
    assert await store.changes_since(seq) == []
    await km.set_status("a", KeyStatus.REVOKED)
    changed = await store.changes_since(seq)
    assert [(r.key_id, r.status) for r in changed] == [("a", KeyStatus.REVOKED)]


async def test_concurrent_issues_get_distinct_sequence_numbers(store: KeyStore) -> None:
    km = KeyManager(store, PEPPER)
    await asyncio.gather(*(km.issue(f"k{i}") for i in range(20)))
    seqs = [r.seq for r in await store.changes_since(0)]
    assert len(seqs) == 20 and len(set(seqs)) == 20


async def test_latest_gives_the_sequence_then_the_newest_keys(store: KeyStore) -> None:
    km = KeyManager(store, PEPPER)
    for name in ("a", "b", "c"):
        await km.issue(name)
    await km.set_status("a", KeyStatus.SUSPENDED)  # written last now
    seq, newest = await store.latest(2)
    assert [r.key_id for r in newest] == ["a", "c"] and seq == newest[0].seq
    assert [r.key_id for r in (await store.latest(10))[1]] == ["a", "c", "b"]


async def test_client_keys_finds_one_clients_runtime_keys(store: KeyStore) -> None:
    km = KeyManager(store, PEPPER)
    for key_id, client in (("k2", "c1"), ("k1", "c1"), ("k3", "c2")):
        await km.issue(key_id, spec=f'{{"client": "{client}", "key": {{"id": "{key_id}"}}}}')
    await km.issue("manifest-key")
    assert [r.key_id for r in await store.client_keys("c1")] == ["k1", "k2"]
    assert await store.client_keys("nobody") == []


# ids whose byte order (Python's) is not a natural-language collation's
UNCOLLATED_IDS = ["ab", "B", "a_b", "Z9", "a-b", "a", "9z"]


async def _walk(store: KeyStore, limit: int) -> list[str]:
    seen: list[str] = []
    while page := await store.page(seen[-1] if seen else "", limit):
        assert len(page) <= limit
        seen += [r.key_id for r in page]
    return seen


async def test_pages_walk_every_key_once_in_byte_order(store: KeyStore) -> None:
    km = KeyManager(store, PEPPER)
    for key_id in UNCOLLATED_IDS:
        await km.issue(key_id)
    for limit in (1, 2, 100):
        assert await _walk(store, limit) == sorted(UNCOLLATED_IDS)
    assert [r.key_id for r in await store.page("a-b", 2)] == ["a_b", "ab"]
    assert await store.page("ab", 10) == []


async def test_pages_keep_byte_order_where_the_database_collates_otherwise() -> None:
    """PostgreSQL orders text by the database's collation, which in most installations is
    a language's (en-US puts "a-b" beside "ab", "B" after "a"); `tollway keys list` merges
    the store's pages with the manifest's ids in Python's order, so pages must be in it."""
    import os

    import asyncpg

    from tests.conftest import require_postgres

    require_postgres()
    name = f"tollway_icu_{os.getpid()}"
    admin = await asyncpg.connect(PG_DSN)
    try:
        await admin.execute(f"DROP DATABASE IF EXISTS {name}")
        await admin.execute(f"CREATE DATABASE {name} TEMPLATE template0 LOCALE_PROVIDER icu "
                            "ICU_LOCALE 'en-US' LOCALE 'C.UTF-8' ENCODING 'UTF8'")
        dsn = PG_DSN.rsplit("/", 1)[0] + f"/{name}"
        conn = await asyncpg.connect(dsn)
        collated = await conn.fetchval("SELECT array_agg(x ORDER BY x) FROM unnest($1::text[]) "
                                       "AS x", UNCOLLATED_IDS)
        await conn.close()
        assert collated != sorted(UNCOLLATED_IDS)  # else this test proves nothing
        store = PostgresKeyStore(dsn)
        await store.open()
        try:
            km = KeyManager(store, PEPPER)
            for key_id in UNCOLLATED_IDS:
                await km.issue(key_id)
            assert await _walk(store, 2) == sorted(UNCOLLATED_IDS)
        finally:
            await store.close()
    finally:
        await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        await admin.close()


async def test_a_follower_racing_concurrent_writers_misses_no_write(store: KeyStore) -> None:
    """Sequence numbers must become visible in order: a PostgreSQL writer takes its number
    (nextval) before it commits, so without the writers' lock a follower could read seq 8
    committed while 7 was not yet, move past 7 and never see that write."""
    km = KeyManager(store, PEPPER)
    seen: dict[str, KeyStatus] = {}
    done = asyncio.Event()

    async def follow() -> None:
        seq = 0
        while True:
            finished = done.is_set()
            for r in await store.changes_since(seq):
                seen[r.key_id], seq = r.status, max(seq, r.seq)
            if finished:
                return

    async def writer(w: int) -> None:
        for i in range(25):
            await km.issue(f"w{w}-{i}")
            await km.set_status(f"w{w}-{i}", KeyStatus.SUSPENDED)
    follower = asyncio.create_task(follow())
    await asyncio.gather(*(writer(w) for w in range(8)))
    done.set()
    await follower
    assert len(seen) == 200 and set(seen.values()) == {KeyStatus.SUSPENDED}


async def test_wait_for_change_wakes_on_a_write(store: KeyStore, tmp_path: Path) -> None:
    """A second store handle (another replica) learns of a write within a second."""
    other: KeyStore = (SqliteKeyStore(tmp_path / "keys.db") if isinstance(store, SqliteKeyStore)
                       else PostgresKeyStore(PG_DSN, schema=store.schema))  # type: ignore[attr-defined]
    await other.open()
    try:
        await other.wait_for_change(0.01)  # start listening
        km = KeyManager(store, PEPPER)
        loop = asyncio.get_running_loop()
        started = loop.time()
        writer = asyncio.create_task(km.issue("late"))
        deadline = started + 1.0
        while loop.time() < deadline:
            await other.wait_for_change(deadline - loop.time())
            if any(r.key_id == "late" for r in await other.changes_since(0)):
                break
        else:
            pytest.fail("the other replica did not see the write within 1 s")
        await writer
    finally:
        await other.close()


async def test_documents_are_created_once_replaced_and_followed(store: KeyStore) -> None:
    def event(action: str, obj: str, after: str = "") -> KeyEvent:
        return KeyEvent(obj, action, datetime.now(UTC), "admin:root", "", kind="client",
                        after=after, source="10.0.0.7")
    first = await store.put_object("client", "c1", '{"v": 1}', event("create", "c1"),
                                   create=True)
    with pytest.raises(KeyExists):
        await store.put_object("client", "c1", "{}", event("create", "c1"), create=True)
    with pytest.raises(KeyNotFound):
        await store.put_object("client", "nobody", "{}", event("update", "nobody"),
                               create=False)
    # documents and keys share one change sequence: a mirror follows both in order
    await KeyManager(store, PEPPER).issue("k1", spec='{"client": "c1"}')
    second = await store.put_object("client", "c1", '{"v": 2}',
                                    event("update", "c1", '{"v": 2}'), create=False)
    assert second.seq > first.seq and second.created_at == first.created_at
    assert [o.doc for o in await store.objects_since(first.seq)] == ['{"v": 2}']
    assert (await store.get_object("client", "c1")) == second
    assert await store.get_object("admin_token", "c1") is None
    record = await store.get("k1")
    assert record is not None and record.spec == '{"client": "c1"}'
    assert first.seq < record.seq < second.seq


async def test_the_audit_log_filters_and_never_holds_a_secret(store: KeyStore) -> None:
    km = KeyManager(store, PEPPER, actor="admin:ops", source="10.1.2.3")
    issued = await km.issue("k1", spec='{"client": "c1", "key": {"id": "k1"}}')
    await km.set_status("k1", KeyStatus.SUSPENDED, "review")
    await km.respecify("k1", '{"client": "c1", "key": {"id": "k1", "models": ["m"]}}')
    await KeyManager(store, PEPPER).issue("k2")
    everything = await store.audit(AuditQuery())
    assert [e.action for e in everything] == ["issue", "update", "suspend", "issue"]  # newest first
    secret = issued.key.split(".", 1)[1]
    assert all(secret not in f"{e.detail}{e.before}{e.after}" for e in everything)
    mine = await store.audit(AuditQuery(actor="admin:ops"))
    assert {e.key_id for e in mine} == {"k1"} and {e.source for e in mine} == {"10.1.2.3"}
    update = (await store.audit(AuditQuery(target="k1", action="update")))[0]
    assert '"models"' in update.after and '"models"' not in update.before
    assert len(await store.audit(AuditQuery(limit=2))) == 2
    later = datetime.now(UTC) + timedelta(seconds=5)
    assert await store.audit(AuditQuery(since=later)) == []


async def test_stores_opening_one_fresh_sqlite_file_at_once_all_succeed(tmp_path: Path
                                                                       ) -> None:
    """extauthz and costsink open the key store as they start (each its own connection, as
    here): SQLite refuses a concurrent switch to WAL ("database is locked") and a second ALTER
    of a column, unless opening is serialised (tollway/sqlite_worker.py)."""
    for round_ in range(20):
        stores = [SqliteKeyStore(tmp_path / f"keys-{round_}.db") for _ in range(4)]
        try:
            await asyncio.gather(*(s.open() for s in stores))
            assert [await s.objects_since(0) for s in stores] == [[]] * 4
        finally:
            for s in stores:
                await s.close()


async def test_a_store_bigger_than_the_mirror_is_mirrored_in_part(store: KeyStore) -> None:
    """A million runtime keys must not mean a million records in every process: the mirror
    holds the most used, fetches a key the first time it is presented and follows changes."""
    km = KeyManager(store, PEPPER)
    for i in range(6):
        await km.issue(f"k{i}")
    small = KeyMirror(store, capacity=10)
    await small.refresh()
    assert small.complete and all(small.get(f"k{i}") for i in range(6))

    mirror = KeyMirror(store, capacity=3)
    await mirror.refresh()
    assert not mirror.complete
    assert [k for k in (f"k{i}" for i in range(6)) if mirror.get(k)] == ["k3", "k4", "k5"]
    mirror.get("k3")  # used: k4 is now the least recently used
    assert await mirror.fetch("k0") and mirror.get("k0") is not None
    assert mirror.get("k4") is None and mirror.get("k3") is not None
    await km.set_status("k0", KeyStatus.REVOKED)  # followed like any change
    await mirror.refresh()
    record = mirror.get("k0")
    assert record is not None and record.status is KeyStatus.REVOKED
    await mirror.hold(["k1", "k2", ""])
    assert mirror.get("k1") and mirror.get("k2")

    asked: list[str] = []
    get = store.get

    async def counting(key_id: str) -> KeyRecord | None:
        asked.append(key_id)
        return await get(key_id)
    store.get = counting  # type: ignore[method-assign]
    assert not await mirror.fetch("nobody") and not await mirror.fetch("nobody")
    assert asked == ["nobody"]  # an unknown id is asked for once a second, not per Check
    await km.issue("nobody")
    await mirror.refresh()  # ...but a key issued since arrives by the change feed
    assert mirror.get("nobody") is not None
    # asked while held (nothing new), evicted since: fetched again at once, not refused for
    # a second (a key in use came back 401 under churn)
    assert not await mirror.fetch("nobody")  # held already: nothing new
    for other in ("n1", "n2", "n3"):
        await km.issue(other)
    await mirror.refresh()  # three new keys: the mirror holds only them now
    assert mirror.get("nobody") is None
    assert await mirror.fetch("nobody") and mirror.get("nobody") is not None


async def test_a_full_collection_walks_no_record_and_few_bindings(
        store: KeyStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """A mirror holds up to 100,000 keys: as objects the collector tracks, every full
    collection walked them all (0.36 s). Its records are plain tuples the collector stops
    tracking, only the bindings last used stay built, and a dropped one is rebuilt the same."""
    monkeypatch.setattr(mirror_module, "BINDINGS_HELD", 2)
    m = parse(offline_manifest())
    org, project = m.organizations[0].id, m.organizations[0].projects[0].id
    km = KeyManager(store, PEPPER)
    await store.put_object(runtime.CLIENT, "rc", json.dumps(
        {"org": org, "project": project, "client": {"id": "rc", "user": {"role": "dev"}}}),
        KeyEvent("rc", "create", datetime.now(UTC), "test", "", kind="client"), create=True)
    for i in range(4):
        await km.issue(f"rk{i}", spec=json.dumps({"org": org, "project": project,
                                                  "client": "rc", "key": {"id": f"rk{i}"}}))
    mirror = KeyMirror(store)
    await mirror.refresh()
    first = [mirror.binding(m, f"rk{i}") for i in range(4)]
    assert all(b is not None and b.client.user.role == "dev" for b in first)
    assert list(mirror._bindings) == ["rk2", "rk3"]  # the two used last
    gc.collect()
    assert not any(gc.is_tracked(held) for held in mirror._keys.values())
    assert mirror.binding(m, "rk3") is first[3]  # held: not rebuilt
    again = mirror.binding(m, "rk0")  # dropped: rebuilt, equal
    assert again is not first[0] and again == first[0]
    record = mirror.get("rk0")
    assert record is not None and record.status is KeyStatus.ACTIVE and record.spec
