"""Microsoft 7-Scenes RGB-D reader (one scene folder, e.g. ``stairs``; one sequence = one scene).

Layout::

    <root>/TrainSplit.txt, TestSplit.txt     lines "sequenceN" -> sequence folder seq-NN
    <root>/sensors.txt                       optional, kapture format (depth camera intrinsics)
    <root>/seq-NN/frame-NNNNNN.color.jpg     RGB, 640x480
    <root>/seq-NN/frame-NNNNNN.depth.png     uint16 millimetres; 0 and 65535 are invalid
    <root>/seq-NN/frame-NNNNNN.pose.txt      4x4 camera-to-world (the depth camera's pose)

Intrinsics are those of the **depth** camera, because the depth map is what the ``depth`` backend
unprojects and the poses belong to it; the colour images are not registered to the depth maps (a
different camera with a different focal length and an offset), so their pixels are only approximately
aligned with the depth geometry. They come from the ``kinect_depth`` sensor of ``sensors.txt``
(``SIMPLE_PINHOLE w h f cx cy`` or ``PINHOLE w h fx fy cx cy``, pixel centres at +0.5 as in COLMAP);
without that file the values published with 7-Scenes are used (:data:`DEPTH_INTRINSICS`, focal 585,
principal point (320, 240) at 640x480).

The released poses deviate from rigid transforms by about 1e-4 (``det R`` ~ 0.9998); rotations are
projected onto SO(3) (nearest rotation by SVD) keeping the camera centre, after checking the deviation
is below the tolerance of :func:`cameo_corr.schemas.validate_camera`. Frame ids are the file stems
(``frame-000000``); depth is returned in metres (``depth_scale`` 0.001).
"""

from __future__ import annotations

import re
from pathlib import Path
import numpy as np

from cameo_corr.datasets.base import SceneReader
from cameo_corr.datasets.image_io import read_image, read_image_size, read_png16
from cameo_corr.schemas import DatasetError, FrameRecord, SceneRecord, SchemaError, invert_extrinsics, validate_camera

SPLIT_FILES = {"train": ("TrainSplit.txt",), "test": ("TestSplit.txt",), "all": ("TrainSplit.txt", "TestSplit.txt")}
DEPTH_SENSOR_ID = "kinect_depth"
DEPTH_INTRINSICS: dict[str, float] = {"width": 640, "height": 480, "fx": 585.0, "fy": 585.0, "cx": 320.0, "cy": 240.0}
"""Published 7-Scenes depth camera intrinsics (used when the root has no ``sensors.txt``)."""
DEPTH_SCALE = 0.001
"""Depth PNG units (millimetres) to metres."""
INVALID_DEPTH = (0, 65535)
_SEQUENCE_RE = re.compile(r"^sequence(\d+)$")
_FRAME_SUFFIX = ".pose.txt"


def _read_lines(path: Path, scene_id: str | None = None) -> list[str]:
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(str(path), f"cannot read: {e}", scene_id=scene_id) from e


