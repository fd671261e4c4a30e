"""Streaming manifest merges (cache/kway.py): equal to the in-memory sort, bounded, same files on disk;
and the resume's one-pass done set (cache/done.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import cameo_corr.cache.kway as kway
from cameo_corr.cache.consolidation import consolidate_manifest, drop_failed_rows
from cameo_corr.cache.done import DoneWindows
from cameo_corr.cache.kway import SortedMerge, sliced, write_sorted
from cameo_corr.cache.layout import fragment_path
from cameo_corr.cache.location import CacheLocation
from cameo_corr.cache.manifest import parquet_bytes, read_consolidation, read_manifest
from cameo_corr.schemas import manifest_schema


def rows(ids: list[str], shard: str = "s", failed: bool = False) -> pa.Table:
    """Manifest rows of windows ``ids`` (ok in shard ``shard``, or failed)."""
    n = len(ids)
    return pa.Table.from_pylist([{
        "window_id": w, "dataset": "synthetic", "split": "train", "scene_id": f"scene{w[-1]}", "frame_ids": [w, w + "b"],
        "image_paths": [f"{w}.png", f"{w}b.png"], "shard": None if failed else shard, "row": None if failed else r,
        "num_views": 2, "valid_frac": 0.5, "mask_frac": float("nan") if failed else 0.25, "status": "failed" if failed else "ok",
        "error": "DatasetError: x" if failed else None, "shard_bytes": None if failed else 100 + n} for r, w in enumerate(ids)],
        schema=manifest_schema())


def run_of(keys: list[int], run: int, batch: int) -> list[pa.Table]:
    """A sorted run of ids ``keys`` (sorted here) in tables of ``batch`` rows, tagged with (run, position)."""
    keys = sorted(keys)
    table = pa.table({"window_id": [f"{k:016x}" for k in keys], "run": [run] * len(keys), "pos": list(range(len(keys)))})
    return list(sliced(table, batch))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.integers(0, 40), max_size=30), min_size=1, max_size=6), st.integers(1, 7))
def test_sorted_merge_is_the_stable_sort_of_the_concatenation(runs: list[list[int]], batch: int) -> None:
    merged = SortedMerge([run_of(keys, i, batch) for i, keys in enumerate(runs)])
    got = pa.concat_tables(list(merged)) if any(runs) else None
    whole = pa.concat_tables([pa.concat_tables(run_of(keys, i, 1000) or [pa.table({"window_id": pa.array([], pa.string()),
                                                                                     "run": pa.array([], pa.int64()),
                                                                                     "pos": pa.array([], pa.int64())})])
                              for i, keys in enumerate(runs)])
    order = np.argsort(np.array(whole.column("window_id").to_pylist(), dtype="S16"), kind="stable")
    expected = whole.take(pa.array(order, pa.int64()))
    if got is None:
        assert expected.num_rows == 0
        return
    assert got.to_pylist() == expected.to_pylist()
    assert merged.rows == expected.num_rows


def test_merge_of_many_runs_holds_at_most_one_batch_per_run() -> None:
    rng = np.random.default_rng(0)
    keys = rng.permutation(20_000)
    runs = [run_of(list(keys[i::25]), i, 16) for i in range(25)]  # 25 runs of 800 unique ids, batches of 16
    merged = SortedMerge(runs)
    out = list(merged)
    assert sum(t.num_rows for t in out) == 20_000
    assert merged.peak_rows <= 25 * (16 + 1)  # a batch per run (+ the row a run may carry over on a tie)
    assert max(t.num_rows for t in out) <= 25 * 16


def fake_fragment(location: CacheLocation, shard: str, ids: list[str], failed: bool = False) -> None:
    location.write_bytes_atomic(fragment_path(shard), parquet_bytes(rows(ids, shard, failed), 65_536))


def write_cache(path: Path, shards: dict[str, list[str]]) -> CacheLocation:
    location = CacheLocation(path)
    for shard, ids in shards.items():
        fake_fragment(location, shard, ids)
    return location


@settings(max_examples=25, deadline=None)
@given(st.lists(st.sets(st.integers(0, 10**6), min_size=1, max_size=12), min_size=1, max_size=12), st.integers(1, 30),
       st.integers(2, 9), st.integers(1, 5))
def test_streaming_consolidation_equals_the_in_memory_sort(tmp_path_factory: pytest.TempPathFactory, shards: list[set[int]],
                                                           chunk: int, batch: int, rounds: int) -> None:
    """Fragments consolidated in ``rounds`` (parts merged by the binary counter, then a full compact),
    with tiny chunk and batch sizes (spills, many runs): the manifest is the sorted rows, row groups
    and files sized as before, and no temporary file is left."""
    path = tmp_path_factory.mktemp("kway")
    seen: set[int] = set()
    expected = []
    location = CacheLocation(path)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(kway, "SORT_CHUNK_ROWS", chunk)
        m.setattr(kway, "MERGE_BATCH_ROWS", batch)
        m.setattr(kway, "FRAGMENT_GROUP", 2)
        for r, ids in enumerate(shards):
            fresh = [f"{i:016x}" for i in sorted(ids - seen)]
            seen |= ids
            if fresh:
                fake_fragment(location, f"s{r:03d}", fresh)
                expected += rows(fresh, f"s{r:03d}").to_pylist()
            if r % rounds == 0:
                consolidate_manifest(location, row_group_size=3, file_rows=7)
        info = consolidate_manifest(location, full=True, row_group_size=3, file_rows=7)
    expected.sort(key=lambda row: row["window_id"])
    got = read_manifest(location)
    assert got.to_pylist() == expected
    assert len(info["parts"]) == 1 and info["rows"] == len(expected)
    sizes = [pq.ParquetFile(path / "manifest" / f).metadata for f in info["files"]]
    assert [m.num_rows for m in sizes] == [min(7, len(expected) - 7 * k) for k in range(len(sizes))]
    assert all(m.row_group(g).num_rows == min(3, m.num_rows - 3 * g) for m in sizes for g in range(m.num_row_groups))
    assert not [n for n in (path / "manifest").iterdir() if n.name.startswith(".tmp-")]


def test_write_sorted_matches_the_whole_table_writer(tmp_path: Path) -> None:
    ids = [f"{i:016x}" for i in range(50)]
    table = rows(ids)
    location = CacheLocation(tmp_path)
    part = write_sorted(location, sliced(table, 4), 1, row_group_size=8, file_rows=20)
    assert part == {"files": ["compact-000001-00000.parquet", "compact-000001-00001.parquet", "compact-000001-00002.parquet"],
                    "rows": 50}
    for k, name in enumerate(part["files"]):
        meta = pq.ParquetFile(tmp_path / "manifest" / name).metadata
        old = pq.ParquetFile(pa.BufferReader(parquet_bytes(table.slice(20 * k, 20), 8))).metadata
        assert [meta.row_group(g).num_rows for g in range(meta.num_row_groups)] == \
            [old.row_group(g).num_rows for g in range(old.num_row_groups)]
    assert pa.concat_tables([pq.read_table(tmp_path / "manifest" / n, schema=manifest_schema()) for n in part["files"]]).equals(table)
    empty = write_sorted(location, iter([]), 2, row_group_size=8, file_rows=20)
    assert empty["rows"] == 0 and pq.ParquetFile(tmp_path / "manifest" / empty["files"][0]).metadata.num_rows == 0


def test_remove_rows_streams_and_rewrites_only_when_a_row_goes(tmp_path: Path) -> None:
    location = write_cache(tmp_path, {"a": ["0000000000000001", "0000000000000003"]})
    fake_fragment(location, "f", ["0000000000000002"], failed=True)
    consolidate_manifest(location)
    before = read_consolidation(location)
    assert drop_failed_rows(location) == ["0000000000000002"]
    after = read_consolidation(location)
    assert after["files"] != before["files"] and after["rows"] == 2
    assert read_manifest(location, columns=["window_id"]).column("window_id").to_pylist() == ["0000000000000001", "0000000000000003"]
    assert drop_failed_rows(location) == [] and read_consolidation(location)["files"] == after["files"]  # nothing to drop: no rewrite


def test_done_windows_one_pass_todo_and_forget(tmp_path: Path) -> None:
    location = write_cache(tmp_path, {"a": ["00000000000000a1", "00000000000000a2"], "b": ["00000000000000b1"]})
    consolidate_manifest(location)
    fake_fragment(location, "c", ["00000000000000c1"])
    fake_fragment(location, "d", ["00000000000000d1"], failed=True)
    done = DoneWindows.read(location)
    assert len(done) == 5 and done.shards == {"a", "b", "c"}
    planned = pa.table({"window_id": ["00000000000000c1", "00000000000000e1", "00000000000000a2", "00000000000000d1", "00000000000000f1"],
                        "k": [0, 1, 2, 3, 4]})
    assert done.todo(planned).column("k").to_pylist() == [1, 4]  # in the plan's order
    done.forget(["00000000000000d1"])
    assert done.todo(planned).column("k").to_pylist() == [1, 3, 4]
    assert DoneWindows.read(CacheLocation(tmp_path / "none")).todo(planned).num_rows == 5
    assert done.ids.dtype == np.uint64  # hex ids: 8-byte keys
    odd = pa.table({"window_id": ["not-a-hex-window", "00000000000000b1"], "k": [7, 8]})
    assert done.todo(odd).column("k").to_pylist() == [7]  # ids that are not hex: compared as bytes
    other = write_cache(tmp_path / "other", {"x": ["w000000000000001", "w000000000000002"]})
    mixed = DoneWindows.read(other)
    assert mixed.ids.dtype == np.dtype("S16") and mixed.todo(odd.append_column("w", odd.column("k"))).num_rows == 2
    mixed.forget(["w000000000000001"])
    assert len(mixed) == 1
    failed = CacheLocation(tmp_path / "failed")  # no ok row: no shard at all
    fake_fragment(failed, "00000000000000f0", ["00000000000000f1"], failed=True)
    assert DoneWindows.read(failed).shards == set() and len(DoneWindows.read(failed)) == 1
    hexed = write_cache(tmp_path / "hexed", {"00000000000000aa": ["00000000000000a1"], "00000000000000bb": ["00000000000000b2"]})
    assert DoneWindows.read(hexed).shards == {"00000000000000aa", "00000000000000bb"}
    assert json.loads((tmp_path / "manifest" / "consolidated.json").read_text())["rows"] == 3


def test_pending_fragments_spill_sorted_runs_and_clean_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kway, "FRAGMENT_GROUP", 1)
    ids = [f"{(i * 7919) % 1000:016x}" for i in range(10)]
    location = write_cache(tmp_path, {f"s{k}": ids[2 * k : 2 * k + 2] for k in range(5)})
    info = read_consolidation(location)
    with kway.SpilledRuns(location, info, sorted(p.name for p in (tmp_path / "manifest").iterdir()), spill=location,
                          chunk_rows=3) as runs:
        assert len(runs.spilled) >= 3 and runs.rows == 10 and runs.memory is None
        assert all((tmp_path / rel).name.startswith(".tmp-run-") for rel in runs.spilled)
        got = pa.concat_tables(list(SortedMerge(runs.runs(batch_rows=2)))).column("window_id").to_pylist()
    assert got == sorted(ids)
    assert not [n for n in (tmp_path / "manifest").iterdir() if n.name.startswith(".tmp-")]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 2**64 - 1), max_size=40), st.lists(st.integers(0, 2**64 - 1), max_size=40), st.booleans())
def test_sorted_member_is_set_membership(done: list[int], asked: list[int], odd: bool) -> None:
    """Hex ids search as uint64 keys (same order as the bytes); any other id falls back to bytes."""
    from cameo_corr.cache.manifest import id_keys, sorted_member

    as_ids = lambda xs: np.array([f"{x:016x}".encode() for x in xs] + ([b"not-hex-id-00000"] if odd else []), dtype="S16")  # noqa: E731
    table, query = np.sort(as_ids(done)), as_ids(asked + done[:3])
    assert sorted_member(query, table).tolist() == [q in set(table.tolist()) for q in query.tolist()]
    keys = id_keys(table)
    assert keys.dtype == (np.dtype("S16") if odd or not len(table) else np.uint64) and (np.sort(keys) == keys).all()
