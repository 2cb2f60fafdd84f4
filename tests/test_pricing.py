"""Prices as the providers publish them: OpenAI's input includes cached tokens and its output
includes reasoning; Anthropic counts cache reads and 5-minute and 1-hour writes apart. And the
estimate charged when the provider's usage never reached the gateway."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from costsink.entry import estimated_usage
from tollway.manifest import loads
from tollway.manifest.model import Dialect
from tollway.metadata import Namespace, to_struct
from tollway.pricing import Usage, max_cost, price

MANIFEST = loads("""
version: 1
providers:
  - {name: openai, dialect: openai, upstream: {host: api.openai.com}, credential: env:K,
     models: [{name: gpt-5.4, max_output_tokens: 4096}]}
  - {name: anthropic, dialect: anthropic, upstream: {host: api.anthropic.com}, credential: env:K,
     models: [{name: claude-haiku}, {name: claude-custom}]}
routes: [{path: /v1/chat/completions, provider: openai}]
rate_card:
  version: v1
  prices:
    - {provider: openai, model: gpt-5.4, input: 2.50, output: 15, cached_input: 0.25}
    - {provider: anthropic, model: claude-haiku, input: 1, output: 5, cached_input: 0.10}
    - {provider: anthropic, model: claude-custom, input: 1, output: 5, cache_write: 1.5,
       cache_write_1h: 3}
organizations: [{id: acme, projects: [{id: p, clients: [{id: c, keys: [{id: k}]}]}]}]
""")


def ns(values: dict[str, Any]) -> Namespace:
    """A metadata namespace as an access-log entry carries it."""
    return Namespace(to_struct(values))
CARD = MANIFEST.rate_card
M = Decimal(1_000_000)


def test_openai_cached_input_is_part_of_input_and_reasoning_part_of_output() -> None:
    u = Usage(input_tokens=2000, cached_input_tokens=1024, output_tokens=300,
              reasoning_tokens=200)
    want = (976 * Decimal("2.50") + 1024 * Decimal("0.25") + 300 * 15) / M
    assert price(CARD, "openai", "gpt-5.4", Dialect.OPENAI, u) == want


def test_anthropic_cache_reads_and_writes_are_priced_apart() -> None:
    u = Usage(input_tokens=50, cached_input_tokens=1000, cache_creation_tokens=3000,
              cache_creation_1h_tokens=1000, output_tokens=10)
    # defaults: 5-minute writes at 1.25x input, 1-hour writes at 2x
    want = (50 * 1 + 1000 * Decimal("0.10") + 2000 * Decimal("1.25") + 1000 * 2 + 10 * 5) / M
    assert price(CARD, "anthropic", "claude-haiku", Dialect.ANTHROPIC, u) == want
    # write prices the card states win; without a cached price, reads cost the input price
    want = (50 * 1 + 1000 * 1 + 2000 * Decimal("1.5") + 1000 * 3 + 10 * 5) / M
    assert price(CARD, "anthropic", "claude-custom", Dialect.ANTHROPIC, u) == want


def test_the_budget_hold_covers_the_dearest_input_price() -> None:
    # a cache write is the dearest way to send a token to Anthropic
    assert max_cost(CARD, "anthropic", "claude-haiku", 1000, 10) == (1000 * 2 + 10 * 5) / M
    # OpenAI never charges writes: its hold is unchanged
    assert max_cost(CARD, "openai", "gpt-5.4", 1000, 10) == (1000 * Decimal("2.5") + 150) / M


def test_an_unseen_answer_is_estimated_from_the_request() -> None:
    # nothing reported, not streamed: input from the body's bytes, output at the cap asked
    u = estimated_usage(MANIFEST, "openai", "gpt-5.4", ns({}), ns({"max_tokens": 12}), 4001,
                        False)
    assert (u.input_tokens, u.output_tokens) == (1001, 12)
    # no cap asked: the model's own
    u = estimated_usage(MANIFEST, "openai", "gpt-5.4", ns({}), ns({}), 40, False)
    assert u.output_tokens == 4096
    # a stream cut off after 5 events: about a token each, never above the cap
    u = estimated_usage(MANIFEST, "openai", "gpt-5.4", ns({"events": 5}), ns({"max_tokens": 12}),
                        40, True)
    assert u.output_tokens == 5
    u = estimated_usage(MANIFEST, "openai", "gpt-5.4", ns({"events": 50}),
                        ns({"max_tokens": 12}), 40, True)
    assert u.output_tokens == 12


def test_what_the_provider_did_report_is_kept() -> None:
    # Anthropic reports input and cache use in message_start, before a stream breaks
    md = {"input_tokens": 7, "cached_input_tokens": 1024, "cache_creation_input_tokens": 2048,
          "cache_creation_1h_tokens": 2048, "output_tokens": 1, "events": 4}
    u = estimated_usage(MANIFEST, "anthropic", "claude-haiku", ns(md), ns({"max_tokens": 100}),
                        9999, True)
    assert (u.input_tokens, u.cached_input_tokens, u.cache_creation_tokens,
            u.cache_creation_1h_tokens, u.output_tokens) == (7, 1024, 2048, 2048, 4)


def test_a_price_is_found_by_provider_and_model_alone() -> None:
    """The same model name at two providers, and a model a provider serves but the card does
    not price: each lookup finds its own line or none."""
    assert CARD is not None
    assert CARD.price_of("anthropic", "claude-haiku") == CARD.prices[1]
    assert CARD.price_of("openai", "claude-haiku") is None
    assert price(CARD, "openai", "claude-haiku", Dialect.OPENAI, Usage(10, 10)) is None
    assert max_cost(CARD, "openai", "gpt-5.4", 4, 1) == (Decimal(4) * Decimal("2.50")
                                                        + Decimal(15)) / M
