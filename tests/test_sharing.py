"""Sharing caches across experiments: mixtures of caches in the training stream, window subsets by
manifest predicate (train and the cache tools), and ``cache merge`` (unit tests on writer-made caches,
end to end through the CLI on the real tiny pipeline cache)."""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pytest

from cameo_corr.cli import main as cli_main
from cameo_corr.cache.config import CacheMismatchError
from cameo_corr.cache.consolidation import drop_shards
from cameo_corr.cache.layout import shard_dir
from cameo_corr.cache.reader import CorrCache
from cameo_corr.cache.writer import CacheWriter
from cameo_corr.cache.verify import verify_report
from cameo_corr.cache.merge import merge_caches
from cameo_corr.cache.select import WindowSelection, read_scene_list
from cameo_corr.train.mixture import CacheSource
from cameo_corr.schemas import DatasetError, SchemaError
from cameo_corr.train.data import CorrStreamDataset, StreamLoader, mixture_counts
from test_cache import config, outcomes, record, token_arrays
from test_train_data import F, assert_batches_equal


def make(cache, **kw) -> CorrStreamDataset:
    """The test dataset; a stream of single samples (no ``batch_size``) draws its order per sample."""
    opts = dict(num_views=F, resolution=32, seed=3, shuffle_buffer=3, order_scope="batch" if kw.get("batch_size") else "sample")
    opts.update(kw)
    return CorrStreamDataset(cache, **opts)


def copy_cache(src: Path, dst: Path, **edit) -> Path:
    shutil.copytree(src, dst)
    if edit:
        cfg = json.loads((dst / "cache.json").read_text())
        cfg.update(edit)
        (dst / "cache.json").write_text(json.dumps(cfg))
    return dst


def source_of(ds: CorrStreamDataset, windows: np.ndarray) -> np.ndarray:
    return ds.shard_source[ds.window_shard[windows]]


# ------------------------------------------------------------------------------------------ mixtures
def test_mixture_counts_are_the_weighted_shares() -> None:
    assert mixture_counts([3, 1], 12).tolist() == [9, 3]
    assert mixture_counts([1, 1, 1], 10).tolist() == [4, 3, 3]  # largest remainder, ties to the earlier cache
    assert mixture_counts([0.5], 7).tolist() == [7]
    assert mixture_counts([1, 1e-9], 5).tolist() == [5, 0]


