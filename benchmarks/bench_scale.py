"""Cache and planner at 10k / 100k / 1M windows: every figure at each scale, with its growth.

Builds fake caches of conforming layout itself (the real :class:`CacheWriter`, schema version 2, shard
size 64; tiny windows of S=2 on a 2x2 grid so a million windows fit on disk, since these steps cost per
window and per shard, not per byte of arrays), then measures, each in a fresh process (peak RSS is the
process's own):

* ``open``: ``CorrCache(path)`` + ``window_ids()``;
* ``resume``: ``done_window_ids()`` + removing them from a planned table of the same ids (what a
  re-run does before it hands out work), on the consolidated manifest and on the per-shard fragments
  a killed job leaves;
* ``dataset``: ``CorrStreamDataset(...)`` construction: seconds, added RSS, bytes pickled into every
  DataLoader worker and seconds to unpickle them;
* ``stats``: ``cache_stats``; ``verify16``: ``verify_cache(max_windows=16)``;
* ``window``: median ``CorrCache.window`` over 50 random windows;
* ``compact``: consolidating the fragments at job end;
* ``periodic``: the manifest side of a job that consolidates every ``CONSOLIDATE_EVERY`` shards
  (the fragments replayed in batches, :class:`PeriodicConsolidation` after each batch): total seconds
  of consolidation over the job, then ``resume`` and ``compact`` after a kill that left the most
  pending fragments it can (``CONSOLIDATE_EVERY - 1``);
* ``plan``: ``plan_table`` over a fake RealEstate10K root of C clips x 150 frames (camera files plus
  hard links to one small JPEG per frame), 10 windows of S=8 per clip: seconds, CPU seconds of all
  processes, peak RSS of the planning process and of one worker, with 1 and 2 worker processes
  (``--plan-workers``), alternating with the planner of ``--plan-baseline`` (a git ref, run from an
  extracted copy) in ``--plan-rounds`` rounds; every variant must plan the same window ids.

With ``--read-scales 10000000``, the read side at that scale, S=8 (:func:`build_bulk_cache` writes
the cache in bulk): ``window_ids()``, ``cache_stats``, ``verify_report(max_windows=16)`` and the
``CorrStreamDataset`` construction (pickled size, unpickle and epoch order per worker), each in a fresh
process, in CPU seconds and peak RSS, alternating with the package at ``--read-baseline``.

Timings start after the modules a step imports lazily are imported. The machine's load average is
printed with the table: on a shared 2-core machine it dominates the absolute numbers.

Usage: ``python benchmarks/bench_scale.py [--scales 10000 100000 1000000] [--clips 670 6700 67000]
[--work DIR] [--keep] [--read-scales 10000000]``. Growth is ``value(next scale) / value(this scale)`` for a 10x step; linear
growth is 10x.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pickle
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

SHARD_SIZE = 64
CONSOLIDATE_EVERY = 256
PLAN_BASELINE = "fa32198"
MANIFEST_BASELINE = "064e384"
"""The manifest code before streaming merges (consolidation, compact and merge held whole manifests)."""
"""The planner before clips were read in batches (one header per clip, per-clip parse and checks)."""
VIEWS = 8
GRID = (2, 2)


def fake_config(root: Path) -> Any:
    """The ``cache.json`` of a fake cache whose dataset root is ``root``, created empty: the steps read
    no frame, but the dataset refuses a root that is not a directory."""
    from cameo_corr.schemas import CacheConfig

    root.mkdir(parents=True, exist_ok=True)
    return CacheConfig(grid=GRID, tau=1.5, views=VIEWS, backend={"name": "depth", "version": "bench"},
                       crop={"policy": "center", "size": 64}, dataset={"name": "synthetic", "root": str(root), "split": "train"})


def fake_window_arrays() -> dict[str, np.ndarray]:
    """One consistent window: identical distinct points in both views, so nn is the identity, dist 0
    and every token masked (``cache verify`` accepts it)."""
    h, w = GRID
    hw = h * w
    pts = np.stack(np.meshgrid(np.arange(w), np.arange(h), [1.0], indexing="xy"), -1).reshape(h, w, 3)
    return {
        "points": np.broadcast_to(pts, (VIEWS, h, w, 3)).astype(np.float16),
        "valid": np.ones((VIEWS, h, w), bool),
        "conf": np.ones((VIEWS, h, w), np.float16),
        "nn": np.broadcast_to(np.arange(hw, dtype=np.int16), (VIEWS, VIEWS, hw)).copy(),
        "dist": np.zeros((VIEWS, VIEWS, hw), np.float16),
        "mask": np.ones((VIEWS, VIEWS, hw), bool),
        "intrinsics": np.tile(np.eye(3, dtype=np.float32), (VIEWS, 1, 1)),
        "extrinsics": np.tile(np.eye(4, dtype=np.float32), (VIEWS, 1, 1)),
    }


def templated_shard_bytes(real: Any) -> Any:
    """A drop-in for ``shard_zip_bytes`` that encodes the (identical) arrays of a full shard once and
    reuses those zip members, writing only each shard's own ``zarr.json`` (its attributes: window ids,
    scenes, frame ids). zarr's per-chunk encoding costs ~10 ms per shard of tiny chunks even on an idle
    machine; this keeps building a million windows to minutes. Same file layout as the real writer."""
    import copy
    import io
    import zipfile

    cache: dict[str, Any] = {}

    def build(shard_id: str, windows: Any, data: Any, config: Any) -> bytes:
        W = len(windows["window_ids"])
        if W not in cache:
            blob = real(shard_id, windows, data, config)
            with zipfile.ZipFile(io.BytesIO(blob)) as zf:
                cache[W] = ({n: zf.read(n) for n in zf.namelist() if n != "zarr.json"}, json.loads(zf.read("zarr.json")))
            return blob
        members, meta = cache[W]
        meta = copy.deepcopy(meta)
        meta["attributes"].update(shard_id=shard_id, **{k: list(v) for k, v in windows.items()})
        out = io.BytesIO()
        with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_STORED) as zf:
            for name in sorted([*members, "zarr.json"]):
                zf.writestr(name, json.dumps(meta, indent=2).encode() if name == "zarr.json" else members[name])
        return out.getvalue()

    return build


def build_cache(path: Path, windows: int) -> dict[str, float]:
    """Write ``windows`` windows in shards of 64 through the real writer (fragments, as a job does;
    shard files through :func:`templated_shard_bytes`, checked against the real encoder)."""
    import cameo_corr.cache.writer as cache_module  # the writer calls shard_zip_bytes by this name
    from cameo_corr.cache.reader import CorrCache
    from cameo_corr.cache.writer import CacheWriter, WindowOutcome
    from cameo_corr.schemas import shard_id_of
    from cameo_corr.schemas import FrameRecord, WindowIdHasher, WindowRecord

    real = cache_module.shard_zip_bytes
    cache_module.shard_zip_bytes = templated_shard_bytes(real)
    config = fake_config(path.parent / "no-dataset")
    writer = CacheWriter(path, config)
    writer.initialize()
    hasher = WindowIdHasher(config.fingerprint())
    arrays = fake_window_arrays()
    K, E = np.eye(3), np.eye(4)
    t0 = time.perf_counter()
    for start in range(0, windows, SHARD_SIZE):
        outs = []
        for i in range(start, min(start + SHARD_SIZE, windows)):
            scene = f"scene{i // 10:07d}"
            frames = tuple(FrameRecord(f"{i}-{v}", f"{scene}/{i}-{v}.jpg", (64, 64), K, E) for v in range(VIEWS))
            wid = hasher("synthetic", "train", scene, [f.frame_id for f in frames])
            outs.append(WindowOutcome(WindowRecord(wid, "synthetic", "train", scene, frames), arrays=arrays))
        writer.write_shard(shard_id_of([o.record.window_id for o in outs]), outs)
    cache_module.shard_zip_bytes = real
    reader = CorrCache(path)
    for wid in reader.window_ids()[SHARD_SIZE + 1 : SHARD_SIZE + 3]:  # templated shards read as written
        got = reader.window(wid)
        assert all(np.array_equal(got[k], v) for k, v in arrays.items())
        assert wid in reader.shard_windows(reader.locate(wid)[0])["window_ids"]
    return {"build_s": time.perf_counter() - t0}


def replay_periodic(src: Path, dst: Path) -> dict[str, float]:
    """A copy of the fragment-only cache ``src`` (shard files hard-linked) whose manifest went through
    periodic consolidation: its fragments come back in batches of ``CONSOLIDATE_EVERY`` in name order,
    each batch followed by a round of :class:`PeriodicConsolidation`; the last ``CONSOLIDATE_EVERY - 1``
    stay pending, as a job killed just before its next round leaves them. Returns the seconds and
    rounds of consolidation."""
    from cameo_corr.cache.consolidation import PeriodicConsolidation
    from cameo_corr.cache.location import CacheLocation
    from cameo_corr.cache.manifest import fragment_names

    shutil.copytree(src, dst, copy_function=os.link)
    held = dst / "held-back"
    held.mkdir()
    names = fragment_names(CacheLocation(dst))
    for name in names:
        os.rename(dst / "manifest" / name, held / name)
    # a round per batch (the time trigger fires at every call: what the shard count would do per batch)
    periodic = PeriodicConsolidation(CacheLocation(dst), every_shards=CONSOLIDATE_EVERY, every_seconds=1e-9)
    head = len(names) - min(len(names), CONSOLIDATE_EVERY - 1)
    seconds, rounds = 0.0, 0
    for start in range(0, head, CONSOLIDATE_EVERY):
        for name in names[start : min(start + CONSOLIDATE_EVERY, head)]:
            os.rename(held / name, dst / "manifest" / name)
        t0 = time.perf_counter()
        rounds += periodic.step()
        seconds += time.perf_counter() - t0
    for name in names[head:]:  # the job is killed before its next round
        os.rename(held / name, dst / "manifest" / name)
    held.rmdir()
    return {"s": seconds, "rounds": rounds}


# ------------------------------------------------------------------------------ measured steps
def _rss_mb() -> float:
    """Peak RSS of this process image in MB (``VmHWM``: unlike ``ru_maxrss`` it is not inherited
    from the parent across ``exec``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _warm_imports() -> None:
    """Import what the steps use lazily, so the timings are of the work, not of module imports."""
    import fsspec.implementations.local  # noqa: F401
    import pyarrow.dataset  # noqa: F401
    import pyarrow.parquet  # noqa: F401
    import zarr.storage  # noqa: F401


def read_step(step: str, path: Path) -> dict[str, float]:
    """``stats`` (``cache_stats``: ok windows) or ``verify16`` (``verify_report(max_windows=16)``, which
    must find no problem: windows checked) on the cache at ``path``."""
    from cameo_corr.cache.reader import CorrCache
    from cameo_corr.cache.stats import cache_stats
    from cameo_corr.cache.verify import verify_report

    if step == "stats":
        return {"windows": cache_stats(CorrCache(path))["windows_ok"]}
    report = verify_report(CorrCache(path), max_windows=16)
    assert not report.problems, report.problems[:3]
    return {"checked": report.checked}


def worker_side(ds: Any, clock: Any, unit: str) -> dict[str, float]:
    """What each DataLoader worker pays for the dataset ``ds``: its pickled size (``pickled_mb``), the
    unpickling and the first epoch order, timed by ``clock`` (``unpickle_<unit>``, ``epoch_order_<unit>``)."""
    blob = pickle.dumps(ds)
    out = {"pickled_mb": len(blob) / 2**20}
    t = clock()
    pickle.loads(blob)
    out[f"unpickle_{unit}"] = clock() - t
    t = clock()
    ds.rank_order(0)
    out[f"epoch_order_{unit}"] = clock() - t
    return out


def planned_ids(path: Path) -> Any:
    """The planned table of a re-run of the job that wrote ``path``: its window ids (read before the clock)."""
    import pyarrow as pa

    from cameo_corr.cache.location import CacheLocation
    from cameo_corr.cache.manifest import read_manifest

    return pa.table({"window_id": read_manifest(CacheLocation(path), columns=["window_id"]).column("window_id")})


def resume_startup(path: Path, planned: Any) -> int:
    """What a resumed job does before it hands out work, with whatever package is importable: the
    done ids, the repair listing and the planned windows without a manifest row (this package: one
    read into :class:`DoneWindows`, binary search; a baseline without it: the listing, the done ids,
    then ``is_in``). Returns the number of windows to do."""
    import pyarrow.compute as pc

    from cameo_corr.cache.location import CacheLocation
    from cameo_corr.cache.manifest import read_manifest
    from cameo_corr.cache.reader import CorrCache
    from cameo_corr.cache.writer import CacheWriter

    writer = CacheWriter(path, CorrCache(path).config)
    try:
        from cameo_corr.cache.done import DoneWindows
    except ImportError:
        writer.repair_missing_shards()
        done = read_manifest(CacheLocation(path), columns=["window_id"]).column("window_id").combine_chunks()
        return planned.filter(pc.invert(pc.is_in(planned.column("window_id"), value_set=done))).num_rows
    found = DoneWindows.read(CacheLocation(path))
    writer.repair_missing_shards(referenced=found.shards)
    return found.todo(planned).num_rows


def measure(step: str, path: Path) -> dict[str, float]:
    """One step, in this (fresh) process (module imports done before the clock starts)."""
    from cameo_corr.cache.reader import CorrCache
    from cameo_corr.cache.writer import CacheWriter
    from cameo_corr.train.data import CorrStreamDataset

    _warm_imports()
    planned = planned_ids(path) if step == "resume" else None
    base = _rss_mb()
    t0 = time.perf_counter()
    out: dict[str, float] = {}
    if step == "open":
        n = len(CorrCache(path).window_ids())
        out["windows"] = n
    elif step == "resume":
        out["todo"] = resume_startup(path, planned)
    elif step == "dataset":
        ds = CorrStreamDataset(path, num_views=2, resolution=64)
        out["s"] = time.perf_counter() - t0
        out["added_rss_mb"] = _rss_mb() - base
        out.update(worker_side(ds, time.perf_counter, "s"))
        return out
    elif step in ("stats", "verify16"):
        out.update(read_step(step, path))
    elif step == "window":
        cache = CorrCache(path)
        ids = cache.window_ids()
        rng = np.random.default_rng(0)
        cache.window(ids[0])
        times = []
        for i in rng.choice(len(ids), size=50, replace=False):
            t1 = time.perf_counter()
            cache.window(ids[i])
            times.append(time.perf_counter() - t1)
        out["s"] = float(np.median(times))
        out["rss_mb"] = _rss_mb()
        return out
    elif step == "compact":
        CacheWriter(path, CorrCache(path).config).consolidate()
    else:
        raise ValueError(step)
    out["s"] = time.perf_counter() - t0
    out["rss_mb"] = _rss_mb()
    return out


def run_step(step: str, path: Path) -> dict[str, float]:
    """:func:`measure` in a fresh interpreter (clean caches of this process, its own peak RSS)."""
    proc = subprocess.run([sys.executable, __file__, "--measure", step, "--cache", str(path)],
                          capture_output=True, text=True, env=os.environ)
    if proc.returncode:
        raise RuntimeError(f"step {step} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------ manifest at scale
HEX = np.array([list(f"{b:02x}".encode()) for b in range(256)], dtype=np.uint8)


def _hex16_bytes(values: np.ndarray) -> np.ndarray:
    """uint64 values as 16-character hex ids (numpy ``S16``, vectorised)."""
    digits = HEX[values.astype(">u8").view(np.uint8).reshape(-1, 8)].reshape(-1, 16)
    return np.ascontiguousarray(digits).view("S16").ravel()


def _hex16(values: np.ndarray) -> Any:
    """uint64 values as 16-character hex strings (an Arrow string array)."""
    import pyarrow as pa

    return pa.array(_hex16_bytes(values)).cast(pa.string())


def _mix(values: np.ndarray, salt: int) -> np.ndarray:
    """A bijection of uint64 (odd multiplier, xor-shift): distinct inputs give distinct, scattered ids."""
    x = (values.astype(np.uint64) + np.uint64(salt)) * np.uint64(0x9E3779B97F4A7C15)
    return x ^ (x >> np.uint64(29))


def fake_rows(index: np.ndarray, views: int) -> Any:
    """Manifest rows of windows ``index`` (ok, shards of 64 consecutive windows, S=``views``), built with
    Arrow kernels only (no Python object per row)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    n = len(index)
    scene = pc.binary_join_element_wise("scene", pc.utf8_lpad(pa.array(index // 10).cast(pa.string()), 7, "0"), "")
    flat = np.repeat(index, views)
    suffix = pa.array(np.tile([f"-{v}" for v in range(views)], n))
    frames = pc.binary_join_element_wise(pa.array(flat).cast(pa.string()), suffix, "")
    paths = pc.binary_join_element_wise(pc.take(scene, pa.array(np.repeat(np.arange(n), views))), "/", frames, ".jpg", "")
    offsets = pa.array(np.arange(0, n * views + 1, views, dtype=np.int32))
    from cameo_corr.schemas import manifest_schema

    return pa.Table.from_arrays([
        _hex16(_mix(index, 1)), pa.array(["synthetic"] * n), pa.array(["train"] * n), scene,
        pa.ListArray.from_arrays(offsets, frames), pa.ListArray.from_arrays(offsets, paths),
        _hex16(_mix(index // SHARD_SIZE, 2)), pa.array((index % SHARD_SIZE).astype(np.int32)),
        pa.array(np.full(n, views, np.int32)), pa.array(np.ones(n, np.float32)), pa.array(np.ones(n, np.float32)),
        pa.array(["ok"] * n), pa.nulls(n, pa.string()), pa.array(np.full(n, 44_719, np.int64)),
    ], schema=manifest_schema())


def build_manifest_only(path: Path, windows: int, offset: int = 0) -> dict[str, float]:
    """A fake cache whose manifest is what periodic consolidation leaves after ``windows`` windows
    (rounds of ``CONSOLIDATE_EVERY`` shards of 64 merged as the binary counter does: a few sorted parts)
    and whose shard files are EMPTY placeholders: for the manifest steps only (compact, resume, merge),
    which never open a shard. Windows ``offset .. offset+windows-1`` (another offset: disjoint ids)."""
    import pyarrow.parquet as pq

    from cameo_corr.cache.consolidation import _parts_to_merge
    from cameo_corr.cache.location import CacheLocation
    from cameo_corr.schemas import manifest_schema

    t0 = time.perf_counter()
    per_round = CONSOLIDATE_EVERY * SHARD_SIZE
    sizes: list[int] = []
    for start in range(0, windows, per_round):
        sizes.append(min(per_round, windows - start))
        first = _parts_to_merge(sizes)
        sizes[first:] = [sum(sizes[first:])]
    loc = CacheLocation(path)
    loc.write_bytes_atomic("cache.json", fake_config(path.parent / "no-dataset").to_json().encode())
    (path / "manifest").mkdir(parents=True, exist_ok=True)
    (path / "shards").mkdir(parents=True, exist_ok=True)
    parts, files, start = [], [], offset
    for gen, size in enumerate(sizes, start=1):
        index = np.arange(start, start + size, dtype=np.int64)
        index = index[np.argsort(_hex16_bytes(_mix(index, 1)), kind="stable")]
        names = []
        for k, lo in enumerate(range(0, size, 4_194_304)):
            name = f"compact-{gen:06d}-{k:05d}.parquet"
            with pq.ParquetWriter(path / "manifest" / name, manifest_schema(), compression="zstd") as w:
                for c in range(lo, min(lo + 4_194_304, size), 65_536):
                    w.write_table(fake_rows(index[c : min(c + 65_536, lo + 4_194_304, size)], VIEWS), row_group_size=65_536)
            names.append(name)
        parts.append({"files": names, "rows": size})
        files += names
        start += size
    shard_ids = _hex16(_mix(np.arange(offset // SHARD_SIZE, (offset + windows - 1) // SHARD_SIZE + 1), 2)).to_pylist()
    for sid in shard_ids:
        (path / "shards" / f"{sid}.zarr.zip").touch()
    info = {"schema_version": 2, "files": files, "fragments": sorted(shard_ids), "rows": windows, "parts": parts}
    loc.write_bytes_atomic("manifest/consolidated.json", json.dumps(info).encode())
    return {"build_s": time.perf_counter() - t0, "parts": len(parts)}


def measure_manifest(step: str, path: Path, other: Path | None) -> dict[str, float]:
    """A manifest step on ``path`` with whatever package version is importable (ours or a baseline):
    ``compact`` (``cache compact``: every part and fragment into one part), ``resume`` (a resumed job's
    start-up: orphan-free cache, repair listing, done ids, planned minus done; the planned ids are read
    before the clock), ``merge`` (``cache merge path other``). Returns wall and CPU seconds, peak RSS."""

    from cameo_corr.cache.consolidation import consolidate_manifest
    from cameo_corr.cache.location import CacheLocation
    from cameo_corr.cache.merge import merge_caches

    _warm_imports()
    loc = CacheLocation(path)
    planned = planned_ids(path) if step == "resume" else None
    t0, c0 = time.perf_counter(), time.process_time()
    out: dict[str, float] = {}
    if step == "compact":
        out["rows"] = consolidate_manifest(loc, full=True)["rows"]
    elif step == "resume":
        out["todo"] = resume_startup(path, planned)
    elif step == "merge":
        out["rows"] = merge_caches([path, other], path.parent / f"{path.name}-merged").windows_ok
    else:
        raise ValueError(step)
    out.update(s=time.perf_counter() - t0, cpu_s=time.process_time() - c0, rss_mb=_rss_mb())
    return out


def run_manifest_step(step: str, path: Path, other: Path | None = None, code: Path | None = None) -> dict[str, float]:
    """:func:`measure_manifest` in a fresh interpreter, on this checkout's package or the one under ``code``."""
    env = dict(os.environ)
    if code is not None:
        env["PYTHONPATH"] = str(code)
    cmd = [sys.executable, __file__, "--measure", f"manifest-{step}", "--cache", str(path), "--views", str(VIEWS)]
    proc = subprocess.run(cmd + (["--other", str(other)] if other else []), capture_output=True, text=True, env=env)
    if proc.returncode:
        raise RuntimeError(f"manifest step {step} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def manifest_steps(cache: Path, small: Path, work: Path, code: Path | None) -> dict[str, dict[str, float]]:
    """``resume_fragments`` (when ``cache`` has fragments), ``compact``, ``resume`` and ``merge`` (with
    ``small``), each on a hard-linked copy of ``cache`` (steps change the copy, never ``cache``)."""
    from cameo_corr.cache.location import CacheLocation
    from cameo_corr.cache.manifest import fragment_names

    out: dict[str, dict[str, float]] = {}
    copy = work / f"{cache.name}-copy"
    if fragment_names(CacheLocation(cache)):
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(cache, copy, copy_function=os.link)
        out["resume_fragments"] = run_manifest_step("resume", copy, code=code)
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(cache, copy, copy_function=os.link)
    out["compact"] = run_manifest_step("compact", copy, code=code)
    out["resume"] = run_manifest_step("resume", copy, code=code)
    shutil.rmtree(work / f"{copy.name}-merged", ignore_errors=True)
    out["merge"] = run_manifest_step("merge", copy, small, code=code)
    shutil.rmtree(work / f"{copy.name}-merged", ignore_errors=True)
    shutil.rmtree(copy, ignore_errors=True)
    return out


MANIFEST_ROWS = [("resume_fragments", "resume start-up, fragments only"), ("compact", "cache compact"),
                 ("resume", "resume start-up, consolidated"), ("merge", "cache merge with a cache of N/10")]


def manifest_report(results: dict[int, dict[str, dict[str, dict[str, float]]]]) -> str:
    """The manifest table: CPU seconds and peak RSS per step, ours and the baseline side by side, with
    the baseline/ours ratios and the growth per 10x."""
    scales = sorted(results)
    lines = ["| manifest step (CPU s / peak RSS MB) | " + " | ".join(f"{n:,} windows" for n in scales) + " | growth per 10x (ours) |",
             "|" + "---|" * (len(scales) + 2)]
    for step, name in MANIFEST_ROWS:
        for variant in ("ours", "baseline"):
            got = [results[n].get(variant, {}).get(step) for n in scales]
            if not any(got):
                continue
            cells = [f"{g['cpu_s']:.3g} s / {g['rss_mb']:.0f} MB" if g else "-" for g in got]
            growth = ", ".join(f"{b['cpu_s'] / a['cpu_s']:.1f}x / {b['rss_mb'] / a['rss_mb']:.1f}x" for a, b in zip(got, got[1:])
                               if a and b) if variant == "ours" else ""
            lines.append(f"| {name}: {variant} | " + " | ".join(cells) + f" | {growth} |")
        ratios = [(results[n].get("baseline", {}).get(step), results[n].get("ours", {}).get(step)) for n in scales]
        if any(b and o for b, o in ratios):
            lines.append(f"| {name}: baseline / ours | " + " | ".join(
                f"{b['cpu_s'] / o['cpu_s']:.2f}x CPU, {b['rss_mb'] / o['rss_mb']:.2f}x RSS" if b and o else "-" for b, o in ratios) + " | |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------ planning
def build_re10k_root(root: Path, clips: int, frames: int = 150) -> None:
    """Camera files of ``clips`` clips x ``frames`` frames; the frames of a clip are hard links to one
    JPEG (file systems cap the links of one file, so one file per clip)."""
    import io

    from PIL import Image

    (root / "test").mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    Image.new("RGB", (640, 360), (90, 120, 150)).save(buffer, format="JPEG", quality=70)
    rng = np.random.default_rng(0)
    for c in range(clips):
        key = f"{c:016x}"
        stamps = 1_000_000 + np.cumsum(rng.integers(190_000, 210_000, size=frames))  # ~6 raw frames apart
        lines = [f"https://www.youtube.com/watch?v={key}"]
        for k, ts in enumerate(stamps):
            lines.append(f"{ts} 0.9 1.6 0.5 0.5 0 0 1 0 0 {0.01 * k:.3f} 0 1 0 0 0 0 1 0")
        (root / "test" / f"{key}.txt").write_text("\n".join(lines) + "\n")
        d = root / "frames" / key
        d.mkdir(parents=True, exist_ok=True)
        first = d / f"{stamps[0]}.jpg"
        first.write_bytes(buffer.getvalue())
        for ts in stamps[1:]:
            os.link(first, d / f"{ts}.jpg")


def measure_plan(root: Path, workers: int) -> dict[str, float]:
    """``plan_table`` of the whole root with ``workers`` processes (code without the option: one)."""
    import inspect

    from cameo_corr.datasets.re10k import RE10KReader

    try:
        from cameo_corr.datasets.planner import default_plan_config, plan_table
    except ModuleNotFoundError:  # the --plan-baseline tree: the planner sat in the pipeline package then
        from cameo_corr.pipeline.planner import default_plan_config, plan_table

    reader = RE10KReader(root)
    config = default_plan_config("re10k", views=8, windows_per_scene=10)
    fingerprint = {"schema_version": 1, "grid": [32, 32], "tau": 1.5, "backend": {"name": "vggt"}, "crop": {"policy": "center", "size": 512}}
    plan_table(reader, config, fingerprint, scene_ids=reader.scene_ids()[:1])  # imports, warm
    options = {"workers": workers} if "workers" in inspect.signature(plan_table).parameters else {}
    base = _rss_mb()
    t0, c0 = time.perf_counter(), time.process_time()
    table = plan_table(RE10KReader(root), config, fingerprint, **options)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    ids = table.column("window_id").to_pylist()
    return {"s": seconds, "cpu_s": cpu + children.ru_utime + children.ru_stime, "workers": options.get("workers", 1),
            "windows": table.num_rows, "failed": table.num_rows - table.column("error").null_count,
            "rss_mb": _rss_mb(), "added_rss_mb": _rss_mb() - base, "worker_rss_mb": children.ru_maxrss / 1024.0,
            "table_mb": table.nbytes / 2**20, "ids_sha256": hashlib.sha256("\n".join(ids).encode()).hexdigest()}


def baseline_code(ref: str, into: Path) -> Path:
    """The package at git ``ref`` of this repository, extracted under ``into`` (for side-by-side runs)."""
    repo = Path(__file__).resolve().parents[1]
    out = into / f"baseline-{ref}"
    if not (out / "cameo_corr").is_dir():
        out.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "archive", ref, "cameo_corr"], cwd=repo, check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(out)], input=archive, check=True)
    return out


def run_plan(root: Path, workers: int, code: Path | None = None) -> dict[str, float]:
    """:func:`measure_plan` in a fresh interpreter, on this checkout's package or the one under ``code``."""
    env = dict(os.environ)
    if code is not None:
        env["PYTHONPATH"] = str(code)
    proc = subprocess.run([sys.executable, __file__, "--measure", "plan", "--cache", str(root), "--plan-workers", str(workers)],
                          capture_output=True, text=True, env=env)
    if proc.returncode:
        raise RuntimeError(f"planning failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def plan_report(plans: dict[int, dict[str, list[dict[str, float]]]]) -> str:
    """The planning table: medians per variant, the baseline ratio, and the 67k-clip projection."""
    clips = sorted(plans)
    med = {c: {k: {f: float(np.median([r[f] for r in runs])) for f in ("s", "cpu_s", "rss_mb", "worker_rss_mb", "windows")}
               for k, runs in plans[c].items()} for c in clips}
    variants = sorted({k for c in clips for k in plans[c]}, key=lambda k: (k != "baseline", k))
    lines = ["| planning (10 windows of S=8 per clip), medians | " + " | ".join(f"{c:,} clips x 150 frames" for c in clips) + " |",
             "|" + "---|" * (len(clips) + 1)]
    for k in variants:
        for f, name in (("s", "seconds"), ("cpu_s", "CPU seconds (all processes)"), ("rss_mb", "peak RSS, planning process (MB)"),
                        ("worker_rss_mb", "peak RSS, one worker (MB)")):
            if f == "worker_rss_mb" and not any(med[c].get(k, {}).get(f) for c in clips):
                continue  # no worker processes
            lines.append(f"| {k}: {name} | " + " | ".join(f"{med[c][k][f]:.3g}" if k in med[c] else "-" for c in clips) + " |")
    for k in variants:
        if k != "baseline":
            lines.append(f"| baseline / {k} (time) | " + " | ".join(
                f"{med[c]['baseline']['s'] / med[c][k]['s']:.2f}x" if "baseline" in med[c] and k in med[c] else "-" for c in clips) + " |")
    lines.append("| planned windows | " + " | ".join(f"{int(med[c][variants[-1]]['windows']):,}" for c in clips) + " |")
    best = min((med[clips[-1]][k]["s"] / clips[-1], k) for k in variants if k != "baseline")
    lines.append(f"\nfastest ({best[1]}): {1000 * best[0]:.2f} ms per clip at {clips[-1]:,} clips -> 67,000 clips ~ "
                 f"{67_000 * best[0]:.0f} s (target <= 60 s, <= 1 GB)")
    return "\n".join(lines)


# ------------------------------------------------------------------------------ read side at 10M windows
READ_VIEWS = 8
"""S of the windows of the read-side caches (the read-side targets are stated for S=8)."""
READ_STEPS = ("ids", "stats", "verify16", "dataset")
READ_BASELINE = "064e384"
"""The reader and loader before issue 20's read side (window ids as a list of str, per-window columns)."""


def _hex_ids(rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` distinct random 16-hex-digit ids (what window ids look like) as ``S16``, vectorised."""
    lut = np.frombuffer(b"".join(f"{b:02x}".encode() for b in range(256)), dtype=np.uint8).reshape(256, 2)
    while True:
        ids = np.ascontiguousarray(lut[rng.integers(0, 256, size=(n, 8), dtype=np.uint8)].reshape(n, 16)).view("S16").ravel()
        if len(np.unique(ids)) == n:
            return ids


def _bulk_rows(ids: np.ndarray, first: int, shards: list[str], shard_bytes: list[int], fracs: tuple[float, float]) -> Any:
    """Manifest rows of windows ``first ...`` (ids ``ids``; window ``i``: scene ``i // 10``, frames
    ``i-0 ... i-(S-1)``, shard ``shards[(i - first) // 64]``), built column by column with Arrow."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from cameo_corr.schemas import manifest_schema

    n, S = len(ids), READ_VIEWS
    index = np.arange(first, first + n)
    scene = pc.binary_join_element_wise("scene", pc.utf8_lpad(pc.cast(pa.array(index // 10), pa.string()), 7, "0"), "")
    flat = pc.binary_join_element_wise(pc.cast(pa.array(np.repeat(index, S)), pa.string()),
                                       pc.cast(pa.array(np.tile(np.arange(S), n)), pa.string()), "-")
    paths = pc.binary_join_element_wise(pc.take(scene, pa.array(np.repeat(np.arange(n), S))), flat, "/")
    offsets = pa.array(np.arange(0, S * n + 1, S, dtype=np.int32))
    shard_index = np.arange(n) // SHARD_SIZE
    cols = {
        "window_id": pa.array(ids).cast(pa.string()), "dataset": pa.array(["synthetic"] * n), "split": pa.array(["train"] * n),
        "scene_id": scene, "frame_ids": pa.ListArray.from_arrays(offsets, flat),
        "image_paths": pa.ListArray.from_arrays(offsets, pc.binary_join_element_wise(paths, ".jpg", "")),
        "shard": pc.take(pa.array(shards), pa.array(shard_index)), "row": pa.array(np.arange(n) % SHARD_SIZE, pa.int32()),
        "num_views": pa.array(np.full(n, S), pa.int32()), "valid_frac": pa.array(np.full(n, fracs[0]), pa.float32()),
        "mask_frac": pa.array(np.full(n, fracs[1]), pa.float32()), "status": pa.array(["ok"] * n),
        "error": pa.nulls(n, pa.string()), "shard_bytes": pa.array(np.asarray(shard_bytes)[shard_index], pa.int64()),
    }
    return pa.table(cols, schema=manifest_schema())


def _shard_file(members: dict[str, bytes], meta: dict[str, Any], shard_id: str, windows: dict[str, list[Any]]) -> bytes:
    """A shard file from the encoded members of a template shard and this shard's own ``zarr.json``
    (compact JSON: Python's encoder is ~20x slower with ``indent``)."""
    import io
    import zipfile

    attrs = {**meta["attributes"], "shard_id": shard_id, **windows}
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_STORED) as zf:
        for name in sorted([*members, "zarr.json"]):
            zf.writestr(name, json.dumps({**meta, "attributes": attrs}).encode() if name == "zarr.json" else members[name])
    return out.getvalue()


def build_bulk_cache(path: Path, windows: int) -> dict[str, float]:
    """A fake version 2 cache of ``windows`` windows of S=:data:`READ_VIEWS` in shards of 64, written in
    bulk: ``cache.json`` as the writer writes it; every shard file from the members of one shard encoded
    by the real encoder, with its own ``zarr.json`` (window ids, scenes, frame ids); the manifest in one
    consolidation by the real compact-file writer (:func:`write_compact`). Window ids are random
    16-hex-digit ids. :class:`CacheWriter`'s per-window work (~0.4 ms per window of S=8) would make
    10M windows an hour's build on a shared 2-core machine; the read side sees the same files."""
    import dataclasses
    import io
    import zipfile

    from cameo_corr.cache.consolidation import write_compact
    from cameo_corr.cache.layout import CONFIG_FILE, shard_dir
    from cameo_corr.cache.location import CacheLocation
    from cameo_corr.cache.manifest import read_consolidation
    from cameo_corr.cache.shard import shard_zip_bytes, window_fractions
    from cameo_corr.schemas import shard_id_of

    t0 = time.perf_counter()
    config = dataclasses.replace(fake_config(path.parent / "no-dataset"), views=READ_VIEWS)
    one = {k: v[:1, :1] if k in ("nn", "dist", "mask") else v[:1] for k, v in fake_window_arrays().items()}  # view-constant
    arrays = {k: np.broadcast_to(v, (READ_VIEWS,) * (2 if k in ("nn", "dist", "mask") else 1) + v.shape[2 if k in ("nn", "dist", "mask") else 1:])
              for k, v in one.items()}
    loc = CacheLocation(path)
    loc.write_bytes_atomic(CONFIG_FILE, config.to_json().encode())
    ids = _hex_ids(np.random.default_rng(windows), windows)
    tables, shard_ids = [], []
    templates: dict[int, tuple[dict[str, bytes], dict[str, Any]]] = {}
    (path / "shards").mkdir(exist_ok=True)
    for chunk in range(0, windows, SHARD_SIZE * 4096):
        names, sizes = [], []
        for start in range(chunk, min(chunk + SHARD_SIZE * 4096, windows), SHARD_SIZE):
            wids = [w.decode() for w in ids[start : start + SHARD_SIZE].tolist()]
            W = len(wids)
            meta = {"window_ids": wids, "scene_ids": [f"scene{i // 10:07d}" for i in range(start, start + W)],
                    "frame_ids": [[f"{i}-{v}" for v in range(READ_VIEWS)] for i in range(start, start + W)],
                    "datasets": ["synthetic"] * W, "splits": ["train"] * W}
            sid = shard_id_of(wids)
            if W not in templates:
                blob = shard_zip_bytes(sid, meta, {k: np.stack([arrays[k]] * W) for k in config.stored_keys()}, config)
                with zipfile.ZipFile(io.BytesIO(blob)) as zf:
                    templates[W] = ({n: zf.read(n) for n in zf.namelist() if n != "zarr.json"}, json.loads(zf.read("zarr.json")))
            blob = _shard_file(*templates[W], sid, meta)
            (path / shard_dir(sid)).write_bytes(blob)
            names.append(sid)
            sizes.append(len(blob))
        tables.append(_bulk_rows(ids[chunk : chunk + len(names) * SHARD_SIZE][: windows - chunk], chunk, names, sizes,
                                 window_fractions(arrays)))
        shard_ids += names
    import pyarrow as pa

    write_compact(loc, pa.concat_tables(tables), read_consolidation(loc), shard_ids)
    return {"build_s": time.perf_counter() - t0}


def measure_read(step: str, path: Path) -> dict[str, float]:
    """One read-side step in this (fresh) process: seconds, CPU seconds and peak RSS of the process
    (``rss_mb``, imports included: ``base_rss_mb`` is the peak before the step)."""
    from cameo_corr.cache.reader import CorrCache

    if step == "dataset":  # torch: only in this step's process
        from cameo_corr.train.data import CorrStreamDataset
    _warm_imports()
    out: dict[str, float] = {"base_rss_mb": _rss_mb()}
    t0, c0 = time.perf_counter(), time.process_time()
    if step == "ids":
        ids = CorrCache(path).window_ids()
        out["windows"] = len(ids)
        assert ids[len(ids) // 2] in ids and ids[0] < ids[-1]
    elif step in ("stats", "verify16"):
        out.update(read_step(step, path))
    elif step == "dataset":
        ds = CorrStreamDataset(path, num_views=2, resolution=64)
        out.update(s=time.perf_counter() - t0, cpu_s=time.process_time() - c0, rss_mb=_rss_mb())
        out.update(worker_side(ds, time.process_time, "cpu_s"))
        out["after_rss_mb"] = _rss_mb()
        return out
    else:
        raise ValueError(step)
    out.update(s=time.perf_counter() - t0, cpu_s=time.process_time() - c0, rss_mb=_rss_mb())
    return out


def run_read(step: str, path: Path, code: Path | None = None) -> dict[str, float]:
    """:func:`measure_read` in a fresh interpreter, on this checkout's package or the one under ``code``."""
    env = dict(os.environ)
    if code is not None:
        env["PYTHONPATH"] = str(code)
    proc = subprocess.run([sys.executable, __file__, "--measure", f"read:{step}", "--cache", str(path)],
                          check=False, capture_output=True, text=True, env=env)
    if proc.returncode:
        raise RuntimeError(f"read step {step} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


READ_ROWS = [
    ("ids", "window_ids(): CPU s", "cpu_s", None), ("ids", "  peak RSS (MB)", "rss_mb", 1024.0),
    ("stats", "cache stats: CPU s", "cpu_s", None), ("stats", "  peak RSS (MB)", "rss_mb", 1024.0),
    ("verify16", "verify --max-windows 16: CPU s", "cpu_s", None), ("verify16", "  peak RSS (MB)", "rss_mb", 1024.0),
    ("dataset", "CorrStreamDataset(): CPU s", "cpu_s", 5.0), ("dataset", "  peak RSS (MB)", "rss_mb", 1024.0),
    ("dataset", "  pickled per worker (MB)", "pickled_mb", 100.0), ("dataset", "  unpickle, CPU s", "unpickle_cpu_s", None),
    ("dataset", "  epoch order, CPU s", "epoch_order_cpu_s", None),
]


def read_report(results: dict[int, dict[str, dict[str, dict[str, float]]]]) -> str:
    """The read-side table: medians per variant (this code, the baseline) at each scale, with targets."""
    lines = []
    for n, variants in sorted(results.items()):
        names = sorted(variants, key=lambda k: k != "baseline")
        lines += [f"| read side, {n:,} windows of S={READ_VIEWS}, medians | " + " | ".join(names) + " | target |",
                  "|" + "---|" * (len(names) + 2)]
        for step, label, key, target in READ_ROWS:
            vals = [np.median([r[key] for r in variants[v][step]]) if variants[v].get(step) else None for v in names]
            ok = "" if target is None or vals[-1] is None else ("met" if vals[-1] <= target else f"**missed** (<= {target:g})")
            lines.append(f"| {label} | " + " | ".join("-" if v is None else f"{v:.3g}" for v in vals) + f" | {ok} |")
    return "\n".join(lines)


def run_read_side(work: Path, scales: list[int], baseline: str, rounds: int) -> dict[int, dict[str, dict[str, list[dict[str, float]]]]]:
    """Build (once) and measure the read-side steps at each scale, alternating with the baseline code."""
    results: dict[int, dict[str, dict[str, list[dict[str, float]]]]] = {}
    for n in scales:
        path = work / f"bulk-{n}"
        if not (path / "manifest" / "consolidated.json").exists():
            print(f"built {n:,} windows of S={READ_VIEWS} in bulk in {build_bulk_cache(path, n)['build_s']:.0f} s", flush=True)
        variants = {"ours": None, **({"baseline": baseline_code(baseline, work)} if baseline else {})}
        results[n] = {v: {s: [] for s in READ_STEPS} for v in variants}
        for _ in range(rounds):
            for step in READ_STEPS:
                for name, code in variants.items():
                    try:
                        results[n][name][step].append(run_read(step, path, code))
                    except RuntimeError as e:  # e.g. the baseline killed for memory: reported, not fatal
                        print(f"{name} {step}: {str(e).splitlines()[-1]}", flush=True)
                        continue
                    print(f"{n:,} {name} {step}: " + json.dumps(results[n][name][step][-1]), flush=True)
    return results


# ------------------------------------------------------------------------------ report
ROWS = [
    ("compact", "s", "consolidate fragments at job end (s)", None),
    ("periodic", "s", "periodic consolidation, whole job (s)", None),
    ("periodic_compact", "s", "  then at job end (s)", None),
    ("periodic_resume", "s", "resume start-up, <= 255 pending fragments (s)", 5.0),
    ("open", "s", "open + list window ids (s)", 3.0),
    ("resume_fragments", "s", "resume start-up, fragments only (s)", 5.0),
    ("resume", "s", "resume start-up, consolidated (s)", 5.0),
    ("dataset", "s", "CorrStreamDataset construction (s)", 3.0),
    ("dataset", "added_rss_mb", "  added RSS (MB)", 300.0),
    ("dataset", "pickled_mb", "  pickled per worker (MB)", 30.0),
    ("dataset", "unpickle_s", "  unpickle per worker (s)", None),
    ("dataset", "epoch_order_s", "  epoch order per worker (s)", None),
    ("stats", "s", "cache stats (s)", 20.0),
    ("verify16", "s", "cache verify --max-windows 16 (s)", 5.0),
    ("window", "s", "one window read, median (ms)", None),
    ("open", "rss_mb", "open: peak RSS (MB)", None),
]


def table_text(results: dict[int, dict[str, dict[str, float]]], label: str = "windows") -> str:
    scales = sorted(results)
    head = "| step | " + " | ".join(f"{s:,} {label}" for s in scales) + " | growth per 10x | target |"
    lines = [head, "|" + "---|" * (len(scales) + 3)]
    for step, key, name, target in ROWS:
        if not all(step in results[s] and key in results[s][step] for s in scales):
            continue
        vals = [results[s][step][key] * (1000 if name.endswith("(ms)") else 1) for s in scales]
        growth = ", ".join(f"{b / a:.1f}x" if a > 0 else "-" for a, b in zip(vals, vals[1:]))
        ok = "" if target is None else ("met" if vals[-1] <= target else f"**missed** (<= {target:g})")
        lines.append(f"| {name} | " + " | ".join(f"{v:.3g}" for v in vals) + f" | {growth} | {ok} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scales", type=int, nargs="*", default=[10_000, 100_000, 1_000_000])
    p.add_argument("--clips", type=int, nargs="*", default=[670, 6_700], help="RE10K clips (x150 frames) to plan")
    p.add_argument("--plan-workers", type=int, nargs="*", default=[1, 2], help="planning processes to measure")
    p.add_argument("--plan-rounds", type=int, default=3, help="alternating rounds of the planning variants")
    p.add_argument("--plan-baseline", default=PLAN_BASELINE,
                   help=f"git ref of the planner to compare with ('' for none; default {PLAN_BASELINE}: before batched reading)")
    p.add_argument("--baseline-max-clips", type=int, default=6_700, help="plan the baseline only up to this many clips")
    p.add_argument("--work", type=Path, default=None, help="where to build (default: a temporary directory)")
    p.add_argument("--keep", action="store_true", help="keep the built caches and roots")
    p.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    p.add_argument("--views", type=int, default=8, help="views per window (S): the manifest's frame-id and path lists")
    p.add_argument("--manifest-only-from", type=int, default=2_000_000,
                   help="scales from this many windows get a manifest-only cache (empty shard files): manifest steps only")
    p.add_argument("--manifest-baseline", default=MANIFEST_BASELINE,
                   help=f"git ref of the manifest code to compare with ('' for none; default {MANIFEST_BASELINE})")
    p.add_argument("--manifest-baseline-max", type=int, default=1_000_000, help="run the manifest baseline only up to this scale")
    p.add_argument("--manifest-steps-only", action="store_true", help="measure the manifest steps only (no open/dataset/...)")
    p.add_argument("--read-scales", type=int, nargs="*", default=[],
                   help="also measure the read side (window ids, stats, verify-16, dataset) at these scales, S=8 (e.g. 10000000)")
    p.add_argument("--read-baseline", default=READ_BASELINE, help=f"git ref of the read side to compare with ('' for none; default {READ_BASELINE})")
    p.add_argument("--read-rounds", type=int, default=1, help="alternating rounds of the read-side variants")
    p.add_argument("--measure", default=None, help=argparse.SUPPRESS)
    p.add_argument("--cache", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--other", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    global VIEWS
    VIEWS = args.views
    if args.measure and args.measure.startswith("read:"):
        print(json.dumps(measure_read(args.measure[len("read:"):], args.cache)))
        return
    if args.measure:
        if args.measure.startswith("manifest-"):
            print(json.dumps(measure_manifest(args.measure.removeprefix("manifest-"), args.cache, args.other)))
        else:
            print(json.dumps(measure_plan(args.cache, args.plan_workers[0]) if args.measure == "plan" else measure(args.measure, args.cache)))
        return
    from cameo_corr.cache.location import CacheLocation  # not before --measure: a baseline's tree may lack the module
    from cameo_corr.cache.manifest import fragment_names

    work = args.work or Path(tempfile.mkdtemp(prefix="bench-scale-"))
    results: dict[int, dict[str, dict[str, float]]] = {}
    manifest: dict[int, dict[str, dict[str, dict[str, float]]]] = {}
    plans: dict[int, dict[str, list[dict[str, float]]]] = {}
    manifest_code = baseline_code(args.manifest_baseline, work) if args.manifest_baseline else None
    try:
        for n in args.scales:
            path = work / f"cache-{n}"
            if not (path / "cache.json").exists():
                built = build_manifest_only(path, n) if n >= args.manifest_only_from else build_cache(path, n)
                print(f"built {n:,} windows in {built['build_s']:.0f} s", flush=True)
            small = work / f"small-{n}"
            if not (small / "cache.json").exists():
                build_manifest_only(small, max(n // 10, SHARD_SIZE), offset=10**12)
            variants = [("baseline", manifest_code)] if manifest_code and n <= args.manifest_baseline_max else []
            manifest[n] = {name: manifest_steps(path, small, work, code) for name, code in variants + [("ours", None)]}
            print(f"{n:,} manifest: " + json.dumps(manifest[n]), flush=True)
            if args.manifest_steps_only or n >= args.manifest_only_from:
                continue
            results[n] = {}
            if fragment_names(CacheLocation(path)):  # a job killed before consolidating (or before periodic consolidation)
                periodic = work / f"cache-{n}-periodic"
                shutil.rmtree(periodic, ignore_errors=True)
                results[n]["periodic"] = replay_periodic(path, periodic)
                results[n]["periodic_resume"] = run_step("resume", periodic)
                results[n]["periodic_compact"] = run_step("compact", periodic)
                shutil.rmtree(periodic)
                results[n]["resume_fragments"] = run_step("resume", path)
                results[n]["compact"] = run_step("compact", path)
            for step in ("open", "resume", "dataset", "stats", "verify16", "window"):
                results[n][step] = run_step(step, path)
            print(f"{n:,}: " + json.dumps(results[n]), flush=True)
        for clips in args.clips:
            root = work / f"re10k-{clips}"
            if not (root / "test").is_dir():
                t0 = time.perf_counter()
                build_re10k_root(root, clips)
                print(f"built a fake RE10K root of {clips:,} clips x 150 frames in {time.perf_counter() - t0:.0f} s", flush=True)
            variants: list[tuple[str, int, Path | None]] = [(f"workers={w}", w, None) for w in args.plan_workers]
            if args.plan_baseline and clips <= args.baseline_max_clips:
                variants.insert(0, ("baseline", 1, baseline_code(args.plan_baseline, work)))
            plans[clips] = {name: [] for name, _, _ in variants}
            for _ in range(args.plan_rounds):  # variants alternate, so load changes hit all of them
                for name, w, code in variants:
                    plans[clips][name].append(run_plan(root, w, code))
                    print(f"plan {clips:,} clips, {name}: " + json.dumps(plans[clips][name][-1]), flush=True)
            digests = {r["ids_sha256"] for runs in plans[clips].values() for r in runs}
            assert len(digests) == 1, f"planned window ids differ between the variants at {clips} clips"
        reads = run_read_side(work, args.read_scales, args.read_baseline, args.read_rounds)
    finally:
        if not args.keep and args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print()
    print(f"load average at the end: {os.getloadavg()[0]:.1f} (2 cores)")
    if results:
        print(table_text(results))
    if manifest:
        print()
        print(manifest_report(manifest))
    if plans:
        print()
        print(plan_report(plans))
    if reads:
        print()
        print(read_report(reads))
    if args.json:
        args.json.write_text(json.dumps({"caches": results, "manifest": manifest, "plans": plans, "reads": reads}, indent=2))


if __name__ == "__main__":
    main()
