"""The wrong-secret throttle: per key id, a sliding minute, an honest Retry-After."""

from __future__ import annotations

from extauthz.guessing import GuessThrottle


def test_past_the_limit_wrong_secrets_wait_for_the_window() -> None:
    t = GuessThrottle(limit=3, window=60)
    assert [t.wrong_secret("k", now) for now in (0, 1, 2)] == [None] * 3
    assert t.wrong_secret("k", 10) == 50  # the oldest failure counted leaves the window at 60
    assert t.wrong_secret("other", 10) is None  # per key id
    # at 61 the failures at 0 and 1 have left the minute: 2, 10, 61 are within the limit
    assert t.wrong_secret("k", 61) is None
    assert t.wrong_secret("k", 62) is None  # and the one at 2, at 62: 10, 61, 62
    assert t.wrong_secret("k", 63) == 7  # 10, 61, 62, 63: over, until 10 leaves at 70
    assert t.wrong_secret("k", 1000) is None  # a quiet minute forgives
