"""Subsets of a cache: window selections by manifest predicate.

:class:`WindowSelection` selects the manifest rows of a cache by ``split``, by a scene-list file (one
scene id per line) and by a minimum ``mask_frac``. It becomes one ``pyarrow.compute`` expression that
is pushed down to the Parquet reader, so a selection over a million-window manifest costs what reading
the selected columns costs. The trainer (``data.split``, ``data.scenes_file``, ``data.min_mask_frac``,
also per mixture entry) and ``cameo-corr cache stats|verify|viz|merge`` (``--split``, ``--scenes``,
``--min-mask-frac``) use it; an empty selection is an error naming the predicate.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from cameo_corr.cache.manifest import read_manifest
from cameo_corr.schemas import DatasetError, SchemaError

if TYPE_CHECKING:  # pragma: no cover - typing only
    import pyarrow as pa

    from cameo_corr.cache.reader import CorrCache


def read_scene_list(path: str | Path) -> tuple[str, ...]:
    """Scene ids of a scene-list file: one id per line; blank lines and lines starting with ``#`` are
    skipped. A line with surrounding whitespace, a repeated id or a file without ids is an error naming
    the file (and the line)."""
    where = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError as e:
        raise DatasetError(where, "no such scene-list file", field="scenes_file") from e
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(where, f"cannot read the scene list: {e}", field="scenes_file") from e
    seen: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if line != line.strip():
            raise DatasetError(where, f"scene id {line!r} has leading or trailing whitespace", line=number, field="scenes_file")
        if line in seen:
            raise DatasetError(where, f"scene id {line!r} repeats line {seen[line]}", line=number, field="scenes_file")
        seen[line] = number
    if not seen:
        raise DatasetError(where, "the scene list has no scene id (one per line)", field="scenes_file")
    return tuple(seen)


@dataclass(frozen=True)
class WindowSelection:
    """Manifest predicate: windows of ``split``, of the scenes listed in ``scenes_file`` and with
    ``mask_frac >= min_mask_frac`` (each ``None``: no condition). ``min_mask_frac`` also leaves out failed
    rows (their ``mask_frac`` is NaN)."""

    split: str | None = None
    scenes_file: str | None = None
    min_mask_frac: float | None = None

    def __post_init__(self) -> None:
        if self.min_mask_frac is not None and not (isinstance(self.min_mask_frac, (int, float)) and 0.0 <= self.min_mask_frac <= 1.0):
            raise SchemaError("min_mask_frac", f"must be a number in [0, 1], got {self.min_mask_frac!r}")
        if self.split is not None and not (isinstance(self.split, str) and self.split):
            raise SchemaError("split", f"must be a non-empty string, got {self.split!r}")

    def __bool__(self) -> bool:
        return self.split is not None or self.scenes_file is not None or self.min_mask_frac is not None

    def over(self, defaults: "WindowSelection") -> "WindowSelection":
        """This selection with its unset predicates taken from ``defaults``."""
        return WindowSelection(
            self.split if self.split is not None else defaults.split,
            self.scenes_file if self.scenes_file is not None else defaults.scenes_file,
            self.min_mask_frac if self.min_mask_frac is not None else defaults.min_mask_frac,
        )

    def columns(self) -> list[str]:
        """Manifest columns the predicate reads."""
        return [c for c, v in (("split", self.split), ("scene_id", self.scenes_file), ("mask_frac", self.min_mask_frac)) if v is not None]

    def expression(self) -> Any:
        """The predicate as a ``pyarrow.compute`` expression (``None`` when nothing is selected on)."""
        import pyarrow as pa
        import pyarrow.compute as pc

        parts = []
        if self.split is not None:
            parts.append(pc.field("split") == self.split)
        if self.scenes_file is not None:
            parts.append(pc.field("scene_id").isin(pa.array(read_scene_list(self.scenes_file), pa.string())))
        if self.min_mask_frac is not None:
            parts.append(pc.field("mask_frac") >= float(self.min_mask_frac))
        expr = None
        for part in parts:
            expr = part if expr is None else expr & part
        return expr

    def describe(self) -> str:
        """The predicate in words, for messages (``all windows`` when empty)."""
        parts = []
        if self.split is not None:
            parts.append(f"split {self.split!r}")
        if self.scenes_file is not None:
            parts.append(f"scenes listed in {self.scenes_file}")
        if self.min_mask_frac is not None:
            parts.append(f"mask_frac >= {self.min_mask_frac:g}")
        return " and ".join(parts) if parts else "all windows"

    def filter(self, table: "pa.Table") -> "pa.Table":
        """The rows of an already read manifest ``table`` that satisfy the predicate."""
        expr = self.expression()
        return table if expr is None else table.filter(expr)


def selected_manifest(cache: "CorrCache", selection: WindowSelection, status: str | None = "ok",
                      columns: Sequence[str] | None = None) -> "pa.Table":
    """Manifest rows of ``cache`` with ``status`` (``None``: all) satisfying ``selection`` (columns
    ``columns``, default all); an empty result under a non-empty selection is a :class:`DatasetError`
    naming the predicate and the cache."""
    import pyarrow.compute as pc


    expr = selection.expression()
    if status is not None:
        expr = pc.field("status") == status if expr is None else (pc.field("status") == status) & expr
    table = read_manifest(cache.location, columns=columns, filter=expr, filter_columns=["status", *selection.columns()])
    if table.num_rows == 0 and selection:
        what = f"'{status}' windows" if status is not None else "windows"
        raise DatasetError(f"{cache.location.display}/manifest", f"no {what} match the selection ({selection.describe()})",
                           field="selection")
    return table


__all__ = ["read_scene_list", "WindowSelection", "selected_manifest"]
