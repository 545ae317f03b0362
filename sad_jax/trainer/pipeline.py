"""The training input pipeline: grain over a prepared dataset, joined with the teacher store,
sampled by curriculum stage, packed into fixed-length rows.

Determinism across process counts. A global batch is [A, b, T] (A gradient-accumulation
micro-batches of b rows). Each of its A·b rows is a *lane*: lane ℓ packs the examples at
positions ℓ, ℓ+L, ℓ+2L, … (L = A·b) of the stage's sample stream. The stream is a grain
MapDataset (per complexity bucket: shuffle by seed, repeat; then `mix` by the stage's
bucket weights), so position → example is a pure function of (seed, stage, position).
A process owns the rows of every micro-batch that its devices hold (a contiguous range:
`Layout.row_start/row_count`), and packs only those lanes. So one process with 8 devices
and two with 4 each see the same global batch.

Packing: a lane fills a row from its subsequence in order, first fit with lookahead: an
example that does not fit in what is left of T tokens is passed over, and the row keeps
looking until `pack_lookahead` examples did not fit or it is full. Every row opens with
the lane's oldest example not yet packed, so a passed-over one is not starved. Lookahead 1
is plain sequential packing (the demo's rows: 70% real tokens; lookahead 8: 93%). A longer
example is cut to T and counted. Segment ids number the trajectories 1, 2, … in a row (0 =
padding), positions restart at 0 for each, so attention and losses never cross trajectories.
A lane's state is its cursor (the oldest position not yet packed) and the positions after
it already packed.
The iterator state (stage, batches produced, lane cursors) is what the checkpoint saves;
prefetching runs ahead in a thread but the state reported is that of the last batch handed
out, so resuming repeats nothing and skips nothing.
"""

from __future__ import annotations

import dataclasses
import json
import queue
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import grain
import numpy as np

from sad_jax.common import fileio
from sad_jax.common.errors import DataError
from sad_jax.common.types import SpanKind
from sad_jax.data import prepare, tfds_builder
from sad_jax.distill import curriculum
from sad_jax.teacher.store import TeacherStore


@dataclasses.dataclass
class Split:
  """One split of a prepared dataset, random access, with its per-example stats."""

  path: str
  name: str
  source: Any                    # tfds ArrayRecord data source (random access)
  ids: list[str]
  lengths: np.ndarray            # int64[n] tokens per example
  stats: dict[str, np.ndarray]   # STATS_FIELDS → int64[n]
  meta: dict[str, Any]
  kind_tokens: np.ndarray | None = None  # int64[len(SpanKind)]: tokens of each kind

  def __len__(self) -> int:
    return len(self.ids)

  def example(self, i: int) -> dict:
    return self.source[int(i)]


def open_split(dataset_dir: str, split: str) -> Split:
  """Opens a split and reads each example's stats once (ids and lengths for packing and the
  curriculum; a pass over the records, no token decoding kept)."""
  builder, _, meta = prepare.load_prepared(dataset_dir)
  if split not in builder.info.splits:
    raise DataError(f"dataset has no split {split!r} (it has {list(builder.info.splits)})",
                    path=dataset_dir, field="split")
  source = tfds_builder.DataSource(builder, split)
  n = len(source)
  stats = np.zeros((n, len(tfds_builder.STATS_FIELDS)), np.int64)
  kind_tokens = np.zeros(len(SpanKind), np.int64)
  ids = []
  for i, ex in enumerate(source):  # in order: on an object store, read in chunks
    ids.append(tfds_builder.example_id(ex))
    stats[i] = ex["stats"]
    kinds = np.asarray(ex["kinds"], np.int64)
    kind_tokens += np.bincount(kinds[(kinds >= 0) & (kinds < len(SpanKind))],
                               minlength=len(SpanKind))
    if len(ex["ids"]) != stats[i, tfds_builder.STATS_FIELDS.index("tokens")]:
      raise DataError(f"example {ids[-1]}: {len(ex['ids'])} tokens but stats say "
                      f"{stats[i, 2]}", path=source.where(), record=i + 1, field="stats")
  named = {f: stats[:, j] for j, f in enumerate(tfds_builder.STATS_FIELDS)}
  return Split(path=dataset_dir, name=split, source=source, ids=ids,
               lengths=named["tokens"].copy(), stats=named, meta=meta, kind_tokens=kind_tokens)


