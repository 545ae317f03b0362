"""The trajectory schema (docs/design.md): a task and an ordered list of typed segments.

A segment's `text` holds the content only; the markers that a template puts around it
("Thought: ", "Action: ", a chat role header) are the renderer's business.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from collections.abc import Iterable, Iterator
from typing import Any

from sad_jax.common import fileio
from sad_jax.common.errors import DataError, SkipReport
from sad_jax.common.fileio import atomic_write
from sad_jax.common.types import SEGMENT_KINDS

SCHEMA_VERSION = 1
ACTION_FORMATS = ("react", "code", "json")


@dataclasses.dataclass(frozen=True)
class Segment:
  kind: str
  text: str

  def to_dict(self) -> dict[str, str]:
    return {"kind": self.kind, "text": self.text}


@dataclasses.dataclass
class Trajectory:
  """One agent episode. `task` is also the first `task` segment's text."""

  id: str
  segments: list[Segment]
  source: str = ""
  success: bool | None = None
  meta: dict[str, Any] = dataclasses.field(default_factory=dict)

  @property
  def task(self) -> str:
    return next((s.text for s in self.segments if s.kind == "task"), "")

  @property
  def action_format(self) -> str:
    return self.meta.get("action_format", "react")

  def count(self, kind: str) -> int:
    return sum(s.kind == kind for s in self.segments)

  def validate(self) -> None:
    """Raises DataError (field = segment index) on a schema violation."""
    if not isinstance(self.id, str) or not self.id:
      raise DataError("id must be a non-empty string", field="id")
    if not self.segments:
      raise DataError("trajectory has no segments", field="segments")
    for i, seg in enumerate(self.segments):
      if seg.kind not in SEGMENT_KINDS:
        raise DataError(
            f"unknown segment kind {seg.kind!r}; expected one of {', '.join(SEGMENT_KINDS)}",
            field=f"segments[{i}].kind",
        )
      if not isinstance(seg.text, str):
        raise DataError("text must be a string", field=f"segments[{i}].text")
      if seg.kind in ("reason", "action", "answer", "task") and not seg.text.strip():
        raise DataError(f"empty {seg.kind}", field=f"segments[{i}].text")
    if not any(s.kind in ("action", "answer") for s in self.segments):
      raise DataError("trajectory has no action or answer", field="segments")
    if self.action_format not in ACTION_FORMATS:
      raise DataError(
          f"unknown action_format {self.action_format!r}; expected one of {ACTION_FORMATS}",
          field="meta.action_format",
      )

  def to_dict(self) -> dict[str, Any]:
    return {
        "id": self.id,
        "source": self.source,
        "success": self.success,
        "meta": self.meta,
        "segments": [s.to_dict() for s in self.segments],
    }

  @classmethod
  def from_dict(cls, d: Any) -> Trajectory:
    if not isinstance(d, dict):
      raise DataError(f"expected a JSON object, got {type(d).__name__}")
    for key in ("id", "segments"):
      if key not in d:
        raise DataError("missing field", field=key)
    if not isinstance(d["segments"], list):
      raise DataError("must be a list", field="segments")
    segments = []
    for i, s in enumerate(d["segments"]):
      if not isinstance(s, dict):
        raise DataError("must be an object", field=f"segments[{i}]")
      for key in ("kind", "text"):
        if key not in s:
          raise DataError("missing field", field=f"segments[{i}].{key}")
      segments.append(Segment(kind=s["kind"], text=s["text"]))
    success = d.get("success")
    if success is not None and not isinstance(success, bool):
      raise DataError("must be true, false or null", field="success")
    meta = d.get("meta") or {}
    if not isinstance(meta, dict):
      raise DataError("must be an object", field="meta")
    traj = cls(id=d["id"], segments=segments, source=str(d.get("source", "")),
               success=success, meta=meta)
    traj.validate()
    return traj


def content_id(segments: Iterable[Segment]) -> str:
  """A stable id from the content, so that one episode gets one id in every format."""
  h = hashlib.sha256()
  for s in segments:
    h.update(s.kind.encode())
    h.update(b"\0")
    h.update(s.text.strip().encode())
    h.update(b"\0")
  return h.hexdigest()[:16]


