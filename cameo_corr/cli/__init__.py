"""The ``cameo-corr`` command line. Each command lives next to the code it runs; a module listed in
``_COMMAND_MODULES`` exposes ``register_cli(subparsers)`` adding its parser(s) with ``func=handler``
(handlers take the parsed namespace and return an exit code). Heavy imports stay inside handlers.
The errors handlers raise live in :mod:`cameo_corr.cli.errors`, the argument types several commands
share in :mod:`cameo_corr.cli.args`; both import nothing above the schemas, so any room may use them.

:func:`main` is the one place that turns what a handler raises into the behaviour of a finished tool:

* :class:`UsageError` and every other :class:`~cameo_corr.schemas.CameoCorrError` (bad input, bad
  option, bad file): one line ``cameo-corr <command>: error: <what>, <where>`` on stderr, exit 2;
* :class:`RunFailed` (the input was fine but the run did not produce what it should): one line, exit 1;
* ``OSError`` with a path (missing, not writable, a file where a directory is expected): one line,
  exit 2; a full disk (``ENOSPC``/``EDQUOT``) or another I/O failure: one line, exit 1;
* an object store that does not answer (botocore's connection, timeout and credential errors, which
  s3fs passes through): one line naming the URL where botocore's text does, exit 1;
* Ctrl-C: ``cameo-corr <command>: interrupted``, exit 130 (128 + SIGINT, as shells report it); a
  handler may re-raise ``KeyboardInterrupt(<what is kept>)`` to add that to the line;
* stdout closed early (``cameo-corr cache stats ... | head``): no message, exit 141 (128 + SIGPIPE).

Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys

from cameo_corr.cli.errors import (
    EXIT_BROKEN_PIPE,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    CommandError,
    RunFailed,
    UsageError,
)
from cameo_corr.schemas import CameoCorrError

_DISK_FULL = {errno.ENOSPC, errno.EDQUOT}
_BAD_PATH = {errno.ENOENT, errno.EACCES, errno.EPERM, errno.EROFS, errno.EISDIR, errno.ENOTDIR, errno.EEXIST,
             errno.ENAMETOOLONG}

_COMMAND_MODULES: tuple[str, ...] = (
    "cameo_corr.demo",
    "cameo_corr.datasets.synthetic",
    "cameo_corr.job.cli",
    "cameo_corr.cache.cli",
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
    _name_commands(parser)
    return parser


def subcommand_parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """Every parser below ``parser`` that runs a command (the leaves of the subcommand tree)."""
    found: list[argparse.ArgumentParser] = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):  # aliases map to the same parser
                found += subcommand_parsers(child) or [child]
    return found


def _name_commands(parser: argparse.ArgumentParser) -> None:
    """Record each command's name (``cache viz``) in its namespace, for error messages."""
    for leaf in subcommand_parsers(parser):
        leaf.set_defaults(command_name=leaf.prog)


def describe_os_error(e: OSError) -> tuple[str, int]:
    """``(<what>, <where>`` message, exit code) of an ``OSError`` that reached the command line."""
    what = (e.strerror or str(e)).lower()
    where = e.filename if e.filename2 is None else f"{e.filename} -> {e.filename2}"
    if e.errno in _DISK_FULL:
        where = where if where is not None else "while writing output"
        code = EXIT_FAILED
    else:
        code = EXIT_USAGE if e.errno in _BAD_PATH and where is not None else EXIT_FAILED
    return (what if where is None else f"{what}, {where}"), code


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``cameo-corr`` console script (see the module docstring for exit codes)."""
    prog = "cameo-corr"
    try:
        try:
            args = build_parser().parse_args(argv)
        except SystemExit:  # --help or a usage error: argparse printed and exits; surface a closed pipe now
            sys.stdout.flush()
            raise
        prog = getattr(args, "command_name", prog)
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # a closed pipe shows up here, not at interpreter exit
        return code
    except BrokenPipeError:
        # The reader went away (`| head`): stop quietly. Point stdout at /dev/null so the interpreter's
        # final flush of what is still buffered cannot fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except KeyboardInterrupt as e:  # a handler may say what survives the interruption
        _report(prog, "; ".join(["interrupted", *map(str, e.args)]))
        return EXIT_INTERRUPTED
    except CommandError as e:
        _report(prog, f"error: {e}")
        return e.exit_code
    except CameoCorrError as e:
        _report(prog, f"error: {e}")
        return EXIT_USAGE
    except OSError as e:
        message, code = describe_os_error(e)
        _report(prog, f"error: {message}")
        return code
    except Exception as e:
        from cameo_corr.cache.location import store_errors  # not at the top: it imports zarr

        if not isinstance(e, store_errors()):  # a bug: its traceback
            raise
        _report(prog, f"error: object store: {e}")  # botocore's errors: the text names the URL
        return EXIT_FAILED


def _report(prog: str, text: str) -> None:
    """Print ``<prog>: <text>`` on stderr as one line (newlines in a message are folded)."""
    try:
        print(f"{prog}: {' '.join(text.split())}", file=sys.stderr, flush=True)
    except OSError:  # stderr itself is gone: nothing left to tell
        pass


__all__ = [
    "EXIT_USAGE",
    "EXIT_FAILED",
    "EXIT_INTERRUPTED",
    "EXIT_BROKEN_PIPE",
    "CommandError",
    "UsageError",
    "RunFailed",
    "build_parser",
    "subcommand_parsers",
    "describe_os_error",
    "main",
]
