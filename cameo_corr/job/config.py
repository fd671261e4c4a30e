"""The preprocessing job's one configuration: :class:`JobConfig`, built once from the command line
(:meth:`JobConfig.from_args`) or from Python (``JobConfig(dataset=..., root=..., out=...)``) and
validated in one place (its constructor), before anything is read or started."""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from cameo_corr.cache.consolidation import DEFAULT_CONSOLIDATE_EVERY, DEFAULT_CONSOLIDATE_SECONDS
from cameo_corr.cache.lease import DEFAULT_LEASE_TIMEOUT
from cameo_corr.cli.args import SAMPLING_FLAGS, recorded_command
from cameo_corr.cli.errors import UsageError
from cameo_corr.datasets.planner import DEFAULT_SHARD_SIZE
from cameo_corr.schemas import CANONICAL_SIZE, DEFAULT_GRID, DEFAULT_TAU, IMAGE_FORMATS, SchemaError, as_grid, check_grids, grid_name

if TYPE_CHECKING:  # pragma: no cover - typing only
    from cameo_corr.datasets.base import SceneReader
    from cameo_corr.datasets.canonical import CanonicalView
    from cameo_corr.datasets.planner import PlanConfig

@dataclass(frozen=True)
class JobConfig:
    """Everything one preprocessing run needs; frozen, normalised and validated on construction.

    **What to read**: ``dataset`` (reader name), ``root``, ``split`` (``None``: the reader's default),
    ``dataset_options`` (reader options), ``scenes`` (only these scene ids). **Windows**: ``views`` S,
    ``windows_per_scene`` K, ``sampling``/``span_per_view``/``positions``/``fps``/``seed`` (``None``:
    the dataset's default, :func:`~cameo_corr.datasets.planner.default_plan_config`), ``max_windows``
    (compute at most this many of the windows still to do, in plan order: a trial run; ``None``: all).
    **Geometry**:
    ``backend`` with ``backend_options``, the canonical ``crop_policy`` (``None``: the reader's) and
    ``crop_size``, the primary ``grid`` (``h = w`` or ``(h, w)``) and ``extra_grids`` (tokenized and
    matched from the same pointmaps), ``tau``, ``match_backend``. **Where it runs**: ``workers`` model
    actors with ``gpus_per_worker``/``cpus_per_worker``, ``batch_size`` windows per backend call,
    ``num_cpus`` of a local Ray instance, ``shard_size`` windows per commit, ``max_retries`` (-1:
    unlimited). **The cache**: ``out`` (directory or fsspec URL) with ``storage_options``;
    ``store_images`` (``none``, ``jpeg`` at ``jpeg_quality``, or ``png``: each window's canonical views
    stored in its shard, so a trainer needs no dataset root), ``retry_failed`` redoes failed windows, ``repair`` recomputes corrupt shards, ``force`` takes over
    another job's lease, ``lease_timeout``, ``consolidate_every`` shards / ``consolidate_seconds``
    (manifest consolidation while the job runs). **Behaviour**: ``fail_fast``, ``progress``,
    ``command`` (recorded in ``cache.json``). ``lease_timeout``, ``consolidate_every`` and
    ``consolidate_seconds`` given as ``None`` take their defaults.
    """

    dataset: str
    root: str
    out: str
    split: str | None = None
    dataset_options: Mapping[str, Any] = field(default_factory=dict)
    scenes: tuple[str, ...] | None = None
    views: int = 8
    windows_per_scene: int = 1
    sampling: str | None = None
    span_per_view: tuple[float, float] | None = None
    positions: str | None = None
    fps: float | None = None
    seed: int = 0
    max_windows: int | None = None
    backend: str = "depth"
    backend_options: Mapping[str, Any] = field(default_factory=dict)
    crop_policy: str | None = None
    crop_size: int = CANONICAL_SIZE
    grid: tuple[int, int] = (DEFAULT_GRID, DEFAULT_GRID)
    extra_grids: tuple[tuple[int, int], ...] = ()
    tau: float = DEFAULT_TAU
    match_backend: str = "auto"
    workers: int = 1
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 0.0
    batch_size: int = 1
    num_cpus: int | None = None
    shard_size: int = DEFAULT_SHARD_SIZE
    max_retries: int = 3
    storage_options: Mapping[str, Any] = field(default_factory=dict)
    store_images: str = "none"
    jpeg_quality: int = 90
    retry_failed: bool = False
    repair: bool = False
    force: bool = False
    lease_timeout: float = DEFAULT_LEASE_TIMEOUT
    consolidate_every: int = DEFAULT_CONSOLIDATE_EVERY
    consolidate_seconds: float = DEFAULT_CONSOLIDATE_SECONDS
    fail_fast: bool = False
    progress: bool = True
    command: str | None = None

    def __post_init__(self) -> None:
        root = str(self.root)
        normalised = {
            "root": root if "://" in root else os.path.abspath(root),
            "out": str(self.out),
            "grid": _grid(self.grid),
            "extra_grids": tuple(_grid(g) for g in self.extra_grids),
            "dataset_options": dict(self.dataset_options or {}),
            "backend_options": dict(self.backend_options or {}),
            "storage_options": dict(self.storage_options or {}),
            "scenes": None if self.scenes is None else tuple(self.scenes),
            "span_per_view": None if self.span_per_view is None else tuple(self.span_per_view),
            "tau": float(self.tau),
            "lease_timeout": DEFAULT_LEASE_TIMEOUT if self.lease_timeout is None else float(self.lease_timeout),
            "consolidate_every": DEFAULT_CONSOLIDATE_EVERY if self.consolidate_every is None else int(self.consolidate_every),
            "consolidate_seconds": DEFAULT_CONSOLIDATE_SECONDS if self.consolidate_seconds is None else float(self.consolidate_seconds),
        }
        for name, value in normalised.items():
            object.__setattr__(self, name, value)
        self._validate()

    def _validate(self) -> None:
        """Refuse values that cannot work, naming the flag and what is valid (:class:`UsageError`)."""
        grids = (self.grid, *self.extra_grids)
        try:
            check_grids(grids)
        except SchemaError as e:
            raise UsageError(f"--grid: {e.message}") from None
        side = max(max(g) for g in grids)
        checks = [
            (self.workers >= 1, f"--workers must be >= 1 (model actors), got {self.workers}"),
            (self.gpus_per_worker >= 0, f"--gpus-per-worker must be >= 0, got {self.gpus_per_worker}"),
            (self.cpus_per_worker >= 0, f"--cpus-per-worker must be >= 0, got {self.cpus_per_worker}"),
            (self.shard_size >= 1, f"--shard-size must be >= 1 (windows per shard), got {self.shard_size}"),
            (self.batch_size >= 1, f"--batch-size must be >= 1 (windows per backend call), got {self.batch_size}"),
            (self.max_retries >= -1, f"--max-retries must be >= 0, or -1 for unlimited, got {self.max_retries}"),
            (self.crop_size >= side, f"--crop-size must be an integer >= the token grid side ({side} for --grid "
                                     f"{','.join(str(g[0]) if g[0] == g[1] else grid_name(g) for g in grids)}: every token needs "
                                     f"at least one pixel), got {self.crop_size}"),
            (self.lease_timeout > 0, f"--lease-timeout must be > 0 seconds, got {self.lease_timeout}"),
            (self.consolidate_every >= 1, f"--consolidate-every must be >= 1 (pending shard fragments), got {self.consolidate_every}"),
            (self.consolidate_seconds > 0, f"--consolidate-seconds must be > 0, got {self.consolidate_seconds}"),
            (math.isfinite(self.tau) and self.tau >= 0, f"--tau must be a finite number >= 0 (tokens), got {self.tau}"),
            (self.max_windows is None or self.max_windows >= 1, f"--max-windows must be >= 1, got {self.max_windows}"),
            (self.store_images in ("none", *IMAGE_FORMATS), f"--store-images must be none, jpeg or png, got {self.store_images!r}"),
            (1 <= self.jpeg_quality <= 100, f"--jpeg-quality must be in [1, 100], got {self.jpeg_quality}"),
        ]
        for ok, message in checks:
            if not ok:
                raise UsageError(message)
        self._check_device()
        try:
            self.plan_config()
        except SchemaError as e:  # the sampling flags, named as the command line spells them
            raise UsageError(f"{SAMPLING_FLAGS.get(e.field, e.field)}: {e.message}") from None

    def _check_device(self) -> None:
        """Refuse ``--device cuda:N`` that no model actor can see: Ray shows an actor only the GPUs it
        assigns to it (``--gpus-per-worker``, a fraction counting as one), numbered from ``cuda:0``."""
        kind, _, index = str(self.backend_options.get("device") or "").partition(":")
        visible = max(1, math.ceil(self.gpus_per_worker))
        if kind == "cuda" and self.gpus_per_worker > 0 and index.isdigit() and int(index) >= visible:
            raise UsageError(f"--device {kind}:{index}: each model actor sees only the {visible} GPU(s) Ray assigns it "
                             f"(--gpus-per-worker {self.gpus_per_worker:g}), numbered from cuda:0; pass --device cuda")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "JobConfig":
        """The config of parsed ``cameo-corr preprocess`` arguments
        (:func:`~cameo_corr.job.cli.add_preprocess_arguments`)."""
        from cameo_corr.pipeline.backends import backend_options_from_args

        try:
            backend_options = backend_options_from_args(args)
        except ValueError as e:
            raise UsageError(str(e)) from None
        names = {f.name for f in dataclasses.fields(cls)} - {"grid", "extra_grids", "backend_options", "dataset_options",
                                                             "storage_options", "scenes", "progress", "command"}
        return cls(
            **{n: getattr(args, n) for n in names},
            grid=args.grid[0],
            extra_grids=args.grid[1:],
            backend_options=backend_options,
            dataset_options=dict(args.dataset_option),
            storage_options=dict(args.storage_option),
            scenes=args.scene,
            progress=not args.no_progress,
            command=recorded_command(getattr(args, "command_line", None)),
        )

    def open_reader(self) -> "SceneReader":
        """The dataset reader (``split`` folded into the reader options)."""
        from cameo_corr.datasets.base import open_dataset

        options = dict(self.dataset_options)
        if self.split is not None:
            options["split"] = self.split
        return open_dataset(self.dataset, self.root, **options)

    def plan_config(self) -> "PlanConfig":
        """How windows are drawn: the dataset's default sampling with this config's overrides."""
        from cameo_corr.datasets.planner import default_plan_config

        return default_plan_config(self.dataset, views=self.views, windows_per_scene=self.windows_per_scene, policy=self.sampling,
                                   span_per_view=self.span_per_view, positions=self.positions, fps=self.fps, seed=self.seed)

    def view(self, reader: "SceneReader") -> "CanonicalView":
        """The canonical view: ``crop_size`` pixels, ``crop_policy`` or the reader's preferred one."""
        from cameo_corr.datasets.canonical import CanonicalView

        return CanonicalView(size=self.crop_size, policy=self.crop_policy or reader.preferred_crop_policy())

    def geometry_spec(self) -> dict[str, Any]:
        """What every model actor builds (:class:`~cameo_corr.job.stages.GeometryStage`): backend and its
        options, matcher, grids and ``tau`` (plain JSON values, shipped to the workers).

        Without ``--gpus-per-worker`` the backend's device defaults to ``cpu``: Ray no longer hides the
        machine's GPUs from a worker it assigns none (its default since ray-project/ray#62492), so the
        backend's own default (``cuda`` when visible) would put every actor on GPU 0 unreserved. With
        GPUs, the backend takes the one Ray assigns (its ``cuda``)."""
        options = dict(self.backend_options)
        if self.gpus_per_worker <= 0:
            options.setdefault("device", "cpu")
        return {"backend": self.backend, "backend_options": options, "match_backend": self.match_backend,
                "grid": list(self.grid), "extra_grids": [list(g) for g in self.extra_grids], "tau": self.tau}

    def images(self) -> dict[str, Any] | None:
        """The ``images`` entry of ``cache.json`` (``None``: views are not stored)."""
        if self.store_images == "none":
            return None
        return {"format": "jpeg", "quality": int(self.jpeg_quality)} if self.store_images == "jpeg" else {"format": "png"}

    def storage(self) -> dict[str, Any] | None:
        """``storage_options`` for :class:`~cameo_corr.cache.location.CacheLocation` (``None`` when empty)."""
        return dict(self.storage_options) or None


def _grid(value: int | Sequence[int]) -> tuple[int, int]:
    """A grid value as ``(h, w)``; a malformed one is a :class:`UsageError` naming ``--grid``."""
    try:
        return as_grid(value)  # type: ignore[arg-type]
    except SchemaError as e:
        raise UsageError(f"--grid: {e.message}") from None


__all__ = ["JobConfig"]
