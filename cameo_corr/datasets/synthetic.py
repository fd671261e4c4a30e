"""Analytic synthetic scenes with exact ground truth, rendered by vectorised ray casting.

A :class:`SyntheticScene` is a room (an axis-aligned box: six :class:`Wall` rectangles, ids 0..5 in
:data:`WALL_NAMES` order, the floor at ``y = 0``, +y up) holding a few objects (:class:`Sphere`,
:class:`Box`; ids from :data:`FIRST_OBJECT_ID`) and a point light. Every surface has a procedural
:class:`Texture`: a checker or stripe pattern in surface coordinates (its own colours, period and
orientation) plus smooth solid colour noise (a sum of 3D sinusoids), so appearance identifies a place.
Shading is Lambertian (two-sided, no shadows), hence view independent.

:func:`render` casts one ray per pixel centre (``(col + 0.5, row + 0.5)``, OpenCV ``K`` and
world-to-camera ``E``) and returns the colour image, the exact z-depth (0 where nothing is hit) and
the id of the visible surface. Rays are built with camera-frame ``z = 1``, so the ray parameter of a
hit *is* its z-depth, computed in float64 and stored as float32.

A :class:`SyntheticSequence` is a scene plus a camera path (:func:`make_sequence`): cameras inside the
room orbit the objects along an arc of 140-170 degrees with uneven steps (varied baselines), a dolly
in radius, varying height (mild downward pitch), jittered look-at targets and small rolls, so
optical-axis angle differences within a sequence range from a few degrees (neighbours) to about
125-165 degrees. Everything is seeded and deterministic.

Writers (:func:`generate_dataset`):

* ``co3d`` layout, read back by :class:`SyntheticReader` (a :class:`~cameo_corr.datasets.co3d.CO3DReader`
  with registry name ``synthetic``)::

      <root>/synthetic/frame_annotations.jgz          PyTorch3D NDC cameras (ndc_isotropic)
      <root>/synthetic/sequence_annotations.jgz
      <root>/synthetic/set_lists/set_lists_synthetic.json   all frames in the chosen split
      <root>/synthetic/<seq>/images/frameNNNNNN.<jpg|png>
      <root>/synthetic/<seq>/depths/frameNNNNNN.<jpg|png>.geometric.png   float16 bits in a uint16 PNG
      <root>/synthetic/<seq>/depth_masks/frameNNNNNN.png                 1-bit, depth > 0
      <root>/synthetic/<seq>/masks/frameNNNNNN.png                       objects (not walls) = 255
      <root>/synthetic/<seq>/scene.json                                  the analytic description

* ``re10k`` raw layout, read by :class:`~cameo_corr.datasets.re10k.RE10KReader`::

      <root>/<split>/<seq>.txt                        URL line + one camera line per frame
      <root>/frames/<seq>/<timestamp_us>.<jpg|png>
      <root>/frames/<seq>/scene.json

* ``nerfstudio`` layout, read by :class:`~cameo_corr.datasets.nerfstudio.NerfstudioReader`; even scenes
  have global intrinsics and ``camera_model`` OPENCV with zero distortion, odd scenes per-frame
  intrinsics, PINHOLE and their frames listed in reverse order; ``<split>_filenames`` lists every frame
  in the chosen split (the other splits are empty)::

      <root>/<seq>/transforms.json                    OpenGL camera-to-world transform_matrix
      <root>/<seq>/images/frame_NNNNN.<jpg|png>       (NNNNN from 00001, as ns-process-data names them)
      <root>/<seq>/depths/frame_NNNNN.png             uint16 millimetres (depth_unit_scale_factor 1e-3)
      <root>/<seq>/masks/frame_NNNNN.png              objects = 255
      <root>/<seq>/images_2/, depths_2/, masks_2/     the same rendered at half size (rounded up)
      <root>/<seq>/scene.json

* ``colmap`` layout, read by :class:`~cameo_corr.datasets.colmap.ColmapReader` (no splits); even scenes
  write text models, odd scenes binary ones, and the camera model cycles through SIMPLE_PINHOLE,
  PINHOLE, SIMPLE_RADIAL, RADIAL, OPENCV (distortion 0) with the scene index; image ids run backwards
  and the first image carries two unmatched 2D points::

      <root>/<seq>/sparse/0/cameras.<txt|bin>, images.<txt|bin>, points3D.<txt|bin> (empty)
      <root>/<seq>/images/frame_NNNNN.<jpg|png>
      <root>/<seq>/images_2/frame_NNNNN.<jpg|png>     rendered at half size (rounded up)
      <root>/<seq>/stereo/depth_maps/frame_NNNNN.<jpg|png>.geometric.bin   exact float32 z-depth
      <root>/<seq>/scene.json

``scene.json`` holds the scene and the cameras, so exact ground truth can be re-rendered at any
resolution (:meth:`SyntheticSequence.render`).
"""

from __future__ import annotations

import abc
import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Mapping, Sequence

import numpy as np
from PIL import Image

from cameo_corr.datasets.co3d import (
    FRAME_ANNOTATIONS,
    SEQUENCE_ANNOTATIONS,
    SET_LIST_DIR,
    SET_LIST_SPLITS,
    CO3DReader,
    encode_depth_png,
    write_jgz,
)
from cameo_corr.datasets import colmap
from cameo_corr.datasets.nerfstudio import DEFAULT_DEPTH_UNIT_SCALE, TRANSFORMS, opencv_w2c_to_opengl_c2w
from cameo_corr.schemas import DatasetError, make_extrinsics, opencv_to_pytorch3d, pixel_centers

