"""Argument types and options shared by several commands (``--grid``, ``KEY=VALUE`` options,
``--storage-option``). Importing this module is light: no torch, Ray or zarr."""

from __future__ import annotations

import argparse
import json
from typing import Any

from cameo_corr.schemas import SchemaError, parse_grids


def key_value_arg(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` with VALUE parsed as JSON when it is valid JSON, else kept as a string."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def grids_arg(text: str) -> tuple[tuple[int, int], ...]:
    """``--grid`` value: one or several comma-separated grids (:func:`~cameo_corr.schemas.parse_grids`)."""
    try:
        return parse_grids(text)
    except SchemaError as e:
        raise argparse.ArgumentTypeError(e.message) from None


def grid_arg(text: str) -> tuple[int, int]:
    """A ``--grid`` value naming exactly one grid (``32``, ``32x16``)."""
    grids = grids_arg(text)
    if len(grids) != 1:
        raise argparse.ArgumentTypeError(f"give one grid (like 32 or 32x16), got {text!r}")
    return grids[0]


def add_storage_option(parser: argparse.ArgumentParser | Any, what: str = "") -> None:
    """Add the repeatable ``--storage-option KEY=VALUE`` (fsspec storage options, JSON values) to ``parser``."""
    parser.add_argument("--storage-option", action="append", type=key_value_arg, default=[], metavar="KEY=VALUE",
                        help=f"fsspec storage option{what} (JSON value), repeatable")


def storage_options(args: argparse.Namespace) -> dict[str, Any] | None:
    """The ``--storage-option`` values of ``args`` as a dict (``None`` when none were given)."""
    return dict(args.storage_option) or None


__all__ = ["key_value_arg", "grids_arg", "grid_arg", "add_storage_option", "storage_options"]
