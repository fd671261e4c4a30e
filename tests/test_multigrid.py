"""Several token grids per pass: one backend pass per window stores every grid (arrays namespaced per
grid), bit-identical to single-grid caches; readers, cache tools and the trainer pick a grid."""

from __future__ import annotations

import json
import pickle
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from cameo_corr.cli import main as cli_main
from cameo_corr.cache.layout import shard_dir
from cameo_corr.cache.reader import CorrCache
from cameo_corr.cache.writer import CacheWriter, WindowOutcome
from cameo_corr.cache.stats import cache_stats
from cameo_corr.cache.verify import verify_report
from cameo_corr.schemas import GRID_ARRAYS, CacheConfig, SchemaError, parse_grids

synthetic = pytest.importorskip("cameo_corr.datasets.synthetic", reason="synthetic generator not available")
pytest.importorskip("cameo_corr.pipeline.match", reason="token matcher not available")

CROP, VIEWS = 64, 3
PRIMARY, EXTRA = (4, 4), (8, 8)  # the tiny trainer's supervised layer sees 8x8: an extra grid, not the primary one


def cache_config(reader, grid, extra=()) -> CacheConfig:
    from cameo_corr.datasets.canonical import CanonicalView
    from cameo_corr.pipeline.backends import make_backend

    view = CanonicalView(size=CROP, policy=reader.preferred_crop_policy())
    return CacheConfig(grid=grid, extra_grids=tuple(extra), tau=1.5, views=VIEWS, backend=make_backend("depth", device="cpu").describe(),
                       crop=view.to_dict(), dataset=reader.describe())


class CountingBackend:
    """Test double around the real depth backend: counts how often each window goes through it."""

    def __init__(self, inner) -> None:
        self.inner, self.calls = inner, Counter()

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def run_batch(self, windows):
        self.calls.update(w.record.window_id for w in windows)
        return self.inner.run_batch(windows)

    def __call__(self, window):
        self.calls[window.record.window_id] += 1
        return self.inner(window)


def build_cache(reader, out: Path, cfg: CacheConfig, monkeypatch) -> tuple[Path, Counter]:
    """Plan, load and process every window with the job's own stages in process (``GeometryStage``
    with the real depth backend wrapped in :class:`CountingBackend`), then commit with the writer."""
    import cameo_corr.pipeline.backends as backends
    from cameo_corr.datasets.planner import default_plan_config, plan_table
    from cameo_corr.job.stages import GeometryStage, load_batch

    made: list[CountingBackend] = []
    real = backends.make_backend
    monkeypatch.setattr(backends, "make_backend", lambda *a, **k: made.append(CountingBackend(real(*a, **k))) or made[-1])
    spec = {"backend": "depth", "backend_options": {"device": "cpu"}, "match_backend": "auto", "grid": list(cfg.grid),
            "extra_grids": [list(g) for g in cfg.extra_grids], "tau": cfg.tau, "expected": cfg.backend}
    stage = GeometryStage(spec)
    plan = default_plan_config("synthetic", views=VIEWS, windows_per_scene=2)
    loaded = load_batch(plan_table(reader, plan, cfg.fingerprint()), dataset_json=json.dumps(reader.describe()), crop=cfg.crop,
                        with_depth=True, with_masks=False)
    rows = stage(loaded).to_pylist()
    outcomes = [WindowOutcome(pickle.loads(r["record"]), arrays=pickle.loads(r["arrays"])) for r in rows]
    writer = CacheWriter(out, cfg)
    writer.initialize()
    writer.write_shard("s0", outcomes[:3])
    writer.write_shard("s1", outcomes[3:])
    return out, made[0].calls


@pytest.fixture(scope="module")
def caches(tmp_path_factory) -> dict:
    """A multi-grid cache (4x4 primary, 8x8 extra) and the two single-grid caches of the same settings."""
    from cameo_corr.datasets.base import open_dataset

    mp = pytest.MonkeyPatch()
    tmp = tmp_path_factory.mktemp("multigrid")
    root = synthetic.generate_dataset(tmp / "data", scenes=3, frames=8, image_size=CROP, seed=1)
    reader = open_dataset("synthetic", root)
    try:
        multi, calls = build_cache(reader, tmp / "multi", cache_config(reader, PRIMARY, [EXTRA]), mp)
        single = {g: build_cache(reader, tmp / f"single{g[0]}", cache_config(reader, g), mp)[0] for g in (PRIMARY, EXTRA)}
    finally:
        mp.undo()
    return {"multi": multi, "calls": calls, "single": single, "root": root}


