"""Training metrics: JSONL, TensorBoard event files, and the matmul peak for MFU.

The TensorBoard writer is a small encoder of the event-file format (TFRecord framing with
masked CRC-32C around `Event` protobufs holding scalar `Summary` values): it needs neither
TensorFlow nor the tensorboard package. Tests read the files back with tensorboard's own
loader.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import time
import uuid
from collections.abc import Mapping

import numpy as np

from sad_jax.common import fileio, objects

# ----------------------------------------------------------------------------- event files

_CRC_TABLE = []
for _i in range(256):
  _c = _i
  for _ in range(8):
    _c = (_c >> 1) ^ 0x82F63B78 if _c & 1 else _c >> 1
  _CRC_TABLE.append(_c)


def crc32c(data: bytes) -> int:
  crc = 0xFFFFFFFF
  for byte in data:
    crc = _CRC_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
  out = bytearray()
  n &= (1 << 64) - 1
  while True:
    byte = n & 0x7F
    n >>= 7
    if n:
      out.append(byte | 0x80)
    else:
      out.append(byte)
      return bytes(out)


def _field(number: int, wire: int) -> bytes:
  return _varint((number << 3) | wire)


def _length_delimited(number: int, payload: bytes) -> bytes:
  return _field(number, 2) + _varint(len(payload)) + payload


def _event(*, wall_time: float, step: int, file_version: str | None = None,
           scalars: Mapping[str, float] | None = None) -> bytes:
  out = _field(1, 1) + struct.pack("<d", wall_time) + _field(2, 0) + _varint(step)
  if file_version is not None:
    out += _length_delimited(3, file_version.encode())
  if scalars:
    values = b"".join(
        _length_delimited(1, _length_delimited(1, tag.encode()) + _field(2, 5)
                          + struct.pack("<f", float(v)))
        for tag, v in scalars.items())
    out += _length_delimited(5, values)
  return out


class EventWriter:
  """Appends scalar summaries to one TensorBoard event file."""

  def __init__(self, logdir: str):
    # second + host + pid is not unique (two writers in one second and process, a restarted
    # container with the same pid): the random tail keeps each writer's object its own
    name = (f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}"
            f".{uuid.uuid4().hex[:8]}")
    self.path = fileio.join(logdir, name)
    self._f = objects.AppendFile(self.path, binary=True)
    self._write(_event(wall_time=time.time(), step=0, file_version="brain.Event:2"))

  def _write(self, record: bytes) -> None:
    header = struct.pack("<Q", len(record))
    self._f.write(header + struct.pack("<I", _masked_crc(header)) + record
                  + struct.pack("<I", _masked_crc(record)))

  def scalars(self, step: int, values: Mapping[str, float]) -> None:
    self._write(_event(wall_time=time.time(), step=step, scalars=values))

  def flush(self) -> None:
    self._f.flush()

  def close(self) -> None:
    self._f.close()


class MetricsWriter:
  """metrics.jsonl (one object per line: step, split, metrics) and TensorBoard events
  under workdir/tb/{train,validation}. Only process 0 writes. On gs:// both are rewritten
whole every few seconds, at each `flush` (checkpoint saves) and on close."""

  def __init__(self, workdir: str, *, enabled: bool = True):
    self.enabled = enabled
    self._tb: dict[str, EventWriter] = {}
    self.workdir = workdir
    if enabled:
      self._jsonl = objects.AppendFile(fileio.join(workdir, "metrics.jsonl"))

  def write(self, step: int, split: str, values: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    clean = {k: _number(v) for k, v in values.items()}
    self._jsonl.write(json.dumps({"step": step, "split": split, **clean}) + "\n")
    if split not in self._tb:
      self._tb[split] = EventWriter(fileio.join(self.workdir, "tb", split))
    self._tb[split].scalars(step, {k: v for k, v in clean.items() if v is not None})

  def flush(self) -> None:
    if self.enabled:
      self._jsonl.flush()
      for w in self._tb.values():
        w.flush()

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      for w in self._tb.values():
        w.close()


def _number(v) -> float | None:
  v = float(np.asarray(v))
  return v if np.isfinite(v) else None


def read_jsonl(workdir: str) -> list[dict]:
  text = fileio.read_text(fileio.join(workdir, "metrics.jsonl"))
  return [json.loads(line) for line in text.splitlines() if line.strip()]


# ----------------------------------------------------------------------------- FLOPs and MFU


def model_flops_per_token(cfg, seq_len: int) -> float:
  """Training FLOPs per token: 6·(matmul parameters) + attention (12·L·T·H·Dh per token,
  the QKᵀ and PV matmuls, forward and backward, causal mask not discounted), as in the
  PaLM appendix. The embedding gather is not a matmul and is not counted; the lm head is."""
  d, h, kv, dh, f, layers = (cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                             cfg.intermediate_size, cfg.num_layers)
  per_layer = d * (h + 2 * kv) * dh + h * dh * d + 3 * d * f
  matmul_params = layers * per_layer + d * cfg.vocab_size
  attention = 12 * layers * seq_len * h * dh
  return 6.0 * matmul_params + attention


def measure_matmul_peak(dtype: str = "float32", n: int = 1024, repeats: int = 5) -> float:
  """FLOP/s of the best of `repeats` n×n×n matmuls on the default device (jitted, warmed)."""
  import jax
  import jax.numpy as jnp

  a = jnp.ones((n, n), dtype)
  f = jax.jit(lambda x, y: x @ y)
  f(a, a).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    f(a, a).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return 2.0 * n ** 3 / best


def cpu_model() -> str:
  """The CPU's model name (for benchmark reports)."""
  import platform

  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()
