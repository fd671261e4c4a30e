"""Cache writer + CorrCache reader: layout, atomicity, orphans, config mixing, fsspec URLs."""

from __future__ import annotations

import json
import os
import pickle
import time

import numpy as np
import pytest
import zarr

from cameo_corr.cache.config import CacheMismatchError
from cameo_corr.cache.layout import fragment_path, shard_dir
from cameo_corr.cache.location import CacheLocation
from cameo_corr.cache.manifest import read_manifest
from cameo_corr.cache.reader import CorrCache
from cameo_corr.cache.shard import window_fractions
from cameo_corr.cache.verify import verify_cache
from cameo_corr.cache.writer import CacheWriter, WindowOutcome
from cameo_corr.schemas import CACHE_ARRAYS, CacheConfig, DatasetError, FrameRecord, SchemaError, WindowRecord, manifest_schema

GRID = (4, 4)
VIEWS = 3


def config(**overrides) -> CacheConfig:
    base = dict(
        grid=GRID,
        tau=1.5,
        views=VIEWS,
        backend={"name": "depth", "version": "1"},
        crop={"policy": "center", "size": 64},
        dataset={"name": "synthetic", "root": "data", "split": "train"},
    )
    base.update(overrides)
    return CacheConfig(**base)


def record(i: int) -> WindowRecord:
    K = np.array([[50.0, 0, 32], [0, 50.0, 32], [0, 0, 1]])
    frames = tuple(FrameRecord(f"{i}-{v}", f"scene{i % 2}/{v}.png", (64, 64), K, np.eye(4)) for v in range(VIEWS))
    return WindowRecord(f"w{i:015d}", "synthetic", "train", f"scene{i % 2}", frames)