def by_frames(cache: CorrCache) -> dict[tuple, str]:
    table = cache.manifest("ok", columns=["window_id", "scene_id", "frame_ids"]).to_pylist()
    return {(r["scene_id"], tuple(r["frame_ids"])): r["window_id"] for r in table}


def test_grid_flag_parsing_and_config_contract(tmp_path) -> None:
    assert parse_grids("16,32,64") == ((16, 16), (32, 32), (64, 64)) and parse_grids(" 32x16 ") == ((32, 16),)
    for text, message in (("16,16", "16x16 is given twice"), ("256", "more than 32767"), ("16,a", "got 'a'"), ("0", "positive")):
        with pytest.raises(SchemaError, match=message):
            parse_grids(text)
    base = dict(tau=1.5, views=3, backend={"name": "depth"}, crop={"policy": "center", "size": 64}, dataset={"name": "synthetic"})
    single = CacheConfig(grid=(32, 32), **base)
    multi = CacheConfig(grid=(16, 16), extra_grids=((32, 32), (64, 64)), **base)
    # a single-grid cache.json and window-id fingerprint are what they were; a multi-grid one records every grid
    assert "extra_grids" not in json.loads(single.to_json()) and "extra_grids" not in single.fingerprint()
    assert json.loads(multi.to_json())["extra_grids"] == [[32, 32], [64, 64]]
    assert multi.fingerprint()["extra_grids"] == [[32, 32], [64, 64]]
    assert CacheConfig.from_json(multi.to_json()) == multi and CacheConfig.from_json(single.to_json()) == single
    assert multi.grids == ((16, 16), (32, 32), (64, 64))
    assert multi.array_keys((32, 32), ("nn", "intrinsics")) == {"nn": "g32x32/nn", "intrinsics": "intrinsics"}
    assert multi.array_keys(None, ("nn",)) == {"nn": "nn"}
    for extra, message in ((((16, 16),), "16x16 is given twice"), (((256, 256),), "int16"), ((32,), "extra_grids")):
        with pytest.raises(SchemaError, match=message):
            CacheConfig(grid=(16, 16), extra_grids=extra, **base).validate()
    with pytest.raises(SchemaError, match=r"no 8x8 token grid in this cache \(it stores 16x16, 32x32, 64x64\)"):
        multi.select_grid(8)


def test_preprocess_grid_flag_errors_are_one_line_exit_2(tmp_path, capsys) -> None:
    for value, message in (("16,16", "16x16 is given twice"), ("200", "more than 32767"), ("16;32", "got '16;32'")):
        with pytest.raises(SystemExit) as exc:
            cli_main(["preprocess", "--dataset", "synthetic", "--root", str(tmp_path), "--out", str(tmp_path / "c"), "--grid", value])
        assert exc.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("cameo-corr preprocess: error: argument --grid: ") and message in err and "\n" not in err


def test_one_backend_pass_and_arrays_equal_single_grid_caches(caches) -> None:
    multi = CorrCache(caches["multi"])
    assert multi.config.grids == (PRIMARY, EXTRA)
    # the real depth backend saw every window exactly once although two grids were stored
    assert set(caches["calls"]) == set(multi.window_ids()) and set(caches["calls"].values()) == {1}
    keys = by_frames(multi)
    for grid, path in caches["single"].items():
        single = CorrCache(path)
        other = by_frames(single)
        assert other.keys() == keys.keys() and not set(other.values()) & set(keys.values())  # all grids are in the ids
        for k, wid in keys.items():
            got, want = multi.window(wid, grid=grid), single.window(other[k])
            assert got.keys() == want.keys()
            for name in want:
                assert got[name].dtype == want[name].dtype and np.array_equal(got[name], want[name], equal_nan=True), (grid, name)
    # manifest fractions describe the primary grid
    prim = CorrCache(caches["single"][PRIMARY])
    other = by_frames(prim)
    for k, wid in keys.items():
        a, b = multi.row(wid), prim.row(other[k])
        assert (a["valid_frac"], a["mask_frac"]) == (b["valid_frac"], b["mask_frac"])
    # grid-independent arrays are stored once; an extra grid's arrays live in its subgroup
    group = multi.open_shard("s0")
    assert sorted(group.group_keys()) == ["g8x8"] and sorted(group["g8x8"].array_keys()) == sorted(GRID_ARRAYS)
    # a single-grid shard holds exactly the plain arrays
    assert list(CorrCache(caches["single"][PRIMARY]).open_shard("s0").group_keys()) == []