def open_teacher(store_dir: str, split: Split, *, k: int) -> TeacherStore:
  """The store, checked against the dataset: fingerprints, vocabulary, k, coverage."""
  store = TeacherStore(store_dir)
  m = store.manifest
  where = fileio.join(store_dir, "manifest.json")
  if m.dataset_fingerprint != split.meta["fingerprint"]:
    raise DataError(f"teacher store was computed for dataset {m.dataset_fingerprint[:12]}…, "
                    f"not this one ({split.meta['fingerprint'][:12]}…): recompute it",
                    path=where, field="dataset_fingerprint")
  if m.tokenizer_fingerprint != split.meta["tokenizer_fingerprint"]:
    raise DataError("teacher store's tokenizer fingerprint differs from the dataset's",
                    path=where, field="tokenizer_fingerprint")
  if m.vocab_size != int(split.meta["vocab_size"]):
    raise DataError(f"store vocab_size {m.vocab_size} != dataset vocab_size "
                    f"{split.meta['vocab_size']}", path=where, field="vocab_size")
  if k > m.k:
    raise DataError(f"training asks for k={k} but the store holds k={m.k}", path=where,
                    field="k")
  missing = [i for i in split.ids if i not in store]
  if missing:
    raise DataError(f"{len(missing)} {split.name} examples have no teacher record (e.g. "
                    f"{missing[:3]}): the precompute is incomplete", path=store_dir,
                    field="shards")
  return store


# ----------------------------------------------------------------------------- packing


@dataclasses.dataclass(frozen=True)
class Layout:
  """The shape of a global batch and this process's rows of it."""

  accum: int                 # A micro-batches
  rows: int                  # b rows per micro-batch (global)
  length: int                # T tokens per row (model inputs are T − 1)
  k: int                     # teacher top-k per position (0: no teacher)
  row_start: int = 0         # this process's rows of each micro-batch: [start, start+count)
  row_count: int | None = None

  def __post_init__(self):
    if self.row_count is not None and not (
        0 <= self.row_start and self.row_start + self.row_count <= self.rows):
      raise DataError(f"rows [{self.row_start}, {self.row_start + self.row_count}) are not "
                      f"inside a micro-batch of {self.rows}", field="config.data.batch_size")

  @classmethod
  def for_process(cls, *, accum: int, rows: int, length: int, k: int, process_index: int,
                  process_count: int) -> Layout:
    """Contiguous equal shares by process index (what a batch-sharded mesh gives)."""
    if rows % process_count:
      raise DataError(f"rows per micro-batch ({rows}) must divide by the process count "
                      f"({process_count})", field="config.data.batch_size")
    share = rows // process_count
    return cls(accum=accum, rows=rows, length=length, k=k, row_start=process_index * share,
               row_count=share)

  @property
  def local_rows(self) -> int:
    return self.rows if self.row_count is None else self.row_count

  @property
  def lanes(self) -> int:
    return self.accum * self.rows

  def local_lanes(self) -> list[int]:
    lo = self.row_start
    return [a * self.rows + r for a in range(self.accum) for r in range(lo, lo + self.local_rows)]


def empty_batch(layout: Layout, teacher: bool) -> dict[str, np.ndarray]:
  shape = (layout.accum, layout.local_rows, layout.length)
  out = {"ids": np.zeros(shape, np.int32), "kinds": np.zeros(shape, np.int32),
         "segment_ids": np.zeros(shape, np.int32), "positions": np.zeros(shape, np.int32),
         "weight": np.zeros(shape, np.float32)}
  if teacher:
    out["teacher_ids"] = np.zeros(shape + (layout.k,), np.int32)
    out["teacher_logp"] = np.zeros(shape + (layout.k,), np.float32)
    out["teacher_mask"] = np.zeros(shape, bool)
  return out


def place(batch: dict, a: int, r: int, offset: int, seg: int, example: dict, *,
          weight: float, teacher_rec=None, k: int = 0) -> int:
  """Writes one example into row (a, r) at `offset`; returns the tokens written."""
  length = batch["ids"].shape[-1]
  n = min(len(example["ids"]), length - offset)
  cols = slice(offset, offset + n)
  batch["ids"][a, r, cols] = example["ids"][:n]
  batch["kinds"][a, r, cols] = example["kinds"][:n]
  batch["segment_ids"][a, r, cols] = seg
  batch["positions"][a, r, cols] = np.arange(n)
  batch["weight"][a, r, cols] = weight
  if teacher_rec is not None:
    pos = teacher_rec.positions
    keep = pos < n
    tcols = pos[keep] + offset
    batch["teacher_ids"][a, r, tcols] = teacher_rec.ids[keep, :k]
    batch["teacher_logp"][a, r, tcols] = teacher_rec.logp[keep, :k]
    batch["teacher_mask"][a, r, tcols] = True
  return n


