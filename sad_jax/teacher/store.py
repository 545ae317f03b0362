"""The teacher-logit store: per trajectory, the teacher's top-k log-probs at the target
positions the loss needs, in ArrayRecord shards with a manifest (docs/design.md).

Layout of a store folder:
  manifest.json                    written last: teacher, k, τ, vocab sizes, tokenizer and
                                   dataset fingerprints, span kinds, dtypes, format version,
                                   and per shard its split, example ids, bytes and sha256
  {split}-{i:05d}.arrayrecord      one record per trajectory (a shard appears under its
                                   name only once complete: written as .tmp, then renamed)
  {split}-{i:05d}.done.json        the shard's completion marker: ids, bytes, sha256

On an object store (gs://) a shard is written locally, uploaded (an object appears only
once whole), then its marker is uploaded; readers take a shard only with its marker and
the size it names, and a store only with its manifest, so the order "data, then marker,
then manifest" keeps a partial precompute from being taken as complete. ArrayRecord reads
gs:// itself (its GCS reader), so shards are read in place.

A record holds `positions` int32[n] — the input positions t whose next token (t+1) is a
target of the covered span kinds — and the top-k ids [n, k] (uint16 when the vocabulary
fits, else uint32) and log-probs [n, k] normalised over the teacher's full vocabulary at
temperature τ (float16 by default; bfloat16; or int8 with a float32 scale per row).

A sampled store (manifest `sampling: "sampled"`, format_version 2) holds instead, per
position, the outcome of N = k draws from the teacher's full distribution at τ: its
distinct ids and their counts, ragged (a record: positions, distinct-per-position, ids,
counts — uint8 counts when N < 256), so the bytes grow with the distinct ids, not with N;
the counts are exact (logp_dtype does not apply). Read, it is the same [n, k] TopK as a
top-k store: the distinct ids with log(count / N), most frequent first, then k − distinct
padding slots (id 0, log-prob PAD_LOGP, whose exp is exactly 0 in float32, so they weigh
nothing in any sum or gradient). p̂ = count/N is an unbiased estimate of p; the loss must
use it as a whole distribution (fkl, tail=ignore), which training enforces.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import struct
import tempfile
from collections.abc import Iterable, Sequence
from typing import Any

import ml_dtypes
import numpy as np

from sad_jax.common import cloud, fileio
from sad_jax.common.errors import DataError, SadJaxError
from sad_jax.common.types import SpanKind

FORMAT_VERSION = 1          # top-k stores (older readers keep reading them)
SAMPLED_FORMAT_VERSION = 2  # sampled stores: older readers refuse them, not misuse them
LOGP_DTYPES = ("float16", "bfloat16", "int8")
SAMPLINGS = ("topk", "sampled")
# log-prob of a sampled store's padding slots (float32 on read): exp() is exactly 0, so a
# slot adds 0 to Σp, to the loss and to its gradient; finite, so no inf·0 = NaN anywhere
PAD_LOGP = -1e4
_MAGIC = b"SADT"
_MAGIC_SAMPLED = b"SADS"
_LOGP_CODE = {"float16": 0, "bfloat16": 1, "int8": 2}
_CODE_LOGP = {v: k for k, v in _LOGP_CODE.items()}


@dataclasses.dataclass
class TopK:
  """One trajectory's teacher top-k."""

  id: str
  positions: np.ndarray   # int32[n]
  ids: np.ndarray         # int32[n, k] (widened on read)
  logp: np.ndarray        # float32[n, k] (dequantised on read)


def span_kind_ids(names: Sequence[str]) -> list[int]:
  """Span kind names → SpanKind values; DataError (field span_kinds) on an unknown one."""
  try:
    return [int(SpanKind.from_name(s)) for s in names]
  except (ValueError, AttributeError) as e:
    raise DataError(str(e), field="span_kinds") from None


def id_dtype(vocab_size: int):
  return np.uint16 if vocab_size <= 65536 else np.uint32


