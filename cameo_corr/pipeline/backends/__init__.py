"""Geometry backends: one window of canonical views in, one shared-frame pointmap per view out.

Every backend subclasses :class:`GeometryBackend` and is found by name through :func:`make_backend`.
Adding a backend is one new module with a :class:`GeometryBackend` subclass plus one line in
``_BACKENDS`` (or, without touching this package, ``make_backend("my_pkg.my_mod:MyBackend")``).

Built in:

* ``depth`` (:mod:`.depth`): ground-truth depth unprojected with the dataset cameras;
* ``vggt`` (:mod:`.vggt`): facebookresearch VGGT (optional extra, imported lazily).
"""

from __future__ import annotations

import abc
import argparse
import importlib
from typing import TYPE_CHECKING, Any, ClassVar

from cameo_corr.schemas import PointmapResult, SchemaError, WindowData

if TYPE_CHECKING:  # pragma: no cover - typing only; torch is imported lazily so CLI parsers stay light
    import torch


def resolve_device(device: "str | torch.device | None") -> "torch.device":
    """``None`` -> ``cuda`` when a GPU is visible, else ``cpu``; strings and devices pass through."""
    import torch

    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def unusable_cuda(device: "str | torch.device") -> str | None:
    """Why this process cannot use the CUDA device ``device`` (a CPU-only torch, no GPU visible, an index
    beyond the visible ones), or ``None`` when it can or the device is not CUDA."""
    import torch

    device = torch.device(device)
    if device.type != "cuda":
        return None
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if device.index is None and visible or device.index is not None and device.index < visible:
        return None
    return "torch is a CPU-only build" if torch.version.cuda is None else f"{visible} CUDA device(s) visible"


class GeometryBackend(abc.ABC):
    """Turns a :class:`WindowData` (S canonical views of one scene) into a :class:`PointmapResult`.

    Subclasses set the class attributes and implement :meth:`__call__`; backends that can batch
    windows (a network) override :meth:`run_batch`. :meth:`describe` is what ``cache.json`` records
    under ``backend`` and what goes into every window id, so it holds exactly the settings that change
    the output values (never the device or memory knobs).
    """

    name: ClassVar[str]
    """Registry name (``make_backend(name)``)."""
    version: ClassVar[str]
    """Bumped whenever the backend's output for the same input and options changes."""
    needs_depth: ClassVar[bool] = False
    """Whether windows must be loaded with ``load_window(..., with_depth=True)``."""
    needs_masks: bool = False
    """Whether this instance reads the windows' foreground masks (``load_window(..., with_masks=True)``);
    the job loads them only then."""
    wants_gpu: ClassVar[bool] = False
    """A network that is impractically slow on CPU (drivers warn when no GPU is given to it)."""

    def __init__(self, device: str | torch.device | None = None) -> None:
        self.device = resolve_device(device)

    @classmethod
    def check_requirements(cls) -> None:
        """Raise :class:`ImportError` with an install hint when an optional dependency is missing.

        Called by drivers before they start workers, so a missing package fails at once instead of
        inside every remote actor. The default has no optional dependency.
        """

    @abc.abstractmethod
    def __call__(self, window: WindowData) -> PointmapResult:
        """Pointmaps of one window, as tensors on :attr:`device`."""

    def run_batch(self, windows: list[WindowData]) -> list[PointmapResult]:
        """Pointmaps of several windows, in order. The default processes them one by one."""
        return [self(w) for w in windows]

    def options(self) -> dict[str, Any]:
        """Value-changing options of this instance (merged into :meth:`describe`)."""
        return {}

    def describe(self) -> dict[str, Any]:
        """``{"name", "version", **options}``: the backend entry of ``cache.json``."""
        return {"name": self.name, "version": self.version, **self.options()}

    def check_window(self, window: WindowData) -> None:
        """Validate ``window`` and that it carries depth when :attr:`needs_depth`."""
        window.validate()
        if self.needs_depth and window.depth is None:
            raise SchemaError(
                "depth",
                f"backend '{self.name}' needs depth: the dataset must have depth and the window must be "
                "loaded with load_window(..., with_depth=True)",
                where=f"window {window.record.window_id}",
            )


