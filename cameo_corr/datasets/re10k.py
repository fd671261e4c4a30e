"""RealEstate10K readers: the raw layout (camera ``.txt`` per clip + extracted frames) and pixelSplat
``.torch`` chunks.

Raw layout (:class:`RE10KReader`)::

    <root>/<split>/<key>.txt                            line 1: video URL; then one frame per line:
        timestamp_us fx fy cx cy 0 0 r00 r01 r02 t0 r10 r11 r12 t1 r20 r21 r22 t2
    <frames_root>/<key>/<timestamp_us>.<png|jpg|jpeg>   (frames_root defaults to <root>/frames)

Intrinsics are normalized by the image width/height; the pose is world-to-camera, OpenCV (SPEC
section 1). The pixel intrinsics use the size of the stored frames: all frames of a clip share one
size (RealEstate10K frames are extracted from one video), read from the header of the clip's first
frame only, so reading a clip opens one image; a frame of another size is caught when the window is
loaded (:func:`~cameo_corr.datasets.canonical.load_window` names the file). Cameras are parsed and
validated for the whole clip at once.

pixelSplat chunks (:class:`RE10KChunkReader`)::

    <root>/<split>/index.json       {key: chunk file name (relative to <root>/<split>)}
    <root>/<split>/<chunk>.torch    torch.save(list[dict(url, timestamps int64 [N],
                                    cameras float32 [N, 18], images list[uint8 JPEG bytes], key)])

Chunks are loaded with ``torch.load(weights_only=True)`` only, never unpickled.

Frame ids are the timestamps (integer microseconds, as written in the file).
"""

from __future__ import annotations

import io
import itertools
import json
import math
import os
from pathlib import Path
from typing import Any, Callable, Iterable, NamedTuple, Sequence

import numpy as np

from cameo_corr.datasets.base import SceneReader
from cameo_corr.datasets.image_io import read_image, read_image_size
from cameo_corr.schemas import (
    CameoCorrError,
    DatasetError,
    FrameRecord,
    SceneRecord,
    first_invalid_camera,
)

RAW_COLUMNS: tuple[str, ...] = (
    "timestamp_us", "fx", "fy", "cx", "cy", "unused0", "unused1",
    "r00", "r01", "r02", "t0", "r10", "r11", "r12", "t1", "r20", "r21", "r22", "t2",
)
"""The 19 numbers of one frame line of a raw RealEstate10K camera file."""
CAMERA_COLUMNS: tuple[str, ...] = RAW_COLUMNS[1:]
"""The 18 camera numbers (pixelSplat's ``cameras`` rows): everything after the timestamp."""
FRAME_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg")