def iter_records(path: str | os.PathLike) -> Iterator[tuple[int, Any]]:
  """Yields (record number, parsed JSON or DataError) from a JSON document or JSONL file.

  A file that parses as one JSON value is a JSON document, whatever its layout (pretty
  printed or on one line): an array yields its elements (record = 1-based position), any
  other value is one record (an importer may read an object as a mapping of records).
  Otherwise it is JSONL (record = 1-based line), except when its first line is an
  unfinished value that later lines continue, as in a multi-line document: that file is
  a broken document and raises with the line. A JSONL line with undecodable bytes or
  malformed JSON is yielded as a DataError naming it (callers raise or skip it).
  """
  path = os.fspath(path)
  if not path:
    raise DataError("empty input path (set the input file)")
  try:
    data = fileio.read_bytes(path)
  except OSError as e:
    raise DataError(f"cannot read: {e.strerror or e}", path=path) from None
  probe = data.decode("utf-8", errors="replace")  # bad bytes are reported below, per layout
  if probe.strip():
    try:
      doc = json.loads(probe)
    except json.JSONDecodeError as e:
      if _unfinished_first_line(probe):
        raise DataError(f"malformed JSON at line {e.lineno}: {e.msg} (column {e.colno})",
                        path=path) from None
    else:
      yield from _document_records(data, doc, path)
      return
  for lineno, raw in enumerate(data.split(b"\n"), start=1):
    if not raw.strip():
      continue
    try:
      line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
      yield lineno, DataError(f"undecodable bytes at byte {e.start}: {e.reason}",
                              path=path, record=lineno)
      continue
    try:
      rec = json.loads(line)
    except json.JSONDecodeError as e:
      rec = DataError(f"malformed JSON: {e.msg} (column {e.colno})", path=path, record=lineno)
    else:
      if _SURROGATE_ESCAPE.search(line) and _lone_surrogate(rec):
        rec = DataError(_SURROGATE_MESSAGE, path=path, record=lineno)
    yield lineno, rec


def _unfinished_first_line(text: str) -> bool:
  """True when the first non-blank line starts a value that goes on in the lines after
  it (a pretty-printed document's `[` or `{`); false when that line is a whole value,
  breaks off inside the line, or is the only line (a JSONL record)."""
  lines = [line.strip() for line in text.split("\n") if line.strip()]
  try:
    json.loads(lines[0])
  except json.JSONDecodeError as e:
    return e.pos >= len(lines[0]) and len(lines) > 1
  return False


def _document_records(data: bytes, doc: Any, path: str) -> Iterator[tuple[int, Any]]:
  try:
    text = data.decode("utf-8")
  except UnicodeDecodeError as e:
    line = data[: e.start].count(b"\n") + 1
    raise DataError(f"undecodable bytes at line {line}: {e.reason}", path=path) from None
  escapes = _SURROGATE_ESCAPE.search(text) is not None  # once: the file may be large
  for i, rec in enumerate(doc if isinstance(doc, list) else [doc], start=1):
    yield i, (DataError(_SURROGATE_MESSAGE, path=path, record=i)
              if escapes and _lone_surrogate(rec) else rec)


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")
_SURROGATE_MESSAGE = ("a \\uD800–\\uDFFF escape that is not half of a pair (a lone "
                      "surrogate, not a character)")


def _lone_surrogate(parsed: Any) -> bool:
  """True when a \\uD8xx escape decoded to a lone UTF-16 surrogate, which no UTF-8 file can
  hold (pairs, as ensure_ascii writes emoji, decode to one character and are fine)."""
  try:
    json.dumps(parsed, ensure_ascii=False).encode("utf-8")
  except UnicodeEncodeError:
    return True
  return False


def read_jsonl(path: str | os.PathLike, *, skips: SkipReport | None = None) -> list[Trajectory]:
  """Reads trajectories in the schema; errors name file, line and field."""
  skips = skips or SkipReport()
  out = []
  for lineno, rec in iter_records(path):
    try:
      if isinstance(rec, DataError):
        raise rec
      out.append(Trajectory.from_dict(rec))
    except DataError as e:
      skips.handle(e.located(path=path, record=lineno))
  return out


def write_jsonl(path: str | os.PathLike, trajectories: Iterable[Trajectory]) -> int:
  """Writes atomically; returns the number written."""
  n = 0
  with atomic_write(path) as f:
    for t in trajectories:
      f.write(json.dumps(t.to_dict(), ensure_ascii=False) + "\n")
      n += 1
  return n
