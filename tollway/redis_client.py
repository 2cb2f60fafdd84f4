"""The one way Tollway's services talk to Redis (rate-limit counters and spend alike)."""

from __future__ import annotations

import asyncio
from typing import Any

import hiredis
import redis.asyncio as redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError
from redis.exceptions import TimeoutError as RedisTimeoutError

CLUSTER_SCHEME = "redis+cluster://"  # any one node of a Redis Cluster; the client finds the rest


def connect(url: str, *, timeout: float = 0.25, max_connections: int = 64) -> Any:
    """A Redis client (a RedisCluster for a redis+cluster:// URL: every key Tollway writes
    carries its org as a hash tag, so each script's keys share one slot).

    A bounded pool that makes a burst wait (up to `timeout`) for a free connection, and
    short socket timeouts: a slow Redis must turn into the route's fail-open/closed answer
    quickly, not into Envoy's own timeout. A command that finds its pooled connection closed
    (Redis restarted since) is sent once more on a fresh one; a timeout is not retried."""
    # only a closed connection: Retry's default set includes timeouts, which would double a
    # slow Redis's wait past Envoy's own deadline
    retry = Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,))
    if url.startswith(CLUSTER_SCHEME):
        # its per-node pools refuse (MaxConnectionsError) rather than wait when full: room
        # for a burst of every request in flight, opened only as they are needed
        return redis.RedisCluster.from_url(
            "redis://" + url[len(CLUSTER_SCHEME):], max_connections=max_connections * 16,
            socket_timeout=timeout, socket_connect_timeout=timeout, retry=retry)
    pool = redis.BlockingConnectionPool.from_url(
        url, max_connections=max_connections, timeout=timeout, socket_timeout=timeout,
        socket_connect_timeout=timeout, retry_on_timeout=False, retry=retry)
    return redis.Redis.from_pool(pool)  # its own: closing the client disconnects the pool


def counter_store_url(spec: str) -> str | None:
    """`storage.counters` resolved: None for the in-process store, else a redis:// URL."""
    from tollway.refs import resolve_dsn

    url = resolve_dsn(spec)
    if url == "memory":
        return None
    if url.startswith(("redis://", "rediss://", CLUSTER_SCHEME)):
        return url
    raise ValueError(f"unsupported counter store {spec!r}: use memory, redis://HOST:PORT/DB or "
                     f"{CLUSTER_SCHEME}HOST:PORT")


class Lane:
    """Script calls on a request's path, each on a connection of the lane's own.

    redis-py's way to a command takes a connection from the pool (checking it for unread
    data), wraps the call in its retry and its metrics, and only then writes. Made after a
    pause, as at 100 requests/s, when none of that is in the CPU's caches any more, this costs
    the loop 40-130 µs of CPU more than the write and the read themselves
    (docs/performance.md, "A lane of connections for the request path"). The lane keeps
    redis-py's connections, so AUTH, TLS, the database, reading the answer and reconnecting
    stay redis-py's; it only leaves out the way to them: a free connection taken, the
    script's EVALSHA written, its answer read, the connection put back.

    One timeout bounds the whole call: connecting, writing, reading, and the second send
    after a closed connection. The lane's connections have no timeout of their own, so
    redis-py writes without the task `asyncio.wait_for` makes for each send and reads without
    a timer of its own: 60-140 µs less of a cold call's CPU again.

    As the pool's way does, a call that finds its connection closed (Redis restarted since)
    is sent once more, reconnected; a timeout is not. Whatever else the lane does not know
    goes the client's way: a script Redis does not know (loaded there), every one of the
    lane's connections busy, a Redis Cluster (its client routes each call to a node)."""

    def __init__(self, client: Any, size: int, timeout: float) -> None:
        self.client = client
        self.size = size
        self.timeout = timeout
        self.free: list[Any] = []  # connections not in a call, connected or not
        self.opened = 0
        self.direct = isinstance(client, redis.Redis)
        self.closed = False

    async def run(self, script: Any, keys: list[str], args: list[Any]) -> Any:
        """`script(keys=keys, args=args)`, by the lane where it can."""
        if not self.direct or self.closed or (not self.free and self.opened >= self.size):
            return await script(keys=keys, args=args)
        if self.free:
            conn = self.free.pop()
        else:
            pool = self.client.connection_pool
            conn = pool.connection_class(**{**pool.connection_kwargs, "socket_timeout": None})
            self.opened += 1
        # packed by hiredis alone: redis-py's packer first runs each argument through its
        # encoder in Python, six times the time for the 30-odd arguments of a hold and charge,
        # to the same bytes for the str and int arguments Tollway's scripts take
        command = [hiredis.pack_command(("EVALSHA", script.sha, len(keys), *keys, *args))]
        try:
            async with asyncio.timeout(self.timeout):
                try:
                    return await self._call(conn, command)
                except RedisConnectionError:  # closed since: sent once more, reconnected
                    return await self._call(conn, command)
        except NoScriptError:
            pass  # an error's answer, read whole: the connection stays as it was
        except TimeoutError as e:  # the timeout's, not redis-py's: said as redis-py says it
            raise RedisTimeoutError(f"no answer from Redis in {self.timeout:g} s") from e
        finally:
            # after any other error (a timeout, a cancelled call) redis-py has disconnected
            # it, so an answer still to come is never read as the next call's
            if self.closed:  # closed while this call was in flight: nobody will take it
                await conn.disconnect()
            else:
                self.free.append(conn)
        return await script(keys=keys, args=args)  # Redis restarted or flushed: loaded again

    @staticmethod
    async def _call(conn: Any, command: list[bytes]) -> Any:
        await conn.send_packed_command(command, check_health=False)
        return await conn.read_response()

    async def close(self) -> None:
        """Disconnects the free connections; one in a call is disconnected when its call
        ends, and calls after this go the client's way."""
        self.closed = True
        for conn in self.free:
            await conn.disconnect()
        self.free.clear()