GENERATOR_VERSION = 1
"""Bumped whenever the same seed would produce a different dataset."""
CATEGORY = "synthetic"
"""Category folder of the CO3D layout."""
SUBSET = "synthetic"
"""Set list name of the CO3D layout (``set_lists/set_lists_synthetic.json``)."""
LAYOUTS = ("co3d", "re10k", "nerfstudio", "colmap")
IMAGE_FORMATS = ("jpg", "png")
JPEG_QUALITY = 95
FPS = 30.0
"""Frame rate of the written timestamps."""
WALL_NAMES = ("x-", "x+", "floor", "ceiling", "z-", "z+")
FIRST_OBJECT_ID = len(WALL_NAMES)
"""Surface ids: walls ``0..5``, objects from here on."""
NO_HIT = -1
"""Surface id of pixels whose ray hits nothing (only possible for cameras outside the room)."""
_T_MIN = 1e-9
"""Smallest accepted ray parameter (hits behind or at the camera centre are ignored)."""
_EDGE_TOL = 1e-9
"""Slack on rectangle bounds so rays through room edges hit one of the adjacent walls."""


def _arr(value: Any, shape: tuple[int, ...]) -> np.ndarray:
    """A float64 array of ``shape`` (raises ``ValueError`` otherwise)."""
    arr = np.asarray(value, dtype=np.float64)
    if arr.shape != shape:
        raise ValueError(f"expected shape {shape}, got {arr.shape}")
    return arr


