"""The README's demo command, end to end through the CLI (synthetic -> local Ray -> cache -> train)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cameo_corr.pipeline.cache import CorrCache
from cameo_corr.pipeline.cache_tools import verify_cache
from cameo_corr.train.loop import checkpoint_dirs

pytestmark = pytest.mark.slow


def _demo(out: Path, steps: int) -> dict:
    cmd = [sys.executable, "-m", "cameo_corr.cli", "demo", "--out", str(out), "--scenes", "2", "--frames", "8",
           "--size", "64", "--windows-per-scene", "2", "--workers", "1", "--steps", str(steps), "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / "summary.json").read_text())


def test_demo_runs_end_to_end_and_resumes(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    first = _demo(out, steps=3)
    assert first["preprocess"]["windows_ok"] == 4 and first["preprocess"]["windows_failed"] == 0
    assert first["cache"] == {"windows": 4, "verify": "ok"}
    assert first["train"]["step"] == 3 and first["train"]["diffusion"] > 0
    png = Path(first["viz"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    cache = CorrCache(out / "cache")
    assert cache.config.grid == (8, 8) and cache.config.views == 4
    assert verify_cache(cache) == []
    assert checkpoint_dirs(out / "train")

    again = _demo(out, steps=5)  # same --out: nothing recomputed, training continues from step 3
    assert again["preprocess"]["windows_ok"] == 0 and again["preprocess"]["windows_skipped"] == 4
    assert again["train"]["step"] == 5
    assert CorrCache(out / "cache").window_ids() == cache.window_ids()
