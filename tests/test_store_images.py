"""Self-contained caches: ``preprocess --store-images`` stores each window's canonical views in its shard,
and the trainer then reads its images from there, without a dataset root (also from ``s3://`` through
the local shard cache, end to end through the command line)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cameo_corr.cache.reader import CorrCache
from cameo_corr.schemas import CacheConfig, DatasetError, SchemaError
from cameo_corr.train.data import CorrStreamDataset

CLI = [sys.executable, "-m", "cameo_corr.cli"]


def preprocess_args(root: str, out: Path | str, *extra: str) -> list[str]:
    """The arguments of ``cameo-corr preprocess`` of the tiny cache's dataset with the tiny cache's settings."""
    return ["preprocess", "--dataset", "synthetic", "--root", root, "--out", str(out), "--backend", "depth", "--grid", "8",
            "--views", "5", "--windows-per-scene", "2", "--shard-size", "2", "--crop-size", "64", "--no-progress", *extra]


def preprocess(root: str, out: Path | str, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """``cameo-corr preprocess`` (:func:`preprocess_args`) in a subprocess."""
    return subprocess.run([*CLI, *preprocess_args(root, out, *extra)], check=False, capture_output=True, text=True, timeout=600,
                          env=env)


@pytest.fixture(scope="module")
def png_cache(tiny_train_cache: Path, tmp_path_factory) -> Path:
    """The tiny cache's windows with PNG views, by the command run in this process (the JPEG test below runs
    it as a subprocess): no second interpreter start-up."""
    from cameo_corr.cli import main as cli_main

    out = tmp_path_factory.mktemp("png") / "cache"
    assert cli_main(preprocess_args(CorrCache(tiny_train_cache).config.dataset["root"], out, "--store-images", "png")) == 0
    return out


def samples(cache: Path | str, resolution: int, **kw) -> list[dict]:
    """One sample per window, in window-id order, each drawn at padded index 0 of epoch 0 (the same views
    of a window in every cache): two caches of the same windows group them into shards as their jobs
    committed them, so their streams' orders differ while their windows do not."""
    ds = CorrStreamDataset(cache, num_views=3, resolution=resolution, seed=3, order_scope="sample", num_epochs=1, **kw)
    drawn = [ds.sample(i, epoch=0, q=0) for i in range(len(ds))]
    return sorted(drawn, key=lambda s: s["window_id"])


def test_cache_json_images_field_is_absent_unless_used_and_checked():
    base = {"grid": (8, 8), "tau": 1.0, "views": 3, "backend": {"name": "depth"}, "crop": {"policy": "center", "size": 64},
            "dataset": {"name": "x"}}
    plain = CacheConfig(**base)
    assert "images" not in json.loads(plain.to_json()) and "images" not in plain.stored_keys()
    jpeg = CacheConfig(**base, images={"format": "jpeg", "quality": 90})
    assert CacheConfig.from_json(jpeg.to_json()).images == {"format": "jpeg", "quality": 90}
    assert jpeg.stored_keys()[-4:] == ["images", "image_nbytes", "image_intrinsics", "image_extrinsics"]
    for bad, field in (({"format": "gif"}, "images"), ({"format": "jpeg", "quality": 0}, "images.quality"),
                       ({"format": "png", "quality": 90}, "images.quality")):
        text = json.dumps({**json.loads(plain.to_json()), "images": bad})
        with pytest.raises(SchemaError, match=rf"\[{field}\]|{field}"):
            CacheConfig.from_json(text, where="c/cache.json")


