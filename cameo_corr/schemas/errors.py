"""The errors this package raises on purpose: every one names the file (or value) and the field."""

from __future__ import annotations


class CameoCorrError(Exception):
    """Base class of every error this package raises on purpose.

    Picklable whatever a subclass's ``__init__`` takes (its message and attributes are restored without
    calling it), so an error raised in a Ray task or a worker process reaches the caller as itself."""

    def __reduce__(self) -> tuple:
        return _restore_error, (type(self), self.args, self.__dict__)


def _restore_error(cls: type[CameoCorrError], args: tuple, state: dict) -> CameoCorrError:
    """Unpickle a :class:`CameoCorrError`: ``args`` (the message) and attributes, ``__init__`` not called."""
    error = cls.__new__(cls, *args)  # BaseException.__new__ sets ``args``
    error.__dict__.update(state)
    return error


class SchemaError(CameoCorrError, ValueError):
    """A value does not match the contract. ``field`` names the offending field."""

    def __init__(self, field: str, message: str, *, where: str | None = None) -> None:
        self.field = field
        self.where = where
        self.message = message
        prefix = f"{where}: " if where else ""
        super().__init__(f"{prefix}field '{field}': {message}")


class DatasetError(CameoCorrError, ValueError):
    """Bad dataset input. Names the file and, where known, the line and the field.

    ``scene_id`` is set when the error concerns one scene only, so callers can record the scene as
    failed and continue with the next one.
    """

    def __init__(
        self,
        path: str,
        message: str,
        *,
        line: int | None = None,
        field: str | None = None,
        scene_id: str | None = None,
    ) -> None:
        self.path = str(path)
        self.line = line
        self.field = field
        self.scene_id = scene_id
        loc = self.path
        if line is not None:
            loc += f":{line}"
        if field is not None:
            loc += f" [{field}]"
        super().__init__(f"{loc}: {message}")


__all__ = ["CameoCorrError", "SchemaError", "DatasetError"]
