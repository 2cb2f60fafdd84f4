"""The one way Tollway's services talk to Redis (rate-limit counters and spend alike)."""

from __future__ import annotations

import redis.asyncio as redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError


def connect(url: str, *, timeout: float = 0.25, max_connections: int = 64) -> redis.Redis:
    """A bounded pool that makes a burst wait (up to `timeout`) for a free connection, and
    short socket timeouts: a slow Redis must turn into the route's fail-open/closed answer
    quickly, not into Envoy's own timeout. A command that finds its pooled connection closed
    (Redis restarted since) is sent once more on a fresh one; a timeout is not retried."""
    pool = redis.BlockingConnectionPool.from_url(
        url, max_connections=max_connections, timeout=timeout, socket_timeout=timeout,
        socket_connect_timeout=timeout, retry_on_timeout=False,
        # only a closed connection: Retry's default set includes timeouts, which would
        # double a slow Redis's wait past Envoy's own deadline
        retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)))
    return redis.Redis(connection_pool=pool)


def counter_store_url(spec: str) -> str | None:
    """`storage.counters` resolved: None for the in-process store, else a redis:// URL."""
    from tollway.refs import resolve_dsn

    url = resolve_dsn(spec)
    if url == "memory":
        return None
    if url.startswith(("redis://", "rediss://")):
        return url
    raise ValueError(f"unsupported counter store {spec!r}: use memory or redis://")