def _fits(used: int, n: int, length: int) -> bool:
  return used == 0 or used + n <= length


# ----------------------------------------------------------------------------- training stream


class TrainIterator:
  """Batches for training, by curriculum stage; checkpointable (get_state/set_state as
  bytes, the protocol of grain's orbax CheckpointHandler)."""

  def __init__(self, *, split: Split, teacher: TeacherStore | None, layout: Layout,
               stages: Sequence[curriculum.Stage], bucket_n: np.ndarray,
               weight_n: np.ndarray, seed: int, prefetch: int = 2, pack_lookahead: int = 8):
    if pack_lookahead < 1:
      raise DataError(f"pack_lookahead must be at least 1, got {pack_lookahead}",
                      field="config.data.pack_lookahead")
    self.split, self.teacher, self.layout = split, teacher, layout
    self.stages, self.bucket_n, self.weight_n, self.seed = stages, bucket_n, weight_n, seed
    self.pack_lookahead = pack_lookahead
    self._streams: dict[int, grain.MapDataset] = {}
    self._lanes = layout.local_lanes()
    self._state = {"stage": 0, "step": 0, "cursors": [0] * len(self._lanes),
                   "taken": [[] for _ in self._lanes], "truncated": 0}
    self._prefetch = prefetch
    self._queue: queue.Queue | None = None
    self._thread: threading.Thread | None = None
    self._stop = threading.Event()
    self._cache: dict[int, dict] = {}

  # stream position → example index, for one stage
  def stream(self, stage: int) -> grain.MapDataset:
    if stage not in self._streams:
      weights = self.stages[stage].bucket_weights
      parts, part_w = [], []
      for j, w in enumerate(weights):
        members = np.flatnonzero(self.bucket_n == j)
        if w > 0 and len(members):
          seed = (self.seed * 1_000_003 + stage * 1009 + j) % (2**31)
          parts.append(grain.MapDataset.source(members).shuffle(seed=seed).repeat())
          part_w.append(w)
      if not parts:
        raise DataError(f"stage {self.stages[stage].name!r} samples only empty complexity "
                        f"buckets (weights {weights})",
                        field=f"config.curriculum.stages[{stage}].bucket_weights")
      self._streams[stage] = parts[0] if len(parts) == 1 else grain.MapDataset.mix(parts, part_w)
    return self._streams[stage]

  def _example(self, i: int) -> dict:
    # one-entry cache: the example that did not fit is the next row's first
    if i not in self._cache:
      self._cache = {i: self.split.example(i)}
    return self._cache[i]

  def _make(self, state: dict) -> tuple[dict, list[list[str]], dict]:
    """The batch at `state`, and the state after it (a pure function of the state)."""
    lay = self.layout
    stage = curriculum.stage_at(self.stages, state["step"])
    same = stage == state["stage"]
    cursors = list(state["cursors"]) if same else [0] * len(self._lanes)
    takens = [list(t) for t in state["taken"]] if same else [[] for _ in self._lanes]
    stream = self.stream(stage)
    batch = empty_batch(lay, self.teacher is not None)
    rows: list[list[str]] = []
    truncated = state["truncated"]
    for slot, lane in enumerate(self._lanes):
      a, r = divmod(slot, lay.local_rows)
      used, seg, row, misses = 0, 0, [], 0
      taken = set(takens[slot])
      j = cursors[slot]  # never taken: the row's first example, which always fits
      while misses < self.pack_lookahead and used < lay.length:
        if j in taken:
          j += 1
          continue
        i = int(stream[lane + lay.lanes * j])
        n = int(self.split.lengths[i])
        if not _fits(used, n, lay.length):
          misses += 1
          j += 1
          continue
        ex = self._example(i)
        rec = self.teacher.get(self.split.ids[i]) if self.teacher is not None else None
        seg += 1
        used += place(batch, a, r, used, seg, ex, weight=float(self.weight_n[i]),
                      teacher_rec=rec, k=lay.k)
        truncated += n > lay.length
        row.append(self.split.ids[i])
        taken.add(j)
        j += 1
      while cursors[slot] in taken:
        taken.remove(cursors[slot])
        cursors[slot] += 1
      takens[slot] = sorted(taken)
      rows.append(row)
    after = {"stage": stage, "step": state["step"] + 1, "cursors": cursors,
             "taken": takens, "truncated": truncated}
    return batch, rows, after

  # ---- iteration with a prefetch thread
  def _run(self, state: dict, q: queue.Queue, stop: threading.Event) -> None:
    try:
      while not stop.is_set():
        batch, rows, state = self._make(state)
        item = (batch, rows, state)
        while not stop.is_set():
          try:
            q.put(item, timeout=0.1)
            break
          except queue.Full:
            continue
    except BaseException as e:  # surface loader errors in the consumer
      q.put(e)

  def start_prefetch(self) -> None:
    self._halt()
    if self._prefetch <= 0:
      return
    self._stop = threading.Event()
    self._queue = queue.Queue(maxsize=self._prefetch)
    self._thread = threading.Thread(target=self._run, args=(dict(self._state), self._queue,
                                                            self._stop), daemon=True)
    self._thread.start()

  def _halt(self) -> None:
    if self._thread is not None:
      self._stop.set()
      self._thread.join()
      self._thread, self._queue = None, None

  def close(self) -> None:
    self._halt()

  def __iter__(self) -> Iterator:
    return self

  def __next__(self) -> tuple[dict, list[list[str]]]:
    if self._prefetch > 0:
      if self._thread is None:
        self.start_prefetch()
      item = self._queue.get()
      if isinstance(item, BaseException):
        self._halt()
        raise item
      batch, rows, self._state = item
    else:
      batch, rows, self._state = self._make(self._state)
    return batch, rows

  @property
  def stage(self) -> int:
    return self._state["stage"]

  @property
  def truncated(self) -> int:
    return self._state["truncated"]

  def get_state(self) -> bytes:
    return json.dumps({**self._state, "lanes": self._lanes, "seed": self.seed}).encode()

  def set_state(self, state: bytes) -> None:
    s = json.loads(state)
    if s.get("lanes") != self._lanes or s.get("seed") != self.seed:
      raise DataError(f"data iterator state is for lanes {s.get('lanes')} and seed "
                      f"{s.get('seed')}, this run has {self._lanes} and {self.seed} (batch "
                      "size, accumulation, process count and seed must match to resume)",
                      field="data")
    self._halt()
    self._state = {k: s[k] for k in ("stage", "step", "cursors", "truncated")}
    # states written before lookahead packing have no "taken": nothing was packed ahead
    self._state["taken"] = s.get("taken", [[] for _ in self._lanes])


