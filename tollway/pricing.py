"""Tokens → money, with the rate card in force. Exact decimals; no float ever touches money.

Dialects count input differently: OpenAI's input (prompt) tokens include the cached ones, so the
uncached part is input - cached; Anthropic's input tokens exclude cache reads and writes. Cache
writes (Anthropic's cache_creation_input_tokens) are priced at the input price: the rate card has
no separate write price yet.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

from tollway.manifest.model import Dialect, RateCard

MILLION = Decimal(1_000_000)


@dataclass(frozen=True)
class Usage:
    input_tokens: int = 0
    output_tokens: int = 0
    cached_input_tokens: int = 0
    cache_creation_tokens: int = 0

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
    p = next((p for p in card.prices if p.provider == provider and p.model == model), None)
    if p is None:
        return None
    cached_price = p.cached_input if p.cached_input is not None else p.input
    if dialect is Dialect.ANTHROPIC:
        uncached = usage.input_tokens + usage.cache_creation_tokens
    else:
        uncached = max(0, usage.input_tokens - usage.cached_input_tokens)
    return (Decimal(uncached) * p.input + Decimal(usage.cached_input_tokens) * cached_price
            + Decimal(usage.output_tokens) * p.output) / MILLION


def max_cost(card: RateCard | None, provider: str, model: str, body_bytes: int,
             max_output_tokens: int) -> Decimal | None:
    """The most a request can cost: what a budget holds before the request is let through.

    Every token covers at least one byte of the request body, so `body_bytes` bounds the input
    tokens (whether cached, written to a cache or not: none is priced above the input price);
    the output is bounded by `max_tokens` or the model's cap. None: the model is not priced.
    """
    if card is None:
        return None
    p = next((p for p in card.prices if p.provider == provider and p.model == model), None)
    if p is None:
        return None
    top_input = max(p.input, p.cached_input or Decimal(0))
    return (Decimal(body_bytes) * top_input + Decimal(max_output_tokens) * p.output) / MILLION
