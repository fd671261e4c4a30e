"""The ``cameo-corr`` command line. Each command lives next to the code it runs; a module listed in
``_COMMAND_MODULES`` exposes ``register_cli(subparsers)`` adding its parser(s) with ``func=handler``
(handlers take the parsed namespace and return an exit code). Heavy imports stay inside handlers."""

from __future__ import annotations

import argparse
import importlib
import sys

_COMMAND_MODULES: tuple[str, ...] = (
    "cameo_corr.demo",
    "cameo_corr.datasets.synthetic",
    "cameo_corr.pipeline.ray_job",
    "cameo_corr.pipeline.cache_tools",
    "cameo_corr.pipeline.evaluate",
    "cameo_corr.train.cli",
    "cameo_corr.selfcheck",
)


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every registered subcommand."""
    parser = argparse.ArgumentParser(
        prog="cameo-corr",
        description="Offline correspondence cache and lean trainer for CAMEO.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in _COMMAND_MODULES:
        importlib.import_module(module).register_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``cameo-corr`` console script."""
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