# ----------------------------------------------------------------------------- evaluation


def eval_plan(split: Split, layout: Layout, *, max_batches: int | None = None) -> list[list[
    list[int]]]:
  """Deterministic packing of a whole split for evaluation (every process computes the same
  plan from the lengths alone): plan[batch][lane] = example indices."""
  lanes: list[list[list[int]]] = [[] for _ in range(layout.lanes)]
  for lane in range(layout.lanes):
    row, used = [], 0
    for i in range(lane, len(split), layout.lanes):
      n = int(split.lengths[i])
      if not _fits(used, n, layout.length):
        lanes[lane].append(row)
        row, used = [], 0
      row.append(i)
      used += min(n, layout.length)
    if row:
      lanes[lane].append(row)
  n_batches = max((len(x) for x in lanes), default=0)
  if max_batches is not None:
    n_batches = min(n_batches, max_batches)
  return [[lanes[lane][j] if j < len(lanes[lane]) else [] for lane in range(layout.lanes)]
          for j in range(n_batches)]


def eval_batches(split: Split, teacher: TeacherStore | None, layout: Layout, *,
                 weight_n: np.ndarray | None = None, max_batches: int | None = None):
  """Yields (batch, rows) over the split, this process's rows of each global batch."""
  for plan in eval_plan(split, layout, max_batches=max_batches):
    batch = empty_batch(layout, teacher is not None)
    rows = []
    for slot, lane in enumerate(layout.local_lanes()):
      a, r = divmod(slot, layout.local_rows)
      used, row = 0, []
      for seg, i in enumerate(plan[lane], start=1):
        rec = teacher.get(split.ids[i]) if teacher is not None else None
        used += place(batch, a, r, used, seg, split.example(i),
                      weight=1.0 if weight_n is None else float(weight_n[i]),
                      teacher_rec=rec, k=layout.k)
        row.append(split.ids[i])
      rows.append(row)
    yield batch, rows
