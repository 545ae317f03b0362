"""`sad-jax teacher precompute`: run the teacher once over a prepared dataset, keep top-k
(or, with sampling="sampled", k draws from its distribution per position: store.py).

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
import hashlib
import json
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from sad_jax.common import fileio, sharding
from sad_jax.common.errors import DataError
from sad_jax.common.fileio import atomic_write
from sad_jax.data import prepare, tfds_builder
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


def example_hash(example_id: str) -> int:
  """A uint32 of the example id: with the seed and the position it keys a sampled
  position's draws, so they depend on nothing else (batching, shards, hosts)."""
  return int.from_bytes(hashlib.sha256(example_id.encode()).digest()[:4], "little")


def position_keys(seed, hash_b, positions_bp):
  """Threefry keys [B, P] (named explicitly: the same draws whatever the default PRNG)."""
  base = jax.random.key(seed, impl="threefry2x32")
  per_example = jax.vmap(lambda h: jax.random.fold_in(base, h))(hash_b.astype(jnp.uint32))
  return jax.vmap(lambda key, pos: jax.vmap(lambda t: jax.random.fold_in(key, t))(pos))(
      per_example, positions_bp)


def draw(logits_pv, keys_p, *, draws: int, temperature: float):
  """int32 [P, draws]: draws from softmax(z / τ) per row, by inverse CDF (a V-long
  cumulative sum per row, not the [draws, V] Gumbel noise of jax.random.categorical)."""
  probs = jax.nn.softmax(logits_pv.astype(jnp.float32) / temperature, axis=-1)
  cdf_pv = jnp.cumsum(probs, axis=-1)
  u_pn = jax.vmap(lambda key: jax.random.uniform(key, (draws,)))(keys_p)
  u_pn = u_pn * cdf_pv[:, -1:]  # the sum as rounded, so no draw falls past the end
  # side=right: a zero-probability id (equal cdf to its left neighbour) is never drawn
  idx = jax.vmap(lambda c, u: jnp.searchsorted(c, u, side="right"))(cdf_pv, u_pn)
  return jnp.minimum(idx, logits_pv.shape[-1] - 1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("cfg", "draws", "temperature", "chunk", "dtype"))
def teacher_sample(params, ids_bt, select_bp, hash_b, seed, *, cfg: ModelConfig, draws: int,
                   temperature: float, chunk: int = 256, dtype=jnp.float32):
  """int32 [B, P, draws]: draws from the teacher's next-token distribution at τ at the
  input positions `select_bp`, keyed by (seed, hash_b[b], select_bp[b, p]) alone."""
  model = Transformer(cfg, dtype=dtype, scan=is_stacked(params))
  h, _ = model.apply({"params": params}, ids_bt, method=Transformer.hidden)
  h = jnp.take_along_axis(h, select_bp[..., None], axis=1)
  keys_bp = position_keys(seed, hash_b, select_bp)
  b, t, d = h.shape
  c = min(chunk, t)
  pad = -t % c
  h = jnp.pad(h, [(0, 0), (0, pad), (0, 0)])
  keys_bp = jnp.pad(keys_bp, [(0, 0), (0, pad)], mode="edge")
  hc = jnp.moveaxis(h.reshape(b, -1, c, d), 1, 0)
  kc = jnp.moveaxis(keys_bp.reshape(b, -1, c), 1, 0)

  def one(args):
    x, keys = args
    z = model.apply({"params": params}, x, method=Transformer.logits)[..., :cfg.vocab_size]
    out = draw(z.reshape(b * c, -1), keys.reshape(b * c), draws=draws,
               temperature=temperature)
    return out.reshape(b, c, draws)

  out = jax.lax.map(one, (hc, kc))
  return jnp.moveaxis(out, 0, 1).reshape(b, -1, draws)[:, :t]