def encode_record(rec: TopK, *, vocab_size: int, logp_dtype: str) -> bytes:
  n, k = rec.ids.shape
  ident = rec.id.encode()
  idt = id_dtype(vocab_size)
  parts = [_MAGIC, struct.pack("<IIIBB", len(ident), n, k, np.dtype(idt).itemsize,
                               _LOGP_CODE[logp_dtype]), ident,
           np.asarray(rec.positions, "<i4").tobytes(), np.asarray(rec.ids, idt).tobytes()]
  logp = np.asarray(rec.logp, np.float32)
  if logp_dtype == "float16":
    parts.append(logp.astype("<f2").tobytes())
  elif logp_dtype == "bfloat16":
    parts.append(logp.astype(ml_dtypes.bfloat16).tobytes())
  else:  # int8 with a per-row scale: logp ≈ q · scale, q ∈ [−127, 0]
    lo = np.minimum(logp.min(axis=-1, keepdims=True), -1e-8)
    scale = (-lo / 127.0).astype(np.float32)
    q = np.clip(np.round(logp / scale), -127, 0).astype(np.int8)
    parts += [scale.astype("<f4").tobytes(), q.tobytes()]
  return b"".join(parts)


def _count_dtype(draws: int):
  return np.uint8 if draws < 256 else np.uint16


def encode_sampled(ident: str, positions: np.ndarray, ids_pn: np.ndarray, counts_pn: np.ndarray,
                   *, vocab_size: int, draws: int) -> bytes:
  """A sampled record from slot arrays [n, N] (counts 0 on padding slots, which come last)."""
  n, k = ids_pn.shape
  counts_pn = np.asarray(counts_pn)
  live = counts_pn > 0
  if draws > 65535 or not (counts_pn.sum(-1) == draws).all():
    raise ValueError(f"counts must sum to draws={draws} (< 65536) per position")
  idt, cdt = id_dtype(vocab_size), _count_dtype(draws)
  raw = ident.encode()
  return b"".join([
      _MAGIC_SAMPLED, struct.pack("<IIIBB", len(raw), n, k, np.dtype(idt).itemsize,
                                  np.dtype(cdt).itemsize), raw,
      np.asarray(positions, "<i4").tobytes(), live.sum(-1).astype(cdt).tobytes(),
      np.asarray(ids_pn)[live].astype(idt).tobytes(), counts_pn[live].astype(cdt).tobytes()])


def sampled_logp(counts_pn: np.ndarray, draws: int) -> np.ndarray:
  """float32 log(count / draws), PAD_LOGP where the count is 0."""
  c = np.asarray(counts_pn)
  return np.where(c > 0, np.log(np.maximum(c, 1) / draws), PAD_LOGP).astype(np.float32)


def _header(blob: bytes) -> tuple[str, np.ndarray, int, int, int, int, int]:
  """(id, positions, n, k, id bytes, code, offset after the positions): the layout both
  record kinds share after their magic."""
  len_id, n, k, id_size, code = struct.unpack_from("<IIIBB", blob, 4)
  off = 4 + struct.calcsize("<IIIBB")
  ident = blob[off: off + len_id].decode()
  off += len_id
  return ident, np.frombuffer(blob, "<i4", n, off), n, k, id_size, code, off + 4 * n


def _decode_sampled(blob: bytes, where: str) -> TopK:
  ident, positions, n, k, id_size, count_size, off = _header(blob)
  cdt = {1: np.uint8, 2: np.dtype("<u2")}[count_size]
  distinct = np.frombuffer(blob, cdt, n, off).astype(np.int64)
  off += count_size * n
  total = int(distinct.sum())
  if (distinct > k).any() or (n and distinct.min() < 1):
    raise ValueError("distinct ids per position outside [1, k]")
  idt = {2: np.dtype("<u2"), 4: np.dtype("<u4")}[id_size]
  flat_ids = np.frombuffer(blob, idt, total, off)
  off += id_size * total
  flat_counts = np.frombuffer(blob, cdt, total, off)
  off += count_size * total
  if off != len(blob):
    raise DataError(f"teacher record has {len(blob) - off} trailing bytes", path=where)
  live = np.arange(k) < distinct[:, None]  # row-major fill puts each row's ids first
  ids = np.zeros((n, k), np.int32)
  counts = np.zeros((n, k), np.int64)
  ids[live], counts[live] = flat_ids, flat_counts
  sums = counts.sum(-1)
  if n and not (sums == sums[0]).all():
    raise DataError("sampled record: draw counts differ between positions", path=where,
                    field="counts")
  return TopK(ident, positions.astype(np.int32), ids,
              sampled_logp(counts, int(sums[0]) if n else 1))