def test_readers_take_a_grid_and_name_the_cache_when_absent(caches) -> None:
    cache = CorrCache(caches["multi"])
    wid = cache.window_ids()[0]
    shard, row = cache.locate(wid)
    assert cache.read_row(shard, row, wid, ("nn",), grid=8)["nn"].shape == (VIEWS, VIEWS, 64)
    assert cache.read_shard(shard, ("nn",))["nn"].shape[1:] == (VIEWS, VIEWS, 16)
    with pytest.raises(SchemaError, match=r"multi/cache.json: field 'grid': no 16x16 token grid in this cache \(it stores 4x4, 8x8\)"):
        cache.window(wid, grid=16)


def test_stream_dataset_reads_the_chosen_grid_with_masks_at_load_time(caches) -> None:
    from cameo_corr.pipeline.masks import recompute_mask
    from cameo_corr.train.data import CorrStreamDataset

    cache = CorrCache(caches["multi"])
    opts = dict(num_views=VIEWS, resolution=32, seed=0, num_epochs=1, order="capture", order_scope="sample")
    primary = next(iter(CorrStreamDataset(caches["multi"], **opts)))
    extra = next(iter(CorrStreamDataset(caches["multi"], grid=EXTRA, **opts)))
    assert primary["corr_nn"].shape[-1] == 16 and extra["corr_nn"].shape[-1] == 64
    wid = extra["window_id"]
    stored = cache.window(wid, grid=EXTRA)
    assert np.array_equal(extra["corr_nn"].numpy(), stored["nn"]) and np.array_equal(extra["corr_mask"].numpy(), stored["mask"])
    both = next(iter(CorrStreamDataset(caches["multi"], grid=EXTRA, mask_policy="both", tau=1.0, **opts)))
    want = recompute_mask(stored, tau=1.0, policy="both", image_size=(CROP, CROP))
    assert np.array_equal(both["corr_mask"].numpy(), np.asarray(want))
    with pytest.raises(SchemaError, match=r"no 16x16 token grid .*stores 4x4, 8x8"):
        CorrStreamDataset(caches["multi"], grid=16, **opts)


@pytest.mark.slow
def test_trainer_picks_the_layer_grid_or_lists_the_cache_grids(caches, tmp_path) -> None:
    from cameo_corr.train.config import load_config, preset_path
    from cameo_corr.train.loop import train

    base = [f"data.cache={caches['multi']}", f"data.num_views={VIEWS}", "data.batch_size=2", "data.shuffle_buffer=2"]
    result = train(load_config(preset_path("tiny_cpu"), [*base, "train.max_steps=1", "train.log_every=1"]), tmp_path / "run",
                   resume="never")  # the layer sees 8x8 tokens: the cache's extra grid, not its 4x4 primary
    assert result.step == 1 and np.isfinite(result.history[0]["cameo"])
    cfg = load_config(preset_path("tiny_cpu"), [*base, "data.resolution=128"])  # the layer sees 16x16 tokens: not stored
    with pytest.raises(SchemaError, match=rf"{caches['multi']}: .*stores grids 4x4, 8x8; .*--grid including 16"):
        train(cfg, tmp_path / "bad", resume="never")


def test_cache_tools_take_a_grid(caches, tmp_path, capsys) -> None:
    path = caches["multi"]
    assert cli_main(["cache", "stats", str(path), "--json", "--grid", "8"]) == 0
    stats = json.loads(capsys.readouterr().out)
    single = cache_stats(CorrCache(caches["single"][EXTRA]))
    assert stats["grid"] == [8, 8] and stats["grids"] == [[4, 4], [8, 8]]
    assert stats["mask_frac_mean"] == pytest.approx(single["mask_frac_mean"], abs=1e-6)
    assert stats["valid_frac_mean"] == pytest.approx(single["valid_frac_mean"], abs=1e-6)
    assert cli_main(["cache", "stats", str(path), "--grid", "16"]) == 2
    assert "stores 4x4, 8x8" in capsys.readouterr().err
    assert cli_main(["cache", "verify", str(path), "--deep"]) == 0
    assert "(grid 4x4, 8x8), every chunk decoded" in capsys.readouterr().out
    out = tmp_path / "v.png"
    assert cli_main(["cache", "viz", str(path), "--grid", "8", "--out", str(out)]) == 0 and out.stat().st_size > 10_000
    assert cli_main(["eval-corr", "--dataset", "synthetic", "--root", str(caches["root"]), "--views", "3", "--windows", "1",
                     "--grid", "4,8", "--crop-size", str(CROP), "--backend", "depth", "--mask-policy", "cycle",
                     "--out", str(tmp_path / "e.json")]) == 0
    header = [line for line in capsys.readouterr().out.splitlines() if line.startswith("eval-corr:")]
    assert len(header) == 1 and " grid=4x4, 8x8 " in header[0]  # the header names every grid scored
    report = json.loads((tmp_path / "e.json").read_text())
    assert sorted(report["grids"]) == ["4x4", "8x8"] and report["grids"]["4x4"]["overall"] == report["overall"]


