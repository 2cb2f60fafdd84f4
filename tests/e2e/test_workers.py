"""services.workers: several `tollway serve` processes (one core each) behind one Envoy, which
spreads the Checks over them; the rate limit stays exact across them (Redis counters)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml

from .harness import PrivateRedis, run_gateway

pytestmark = pytest.mark.e2e


def checks_served(metrics_port: int) -> float:
    text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).text
    return sum(float(v) for v in re.findall(
        r'^tollway_extauthz_decisions_total\{[^}]*\} ([0-9.e+]+)$', text, re.M))


@pytest.mark.parametrize("rate_limit", ["filter", "check"])
def test_two_workers_share_the_checks_and_one_set_of_limits(tmp_path: Path,
                                                            rate_limit: str) -> None:
    """Charged by the rate-limit filter's calls or in the Checks, spread over both workers."""
    redis = PrivateRedis(tmp_path)
    redis.start()

    def mutate(doc: dict[str, Any]) -> None:
        doc["services"]["workers"] = 2
        doc["services"]["rate_limit"] = rate_limit
        doc["storage"]["counters"] = f"redis://127.0.0.1:{redis.port}/0"
        doc["organizations"][0]["projects"][0]["quotas"] = [{"name": "thirty", "rpm": 30}]

    try:
        with run_gateway(tmp_path, mutate=mutate, split=True) as gw:
            client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=gw.issue("k-main"),
                                   max_retries=0)
            outcomes = []
            for _ in range(40):
                try:
                    client.chat.completions.create(model="gpt-5.4-mini", messages=[
                        {"role": "user", "content": "hi"}])
                    outcomes.append(200)
                except openai.RateLimitError:
                    outcomes.append(429)
            assert outcomes == [200] * 30 + [429] * 10
            metrics = yaml.safe_load(gw.manifest_path.read_text())["services"]["metrics_port"]
            served = [checks_served(metrics), checks_served(metrics + 1)]
            # Envoy balances round robin over the workers' ports
            assert all(n >= 15 for n in served), served
    finally:
        redis.kill()
