"""Repeated wrong secrets for one key id: throttled, counted, and never a lock-out.

A key's secret is 32 random bytes, so guessing it online is hopeless; what a flood of wrong
secrets does do is load the gateway and hide in the logs. So past GUESS_LIMIT wrong secrets
for one key id within GUESS_WINDOW seconds, a wrong secret for it is answered 429
`too_many_failed_attempts` (Retry-After: what is left of the window) instead of 401, and
counted. The real holder is never locked out: the secret is still verified first, and a right
one passes whatever the count. Counted per replica, in memory, for key ids the manifest
declares only (a flood of made-up ids cannot grow it).
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque

from prometheus_client import Counter

log = logging.getLogger("tollway.extauthz.guessing")

WRONG_SECRETS = Counter("tollway_extauthz_wrong_secrets_total",
                        "Wrong secrets presented for a declared key id", ["result"])  # refused,
# throttled

GUESS_LIMIT = 10
GUESS_WINDOW = 60.0


class GuessThrottle:
    def __init__(self, limit: int = GUESS_LIMIT, window: float = GUESS_WINDOW) -> None:
        self.limit, self.window = limit, window
        self._failures: dict[str, deque[float]] = {}

    def wrong_secret(self, key_id: str, now: float | None = None) -> int | None:
        """Record a wrong secret; returns the seconds to wait when the key id is throttled,
        None while it is not."""
        now = time.monotonic() if now is None else now
        failures = self._failures.setdefault(key_id, deque())
        while failures and failures[0] <= now - self.window:
            failures.popleft()
        failures.append(now)
        if len(self._failures) > 10_000:  # forget idle key ids
            self._failures = {k: v for k, v in self._failures.items()
                              if v and v[-1] > now - self.window}
        if len(failures) <= self.limit:
            WRONG_SECRETS.labels("refused").inc()
            return None
        WRONG_SECRETS.labels("throttled").inc()
        if len(failures) == self.limit + 1:
            log.warning("key %s: more than %d wrong secrets in %d s: throttled", key_id,
                        self.limit, int(self.window))
        while len(failures) > self.limit + 1:  # only the newest limit + 1 matter
            failures.popleft()
        return max(1, math.ceil(failures[0] + self.window - now))