def test_verify_checks_every_grid(caches, tmp_path) -> None:
    """An extra grid's broken mask or corrupt chunk is found and named; --grid narrows the check."""
    import shutil
    import zipfile

    from cameo_corr.cache.shard import shard_zip_bytes

    path = tmp_path / "cache"
    shutil.copytree(caches["multi"], path)
    cache = CorrCache(path)
    data = {key: cache._read("s1", [key], slice(None), None)[key] for key in cache.config.stored_keys()}
    data["g8x8/mask"] = data["g8x8/mask"] & ~np.eye(64, dtype=bool)[None, None, None, 0]  # drop a masked query
    (path / shard_dir("s1")).write_bytes(shard_zip_bytes("s1", cache.shard_windows("s1"), data, cache.config))
    problems = verify_report(CorrCache(path)).problems
    assert problems and all(" grid 8x8: mask[" in p for p in problems)
    assert verify_report(CorrCache(path), grids=[PRIMARY]).problems == []
    # flip a byte of a chunk of the extra grid: --deep names the array
    blob = bytearray((path / shard_dir("s0")).read_bytes())
    with zipfile.ZipFile(path / shard_dir("s0")) as zf:
        info = zf.getinfo("g8x8/nn/c/0/0/0/0")
    start = info.header_offset + 30 + len(info.filename) + len(info.extra)
    blob[start + 20] ^= 0xFF
    (path / shard_dir("s0")).write_bytes(bytes(blob))
    report = verify_report(CorrCache(path), deep=True, grids=[PRIMARY])
    assert {a for _, s, a in report.corrupt} == {"g8x8/nn"}


def test_crop_size_must_fit_every_grid() -> None:
    from cameo_corr.cli.errors import UsageError
    from cameo_corr.job.config import JobConfig

    opts = dict(dataset="synthetic", root="data", out="cache", workers=1, gpus_per_worker=0, cpus_per_worker=0, shard_size=1,
                batch_size=1, max_retries=0, lease_timeout=1.0)
    JobConfig(crop_size=64, grid=(8, 8), extra_grids=((64, 64),), **opts)
    with pytest.raises(UsageError, match=r"\(64 for --grid 8,64: every token needs at least one pixel\), got 48"):
        JobConfig(crop_size=48, grid=(8, 8), extra_grids=((64, 64),), **opts)
    with pytest.raises(UsageError, match="--grid: 8x8 is given twice"):
        JobConfig(crop_size=48, grid=(8, 8), extra_grids=((8, 8),), **opts)


def test_merge_and_mixtures_keep_every_grid(caches, tmp_path) -> None:
    """A merge that rewrites part of a shard keeps every grid's arrays; a mixture reads one grid that
    every cache must store."""
    import shutil

    from cameo_corr.cache.config import CacheMismatchError
    from cameo_corr.cache.merge import merge_caches
    from cameo_corr.cache.select import WindowSelection
    from cameo_corr.train.mixture import CacheSource
    from cameo_corr.train.data import CorrStreamDataset

    multi = caches["multi"]
    copy = shutil.copytree(multi, tmp_path / "copy")
    scene = CorrCache(multi).manifest("ok", columns=["scene_id"]).column("scene_id")[0].as_py()
    (tmp_path / "scenes.txt").write_text(scene + "\n")
    report = merge_caches([multi, copy], tmp_path / "out", selection=WindowSelection(scenes_file=str(tmp_path / "scenes.txt")))
    out = CorrCache(tmp_path / "out")
    assert report.rewritten >= 1 and out.config.grids == CorrCache(multi).config.grids
    assert verify_report(out, deep=True).problems == []
    for wid in out.window_ids():
        for grid in (PRIMARY, EXTRA):
            got, want = out.window(wid, grid=grid), CorrCache(multi).window(wid, grid=grid)
            assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want)
    opts = dict(num_views=2, resolution=32)
    mix = CorrStreamDataset([CacheSource(str(multi)), CacheSource(str(caches["single"][EXTRA]))], grid=EXTRA, **opts)
    assert mix.grid == EXTRA and mix.source_windows.tolist() == [6, 6]
    with pytest.raises(CacheMismatchError, match=r"field 'grid'.* has \[8, 8\], .*single4 has \[4, 4\]"):
        CorrStreamDataset([CacheSource(str(multi)), CacheSource(str(caches["single"][PRIMARY]))], grid=EXTRA, **opts)
