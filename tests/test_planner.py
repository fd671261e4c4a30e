"""Window planner: sampling policies, clamping, determinism, failed scenes, sharding."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cameo_corr.datasets.base import SceneReader
from cameo_corr.datasets.planner import PlanConfig, default_plan_config, make_shards, plan_scene, plan_windows, random_indices, stable_seed, stride_indices
from cameo_corr.schemas import shard_id_of
from cameo_corr.schemas import DatasetError, FrameRecord, SceneRecord, SchemaError

FP = {"schema_version": 1, "grid": [32, 32], "tau": 1.5, "backend": {"name": "depth"}, "crop": {"policy": "center", "size": 512}}
K = np.array([[100.0, 0, 64], [0, 100.0, 64], [0, 0, 1]])


def make_scene(scene_id: str, n: int, *, step_us: int = 33_333, dataset: str = "re10k") -> SceneRecord:
    frames = tuple(
        FrameRecord(str(1_000_000 + i * step_us), f"{scene_id}/{i}.png", (128, 128), K, np.eye(4)) for i in range(n)
    )
    return SceneRecord(dataset, "test", scene_id, frames)


class ListReader(SceneReader):
    """A reader over in-memory scene records; ``broken`` scene ids raise like a bad pose file."""

    name = "re10k"

    def __init__(self, root: Path, scenes: list[SceneRecord], broken: tuple[str, ...] = ()) -> None:
        super().__init__(root, "test")
        self._scenes = {s.scene_id: s for s in scenes}
        self._broken = broken

    def scene_ids(self) -> list[str]:
        return sorted([*self._scenes, *self._broken])

    def scene(self, scene_id: str) -> SceneRecord:
        if scene_id in self._broken:
            raise DatasetError(f"test/{scene_id}.txt", "malformed number", line=3, field="fx", scene_id=scene_id)
        return self._scenes[scene_id]

    def load_image(self, frame: FrameRecord) -> np.ndarray:
        raise NotImplementedError("the planner never loads pixels")


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(2, 80),
    views=st.integers(2, 10),
    lo=st.floats(0, 60),
    extra=st.floats(0, 100),
    gaps=st.lists(st.floats(0.5, 20), min_size=79, max_size=79),
    seed=st.integers(0, 2**32),
)
def test_stride_indices_properties(n, views, lo, extra, gaps, seed):
    if n < views:
        with pytest.raises(ValueError):
            stride_indices(np.arange(n, dtype=float), views, (lo, lo + extra), np.random.default_rng(seed))
        return
    p = np.concatenate([[0.0], np.cumsum(gaps[: n - 1])])
    idx = stride_indices(p, views, (lo, lo + extra), np.random.default_rng(seed))
    assert len(idx) == views and idx == sorted(set(idx)), "S distinct frames in capture order"
    assert 0 <= idx[0] and idx[-1] < n
    steps = np.diff(idx)
    assert steps.max() - steps.min() <= 1, "uniform stride of frame indices"
    span = p[idx[-1]] - p[idx[0]]
    tightest = np.min(p[views - 1 :] - p[: n - views + 1])
    whole = p[-1] - p[0]
    lo_c = min(max(lo, tightest), whole)
    hi_c = min(max(lo + extra, lo_c), whole)
    # the end frame is the first at/after start + L, so the span may exceed L by one frame gap
    assert span >= lo_c - 1e-6
    if idx[-1] - idx[0] > views - 1:
        assert p[idx[-1] - 1] - p[idx[0]] < hi_c + 1e-6


def _stride_indices_reference(positions, views, span, rng):
    """The per-window search over all frames that :func:`stride_bounds` replaced (kept verbatim)."""
    n = len(positions)
    p = np.asarray(positions, dtype=np.float64)
    tightest = float(np.min(p[views - 1 :] - p[: n - views + 1]))
    whole = float(p[-1] - p[0])
    lo = min(max(span[0], tightest), whole)
    hi = min(max(span[1], lo), whole)
    length = float(rng.uniform(lo, hi)) if hi > lo else lo
    eps = 1e-9 * max(1.0, whole)
    ends = np.searchsorted(p, p + length - eps, side="left")
    ends = np.maximum(ends, np.arange(n) + views - 1)
    starts = np.flatnonzero(ends <= n - 1)
    i0 = int(starts[rng.integers(len(starts))])
    i1 = int(ends[i0])
    return [int(v) for v in np.round(np.linspace(i0, i1, views)).astype(np.int64)]


@settings(max_examples=80, deadline=None)
@given(
    n=st.integers(2, 300),
    views=st.integers(2, 16),
    lo=st.floats(0, 400),
    extra=st.floats(0, 1200),
    gap=st.sampled_from(["ordinal", "us"]),
    seed=st.integers(0, 2**32),
)
def test_stride_bounds_match_the_per_window_search(n, views, lo, extra, gap, seed):
    """Batched draws give the same windows, and leave the generator in the same state, as the
    per-window search they replaced (window ids depend on it)."""
    from cameo_corr.datasets.planner import spaced_indices, stride_bounds

    views = min(views, n)
    rng = np.random.default_rng(seed)
    if gap == "ordinal":
        p = np.arange(n, dtype=np.float64)
    else:  # timestamps in microseconds at 30 fps, irregular gaps
        t = np.cumsum(np.random.default_rng(seed + 1).integers(1, 400_000, size=n))
        p = (t - t[0]) * 30.0 / 1e6
    a, b = np.random.default_rng(seed), np.random.default_rng(seed)
    got = spaced_indices(stride_bounds(p, views, (lo, lo + extra), a, 7), views)
    want = [_stride_indices_reference(p, views, (lo, lo + extra), b) for _ in range(7)]
    assert got == want
    assert a.random() == b.random()
    assert stride_indices(p, views, (lo, lo + extra), rng) == want[0]


def test_stride_clamps_short_clip_to_whole_clip():
    # 16 frames, ~8 raw frames apart (like the real RealEstate10K sample clips): [S*48, S*144] is
    # far above the clip's 120 raw frames, so the window covers the whole clip.
    p = np.arange(16) * 8.0
    idx = stride_indices(p, 8, (8 * 48, 8 * 144), np.random.default_rng(0))
    assert idx[0] == 0 and idx[-1] == 15


def test_stride_span_within_range_on_long_clip():
    p = np.arange(3000, dtype=float)  # every raw frame listed
    rng = np.random.default_rng(1)
    for _ in range(20):
        idx = stride_indices(p, 4, (4 * 48, 4 * 144), rng)
        assert 4 * 48 <= p[idx[-1]] - p[idx[0]] <= 4 * 144 + 1


def test_random_indices():
    rng = np.random.default_rng(0)
    idx = random_indices(30, 8, rng)
    assert idx == sorted(set(idx)) and len(idx) == 8 and idx[-1] < 30
    with pytest.raises(ValueError):
        random_indices(3, 8, rng)


def test_plan_scene_deterministic_and_seeded():
    scene = make_scene("a", 400)
    cfg = default_plan_config("re10k", views=4, windows_per_scene=3)
    assert cfg.policy == "stride" and cfg.positions == "timestamp_us"
    w1 = plan_scene(scene, cfg, FP)
    w2 = plan_scene(scene, cfg, FP)
    assert [w.record.window_id for w in w1] == [w.record.window_id for w in w2]
    assert len(w1) == 3 and all(w.error is None and w.record.num_views == 4 for w in w1)
    other = plan_scene(scene, default_plan_config("re10k", views=4, windows_per_scene=3, seed=7), FP)
    assert [w.record.frame_ids for w in other] != [w.record.frame_ids for w in w1]
    # timestamps at 30 fps: spans measured in raw frames (1 listed frame = 1 raw frame here)
    for w in w1:
        t = np.array([int(f) for f in w.record.frame_ids])
        raw_span = (t[-1] - t[0]) * 30 / 1e6
        assert 4 * 48 - 1e-6 <= raw_span <= 4 * 144 + 1.01
    # the config goes into the window id
    assert plan_scene(scene, cfg, {**FP, "tau": 2.0})[0].record.window_id != w1[0].record.window_id


def test_stable_seed_is_not_python_hash():
    assert stable_seed(0, "re10k", "test", "abc") == stable_seed(0, "re10k", "test", "abc")
    assert stable_seed(0, "re10k", "test", "abc") != stable_seed(1, "re10k", "test", "abc")


def test_duplicate_windows_dropped_on_tiny_scene():
    scene = make_scene("b", 4)
    cfg = PlanConfig(views=4, windows_per_scene=5, policy="random")
    windows = plan_scene(scene, cfg, FP)
    assert len(windows) == 1 and windows[0].record.frame_ids == [f.frame_id for f in scene.frames]


def test_plan_windows_failed_scenes(tmp_path):
    reader = ListReader(tmp_path, [make_scene("long", 40), make_scene("short", 3)], broken=("bad",))
    cfg = PlanConfig(views=4, windows_per_scene=2, policy="random")
    windows = plan_windows(reader, cfg, FP)
    by_scene: dict[str, list] = {}
    for w in windows:
        by_scene.setdefault(w.record.scene_id, []).append(w)
    assert [w.error is None for w in by_scene["long"]] == [True, True]
    (short,) = by_scene["short"]
    assert "fewer than the 4 views" in short.error and short.record.frames == ()
    (bad,) = by_scene["bad"]
    assert "test/bad.txt:3 [fx]" in bad.error
    assert len({w.record.window_id for w in windows}) == len(windows)


def test_timestamp_positions_need_integer_ids(tmp_path):
    scene = make_scene("x", 20)
    frames = tuple(FrameRecord(f"f{i}", f.image_path, f.image_size, f.intrinsics, f.extrinsics) for i, f in enumerate(scene.frames))
    reader = ListReader(tmp_path, [SceneRecord("re10k", "test", "x", frames)])
    (w,) = plan_windows(reader, default_plan_config("re10k", views=4), FP)
    assert w.error is not None and "integer frame ids" in w.error and "[frame_id]" in w.error


def test_plan_config_validation():
    with pytest.raises(SchemaError, match="policy"):
        PlanConfig(policy="bogus")
    with pytest.raises(SchemaError, match="span_per_view"):
        PlanConfig(span_per_view=(5, 1))
    with pytest.raises(SchemaError, match="views"):
        PlanConfig(views=1)


def test_make_shards_resume_reproduces_shards(tmp_path):
    reader = ListReader(tmp_path, [make_scene(f"s{i}", 30) for i in range(5)])
    windows = plan_windows(reader, PlanConfig(views=4, windows_per_scene=2, policy="random"), FP)
    shards = make_shards(windows, 3)
    assert [len(s.windows) for s in shards] == [3, 3, 3, 1]
    assert shards[0].shard_id == shard_id_of(shards[0].window_ids)
    assert len({s.shard_id for s in shards}) == 4
    done = set(shards[1].window_ids) | set(shards[3].window_ids)
    rest = make_shards(windows, 3, skip=done)
    assert [s.shard_id for s in rest] == [shards[0].shard_id, shards[2].shard_id]
    with pytest.raises(SchemaError):
        make_shards(windows, 0)


def test_plan_real_re10k_clips(shared_data):
    re10k = pytest.importorskip("cameo_corr.datasets.re10k", reason="RE10K reader not available")
    reader = re10k.RE10KReader(shared_data / "re10k_clips", split="test")
    windows = plan_windows(reader, default_plan_config("re10k", views=8, windows_per_scene=2), FP)
    ok = [w for w in windows if w.error is None]
    assert len({w.record.scene_id for w in ok}) == len(reader.scene_ids())
    # the 4.2 s clips are far shorter than [8*48, 8*144] raw frames: whole clip, evenly strided
    for w in ok:
        scene = reader.scene(w.record.scene_id)
        assert w.record.frame_ids[0] == scene.frames[0].frame_id
        assert w.record.frame_ids[-1] == scene.frames[-1].frame_id


def test_plan_table_matches_plan_windows_and_shards(tmp_path):
    import pyarrow as pa

    from cameo_corr.datasets.planner import PLAN_COLUMNS, assign_shards, iter_plan_batches, plan_table

    reader = ListReader(tmp_path, [make_scene(f"s{i}", 30) for i in range(5)] + [make_scene("short", 3)], broken=("bad",))
    cfg = PlanConfig(views=4, windows_per_scene=2, policy="random")
    windows = plan_windows(reader, cfg, FP)
    table = plan_table(reader, cfg, FP)
    assert tuple(table.column_names) == PLAN_COLUMNS  # the contract of the Ray Data source
    rows = table.to_pylist()
    assert [r["window_id"] for r in rows] == [w.record.window_id for w in windows]
    assert [r["frame_ids"] for r in rows] == [w.record.frame_ids for w in windows]
    assert [r["error"] for r in rows] == [w.error for w in windows]
    assert [r["scene_id"] for r in rows] == [w.record.scene_id for w in windows]
    assert sum(b.num_rows for b in iter_plan_batches(reader, cfg, FP, scenes_per_batch=2)) == len(windows)
    assert len(list(iter_plan_batches(reader, cfg, FP, scenes_per_batch=2))) == 4  # 7 scenes, 2 per batch
    shards = make_shards(windows, 3)
    sharded = assign_shards(table, 3)
    assert sharded.column("shard_id").to_pylist() == [s.shard_id for s in shards for _ in s.windows]
    done = pa.array(shards[1].window_ids + shards[3].window_ids)
    rest = assign_shards(table, 3, skip=done)
    assert list(dict.fromkeys(rest.column("shard_id").to_pylist())) == [s.shard_id for s in make_shards(windows, 3, skip=done)]
    with pytest.raises(SchemaError):
        assign_shards(table, 0)


def test_plan_table_uses_the_dataset_tag(tmp_path):
    from cameo_corr.datasets import open_dataset
    from cameo_corr.datasets.synthetic import generate_dataset
    from cameo_corr.datasets.planner import plan_table

    root = generate_dataset(tmp_path / "data", scenes=2, frames=6, image_size=16, seed=2, layout="re10k", split="test")
    acid = open_dataset("re10k", root, tag="acid")
    plan = default_plan_config(acid.name, views=3, windows_per_scene=2)
    table = plan_table(acid, plan, FP)
    windows = plan_windows(acid, plan, FP)
    assert set(table.column("dataset").to_pylist()) == {"acid"}
    assert table.column("window_id").to_pylist() == [w.record.window_id for w in windows]


# ------------------------------------------------------------------------------ planning at scale
def _fake_re10k(root: Path) -> list[str]:
    """A small RealEstate10K root exercising the batched reading paths: clips of 3-260 frames with
    irregular timestamps, two frame sizes, png and jpg frames, a clip with blank lines and CRLF
    endings (the precise parser), and bad clips (rotation, missing frame, malformed number, no frame
    directory). Returns the clip keys."""
    import io
    import os

    from PIL import Image

    rng = np.random.default_rng(5)
    (root / "test").mkdir(parents=True)
    images = {}
    for size, fmt in (((64, 36), "JPEG"), ((40, 30), "PNG")):
        buffer = io.BytesIO()
        Image.new("RGB", size, (90, 120, 150)).save(buffer, format=fmt)
        images[fmt] = buffer.getvalue()
    keys = []
    for c, frames in enumerate([40, 150, 3, 260, 90, 150, 25, 120, 8, 150, 60, 150]):
        key = f"{c:04x}clip"
        keys.append(key)
        stamps = 500_000 + np.cumsum(rng.integers(100_000, 400_000, size=frames))
        rows = [f"{ts} {0.8 + 0.01 * c} {1.4:.3f} 0.5 0.49 0 0 1 0 0 {0.01 * k:.4f} 0 1 0 0 0 0 1 {-0.1 * k}"
                for k, ts in enumerate(stamps)]
        newline = "\n"
        if c == 4:
            rows[6] = rows[6].replace(" 1 0 0 ", " 1.5 0 0 ", 1)  # not a rotation (line 8)
        if c == 7:
            rows[30] = rows[30].replace(" 0.5 ", " 0.5q ", 1)  # malformed cx (line 32)
        if c == 10:
            rows.insert(5, "")  # a blank line, CRLF endings
            newline = "\r\n"
        (root / "test" / f"{key}.txt").write_text(newline.join([f"https://www.youtube.com/watch?v={key}", *rows]) + newline)
        if c == 11:
            continue  # no frame directory
        fmt = "PNG" if c % 3 == 1 else "JPEG"
        d = root / "frames" / key
        d.mkdir(parents=True)
        first = d / f"{stamps[0]}.{fmt.lower().replace('jpeg', 'jpg')}"
        first.write_bytes(images[fmt])
        for ts in stamps[1:]:
            if not (c == 9 and ts == stamps[77]):  # a missing frame file
                os.link(first, first.with_name(f"{ts}{first.suffix}"))
    return keys


def _plan_digest(table) -> str:
    import hashlib

    rows = zip(table.column("window_id").to_pylist(), table.column("scene_id").to_pylist(),
               table.column("frame_ids").to_pylist(), table.column("error").to_pylist())
    text = "\n".join(f"{w} {s} {','.join(f)} {e is None}" for w, s, f, e in rows)
    return hashlib.sha256(text.encode()).hexdigest()


def test_plan_table_pinned_on_fake_re10k(tmp_path):
    """The planned windows (ids, frames, failures) of a generated root are pinned (computed before
    planning was batched): faster planning must never change them (a resumed job finds its done
    windows by id), and failed clips keep their precise errors."""
    from cameo_corr.datasets.re10k import RE10KReader
    from cameo_corr.datasets.planner import plan_table

    _fake_re10k(tmp_path)
    reader = RE10KReader(tmp_path)
    table = plan_table(reader, default_plan_config("re10k", views=8, windows_per_scene=10), FP)
    assert (table.num_rows, _plan_digest(table)) == (46, "215ecaf075165cc46a593d341853719b1cd6be1079a3c7c19edc2f1f642d32d2")
    errors = {s: e.replace(str(tmp_path), "ROOT") for s, e in zip(table.column("scene_id").to_pylist(),
                                                                   table.column("error").to_pylist()) if e}
    assert errors == {
        "0002clip": "scene has 3 frames, fewer than the 8 views of a window",
        "0004clip": "DatasetError: ROOT/test/0004clip.txt:8 [extrinsics]: field 'extrinsics': rotation block is not a "
                    "proper rotation (R R^T != I or det != 1)",
        "0007clip": "DatasetError: ROOT/test/0007clip.txt:32 [cx]: malformed number '0.5q'",
        "0009clip": "DatasetError: ROOT/frames/0009clip/19523677.{png,jpg,jpeg}:79 [timestamp_us]: missing frame file "
                    "(listed in 0009clip.txt)",
        "000bclip": "DatasetError: ROOT/frames/000bclip: frame directory of the clip does not exist",
    }
    random_table = plan_table(reader, PlanConfig(views=6, windows_per_scene=4, policy="random", seed=3), FP)
    assert (random_table.num_rows, _plan_digest(random_table)) == (
        33, "6a4fa72708acc5372d1548a89dbb155d0e2c809382c8a0de6fabaace6a86ba74")


def test_batched_reading_matches_the_precise_reader(tmp_path):
    """Clips read in a batch (one parse, one camera check) equal the per-clip precise reading, and
    a bad clip in a batch gets exactly the error reading it alone gives."""
    from cameo_corr.datasets.re10k import RE10KReader

    keys = _fake_re10k(tmp_path)
    reader = RE10KReader(tmp_path)
    batch = reader._clips(keys)
    for key, got in zip(keys, batch):
        want = reader._clip_precise(key)
        if isinstance(want, Exception):
            assert type(got) is type(want) and str(got) == str(want) and (got.line, got.field) == (want.line, want.field)
            with pytest.raises(type(want), match=re.escape(str(want))):
                reader.scene(key)
        else:
            assert (got.stamps, got.names, got.hw) == (want.stamps, want.names, want.hw)
            np.testing.assert_array_equal(got.cameras, want.cameras)
    ids = reader.frame_ids_batch(keys)
    assert [isinstance(i, Exception) for i in ids] == [isinstance(c, Exception) for c in batch]
    assert sum(isinstance(i, Exception) for i in ids) == 4  # rotation, malformed number, missing frame, no frames dir


def test_planning_workers_give_the_same_batches(tmp_path):
    """Worker processes plan the same batches, in the same order, as the calling process."""
    from cameo_corr.datasets.re10k import RE10KReader
    from cameo_corr.datasets.planner import iter_plan_batches, plan_workers

    _fake_re10k(tmp_path)
    reader = RE10KReader(tmp_path)
    cfg = default_plan_config("re10k", views=8, windows_per_scene=10)
    serial = list(iter_plan_batches(reader, cfg, FP, scenes_per_batch=3))
    parallel = list(iter_plan_batches(reader, cfg, FP, scenes_per_batch=3, workers=2))
    assert len(serial) == len(parallel) == 4 and all(a.equals(b) for a, b in zip(serial, parallel))
    assert plan_workers(1000) == 1 and plan_workers(10 * 2048) >= 1 and plan_workers(10**6) <= 8


def test_window_id_hasher_windows_equals_one_call_per_window():
    from cameo_corr.schemas import WindowIdHasher

    hasher = WindowIdHasher(FP)
    frames = ["0001", 'quo"te', "ünï\\code", "tab\there", "5"]
    rows = [[0, 1, 2], [2, 3, 4], [0, 4, 1]]
    assert hasher.windows("re10k", "test", "sçene/1", frames, rows) == [
        hasher("re10k", "test", "sçene/1", [frames[i] for i in r]) for r in rows]