def test_png_views_give_the_dataset_samples_without_reading_the_dataset(tiny_train_cache, png_cache, monkeypatch):
    config = CorrCache(png_cache).config
    assert config.images == {"format": "png"}
    assert CorrCache(png_cache).window_ids() == CorrCache(tiny_train_cache).window_ids()  # views are not part of a window's id
    from_root, from_root_small = samples(tiny_train_cache, 64), samples(tiny_train_cache, 32)
    from cameo_corr.datasets import canonical

    def no_dataset(*args, **kwargs):
        raise AssertionError("the dataset was read")

    monkeypatch.setattr(canonical, "load_window", no_dataset)
    stored = samples(png_cache, 64)
    assert [s["window_id"] for s in stored] == [s["window_id"] for s in from_root]
    for x, y in zip(from_root, stored):
        assert torch.equal(x["image"], y["image"])  # lossless views at the canonical size: the same pixels
        assert torch.allclose(x["intrinsic"], y["intrinsic"]) and torch.equal(x["extrinsic"], y["extrinsic"])
        for k in ("corr_nn", "corr_mask", "corr_dist"):
            assert torch.equal(x[k], y[k])
    small = samples(png_cache, 32)  # resized from the stored 64 px views: close to the one-step crop + resize
    for x, y in zip(from_root_small, small):
        assert torch.allclose(x["intrinsic"], y["intrinsic"], atol=1e-4)
        assert (x["image"] - y["image"]).abs().mean() < 0.02


def test_neither_stored_views_nor_a_dataset_root_is_a_clear_error(tiny_train_cache, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(tiny_train_cache, cache)
    cfg = json.loads((cache / "cache.json").read_text())
    cfg["dataset"]["root"] = str(tmp_path / "gone")
    (cache / "cache.json").write_text(json.dumps(cfg))
    with pytest.raises(DatasetError, match=r"gone \[dataset.root\]: .*data.dataset_root=<dir>.*--store-images jpeg"):
        samples(cache, 32)


def test_store_images_jpeg_to_s3_then_train_without_the_dataset(tiny_train_cache, s3_endpoint, s3_bucket, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(CorrCache(tiny_train_cache).config.dataset["root"], data)
    env = {**os.environ, **s3_endpoint.env}
    url = f"{s3_bucket}/cache"
    proc = preprocess(str(data), url, "--store-images", "jpeg", "--jpeg-quality", "85", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    shutil.rmtree(data)  # the trainer gets no dataset root: the cache holds its views
    remote = CorrCache(url, s3_endpoint.storage_options)
    assert remote.config.images == {"format": "jpeg", "quality": 85}
    # the trainer reaches the store through --storage-option alone (no AWS_* endpoint in its environment)
    train_env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_ENDPOINT")}
    run = subprocess.run([*CLI, "train", "--cache", url, "--config", "tiny_cpu", "--out", str(tmp_path / "run"), "--max-steps", "1",
                          "--no-progress", *s3_endpoint.cli_options(), "data.num_views=3",
                          f"data.local_cache={json.dumps(str(tmp_path / 'lc'))}", "data.local_cache_bytes=100000000"],
                         check=False, capture_output=True, text=True, timeout=600, env=train_env)
    assert run.returncode == 0, run.stderr[-3000:]
    assert s3_endpoint.url not in (tmp_path / "run" / "config.yaml").read_text()  # options are not part of the run's config
    assert json.loads(run.stdout.strip().splitlines()[-1])["step"] == 1
    assert list((tmp_path / "lc").glob("*/*.zarr.zip.*"))  # the shards came through the local cache
    jpeg = samples(url, 64, storage_options=s3_endpoint.storage_options)
    for x, y in zip(samples(tiny_train_cache, 64), jpeg):
        assert x["window_id"] == y["window_id"] and torch.equal(x["corr_nn"], y["corr_nn"])
        assert 0 < (x["image"] - y["image"]).abs().mean() < 0.06  # lossy, close (q85 on 64 px synthetic textures: ~0.04)
    assert np.all(remote.read_shard(remote.locate(remote.window_ids()[0])[0], ["image_nbytes"])["image_nbytes"] > 0)


def test_viz_draws_the_stored_views(tiny_train_cache, png_cache):
    from cameo_corr.cache.viz import load_window_images

    plain, stored = CorrCache(tiny_train_cache), CorrCache(png_cache)
    wid = plain.window_ids()[0]
    assert np.array_equal(load_window_images(stored, stored.row(wid)), load_window_images(plain, plain.row(wid)))