def token_arrays(seed: int) -> dict[str, np.ndarray]:
    """Schema-valid arrays of one window: brute-force 3D NN between random token pointmaps, cycle mask."""
    rng = np.random.default_rng(seed)
    h, w = GRID
    hw = h * w
    pts = rng.normal(size=(VIEWS, h, w, 3)).astype(np.float16)
    valid = rng.random((VIEWS, h, w)) > 0.2
    flat = pts.reshape(VIEWS, hw, 3).astype(np.float64)
    vflat = valid.reshape(VIEWS, hw)
    nn = np.zeros((VIEWS, VIEWS, hw), np.int16)
    dist = np.full((VIEWS, VIEWS, hw), np.inf, np.float16)
    mask = np.zeros((VIEWS, VIEWS, hw), bool)
    xy = np.stack([np.arange(hw) % w, np.arange(hw) // w], -1)
    for i in range(VIEWS):
        nn[i, i] = np.arange(hw)
        dist[i, i] = 0
        mask[i, i] = vflat[i]
        for j in range(VIEWS):
            if i == j:
                continue
            d = np.linalg.norm(flat[i][:, None] - flat[j][None], axis=-1)
            d[:, ~vflat[j]] = np.inf
            nn[i, j] = d.argmin(1)
            dist[i, j] = np.where(vflat[i], d.min(1), np.inf)
            nn[i, j][~vflat[i]] = 0
    for i in range(VIEWS):
        for j in range(VIEWS):
            if i != j:
                cyc = nn[j, i][nn[i, j]]
                mask[i, j] = vflat[i] & (np.linalg.norm(xy - xy[cyc], axis=-1) <= 1.5)
    return {
        "points": pts,
        "valid": valid,
        "conf": np.ones((VIEWS, h, w), np.float16),
        "nn": nn,
        "dist": dist,
        "mask": mask,
        "intrinsics": np.tile(np.eye(3, dtype=np.float32), (VIEWS, 1, 1)),
        "extrinsics": np.tile(np.eye(4, dtype=np.float32), (VIEWS, 1, 1)) + seed,
    }


def outcomes(ids, failed=()) -> list[WindowOutcome]:
    return [
        WindowOutcome(record(i), error=f"DatasetError: frame {i} missing") if i in failed else WindowOutcome(record(i), arrays=token_arrays(i))
        for i in ids
    ]


@pytest.fixture(params=["local", "file", "memory"])
def cache_path(request, tmp_path):
    if request.param == "local":
        yield str(tmp_path / "cache")
        return
    if request.param == "file":
        yield f"file://{tmp_path}/cache"
        return
    import fsspec

    url = f"memory://cameo-test-{tmp_path.name}/cache"
    yield url
    fsspec.filesystem("memory").rm(url.removeprefix("memory://"), recursive=True)


def test_write_read_roundtrip(cache_path):
    writer = CacheWriter(cache_path, config())
    writer.initialize()
    t1 = writer.write_shard("aaaa", outcomes([0, 1, 2], failed=(1,)))
    writer.write_shard("bbbb", outcomes([3]))
    assert t1.schema.equals(manifest_schema(), check_metadata=False)

    cache = CorrCache(cache_path)
    assert cache.config.grid == GRID and cache.config.views == VIEWS
    assert set(cache.window_ids()) == {record(i).window_id for i in (0, 2, 3)}
    assert cache.manifest(None).num_rows == 4
    (failed,) = cache.manifest("failed").to_pylist()
    assert failed["window_id"] == record(1).window_id and failed["shard"] is None and failed["row"] is None
    assert "frame 1 missing" in failed["error"] and np.isnan(failed["valid_frac"])
    for i in (0, 2, 3):
        wid = record(i).window_id
        got = cache.window(wid)
        want = token_arrays(i)
        for name, spec in CACHE_ARRAYS.items():
            assert got[name].dtype == spec.dtype and np.array_equal(got[name], want[name]), name
        row = cache.row(wid)
        assert row["status"] == "ok" and row["frame_ids"] == record(i).frame_ids
        assert row["valid_frac"] == pytest.approx(window_fractions(want)[0])
        assert row["mask_frac"] == pytest.approx(window_fractions(want)[1])
    assert cache.row(record(2).window_id)["row"] == 1  # ok windows are packed: the failed one takes no row
    tens = cache.window(record(0).window_id, torch=True)
    import torch

    assert isinstance(tens["nn"], torch.Tensor) and tens["nn"].dtype == torch.int16
    with pytest.raises(KeyError, match="failed during preprocessing"):
        cache.window(record(1).window_id)
    with pytest.raises(KeyError, match="not in the manifest"):
        cache.row("nope")
    group = cache.open_shard("aaaa")
    assert group.attrs["window_ids"] == [record(0).window_id, record(2).window_id]
    assert group["nn"].shards == group["nn"].shape and group["nn"].chunks[0] == 2  # min(CHUNK_WINDOWS, W)


def test_one_file_per_shard_checksummed_consolidated(tmp_path):
    import zipfile

    writer = CacheWriter(tmp_path / "c", config())
    writer.initialize()
    rows = writer.write_shard("s1", outcomes([0, 1, 2]))
    shards = list((tmp_path / "c" / "shards").iterdir())
    assert [p.name for p in shards] == ["s1.zarr.zip"] and shards[0].is_file()
    assert rows.column("shard_bytes").to_pylist() == [shards[0].stat().st_size] * 3
    with zipfile.ZipFile(shards[0]) as zf:
        names = zf.namelist()
        meta = json.loads(zf.read("zarr.json"))
        dist = json.loads(zf.read("dist/zarr.json"))
    assert len([n for n in names if "/c/" in n]) == len(CACHE_ARRAYS)  # one zarr shard object per array
    assert set(meta["consolidated_metadata"]["metadata"]) == set(CACHE_ARRAYS)
    assert meta["attributes"]["frame_ids"][1] == record(1).frame_ids
    inner = [c["name"] for c in dist["codecs"][0]["configuration"]["codecs"]]
    assert inner[-2:] == ["zstd", "crc32c"]  # checksum of the compressed bytes
    arr = CorrCache(tmp_path / "c").open_shard("s1")["dist"]
    assert arr.shards == (3, VIEWS, VIEWS, 16) and arr.chunks[0] == 3


def _flip_chunk_byte(path, array: str, offset: int = 5) -> None:
    """Flip one byte of the first inner chunk (window row 0) of ``array`` in a shard zip file."""
    import zipfile

    with zipfile.ZipFile(path) as zf:
        (info,) = [i for i in zf.infolist() if i.filename.startswith(f"{array}/c/")]
    data = bytearray(path.read_bytes())
    data[info.header_offset + 30 + len(info.filename) + offset] ^= 0x5A
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("array", ["points", "dist", "extrinsics", "mask"])
def test_flipped_byte_raises_naming_cache_shard_array_window(tmp_path, array):
    from cameo_corr.cache.shard import CHUNK_WINDOWS, CorruptCacheError

    writer = CacheWriter(tmp_path / "c", config())
    writer.initialize()
    writer.write_shard("s1", outcomes(range(CHUNK_WINDOWS + 1)))
    _flip_chunk_byte(tmp_path / "c" / shard_dir("s1"), array)  # the chunk of windows 0..7
    cache = CorrCache(tmp_path / "c")
    with pytest.raises(CorruptCacheError) as info:
        cache.window(record(0).window_id)
    e = info.value
    assert (e.shard, e.array, e.window) == ("s1", array, record(0).window_id)
    assert str(tmp_path / "c") in str(e) and array in str(e) and record(0).window_id in str(e)
    last = record(CHUNK_WINDOWS).window_id  # in the next chunk: intact
    assert np.array_equal(cache.window(last)[array], token_arrays(CHUNK_WINDOWS)[array])
    bad = cache.corrupt_windows("s1")
    assert [(b.array, b.window) for b in bad] == [(array, record(i).window_id) for i in range(CHUNK_WINDOWS)]
    with pytest.raises(CorruptCacheError, match=record(0).window_id):
        cache.read_shard("s1", [array])


def test_manifest_consolidation_sorted_and_readers_merge_newer_fragments(tmp_path):
    import pyarrow.parquet as pq

    from cameo_corr.cache.consolidation import consolidate_manifest
    from cameo_corr.cache.layout import CONSOLIDATED_FILE
    from cameo_corr.cache.manifest import finished_shard_ids

    path = tmp_path / "c"
    writer = CacheWriter(path, config())
    writer.initialize()
    writer.write_shard("b", outcomes([5, 1]))
    writer.write_shard("a", outcomes([3, 4], failed=(4,)))
    before = sorted(map(str, read_manifest(writer.location).to_pylist()))
    fragment_a = (path / fragment_path("a")).read_bytes()
    info = writer.consolidate()
    assert info["fragments"] == ["a", "b"] and info["rows"] == 4
    assert sorted(p.name for p in (path / "manifest").iterdir()) == ["compact-000001-00000.parquet", "consolidated.json"]
    compact = pq.read_table(path / "manifest" / info["files"][0])
    assert compact.column("window_id").to_pylist() == sorted(compact.column("window_id").to_pylist())
    assert sorted(map(str, read_manifest(writer.location).to_pylist())) == before
    assert finished_shard_ids(writer.location) == {"a", "b"}
    assert writer.remove_orphans() == []  # consolidated shards are finished, not orphans
    shard_file = (path / shard_dir("a")).read_bytes()
    rows = writer.write_shard("a", outcomes([3, 4]))  # finished: rows returned from the consolidated file
    assert rows.column("window_id").to_pylist() == [record(3).window_id, record(4).window_id]
    assert (path / shard_dir("a")).read_bytes() == shard_file and not (path / fragment_path("a")).exists()
    writer.write_shard("c", outcomes([7]))  # newer than the consolidation: a pending fragment
    cache = CorrCache(path)
    assert cache.window_ids() == sorted(record(i).window_id for i in (1, 3, 5, 7))
    assert np.array_equal(cache.window(record(7).window_id)["nn"], token_arrays(7)["nn"])
    assert cache.row(record(4).window_id)["status"] == "failed"
    # a crash after writing consolidated.json but before deleting fragments: no duplicate rows
    (path / fragment_path("a")).write_bytes(fragment_a)
    assert len(writer.done_window_ids()) == 5 == len(set(writer.done_window_ids().to_pylist()))
    info2 = consolidate_manifest(writer.location)
    # incremental: the new fragment (c) becomes a second part; the older, larger part is not rewritten
    assert info2["files"] == ["compact-000001-00000.parquet", "compact-000002-00000.parquet"] and info2["rows"] == 5
    assert [q["rows"] for q in info2["parts"]] == [4, 1]
    assert json.loads((path / CONSOLIDATED_FILE).read_text())["fragments"] == ["a", "b", "c"]
    assert len(set(writer.done_window_ids().to_pylist())) == len(writer.done_window_ids()) == 5


def test_fragment_stores_the_resume_columns_uncompressed(tmp_path):
    """A fragment's window_id and shard column chunks (what a resumed job reads from every pending
    fragment) are stored uncompressed, every other column zstd; its footer holds no serialized Arrow
    schema and no statistics; the rows read back unchanged, with the manifest schema."""
    import pyarrow.parquet as pq

    from cameo_corr.cache.done import DoneWindows
    from cameo_corr.cache.manifest import FRAGMENT_PLAIN_COLUMNS

    writer = CacheWriter(tmp_path / "c", config())
    writer.initialize()
    rows = writer.write_shard("a", outcomes([3, 4], failed=(4,)))
    footer = pq.read_metadata(tmp_path / "c" / fragment_path("a"))
    meta = footer.row_group(0)
    codecs = {meta.column(i).path_in_schema.split(".")[0]: meta.column(i).compression for i in range(meta.num_columns)}
    assert set(codecs) == set(rows.column_names) and set(FRAGMENT_PLAIN_COLUMNS) == {"window_id", "shard"}
    assert codecs == {c: "UNCOMPRESSED" if c in FRAGMENT_PLAIN_COLUMNS else "ZSTD" for c in codecs}
    assert b"ARROW:schema" not in (footer.metadata or {})
    assert not any(meta.column(i).is_stats_set for i in range(meta.num_columns))
    got = read_manifest(writer.location)
    assert got.schema.equals(manifest_schema(), check_metadata=False)
    assert str(got.to_pylist()) == str(rows.to_pylist())  # NaN fractions of the failed row compare as text
    done = DoneWindows.read(writer.location)
    assert done.contains(rows.column("window_id")).all() and done.shards == {"a"}


def test_fragments_written_before_the_slim_footer_still_read(tmp_path):
    """A cache whose pending fragments mix the footer written before (serialized Arrow schema,
    statistics, every column zstd) with today's reads the same rows through the done ids, the
    manifest and a consolidation (a job resumed on a cache an older version started)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from cameo_corr.cache.done import DoneWindows

    writer = CacheWriter(tmp_path / "c", config())
    writer.initialize()
    old = writer.write_shard("a", outcomes([0, 1], failed=(1,)))
    new = writer.write_shard("b", outcomes([2, 3]))
    pq.write_table(old, tmp_path / "c" / fragment_path("a"), compression="zstd")  # the earlier encoding
    assert b"ARROW:schema" in pq.read_metadata(tmp_path / "c" / fragment_path("a")).metadata
    expected = sorted(map(str, old.to_pylist() + new.to_pylist()))  # NaN fractions of the failed row compare as text
    assert sorted(map(str, read_manifest(writer.location).to_pylist())) == expected
    done = DoneWindows.read(writer.location)
    assert done.contains(pa.concat_tables([old, new]).column("window_id")).all() and done.shards == {"a", "b"}
    writer.consolidate(full=True)
    assert not list((tmp_path / "c" / "manifest").glob("part-*"))
    assert sorted(map(str, read_manifest(writer.location).to_pylist())) == expected


def test_unreadable_fragment_is_named(tmp_path):
    """A pending fragment that is not Parquet fails the manifest read with a DatasetError naming it."""
    from cameo_corr.cache.done import DoneWindows

    writer = CacheWriter(tmp_path / "c", config())
    writer.initialize()
    writer.write_shard("a", outcomes([1]))
    writer.write_shard("b", outcomes([2]))
    (tmp_path / "c" / fragment_path("b")).write_bytes(b"not parquet")
    for read in (lambda: read_manifest(writer.location), lambda: DoneWindows.read(writer.location)):
        with pytest.raises(DatasetError, match=r"cannot read the manifest fragment part-b\.parquet"):
            read()


def _manifest_rows(writer: CacheWriter) -> list[str]:
    """The manifest's rows, sorted, as text (NaN fractions of failed rows compare equal)."""
    return [str(r) for r in sorted(read_manifest(writer.location).to_pylist(), key=lambda r: r["window_id"])]


def test_incremental_consolidation_keeps_few_parts(tmp_path):
    """Each consolidation appends a part; the newest merge while they hold as many rows as the one
    before (a binary counter): after n single-row consolidations the parts are n's binary digits."""
    from cameo_corr.cache.consolidation import consolidate_manifest
    from cameo_corr.cache.layout import CONSOLIDATED_FILE

    path = tmp_path / "c"
    writer = CacheWriter(path, config())
    writer.initialize()
    for n in range(1, 12):
        writer.write_shard(f"s{n:02d}", outcomes([n], failed=(5,)))
        info = writer.consolidate()
        assert [q["rows"] for q in info["parts"]] == [1 << b for b in reversed(range(n.bit_length())) if n >> b & 1], n
        assert sorted(os.listdir(path / "manifest")) == sorted([*info["files"], CONSOLIDATED_FILE.split("/")[1]])
        assert sorted(read_manifest(writer.location).column("window_id").to_pylist()) == sorted(record(i).window_id for i in range(1, n + 1))
    before = _manifest_rows(writer)
    info = consolidate_manifest(writer.location, full=True)  # cache compact: one part
    assert [q["rows"] for q in info["parts"]] == [11] and len(info["fragments"]) == 11 and _manifest_rows(writer) == before
    assert CorrCache(path).row(record(5).window_id)["status"] == "failed"


def test_a_crash_at_any_step_of_consolidation_loses_nothing(tmp_path, monkeypatch):
    """Kill the consolidation before each of its file operations (every rename that commits a write,
    every delete): the manifest reads the same rows, once each, at every instant; the next run's
    orphan sweep and consolidation finish the job."""
    import shutil

    from cameo_corr.cache.consolidation import consolidate_manifest

    base = tmp_path / "base"
    writer = CacheWriter(base, config())
    writer.initialize()
    writer.write_shard("a", outcomes([0, 1], failed=(1,)))
    writer.consolidate()
    writer.write_shard("b", outcomes([2, 3]))  # pending: appended as a part, then merged with a's
    writer.write_shard("c", outcomes([4]))
    expected = _manifest_rows(writer)

    class Killed(BaseException):
        pass

    real_move, real_remove = CacheLocation.move, CacheLocation.remove
    crash_at = {"n": 0}

    def counted(real):
        def op(self, *args):
            crash_at["n"] -= 1
            if crash_at["n"] < 0:
                raise Killed
            return real(self, *args)
        return op

    ops = 0
    while True:
        path = tmp_path / f"crash{ops}"
        shutil.copytree(base, path)
        loc = CacheLocation(path)
        crash_at["n"] = ops
        with monkeypatch.context() as m:
            m.setattr(CacheLocation, "move", counted(real_move))
            m.setattr(CacheLocation, "remove", counted(real_remove))
            try:
                consolidate_manifest(loc)
                finished = True
            except Killed:
                finished = False
        again = CacheWriter(path, config())
        assert _manifest_rows(again) == expected, ops  # nothing lost, nothing counted twice
        removed = again.remove_orphans()
        assert not any(r.startswith("shards/") for r in removed), removed
        info = again.consolidate()
        assert _manifest_rows(again) == expected and info["rows"] == len(expected) and info["fragments"] == ["a", "b", "c"]
        assert sorted(os.listdir(path / "manifest")) == sorted([*info["files"], "consolidated.json"]), ops
        assert CorrCache(path).window_ids() == sorted(record(i).window_id for i in (0, 2, 3, 4))
        if finished:
            break
        ops += 1
    assert ops == 5  # the merged compact file, the swap, deleting the old part and the two fragments


def test_reader_retries_when_a_consolidation_deletes_files_under_it(tmp_path, monkeypatch):
    from cameo_corr.cache import manifest as cache_module

    writer = CacheWriter(tmp_path / "c", config())
    writer.initialize()
    writer.write_shard("a", outcomes([0]))
    writer.write_shard("b", outcomes([1, 2], failed=(2,)))
    expected = _manifest_rows(writer)
    stale = cache_module.fragment_names(writer.location)
    writer.consolidate()  # between a reader's listing and its reads
    listings = iter([stale])
    real = cache_module.fragment_names
    monkeypatch.setattr(cache_module, "fragment_names", lambda loc: next(listings, None) or real(loc))
    assert _manifest_rows(writer) == expected  # the first attempt hit deleted fragments, the second read the compact part


def test_periodic_consolidation_every_k_shards(tmp_path, monkeypatch):
    from cameo_corr.cache import consolidation as cache_module
    from cameo_corr.cache.consolidation import PeriodicConsolidation
    from cameo_corr.cache.manifest import fragment_names

    path = tmp_path / "c"
    writer = CacheWriter(path, config())
    writer.initialize()
    holds = {"lease": True}
    periodic = PeriodicConsolidation(writer.location, every_shards=3, every_seconds=3600, holds_lease=lambda: holds["lease"])
    for k in range(7):
        writer.write_shard(f"s{k}", outcomes([k]))
        assert periodic.step() == (k % 3 == 2)  # every third shard
        assert len(fragment_names(writer.location)) == (k + 1) % 3
    assert periodic.rounds == 2 and periodic.merged == {f"part-s{k}.parquet" for k in range(6)}
    periodic.every_seconds = 1e-9  # due by time: whatever is pending
    holds["lease"] = False
    assert not periodic.step() and fragment_names(writer.location) == ["part-s6.parquet"]  # never without the lease
    holds["lease"] = True
    assert periodic.step() and fragment_names(writer.location) == [] and periodic.rounds == 3
    assert sorted(read_manifest(writer.location).column("window_id").to_pylist()) == sorted(record(k).window_id for k in range(7))
    # the thread: consolidates while shards keep arriving
    monkeypatch.setattr(cache_module, "CONSOLIDATE_POLL_SECONDS", 0.01)
    periodic = PeriodicConsolidation(writer.location, every_shards=2, every_seconds=3600).start()
    try:
        for k in range(7, 12):
            writer.write_shard(f"s{k}", outcomes([k]))
        deadline = time.monotonic() + 30
        while len(fragment_names(writer.location)) > 1 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        periodic.stop()
    assert periodic.rounds >= 1 and len(fragment_names(writer.location)) <= 1
    assert sorted(read_manifest(writer.location).column("window_id").to_pylist()) == sorted(record(k).window_id for k in range(12))
    with pytest.raises(ValueError, match="consolidate every"):
        PeriodicConsolidation(writer.location, every_shards=0)


def _write_v1_shard(path, shard_id: str, ids: list[int]) -> None:
    """A schema version 1 shard + fragment, written the way version 1 wrote them (directory group)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from zarr.codecs import ZstdCodec

    group = zarr.open_group(str(path / "shards" / f"{shard_id}.zarr"), mode="w",
                            attributes={"shard_id": shard_id, "window_ids": [record(i).window_id for i in ids], "schema_version": 1})
    for name in CACHE_ARRAYS:
        values = np.stack([token_arrays(i)[name] for i in ids])
        group.create_array(name, data=values, chunks=(1, *values.shape[1:]), shards=values.shape,
                           compressors=ZstdCodec(level=3), fill_value=0)
    rows = [dict(window_id=record(i).window_id, dataset="synthetic", split="train", scene_id=record(i).scene_id,
                 frame_ids=record(i).frame_ids, image_paths=record(i).image_paths, shard=shard_id, row=r, num_views=VIEWS,
                 valid_frac=window_fractions(token_arrays(i))[0], mask_frac=window_fractions(token_arrays(i))[1],
                 status="ok", error=None) for r, i in enumerate(ids)]
    v1_schema = pa.schema([f for f in manifest_schema() if f.name != "shard_bytes"])
    (path / "manifest").mkdir(exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=v1_schema), path / fragment_path(shard_id))


@pytest.fixture
def v1_cache(tmp_path):
    path = tmp_path / "v1"
    path.mkdir()
    (path / "cache.json").write_text(config(schema_version=1).to_json())
    _write_v1_shard(path, "s1", [0, 1])
    _write_v1_shard(path, "s2", [2])
    return path


def test_version1_cache_stays_readable(v1_cache):
    cache = CorrCache(v1_cache)
    assert cache.version == 1
    assert cache.window_ids() == sorted(record(i).window_id for i in range(3))
    for i in range(3):
        got = cache.window(record(i).window_id)
        assert all(np.array_equal(got[n], v) for n, v in token_arrays(i).items())
    assert cache.shard_windows("s1")["frame_ids"] == [record(0).frame_ids, record(1).frame_ids]
    assert cache.manifest(None).column("shard_bytes").null_count == 3
    with pytest.raises(CacheMismatchError, match="cache migrate"):
        CacheWriter(v1_cache, config()).initialize()


def test_migrate_keeps_values_and_window_ids(v1_cache, tmp_path):
    from cameo_corr.cache.migrate import migrate_cache

    counts = migrate_cache(v1_cache, tmp_path / "v2")
    assert counts == {"shards": 2, "windows": 3}
    old, new = CorrCache(v1_cache), CorrCache(tmp_path / "v2")
    assert new.version == 2 and new.config.fingerprint() == old.config.fingerprint()
    assert new.window_ids() == old.window_ids()
    for wid in old.window_ids():
        a, b = old.window(wid), new.window(wid)
        assert all(np.array_equal(a[n], b[n]) for n in CACHE_ARRAYS)
        assert {k: v for k, v in new.row(wid).items() if k != "shard_bytes"} == {
            k: v for k, v in old.row(wid).items() if k != "shard_bytes"}
    assert new.row(record(0).window_id)["shard_bytes"] == (tmp_path / "v2" / shard_dir("s1")).stat().st_size
    CacheWriter(tmp_path / "v2", new.config).initialize()  # a version 2 run may now write into it
    with pytest.raises(SchemaError, match="only version 1"):
        migrate_cache(tmp_path / "v2", tmp_path / "v3")


def test_pickled_cache_reads_in_another_process_style(tmp_path):
    writer = CacheWriter(tmp_path / "c", config())
    writer.initialize()
    writer.write_shard("s1", outcomes([0]))
    cache = CorrCache(tmp_path / "c")
    cache.window(record(0).window_id)
    clone = pickle.loads(pickle.dumps(cache))
    assert np.array_equal(clone.window(record(0).window_id)["nn"], token_arrays(0)["nn"])


def test_cache_json_written_at_first_commit_once_and_mixing_refused(tmp_path):
    path = tmp_path / "c"
    CacheWriter(path, config()).initialize()
    assert not (path / "cache.json").exists()  # nothing committed yet: no config left behind
    CacheWriter(path, config()).write_shard("s0", outcomes([0]))
    first = (path / "cache.json").read_text()
    CacheWriter(path, config(created_by={"time": "later"})).initialize()  # same fingerprint: fine, untouched
    CacheWriter(path, config(created_by={"time": "later"})).write_shard("s1", outcomes([1]))
    assert (path / "cache.json").read_text() == first
    moved = config(dataset={**config().dataset, "root": "/elsewhere"})
    CacheWriter(path, moved).initialize()  # the dataset root is recorded, not part of the identity
    with pytest.raises(CacheMismatchError, match="tau"):
        CacheWriter(path, config(tau=2.0)).initialize()
    with pytest.raises(CacheMismatchError, match="views"):
        CacheWriter(path, config(views=4)).initialize()
    with pytest.raises(CacheMismatchError, match="dataset"):
        CacheWriter(path, config(dataset={"name": "co3d", "root": "data", "split": "train"})).initialize()


def test_missing_or_bad_cache_json(tmp_path, monkeypatch):
    from cameo_corr.cache.lease import CacheLease
    from cameo_corr.cache.location import CacheLocation

    with pytest.raises(DatasetError, match="cache.json is missing$"):
        CorrCache(tmp_path)
    with CacheLease(CacheLocation(tmp_path)).acquire():  # a job that has not committed its first shard yet
        with pytest.raises(DatasetError, match=r"cache.json is missing; lease.json names a job creating it \(.*pid \d+, "
                                               r"lease renewed \d+ s ago\), which writes cache.json with its first shard"):
            CorrCache(tmp_path)
        record = json.loads((tmp_path / "lease.json").read_text())
    import cameo_corr.cache.lease as lease

    def no_store(*args, **kwargs):
        raise AssertionError("a command that only looks chose a lease store (on S3: a probing PUT)")

    monkeypatch.setattr(lease, "lease_store_for", no_store)
    left = [({**record, "renewed": time.time() - 1000}, r"not renewed for \d+ s"),  # a job killed before its first shard
            ({**record, "pid": 2**22 + 7, "process_start": 1}, r"its process \d+ on .* has exited"),
            (None, "the lease file is unreadable")]
    for lease_record, why in left:
        (tmp_path / "lease.json").write_text(json.dumps(lease_record) if lease_record else "{not json")
        with pytest.raises(DatasetError, match=r"cache.json is missing; lease.json was left by a job that ended before writing it "
                                               rf"\(.*: {why}\); re-running preprocess takes the lease over"):
            CorrCache(tmp_path)
    (tmp_path / "cache.json").write_text('{"grid": [4, 4]}')
    with pytest.raises(SchemaError, match="cache.json"):
        CorrCache(tmp_path)


def test_invalid_arrays_rejected_before_anything_is_written(tmp_path):
    writer = CacheWriter(tmp_path / "c", config())
    writer.initialize()
    bad = token_arrays(0)
    bad["nn"] = bad["nn"].astype(np.int32)
    with pytest.raises(SchemaError, match="'nn'"):
        writer.write_shard("s1", [WindowOutcome(record(0), arrays=bad)])
    assert not (tmp_path / "c" / "shards").exists() or not any((tmp_path / "c" / "shards").iterdir())
    assert not (tmp_path / "c" / fragment_path("s1")).exists()


def test_orphans_removed_and_finished_shards_kept(tmp_path):
    path = tmp_path / "c"
    writer = CacheWriter(path, config())
    writer.initialize()
    writer.write_shard("done", outcomes([0]))
    done_bytes = (path / shard_dir("done")).read_bytes()
    # what killed workers leave: a half-written tmp group, a renamed group without fragment,
    # a tmp fragment
    writer.write_shard("nofrag", outcomes([1]))
    (path / fragment_path("nofrag")).unlink()
    tmp_group = path / "shards" / ".tmp-half-1234abcd.zarr"
    tmp_group.mkdir()
    (tmp_group / "zarr.json").write_text("{}")
    (path / "manifest" / ".tmp-part-x.parquet-1234").write_bytes(b"PAR1")
    cache = CorrCache(path)
    assert cache.window_ids() == [record(0).window_id]  # nothing without a fragment is visible
    removed = writer.remove_orphans()
    assert sorted(removed) == sorted(["shards/.tmp-half-1234abcd.zarr", "manifest/.tmp-part-x.parquet-1234", "shards/nofrag.zarr.zip"])
    assert (path / shard_dir("done")).is_file()
    # a finished shard is never rewritten, even when asked to
    rows = writer.write_shard("done", outcomes([5]))
    assert rows.column("window_id").to_pylist() == [record(0).window_id]
    assert (path / shard_dir("done")).read_bytes() == done_bytes
    assert writer.done_window_ids().to_pylist() == [record(0).window_id]


def test_a_finished_shard_whose_file_was_swept_is_written_again(tmp_path):
    """A killed job's writer may rename its shard into place, have it swept as an orphan by the next job
    (no fragment yet), then commit the fragment after that job read what was done: the next job computes
    the shard again and finds rows pointing at a missing file. It writes the file again from the same
    windows (and only from the same windows in the same rows), so no ok row is left without its data."""
    path = tmp_path / "c"
    writer = CacheWriter(path, config())
    writer.initialize()
    writer.write_shard("s", outcomes([0, 1, 2], failed=(1,)))
    original = (path / shard_dir("s")).read_bytes()
    (path / shard_dir("s")).unlink()
    writer.write_shard("s", outcomes([0, 3]))  # other windows than the rows': left to the repair of missing files
    assert not (path / shard_dir("s")).exists()
    rows = writer.write_shard("s", outcomes([0, 1, 2], failed=(1,)))
    assert rows.column("window_id").to_pylist() == [record(i).window_id for i in (0, 1, 2)]
    assert (path / shard_dir("s")).read_bytes() == original
    assert verify_cache(CorrCache(path), deep=True) == []


def test_all_failed_shard_has_fragment_only(tmp_path):
    writer = CacheWriter(tmp_path / "c", config())
    writer.initialize()
    writer.write_shard("f", outcomes([0, 1], failed=(0, 1)))
    assert not (tmp_path / "c" / shard_dir("f")).exists()
    cache = CorrCache(tmp_path / "c")
    assert cache.window_ids() == [] and cache.manifest("failed").num_rows == 2


def test_float16_overflow_is_an_error():
    from cameo_corr.cache.shard import window_arrays
    from cameo_corr.schemas import PointmapResult, TokenCorrespondences
    import torch

    a = token_arrays(0)
    corr = TokenCorrespondences(
        points=torch.from_numpy(a["points"].astype(np.float32) * 1e6),
        valid=torch.from_numpy(a["valid"]),
        conf=torch.from_numpy(a["conf"].astype(np.float32)),
        nn=torch.from_numpy(a["nn"].astype(np.int64)),
        dist=torch.from_numpy(a["dist"].astype(np.float32)),
        mask=torch.from_numpy(a["mask"]),
    )
    res = PointmapResult(None, None, None, torch.from_numpy(a["intrinsics"]).double(), torch.from_numpy(a["extrinsics"]).double())
    with pytest.raises(SchemaError, match="overflow float16"):
        window_arrays(corr, res)
    corr.points = corr.points / 1e6
    arrays = window_arrays(corr, res)
    assert {k: v.dtype for k, v in arrays.items()} == {k: s.dtype for k, s in CACHE_ARRAYS.items()}


def test_location_rejects_storage_options_for_local_paths(tmp_path):
    with pytest.raises(ValueError, match="storage_options"):
        CacheLocation(tmp_path, {"anon": True})


def _object_store_fs_class():
    """A ``memory``-backed fsspec filesystem with the two object-store traits that matter to the cache
    writer (both as in s3fs): a "directory" is only a key prefix, so copying one fails like S3's
    CopyObject on a prefix; and listings are cached per filesystem instance (fsspec's ``dircache``,
    consulted by ``info``/``exists`` through ``_ls_from_cache``), refreshed by the instance's own writes
    and by ``invalidate_cache(path)`` (which drops ``path`` and its parents), never by writes of other
    instances (zarr's store, other processes)."""
    from fsspec.implementations.memory import MemoryFileSystem

    class ObjectStoreFS(MemoryFileSystem):
        protocol = ("objstore",)

        @classmethod
        def _strip_protocol(cls, path):
            return super()._strip_protocol(str(path).removeprefix("objstore://"))

        def invalidate_cache(self, path=None):
            if path is None:
                self.dircache.clear()
                return
            path = self._strip_protocol(path)
            while path:
                self.dircache.pop(path, None)
                path = self._parent(path) if path != "/" else ""

        def ls(self, path, detail=True, **kwargs):
            path = self._strip_protocol(path)
            if path not in self.dircache:
                self.dircache[path] = super().ls(path, detail=True)
            out = self.dircache[path]
            return out if detail else [o["name"] for o in out]

        def info(self, path, **kwargs):
            path = self._strip_protocol(path)
            cached = self._ls_from_cache(path)  # FileNotFoundError when a cached parent listing lacks it
            if cached is None:
                return super().info(path, **kwargs)
            match = [o for o in cached if o["name"].rstrip("/") == path]
            return match[0] if match else {"name": path, "size": 0, "type": "directory"}

        def cp_file(self, path1, path2, **kwargs):
            if not super().isfile(self._strip_protocol(path1)):
                raise FileNotFoundError(f"no object at {path1} (a prefix is not an object)")
            self.dircache.clear()
            super().cp_file(path1, path2, **kwargs)

        def _open(self, path, mode="rb", **kwargs):
            if "r" not in mode:
                self.dircache.clear()
            return super()._open(path, mode, **kwargs)

        def rm(self, path, recursive=False, maxdepth=None):
            self.dircache.clear()
            super().rm(path, recursive=recursive, maxdepth=maxdepth)
            self.dircache.clear()

        def makedirs(self, path, exist_ok=False):
            self.dircache.clear()
            super().makedirs(path, exist_ok=exist_ok)

    return ObjectStoreFS


@pytest.fixture
def object_store(tmp_path):
    """``(filesystem class, cache URL)`` on the object-store double, registered as ``objstore://``."""
    import fsspec

    cls = _object_store_fs_class()
    fsspec.register_implementation("objstore", cls, clobber=True)
    root = f"cameo-objstore-{tmp_path.name}/cache"
    yield cls, f"objstore://{root}"
    memory = fsspec.filesystem("memory")
    if memory.exists(root):
        memory.rm(root, recursive=True)


def test_object_store_moves_shard_groups_file_by_file(object_store):
    """Shard groups are renamed into place on object stores too (regression: fsspec's recursive
    ``mv`` tried to copy the group's key prefixes and failed every shard on s3://)."""
    _, object_store_url = object_store
    writer = CacheWriter(object_store_url, config())
    writer.initialize()
    writer.write_shard("aaaa", outcomes([0, 1]))
    writer.write_shard("aaaa-stale", outcomes([2]))
    writer.location.remove(fragment_path("aaaa-stale"))  # a renamed group without fragment: replaced on rewrite
    writer.write_shard("aaaa-stale", outcomes([2]))
    assert writer.location.listdir("shards") == ["aaaa-stale.zarr.zip", "aaaa.zarr.zip"]  # no temporary file left
    cache = CorrCache(object_store_url)
    assert sorted(cache.window_ids()) == [record(i).window_id for i in (0, 1, 2)]
    for i in (0, 1, 2):
        got = cache.window(record(i).window_id)
        assert all(np.array_equal(got[n], v) for n, v in token_arrays(i).items())


def test_object_store_listings_see_other_writers(object_store):
    """A long-lived process (the job's driver) sees shards other processes wrote since it last listed
    (regression: cached listings hid new manifest fragments, so a finished shard looked unfinished and
    was rewritten, and an in-process reader missed the new windows)."""
    cls, url = object_store
    driver = CacheWriter(url, config())
    driver.initialize()
    driver.write_shard("first", outcomes([0]))
    assert driver.remove_orphans() == [] and driver.done_window_ids().to_pylist() == [record(0).window_id]
    cls.clear_instance_cache()  # a worker process has its own filesystem instance
    CacheWriter(url, config()).write_shard("s1", outcomes([1, 2]))
    assert set(driver.done_window_ids().to_pylist()) == {record(i).window_id for i in (0, 1, 2)}
    assert driver.remove_orphans() == []
    rows = driver.write_shard("s1", outcomes([5]))  # finished elsewhere: returned, never rewritten
    assert rows.column("window_id").to_pylist() == [record(1).window_id, record(2).window_id]
    assert sorted(read_manifest(driver.location).column("window_id").to_pylist()) == [record(i).window_id for i in (0, 1, 2)]


def test_repair_deletes_fragments_of_missing_shards(tmp_path):
    path = tmp_path / "c"
    writer = CacheWriter(path, config())
    writer.write_shard("keep", outcomes([0]))
    writer.write_shard("lost", outcomes([1, 2], failed=(2,)))
    writer.write_shard("failedonly", outcomes([3], failed=(3,)))
    (path / shard_dir("lost")).unlink()
    assert writer.repair_missing_shards() == ["lost"]
    # the ok rows of the lost shard are gone; its failed row never pointed at the file and stays
    assert (path / fragment_path("lost")).exists() and (path / fragment_path("failedonly")).exists()
    assert sorted(writer.done_window_ids().to_pylist()) == sorted([record(i).window_id for i in (0, 2, 3)])
    assert writer.repair_missing_shards() == []


def test_drop_failed_rows_supersedes_without_duplicates(tmp_path):
    path = tmp_path / "c"
    writer = CacheWriter(path, config())
    writer.write_shard("mixed", outcomes([0, 1], failed=(1,)))
    writer.write_shard("failedonly", outcomes([2], failed=(2,)))
    assert sorted(writer.drop_failed_rows()) == sorted([record(1).window_id, record(2).window_id])
    assert not (path / fragment_path("failedonly")).exists()
    assert writer.done_window_ids().to_pylist() == [record(0).window_id]
    assert not any(n.startswith(".tmp-") for n in os.listdir(path / "manifest"))
    writer.write_shard("redo", outcomes([1, 2]))
    cache = CorrCache(path)
    assert sorted(cache.manifest(None).column("window_id").to_pylist()) == sorted(record(i).window_id for i in (0, 1, 2))
    assert cache.manifest("failed").num_rows == 0


@pytest.mark.parametrize("compact", [False, True])
def test_repair_missing_shards_and_drop_failed_rows(tmp_path, compact):
    path = tmp_path / "c"
    writer = CacheWriter(path, config())
    writer.initialize()
    writer.write_shard("a", outcomes([0, 1], failed=(1,)))
    writer.write_shard("b", outcomes([2, 3], failed=(3,)))
    if compact:
        writer.consolidate()
    (path / shard_dir("b")).unlink()
    assert writer.repair_missing_shards() == ["b"]
    assert writer.remove_orphans() == []
    done = [record(i).window_id for i in (0, 1, 3)]  # window 2 (ok in the missing shard) is no longer done
    assert sorted(writer.done_window_ids().to_pylist()) == done
    assert sorted(writer.drop_failed_rows()) == [record(1).window_id, record(3).window_id]
    assert writer.done_window_ids().to_pylist() == [record(0).window_id]
    assert writer.drop_failed_rows() == [] and writer.repair_missing_shards() == []
    writer.write_shard("b", outcomes([2, 3]))  # redone: the same shard id commits again
    cache = CorrCache(path)
    assert cache.window_ids() == sorted(record(i).window_id for i in (0, 2, 3))
    assert len(writer.done_window_ids()) == 3  # window 1's failed row was superseded and not redone here
    writer.consolidate()
    assert CorrCache(path).window_ids() == sorted(record(i).window_id for i in (0, 2, 3)) and len(writer.done_window_ids()) == 3


def test_window_ids_are_one_numpy_array_read_as_strings(tmp_path) -> None:
    from cameo_corr.cache.reader import WindowIds

    writer = CacheWriter(tmp_path / "cache", config())
    writer.write_shard("a", outcomes([4, 0, 2]))
    writer.write_shard("b", outcomes([3, 1], failed=(1,)))
    cache = CorrCache(tmp_path / "cache")
    ids = cache.window_ids()
    expected = sorted(record(i).window_id for i in (0, 2, 3, 4))
    # no Python string (nor list slot) per window: the index's S<n> array itself, 16 bytes per id
    assert isinstance(ids, WindowIds) and ids.array is cache.index().ids and ids.array.dtype == np.dtype("S16")
    assert ids == expected and list(ids) == expected and len(ids) == 4 and ids != expected[:3] and ids != expected[::-1]
    assert ids[0] == expected[0] and ids[-1] == expected[-1] and ids[1:3] == expected[1:3] and isinstance(ids[0], str)
    assert record(2).window_id in ids and record(1).window_id not in ids and "x" * 40 not in ids and 3 not in ids
    assert ids == CorrCache(tmp_path / "cache").window_ids() and sorted(ids) == expected
    with pytest.raises(TypeError):
        hash(ids)
    empty = CacheWriter(tmp_path / "empty", config())
    empty.write_shard("c", outcomes([5], failed=(5,)))
    none = CorrCache(tmp_path / "empty").window_ids()
    assert none == [] and not none and "w" not in none


def test_string_codes_of_streamed_batches() -> None:
    """Codes of a column streamed in batches: nulls -1, values of any width (a value met first in a batch
    of wider values keeps its code in a batch of narrower ones), each value one code."""
    import pyarrow as pa

    from cameo_corr.cache.manifest import StringCodes

    rng = np.random.default_rng(0)
    pool = [f"{i:016x}" for i in range(300)] + ["a", "bb", "scene0000001", "é", ""]
    codes, seen = StringCodes(), []
    for b in range(12):
        values = [None if rng.random() < 0.05 else pool[i] for i in rng.integers(0, len(pool), 200)]
        values = {3: ["a", "a", None], 4: [None, None], 5: []}.get(b, values)
        got = codes.add(pa.array(values, pa.string()))
        assert [None if c < 0 else codes.names[c] for c in got] == values
        seen += values
    every, names = codes.result()
    assert [None if c < 0 else names[c] for c in every] == seen
    assert sorted(names) == sorted({v for v in seen if v is not None})  # each value once


@pytest.mark.parametrize("where", ["local", "memory"])
def test_manifest_reads_hand_arrow_no_python_object_to_read_on_its_threads(tmp_path, monkeypatch, where):
    """``pq.read_table`` or a dataset scan of a Python file or of Python-owned bytes reads on Arrow's I/O
    threads, and a task keeping the last reference may be destroyed as the interpreter exits: the
    process then aborts (SIGABRT) after its work is done (a finished preprocess exited -6; on 2 cores,
    10 of 30 short processes reading a fragment with ``pq.read_table(open(...))``, 1 of 30 from bytes).
    Every manifest read (fragments, compact files, whole, scanned, merged) must give ``read_table`` and
    dataset scans only paths or Arrow's own files, and read Python files with ``ParquetFile`` without
    pre-buffering (synchronous: 0 of 30)."""
    import uuid

    import pyarrow as pa
    import pyarrow.dataset as pads
    import pyarrow.parquet as pq

    from cameo_corr.cache.kway import file_batches
    from cameo_corr.cache.manifest import compact_paths, read_consolidation, read_manifest_file, scan_manifest

    seen: list[str] = []

    def native(source) -> bool:
        if isinstance(source, (str, os.PathLike)) or (isinstance(source, list) and all(isinstance(s, str) for s in source)):
            return True
        return isinstance(source, (pa.OSFile, pa.MemoryMappedFile))

    def guard(name, real, check):
        def wrapped(source, *args, **kwargs):
            seen.append(name)
            assert check(source, kwargs), f"{name} got {type(source).__name__} {kwargs}"
            return real(source, *args, **kwargs)
        return wrapped

    monkeypatch.setattr(pq, "read_table", guard("read_table", pq.read_table, lambda s, kw: native(s)))
    monkeypatch.setattr(pads, "dataset", guard("dataset", pads.dataset, lambda s, kw: native(s)))
    monkeypatch.setattr(pq, "ParquetFile", guard("ParquetFile", pq.ParquetFile,
                                                 lambda s, kw: native(s) or kw.get("pre_buffer") is False))
    path = str(tmp_path / "c") if where == "local" else f"memory://{uuid.uuid4().hex}/c"
    writer = CacheWriter(path, config())
    writer.initialize()
    writer.write_shard("s1", outcomes([0, 1]))
    writer.consolidate()
    writer.write_shard("s2", outcomes([2, 3]))  # a pending fragment beside the compact file
    loc = CacheLocation(path)
    assert read_manifest_file(loc, fragment_path("s2")).num_rows == 2
    assert read_manifest(loc).num_rows == 4 and read_manifest(loc, columns=["window_id"]).num_rows == 4
    assert scan_manifest(loc, lambda batches: sum(b.num_rows for b in batches), ["window_id"]) == 4
    assert sum(t.num_rows for t in file_batches(loc, compact_paths(loc, read_consolidation(loc)["files"]))) == 2
    writer.consolidate()
    assert len(CorrCache(path)) == 4
    assert "ParquetFile" in seen