def decode_record(blob: bytes, *, where: str = "store") -> TopK:
  if blob[:4] == _MAGIC_SAMPLED:
    try:
      return _decode_sampled(blob, where)
    except (struct.error, ValueError, KeyError, UnicodeDecodeError) as e:
      raise DataError(f"truncated or corrupt sampled teacher record: {e}", path=where) from None
  if blob[:4] != _MAGIC:
    raise DataError("not a teacher top-k record (bad magic)", path=where)
  try:
    ident, positions, n, k, id_size, code, off = _header(blob)
    idt = {2: np.uint16, 4: np.uint32}[id_size]
    ids = np.frombuffer(blob, idt, n * k, off).reshape(n, k).astype(np.int32)
    off += id_size * n * k
    kind = _CODE_LOGP[code]
    if kind == "float16":
      logp = np.frombuffer(blob, "<f2", n * k, off).reshape(n, k).astype(np.float32)
      off += 2 * n * k
    elif kind == "bfloat16":
      logp = np.frombuffer(blob, ml_dtypes.bfloat16, n * k, off).reshape(n, k).astype(
          np.float32)
      off += 2 * n * k
    else:
      scale = np.frombuffer(blob, "<f4", n, off).reshape(n, 1)
      off += 4 * n
      logp = np.frombuffer(blob, np.int8, n * k, off).reshape(n, k).astype(np.float32) * scale
      off += n * k
  except (struct.error, ValueError, KeyError, UnicodeDecodeError) as e:
    raise DataError(f"truncated or corrupt teacher record: {e}", path=where) from None
  if off != len(blob):
    raise DataError(f"teacher record has {len(blob) - off} trailing bytes", path=where)
  return TopK(ident, positions.astype(np.int32), ids, logp)


# ----------------------------------------------------------------------------- manifest


@dataclasses.dataclass
class Manifest:
  teacher: str
  k: int
  temperature: float
  vocab_size: int                  # the student's (ids are below it)
  teacher_vocab_size: int
  tokenizer_fingerprint: str
  dataset_fingerprint: str
  span_kinds: list[str]
  logp_dtype: str = "float16"
  format_version: int = FORMAT_VERSION
  shards: list[dict[str, Any]] = dataclasses.field(default_factory=list)
  sampling: str = "topk"           # "sampled": k draws per position (module docstring)
  seed: int | None = None          # of a sampled store's draws

  @property
  def sampled(self) -> bool:
    return self.sampling == "sampled"

  def to_json(self) -> str:
    d = dataclasses.asdict(self)
    if not self.sampled:  # a top-k store's manifest stays what format 1 wrote
      del d["sampling"], d["seed"]
    return json.dumps(d, indent=1)

  @classmethod
  def read(cls, folder: str) -> Manifest:
    path = fileio.join(folder, "manifest.json")
    try:
      d = json.loads(fileio.read_text(path))
    except FileNotFoundError:
      raise DataError("not a teacher store (no manifest.json; an interrupted precompute "
                      "leaves none: rerun it)", path=folder) from None
    except (OSError, ValueError) as e:
      raise DataError(f"cannot read the manifest: {e}", path=path) from None
    if not isinstance(d, dict):
      raise DataError(f"manifest must be a JSON object, got {type(d).__name__}", path=path)
    versions = (FORMAT_VERSION, SAMPLED_FORMAT_VERSION)
    if d.get("format_version") not in versions:
      raise DataError(f"format_version {d.get('format_version')!r} is not one of {versions}",
                      path=path, field="format_version")
    try:
      m = cls(**d)
    except TypeError as e:
      raise DataError(f"bad manifest fields: {e}", path=path) from None
    m.check(path)
    return m

  def check(self, path: str) -> None:
    """Types and ranges of every field, so that readers never fail on a hand-edited or
    damaged manifest with a KeyError or TypeError far from it."""
    def bad(field: str, why: str):
      return DataError(why, path=path, field=field)

    for name, want in _MANIFEST_TYPES.items():
      value = getattr(self, name)
      if not isinstance(value, want) or isinstance(value, bool):
        raise bad(name, f"expected {_type_names(want)}, got {value!r}")
    for name in ("k", "vocab_size", "teacher_vocab_size", "temperature"):
      if getattr(self, name) <= 0:
        raise bad(name, f"must be positive, got {getattr(self, name)!r}")
    if self.logp_dtype not in LOGP_DTYPES:
      raise bad("logp_dtype", f"{self.logp_dtype!r} is not one of {LOGP_DTYPES}")
    if self.sampling not in SAMPLINGS:
      raise bad("sampling", f"{self.sampling!r} is not one of {SAMPLINGS}")
    want = SAMPLED_FORMAT_VERSION if self.sampled else FORMAT_VERSION
    if self.format_version != want:
      raise bad("format_version", f"a {self.sampling} store has format_version {want}, not "
                f"{self.format_version!r}")
    if self.sampled and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
      raise bad("seed", f"a sampled store needs an integer seed, got {self.seed!r}")
    try:
      span_kind_ids(self.span_kinds)
    except DataError as e:
      raise e.located(path=path) from None
    for i, shard in enumerate(self.shards):
      if not isinstance(shard, dict):
        raise bad(f"shards[{i}]", f"expected an object, got {shard!r}")
      for key, want in (("name", str), ("ids", list), ("bytes", int), ("sha256", str)):
        if not isinstance(shard.get(key), want):
          raise bad(f"shards[{i}].{key}", f"expected {_type_names(want)}, got "
                    f"{shard.get(key)!r}")
      if not all(isinstance(x, str) for x in shard["ids"]):
        raise bad(f"shards[{i}].ids", "example ids must be strings")