def draws_to_slots(draws_pn: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(ids int32 [P, N], counts int32 [P, N]) of N draws per row: the distinct ids and their
  counts, most frequent first (ties: smaller id), then padding slots (id 0, count 0)."""
  p, n = draws_pn.shape
  s = np.sort(draws_pn, axis=-1)
  start = np.ones((p, n), bool)
  start[:, 1:] = s[:, 1:] != s[:, :-1]
  col = np.broadcast_to(np.arange(n), (p, n))
  # a run's count: the distance from its start to the next start (or the end)
  first_at_or_after = np.minimum.accumulate(np.where(start, col, n)[:, ::-1], axis=-1)[:, ::-1]
  next_start = np.concatenate([first_at_or_after[:, 1:], np.full((p, 1), n)], axis=-1)
  count = np.where(start, next_start - col, 0)
  order = np.lexsort((s, -count), axis=-1)  # primary: count descending (padding, 0, last)
  ids = np.take_along_axis(s, order, -1)
  count = np.take_along_axis(count, order, -1)
  return np.where(count > 0, ids, 0).astype(np.int32), count.astype(np.int32)


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
               process_count: int | None = None, sampling: str = "topk",
               seed: int = 0) -> store_lib.Manifest:
  """Writes (or completes) a store at out_dir; returns its manifest.

  sampling="topk" keeps the k most likely ids per position; "sampled" draws k times from
  the teacher's distribution at τ (keys from `seed`, the example id and the position) and
  keeps the distinct ids with log(count / k) (store.py).

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
  if sampling not in store_lib.SAMPLINGS:
    raise DataError(f"sampling must be one of {store_lib.SAMPLINGS}, got {sampling!r}",
                    field="sampling")
  sampled = sampling == "sampled"
  if sampled and not 0 < k < 65536:
    raise DataError(f"a sampled store takes 1 to 65535 draws per position (k), got {k}",
                    field="k")
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
  if sampled:  # top-k settings files stay as they were (resumable by older versions)
    settings |= {"sampling": sampling, "seed": int(seed)}
  fileio.makedirs(out_dir)
  settings_path = fileio.join(out_dir, "precompute.json")
  if fileio.exists(settings_path):
    old = json.loads(fileio.read_text(settings_path))
    if old != settings:
      diff = sorted(k_ for k_ in settings if old.get(k_) != settings[k_])
      raise DataError(f"an earlier precompute in this folder used other settings ({diff}); "
                      "use a new folder", path=settings_path)
  else:
    fileio.json_dump(settings_path, settings, indent=1)

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
  bar = tqdm(total=total, desc=f"teacher {sampling}", unit="traj", disable=not progress)
  writer = concurrent.futures.ThreadPoolExecutor(max_workers=1)
  pending: list[tuple[str, concurrent.futures.Future]] = []
  markers: list[dict] = []
  computed: list[str] = []  # the shards this call computed (not found complete)
  cap = int(meta["max_len"])
  def dispatch(batch):
    """Host arrays of one batch and its teacher call, dispatched without waiting."""
    length = _bucket(max(len(e["ids"]) for e in batch), cap)
    tokens = np.zeros((batch_size, length), np.int32)  # fixed batch: one compile per bucket
    targets = [target_positions(np.asarray(e["kinds"]), kinds) for e in batch]
    select = np.zeros((batch_size, _bucket(max(len(p) for p in targets), cap)), np.int32)
    for j, e in enumerate(batch):
      tokens[j, :len(e["ids"])] = e["ids"]
      select[j, :len(targets[j])] = targets[j]
    with sharding.use_mesh(mesh):
      if sampled:
        hashes = np.zeros((batch_size,), np.uint32)
        hashes[:len(batch)] = [example_hash(tfds_builder.example_id(e)) for e in batch]
        out = (teacher_sample(params, jnp.asarray(tokens), jnp.asarray(select),
                              jnp.asarray(hashes), jnp.uint32(seed), cfg=cfg, draws=k,
                              temperature=float(temperature), chunk=chunk, dtype=dtype),)
      else:
        out = teacher_topk(params, jnp.asarray(tokens), jnp.asarray(select), cfg=cfg, k=k,
                           temperature=float(temperature), chunk=chunk, dtype=dtype)
    return batch, targets, out

  def encode(batch, targets, out) -> list[bytes]:
    """The batch's records, from its teacher outputs (waits for them)."""
    top_ids = np.asarray(out[0])
    top_logp = None if sampled else np.asarray(out[1])
    encoded = []
    for j, e in enumerate(batch):
      ident = tfds_builder.example_id(e)
      n = len(targets[j])
      if sampled:
        slot_ids, counts = draws_to_slots(top_ids[j, :n])
        rec = store_lib.TopK(ident, targets[j], slot_ids, counts)
      else:
        rec = store_lib.TopK(ident, targets[j], top_ids[j, :n], top_logp[j, :n])
      if (rec.ids >= student_vocab).any():
        raise DataError(f"teacher {'draws' if sampled else 'top-k'} of example {ident} "
                        f"holds ids ≥ the student vocabulary {student_vocab}: the "
                        "vocabularies differ beyond padding", field="vocab_size")
      encoded.append(
          store_lib.encode_sampled(ident, rec.positions, rec.ids, counts,
                                   vocab_size=student_vocab, draws=k) if sampled else
          store_lib.encode_record(rec, vocab_size=student_vocab, logp_dtype=logp_dtype))
    bar.update(len(batch))
    return encoded

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

    # Software pipeline: batch i+1 is dispatched (the teacher runs asynchronously) before
    # batch i's records are encoded on the host, so host work overlaps the forward.
    groups = [order[lo: lo + batch_size] for lo in range(0, len(order), batch_size)]
    in_flight = None
    for group in [*groups, None]:
      nxt = None if group is None else (group, dispatch([examples[j] for j in group]))
      if in_flight is not None:
        for j, record in zip(in_flight[0], encode(*in_flight[1]), strict=True):
          records[j] = record
      in_flight = nxt
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
      logp_dtype=logp_dtype, shards=sorted(markers, key=lambda m: m["name"]),
      **({"sampling": sampling, "seed": int(seed),
          "format_version": store_lib.SAMPLED_FORMAT_VERSION} if sampled else {}))
  if len(markers) == len(plan) and (process_index == 0 or not synced):
    with atomic_write(fileio.join(out_dir, "manifest.json")) as f:
      f.write(manifest.to_json())
  if synced:  # no process returns (and reads the store) before the manifest exists
    multihost_utils.sync_global_devices("sad_jax teacher precompute: manifest written")
  return manifest
