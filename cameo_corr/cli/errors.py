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


__all__ = ["EXIT_USAGE", "EXIT_FAILED", "EXIT_INTERRUPTED", "EXIT_BROKEN_PIPE", "CommandError", "UsageError", "RunFailed"]