_MANIFEST_TYPES: dict[str, type | tuple[type, ...]] = {
    "teacher": str, "k": int, "temperature": (int, float), "vocab_size": int,
    "teacher_vocab_size": int, "tokenizer_fingerprint": str, "dataset_fingerprint": str,
    "span_kinds": list, "logp_dtype": str, "shards": list}


def _type_names(t: type | tuple[type, ...]) -> str:
  return " or ".join(x.__name__ for x in (t if isinstance(t, tuple) else (t,)))


def shard_name(split: str, index: int) -> str:
  return f"{split}-{index:05d}.arrayrecord"


def write_shard(folder: str, name: str, records: Iterable[bytes], ids: Sequence[str]) -> dict:
  """Writes one shard under a temporary name, then its marker, then renames it.
  Returns the marker (ids, bytes, sha256)."""
  from array_record.python import array_record_module

  marker_name = name.replace(".arrayrecord", ".done.json")
  remote = fileio.is_remote(folder)
  # ArrayRecord writes local files only: a remote shard is written here, then uploaded
  local_dir = tempfile.mkdtemp(prefix="sad_jax_shard_") if remote else folder
  try:
    # atomic_write drops a dead writer's temporaries of the marker (SIGKILL mid-write)
    tmp = os.path.join(local_dir, name + ".tmp")
    writer = array_record_module.ArrayRecordWriter(tmp, "group_size:1")
    for blob in records:
      writer.write(blob)
    writer.close()
    marker = {"name": name, "ids": list(ids), "bytes": os.path.getsize(tmp),
              "sha256": file_sha256(tmp)}
    if remote:  # no rename: the shard first, its marker last
      fileio.copyfile(tmp, fileio.join(folder, name))
    fileio.json_dump(fileio.join(folder, marker_name), marker)
    if not remote:
      os.replace(tmp, os.path.join(folder, name))
  finally:
    if remote:
      shutil.rmtree(local_dir, ignore_errors=True)
  return marker


def read_marker(folder: str, name: str) -> dict | None:
  """The completion marker of a shard that is complete on disk, else None."""
  path = fileio.join(folder, name.replace(".arrayrecord", ".done.json"))
  if not (fileio.exists(path) and fileio.exists(fileio.join(folder, name))):
    return None
  marker = json.loads(fileio.read_text(path))
  if fileio.getsize(fileio.join(folder, name)) != marker["bytes"]:
    return None
  return marker


