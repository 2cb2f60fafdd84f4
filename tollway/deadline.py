"""Has the caller stopped waiting? Envoy sends its own timeout as the gRPC deadline; a Check or
a rate-limit call that finishes past it is answered to no one (Envoy has already refused the
request with 503), so what it reserved must be given back."""

from __future__ import annotations

import grpc

MARGIN = 0.005  # seconds: an answer this close to the deadline will not arrive in time


def past_deadline(context: grpc.aio.ServicerContext | None) -> bool:
    remaining = context.time_remaining() if context is not None else None
    return remaining is not None and remaining <= MARGIN
