"""RealEstate10K readers on the real sample clips: raw layout, bad files, pixelSplat chunks."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cameo_corr.datasets import open_dataset
from cameo_corr.datasets.canonical import CanonicalView, load_window
from cameo_corr.datasets.re10k import RE10KChunkReader, RE10KReader
from cameo_corr.schemas import DatasetError, WindowRecord


@pytest.fixture(scope="module")
def clips(shared_data: Path) -> Path:
    return shared_data / "re10k_clips"


def _numbers(txt: Path) -> np.ndarray:
    return np.array([[float(v) for v in line.split()] for line in txt.read_text().splitlines()[1:] if line.strip()])


def test_reads_all_real_clips(clips: Path) -> None:
    reader = open_dataset("re10k", clips)
    assert isinstance(reader, RE10KReader)
    ids = reader.scene_ids()
    assert len(ids) == 10
    for scene in reader.scenes():
        scene.validate()
        rows = _numbers(clips / "test" / f"{scene.scene_id}.txt")
        assert len(scene.frames) == len(rows) == 16
        for frame, row in zip(scene.frames, rows):
            assert frame.frame_id == str(int(row[0])) and frame.image_size == (256, 384)
            assert frame.image_path == f"frames/{scene.scene_id}/{frame.frame_id}.jpg"
            K, E = frame.intrinsics, frame.extrinsics
            np.testing.assert_allclose([K[0, 0], K[1, 1], K[0, 2], K[1, 2]], row[1:5] * [384, 256, 384, 256])
            np.testing.assert_allclose(E[:3].reshape(-1), row[7:19])
            np.testing.assert_allclose(E[:3, :3] @ E[:3, :3].T, np.eye(3), atol=1e-6)
    frame = reader.scene(ids[0]).frames[3]
    image = reader.load_image(frame)
    assert image.dtype == np.uint8 and image.shape == (256, 384, 3) and image.std() > 10


def test_load_window_center_crop(clips: Path) -> None:
    reader = RE10KReader(clips)
    scene = reader.scene(reader.scene_ids()[1])
    record = WindowRecord("w", "re10k", "test", scene.scene_id, scene.frames[:3])
    data = load_window(reader, record, CanonicalView(size=128))
    assert data.images.shape == (3, 128, 128, 3) and data.depth is None and data.masks is None
    # center crop of 384x256 is x in [64, 320): cx 192 -> 64 px in a 128 view, f scales by 0.5
    K = scene.frames[0].intrinsics
    np.testing.assert_allclose(data.intrinsics[0], [[K[0, 0] / 2, 0, 64], [0, K[1, 1] / 2, 64], [0, 0, 1]])


def test_frames_root_outside_root(clips: Path, tmp_path: Path) -> None:
    key = "0c11dbe781b1c11c"
    (tmp_path / "test").mkdir()
    shutil.copy(clips / "test" / f"{key}.txt", tmp_path / "test")
    reader = RE10KReader(tmp_path, frames_root=clips / "frames")
    frame = reader.scene(key).frames[0]
    assert frame.image_path == f"{key}/{frame.frame_id}.jpg"
    assert reader.load_image(frame).shape == (256, 384, 3)
    reopened = open_dataset("re10k", tmp_path, **reader.options())
    assert reopened.scene(key).frames[0].image_path == frame.image_path


def _bad_clip(tmp_path: Path, clips: Path, edit) -> tuple[RE10KReader, Path, str]:
    """A copy of one real clip whose camera file lines are passed through ``edit``."""
    key = "0bf152ef84195293"
    (tmp_path / "test").mkdir(exist_ok=True)
    (tmp_path / "frames").mkdir(exist_ok=True)
    if not (tmp_path / "frames" / key).exists():
        (tmp_path / "frames" / key).symlink_to(clips / "frames" / key)
    lines = (clips / "test" / f"{key}.txt").read_text().splitlines()
    path = tmp_path / "test" / f"{key}.txt"
    path.write_text("\n".join(edit(lines)) + "\n")
    return RE10KReader(tmp_path), path, key


def _replace(line_no: int, col: int, value: str):
    def edit(lines: list[str]) -> list[str]:
        tokens = lines[line_no - 1].split()
        tokens[col] = value
        lines[line_no - 1] = " ".join(tokens)
        return lines
    return edit


@pytest.mark.parametrize(
    "edit,line,field,match",
    [
        (_replace(4, 0, "158692026"), 4, "timestamp_us", "missing frame file"),
        (_replace(5, 2, "0.84x"), 5, "fy", "malformed number"),
        (_replace(6, 10, "nan"), 6, "t0", "non-finite"),
        (_replace(7, 18, "inf"), 7, "t2", "non-finite"),
        (lambda ls: ls[:8] + [ls[8] + " 0.5"] + ls[9:], 9, "columns", "expected 19 numbers, got 20"),
        (lambda ls: ls[:3] + [" ".join(ls[3].split()[:12])] + ls[4:], 4, "columns", "got 12"),
        (_replace(3, 7, "2.0"), 3, "extrinsics", "not a proper rotation"),
        (_replace(2, 1, "-0.5"), 2, "intrinsics", "positive"),
        (_replace(3, 0, "158692025"), 3, "timestamp_us", "repeats line 2"),
        (lambda ls: [], 1, "url", "empty camera file"),
        (lambda ls: ls[1:], 1, "url", "must be the video URL"),
        (lambda ls: ls[:1], 1, None, "no frames"),
    ],
)
def test_bad_camera_files(clips: Path, tmp_path: Path, edit, line: int, field: str | None, match: str) -> None:
    reader, path, key = _bad_clip(tmp_path, clips, edit)
    with pytest.raises(DatasetError, match=match) as e:
        reader.scene(key)
    err = e.value
    assert err.line == line and err.field == field and err.scene_id == key
    if field == "timestamp_us" and match == "missing frame file":
        assert err.path.endswith(f"{key}/158692026.{{png,jpg,jpeg}}") and path.name in str(err)
    else:
        assert err.path == str(path)
    assert f":{line}" in str(err)


def test_missing_split_and_frames(clips: Path, tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="split directory"):
        RE10KReader(clips, split="train")
    (tmp_path / "test").mkdir()
    shutil.copy(clips / "test" / "0bf152ef84195293.txt", tmp_path / "test")
    with pytest.raises(DatasetError, match="frame directory") as e:
        RE10KReader(tmp_path).scene("0bf152ef84195293")
    assert e.value.scene_id == "0bf152ef84195293"


# ------------------------------------------------------------------------------ pixelSplat chunks
def _chunk_item(clips: Path, key: str) -> dict:
    """A pixelSplat clip dict built from the raw files (JPEG bytes stored unchanged)."""
    rows = _numbers(clips / "test" / f"{key}.txt")
    images = [torch.frombuffer(bytearray((clips / "frames" / key / f"{int(r[0])}.jpg").read_bytes()), dtype=torch.uint8)
              for r in rows]
    url = (clips / "test" / f"{key}.txt").read_text().splitlines()[0]
    return {"url": url, "timestamps": torch.tensor(rows[:, 0], dtype=torch.int64),
            "cameras": torch.tensor(rows[:, 1:], dtype=torch.float32), "images": images, "key": key}


def _write_chunks(root: Path, chunks: dict[str, list]) -> None:
    (root / "test").mkdir(parents=True, exist_ok=True)
    index = {}
    for name, items in chunks.items():
        torch.save(items, root / "test" / name)
        index.update({item["key"]: name for item in items if isinstance(item, dict)})
    (root / "test" / "index.json").write_text(json.dumps(index))


def test_chunks_match_raw_reader(clips: Path, tmp_path: Path) -> None:
    raw = RE10KReader(clips)
    keys = raw.scene_ids()[:3]
    _write_chunks(tmp_path, {"000000.torch": [_chunk_item(clips, k) for k in keys[:2]],
                             "000001.torch": [_chunk_item(clips, keys[2])]})
    chunks = open_dataset("re10k-chunks", tmp_path)
    assert isinstance(chunks, RE10KChunkReader) and chunks.scene_ids() == keys
    for key in keys:
        a, b = raw.scene(key), chunks.scene(key)
        b.validate()
        assert [f.frame_id for f in a.frames] == [f.frame_id for f in b.frames]
        for fa, fb in zip(a.frames, b.frames):
            assert fa.image_size == fb.image_size
            np.testing.assert_allclose(fb.intrinsics, fa.intrinsics, rtol=1e-6)
            np.testing.assert_allclose(fb.extrinsics, fa.extrinsics, atol=1e-6)
        for i in (0, 7, 15):
            assert b.frames[i].image_path.endswith(f"#{key}/{i}")
            np.testing.assert_array_equal(chunks.load_image(b.frames[i]), raw.load_image(a.frames[i]))


class _Payload:
    """An object whose unpickling would run code (appends to ``EXECUTED``)."""

    def __reduce__(self):
        return (EXECUTED.append, ("unpickled",))


EXECUTED: list[str] = []


def test_pickled_object_chunk_is_refused(clips: Path, tmp_path: Path) -> None:
    item = _chunk_item(clips, "0bf152ef84195293")
    item["extra"] = _Payload()
    _write_chunks(tmp_path, {"000000.torch": [item]})
    EXECUTED.clear()
    reader = RE10KChunkReader(tmp_path)
    with pytest.raises(DatasetError, match="weights_only=True") as e:
        reader.scene("0bf152ef84195293")
    assert e.value.path.endswith("000000.torch") and e.value.scene_id == "0bf152ef84195293"
    assert EXECUTED == []


@pytest.mark.parametrize(
    "mutate,field",
    [
        (lambda it: it.update(cameras=it["cameras"][:, :17]), "cameras"),
        (lambda it: it["cameras"].__setitem__((3, 1), float("nan")), "cameras[3].fy"),
        (lambda it: it.update(images=it["images"][:-1]), "images"),
        (lambda it: it["images"].__setitem__(0, torch.zeros(10, dtype=torch.uint8)), "images[0]"),
        (lambda it: it.pop("timestamps"), "timestamps"),
        (lambda it: it["cameras"].__setitem__((5, 6), 3.0), "cameras[5]"),
    ],
)
def test_bad_chunk_clips(clips: Path, tmp_path: Path, mutate, field: str) -> None:
    item = _chunk_item(clips, "0bf152ef84195293")
    mutate(item)
    _write_chunks(tmp_path, {"000000.torch": [item]})
    with pytest.raises(DatasetError) as e:
        RE10KChunkReader(tmp_path).scene("0bf152ef84195293")
    assert e.value.field == field and e.value.path.endswith("000000.torch")


def test_one_header_per_clip_and_bad_frames_fail_at_load(clips: Path, tmp_path: Path, monkeypatch) -> None:
    """Reading a clip opens the header of its first frame only; a later frame that is corrupt or of
    another size fails when the window is loaded, naming the file."""
    import cameo_corr.datasets.re10k as re10k
    from PIL import Image

    root = tmp_path / "re10k"
    shutil.copytree(clips, root)
    opened = []
    real = re10k.read_image_size
    monkeypatch.setattr(re10k, "read_image_size", lambda src, *a, **k: opened.append(src) or real(src, *a, **k))
    reader = RE10KReader(root)
    sid = reader.scene_ids()[0]
    scene = reader.scene(sid)
    assert len(opened) == 1 and len(scene.frames) == 16
    small = root / scene.frames[2].image_path
    Image.new("RGB", (100, 50)).save(small, format="JPEG")
    scene = reader.scene(sid)
    assert scene.frames[2].image_size == (256, 384)  # the clip's size, from frame 0
    record = WindowRecord("w", "re10k", "test", sid, scene.frames[:3])
    with pytest.raises(DatasetError, match="image has size") as e:
        load_window(reader, record, CanonicalView(size=64))
    assert e.value.path == scene.frames[2].image_path

    item = _chunk_item(clips, "0bf152ef84195293")
    item["images"][2] = torch.zeros(10, dtype=torch.uint8)
    _write_chunks(tmp_path / "chunks", {"000000.torch": [item]})
    chunks = RE10KChunkReader(tmp_path / "chunks")
    scene = chunks.scene("0bf152ef84195293")
    record = WindowRecord("w", "re10k-chunks", "test", scene.scene_id, scene.frames[:3])
    with pytest.raises(DatasetError, match="cannot decode image") as e:
        load_window(chunks, record, CanonicalView(size=64))
    assert e.value.path.endswith("000000.torch#0bf152ef84195293/2")


def test_bad_chunk_index(tmp_path: Path) -> None:
    (tmp_path / "test").mkdir()
    with pytest.raises(DatasetError, match="chunk index"):
        RE10KChunkReader(tmp_path)
    (tmp_path / "test" / "index.json").write_text("[1, 2]")
    with pytest.raises(DatasetError, match="JSON object"):
        RE10KChunkReader(tmp_path)
    (tmp_path / "test" / "index.json").write_text('{"abc": "missing.torch"}')
    reader = RE10KChunkReader(tmp_path)
    with pytest.raises(DatasetError, match="chunk file does not exist") as e:
        reader.scene("abc")
    assert e.value.scene_id == "abc"
    with pytest.raises(DatasetError, match="not in the chunk index"):
        reader.scene("other")


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32), scale=st.floats(-3e-3, 3e-3), shear=st.floats(-3e-3, 3e-3),
       fx=st.sampled_from([0.9, 0.0, -0.5, float("nan"), 1e308]), unused=st.sampled_from([0.0, float("inf")]))
def test_quick_camera_check_never_passes_an_invalid_camera(seed, scale, shear, fx, unused):
    """The batched pre-check of camera rows passes only cameras that ``validate_camera`` accepts
    (flagged rows go to the precise reader), and passes ordinary valid ones."""
    from cameo_corr.datasets.re10k import _cameras, _suspect_rows
    from cameo_corr.schemas import SchemaError, validate_camera

    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    R = q * np.sign(np.linalg.det(q))
    rows = []
    for M in (R, R * (1 + scale), R + shear * np.eye(3)[[1, 2, 0]]):
        rows.append([1000, fx, 1.6, 0.5, 0.5, unused, 0, *np.c_[M, [0.1, 0.2, 0.3]].reshape(-1)])
    table = np.array(rows)
    H, W = np.full(3, 360), np.full(3, 640)
    suspect = _suspect_rows(table, H, W)
    with np.errstate(over="ignore"):
        K, E = _cameras(table[:, 1:], H, W)
    for i in range(3):
        try:
            validate_camera(K[i], E[i], where="")
            valid = np.isfinite(table[i]).all()
        except SchemaError:
            valid = False
        assert valid or suspect[i]
    if fx == 0.9 and unused == 0.0:
        assert not suspect[0]