def file_sha256(path: str) -> str:
  h = hashlib.sha256()
  with fileio.open_file(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


# ----------------------------------------------------------------------------- reader


class TeacherStore:
  """Random access by example id; nothing is loaded whole (one ArrayRecord reader per
  shard, opened on first use)."""

  def __init__(self, folder: str | os.PathLike):
    self.folder = os.fspath(folder)
    self.manifest = Manifest.read(self.folder)
    self._where: dict[str, tuple[int, int]] = {}
    for s, shard in enumerate(self.manifest.shards):
      for r, ident in enumerate(shard["ids"]):
        self._where[ident] = (s, r)
    self._readers: dict[int, Any] = {}

  def __len__(self) -> int:
    return len(self._where)

  def __contains__(self, example_id: str) -> bool:
    return example_id in self._where

  def ids(self) -> list[str]:
    return list(self._where)

  def _reader(self, s: int):
    if s not in self._readers:
      from array_record.python import array_record_module

      path = fileio.join(self.folder, self.manifest.shards[s]["name"])
      if not fileio.exists(path):
        raise DataError("shard listed in the manifest is missing", path=path)
      self._readers[s] = array_record_module.ArrayRecordReader(path, "readahead_buffer_size:0")
    return self._readers[s]

  def get(self, example_id: str) -> TopK:
    if example_id not in self._where:
      raise DataError(f"example {example_id!r} is not in the store", path=self.folder)
    s, r = self._where[example_id]
    m = self.manifest
    where = fileio.join(self.folder, m.shards[s]["name"])
    try:
      if fileio.is_remote(where):  # ArrayRecord's C++ client, under cloud's deadline
        blob = cloud.bounded(lambda: self._reader(s).read([r])[0], op=f"read record {r + 1}",
                             path=where)
      else:
        blob = self._reader(s).read([r])[0]
    except SadJaxError:
      raise
    except Exception as e:  # array_record raises RuntimeError on damaged files
      store = cloud.cpp_store_error(e, op=f"read record {r + 1}", path=where)
      if store is not None:
        raise store from None
      raise DataError(f"cannot read example {example_id!r}: {e}", path=where,
                      record=r + 1) from None
    try:
      rec = decode_record(blob, where=where)
    except DataError as e:
      raise e.located(record=r + 1) from None
    # what training would otherwise meet as a shape error, a clamped id or a NaN loss
    if rec.id != example_id:
      raise DataError(f"holds {rec.id!r}, not {example_id!r}", path=where, record=r + 1,
                      field="id")
    if rec.ids.shape[1] != m.k:
      raise DataError(f"example {example_id}: k is {rec.ids.shape[1]}, manifest says {m.k}",
                      path=where, record=r + 1, field="k")
    if rec.ids.size and rec.ids.max() >= m.vocab_size:
      raise DataError(f"example {example_id}: token id {int(rec.ids.max())} outside "
                      f"[0, {m.vocab_size})", path=where, record=r + 1, field="ids")
    if not np.isfinite(rec.logp).all():
      raise DataError(f"example {example_id}: non-finite log-prob", path=where, record=r + 1,
                      field="logp")
    return rec

  def close(self) -> None:
    for reader in self._readers.values():
      reader.close()
    self._readers.clear()


def gather(store: TeacherStore, rows: Sequence[Sequence[tuple[str, int]]], *, length: int,
           k: int | None = None) -> dict[str, np.ndarray]:
  """Teacher arrays aligned with a [B, T] token batch.

  rows[b] lists (example id, offset) for the trajectories packed into row b: the
  trajectory's token 0 sits at column `offset`. Returns ids_btk, logp_btk (float32) and
  mask_bt, where position t holds the teacher's distribution for token t+1.
  """
  k = k or store.manifest.k
  b = len(rows)
  ids = np.zeros((b, length, k), np.int32)
  logp = np.zeros((b, length, k), np.float32)
  mask = np.zeros((b, length), bool)
  for i, row in enumerate(rows):
    for example_id, offset in row:
      rec = store.get(example_id)
      cols = rec.positions + offset
      keep = cols < length
      cols = cols[keep]
      ids[i, cols] = rec.ids[keep, :k]
      logp[i, cols] = rec.logp[keep, :k]
      mask[i, cols] = True
  return {"ids_btk": ids, "logp_btk": logp, "mask_bt": mask}


class JoinTeacher:
  """A grain map transform: adds the example's teacher record (unpadded) to a prepared
  example, looked up by id. Picklable (holds the path; opens the store per worker)."""

  def __init__(self, folder: str | os.PathLike):
    self.folder = os.fspath(folder)
    self._store: TeacherStore | None = None

  def __getstate__(self):
    return {"folder": self.folder, "_store": None}

  def map(self, example: dict) -> dict:
    if self._store is None:
      self._store = TeacherStore(self.folder)
    from sad_jax.data.tfds_builder import example_id  # tfds import only when streaming

    rec = self._store.get(example_id(example))
    return {**example, "teacher_positions": rec.positions, "teacher_ids": rec.ids,
            "teacher_logp": rec.logp}

  __call__ = map
