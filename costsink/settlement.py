"""Token settlement: each newly recorded request's token reservation corrected to its usage.

The Check (or the rate-limit filter) charged a request's tpm quotas its reservation, the prompt
estimated from its size plus the most the model may answer; once the request is recorded, the
difference to the tokens it used is given back (or charged), in the bucket the reservation was
charged in. Beside ratelimit, or with counters in Redis, that is made here, a batch in one call
to the counters; only memory counters held by a ratelimit in another process are settled
through its TokenSettlement service, a call each.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import grpc

from ratelimit.admission import Reservation
from tollway._proto import settle_pb2, settle_pb2_grpc
from tollway.manifest import Manifest
from tollway.reload import Live
from tollway.serve import ServiceContext
from tollway.tls import ServiceChannel, target

from .entry import Entry

log = logging.getLogger("tollway.costsink")

SETTLE_TIMEOUT = 2.0  # a token settlement slower than this is left undone, and logged

# settles a batch's reservations in this process, at once (ratelimit.admission.settle_many)
SettleHere = Callable[[list[Reservation]], Awaitable[object]]


def _reservation(item: Entry) -> tuple[int, int] | None:
    """The tokens reserved for the entry's request and when they were charged (ms), from the
    rate limit's metadata; None, logged, where that metadata cannot be read."""
    try:
        return (int(float(item.ratelimit["reserved_tokens"])),
                int(float(item.ratelimit["charged_at_ms"])))
    except (KeyError, TypeError, ValueError):
        log.warning("cannot settle %s: its reservation reads %r", item.row.request_id,
                    item.ratelimit)
        return None


class TokenSettler:
    """`settle_here`: ratelimit's settlement in this process; None: its Settle, called."""

    def __init__(self, manifest: Live[Manifest], settle_here: SettleHere | None = None) -> None:
        self.manifest = manifest
        self.settle_here = settle_here
        self._channel: ServiceChannel | None = None
        self._settle: tuple[grpc.aio.Channel, settle_pb2_grpc.TokenSettlementStub] | None = None

    async def settle(self, due: list[Entry]) -> None:
        """Settle each entry's token reservation, all at once: in this process, one call to
        the counters for the batch; through Settle, a call each. What fails or takes more
        than SETTLE_TIMEOUT is logged, not retried (its reservation's window ends anyway)."""
        if not due:
            return
        if self.settle_here is None:
            await asyncio.gather(*(self._settle_by_call(item) for item in due))
            return
        reservations: list[Reservation] = []
        for item in due:
            reservation = _reservation(item)
            if reservation is not None:
                reserved, charged_at = reservation
                reservations.append((item.row.key_id or "", item.row.model or "", reserved,
                                     item.actual_tokens, charged_at))
        if not reservations:
            return
        try:
            async with asyncio.timeout(SETTLE_TIMEOUT):
                await self.settle_here(reservations)
        except TimeoutError:
            log.warning("settling %d entries took more than %.0f s; left unsettled",
                        len(reservations), SETTLE_TIMEOUT)
        except Exception as e:  # the counters down: as failed Settle calls
            log.warning("could not settle %d entries: %s", len(reservations), e)

    async def _settle_by_call(self, item: Entry) -> None:
        """Settle through ratelimit's TokenSettlement service, running in another process."""
        row, reservation = item.row, _reservation(item)
        if reservation is None:
            return
        reserved, charged_at = reservation
        try:
            await self._stub().Settle(settle_pb2.SettleRequest(
                key_id=row.key_id, model=row.model, reserved_tokens=reserved,
                actual_tokens=item.actual_tokens, charged_at_ms=charged_at),
                timeout=SETTLE_TIMEOUT)
        except grpc.aio.AioRpcError as e:
            log.warning("could not settle %s: %s", row.request_id, e.details())

    def _stub(self) -> settle_pb2_grpc.TokenSettlementStub:
        """Settle is served only to holders of a client certificate (with services.tls); the
        stub lasts as long as its channel (a new one after a certificate rotation)."""
        services = self.manifest.value.services
        if self._channel is None:
            self._channel = ServiceChannel(target(*services.ratelimit), services.tls)
        channel = self._channel.get()
        if self._settle is None or self._settle[0] is not channel:
            self._settle = (channel, settle_pb2_grpc.TokenSettlementStub(channel))
        return self._settle[1]

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()


def settler_for(ctx: ServiceContext, manifest: Live[Manifest]) -> TokenSettler:
    """In this process beside ratelimit, or apart from it with counters in Redis, which this
    process reaches as ratelimit does (not a call into the Checks' process per charged
    request); only memory counters held by a ratelimit in another process need its Settle."""
    if "ratelimit" not in ctx.hosted and ctx.manifest.storage.counters == "memory":
        return TokenSettler(manifest)
    from ratelimit.admission import settle_many

    backend, keys = ctx.counter_backend(), ctx.key_mirror()

    async def settle_here(reservations: list[Reservation]) -> int:
        return await settle_many(backend, keys, manifest.value, reservations)
    return TokenSettler(manifest, settle_here)