def read_depth_intrinsics(path: Path) -> dict[str, float]:
    """``width, height, fx, fy, cx, cy`` of the ``kinect_depth`` sensor of a kapture ``sensors.txt``."""
    for line_no, raw in enumerate(_read_lines(path), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        fields = [f.strip() for f in line.split(",")]
        if fields[0] != DEPTH_SENSOR_ID:
            continue
        if len(fields) < 4:
            raise DatasetError(str(path), "expected 'sensor_id, name, sensor_type, model, params...'", line=line_no,
                               field="columns")
        model, params = fields[3], fields[4:]
        n_params = {"SIMPLE_PINHOLE": 5, "PINHOLE": 6}.get(model)
        if n_params is None:
            raise DatasetError(str(path), f"camera model {model!r} not supported (SIMPLE_PINHOLE or PINHOLE)",
                               line=line_no, field="model")
        if len(params) != n_params:
            raise DatasetError(str(path), f"{model} takes {n_params} parameters, got {len(params)}", line=line_no,
                               field="params")
        try:
            v = [float(p) for p in params]
        except ValueError:
            raise DatasetError(str(path), f"malformed number in {params}", line=line_no, field="params") from None
        if not all(np.isfinite(v)) or min(v) <= 0:
            raise DatasetError(str(path), f"parameters must be positive and finite, got {params}", line=line_no,
                               field="params")
        if model == "SIMPLE_PINHOLE":
            v = v[:3] + [v[2]] + v[3:]
        width, height, fx, fy, cx, cy = v
        if width != int(width) or height != int(height):
            raise DatasetError(str(path), f"image size must be integral, got {width}x{height}", line=line_no,
                               field="params")
        return {"width": int(width), "height": int(height), "fx": fx, "fy": fy, "cx": cx, "cy": cy}
    raise DatasetError(str(path), f"no sensor {DEPTH_SENSOR_ID!r}", field=DEPTH_SENSOR_ID)


def read_pose(path: Path, scene_id: str) -> np.ndarray:
    """World-to-camera 4x4 from a 7-Scenes ``pose.txt`` (camera-to-world), rotation projected on SO(3)."""
    rows: list[list[float]] = []
    for line_no, line in enumerate(_read_lines(path, scene_id), start=1):
        tokens = line.split()
        if not tokens:
            continue
        if len(tokens) != 4:
            raise DatasetError(str(path), f"expected 4 numbers, got {len(tokens)}", line=line_no, field="columns",
                               scene_id=scene_id)
        try:
            row = [float(t) for t in tokens]
        except ValueError:
            raise DatasetError(str(path), f"malformed number in {tokens}", line=line_no, field="pose",
                               scene_id=scene_id) from None
        if not all(np.isfinite(row)):
            raise DatasetError(str(path), f"non-finite value in {tokens}", line=line_no, field="pose", scene_id=scene_id)
        rows.append(row)
    if len(rows) != 4:
        raise DatasetError(str(path), f"expected a 4x4 matrix, got {len(rows)} rows", field="pose", scene_id=scene_id)
    c2w = np.array(rows, dtype=np.float64)
    try:
        validate_camera(np.eye(3), c2w, where="")
    except SchemaError as e:
        raise DatasetError(str(path), f"camera-to-world pose is not rigid: {e}", field="pose", scene_id=scene_id) from e
    U, _, Vt = np.linalg.svd(c2w[:3, :3])
    c2w[:3, :3] = U @ Vt
    return invert_extrinsics(c2w)


class SevenScenesReader(SceneReader):
    """One 7-Scenes scene folder; scenes of the reader are its sequences (``seq-01``, ...).

    ``split`` is ``"train"`` (TrainSplit.txt), ``"test"`` (TestSplit.txt) or ``"all"`` (both).
    """

    name = "7scenes"
    default_crop_policy = "center"

    def __init__(self, root: str | Path, split: str = "test") -> None:
        super().__init__(root, split)
        if split not in SPLIT_FILES:
            raise DatasetError(str(self.root), f"unknown split {split!r}; expected one of {tuple(SPLIT_FILES)}", field="split")
        sensors = self.root / "sensors.txt"
        self.depth_camera = read_depth_intrinsics(sensors) if sensors.is_file() else dict(DEPTH_INTRINSICS)
        c = self.depth_camera
        self.intrinsics = np.array([[c["fx"], 0.0, c["cx"]], [0.0, c["fy"], c["cy"]], [0.0, 0.0, 1.0]])
        self._scene_ids: list[str] = []
        for name in SPLIT_FILES[split]:
            self._scene_ids.extend(self._read_split(self.root / name))
        self._scene_ids = sorted(set(self._scene_ids))

    def scene_ids(self) -> list[str]:
        """Sorted sequence folders (``seq-NN``) of the split."""
        return list(self._scene_ids)

    def scene(self, scene_id: str) -> SceneRecord:
        """Frames of one sequence in frame-number order, with depth-camera intrinsics and poses."""
        seq = self.root / scene_id
        if not seq.is_dir():
            raise DatasetError(str(seq), "sequence folder does not exist", scene_id=scene_id)
        stems = sorted(p.name[: -len(_FRAME_SUFFIX)] for p in seq.glob(f"frame-*{_FRAME_SUFFIX}"))
        if not stems:
            raise DatasetError(str(seq), f"sequence has no frame-*{_FRAME_SUFFIX} files", scene_id=scene_id)
        hw = (int(self.depth_camera["height"]), int(self.depth_camera["width"]))
        frames = []
        for stem in stems:
            color, depth = seq / f"{stem}.color.jpg", seq / f"{stem}.depth.png"
            for path, field in ((color, "image"), (depth, "depth")):
                size = self._header_size(path, field, scene_id)
                if size != hw:
                    raise DatasetError(str(path), f"size {size} differs from the depth camera's {hw}", field=field,
                                       scene_id=scene_id)
            frames.append(
                FrameRecord(
                    frame_id=stem,
                    image_path=f"{scene_id}/{color.name}",
                    image_size=hw,
                    intrinsics=self.intrinsics.copy(),
                    extrinsics=read_pose(seq / f"{stem}{_FRAME_SUFFIX}", scene_id),
                    depth_path=f"{scene_id}/{depth.name}",
                    depth_scale=DEPTH_SCALE,
                )
            )
        return SceneRecord(self.tag, self.split, scene_id, tuple(frames))

    def load_image(self, frame: FrameRecord) -> np.ndarray:
        """The colour JPEG as RGB uint8 ``[480, 640, 3]`` (not registered to the depth camera)."""
        return read_image(self.root / frame.image_path, "RGB")

    def load_depth(self, frame: FrameRecord) -> np.ndarray:
        """Depth in metres, float32 ``[H, W]``; 0 where the sensor reports 0 or 65535."""
        if frame.depth_path is None:
            raise DatasetError(frame.image_path, "frame record has no depth_path", field="depth_path")
        raw = read_png16(self.root / frame.depth_path)
        depth = raw.astype(np.float32) * np.float32(frame.depth_scale)
        depth[np.isin(raw, INVALID_DEPTH)] = 0.0
        return depth

    @staticmethod
    def _read_split(path: Path) -> list[str]:
        if not path.is_file():
            raise DatasetError(str(path), "split file does not exist")
        ids = []
        for line_no, line in enumerate(_read_lines(path), start=1):
            token = line.strip()
            if not token:
                continue
            m = _SEQUENCE_RE.match(token)
            if m is None:
                raise DatasetError(str(path), f"expected 'sequenceN', got {token!r}", line=line_no, field="sequence")
            ids.append(f"seq-{int(m.group(1)):02d}")
        return ids

    @staticmethod
    def _header_size(path: Path, field: str, scene_id: str) -> tuple[int, int]:
        if not path.is_file():
            raise DatasetError(str(path), "file does not exist", field=field, scene_id=scene_id)
        return read_image_size(path, str(path), scene_id, field=field)
