"""The command line's errors and exit codes.

Command handlers (and the code they drive, such as the preprocessing job's option checks) raise these;
:func:`cameo_corr.cli.main`, the one error layer, turns them into one line on stderr and the exit code.
This module imports nothing but the error base class, so every layer may raise them.
"""

from __future__ import annotations

from cameo_corr.schemas import CameoCorrError

EXIT_USAGE = 2
EXIT_FAILED = 1
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141


_STORES: dict[str, None] = {}
"""The object-store locations this command opened, in order (:func:`note_store`)."""


def note_store(url: str) -> None:
    """Record that this process opened the object-store location ``url``. An object store's error often
    names no key (s3fs's ``PermissionError`` for a 403, a missing bucket, botocore's credential errors):
    the command line then names the locations noted here (:func:`noted_stores`)."""
    _STORES.setdefault(url, None)


def noted_stores() -> str | None:
    """The object-store locations noted since :func:`forget_stores`: ``url``, ``one of url, url``, or ``None``."""
    urls = list(_STORES)
    if not urls:
        return None
    return urls[0] if len(urls) == 1 else "one of " + ", ".join(urls)


def forget_stores() -> None:
    """Start a new command: forget the locations noted by an earlier one (in the same process)."""
    _STORES.clear()


class CommandError(CameoCorrError):
    """An error a command reports as ``<what>, <where>`` and exits with :attr:`exit_code`."""

    exit_code = EXIT_USAGE

    def __init__(self, what: str, where: str | None = None) -> None:
        self.what = what
        self.where = where
        super().__init__(f"{what}, {where}" if where else what)


class UsageError(CommandError):
    """A bad command-line value or input (exit 2); ``where`` names the option, file or cache."""


class RunFailed(CommandError):
    """The input was accepted but the run failed to produce its result (exit 1)."""

    exit_code = EXIT_FAILED


__all__ = ["EXIT_USAGE", "EXIT_FAILED", "EXIT_INTERRUPTED", "EXIT_BROKEN_PIPE", "CommandError", "UsageError", "RunFailed",
           "note_store", "noted_stores", "forget_stores"]