_BACKENDS: dict[str, str] = {
    "depth": "cameo_corr.pipeline.backends.depth:DepthBackend",
    "vggt": "cameo_corr.pipeline.backends.vggt:VGGTBackend",
}
BACKEND_NAMES = tuple(_BACKENDS)


def backend_class(name: str) -> type[GeometryBackend]:
    """The backend class registered as ``name``, or given as ``"package.module:ClassName"``."""
    target = _BACKENDS.get(name, name)
    if ":" not in target:
        raise ValueError(f"unknown geometry backend {name!r}; expected one of {BACKEND_NAMES} or 'module:Class'")
    module, cls_name = target.split(":", 1)
    cls = getattr(importlib.import_module(module), cls_name, None)
    if not (isinstance(cls, type) and issubclass(cls, GeometryBackend)):
        raise ValueError(f"{target!r} is not a GeometryBackend subclass")
    return cls


def make_backend(name: str, **options: Any) -> GeometryBackend:
    """Instantiate a backend by registry name (``depth``, ``vggt``) or ``"module:Class"`` with ``options``."""
    return backend_class(name)(**options)


# ------------------------------------------------------------------------------- command line
def add_backend_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--backend`` and the backend options shared by every command that runs a backend."""
    g = parser.add_argument_group("geometry backend")
    g.add_argument("--backend", default="depth", help=f"one of {', '.join(BACKEND_NAMES)} or module:Class (default: depth)")
    g.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    g.add_argument("--frame", choices=("world", "first"), default=None, help="depth: output frame (default: world)")
    g.add_argument("--vggt-model", "--model", dest="model", default=None, help="vggt: Hugging Face id, local directory or checkpoint file (default: facebook/VGGT-1B)")
    g.add_argument("--revision", default=None, help="vggt: Hugging Face revision (branch, tag or commit)")
    g.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default=None, help="vggt: compute dtype (default: auto)")
    g.add_argument("--points", choices=("depth", "head"), default=None, help="vggt: pointmap from depth + cameras (default) or the point head")
    g.add_argument("--conf-threshold", type=float, default=None, help="vggt: pixels with confidence below this are invalid")
    g.add_argument("--conf-percentile", type=float, default=None, help="vggt: pixels below this percentile (0-100) of the window's confidence are invalid")
    g.add_argument("--frames-chunk-size", type=int, default=None, help="vggt: frames per pass of the dense head (memory knob; default 8, as VGGT)")


_ARG_OPTIONS: dict[str, tuple[str, ...]] = {
    "depth": ("device", "frame"),
    "vggt": ("device", "model", "revision", "dtype", "points", "conf_threshold", "conf_percentile", "frames_chunk_size"),
}


def backend_options_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """Keyword options for :func:`make_backend` from arguments added by :func:`add_backend_arguments`.

    Only options given on the command line are returned; an option that the chosen backend does not
    take is an error (rather than silently ignored).
    """
    names = ("device", "frame", "model", "revision", "dtype", "points", "conf_threshold", "conf_percentile", "frames_chunk_size")
    given = {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}
    allowed = _ARG_OPTIONS.get(args.backend)
    if allowed is not None:
        extra = sorted(set(given) - set(allowed))
        if extra:
            flags = ", ".join("--" + e.replace("_", "-") for e in extra)
            raise ValueError(f"backend '{args.backend}' does not take {flags}")
    return given


__all__ = [
    "GeometryBackend",
    "BACKEND_NAMES",
    "backend_class",
    "make_backend",
    "resolve_device",
    "unusable_cuda",
    "add_backend_arguments",
    "backend_options_from_args",
]
