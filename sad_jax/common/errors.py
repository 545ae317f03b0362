"""Errors that name the place of bad input, and the skip policy that counts them."""

from __future__ import annotations

import dataclasses
import os
from typing import Literal

OnError = Literal["raise", "skip"]


class SadJaxError(Exception):
  """Base class for errors reported to the user without a traceback."""


class DiskFull(SadJaxError):
  """No space left where we write; says what is intact and how to go on."""


class DataError(SadJaxError):
  """Bad input, located by file, record (1-based line or record number) and field."""

  def __init__(
      self,
      message: str,
      *,
      path: str | os.PathLike | None = None,
      record: int | None = None,
      field: str | None = None,
  ):
    self.message = message
    self.path = None if path is None else os.fspath(path)
    self.record = record
    self.field = field
    super().__init__(self.__str__())

  def located(self, *, path=None, record=None, field=None) -> DataError:
    """Returns a copy with missing location parts filled in."""
    return DataError(
        self.message,
        path=self.path if self.path is not None else path,
        record=self.record if self.record is not None else record,
        field=self.field if self.field is not None else field,
    )

  def __str__(self) -> str:
    where = []
    if self.path is not None:
      where.append(str(self.path))
    if self.record is not None:
      where.append(f"record {self.record}")
    if self.field is not None:
      where.append(f"field {self.field!r}")
    return (", ".join(where) + ": " if where else "") + self.message


@dataclasses.dataclass
class SkipReport:
  """Counts records skipped under `--on-error skip` and keeps the first reasons."""

  on_error: OnError = "raise"
  max_reasons: int = 5
  count: int = 0
  reasons: list[str] = dataclasses.field(default_factory=list)

  def handle(self, err: DataError) -> None:
    """Raises `err` under the raise policy, else records it."""
    if self.on_error == "raise":
      raise err
    self.count += 1
    if len(self.reasons) < self.max_reasons:
      self.reasons.append(str(err))

  def summary(self) -> str:
    if not self.count:
      return "skipped 0 records"
    lines = [f"skipped {self.count} records; first reasons:"]
    lines += [f"  - {r}" for r in self.reasons]
    return "\n".join(lines)