def test_mixture_proportions_passes_and_determinism(tiny_train_cache: Path, tmp_path: Path) -> None:
    """weight = share of samples per epoch; each cache cycles through its own shard-ordered passes."""
    other = copy_cache(tiny_train_cache, tmp_path / "b")
    mix = [CacheSource(str(tiny_train_cache), 3.0, "a"), CacheSource(str(other), 1.0, "b")]
    ds = make(mix)
    assert ds.source_windows.tolist() == [6, 6] and ds.source_counts.tolist() == [9, 3] and ds.epoch_length == 12
    epochs = [ds.epoch_windows(e) for e in range(4)]
    for order in epochs:
        assert Counter(source_of(ds, order).tolist()) == {0: 9, 1: 3}
    a = np.concatenate([o[source_of(ds, o) == 0] for o in epochs])  # 36 samples = 6 passes of cache a
    b = np.concatenate([o[source_of(ds, o) == 1] for o in epochs])  # 12 samples = 2 passes of cache b
    for stream, k in ((a, 0), (b, 1)):
        for p in range(len(stream) // 6):
            one_pass = stream[6 * p : 6 * p + 6]
            assert sorted(one_pass.tolist()) == sorted(np.flatnonzero(source_of(ds, np.arange(len(ds))) == k).tolist())
    assert not np.array_equal(epochs[0], epochs[1])
    again = make(mix)
    assert all(np.array_equal(again.epoch_windows(e), epochs[e]) for e in range(4))
    # the first cache of a mixture streams exactly as that cache alone
    alone = make(str(tiny_train_cache))
    assert np.array_equal(a[:6], alone.epoch_windows(0))


def test_mixture_tags_and_exact_resume_mid_epoch(tiny_train_cache: Path, tmp_path: Path) -> None:
    other = copy_cache(tiny_train_cache, tmp_path / "b")
    mix = [CacheSource(str(tiny_train_cache), 1.0, "re10k"), CacheSource(str(other), 1.0)]

    def loader(workers: int = 0) -> StreamLoader:
        kw = {"num_workers": workers, "multiprocessing_context": "fork"} if workers else {}
        return StreamLoader(make(mix, batch_size=2, num_epochs=2), **kw)

    full = list(loader())
    assert len(full) == 12  # 12 windows x 2 epochs / 2
    tags = Counter(t for b in full for t in b["tag"])
    assert tags == {"re10k": 12, "synthetic": 12}  # the entry's tag, else the dataset's own tag
    first = loader()
    it = iter(first)
    head = [next(it) for _ in range(3)]
    state = first.state_dict()
    assert state == {"epoch": 0, "position": 6}
    resumed = loader(workers=2)
    resumed.load_state_dict(state)
    assert_batches_equal(head + list(resumed), full)


def test_mixture_skips_corrupt_windows_of_one_cache(tiny_train_cache: Path, tmp_path: Path) -> None:
    from test_train_data import _corrupt_first_shard

    broken = copy_cache(tiny_train_cache, tmp_path / "broken")
    bad = _corrupt_first_shard(broken)
    loader = StreamLoader(make([CacheSource(str(tiny_train_cache), tag="a"), CacheSource(str(broken), tag="b")], batch_size=2,
                               num_epochs=1, on_corrupt="skip"))
    got = [(t, w) for b in loader for t, w in zip(b["tag"], b["window_id"])]
    assert len(got) == 10 and loader.corrupt_skipped == 2 and not {("b", w) for w in bad} & set(got)
    assert loader.state_dict() == {"epoch": 1, "position": 0}


def test_mixture_rank_split_is_disjoint_and_complete(tiny_train_cache: Path, tmp_path: Path) -> None:
    other = copy_cache(tiny_train_cache, tmp_path / "b")
    mix = [CacheSource(str(tiny_train_cache), 2.0), CacheSource(str(other), 1.0)]
    whole = make(mix).rank_order(0)
    parts = [make(mix, rank=r, world_size=3).rank_order(0) for r in range(3)]
    assert sorted(q for p in parts for q in p[:, 1].tolist()) == whole[:, 1].tolist()
    assert sorted(w for p in parts for w in p[:, 0].tolist()) == sorted(whole[:, 0].tolist())


def test_mixture_refuses_caches_the_model_cannot_share(tiny_train_cache: Path, tmp_path: Path) -> None:
    a = str(tiny_train_cache)
    grid = copy_cache(tiny_train_cache, tmp_path / "grid16", grid=[16, 16])
    with pytest.raises(CacheMismatchError, match=rf"field 'grid'.*{a} has \[8, 8\], {grid} has \[16, 16\]"):
        make([CacheSource(a), CacheSource(str(grid))])
    tau = copy_cache(tiny_train_cache, tmp_path / "tau2", tau=2.0)
    with pytest.raises(CacheMismatchError, match=rf"field 'tau'.*set data.tau.*{a} has 1.5, {tau} has 2.0"):
        make([CacheSource(a), CacheSource(str(tau))])
    assert make([CacheSource(a), CacheSource(str(tau))], tau=1.5).mask_options["tau"] == 1.5  # one tau for both
    assert make([CacheSource(a), CacheSource(str(tau))], mask_policy="visibility").epoch_length == 12
    with pytest.raises(SchemaError, match="weight"):
        CacheSource(a, 0.0)
    with pytest.raises(SchemaError, match="dataset_root"):
        make([CacheSource(a)], dataset_root=tmp_path)


def test_mixture_config_and_loader(tiny_train_cache: Path, tmp_path: Path) -> None:
    from cameo_corr.train.config import load_config
    from cameo_corr.train.loop import make_loader

    other = copy_cache(tiny_train_cache, tmp_path / "b")
    caches = json.dumps([{"path": str(tiny_train_cache), "weight": 2, "tag": "co3d"}, {"path": str(other), "min_mask_frac": 0.0}])
    cfg = load_config(None, [f"data.num_views={F}", "data.resolution=32", f"data.caches={caches}"])
    ds = make_loader(cfg, rank=0, world_size=1).dataset
    assert [s.tag for s in ds.sources] == ["co3d", None] and ds.source_counts.tolist() == [8, 4]
    assert ds.sources[1].selection == WindowSelection(min_mask_frac=0.0)
    with pytest.raises(SchemaError, match=r"data.caches\[1\].weight"):
        load_config(None, ['data.caches=[{path: a}, {path: b, weight: -1}]'])
    with pytest.raises(SchemaError, match=r"data.caches\[0\].colour"):
        load_config(None, ['data.caches=[{path: a, colour: red}]'])
    with pytest.raises(SchemaError, match="not both"):
        load_config(None, ["data.cache=a", "data.caches=[{path: b}]"])


# ------------------------------------------------------------------------------------------ subsets
def test_scene_list_file_errors_name_file_and_line(tmp_path: Path) -> None:
    good = tmp_path / "scenes.txt"
    good.write_text("# held-out scenes\nscene_a\n\nscene_b\n")
    assert read_scene_list(good) == ("scene_a", "scene_b")
    for text, needle in (("a\n a\n", r"bad.txt:2 .*whitespace"), ("a\nb\na\n", r"bad.txt:3 .*repeats line 1"),
                        ("# nothing\n\n", "no scene id")):
        bad = tmp_path / "bad.txt"
        bad.write_text(text)
        with pytest.raises(DatasetError, match=needle) as e:
            read_scene_list(bad)
        assert str(bad) in str(e.value)
    with pytest.raises(DatasetError, match="no such scene-list file"):
        read_scene_list(tmp_path / "missing.txt")


def test_train_subsets_by_split_scenes_and_mask_frac(tiny_train_cache: Path, tmp_path: Path) -> None:
    cache = CorrCache(tiny_train_cache)
    table = cache.manifest("ok", columns=["window_id", "split", "scene_id", "mask_frac"])
    split = table.column("split")[0].as_py()
    assert len(make(tiny_train_cache, split=split)) == 6
    scene = sorted(set(table.column("scene_id").to_pylist()))[1]
    (tmp_path / "one.txt").write_text(scene + "\n")
    picked = make(tiny_train_cache, scenes_file=str(tmp_path / "one.txt"), num_epochs=1)
    expected = table.filter(pc.equal(table.column("scene_id"), scene)).column("window_id").to_pylist()
    assert sorted(s["window_id"] for s in picked) == sorted(expected) and len(expected) == 2
    fracs = np.sort(table.column("mask_frac").to_numpy())
    threshold = float(fracs[3])
    assert len(make(tiny_train_cache, min_mask_frac=threshold)) == int((fracs >= threshold).sum())
    for kw, needle in ((dict(split="nope"), "split 'nope'"), (dict(min_mask_frac=1.0), "mask_frac >= 1")):
        with pytest.raises(DatasetError, match=f"no 'ok' windows match the selection \\({needle}"):
            make(tiny_train_cache, **kw)
    # a mixture entry's own predicates replace the defaults one by one (its unset ones are inherited)
    mix = [CacheSource(str(tiny_train_cache), selection=WindowSelection(scenes_file=str(tmp_path / "one.txt"), min_mask_frac=0.0)),
           CacheSource(str(tiny_train_cache))]
    assert make(mix, min_mask_frac=threshold).source_windows.tolist() == [2, int((fracs >= threshold).sum())]


def test_cache_tools_take_the_selection(tiny_train_cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    scenes = tmp_path / "scenes.txt"
    scene = CorrCache(tiny_train_cache).manifest("ok", columns=["scene_id"]).column("scene_id")[0].as_py()
    scenes.write_text(f"{scene}\n")
    assert cli_main(["cache", "stats", str(tiny_train_cache), "--scenes", str(scenes), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["windows_ok"] == 2 and stats["scenes_ok"] == 1 and stats["selection"] == f"scenes listed in {scenes}"
    assert cli_main(["cache", "verify", str(tiny_train_cache), "--min-mask-frac", "0.01", "--deep"]) == 0
    assert "selection: mask_frac >= 0.01" in capsys.readouterr().out
    assert cli_main(["cache", "viz", str(tiny_train_cache), "--split", "nope", "--out", str(tmp_path / "v.png")]) == 2
    err = capsys.readouterr().err
    assert "no 'ok' windows match the selection (split 'nope')" in err and err.count("\n") == 1
    bad = tmp_path / "bad.txt"
    bad.write_text("a\na\n")
    assert cli_main(["cache", "stats", str(tiny_train_cache), "--scenes", str(bad)]) == 2
    assert f"{bad}" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ merge
def writer_cache(path: Path, shards: dict[str, tuple[list[int], tuple[int, ...]]], **cfg) -> Path:
    writer = CacheWriter(path, config(**cfg))
    writer.initialize()
    for sid, (ids, failed) in shards.items():
        writer.write_shard(sid, outcomes(ids, failed=failed))
    return path


def test_merge_union_links_dedups_supersedes_and_rewrites(tmp_path: Path) -> None:
    a = writer_cache(tmp_path / "a", {"s1": ([0, 1, 2], (1,)), "s2": ([3, 4], ())})
    b = writer_cache(tmp_path / "b", {"s2": ([3, 4], ()), "s3": ([1, 5], ()), "s4": ([4, 6], ()), "s5": ([7], (7,))})
    report = merge_caches([a, b], tmp_path / "c")
    c = CorrCache(tmp_path / "c")
    ids = {record(i).window_id: i for i in range(8)}
    assert sorted(ids[w] for w in c.window_ids()) == [0, 1, 2, 3, 4, 5, 6]  # window 1: b's ok row supersedes a's failed one
    failed = c.manifest("failed", columns=["window_id"]).column("window_id").to_pylist()
    assert [ids[w] for w in failed] == [7]
    assert (report.windows_ok, report.windows_failed, report.linked, report.rewritten, report.duplicate_shards) == (7, 1, 3, 1, 1)
    for w, i in ids.items():
        if i != 7:
            got = c.window(w)
            assert all(np.array_equal(got[n], v) for n, v in token_arrays(i).items()), i
    assert verify_report(c, deep=True).problems == []
    assert os.stat(a / shard_dir("s1")).st_ino == os.stat(tmp_path / "c" / shard_dir("s1")).st_ino  # hard link
    created = c.config.created_by
    assert [s["path"] for s in created["merged_from"]] == [str(a), str(b)]
    assert json.loads((tmp_path / "c" / "manifest" / "consolidated.json").read_text())["rows"] == 8
    assert c.config.grid == CorrCache(a).config.grid and c.config.tau == CorrCache(a).config.tau


def test_merge_refusals(tmp_path: Path) -> None:
    a = writer_cache(tmp_path / "a", {"s1": ([0, 1], ())})
    other_tau = writer_cache(tmp_path / "t", {"s2": ([2], ())}, tau=2.0)
    with pytest.raises(CacheMismatchError, match=rf"field 'tau': caches differ: {a} has 1.5, {other_tau} has 2.0"):
        merge_caches([a, other_tau], tmp_path / "x")
    clash = tmp_path / "clash"
    writer = CacheWriter(clash, config())
    writer.initialize()
    bad = outcomes([0, 1])
    bad[1].arrays["dist"] = bad[1].arrays["dist"] + np.float16(1)
    writer.write_shard("s1", bad)
    with pytest.raises(DatasetError, match="shard s1 .*array 'dist' differs"):
        merge_caches([a, clash], tmp_path / "y")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    with pytest.raises(DatasetError, match="not empty"):
        merge_caches([a, writer_cache(tmp_path / "b", {"s9": ([9], ())})], tmp_path / "full")
    with pytest.raises(DatasetError, match=r"no windows match the selection \(split 'test'\)"):
        merge_caches([a, tmp_path / "b"], tmp_path / "z", selection=WindowSelection(split="test"))


def test_merge_of_different_dataset_roots_is_refused_or_records_the_given_root(tmp_path: Path) -> None:
    """Issue 19 item 6: cache.json records one dataset root, so inputs of two roots are refused naming
    both, unless --dataset-root names the root holding every input's scenes (recorded in OUT)."""
    a = writer_cache(tmp_path / "a", {"s1": ([0, 1], ())}, dataset={"name": "synthetic", "root": "data-a", "split": "train"})
    b = writer_cache(tmp_path / "b", {"s2": ([2], ())}, dataset={"name": "synthetic", "root": "data-b", "split": "train"})
    with pytest.raises(SchemaError, match=r"field 'dataset.root'.*a was built from data-a, .*b from data-b.*--dataset-root") as e:
        merge_caches([a, b], tmp_path / "x")
    assert str(b / "cache.json") in str(e.value) and not (tmp_path / "x").exists()
    with pytest.raises(DatasetError, match="not a directory"):
        merge_caches([a, b], tmp_path / "x", dataset_root=str(tmp_path / "nowhere"))
    (tmp_path / "both").mkdir()
    merge_caches([a, b], tmp_path / "c", dataset_root=str(tmp_path / "both"))
    c = CorrCache(tmp_path / "c")
    assert c.config.dataset["root"] == str(tmp_path / "both") and c.config.created_by["dataset_roots"] == ["data-a", "data-b"]
    assert len(c) == 3 and c.config.dataset["name"] == "synthetic"
    same = writer_cache(tmp_path / "d", {"s3": ([3], ())})  # one root (the default): merged as before, root kept
    assert CorrCache(merge_caches([writer_cache(tmp_path / "e", {"s4": ([4], ())}), same], tmp_path / "f").out).config.dataset["root"] == "data"


def test_merge_roots_through_the_cli_and_the_merged_cache_reads_its_scenes(tiny_train_cache: Path, tmp_path: Path,
                                                                           capsys: pytest.CaptureFixture[str]) -> None:
    """Two parts of the real tiny cache, one recording a moved copy of the dataset root: refused in one
    line naming the field, then merged with --dataset-root; every scene of OUT is in its dataset."""
    from cameo_corr.cache.location import CacheLocation

    root = CorrCache(tiny_train_cache).config.dataset["root"]
    moved = tmp_path / "moved-root"
    shutil.copytree(root, moved)
    shards = sorted(pc.unique(CorrCache(tiny_train_cache).manifest("ok", columns=["shard"]).column("shard")).to_pylist())
    p1 = copy_cache(tiny_train_cache, tmp_path / "p1")
    drop_shards(CacheLocation(p1), shards[1:])
    p2 = copy_cache(tiny_train_cache, tmp_path / "p2", dataset={**CorrCache(tiny_train_cache).config.dataset, "root": str(moved)})
    drop_shards(CacheLocation(p2), shards[:1])
    out = tmp_path / "union"
    assert cli_main(["cache", "merge", str(p1), str(p2), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "dataset.root" in err and str(moved) in err and err.count("\n") == 1
    assert cli_main(["cache", "merge", str(p1), str(p2), "--out", str(out), "--dataset-root", str(moved)]) == 0
    merged = CorrCache(out)
    assert merged.config.dataset["root"] == str(moved) and len(merged) == len(CorrCache(tiny_train_cache))
    scenes = set(merged.manifest("ok", columns=["scene_id"]).column("scene_id").to_pylist())
    assert scenes <= set(merged.reader().scene_ids())


def test_merge_streams_spilled_fragments_and_selection_like_consolidated_inputs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Inputs with pending fragments, merged with tiny sort chunks and batches (spilled runs, many
    steps), give the same cache as the same inputs consolidated; the selection applies to both."""
    import cameo_corr.cache.kway as kway
    from cameo_corr.cache.consolidation import consolidate_manifest
    from cameo_corr.cache.location import CacheLocation

    shards = {"s1": ([0, 1, 2], (1,)), "s2": ([3, 4], ()), "s6": ([8, 9, 10], (9,))}
    a = writer_cache(tmp_path / "a", shards)
    b = writer_cache(tmp_path / "b", {"s2": ([3, 4], ()), "s3": ([1, 5], ()), "s4": ([4, 6], ()), "s5": ([7], (7,))})
    for name, src in (("ac", a), ("bc", b)):
        shutil.copytree(src, tmp_path / name)
        consolidate_manifest(CacheLocation(tmp_path / name))
    monkeypatch.setattr(kway, "SORT_CHUNK_ROWS", 2)
    monkeypatch.setattr(kway, "MERGE_BATCH_ROWS", 2)
    monkeypatch.setattr(kway, "FRAGMENT_GROUP", 1)
    for selection in (WindowSelection(), WindowSelection(min_mask_frac=0.0)):
        out_p, out_c = tmp_path / f"p{bool(selection)}", tmp_path / f"c{bool(selection)}"
        rp = merge_caches([a, b], out_p, selection=selection)
        rc = merge_caches([tmp_path / "ac", tmp_path / "bc"], out_c, selection=selection)
        assert dataclasses_equal(rp, rc, out_p, out_c)
        got, want = (CorrCache(p).manifest(None).to_pylist() for p in (out_p, out_c))
        assert len(got) == rp.windows_ok + rp.windows_failed and repr(got) == repr(want)  # repr: NaN fractions compare equal
        assert verify_report(CorrCache(out_p), deep=True).problems == []
        assert not [n for n in (tmp_path / "a" / "manifest").iterdir() if n.name.startswith(".tmp-")]
        assert not [n for n in (out_p / "manifest").iterdir() if n.name.startswith(".tmp-")]


def dataclasses_equal(a, b, out_a: Path, out_b: Path) -> bool:
    """Two merge reports equal but for the output path."""
    import dataclasses

    return dataclasses.replace(a, out=str(out_b)) == dataclasses.replace(b, out=str(out_b))


def test_merge_copies_across_devices_and_on_object_stores(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    import fsspec

    a = writer_cache(tmp_path / "a", {"s1": ([0, 1], ())})
    b = writer_cache(tmp_path / "b", {"s2": ([2], ())})

    def no_link(src, dst):
        raise OSError(errno.EXDEV, os.strerror(errno.EXDEV), src, dst)

    with monkeypatch.context() as m:
        m.setattr(os, "link", no_link)
        report = merge_caches([a, b], tmp_path / "c")
    assert (report.linked, report.copied) == (0, 2) and "invalid cross-device link" in report.summary()
    assert verify_report(CorrCache(tmp_path / "c"), deep=True).problems == []
    root = f"memory://cameo-merge-{tmp_path.name}"
    try:
        ma = writer_cache(f"{root}/a", {"s1": ([0, 1], ())})
        mb = writer_cache(f"{root}/b", {"s2": ([2], ()), "s3": ([1, 3], ())})
        report = merge_caches([ma, mb], f"{root}/c")
        assert (report.linked, report.copied, report.rewritten) == (0, 2, 1) and "server-side copy" in report.summary()
        assert verify_report(CorrCache(f"{root}/c"), deep=True).problems == [] and len(CorrCache(f"{root}/c")) == 4
    finally:
        fsspec.filesystem("memory").rm(root.removeprefix("memory://"), recursive=True)


def test_merge_end_to_end_through_the_cli(tiny_train_cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Two overlapping parts of the real tiny cache merge back into it: verify --deep is clean, every
    shard is a hard link, and the training stream over the union is the stream over the original."""
    from cameo_corr.cache.location import CacheLocation

    shards = sorted(pc.unique(CorrCache(tiny_train_cache).manifest("ok", columns=["shard"]).column("shard")).to_pylist())
    assert len(shards) == 3
    parts = []
    for name, drop in (("p1", shards[2:]), ("p2", shards[:1])):
        part = copy_cache(tiny_train_cache, tmp_path / name)
        for sid in drop:
            drop_shards(CacheLocation(part), [sid])
        parts.append(part)
    out = tmp_path / "union"
    assert cli_main(["cache", "merge", str(parts[0]), str(parts[1]), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "6 ok and 0 failed windows" in printed and "3 hard-linked" in printed and "1 shards were in several inputs" in printed
    assert cli_main(["cache", "verify", str(out), "--deep"]) == 0
    assert "ok: 6 of 6 windows verified" in capsys.readouterr().out
    for sid in shards:  # every shard of the union is a hard link to the file of the input it came from
        assert any(os.path.samefile(out / shard_dir(sid), p / shard_dir(sid)) for p in parts if (p / shard_dir(sid)).exists())
    assert [s["path"] for s in CorrCache(out).config.created_by["merged_from"]] == [str(p) for p in parts]
    assert_batches_equal(list(make(out, batch_size=2, num_epochs=1)), list(make(tiny_train_cache, batch_size=2, num_epochs=1)))
    assert cli_main(["cache", "merge", str(parts[0]), str(parts[1]), "--out", str(out)]) == 2
    assert "output exists and is not empty" in capsys.readouterr().err
    assert cli_main(["cache", "merge", str(parts[0]), "--out", str(tmp_path / "one")]) == 2
    assert "at least two caches" in capsys.readouterr().err
