"""The one way Tollway's services talk to Redis (rate-limit counters and spend alike)."""

from __future__ import annotations

from typing import Any

import redis.asyncio as redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

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
    return redis.Redis(connection_pool=pool)


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
