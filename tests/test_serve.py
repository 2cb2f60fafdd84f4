"""`tollway serve` refuses a split that would lose spend."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_memory_counters_need_extauthz_and_costsink_in_one_process(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "tollway.cli", "serve", "--manifest",
         str(ROOT / "examples" / "quickstart.yaml"), "--services", "extauthz"],
        capture_output=True, text=True, cwd=ROOT, timeout=60,
        env={"PATH": "/usr/bin:/bin", "TOLLWAY_STATE_DIR": str(tmp_path)})
    assert out.returncode != 0
    assert "extauthz and costsink must be served together" in out.stderr
    assert "use redis://" in out.stderr


def test_memory_counters_and_the_rate_limit_in_the_check_need_extauthz_beside_ratelimit(
        tmp_path: Path) -> None:
    """extauthz would charge counters that ratelimit's Settle and Usage never see."""
    import yaml

    doc = yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text())
    doc.setdefault("services", {})["rate_limit"] = "check"
    manifest = tmp_path / "manifest.yaml"
    manifest.write_text(yaml.safe_dump(doc))
    out = subprocess.run(
        [sys.executable, "-m", "tollway.cli", "serve", "--manifest", str(manifest),
         "--services", "extauthz,costsink"],
        capture_output=True, text=True, cwd=ROOT, timeout=60,
        env={"PATH": "/usr/bin:/bin", "TOLLWAY_STATE_DIR": str(tmp_path)})
    assert out.returncode != 0
    assert "extauthz and ratelimit must be served together" in out.stderr
