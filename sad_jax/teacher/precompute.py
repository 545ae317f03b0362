"""`sad-jax teacher precompute`: run the teacher once over a prepared dataset, keep top-k.

Shards are the unit of work and of resumption: shard i of a split holds that split's
examples [i·S, (i+1)·S) in dataset order, computed in fixed batches, so a shard's bytes
do not depend on which shards ran before it. A rerun skips the shards whose completion
marker and file are on disk, and the manifest is written only when every shard is there.
The device computes the next batch while a background thread serialises and writes.

Across processes (jax.distributed, one per host) shard i belongs to process i mod n, which
computes it on its own devices; after a barrier, process 0 checks that every shard is in
the shared folder and writes the manifest, and a second barrier holds every process until
it exists. A store is the same bytes whatever the number of processes.
"""

from __future__ import annotations

import concurrent.futures
import functools
import json
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from sad_jax import fileio, sharding
from sad_jax.data import prepare, tfds_builder
from sad_jax.errors import DataError
from sad_jax.fileio import atomic_write
from sad_jax.models.config import ModelConfig
from sad_jax.models.generate import length_bucket
from sad_jax.models.transformer import Transformer, is_stacked, param_axes
from sad_jax.teacher import store as store_lib


@functools.partial(jax.jit, static_argnames=("cfg", "k", "temperature", "chunk", "dtype"))
def teacher_topk(params, ids_bt, select_bp=None, *, cfg: ModelConfig, k: int,
                 temperature: float, chunk: int = 256, dtype=jnp.float32, positions_bt=None,
                 segment_ids_bt=None):
  """(ids [B,P,k] int32, log-probs [B,P,k] float32): the teacher's next-token top-k at
  temperature τ, at the positions `select_bp` (all T positions when None). The head runs
  only at the selected positions, over chunks (the [B,T,V] log-probs never exist).
  positions_bt / segment_ids_bt: of packed rows (several trajectories), as the student sees
  them; None = one sequence per row."""
  model = Transformer(cfg, dtype=dtype, scan=is_stacked(params))
  h, _ = model.apply({"params": params}, ids_bt, positions_bt=positions_bt,
                     segment_ids_bt=segment_ids_bt, method=Transformer.hidden)
  if select_bp is not None:
    h = jnp.take_along_axis(h, select_bp[..., None], axis=1)
  b, t, d = h.shape
  c = min(chunk, t)
  pad = -t % c
  h = jnp.pad(h, [(0, 0), (0, pad), (0, 0)])
  hc = jnp.moveaxis(h.reshape(b, -1, c, d), 1, 0)

  def one(x):
    z = model.apply({"params": params}, x, method=Transformer.logits)[..., :cfg.vocab_size]
    logp = jax.nn.log_softmax(z / temperature, axis=-1)
    vals, idx = jax.lax.top_k(logp, k)
    return idx.astype(jnp.int32), vals

  idx, vals = jax.lax.map(one, hc)
  unchunk = lambda a: jnp.moveaxis(a, 0, 1).reshape(b, -1, k)[:, :t]
  return unchunk(idx), unchunk(vals)


def target_positions(kinds: np.ndarray, span_kinds: Sequence[int]) -> np.ndarray:
  """Input positions t whose next token t+1 is of a covered kind."""
  return np.flatnonzero(np.isin(kinds[1:], span_kinds)).astype(np.int32)


def _bucket(n: int, cap: int) -> int:
  return min(cap, length_bucket(n))