def camera_from_row(values: Sequence[float], width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel intrinsics ``K`` and world-to-camera ``E`` of one 18-number RealEstate10K camera row."""
    K, E = _cameras(np.asarray(values, dtype=np.float64)[None, :18], height, width)
    return K[0], E[0]


def _cameras(values: np.ndarray, H: Any, W: Any) -> tuple[np.ndarray, np.ndarray]:
    """Pixel ``K [N, 3, 3]`` and world-to-camera ``E [N, 4, 4]`` of ``N`` 18-number camera rows of
    images ``H x W`` (numbers, or one per row)."""
    v = np.asarray(values, dtype=np.float64)
    n = len(v)
    K = np.zeros((n, 3, 3))
    K[:, 0, 0], K[:, 1, 1], K[:, 0, 2], K[:, 1, 2], K[:, 2, 2] = W * v[:, 0], H * v[:, 1], W * v[:, 2], H * v[:, 3], 1.0
    E = np.tile(np.eye(4), (n, 1, 1))
    E[:, :3, :] = v[:, 6:18].reshape(n, 3, 4)
    return K, E


def _checked_cameras(values: np.ndarray, hw: tuple[int, int], path: str, scene_id: str,
                     where: Callable[[int], dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_cameras` of one clip, validated in one batch; the first invalid camera raises
    :class:`DatasetError` at ``where(i)``."""
    K, E = _cameras(values, *hw)
    bad = first_invalid_camera(K, E)
    if bad is not None:
        i, e = bad
        loc = where(i)
        raise DatasetError(path, str(e), field=loc.pop("field", None) or e.field, scene_id=scene_id, **loc)
    return K, E


class _Clip(NamedTuple):
    """A validated raw clip: timestamps (frame ids), frame file names, ``(H, W)``, camera numbers
    ``[N, 18]`` (:func:`_cameras` makes them ``K`` and ``E``)."""

    stamps: list[str]
    names: list[str]
    hw: tuple[int, int]
    cameras: np.ndarray


class _Pending(NamedTuple):
    """A clip whose text and frame files passed the quick checks, its numbers not parsed yet."""

    scene_id: str
    body: list[str]
    stamps: list[str]
    names: list[str]
    hw: tuple[int, int]


def _suspect_rows(table: np.ndarray, H: np.ndarray, W: np.ndarray, rot_tol: float = 1e-3) -> np.ndarray:
    """Frame lines (timestamp + 18 camera numbers, images ``H x W``) whose camera might fail
    :func:`~cameo_corr.schemas.validate_camera`: a few column operations, stricter than it by a
    margin far above rounding, so every clip it passes is valid; flagged clips are decided by the
    precise reader."""
    margin = 1e-9
    with np.errstate(invalid="ignore", over="ignore"):
        bad = ~np.isfinite(table).all(axis=1)
        for scale, col in ((W, 1), (H, 2), (W, 3), (H, 4)):
            bad |= ~np.isfinite(scale * table[:, col])
        bad |= ~(W * table[:, 1] > 0) | ~(H * table[:, 2] > 0)
        r = [table[:, 7:10], table[:, 11:14], table[:, 15:18]]  # rows of R
        for i in range(3):
            for j in range(i, 3):  # R R^T = I, as np.allclose(atol=rot_tol) checks it
                bad |= ~(np.abs((r[i] * r[j]).sum(axis=1) - (i == j)) <= rot_tol + 1e-5 * (i == j) - margin)
        cross = np.stack([r[1][:, 1] * r[2][:, 2] - r[1][:, 2] * r[2][:, 1], r[1][:, 2] * r[2][:, 0] - r[1][:, 0] * r[2][:, 2],
                          r[1][:, 0] * r[2][:, 1] - r[1][:, 1] * r[2][:, 0]], axis=1)
        bad |= ~(np.abs((r[0] * cross).sum(axis=1) - 1.0) <= rot_tol - margin)  # det R = 1
    return bad


def _parse_bodies(bodies: Sequence[list[str]]) -> list[np.ndarray | None]:
    """The ``[lines, 19]`` numbers of each camera-file body (its frame lines), one numeric parse for
    all of them when they all parse; ``None`` for a body that does not parse to one row of 19 numbers
    per line (the precise parser then names the problem)."""
    def parse(lines: Iterable[str]) -> np.ndarray | None:
        try:
            return np.loadtxt(lines, dtype=np.float64, ndmin=2)
        except ValueError:
            return None

    rows = [len(body) for body in bodies]
    table = parse(itertools.chain.from_iterable(bodies)) if len(bodies) > 1 else None
    if table is not None and table.shape == (sum(rows), len(RAW_COLUMNS)):
        return np.split(table, np.cumsum(rows)[:-1])
    tables = [parse(body) for body in bodies]
    return [t if t is not None and t.shape == (n, len(RAW_COLUMNS)) else None for t, n in zip(tables, rows)]


class RE10KReader(SceneReader):
    """RealEstate10K raw layout: ``<root>/<split>/<key>.txt`` + ``<frames_root>/<key>/<timestamp>.*``.

    ``image_path`` of a frame is relative to the dataset root when ``frames_root`` lies inside it
    (the default ``<root>/frames`` gives ``frames/<key>/<timestamp>.jpg``); when ``frames_root`` lies
    elsewhere it is relative to ``frames_root`` (``<key>/<timestamp>.jpg``) and :meth:`load_image`
    joins it with ``frames_root``, which :meth:`options` records so the reader reopens identically.
    """

    name = "re10k"
    default_crop_policy = "center"

    def __init__(self, root: str | Path, split: str = "test", frames_root: str | Path | None = None) -> None:
        super().__init__(root, split)
        self.frames_root = Path(frames_root) if frames_root is not None else self.root / "frames"
        self._explicit_frames_root = frames_root is not None
        root_abs, frames_abs = self.root.resolve(), self.frames_root.resolve()
        self.image_root = self.root if frames_abs.is_relative_to(root_abs) else self.frames_root
        self._image_prefix = frames_abs.relative_to(root_abs) if self.image_root is self.root else Path()
        self.split_dir = self.root / split
        if not self.split_dir.is_dir():
            raise DatasetError(str(self.split_dir), f"split directory of '{self.name}' split {split!r} does not exist")

    def scene_ids(self) -> list[str]:
        """Sorted clip keys (stems of ``<root>/<split>/*.txt``)."""
        return sorted(p.stem for p in self.split_dir.glob("*.txt"))

    def scene(self, scene_id: str) -> SceneRecord:
        """Parse ``<root>/<split>/<scene_id>.txt`` and locate its frames; errors name file and line."""
        stamps, names, hw, cameras = self._clip(scene_id)
        K, E = _cameras(cameras, *hw)
        prefix = (self._image_prefix / scene_id).as_posix()
        frames = tuple(
            FrameRecord(frame_id=ts, image_path=f"{prefix}/{name}", image_size=hw, intrinsics=K[i], extrinsics=E[i])
            for i, (ts, name) in enumerate(zip(stamps, names))
        )
        return SceneRecord(self.tag, self.split, scene_id, frames)

    def frame_ids(self, scene_id: str) -> list[str]:
        """The clip's timestamps, after the same checks as :meth:`scene` (no frame records built)."""
        return self._clip(scene_id).stamps

    def frame_ids_batch(self, scene_ids: Sequence[str]) -> list[list[str] | CameoCorrError]:
        """:meth:`frame_ids` of many clips, read together (see :meth:`_clips`)."""
        return [c if isinstance(c, CameoCorrError) else c.stamps for c in self._clips(scene_ids)]

    def _clip(self, scene_id: str) -> _Clip:
        """The validated clip ``scene_id``; raises :class:`DatasetError` naming file and line."""
        (clip,) = self._clips([scene_id])
        if isinstance(clip, DatasetError):
            raise clip
        return clip

    def _clips(self, scene_ids: Sequence[str]) -> list[_Clip | DatasetError]:
        """The validated clips ``scene_ids``, or the error of each bad one.

        Clips whose camera file has no blank line and whose frame directory holds exactly the listed
        frames (one extension) are parsed with one numeric parse and their cameras checked with a few
        column operations for all of them (:func:`_suspect_rows`); any other clip, and any clip those
        checks flag, goes through :meth:`_clip_precise`, which decides it exactly and reports the
        first problem by file, line and field.
        """
        out: list[_Clip | DatasetError | None] = [None] * len(scene_ids)
        pending: list[tuple[int, _Pending]] = []
        for pos, sid in enumerate(scene_ids):
            quick = self._quick(sid)
            if quick is None:
                out[pos] = self._clip_precise(sid)
            else:
                pending.append((pos, quick))
        tables = _parse_bodies([q.body for _, q in pending])
        for (pos, q), table in zip(pending, tables):
            if table is None:
                out[pos] = self._clip_precise(q.scene_id)
        pending = [(pos, q) for pos, q in pending if out[pos] is None]
        if not pending:
            return out  # type: ignore[return-value]
        table = np.concatenate([t for t in tables if t is not None])
        counts = np.array([len(q.stamps) for _, q in pending])
        hw = np.array([q.hw for _, q in pending])
        suspect = _suspect_rows(table, np.repeat(hw[:, 0], counts), np.repeat(hw[:, 1], counts))
        for c in np.unique(np.repeat(np.arange(len(pending)), counts)[suspect]):
            out[pending[c][0]] = self._clip_precise(pending[c][1].scene_id)  # names the line, or accepts it
        for (pos, q), a, b in zip(pending, np.cumsum(counts) - counts, np.cumsum(counts)):
            if out[pos] is None:
                out[pos] = _Clip(q.stamps, q.names, q.hw, table[a:b, 1:])
        return out  # type: ignore[return-value]

    def _quick(self, scene_id: str) -> _Pending | None:
        """A clip whose camera file (URL line, then one frame line per line, integer timestamps that
        do not repeat) and frame directory (exactly one file per timestamp, one extension, a readable
        first frame) pass the checks that need no numeric parse; ``None`` for anything else."""
        try:
            lines = (self.split_dir / f"{scene_id}.txt").read_text(encoding="utf-8").splitlines()
            names = os.listdir(self.frames_root / scene_id)
        except (OSError, UnicodeDecodeError):
            return None
        if len(lines) < 2 or not lines[0].strip() or len(lines[0].split()) == len(RAW_COLUMNS):
            return None
        body = lines[1:]
        try:
            stamps = [line.split(None, 1)[0] for line in body]
        except IndexError:  # a blank line
            return None
        if not "".join(stamps).isdigit() or len(set(stamps)) != len(stamps) or len(names) != len(stamps):
            return None
        ext = names[0][names[0].rfind(".") :]
        files = [ts + ext for ts in stamps]
        if ext.lower() not in FRAME_EXTENSIONS or set(files) != set(names):
            return None
        first = self.frames_root / scene_id / files[0]
        try:
            hw = read_image_size(first, str(first), scene_id, field="image")
        except DatasetError:
            return None
        return _Pending(scene_id, body, stamps, files, hw)

    def _clip_precise(self, scene_id: str) -> _Clip | DatasetError:
        """The clip checked step by step in file order; the first problem is returned as the error."""
        try:
            path = self.split_dir / f"{scene_id}.txt"
            if not path.is_file():
                raise DatasetError(str(path), "camera file of the clip does not exist", scene_id=scene_id)
            line_nos, stamps, values = self._parse(path, scene_id)
            frame_dir = self.frames_root / scene_id
            if not frame_dir.is_dir():
                raise DatasetError(str(frame_dir), "frame directory of the clip does not exist", scene_id=scene_id)
            files: dict[str, str] = {}
            for name in os.listdir(frame_dir):
                stem, dot, ext = name.rpartition(".")
                if dot and f".{ext.lower()}" in FRAME_EXTENSIONS:
                    if stem in files:
                        raise DatasetError(str(frame_dir / name), f"two frame files for timestamp {stem} ({files[stem]})",
                                           scene_id=scene_id)
                    files[stem] = name
            names: list[str] = []
            for line_no, ts in zip(line_nos, stamps):
                if ts not in files:
                    expected = frame_dir / f"{ts}.{{png,jpg,jpeg}}"
                    raise DatasetError(str(expected), f"missing frame file (listed in {path.name})", line=line_no,
                                       field="timestamp_us", scene_id=scene_id)
                names.append(files[ts])
            first = frame_dir / names[0]
            hw = read_image_size(first, str(first), scene_id, field="image")
            _checked_cameras(values, hw, str(path), scene_id, lambda i: {"line": line_nos[i]})
        except DatasetError as e:
            return e
        return _Clip(stamps, names, hw, values)

    def load_image(self, frame: FrameRecord) -> np.ndarray:
        """Decode the frame file as RGB uint8 ``[H, W, 3]``."""
        path = self.image_root / frame.image_path
        if not path.is_file():
            raise DatasetError(str(path), "frame file does not exist", field="image")
        return read_image(path, "RGB")

    def options(self) -> dict[str, Any]:
        """``split`` and, when given explicitly, ``frames_root``."""
        opts: dict[str, Any] = {"split": self.split}
        if self._explicit_frames_root:
            opts["frames_root"] = str(self.frames_root)
        return opts

    @staticmethod
    def _parse(path: Path, scene_id: str) -> tuple[list[int], list[str], np.ndarray]:
        """``(line numbers, timestamp strings, camera numbers [N, 18])`` of the frame lines of a camera file.

        Well-formed files take a fast path (one C-level numeric parse for the whole file); anything it
        does not accept is parsed line by line, which names the first bad line and field.
        """
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise DatasetError(str(path), f"cannot read camera file: {e}", scene_id=scene_id) from e
        fast = RE10KReader._parse_fast(lines)
        if fast is not None:
            return fast
        rows = RE10KReader._parse_lines(lines, path, scene_id)
        return [r[0] for r in rows], [r[1] for r in rows], np.array([r[2] for r in rows], dtype=np.float64)

    @staticmethod
    def _parse_fast(lines: list[str]) -> tuple[list[int], list[str], np.ndarray] | None:
        """The rows of a well-formed camera file, or ``None`` when any check fails (then the line by
        line parser reports the error)."""
        if not lines or not lines[0].strip() or len(lines[0].split()) == len(RAW_COLUMNS):
            return None
        line_nos = [n for n, line in enumerate(lines[1:], start=2) if line.strip()]
        if not line_nos:
            return None
        body = [lines[n - 1] for n in line_nos]
        try:
            table = np.loadtxt(body, dtype=np.float64, ndmin=2)
        except ValueError:
            return None
        stamps = [line.split(None, 1)[0] for line in body]
        if (table.shape[1] != len(RAW_COLUMNS) or not all(ts.isdigit() for ts in stamps)
                or len(set(stamps)) != len(stamps) or not np.isfinite(table).all()):
            return None
        return line_nos, stamps, table[:, 1:]

    @staticmethod
    def _parse_lines(lines: list[str], path: Path, scene_id: str) -> list[tuple[int, str, list[float]]]:
        """Line by line parse of a camera file; the first problem raises :class:`DatasetError`."""
        if not lines or not lines[0].strip():
            raise DatasetError(str(path), "empty camera file (line 1 must be the video URL)", line=1, field="url",
                               scene_id=scene_id)
        first = lines[0].split()
        if len(first) == len(RAW_COLUMNS) and first[0].isdigit():
            raise DatasetError(str(path), "line 1 must be the video URL, found a camera line", line=1, field="url",
                               scene_id=scene_id)
        rows: list[tuple[int, str, list[float]]] = []
        seen: dict[str, int] = {}
        for line_no, line in enumerate(lines[1:], start=2):
            tokens = line.split()
            if not tokens:
                continue
            if len(tokens) != len(RAW_COLUMNS):
                raise DatasetError(str(path), f"expected {len(RAW_COLUMNS)} numbers, got {len(tokens)}", line=line_no,
                                   field="columns", scene_id=scene_id)
            ts = tokens[0]
            if not ts.isdigit():
                raise DatasetError(str(path), f"timestamp {ts!r} is not a non-negative integer", line=line_no,
                                   field="timestamp_us", scene_id=scene_id)
            if ts in seen:
                raise DatasetError(str(path), f"timestamp {ts} repeats line {seen[ts]}", line=line_no,
                                   field="timestamp_us", scene_id=scene_id)
            seen[ts] = line_no
            values: list[float] = []
            for name, tok in zip(CAMERA_COLUMNS, tokens[1:]):
                try:
                    v = float(tok)
                except ValueError:
                    raise DatasetError(str(path), f"malformed number {tok!r}", line=line_no, field=name,
                                       scene_id=scene_id) from None
                if not math.isfinite(v):
                    raise DatasetError(str(path), f"non-finite value {tok!r}", line=line_no, field=name, scene_id=scene_id)
                values.append(v)
            rows.append((line_no, ts, values))
        if not rows:
            raise DatasetError(str(path), "camera file lists no frames", line=len(lines), scene_id=scene_id)
        return rows


class RE10KChunkReader(SceneReader):
    """pixelSplat ``.torch`` chunks of RealEstate10K: ``<root>/<split>/index.json`` + chunk files.

    ``image_path`` of a frame is ``"<split>/<chunk file>#<key>/<index>"`` (relative to the root);
    :meth:`load_image` decodes the JPEG bytes stored at that index. The most recently loaded chunk is
    kept in memory (chunks hold many clips and are read clip after clip).
    """

    name = "re10k-chunks"
    default_crop_policy = "center"

    def __init__(self, root: str | Path, split: str = "test") -> None:
        super().__init__(root, split)
        self.split_dir = self.root / split
        index_path = self.split_dir / "index.json"
        if not index_path.is_file():
            raise DatasetError(str(index_path), f"chunk index of split {split!r} does not exist")
        try:
            index = json.loads(index_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DatasetError(str(index_path), f"cannot read the chunk index: {e}") from e
        if not isinstance(index, dict):
            raise DatasetError(str(index_path), "must map clip keys to chunk file names (a JSON object)")
        for key, chunk in index.items():
            if not isinstance(chunk, str) or not chunk:
                raise DatasetError(str(index_path), f"chunk file name must be a non-empty string, got {chunk!r}", field=key)
            if "/" in key or "#" in key:
                raise DatasetError(str(index_path), "clip keys may not contain '/' or '#'", field=key)
        self.index: dict[str, str] = index
        self._chunk: tuple[str, dict[str, dict[str, Any]]] | None = None

    def scene_ids(self) -> list[str]:
        """Sorted clip keys of ``index.json``."""
        return sorted(self.index)

    def scene(self, scene_id: str) -> SceneRecord:
        """The clip ``scene_id`` from its chunk, validated; errors name the chunk file and the field."""
        if scene_id not in self.index:
            raise DatasetError(str(self.split_dir / "index.json"), "clip key not in the chunk index", field=scene_id,
                               scene_id=scene_id)
        chunk_rel = f"{self.split}/{self.index[scene_id]}"
        item = self._clip(chunk_rel, scene_id)
        path = str(self.root / chunk_rel)
        timestamps, cameras, images = self._validated(item, path, scene_id)
        hw = read_image_size(io.BytesIO(images[0].numpy().tobytes()), path, scene_id, field="images[0]")
        K, E = _checked_cameras(cameras, hw, path, scene_id, lambda i: {"field": f"cameras[{i}]"})
        frames = [
            FrameRecord(frame_id=str(ts), image_path=f"{chunk_rel}#{scene_id}/{i}", image_size=hw, intrinsics=K[i], extrinsics=E[i])
            for i, ts in enumerate(timestamps)
        ]
        ids = [f.frame_id for f in frames]
        if len(set(ids)) != len(ids):
            raise DatasetError(path, "timestamps of a clip must be unique", field="timestamps", scene_id=scene_id)
        return SceneRecord(self.tag, self.split, scene_id, tuple(frames))

    def load_image(self, frame: FrameRecord) -> np.ndarray:
        """Decode the JPEG bytes ``images[index]`` of the clip named by ``frame.image_path``."""
        chunk_rel, sep, ref = frame.image_path.rpartition("#")
        key, _, index = ref.rpartition("/")
        if not sep or not key or not index.isdigit():
            raise DatasetError(frame.image_path, "expected '<chunk file>#<key>/<index>'", field="image_path")
        images = self._clip(chunk_rel, key).get("images")
        i = int(index)
        if not isinstance(images, list) or i >= len(images):
            raise DatasetError(str(self.root / chunk_rel), f"clip has no image {i}", field="images", scene_id=key)
        return read_image(io.BytesIO(images[i].numpy().tobytes()), "RGB", path=f"{self.root / chunk_rel}#{key}/{i}",
                          scene_id=key)

    # ------------------------------------------------------------------------------- internals
    def _clip(self, chunk_rel: str, key: str) -> dict[str, Any]:
        """The dict of clip ``key`` from chunk file ``chunk_rel`` (the last chunk stays cached)."""
        if self._chunk is None or self._chunk[0] != chunk_rel:
            self._chunk = (chunk_rel, self._load_chunk(self.root / chunk_rel, key))
        clips = self._chunk[1]
        if key not in clips:
            raise DatasetError(str(self.root / chunk_rel), "chunk does not contain the clip", field=key, scene_id=key)
        return clips[key]

    @staticmethod
    def _load_chunk(path: Path, key: str) -> dict[str, dict[str, Any]]:
        """Load one chunk with ``torch.load(weights_only=True)`` and index its clips by key."""
        import torch

        if not path.is_file():
            raise DatasetError(str(path), "chunk file does not exist", scene_id=key)
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError... on bad chunks
            raise DatasetError(str(path), "cannot be loaded with torch.load(weights_only=True) (only tensors, lists, "
                               f"dicts and strings are accepted; untrusted pickles are never executed): {e}",
                               scene_id=key) from e
        if not isinstance(data, list):
            raise DatasetError(str(path), f"chunk must be a list of clip dicts, got {type(data).__name__}", scene_id=key)
        clips: dict[str, dict[str, Any]] = {}
        for i, item in enumerate(data):
            if not isinstance(item, dict) or not isinstance(item.get("key"), str):
                raise DatasetError(str(path), "every clip must be a dict with a string 'key'", field=f"[{i}].key", scene_id=key)
            clips[item["key"]] = item
        return clips

    @staticmethod
    def _validated(item: dict[str, Any], path: str, scene_id: str) -> tuple[list[int], np.ndarray, list[Any]]:
        """Check ``timestamps``, ``cameras`` and ``images`` of one clip dict; errors name the field."""
        import torch

        for field in ("timestamps", "cameras", "images"):
            if field not in item:
                raise DatasetError(path, "missing", field=field, scene_id=scene_id)
        ts, cams, images = item["timestamps"], item["cameras"], item["images"]
        if not isinstance(ts, torch.Tensor) or ts.ndim != 1 or ts.dtype not in (torch.int64, torch.int32):
            raise DatasetError(path, "expected an integer tensor [N]", field="timestamps", scene_id=scene_id)
        n = int(ts.shape[0])
        if n == 0:
            raise DatasetError(path, "clip has no frames", field="timestamps", scene_id=scene_id)
        if not isinstance(cams, torch.Tensor) or tuple(cams.shape) != (n, len(CAMERA_COLUMNS)) or not cams.is_floating_point():
            shape = tuple(cams.shape) if isinstance(cams, torch.Tensor) else type(cams).__name__
            raise DatasetError(path, f"expected a float tensor [{n}, {len(CAMERA_COLUMNS)}], got {shape}", field="cameras",
                               scene_id=scene_id)
        cam_np = cams.double().numpy()
        bad = np.argwhere(~np.isfinite(cam_np))
        if bad.size:
            r, c = bad[0]
            raise DatasetError(path, "non-finite value", field=f"cameras[{r}].{CAMERA_COLUMNS[c]}", scene_id=scene_id)
        if not isinstance(images, list) or len(images) != n:
            raise DatasetError(path, f"expected a list of {n} JPEG byte tensors", field="images", scene_id=scene_id)
        for i, img in enumerate(images):
            if not isinstance(img, torch.Tensor) or img.dtype != torch.uint8 or img.ndim != 1:
                raise DatasetError(path, "expected a 1-D uint8 tensor of encoded image bytes", field=f"images[{i}]",
                                   scene_id=scene_id)
        return [int(t) for t in ts.tolist()], cam_np, images


__all__ = ["RAW_COLUMNS", "CAMERA_COLUMNS", "FRAME_EXTENSIONS", "camera_from_row", "RE10KReader", "RE10KChunkReader"]
