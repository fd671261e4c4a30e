"""The README's demo command, end to end through the CLI (synthetic -> local Ray -> cache -> train)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cameo_corr.cache.reader import CorrCache
from cameo_corr.cache.verify import verify_cache
from cameo_corr.train.loop import checkpoint_dirs

pytestmark = pytest.mark.slow


def _run(out: Path, steps: int, scenes: int = 2) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "cameo_corr.cli", "demo", "--out", str(out), "--scenes", str(scenes), "--frames", "8",
           "--size", "64", "--windows-per-scene", "2", "--workers", "1", "--steps", str(steps), "--no-progress"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def _demo(out: Path, steps: int) -> dict:
    proc = _run(out, steps)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "train:" not in proc.stderr and "step/s" not in proc.stderr, "--no-progress must silence the training bar too"
    return json.loads((out / "summary.json").read_text())


def test_demo_runs_end_to_end_and_resumes(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    first = _demo(out, steps=2)
    assert first["preprocess"]["windows_ok"] == 4 and first["preprocess"]["windows_failed"] == 0
    assert first["cache"] == {"windows": 4, "verify": "ok"}
    assert first["train"]["step"] == 2 and first["train"]["diffusion"] > 0
    png = Path(first["viz"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    cache = CorrCache(out / "cache")
    assert cache.config.grid == (8, 8) and cache.config.views == 4
    assert verify_cache(cache) == []
    assert checkpoint_dirs(out / "train")

    again = _demo(out, steps=3)  # same --out: nothing recomputed, training continues from step 2
    assert again["preprocess"]["windows_ok"] == 0 and again["preprocess"]["windows_skipped"] == 4
    assert again["train"]["step"] == 3
    assert CorrCache(out / "cache").window_ids() == cache.window_ids()

    other = _run(out, steps=3, scenes=3)  # other settings in the same --out: refused, nothing touched
    assert other.returncode == 2 and "Traceback" not in other.stderr, other.stderr[-3000:]
    assert "cameo-corr demo: error: this output directory holds a demo made with --scenes 2 (now 3)" in other.stderr
    assert CorrCache(out / "cache").window_ids() == cache.window_ids()