# ------------------------------------------------------------------------------------------ texture
@dataclass(frozen=True, eq=False)
class Texture:
    """Procedural albedo: a two-colour ``checker``/``stripes`` pattern in surface coordinates ``uv``
    (cell size ``period``, rotated by ``angle``) plus solid noise ``sum_m amp_m sin(k_m . X + phi_m)``."""

    base: np.ndarray
    accent: np.ndarray
    pattern: str
    period: float
    angle: float
    wave_vectors: np.ndarray
    phases: np.ndarray
    amplitudes: np.ndarray

    PATTERNS: ClassVar[tuple[str, ...]] = ("checker", "stripes")

    def albedo(self, points: np.ndarray, uv: np.ndarray) -> np.ndarray:
        """RGB albedo in ``[0, 1]`` ``[N, 3]`` at world ``points`` ``[N, 3]`` with surface coordinates ``uv``."""
        c, s = math.cos(self.angle), math.sin(self.angle)
        a = (uv[:, 0] * c + uv[:, 1] * s) / self.period
        if self.pattern == "checker":
            b = (-uv[:, 0] * s + uv[:, 1] * c) / self.period
            w = np.mod(np.floor(a) + np.floor(b), 2.0)
        else:
            w = np.mod(np.floor(2.0 * a), 2.0)
        colour = self.base + w[:, None] * (self.accent - self.base)
        colour += np.sin(points @ self.wave_vectors.T + self.phases) @ self.amplitudes
        return np.clip(colour, 0.0, 1.0)

    @classmethod
    def random(cls, rng: np.random.Generator, period: tuple[float, float], waves: int = 6) -> "Texture":
        """A random texture: distinct base/accent colours, pattern cell size drawn from ``period``."""
        base = rng.uniform(0.12, 0.88, 3)
        accent = rng.uniform(0.05, 0.95, 3)
        while np.linalg.norm(accent - base) < 0.45:
            accent = rng.uniform(0.05, 0.95, 3)
        directions = rng.normal(size=(waves, 3))
        directions /= np.linalg.norm(directions, axis=1, keepdims=True)
        return cls(
            base=base,
            accent=accent,
            pattern=str(rng.choice(cls.PATTERNS)),
            period=float(rng.uniform(*period)),
            angle=float(rng.uniform(0.0, math.pi)),
            wave_vectors=directions * rng.uniform(1.5, 7.0, (waves, 1)),
            phases=rng.uniform(0.0, 2 * math.pi, waves),
            amplitudes=rng.normal(0.0, 0.06, (waves, 3)),
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready parameters (exact float64 values)."""
        return {
            "base": self.base.tolist(), "accent": self.accent.tolist(), "pattern": self.pattern,
            "period": self.period, "angle": self.angle, "wave_vectors": self.wave_vectors.tolist(),
            "phases": self.phases.tolist(), "amplitudes": self.amplitudes.tolist(),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Texture":
        """Inverse of :meth:`to_dict` (raises ``KeyError``/``ValueError`` on bad input)."""
        if d["pattern"] not in cls.PATTERNS:
            raise ValueError(f"unknown pattern {d['pattern']!r}; expected one of {cls.PATTERNS}")
        waves = len(d["phases"])
        period = float(d["period"])
        if not period > 0:
            raise ValueError(f"period must be positive, got {period}")
        return cls(base=_arr(d["base"], (3,)), accent=_arr(d["accent"], (3,)), pattern=d["pattern"], period=period,
                   angle=float(d["angle"]), wave_vectors=_arr(d["wave_vectors"], (waves, 3)),
                   phases=_arr(d["phases"], (waves,)), amplitudes=_arr(d["amplitudes"], (waves, 3)))


# ----------------------------------------------------------------------------------------- surfaces
class Surface(abc.ABC):
    """An analytic surface with a texture. ``dirs`` of :meth:`intersect` need not be unit vectors."""

    kind: ClassVar[str]
    texture: Texture

    @abc.abstractmethod
    def intersect(self, origin: np.ndarray, dirs: np.ndarray) -> np.ndarray:
        """Smallest ``t > 0`` with ``origin + t dirs`` on the surface, ``[N]``; ``inf`` where missed."""

    @abc.abstractmethod
    def normal(self, points: np.ndarray) -> np.ndarray:
        """Unit normals ``[N, 3]`` at surface points (orientation arbitrary; shading is two-sided)."""

    @abc.abstractmethod
    def uv(self, points: np.ndarray) -> np.ndarray:
        """2D surface coordinates ``[N, 2]`` (scene units) of surface points, for the texture pattern."""

    @abc.abstractmethod
    def distance(self, points: np.ndarray) -> np.ndarray:
        """Exact Euclidean distance ``[N]`` from ``points`` to the surface."""

    @abc.abstractmethod
    def params(self) -> dict[str, Any]:
        """Geometry parameters (JSON-ready)."""

    def to_dict(self) -> dict[str, Any]:
        """``{"kind", **params, "texture"}``."""
        return {"kind": self.kind, **self.params(), "texture": self.texture.to_dict()}


_OTHER_AXES = np.array([[1, 2], [0, 2], [0, 1]])


@dataclass(frozen=True, eq=False)
class Wall(Surface):
    """The rectangle ``X[axis] = value``, ``lo <= X[other axes] <= hi`` (other axes in increasing order)."""

    axis: int
    value: float
    lo: np.ndarray
    hi: np.ndarray
    texture: Texture
    kind: ClassVar[str] = "wall"

    def intersect(self, origin: np.ndarray, dirs: np.ndarray) -> np.ndarray:
        others = _OTHER_AXES[self.axis]
        with np.errstate(divide="ignore", invalid="ignore"):
            t = (self.value - origin[self.axis]) / dirs[:, self.axis]
            p = origin[others] + t[:, None] * dirs[:, others]
            inside = (p >= self.lo - _EDGE_TOL) & (p <= self.hi + _EDGE_TOL)
            ok = (t > _T_MIN) & inside[:, 0] & inside[:, 1]
        return np.where(ok, t, np.inf)

    def normal(self, points: np.ndarray) -> np.ndarray:
        n = np.zeros_like(points)
        n[:, self.axis] = 1.0
        return n

    def uv(self, points: np.ndarray) -> np.ndarray:
        return points[:, _OTHER_AXES[self.axis]]

    def distance(self, points: np.ndarray) -> np.ndarray:
        q = points[:, _OTHER_AXES[self.axis]]
        outside = np.maximum(np.maximum(self.lo - q, q - self.hi), 0.0)
        return np.sqrt((points[:, self.axis] - self.value) ** 2 + np.sum(outside**2, axis=1))

    def params(self) -> dict[str, Any]:
        return {"axis": self.axis, "value": self.value, "lo": self.lo.tolist(), "hi": self.hi.tolist()}


@dataclass(frozen=True, eq=False)
class Sphere(Surface):
    """The sphere ``|X - center| = radius``; ``uv`` is (longitude, latitude) times the radius."""

    center: np.ndarray
    radius: float
    texture: Texture
    kind: ClassVar[str] = "sphere"

    def intersect(self, origin: np.ndarray, dirs: np.ndarray) -> np.ndarray:
        oc = origin - self.center
        a = np.einsum("ij,ij->i", dirs, dirs)
        b = dirs @ oc
        c = oc @ oc - self.radius**2
        disc = b * b - a * c
        sq = np.sqrt(np.maximum(disc, 0.0))
        # numerically stable roots: q = -(b + sign(b) sq), t = q / a and c / q
        q = -(b + np.copysign(sq, b))
        with np.errstate(divide="ignore", invalid="ignore"):
            roots = np.stack([q / a, c / q])
        roots = np.where(roots > _T_MIN, roots, np.inf)
        return np.where(disc >= 0, roots.min(axis=0), np.inf)

    def normal(self, points: np.ndarray) -> np.ndarray:
        n = points - self.center
        return n / np.linalg.norm(n, axis=1, keepdims=True)

    def uv(self, points: np.ndarray) -> np.ndarray:
        d = points - self.center
        lon = np.arctan2(d[:, 2], d[:, 0])
        lat = np.arcsin(np.clip(d[:, 1] / self.radius, -1.0, 1.0))
        return np.stack([lon, lat], axis=1) * self.radius

    def distance(self, points: np.ndarray) -> np.ndarray:
        return np.abs(np.linalg.norm(points - self.center, axis=1) - self.radius)

    def params(self) -> dict[str, Any]:
        return {"center": self.center.tolist(), "radius": self.radius}


@dataclass(frozen=True, eq=False)
class Box(Surface):
    """The surface of the axis-aligned box ``lo <= X <= hi``; ``uv`` are the in-face coordinates."""

    lo: np.ndarray
    hi: np.ndarray
    texture: Texture
    kind: ClassVar[str] = "box"

    def intersect(self, origin: np.ndarray, dirs: np.ndarray) -> np.ndarray:
        safe = np.where(dirs == 0.0, 1e-300, dirs)
        t1 = (self.lo - origin) / safe
        t2 = (self.hi - origin) / safe
        near, far = np.minimum(t1, t2), np.maximum(t1, t2)
        # element-wise over the 3 columns: much faster than reductions along a length-3 axis
        t_near = np.maximum(np.maximum(near[:, 0], near[:, 1]), near[:, 2])
        t_far = np.minimum(np.minimum(far[:, 0], far[:, 1]), far[:, 2])
        t = np.where(t_near > _T_MIN, t_near, t_far)
        return np.where((t_far >= t_near) & (t > _T_MIN), t, np.inf)

    def _face_axis(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        rel = (points - (self.lo + self.hi) / 2) / ((self.hi - self.lo) / 2)
        axis = np.argmax(np.abs(rel), axis=1)
        return axis, rel

    def normal(self, points: np.ndarray) -> np.ndarray:
        axis, rel = self._face_axis(points)
        n = np.zeros_like(points)
        rows = np.arange(len(points))
        n[rows, axis] = np.sign(rel[rows, axis])
        return n

    def uv(self, points: np.ndarray) -> np.ndarray:
        axis, _ = self._face_axis(points)
        return np.take_along_axis(points, _OTHER_AXES[axis], axis=1)

    def distance(self, points: np.ndarray) -> np.ndarray:
        q = np.abs(points - (self.lo + self.hi) / 2) - (self.hi - self.lo) / 2
        outside = np.linalg.norm(np.maximum(q, 0.0), axis=1)
        inside = np.minimum(q.max(axis=1), 0.0)
        return np.abs(outside + inside)

    def params(self) -> dict[str, Any]:
        return {"lo": self.lo.tolist(), "hi": self.hi.tolist()}


def surface_from_dict(d: Mapping[str, Any]) -> Surface:
    """Inverse of :meth:`Surface.to_dict` (raises ``KeyError``/``ValueError`` on bad input)."""
    texture = Texture.from_dict(d["texture"])
    kind = d["kind"]
    if kind == "wall":
        axis = int(d["axis"])
        if axis not in (0, 1, 2):
            raise ValueError(f"wall axis must be 0, 1 or 2, got {axis}")
        return Wall(axis=axis, value=float(d["value"]), lo=_arr(d["lo"], (2,)), hi=_arr(d["hi"], (2,)), texture=texture)
    if kind == "sphere":
        radius = float(d["radius"])
        if not radius > 0:
            raise ValueError(f"sphere radius must be positive, got {radius}")
        return Sphere(center=_arr(d["center"], (3,)), radius=radius, texture=texture)
    if kind == "box":
        lo, hi = _arr(d["lo"], (3,)), _arr(d["hi"], (3,))
        if not np.all(hi > lo):
            raise ValueError(f"box needs hi > lo, got lo={lo.tolist()} hi={hi.tolist()}")
        return Box(lo=lo, hi=hi, texture=texture)
    raise ValueError(f"unknown surface kind {kind!r}; expected wall, sphere or box")


# ------------------------------------------------------------------------------------------- scene
@dataclass(frozen=True, eq=False)
class SyntheticScene:
    """A room (walls ``surfaces[:6]``) with objects (``surfaces[6:]``) lit by a point light.

    Shading: ``albedo * (ambient + diffuse * max(0, n . l))`` with ``l`` the unit vector to ``light``.
    """

    room_lo: np.ndarray
    room_hi: np.ndarray
    surfaces: tuple[Surface, ...]
    light: np.ndarray
    ambient: float = 0.35
    diffuse: float = 0.65

    @property
    def objects(self) -> tuple[Surface, ...]:
        """The objects (everything but the walls); object ``k`` has surface id ``FIRST_OBJECT_ID + k``."""
        return self.surfaces[FIRST_OBJECT_ID:]

    @classmethod
    def random(cls, rng: np.random.Generator, max_objects: int = 5) -> "SyntheticScene":
        """A random room of 9-12 x 2.8-3.4 x 9-12 units with 3..``max_objects`` objects near its centre."""
        half = rng.uniform(4.5, 6.0, 2)
        height = float(rng.uniform(2.8, 3.4))
        lo = np.array([-half[0], 0.0, -half[1]])
        hi = np.array([half[0], height, half[1]])
        walls: list[Surface] = []
        for axis in range(3):
            others = _OTHER_AXES[axis]
            for value in (lo[axis], hi[axis]):
                walls.append(Wall(axis=axis, value=float(value), lo=lo[others].copy(), hi=hi[others].copy(),
                                  texture=Texture.random(rng, period=(0.3, 0.8))))
        objects: list[Surface] = []
        footprints: list[tuple[np.ndarray, float]] = []
        wanted = int(rng.integers(3, max_objects + 1))
        for _ in range(200):
            if len(objects) == wanted:
                break
            rho, phi = 1.2 * math.sqrt(rng.random()), rng.uniform(0.0, 2 * math.pi)
            xz = np.array([rho * math.cos(phi), rho * math.sin(phi)])
            if rng.random() < 0.5:
                r = float(rng.uniform(0.3, 0.6))
                y = r + (float(rng.uniform(0.0, 0.8)) if rng.random() < 0.5 else 0.0)
                surface: Surface = Sphere(center=np.array([xz[0], y, xz[1]]), radius=r,
                                          texture=Texture.random(rng, period=(0.1, 0.25)))
                footprint = r
            else:
                h = rng.uniform(0.2, 0.55, 3)
                surface = Box(lo=np.array([xz[0] - h[0], 0.0, xz[1] - h[2]]),
                              hi=np.array([xz[0] + h[0], 2 * h[1], xz[1] + h[2]]),
                              texture=Texture.random(rng, period=(0.1, 0.25)))
                footprint = float(np.hypot(h[0], h[2]))
            if all(np.linalg.norm(xz - c) > footprint + r2 + 0.1 for c, r2 in footprints):
                objects.append(surface)
                footprints.append((xz, footprint))
        light = np.array([rng.uniform(-1.0, 1.0), height - 0.2, rng.uniform(-1.0, 1.0)])
        return cls(room_lo=lo, room_hi=hi, surfaces=tuple(walls + objects), light=light)

    def object_extent(self) -> tuple[np.ndarray, float]:
        """``(target, radius)``: the mean object centre and the radius (about it, in x-z) enclosing all objects."""
        centres, reach = [], []
        for obj in self.objects:
            if isinstance(obj, Sphere):
                centres.append(obj.center)
                reach.append(obj.radius)
            elif isinstance(obj, Box):
                centres.append((obj.lo + obj.hi) / 2)
                reach.append(float(np.hypot(*(obj.hi - obj.lo)[[0, 2]] / 2)))
        if not centres:
            return (self.room_lo + self.room_hi) / 2, 0.0
        c = np.array(centres)
        target = c.mean(axis=0)
        radius = max(float(np.hypot(*(ci - target)[[0, 2]])) + r for ci, r in zip(c, reach))
        return target, radius

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description (exact float64 values)."""
        return {"room_lo": self.room_lo.tolist(), "room_hi": self.room_hi.tolist(), "light": self.light.tolist(),
                "ambient": self.ambient, "diffuse": self.diffuse, "surfaces": [s.to_dict() for s in self.surfaces]}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "SyntheticScene":
        """Inverse of :meth:`to_dict` (raises ``KeyError``/``ValueError`` on bad input)."""
        surfaces = tuple(surface_from_dict(s) for s in d["surfaces"])
        if len(surfaces) < FIRST_OBJECT_ID or not all(isinstance(s, Wall) for s in surfaces[:FIRST_OBJECT_ID]):
            raise ValueError(f"the first {FIRST_OBJECT_ID} surfaces must be the room's walls")
        return cls(room_lo=_arr(d["room_lo"], (3,)), room_hi=_arr(d["room_hi"], (3,)), surfaces=surfaces,
                   light=_arr(d["light"], (3,)), ambient=float(d["ambient"]), diffuse=float(d["diffuse"]))


# ------------------------------------------------------------------------------------------ render
def render(
    scene: SyntheticScene, K: np.ndarray, E: np.ndarray, height: int, width: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ray-cast ``scene`` seen by the OpenCV camera ``(K, E)`` into a ``height x width`` image.

    Returns ``(image, depth, surface_id)``: RGB uint8 ``[H, W, 3]``, z-depth float32 ``[H, W]`` (0 where
    the ray hits nothing) and int32 ``[H, W]`` ids (walls ``0..5``, objects from
    :data:`FIRST_OBJECT_ID`, :data:`NO_HIT` for none). Pixel ``(row, col)`` is the ray through
    ``(col + 0.5, row + 0.5)``.
    """
    K = np.asarray(K, dtype=np.float64)
    E = np.asarray(E, dtype=np.float64)
    uv = pixel_centers(height, width).reshape(-1, 2)
    rays = np.concatenate([uv, np.ones((len(uv), 1))], axis=1) @ np.linalg.inv(K).T
    rays /= rays[:, 2:3]  # camera-frame z = 1, so the ray parameter of a hit is its z-depth
    R = E[:3, :3]
    origin = -R.T @ E[:3, 3]
    dirs = rays @ R  # rows R^T r: world directions
    t_all = np.stack([s.intersect(origin, dirs) for s in scene.surfaces])
    ids = np.argmin(t_all, axis=0)
    t = t_all[ids, np.arange(len(uv))]
    hit = np.isfinite(t)
    ids = np.where(hit, ids, NO_HIT).astype(np.int32)
    colour = np.zeros((len(uv), 3))
    for k, surface in enumerate(scene.surfaces):
        sel = np.flatnonzero(ids == k)
        if sel.size == 0:
            continue
        p = origin + t[sel, None] * dirs[sel]
        n = surface.normal(p)
        n *= -np.sign(np.einsum("ij,ij->i", n, dirs[sel]))[:, None]  # face the viewer
        to_light = scene.light - p
        to_light /= np.linalg.norm(to_light, axis=1, keepdims=True)
        shade = scene.ambient + scene.diffuse * np.clip(np.einsum("ij,ij->i", n, to_light), 0.0, None)
        colour[sel] = surface.texture.albedo(p, surface.uv(p)) * shade[:, None]
    image = np.round(np.clip(colour, 0.0, 1.0) * 255.0).astype(np.uint8).reshape(height, width, 3)
    depth = np.where(hit, t, 0.0).astype(np.float32).reshape(height, width)
    return image, depth, ids.reshape(height, width)


# ----------------------------------------------------------------------------------------- cameras
def look_at(
    center: np.ndarray, target: np.ndarray, up: Sequence[float] = (0.0, 1.0, 0.0), roll: float = 0.0
) -> np.ndarray:
    """World-to-camera OpenCV extrinsics of a camera at ``center`` looking at ``target`` (``roll`` in radians)."""
    center = np.asarray(center, dtype=np.float64)
    forward = np.asarray(target, dtype=np.float64) - center
    forward /= np.linalg.norm(forward)
    right = np.cross(forward, np.asarray(up, dtype=np.float64))
    right /= np.linalg.norm(right)
    down = np.cross(forward, right)
    c, s = math.cos(roll), math.sin(roll)
    right, down = c * right + s * down, -s * right + c * down
    R = np.stack([right, down, forward])
    return make_extrinsics(R, -R @ center)


def camera_path(
    rng: np.random.Generator, scene: SyntheticScene, frames: int, image_size: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """``(intrinsics [F, 3, 3], extrinsics [F, 4, 4])``: an orbit arc of 140-170 degrees around the objects.

    Angular steps are uneven (baselines vary), the radius dollies and is jittered, the height varies,
    look-at targets are jittered and the camera rolls slightly. One pinhole ``K`` per sequence (focal
    0.75-1.05 x the shorter image side, principal point within 4 % of the image centre).
    """
    H, W = image_size
    target, reach = scene.object_extent()
    room_half = float(np.min((scene.room_hi - scene.room_lo)[[0, 2]]) / 2)
    r_min = reach + 0.6  # objects lie within 1.2 of the room centre, so r_min < room_half - 0.4
    r_max = min(room_half - 0.4, r_min + 1.6)
    arc = math.radians(rng.uniform(140.0, 170.0))
    steps = rng.uniform(0.2, 1.8, frames - 1)
    angles = rng.uniform(0, 2 * math.pi) + arc * np.concatenate([[0.0], np.cumsum(steps) / steps.sum()])
    phase = np.linspace(0.0, 1.0, frames)
    r0 = rng.uniform(r_min + 0.3, r_max - 0.3)
    radius = r0 + 0.35 * np.sin(2 * math.pi * (phase + rng.uniform())) + rng.uniform(-0.1, 0.1, frames)
    radius = np.clip(radius, r_min, r_max)
    ceiling = float(scene.room_hi[1])
    y0 = target[1] + rng.uniform(0.2, 1.0)  # mild downward pitch keeps the axis angles close to the arc
    heights = np.clip(y0 + 0.3 * np.sin(2 * math.pi * (phase + rng.uniform())) + rng.normal(0, 0.05, frames),
                      0.3, ceiling - 0.4)
    extrinsics = np.empty((frames, 4, 4))
    for i in range(frames):
        center = np.array([target[0] + radius[i] * math.cos(angles[i]), heights[i],
                           target[2] + radius[i] * math.sin(angles[i])])
        aim = target + rng.normal(0.0, 0.15, 3)
        extrinsics[i] = look_at(center, aim, roll=math.radians(rng.normal(0.0, 2.0)))
    f = min(H, W) * rng.uniform(0.75, 1.05)
    cx = W / 2 + rng.uniform(-0.04, 0.04) * W
    cy = H / 2 + rng.uniform(-0.04, 0.04) * H
    K = np.array([[f, 0.0, cx], [0.0, f, cy], [0.0, 0.0, 1.0]])
    return np.repeat(K[None], frames, axis=0), extrinsics


@dataclass(frozen=True, eq=False)
class SyntheticSequence:
    """A scene and a camera path: frame ``i`` is seen by ``(intrinsics[i], extrinsics[i])`` at ``image_size``."""

    name: str
    scene: SyntheticScene
    image_size: tuple[int, int]
    intrinsics: np.ndarray
    extrinsics: np.ndarray

    @property
    def num_frames(self) -> int:
        return len(self.extrinsics)

    def render(
        self, index: int, image_size: tuple[int, int] | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """:func:`render` frame ``index``, optionally at another ``(H, W)`` (intrinsics scaled exactly)."""
        H, W = image_size or self.image_size
        scale = np.diag([W / self.image_size[1], H / self.image_size[0], 1.0])
        return render(self.scene, scale @ self.intrinsics[index], self.extrinsics[index], H, W)

    def to_dict(self) -> dict[str, Any]:
        """What ``scene.json`` holds."""
        return {"generator": __name__, "version": GENERATOR_VERSION, "name": self.name,
                "image_size": list(self.image_size), "intrinsics": self.intrinsics.tolist(),
                "extrinsics": self.extrinsics.tolist(), "scene": self.scene.to_dict()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "SyntheticSequence":
        """Inverse of :meth:`to_dict` (raises ``KeyError``/``ValueError`` on bad input)."""
        if d["version"] != GENERATOR_VERSION:
            raise ValueError(f"written by generator version {d['version']}, this code is version {GENERATOR_VERSION}")
        E = np.asarray(d["extrinsics"], dtype=np.float64)
        frames = E.shape[0] if E.ndim == 3 else -1
        H, W = (int(v) for v in d["image_size"])
        return cls(name=str(d["name"]), scene=SyntheticScene.from_dict(d["scene"]), image_size=(H, W),
                   intrinsics=_arr(d["intrinsics"], (frames, 3, 3)), extrinsics=_arr(E, (frames, 4, 4)))

    @classmethod
    def read(cls, path: Path, *, scene_id: str | None = None) -> "SyntheticSequence":
        """Load a ``scene.json``; any problem raises :class:`DatasetError` naming the file."""
        try:
            return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))
        except FileNotFoundError:
            raise DatasetError(str(path), "scene description does not exist", scene_id=scene_id) from None
        except json.JSONDecodeError as e:
            raise DatasetError(str(path), f"invalid JSON: {e.msg}", line=e.lineno, scene_id=scene_id) from e
        except KeyError as e:
            raise DatasetError(str(path), "missing", field=str(e.args[0]), scene_id=scene_id) from e
        except (OSError, TypeError, ValueError) as e:
            raise DatasetError(str(path), f"invalid scene description: {e}", scene_id=scene_id) from e


def make_sequence(seed: int, index: int, frames: int, image_size: tuple[int, int]) -> SyntheticSequence:
    """Scene ``index`` of the dataset generated with ``seed``; its random stream depends on ``(seed, index)`` only."""
    rng = np.random.default_rng([seed, index])
    scene = SyntheticScene.random(rng)
    K, E = camera_path(rng, scene, frames, image_size)
    return SyntheticSequence(name=f"scene_{index:04d}", scene=scene, image_size=tuple(image_size), intrinsics=K,
                             extrinsics=E)


# ------------------------------------------------------------------------------------------ writers
def _save_image(image: np.ndarray, path: Path, image_format: str) -> None:
    if image_format == "jpg":
        Image.fromarray(image).save(path, format="JPEG", quality=JPEG_QUALITY, subsampling=0)  # 4:4:4 chroma
    else:
        Image.fromarray(image).save(path, format="PNG")


def _timestamp_us(index: int) -> int:
    return int(round(index * 1e6 / FPS))


def write_co3d_sequence(root: Path, seq: SyntheticSequence, image_format: str) -> list[dict[str, Any]]:
    """Render and write one sequence in the CO3D layout; return its frame annotations."""
    H, W = seq.image_size
    rel_dir = f"{CATEGORY}/{seq.name}"
    for sub in ("images", "depths", "depth_masks", "masks"):
        (root / rel_dir / sub).mkdir(parents=True, exist_ok=True)
    annotations: list[dict[str, Any]] = []
    for i in range(seq.num_frames):
        image, depth, ids = seq.render(i)
        stem = f"frame{i:06d}"
        image_rel = f"{rel_dir}/images/{stem}.{image_format}"
        depth_rel = f"{rel_dir}/depths/{stem}.{image_format}.geometric.png"
        depth_mask_rel = f"{rel_dir}/depth_masks/{stem}.png"
        mask_rel = f"{rel_dir}/masks/{stem}.png"
        foreground = ids >= FIRST_OBJECT_ID
        _save_image(image, root / image_rel, image_format)
        encode_depth_png(depth, root / depth_rel)
        Image.fromarray(depth > 0).save(root / depth_mask_rel, format="PNG")
        Image.fromarray((foreground * 255).astype(np.uint8)).save(root / mask_rel, format="PNG")
        R, T, focal, pp = opencv_to_pytorch3d(seq.intrinsics[i], seq.extrinsics[i], (H, W))
        annotations.append({
            "sequence_name": seq.name,
            "frame_number": i,
            "frame_timestamp": i / FPS,
            "image": {"path": image_rel, "size": [H, W]},
            "depth": {"path": depth_rel, "scale_adjustment": 1.0, "mask_path": depth_mask_rel},
            "mask": {"path": mask_rel, "mass": float(foreground.sum())},
            "viewpoint": {"R": R.tolist(), "T": T.tolist(), "focal_length": focal.tolist(),
                          "principal_point": pp.tolist(), "intrinsics_format": "ndc_isotropic"},
            "meta": {"generator": __name__, "version": GENERATOR_VERSION},
        })
    (root / rel_dir / "scene.json").write_text(json.dumps(seq.to_dict()), encoding="utf-8")
    return annotations


def write_re10k_sequence(root: Path, seq: SyntheticSequence, split: str, image_format: str) -> None:
    """Render and write one sequence in the RealEstate10K raw layout (camera ``.txt`` + frames)."""
    H, W = seq.image_size
    frame_dir = root / "frames" / seq.name
    frame_dir.mkdir(parents=True, exist_ok=True)
    (root / split).mkdir(parents=True, exist_ok=True)
    lines = [f"synthetic://{CATEGORY}/{seq.name}"]
    for i in range(seq.num_frames):
        ts = _timestamp_us(i)
        image, _, _ = seq.render(i)
        _save_image(image, frame_dir / f"{ts}.{image_format}", image_format)
        K, E = seq.intrinsics[i], seq.extrinsics[i]
        numbers = [K[0, 0] / W, K[1, 1] / H, K[0, 2] / W, K[1, 2] / H, 0.0, 0.0, *E[:3, :4].reshape(-1)]
        lines.append(" ".join([str(ts), *(repr(float(v)) for v in numbers)]))
    (root / split / f"{seq.name}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (frame_dir / "scene.json").write_text(json.dumps(seq.to_dict()), encoding="utf-8")


def _write_mask(ids: np.ndarray, path: Path) -> None:
    Image.fromarray(((ids >= FIRST_OBJECT_ID) * 255).astype(np.uint8)).save(path, format="PNG")


def write_nerfstudio_sequence(root: Path, seq: SyntheticSequence, index: int, split: str, image_format: str) -> None:
    """Render and write one sequence in the nerfstudio layout (see the module docstring)."""
    H, W = seq.image_size
    folder = root / seq.name
    sizes = {"": (H, W), "_2": ((H + 1) // 2, (W + 1) // 2)}
    for suffix in sizes:
        for sub in ("images", "depths", "masks"):
            (folder / f"{sub}{suffix}").mkdir(parents=True, exist_ok=True)
    per_frame = index % 2 == 1
    frames: list[dict[str, Any]] = []
    for i in range(seq.num_frames):
        stem = f"frame_{i + 1:05d}"
        for suffix, hw in sizes.items():
            image, depth, ids = seq.render(i, hw)
            _save_image(image, folder / f"images{suffix}" / f"{stem}.{image_format}", image_format)
            units = np.round(depth.astype(np.float64) / DEFAULT_DEPTH_UNIT_SCALE)
            if units.max() > np.iinfo(np.uint16).max:
                raise ValueError(f"depth {depth.max()} does not fit a uint16 PNG in millimetres")
            Image.fromarray(units.astype(np.uint16)).save(folder / f"depths{suffix}" / f"{stem}.png", format="PNG")
            _write_mask(ids, folder / f"masks{suffix}" / f"{stem}.png")
        K = seq.intrinsics[i]
        frame: dict[str, Any] = {"file_path": f"images/{stem}.{image_format}",
                                 "transform_matrix": opencv_w2c_to_opengl_c2w(seq.extrinsics[i]).tolist(),
                                 "depth_file_path": f"depths/{stem}.png", "mask_path": f"masks/{stem}.png"}
        if per_frame:
            frame.update(fl_x=K[0, 0], fl_y=K[1, 1], cx=K[0, 2], cy=K[1, 2], w=W, h=H)
        frames.append(frame)
    meta: dict[str, Any] = {"camera_model": "PINHOLE" if per_frame else "OPENCV"}
    if not per_frame:
        K = seq.intrinsics[0]
        meta.update(fl_x=K[0, 0], fl_y=K[1, 1], cx=K[0, 2], cy=K[1, 2], w=W, h=H, k1=0.0, k2=0.0, p1=0.0, p2=0.0)
    meta["frames"] = frames[::-1] if per_frame else frames
    names = [f["file_path"] for f in frames]
    meta.update({f"{name}_filenames": names if name == split else [] for name in SET_LIST_SPLITS})
    (folder / TRANSFORMS).write_text(json.dumps(meta, indent=1), encoding="utf-8")
    (folder / "scene.json").write_text(json.dumps(seq.to_dict()), encoding="utf-8")


def write_colmap_sequence(root: Path, seq: SyntheticSequence, index: int, image_format: str) -> None:
    """Render and write one sequence as a COLMAP project with dense depth maps (see the module docstring)."""
    H, W = seq.image_size
    folder = root / seq.name
    half = ((H + 1) // 2, (W + 1) // 2)
    for sub in ("images", "images_2"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    model = tuple(colmap.CAMERA_PARAMS)[index % len(colmap.CAMERA_PARAMS)]
    K = seq.intrinsics[0]
    names = colmap.CAMERA_PARAMS[model]
    pinhole = [K[0, 0], K[0, 2], K[1, 2]] if names[0] == "f" else [K[0, 0], K[1, 1], K[0, 2], K[1, 2]]
    camera = colmap.Camera(1, model, W, H, tuple(pinhole + [0.0] * (len(names) - len(pinhole))), None)
    images = []
    for i in range(seq.num_frames):
        name = f"frame_{i + 1:05d}.{image_format}"
        image, depth, _ = seq.render(i)
        _save_image(image, folder / "images" / name, image_format)
        _save_image(seq.render(i, half)[0], folder / "images_2" / name, image_format)
        colmap.write_colmap_array(folder / colmap.DEPTH_DIR / f"{name}{colmap.DEPTH_SUFFIX}", depth)
        E = seq.extrinsics[i]
        images.append(colmap.ColmapImage(seq.num_frames - i, tuple(colmap.rotmat_to_qvec(E[:3, :3])), tuple(E[:3, 3]),
                                         1, name, None))
    points2d = [[(1.5, 2.5, -1), (W - 0.5, H - 0.5, -1)]] + [[] for _ in images[1:]]
    colmap.write_colmap_model(folder / "sparse" / "0", [camera], images, binary=index % 2 == 1, points2d=points2d)
    (folder / "scene.json").write_text(json.dumps(seq.to_dict()), encoding="utf-8")


def generate_dataset(
    out: Path,
    *,
    scenes: int = 4,
    frames: int = 24,
    image_size: int = 256,
    seed: int = 0,
    layout: str = "co3d",
    split: str = "train",
    image_format: str = "jpg",
) -> Path:
    """Generate ``scenes`` sequences of ``frames`` square ``image_size`` frames under ``out``; return ``out``.

    ``layout="co3d"`` is read by :class:`SyntheticReader` (``open_dataset("synthetic", out, split=split)``),
    ``layout="re10k"`` by :class:`~cameo_corr.datasets.re10k.RE10KReader` (``split=split``),
    ``layout="nerfstudio"`` by ``open_dataset("nerfstudio", out)`` (``split`` names the frame list
    holding every frame) and ``layout="colmap"`` by ``open_dataset("colmap", out)`` (no splits). The same
    arguments always produce byte-identical files. ``out`` must not exist or be empty.
    """
    if scenes < 1 or frames < 2 or image_size < 8:
        raise ValueError(f"need scenes >= 1, frames >= 2, image_size >= 8; got {scenes}, {frames}, {image_size}")
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
    if split not in SET_LIST_SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SET_LIST_SPLITS}")
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"unknown image format {image_format!r}; expected one of {IMAGE_FORMATS}")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not an empty directory")
    out.mkdir(parents=True, exist_ok=True)
    sequences = [make_sequence(seed, i, frames, (image_size, image_size)) for i in range(scenes)]
    if layout == "re10k":
        for seq in sequences:
            write_re10k_sequence(out, seq, split, image_format)
        return out
    if layout == "nerfstudio":
        for index, seq in enumerate(sequences):
            write_nerfstudio_sequence(out, seq, index, split, image_format)
        return out
    if layout == "colmap":
        for index, seq in enumerate(sequences):
            write_colmap_sequence(out, seq, index, image_format)
        return out
    annotations: list[dict[str, Any]] = []
    for seq in sequences:
        annotations.extend(write_co3d_sequence(out, seq, image_format))
    cat_dir = out / CATEGORY
    write_jgz(cat_dir / FRAME_ANNOTATIONS, annotations)
    write_jgz(cat_dir / SEQUENCE_ANNOTATIONS, [
        {"sequence_name": seq.name, "category": CATEGORY, "video": None, "point_cloud": None,
         "viewpoint_quality_score": None} for seq in sequences
    ])
    set_list = {name: [] for name in SET_LIST_SPLITS}
    set_list[split] = [[a["sequence_name"], a["frame_number"], a["image"]["path"]] for a in annotations]
    (cat_dir / SET_LIST_DIR).mkdir(exist_ok=True)
    (cat_dir / SET_LIST_DIR / f"set_lists_{SUBSET}.json").write_text(json.dumps(set_list), encoding="utf-8")
    return out


# ------------------------------------------------------------------------------------------- reader
class SyntheticReader(CO3DReader):
    """The CO3D layout written by :func:`generate_dataset` (depth + object masks); registry name ``synthetic``.

    Scene ids are ``"synthetic/<sequence>"``; :meth:`sequence` returns the analytic description.
    """

    name = "synthetic"
    default_crop_policy = "principal_point"

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        categories: Sequence[str] | None = None,
        subset: str | None = SUBSET,
    ) -> None:
        super().__init__(root, split=split, categories=categories, subset=subset)

    def preferred_crop_policy(self) -> str:
        """Always ``principal_point``: the scene is the whole room, while the masks cover the objects only."""
        return self.default_crop_policy

    def sequence(self, scene_id: str) -> SyntheticSequence:
        """The :class:`SyntheticSequence` of a scene, from its ``scene.json``."""
        return SyntheticSequence.read(self.root / scene_id / "scene.json", scene_id=scene_id)


# ---------------------------------------------------------------------------------------------- CLI
def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """Add ``cameo-corr synthesize``."""
    p = subparsers.add_parser(
        "synthesize",
        help="generate analytic synthetic scenes with exact depth (CO3D, RealEstate10K, nerfstudio or COLMAP layout)",
        description="Render seeded synthetic rooms with textured objects by exact ray casting and write them in "
                    "the CO3D layout (images, float16 depth PNGs, depth and object masks, PyTorch3D cameras; read "
                    "with --dataset synthetic), the RealEstate10K raw layout (read with --dataset re10k), the "
                    "nerfstudio layout (transforms.json, millimetre depth PNGs, masks, half-size images_2 copies; "
                    "--dataset nerfstudio) or COLMAP projects (sparse/0 text or binary models, dense "
                    "stereo/depth_maps; --dataset colmap). Each scene also gets a scene.json with its analytic "
                    "description.",
    )
    p.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
    p.add_argument("--scenes", type=int, default=4, help="number of scenes / sequences (default: 4)")
    p.add_argument("--frames", type=int, default=24, help="frames per scene (default: 24)")
    p.add_argument("--size", type=int, default=256, help="square image side in pixels (default: 256)")
    p.add_argument("--seed", type=int, default=0, help="random seed; equal arguments give identical files (default: 0)")
    p.add_argument("--layout", choices=LAYOUTS, default="co3d", help="directory layout (default: co3d)")
    p.add_argument("--split", choices=SET_LIST_SPLITS, default="train",
                   help="split holding the frames (default: train)")
    p.add_argument("--image-format", choices=IMAGE_FORMATS, default="jpg",
                   help=f"jpg (quality {JPEG_QUALITY}) or lossless png (default: jpg)")
    p.set_defaults(func=_synthesize)


def _synthesize(args: argparse.Namespace) -> int:
    import time

    t0 = time.perf_counter()
    try:
        root = generate_dataset(Path(args.out), scenes=args.scenes, frames=args.frames, image_size=args.size,
                                seed=args.seed, layout=args.layout, split=args.split, image_format=args.image_format)
    except (ValueError, FileExistsError) as e:
        print(f"cameo-corr synthesize: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.scenes} scenes x {args.frames} frames ({args.size}px, {args.layout} layout, split "
          f"{args.split}) to {root} in {time.perf_counter() - t0:.1f} s")
    return 0


__all__ = [
    "GENERATOR_VERSION",
    "CATEGORY",
    "SUBSET",
    "LAYOUTS",
    "IMAGE_FORMATS",
    "WALL_NAMES",
    "FIRST_OBJECT_ID",
    "NO_HIT",
    "Texture",
    "Surface",
    "Wall",
    "Sphere",
    "Box",
    "surface_from_dict",
    "SyntheticScene",
    "render",
    "look_at",
    "camera_path",
    "SyntheticSequence",
    "make_sequence",
    "write_co3d_sequence",
    "write_re10k_sequence",
    "write_nerfstudio_sequence",
    "write_colmap_sequence",
    "generate_dataset",
    "SyntheticReader",
    "register_cli",
]