def precompute(*, dataset_dir: str, cfg: ModelConfig, params, teacher_name: str, out_dir: str,
               k: int = 64, temperature: float = 1.0, span_kinds: Sequence[str] = ("reason",),
               splits: Sequence[str] | None = None, shard_size: int = 128, batch_size: int = 8,
               logp_dtype: str = "float16", mesh=None, progress: bool = True,
               stop_after_shards: int | None = None, chunk: int = 256,
               dtype=jnp.float32, process_index: int | None = None,
               process_count: int | None = None) -> store_lib.Manifest:
  """Writes (or completes) a store at out_dir; returns its manifest.

  With several processes (hosts), shard i belongs to process i mod process_count, each
  running its shards on its own devices (`mesh` of local devices). Under jax.distributed
  (process_count = jax.process_count() > 1) the processes meet at a barrier and process 0
  writes the manifest; with process_index/process_count given by hand (no jax.distributed)
  whichever process finds every shard complete writes it (the same bytes from any of them).
  """
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise DataError(f"process_index {process_index} is not in [0, {process_count})",
                    field="process_index")
  # real processes under jax.distributed meet at barriers; a hand-given split cannot
  synced = process_count > 1 and process_count == jax.process_count()
  from tqdm.auto import tqdm

  if logp_dtype not in store_lib.LOGP_DTYPES:
    raise DataError(f"logp_dtype must be one of {store_lib.LOGP_DTYPES}", field="logp_dtype")
  builder, _, meta = prepare.load_prepared(dataset_dir)
  kinds = store_lib.span_kind_ids(span_kinds)
  student_vocab = int(meta["vocab_size"])
  if cfg.vocab_size < student_vocab:
    raise DataError(f"teacher vocabulary {cfg.vocab_size} is smaller than the dataset's "
                    f"tokenizer ({student_vocab})", field="vocab_size")
  if k > cfg.vocab_size:
    raise DataError(f"k={k} exceeds the teacher vocabulary {cfg.vocab_size}", field="k")
  settings = {"teacher": teacher_name, "k": k, "temperature": temperature,
              "span_kinds": list(span_kinds), "logp_dtype": logp_dtype,
              "dataset_fingerprint": meta["fingerprint"], "shard_size": shard_size,
              "batch_size": batch_size}
  fileio.makedirs(out_dir)
  settings_path = fileio.join(out_dir, "precompute.json")
  if fileio.exists(settings_path):
    old = json.loads(fileio.read_text(settings_path))
    if old != settings:
      diff = sorted(k_ for k_ in settings if old.get(k_) != settings[k_])
      raise DataError(f"an earlier precompute in this folder used other settings ({diff}); "
                      "use a new folder", path=settings_path)
  else:
    with atomic_write(settings_path) as f:
      json.dump(settings, f, indent=1)

  if mesh is not None:
    shardings = sharding.tree_shardings(params, param_axes(params), mesh)
    params = jax.device_put(params, shardings)
  splits = list(splits or builder.info.splits)
  plan = []
  for split in splits:
    n = builder.info.splits[split].num_examples
    plan += [(split, i, range(i * shard_size, min(n, (i + 1) * shard_size)))
             for i in range(-(-n // shard_size))]
  total = sum(len(r) for _, _, r in plan[process_index::process_count])  # this process's
  bar = tqdm(total=total, desc="teacher top-k", unit="traj", disable=not progress)
  writer = concurrent.futures.ThreadPoolExecutor(max_workers=1)
  pending: list[tuple[str, concurrent.futures.Future]] = []
  markers: list[dict] = []
  computed: list[str] = []  # the shards this call computed (not found complete)
  cap = int(meta["max_len"])
  for n_shard, (split, index, rows) in enumerate(plan):
    name = store_lib.shard_name(split, index)
    marker = store_lib.read_marker(out_dir, name)
    own = n_shard % process_count == process_index
    if marker is not None:
      markers.append({**marker, "split": split})
      bar.update(len(rows) if own else 0)
      continue
    if not own:
      continue  # another host's shard
    if stop_after_shards is not None and len(computed) >= stop_after_shards:
      break
    source = tfds_builder.DataSource(builder, split)
    examples = [source[i] for i in rows]
    # batches of similar lengths (less padding); the shard keeps the dataset's order
    order = sorted(range(len(examples)), key=lambda j: len(examples[j]["ids"]))
    records: list[bytes | None] = [None] * len(examples)
    for lo in range(0, len(order), batch_size):
      batch = [examples[j] for j in order[lo: lo + batch_size]]
      length = _bucket(max(len(e["ids"]) for e in batch), cap)
      tokens = np.zeros((batch_size, length), np.int32)  # fixed batch: one compile per bucket
      targets = [target_positions(np.asarray(e["kinds"]), kinds) for e in batch]
      select = np.zeros((batch_size, _bucket(max(len(p) for p in targets), cap)), np.int32)
      for j, e in enumerate(batch):
        tokens[j, :len(e["ids"])] = e["ids"]
        select[j, :len(targets[j])] = targets[j]
      with sharding.use_mesh(mesh):
        top_ids, top_logp = teacher_topk(params, jnp.asarray(tokens), jnp.asarray(select),
                                         cfg=cfg, k=k, temperature=float(temperature),
                                         chunk=chunk, dtype=dtype)
      top_ids, top_logp = np.asarray(top_ids), np.asarray(top_logp)
      for j, e in enumerate(batch):
        ident = tfds_builder.example_id(e)
        n = len(targets[j])
        rec = store_lib.TopK(ident, targets[j], top_ids[j, :n], top_logp[j, :n])
        if (rec.ids >= student_vocab).any():
          raise DataError(f"teacher top-k of example {ident} holds ids ≥ the student "
                          f"vocabulary {student_vocab}: the vocabularies differ beyond "
                          "padding", field="vocab_size")
        records[order[lo + j]] = store_lib.encode_record(rec, vocab_size=student_vocab,
                                                         logp_dtype=logp_dtype)
      bar.update(len(batch))
    ids = [tfds_builder.example_id(e) for e in examples]
    pending.append((split, writer.submit(store_lib.write_shard, out_dir, name, records, ids)))
    computed.append(name)
  for split, fut in pending:
    markers.append({**fut.result(), "split": split})
  writer.shutdown()
  bar.close()
  if process_count > 1:  # each process says what it did (the logs show the split)
    print(f"process {process_index} of {process_count}: computed {len(computed)} of its "
          f"{len(plan[process_index::process_count])} shards"
          + (f" ({', '.join(computed[:8])}{', …' if len(computed) > 8 else ''})"
             if computed else ""), flush=True)
  if synced:  # every process's shards are written (or it stopped) before anyone looks
    multihost_utils.sync_global_devices("sad_jax teacher precompute: shards written")
  if process_count > 1:  # other hosts' shards may have completed meanwhile
    markers = [{**m_, "split": sp} for sp, i, _ in plan
               if (m_ := store_lib.read_marker(out_dir, store_lib.shard_name(sp, i)))]
    if synced and stop_after_shards is None and len(markers) < len(plan):
      # every process has finished: a shard missing now was written where this one cannot see
      found = {m_["name"] for m_ in markers}
      missing = [store_lib.shard_name(sp, i) for sp, i, _ in plan
                 if store_lib.shard_name(sp, i) not in found]
      raise DataError(f"after every process finished, {len(missing)} shards are missing "
                      f"here ({', '.join(missing[:3])}, …): the store folder must be one that "
                      "every host shares (a bucket or a shared file system)", path=out_dir)
  manifest = store_lib.Manifest(
      teacher=teacher_name, k=k, temperature=float(temperature), vocab_size=student_vocab,
      teacher_vocab_size=cfg.vocab_size, tokenizer_fingerprint=meta["tokenizer_fingerprint"],
      dataset_fingerprint=meta["fingerprint"], span_kinds=list(span_kinds),
      logp_dtype=logp_dtype, shards=sorted(markers, key=lambda m: m["name"]))
  if len(markers) == len(plan) and (process_index == 0 or not synced):
    with atomic_write(fileio.join(out_dir, "manifest.json")) as f:
      f.write(manifest.to_json())
  if synced:  # no process returns (and reads the store) before the manifest exists
    multihost_utils.sync_global_devices("sad_jax teacher precompute: manifest written")
  return manifest
