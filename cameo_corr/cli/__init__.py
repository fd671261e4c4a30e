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
* an object store's error: one line ``error: object store: <what>, <where>``, ``<where>`` being the
  object-store location(s) the command opened (s3fs's errors for a 403 or a missing bucket name no
  key). A refused request (403), a missing bucket and missing credentials exit 2 (bad input, as a
  local path above); a store that does not answer (botocore's connection and timeout errors, which
  s3fs passes through) exits 1;
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
import warnings
from typing import Any, Callable, NoReturn

from cameo_corr.cli.errors import (
    EXIT_BROKEN_PIPE,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    CommandError,
    RunFailed,
    UsageError,
    forget_stores,
    noted_stores,
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


class _Parser(argparse.ArgumentParser):
    """argparse's parser whose usage errors (a missing argument, a bad ``--grid`` value, an unknown flag)
    are one line, ``<command>: error: <what>``, exit 2, like every other bad input; ``--help`` shows the
    usage. Subcommand parsers are of this class too (argparse makes them of their parent's)."""

    def error(self, message: str) -> "NoReturn":
        self.exit(EXIT_USAGE, f"{self.prog}: error: {' '.join(message.split())}\n")


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every registered subcommand."""
    parser = _Parser(
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


def parse_command(argv: list[str] | None) -> argparse.Namespace:
    """``build_parser().parse_args(argv)``, with an unrecognized argument reported by the command's own
    parser (``cameo-corr preprocess: error: unrecognized arguments: ...``, not the top level's)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        leaf = next((p for p in subcommand_parsers(parser) if p.prog == getattr(args, "command_name", None)), parser)
        leaf.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def _name_commands(parser: argparse.ArgumentParser) -> None:
    """Record each command's name (``cache viz``) in its namespace, for error messages."""
    for leaf in subcommand_parsers(parser):
        leaf.set_defaults(command_name=leaf.prog)


_BAD_PATH_TYPES = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError)
"""Errors of a bad path also when built without an errno (s3fs builds them from the message only)."""


def describe_os_error(e: OSError, where: str | None = None) -> tuple[str, int]:
    """``(<what>, <where>`` message, exit code) of an ``OSError`` that reached the command line;
    ``where`` stands for the error's file name when it has none (an object store's error)."""
    what = (e.strerror or str(e)).lower()
    if e.filename is not None:
        where = e.filename if e.filename2 is None else f"{e.filename} -> {e.filename2}"
    bad_path = e.errno in _BAD_PATH or (e.errno is None and isinstance(e, _BAD_PATH_TYPES))
    if e.errno in _DISK_FULL:
        where = where if where is not None else "while writing output"
        code = EXIT_FAILED
    else:
        code = EXIT_USAGE if bad_path and where is not None else EXIT_FAILED
    return (what if where is None else f"{what}, {where}"), code


_CREDENTIAL_ERRORS = frozenset({"NoCredentialsError", "PartialCredentialsError", "ProfileNotFound"})
"""botocore's errors of missing or incomplete credentials: bad input (exit 2), as a refused request."""


def _is_botocore(e: BaseException | None) -> bool:
    """Whether ``e`` is botocore's error (s3fs passes connection, timeout and credential errors through,
    and translates the others into an ``OSError`` caused by one)."""
    return e is not None and type(e).__module__.split(".")[0] == "botocore"


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``cameo-corr`` console script (see the module docstring for exit codes)."""
    forget_stores()
    running = {"prog": "cameo-corr"}  # the command's name once parsed, for errors and warnings
    with warnings.catch_warnings():  # restored on return (main may run in a caller's process)
        warnings.showwarning = _one_line_warning(running)
        return _run(argv, running)


def _one_line_warning(running: dict[str, str]) -> Callable[..., None]:
    """A ``warnings.showwarning`` printing this package's warnings as ``<command>: warning: <text>`` (one
    line, no source line); other packages' keep Python's format."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    default = warnings.showwarning

    def show(message: Warning | str, category: type[Warning], filename: str, lineno: int, file: Any = None,
             line: str | None = None) -> None:
        if os.path.abspath(filename).startswith(package + os.sep):
            _report(running["prog"], f"warning: {message}")
        else:
            default(message, category, filename, lineno, file, line)

    return show


def _run(argv: list[str] | None, running: dict[str, str]) -> int:
    """:func:`main`'s body: parse, run the command, turn what it raises into one line and an exit code."""
    prog = running["prog"]
    try:
        try:
            args = parse_command(argv)
        except SystemExit:  # --help or a usage error: argparse printed and exits; surface a closed pipe now
            sys.stdout.flush()
            raise
        prog = running["prog"] = getattr(args, "command_name", prog)
        # what a cache this command writes records: the process's command line, or ``cameo-corr`` + ``argv``
        args.command_line = list(sys.argv) if argv is None else ["cameo-corr", *argv]
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
    except Exception as e:
        if _is_botocore(e):  # botocore's own (some are OSErrors too: a read timeout); its text may name the endpoint
            stores = noted_stores()
            _report(prog, f"error: object store: {e}{f', {stores}' if stores else ''}")
            return EXIT_USAGE if type(e).__name__ in _CREDENTIAL_ERRORS else EXIT_FAILED
        if not isinstance(e, OSError):  # a bug: its traceback
            raise
        stores = noted_stores() if e.filename is None and _is_botocore(e.__cause__) else None
        message, code = describe_os_error(e, stores)
        _report(prog, f"error: {'object store: ' if stores else ''}{message}")
        return code


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
    "parse_command",
    "subcommand_parsers",
    "describe_os_error",
    "main",
]
