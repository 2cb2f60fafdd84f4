"""Tokens → money, with the rate card in force. Exact decimals; no float ever touches money.

Priced as the providers' pricing documentation states it:
- OpenAI (chat, completions, responses, embeddings): input (prompt) tokens include the cached
  ones, so the uncached part is input - cached, at the input price; cached at the cached-input
  price; output tokens include the reasoning tokens, all at the output price. Reasoning tokens
  are recorded apart only so that a bill can show them.
- Anthropic: input tokens exclude cache reads and writes; reads at the cached-input price; cache
  writes at the cache-write price (5-minute writes: 1.25x input; 1-hour writes, counted apart in
  `cache_creation.ephemeral_1h_input_tokens`: 2x input, unless the rate card says otherwise).
"""

from __future__ import annotations

from decimal import Decimal
from typing import NamedTuple

from tollway.manifest.model import Dialect, RateCard

MILLION = Decimal(1_000_000)


class Usage(NamedTuple):
    """A request's tokens as the provider reported them (a tuple: costsink makes one per
    access-log entry, and a frozen dataclass's __init__ costs twice a tuple's)."""

    input_tokens: int = 0
    output_tokens: int = 0  # reasoning included, as both providers count and bill them
    cached_input_tokens: int = 0
    cache_creation_tokens: int = 0  # every cache write, 1-hour ones included
    cache_creation_1h_tokens: int = 0
    reasoning_tokens: int = 0

    def total(self, dialect: Dialect) -> int:
        """Tokens as TPM counts them: everything the provider processed."""
        extra = self.cached_input_tokens + self.cache_creation_tokens \
            if dialect is Dialect.ANTHROPIC else 0
        return self.input_tokens + extra + self.output_tokens


def price(card: RateCard | None, provider: str, model: str, dialect: Dialect,
          usage: Usage) -> Decimal | None:
    """The cost in the card's currency, or None when the model is not on the card."""
    if card is None:
        return None
    p = card.price_of(provider, model)
    if p is None:
        return None
    cached_price = p.cached_input if p.cached_input is not None else p.input
    if dialect is Dialect.ANTHROPIC:
        uncached = usage.input_tokens
        writes_1h = min(usage.cache_creation_1h_tokens, usage.cache_creation_tokens)
        writes = (Decimal(usage.cache_creation_tokens - writes_1h) * p.cache_write
                  + Decimal(writes_1h) * p.cache_write_1h)
    else:
        uncached = max(0, usage.input_tokens - usage.cached_input_tokens)
        writes = Decimal(0)
    return (Decimal(uncached) * p.input + Decimal(usage.cached_input_tokens) * cached_price
            + writes + Decimal(usage.output_tokens) * p.output) / MILLION


def max_cost(card: RateCard | None, provider: str, model: str, body_bytes: int,
             max_output_tokens: int) -> Decimal | None:
    """The most a request can cost: what a budget holds before the request is let through.

    Every token covers at least one byte of the request body, so `body_bytes` bounds the input
    tokens, each priced at most at the dearest of the input, cached-input and cache-write
    prices; the output is bounded by `max_tokens` or the model's cap. None: the model is not
    priced.
    """
    if card is None:
        return None
    p = card.price_of(provider, model)
    if p is None:
        return None
    top_input = max(p.input, p.cached_input or Decimal(0), p.cache_write, p.cache_write_1h)
    return (Decimal(body_bytes) * top_input + Decimal(max_output_tokens) * p.output) / MILLION
