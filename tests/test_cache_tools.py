"""``cameo-corr cache stats|verify|viz`` on caches made by the real writer (and the real pipeline)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import zarr

from cameo_corr.cli import main as cli_main
from cameo_corr.pipeline.cache import CacheWriter, CorrCache, WindowOutcome, shard_dir
from cameo_corr.pipeline.cache_tools import cache_stats, check_window_consistency, format_stats, verify_cache
from test_cache import GRID, config, outcomes, record, token_arrays


@pytest.fixture
def small_cache(tmp_path):
    path = tmp_path / "cache"
    writer = CacheWriter(path, config())
    writer.initialize()
    writer.write_shard("s1", outcomes([0, 1, 2], failed=(1,)))
    writer.write_shard("s2", outcomes([3, 4]))
    return path


def test_stats(small_cache, capsys):
    stats = cache_stats(CorrCache(small_cache))
    assert stats["windows_ok"] == 4 and stats["windows_failed"] == 1 and stats["shards"] == 2
    assert stats["scenes_ok"] == 2 and stats["failure_reasons"] == {"DatasetError": 1}
    assert sum(stats["mask_frac_histogram"]["counts"]) == 4
    assert stats["bytes_shards"] > 0 and stats["bytes_per_window"] == stats["bytes_shards"] / 4
    text = format_stats(stats)
    assert "4 ok, 1 failed" in text and "DatasetError x1" in text
    assert cli_main(["cache", "stats", str(small_cache), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["windows_ok"] == 4


def test_verify_clean(small_cache, capsys):
    assert verify_cache(CorrCache(small_cache)) == []
    assert cli_main(["cache", "verify", str(small_cache)]) == 0
    assert "ok: 4 of 4 windows verified" in capsys.readouterr().out


def _edit(path, shard, name, fn):
    arr = zarr.open_array(str(path / shard_dir(shard) / name), mode="r+")
    data = arr[...]
    fn(data)
    arr[...] = data


def test_verify_finds_broken_mask_and_diagonal(small_cache, capsys):
    cache = CorrCache(small_cache)
    row = cache.row(record(3).window_id)["row"]

    def flip_mask(m):
        a = token_arrays(3)
        # a valid query of view 0 whose cycle to view 1 fails: set its mask
        x = int(np.flatnonzero(a["valid"][0].ravel() & ~a["mask"][0, 1])[0])
        m[row, 0, 1, x] = True

    _edit(small_cache, "s2", "mask", flip_mask)
    _edit(small_cache, "s2", "nn", lambda nn: nn.__setitem__((row, 2, 2, 0), 5))
    problems = verify_cache(CorrCache(small_cache))
    text = "\n".join(problems)
    assert "nn[2,2] is not the identity" in text
    assert "mask[0,1] disagrees with the cycle test" in text
    assert all(record(3).window_id in p for p in problems)
    assert cli_main(["cache", "verify", str(small_cache)]) == 1
    assert "problem(s)" in capsys.readouterr().err


def test_verify_finds_manifest_shard_mismatch(small_cache):
    import shutil

    shutil.rmtree(small_cache / shard_dir("s1"))
    grp = zarr.open_group(str(small_cache / shard_dir("s2")), mode="r+")
    grp.attrs["window_ids"] = ["x", "y"]
    problems = verify_cache(CorrCache(small_cache))
    assert any("shard listed in the manifest is missing" in p for p in problems)
    assert any("shard row holds window x" in p for p in problems)


def test_verify_finds_schema_errors(tmp_path):
    path = tmp_path / "c"
    writer = CacheWriter(path, config())
    writer.initialize()
    writer.write_shard("s", outcomes([0]))
    _edit(path, "s", "nn", lambda nn: nn.__setitem__((0, 0, 1, 0), 999))
    problems = verify_cache(CorrCache(path))
    assert any("field 'nn': indices outside the token grid" in p for p in problems)


def test_consistency_check_on_reference_arrays():
    assert check_window_consistency(token_arrays(7), 1.5, GRID) == []
    a = token_arrays(7)
    a["dist"][1, 1, 0] = 1.0
    assert check_window_consistency(a, 1.5, GRID) == ["dist[1,1] is not 0"]


def test_cli_registered():
    from cameo_corr.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["cache", "viz", "c", "--out", "x.png", "--pair", "1", "2"])
    assert args.pair == [1, 2] and args.func.__name__ == "_viz"
