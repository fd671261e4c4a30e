"""Argument types and options shared by several commands (``--grid``, ``KEY=VALUE`` options,
``--storage-option``, ``--dataset-option`` and the window sampling options of ``preprocess`` and
``eval-corr``). Importing this module is light: no torch, Ray or zarr."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from typing import Any, Sequence

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


def add_dataset_option(parser: argparse.ArgumentParser | Any) -> None:
    """Add the repeatable ``--dataset-option KEY=VALUE`` (dataset reader options, JSON values) to ``parser``."""
    parser.add_argument("--dataset-option", action="append", type=key_value_arg, default=[], metavar="KEY=VALUE",
                        help="extra reader option (JSON value), repeatable")


def add_sampling_arguments(parser: argparse.ArgumentParser | Any, *, policies: Sequence[str], positions: Sequence[str]) -> None:
    """Add the window sampling options ``--windows-per-scene``, ``--sampling``, ``--span-per-view``,
    ``--positions``, ``--fps`` and ``--seed`` (the same flags for every command that plans windows).

    ``policies`` and ``positions`` are the planner's choices
    (:data:`~cameo_corr.datasets.planner.SAMPLING_POLICIES`, :data:`~cameo_corr.datasets.planner.POSITION_UNITS`),
    passed in because this module sits below the planner.
    """
    parser.add_argument("--windows-per-scene", type=int, default=1,
                        help="windows K drawn per scene (default: 1; a short scene may give fewer distinct windows)")
    parser.add_argument("--sampling", choices=tuple(policies), default=None, help="window sampling (default: per dataset)")
    parser.add_argument("--span-per-view", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                        help="stride sampling: window span in [S*LO, S*HI] raw frames (default: 48 144)")
    parser.add_argument("--positions", choices=tuple(positions), default=None,
                        help="stride sampling: frame positions (default: per dataset)")
    parser.add_argument("--fps", type=float, default=None, help="raw video frame rate for timestamp positions (default: 30)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")


SAMPLING_FLAGS: dict[str, str] = {
    "views": "--views", "windows_per_scene": "--windows-per-scene", "policy": "--sampling", "span_per_view": "--span-per-view",
    "positions": "--positions", "fps": "--fps", "seed": "--seed",
}
"""The command-line flag of each window sampling setting (``PlanConfig`` field -> flag), for errors."""


def storage_options(args: argparse.Namespace) -> dict[str, Any] | None:
    """The ``--storage-option`` values of ``args`` as a dict (``None`` when none were given)."""
    return dict(args.storage_option) or None


STORAGE_FLAG = "--storage-option"


def _is_storage_flag(arg: str) -> bool:
    """Whether ``arg`` (before any ``=``) is ``--storage-option`` or an abbreviation argparse accepts."""
    flag = arg.split("=", 1)[0]
    return len(flag) > 2 and STORAGE_FLAG.startswith(flag)


SECRET_WORDS = ("key", "secret", "token", "password", "credential")
"""A storage option (or a key inside a JSON value, at any depth) whose name holds one of these words
(any case: ``key``, ``aws_secret_access_key``, ``SSECustomerKey``, ``session_token``) is recorded as ``***``."""


def _is_secret(name: str) -> bool:
    return any(word in name.lower() for word in SECRET_WORDS)


def _redact_value(value: Any) -> Any:
    """``value`` with the values of secret-named keys of its dicts (at any depth) replaced by ``***``."""
    if isinstance(value, dict):
        return {k: "***" if _is_secret(str(k)) else _redact_value(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_redact_value(v) for v in value]
    return value


def _redact_option(text: str) -> str:
    """One ``KEY=VALUE`` storage option as recorded: the value of a secret-named key is ``***``; a JSON
    object or list keeps its other entries (an endpoint URL, timeouts), a value that is not JSON is kept."""
    key, _, value = text.partition("=")
    if _is_secret(key):
        return f"{key}=***"
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        return text
    return f"{key}={json.dumps(_redact_value(parsed))}" if isinstance(parsed, (dict, list)) else text


def redact_storage_options(argv: Sequence[str]) -> list[str]:
    """``argv`` with the secrets among the ``--storage-option KEY=VALUE`` values (also after an
    abbreviated flag, as argparse takes it) replaced by ``***`` (:data:`SECRET_WORDS`): credentials never
    reach ``cache.json``, which records the command, and the rest (endpoint, region, timeouts) does."""
    out: list[str] = []
    for i, arg in enumerate(argv):
        if arg.startswith("--") and "=" in arg and _is_storage_flag(arg):
            flag, value = arg.split("=", 1)
            out.append(f"{flag}={_redact_option(value)}")
        elif i > 0 and argv[i - 1].startswith("--") and "=" not in argv[i - 1] and _is_storage_flag(argv[i - 1]):
            out.append(_redact_option(arg))
        else:
            out.append(arg)
    return out


def recorded_command(argv: Sequence[str] | None = None) -> str:
    """The command line as ``cache.json`` records it (``created_by.command``), ready to paste into a
    shell: the program as it was started (``cameo-corr``, a script's name, or ``python -m cameo_corr.cli``
    rather than ``__main__.py``) and its arguments, quoted where needed, with the storage options'
    secrets redacted (:func:`redact_storage_options`)."""
    argv = list(sys.argv if argv is None else argv)
    program = os.path.basename(argv[0]) if argv else ""
    if program == "__main__.py":
        spec = getattr(sys.modules.get("__main__"), "__spec__", None)
        if spec is not None and spec.name:
            program = f"python -m {spec.name.removesuffix('.__main__')}"
    return " ".join([program, shlex.join(redact_storage_options(argv[1:]))]).strip()


__all__ = ["key_value_arg", "grids_arg", "grid_arg", "add_storage_option", "add_dataset_option", "add_sampling_arguments",
           "SAMPLING_FLAGS", "storage_options", "redact_storage_options", "recorded_command"]
