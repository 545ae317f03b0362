"""A small reader/writer for the safetensors format (8-byte header length, JSON header,
raw little-endian tensors), memory-mapped, with bfloat16 through ml_dtypes. No torch.

Reading returns NumPy views of a memory map, so a process reads only the slices it
places on its devices.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterator, Mapping, Sequence

import ml_dtypes
import numpy as np

from sad_jax.common import fileio
from sad_jax.common.errors import DataError
from sad_jax.common.fileio import atomic_write

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}


def read(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """name → array (a view of a read-only memory map)."""
  path = os.fspath(path)
  try:
    with open(path, "rb") as f:
      raw = f.read(8)
      if len(raw) < 8:
        raise DataError("truncated safetensors file (no header)", path=path)
      (n,) = struct.unpack("<Q", raw)
      size = os.fstat(f.fileno()).st_size
      if n > size - 8:
        raise DataError(f"header length {n} exceeds the file size {size}", path=path)
      header = json.loads(f.read(n))
  except OSError as e:
    raise DataError(f"cannot read: {e.strerror}", path=path) from None
  except ValueError as e:
    raise DataError(f"malformed safetensors header: {e}", path=path) from None
  if not isinstance(header, dict):
    raise DataError(f"safetensors header is not a JSON object but {type(header).__name__}",
                    path=path)
  data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n) if size > 8 + n else (
      np.zeros(0, np.uint8))
  out = {}
  for name, meta in header.items():
    if name == "__metadata__":
      continue
    if not isinstance(meta, dict):
      raise DataError("tensor entry is not an object", path=path, field=name)
    dt = _DTYPES.get(meta.get("dtype"))
    if dt is None:
      raise DataError(f"unsupported dtype {meta.get('dtype')!r}", path=path, field=name)
    lo_hi, shape = meta.get("data_offsets"), meta.get("shape")
    if not (_ints(lo_hi) and len(lo_hi) == 2 and 0 <= lo_hi[0] <= lo_hi[1] and _ints(shape)
            and min(shape, default=0) >= 0):
      raise DataError(f"malformed entry (shape {shape!r}, data_offsets {lo_hi!r})", path=path,
                      field=name)
    lo, hi = lo_hi
    shape = tuple(shape)
    if hi > len(data) or hi - lo != int(np.prod(shape)) * np.dtype(dt).itemsize:
      raise DataError(f"tensor bytes [{lo}, {hi}) do not fit shape {shape} {meta['dtype']} "
                      f"in a data section of {len(data)} bytes (truncated file?)",
                      path=path, field=name)
    out[name] = data[lo:hi].view(dt).reshape(shape)
  return out


def _ints(x) -> bool:
  return isinstance(x, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in x)


def write(path: str | os.PathLike, tensors: Mapping[str, np.ndarray],
          metadata: Mapping[str, str] | None = None) -> None:
  arrays = {name: np.ascontiguousarray(a) for name, a in tensors.items()}
  write_lazy(path, [(name, a.shape, a.dtype, lambda a=a: a) for name, a in arrays.items()],
             metadata=metadata)


Entry = tuple[str, tuple[int, ...], np.dtype, Callable[[], np.ndarray]]


def write_lazy(path: str | os.PathLike, entries: Sequence[Entry],
               metadata: Mapping[str, str] | None = None) -> None:
  """Writes tensors given as (name, shape, dtype, make): the header comes from shapes, and
  each tensor is made, written and dropped in turn, so at most one is in memory."""
  header: dict = {"__metadata__": dict(metadata)} if metadata else {}
  offset = 0
  entries = sorted(entries, key=lambda e: e[0])
  for name, shape, dtype, _ in entries:
    dtype = np.dtype(dtype)
    if dtype not in _NAMES:
      raise ValueError(f"{name}: dtype {dtype} cannot be written to safetensors")
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    header[name] = {"dtype": _NAMES[dtype], "shape": [int(d) for d in shape],
                    "data_offsets": [offset, offset + nbytes]}
    offset += nbytes
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)  # keep the data 8-byte aligned
  with atomic_write(path, "wb") as f:
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    for name, shape, dtype, make in entries:
      a = np.ascontiguousarray(make())
      if a.shape != tuple(shape) or a.dtype != np.dtype(dtype):
        raise AssertionError(f"{name}: made {a.shape} {a.dtype}, declared {shape} {dtype}")
      f.write(a.tobytes())


def read_checkpoint(folder: str | os.PathLike) -> Iterator[tuple[str, np.ndarray, str]]:
  """(name, array, file) for every tensor of an HF folder: model.safetensors or the
  shards listed in model.safetensors.index.json."""
  folder = os.fspath(folder)
  index = fileio.join(folder, "model.safetensors.index.json")
  if fileio.exists(index):
    try:
      weight_map = json.loads(fileio.read_text(index))["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
      raise DataError(f"cannot read the shard index: {e}", path=index) from None
    if not (isinstance(weight_map, dict)
            and all(isinstance(v, str) for v in weight_map.values())):
      raise DataError("must map tensor names to file names", path=index, field="weight_map")
    files = sorted(set(weight_map.values()))
  elif fileio.exists(fileio.join(folder, "model.safetensors")):
    files = ["model.safetensors"]
  else:
    raise DataError("no model.safetensors or model.safetensors.index.json", path=folder)
  for fname in files:
    path = fileio.join(folder, fname)
    try:  # memory-mapped: a gs:// file is staged to the local cache (once per version)
      local = fileio.local_copy(path)
    except OSError as e:
      raise DataError(f"cannot read: {e.strerror or e}", path=path) from None
    try:
      tensors = read(local)
    except DataError as e:
      raise DataError(e.message, path=path, record=e.record, field=e.field) from None
    for name, arr in tensors.items():
      yield name, arr, path
