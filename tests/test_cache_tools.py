"""``cameo-corr cache stats|verify|viz`` on caches made by the real writer (and the real pipeline)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cameo_corr.cli import main as cli_main
from cameo_corr.cache.layout import shard_dir
from cameo_corr.cache.reader import CorrCache
from cameo_corr.cache.shard import shard_zip_bytes
from cameo_corr.cache.writer import CacheWriter, WindowOutcome
from cameo_corr.cache.stats import cache_stats, format_stats
from cameo_corr.cache.verify import check_window_consistency, verify_cache, verify_report
from test_cache import GRID, config, outcomes, record, token_arrays


@pytest.fixture
def small_cache(tmp_path):
    path = tmp_path / "cache"
    writer = CacheWriter(path, config())
    writer.initialize()
    writer.write_shard("s1", outcomes([0, 1, 2], failed=(1,)))
    writer.write_shard("s2", outcomes([3, 4]))
    return path


def test_stats_of_a_selection_give_its_windows_share_of_their_shards(small_cache):
    """Bytes per ok window of a selection: each selected window's share of its shard (the shard's
    recorded size over its ok windows), not the whole shard over the fewer selected windows."""
    from cameo_corr.cache.manifest import read_manifest
    from cameo_corr.cache.select import WindowSelection

    (small_cache.parent / "scenes.txt").write_text("scene1\n")  # window 3 only: one of the two ok windows of s2
    cache = CorrCache(small_cache)
    picked = cache_stats(cache, selection=WindowSelection(scenes_file=str(small_cache.parent / "scenes.txt")))
    rows = read_manifest(cache.location, columns=["shard", "shard_bytes", "status"]).to_pylist()
    s2 = {r["shard_bytes"] for r in rows if r["shard"] == "s2"}
    assert picked["windows_ok"] == 1 and s2 == {picked["bytes_shards"]}
    assert picked["bytes_per_window"] == picked["bytes_shards"] / 2


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
    report = verify_report(CorrCache(small_cache))
    assert report.problems == [] and report.checked == report.windows_ok == 4
    assert cli_main(["cache", "verify", str(small_cache)]) == 0
    assert "ok: 4 of 4 windows verified" in capsys.readouterr().out
    (small_cache / "shards" / ".tmp-0123456789abcdef-deadbeef.zarr.zip").write_bytes(b"partial")  # a killed writer's
    assert cli_main(["cache", "verify", str(small_cache)]) == 0  # not a problem of the data: a note
    out = capsys.readouterr()
    assert "ok: 4 of 4 windows verified" in out.out and out.err.startswith(f"cameo-corr cache verify: note: 1 orphan(s) of killed writers in {small_cache}")
    assert cli_main(["cache", "verify", str(small_cache), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["orphans"] == ["shards/.tmp-0123456789abcdef-deadbeef.zarr.zip"]


def _edit(path, shard, name=None, fn=None, attrs=None):
    """Rewrite a shard file with array ``name`` changed in place by ``fn`` and/or other window attrs."""
    cache = CorrCache(path)
    meta = cache.shard_windows(shard)
    data = cache.read_shard(shard)
    if fn is not None:
        fn(data[name])
    meta.update(attrs or {})
    (path / shard_dir(shard)).write_bytes(shard_zip_bytes(shard, meta, data, cache.config))


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
    (small_cache / shard_dir("s1")).unlink()
    _edit(small_cache, "s2", attrs={"window_ids": ["x", "y"]})
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


@pytest.fixture(scope="module")
def pipeline_cache(tmp_path_factory):
    """A cache of real synthetic windows computed in process by the same parts the Ray workers use."""
    synthetic = pytest.importorskip("cameo_corr.datasets.synthetic", reason="synthetic generator not available")
    match = pytest.importorskip("cameo_corr.pipeline.match", reason="token matcher not available")
    from cameo_corr.datasets.base import open_dataset
    from cameo_corr.datasets.canonical import CanonicalView, load_window
    from cameo_corr.pipeline.backends import make_backend
    from cameo_corr.cache.shard import window_arrays
    from cameo_corr.datasets.planner import PlanConfig, plan_windows
    from cameo_corr.schemas import CacheConfig

    tmp = tmp_path_factory.mktemp("pipe")
    root = synthetic.generate_dataset(tmp / "data", scenes=2, frames=8, image_size=96, seed=3)
    reader = open_dataset("synthetic", root)
    backend = make_backend("depth", device="cpu")
    view = CanonicalView(size=96, policy=reader.default_crop_policy)
    cfg = CacheConfig(grid=(12, 12), tau=1.5, views=4, backend=backend.describe(), crop=view.to_dict(), dataset=reader.describe())
    windows = plan_windows(reader, PlanConfig(views=4, windows_per_scene=2, policy="random"), cfg.fingerprint())
    outs = []
    for w in windows:
        data = load_window(reader, w.record, view, with_depth=True)
        result = backend(data)
        corr = match.correspond(result, grid=cfg.grid, tau=cfg.tau)
        outs.append(WindowOutcome(w.record, arrays=window_arrays(corr, result)))
    writer = CacheWriter(tmp / "cache", cfg)
    writer.initialize()
    writer.write_shard("s0", outs[:3])
    writer.write_shard("s1", outs[3:])
    return tmp / "cache"


def test_verify_accepts_real_matcher_output(pipeline_cache):
    cache = CorrCache(pipeline_cache)
    assert len(cache.window_ids()) == 4
    assert verify_cache(cache) == []
    stats = cache_stats(cache)
    assert stats["mask_frac_mean"] > 0.05 and stats["valid_frac_mean"] > 0.5


def test_viz_png(pipeline_cache, tmp_path, capsys):
    from PIL import Image

    cache = CorrCache(pipeline_cache)
    wid = cache.window_ids()[1]
    out = tmp_path / "viz" / "w.png"
    assert cli_main(["cache", "viz", str(pipeline_cache), "--window", wid, "--out", str(out), "--pair", "0", "2"]) == 0
    img = np.asarray(Image.open(out).convert("RGB"))
    assert img.shape[0] > 500 and img.shape[1] > 1000
    assert img.std() > 20, "the figure must show images, lines and heatmaps, not a blank canvas"
    with pytest.raises(ValueError, match="two different views"):
        from cameo_corr.cache.viz import render_viz

        render_viz(cache, wid, tmp_path / "x.png", pair=(1, 1))


def test_stats_bytes_recorded_at_write_time(small_cache):
    stats = cache_stats(CorrCache(small_cache))
    files = [small_cache / shard_dir(s) for s in ("s1", "s2")]
    assert stats["bytes_source"] == "recorded" and stats["bytes_shards"] == sum(f.stat().st_size for f in files)


def test_verify_max_windows_streams_and_deep_lists_corrupt_windows(small_cache, capsys):
    from test_cache import _flip_chunk_byte

    report = verify_report(CorrCache(small_cache), max_windows=1)
    assert report.problems == [] and report.checked == 1
    _flip_chunk_byte(small_cache / shard_dir("s2"), "dist")
    report = verify_report(CorrCache(small_cache), max_windows=1)  # only shard s1 visited
    assert report.problems == [] and report.checked == 1
    bad = [(record(i).window_id, "s2", "dist") for i in (3, 4)]  # one chunk holds both windows of s2
    report = verify_report(CorrCache(small_cache), max_windows=1, deep=True)
    assert report.corrupt == bad
    report = verify_report(CorrCache(small_cache))
    assert report.corrupt == bad and report.checked == 4
    assert len(report.problems) == 2 and "shard s2, array 'dist', window " + record(3).window_id in report.problems[0]
    assert cli_main(["cache", "verify", str(small_cache), "--deep"]) == 1
    err = capsys.readouterr().err
    assert record(3).window_id in err and "corrupt windows: 2" in err and "Traceback" not in err


def test_compact_cli(small_cache, capsys):
    assert cli_main(["cache", "compact", str(small_cache)]) == 0
    assert "5 rows in 1 file(s), 2 pending shard fragments merged" in capsys.readouterr().out
    assert cli_main(["cache", "compact", str(small_cache)]) == 0  # again: nothing pending (it said 2 again)
    assert "5 rows in 1 file(s), 0 pending shard fragments merged" in capsys.readouterr().out
    assert verify_cache(CorrCache(small_cache)) == []
    assert cache_stats(CorrCache(small_cache))["windows_ok"] == 4
    assert not (small_cache / "lease.json").exists()


def test_compact_refuses_a_cache_a_job_is_writing(small_cache, capsys):
    from cameo_corr.cache.location import CacheLocation
    from cameo_corr.cache.manifest import fragment_names
    from cameo_corr.cache.lease import CacheLease

    location = CacheLocation(small_cache)
    pending = fragment_names(location)
    with CacheLease(location).acquire():  # what a running preprocess job holds
        assert cli_main(["cache", "compact", str(small_cache)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("cameo-corr cache compact: error:") and "being written by another job" in err and "--force" in err
        assert fragment_names(location) == pending  # nothing consolidated under the job
    assert cli_main(["cache", "compact", str(small_cache)]) == 0


@pytest.mark.parametrize(
    "argv, code, message",
    [
        (["stats", "{missing}"], 2, "cameo-corr cache stats: error: {missing}: no such cache directory"),
        (["stats", "{empty}/shards"], 2, "cameo-corr cache stats: error: {empty}/shards/cache.json: not a cameo-corr cache: cache.json is missing"),
        (["stats", "{cache}", "--bins", "0"], 2, "cameo-corr cache stats: error: --bins must be >= 1, got 0"),
        (["verify", "{cache}", "--max-windows", "0"], 2, "cameo-corr cache verify: error: --max-windows must be >= 1, got 0"),
        (["verify", "{empty}"], 1, "cameo-corr cache verify: error: no ok window to verify in {empty} (0 manifest rows)"),
        (["verify", "{failed}"], 1, "cameo-corr cache verify: error: no ok window to verify in {failed} (2 manifest rows)"),
    ],
)
def test_cache_cli_input_errors_are_one_line(small_cache, tmp_path, capsys, argv, code, message):
    """In process: an exception escaping the handler would fail the test, as a traceback would."""
    empty = tmp_path / "empty"  # cache.json but no rows (e.g. every row dropped by a repair)
    (empty / "shards").mkdir(parents=True)
    (empty / "cache.json").write_text(config().to_json())
    failed = tmp_path / "failed"
    writer = CacheWriter(failed, config())
    writer.initialize()
    writer.write_shard("f", outcomes([0, 1], failed=(0, 1)))
    paths = {"cache": str(small_cache), "missing": str(tmp_path / "nonexistent"), "empty": str(empty), "failed": str(failed)}
    assert cli_main(["cache", *[a.format(**paths) for a in argv]]) == code
    assert capsys.readouterr().err.strip() == message.format(**paths)


def test_cache_stats_into_closed_pipe(small_cache):
    import os
    import subprocess
    import sys

    for _ in range(3):  # many lines so the write hits the closed pipe
        CacheWriter(small_cache, config()).write_shard(f"x{_}", outcomes(range(10 + 10 * _, 20 + 10 * _), failed=range(10 + 10 * _, 20 + 10 * _)))
    proc = subprocess.run(
        f"{sys.executable} -m cameo_corr.cli cache stats {small_cache} --json --bins 5000 | head -n 1",
        shell=True, capture_output=True, text=True, env=os.environ, timeout=120,
    )
    assert proc.returncode == 0 and proc.stdout == "{\n" and "Traceback" not in proc.stderr and proc.stderr == ""


@pytest.mark.parametrize("compact", [False, True])
def test_repair_drops_corrupt_shards_so_a_rerun_recomputes_them(small_cache, compact):
    from test_cache import _flip_chunk_byte

    from cameo_corr.cache.manifest import finished_shard_ids
    from cameo_corr.cache.verify import repair_corrupt_shards

    if compact:
        CacheWriter(small_cache, config()).consolidate()
    _flip_chunk_byte(small_cache / shard_dir("s2"), "points")
    cache = CorrCache(small_cache)
    result = repair_corrupt_shards(cache)
    assert result["shards"] == ["s2"] and sorted(result["windows"]) == sorted([record(3).window_id, record(4).window_id])
    assert not (small_cache / shard_dir("s2")).exists() and "s2" not in finished_shard_ids(cache.location)
    cache = CorrCache(small_cache)
    assert sorted(cache.window_ids()) == sorted([record(0).window_id, record(2).window_id])
    assert verify_cache(cache, deep=True) == []
    writer = CacheWriter(small_cache, config())
    writer.write_shard("s2", outcomes([3, 4]))  # what the next run does: the same shard, recomputed
    assert verify_cache(CorrCache(small_cache), deep=True) == [] and len(CorrCache(small_cache)) == 4


def test_a_store_that_does_not_answer_is_not_corrupt_data(small_cache, monkeypatch, capsys):
    """A network failure while reading shards (botocore's errors, which s3fs passes through) or an I/O
    error is raised as itself, not as corrupt data: deep verify does not report the shard (so
    ``--repair`` would not drop it, nor ``data.on_corrupt=skip`` skip its windows), and the command line
    prints one line, exit 1."""
    import errno

    from botocore.exceptions import EndpointConnectionError

    from cameo_corr.cache.shard import CorruptCacheError

    cache = CorrCache(small_cache)
    fs, real_open = cache.location.fs, cache.location.fs.open
    raised: list[BaseException] = []

    def unreachable(path, mode="rb", **kw):
        if path.endswith(".zarr.zip") and raised:
            raise raised[0]
        return real_open(path, mode, **kw)

    monkeypatch.setattr(fs, "open", unreachable)
    for error in (EndpointConnectionError(endpoint_url="http://store/cache/shards/s1.zarr.zip"),
                  OSError(errno.EIO, "Input/output error", "shards/s1.zarr.zip")):
        raised[:] = [error]
        with pytest.raises(type(error)) as e:
            CorrCache(small_cache).read_shard("s1")
        assert not isinstance(e.value, CorruptCacheError)
        with pytest.raises(type(error)):
            verify_report(CorrCache(small_cache), deep=True)
    raised[:] = [EndpointConnectionError(endpoint_url="http://store/cache/shards/s1.zarr.zip")]
    assert cli_main(["cache", "verify", str(small_cache), "--deep"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == ('cameo-corr cache verify: error: object store: Could not connect to the endpoint URL: '
                   '"http://store/cache/shards/s1.zarr.zip"')
    raised.clear()
    assert verify_report(CorrCache(small_cache), deep=True).problems == []
