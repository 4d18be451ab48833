"""Exceptions raised by the data layer (image preprocessing, dataset readers, sources and pipelines)."""

from __future__ import annotations

from pathlib import Path

from etils import epath

from elva_jax.errors import UserError

__all__ = [
    "DataFormatError",
    "DataStateMismatch",
    "ImageError",
    "RecordError",
    "ShardRecordError",
    "SkippedFractionError",
    "SourceError",
    "utf8_lines",
]


class ImageError(UserError, ValueError):
    """An image cannot be preprocessed (aspect ratio > 200, empty, unsupported dtype/layout, unreadable)."""


class RecordError(UserError, ValueError):
    """A record that cannot be used (no positive, a candidate id missing from the pool); names its id."""


class SourceError(UserError, ValueError):
    """A data root that does not fit the chosen source (no manifest, another backend, an unknown table)."""


class SkippedFractionError(UserError, RuntimeError):
    """More records were dropped for bad images than the policy's ``max_skip_fraction`` allows."""


class DataStateMismatch(UserError, ValueError):
    """A saved data position that does not belong to this run's records / shuffle seed."""


class ShardRecordError(UserError, ValueError):
    """A prepared record (HF datasets row, ArrayRecord record) that cannot be read. The message is
    ``"{where}: {reason}"``, where names the shard (or dataset directory) and the record's index in it."""

    def __init__(self, where: str, reason: str):
        self.where, self.reason = where, reason
        super().__init__(f"{where}: {reason}")

    def __reduce__(self):
        return (type(self), (self.where, self.reason))


class DataFormatError(UserError, ValueError):
    """A dataset file is malformed. The message is ``"{path}, line {line}: {reason}"`` (line is 1-based).

    Attributes:
      path: the offending file, as a string.
      line: 1-based line number of the offending record (for file-level problems such as an empty pool,
        the line just past the end of the file).
      reason: the bare description, without path and line.
    """

    def __init__(self, path: str | Path, line: int, reason: str):
        self.path = str(path)
        self.line = int(line)
        self.reason = reason
        super().__init__(f"{self.path}, line {self.line}: {reason}")

    def __reduce__(self):  # keep picklable (multiprocessing data loaders) despite the custom __init__
        return (type(self), (self.path, self.line, self.reason))


def utf8_lines(path: str | Path):
    """Yield (1-based line number, text) of a UTF-8 file; a line that is not valid UTF-8 raises a
    DataFormatError naming the file, the line and the offending byte."""
    with epath.Path(path).open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                yield lineno, raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataFormatError(
                    path, lineno, f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at byte {e.start} of the line)"
                ) from None
