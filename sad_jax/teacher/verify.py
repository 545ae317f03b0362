"""`sad-jax teacher verify` and `sad-jax teacher import`.

verify: fingerprints against the dataset, coverage (every example, every target token
of the covered kinds), shard checksums, sanity (log-probs ≤ 0, Σ exp ≤ 1 + ε, ids in
the vocabulary), and a spot recompute of a few examples with the teacher. A sampled
store: every position's p̂ sums to 1, and the spot recompute redraws with the store's seed
(the same draws but where rounding moves a draw across a boundary of the cumulative sum).

import: per-token top-k log-probs from an OpenAI-compatible server's prompt log-probs
(vLLM `prompt_logprobs`: per position a map token id → {logprob, rank, …}, None at
position 0), checked token for token against the dataset.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from sad_jax.common import fileio
from sad_jax.common.errors import DataError
from sad_jax.common.fileio import atomic_write
from sad_jax.data import prepare, tfds_builder
from sad_jax.data.schema import iter_records
from sad_jax.teacher import precompute as pc
from sad_jax.teacher import store as store_lib

EPS = 1e-2  # float16 log-probs: Σ exp of a full top-k may exceed 1 by rounding


def _examples(builder):
  for split in builder.info.splits:
    for ex in tfds_builder.DataSource(builder, split):
      yield tfds_builder.example_id(ex), np.asarray(ex["ids"]), np.asarray(ex["kinds"])


def verify(store_dir: str, dataset_dir: str, *, cfg=None, params=None, spot: int = 3,
           tolerance: float = 1e-2) -> dict:
  """Raises DataError naming the first problem; returns a report of what was checked."""
  st = store_lib.TeacherStore(store_dir)
  m = st.manifest
  builder, _, meta = prepare.load_prepared(dataset_dir)
  where = fileio.join(store_dir, "manifest.json")
  if m.dataset_fingerprint != meta["fingerprint"]:
    raise DataError(f"dataset fingerprint {m.dataset_fingerprint[:12]}… does not match the "
                    f"dataset's {meta['fingerprint'][:12]}…", path=where,
                    field="dataset_fingerprint")
  if m.tokenizer_fingerprint != meta["tokenizer_fingerprint"]:
    raise DataError("tokenizer fingerprint does not match the dataset's", path=where,
                    field="tokenizer_fingerprint")
  if m.vocab_size != int(meta["vocab_size"]):
    raise DataError(f"vocab_size {m.vocab_size} is not the dataset tokenizer's "
                    f"{meta['vocab_size']}", path=where, field="vocab_size")
  if m.teacher_vocab_size < m.vocab_size:
    raise DataError(f"teacher vocabulary {m.teacher_vocab_size} is smaller than the dataset "
                    f"tokenizer's {m.vocab_size}: the vocabularies differ", path=where,
                    field="teacher_vocab_size")
  for shard in m.shards:
    path = fileio.join(store_dir, shard["name"])
    if not fileio.exists(path):
      raise DataError("shard is missing", path=path)
    if store_lib.file_sha256(path) != shard["sha256"]:
      raise DataError("checksum mismatch (the shard changed after it was written)", path=path,
                      field="sha256")
  kinds = store_lib.span_kind_ids(m.span_kinds)
  n_examples = n_tokens = 0
  max_mass = -np.inf
  checked = []
  for ident, ids, ex_kinds in _examples(builder):
    if ident not in st:
      raise DataError(f"example {ident} has no teacher record", path=store_dir,
                      field="coverage")
    rec = st.get(ident)
    want = pc.target_positions(ex_kinds, kinds)
    if not np.array_equal(rec.positions, want):
      raise DataError(f"example {ident}: the record covers {len(rec.positions)} positions, "
                      f"the dataset has {len(want)} targets of kinds {m.span_kinds}",
                      path=store_dir, field="positions")
    if rec.ids.shape[1:] != (m.k,):
      raise DataError(f"example {ident}: k is {rec.ids.shape[1]}, manifest says {m.k}",
                      path=store_dir, field="k")
    if len(rec.ids) and (rec.ids.min() < 0 or rec.ids.max() >= m.vocab_size):
      raise DataError(f"example {ident}: token id outside [0, {m.vocab_size})",
                      path=store_dir, field="ids")
    if not np.isfinite(rec.logp).all():
      raise DataError(f"example {ident}: non-finite log-prob", path=store_dir, field="logp")
    if (rec.logp > 1e-3).any():
      raise DataError(f"example {ident}: log-prob above 0", path=store_dir, field="logp")
    if len(rec.logp):
      mass = float(np.exp(rec.logp.astype(np.float64)).sum(-1).max())
      max_mass = max(max_mass, mass)
      if mass > 1 + EPS:
        raise DataError(f"example {ident}: top-k probabilities sum to {mass:.4f} > 1",
                        path=store_dir, field="logp")
      if m.sampled:
        low = float(np.exp(rec.logp.astype(np.float64)).sum(-1).min())
        if abs(low - 1) > 1e-5 or abs(mass - 1) > 1e-5:
          raise DataError(f"example {ident}: sampled p̂ sums to {low:.6f}…{mass:.6f}, not 1",
                          path=store_dir, field="counts")
    n_examples += 1
    n_tokens += len(want)
    if len(checked) < spot and len(want):
      checked.append((ident, ids, rec))
  extra = len(st) - n_examples
  if extra:
    raise DataError(f"{extra} records belong to no example of the dataset", path=store_dir,
                    field="coverage")
  report = {"examples": n_examples, "tokens": n_tokens, "shards": len(m.shards),
            "max_topk_mass": max_mass, "spot_max_abs_error": None}
  if cfg is not None and params is not None and checked:
    err = rel = 0.0
    for ident, ids, rec in checked:
      if m.sampled:
        draws = pc.teacher_sample(params, ids[None], rec.positions[None],
                                  np.asarray([pc.example_hash(ident)], np.uint32),
                                  np.uint32(m.seed), cfg=cfg, draws=m.k,
                                  temperature=m.temperature)
        fresh_ids, counts = pc.draws_to_slots(np.asarray(draws)[0])
        same = (fresh_ids == rec.ids).all(-1) & np.allclose(
            store_lib.sampled_logp(counts, m.k), rec.logp, rtol=0, atol=1e-6)
        # the share of positions redrawn otherwise: rounding only, so near 0
        rel = max(rel, float(1 - same.mean()))
        err = max(err, float(np.abs(store_lib.sampled_logp(counts, m.k)
                                    - rec.logp).max()))
        continue
      _, top_logp = pc.teacher_topk(params, ids[None], cfg=cfg, k=m.k,
                                    temperature=m.temperature)
      # sorted values: ties may order equal log-probs differently
      fresh = np.sort(np.asarray(top_logp)[0, rec.positions], -1)
      diff = np.abs(fresh - np.sort(rec.logp, -1))
      err = max(err, float(diff.max()))
      # stored log-probs are rounded relative to their size (float16, bf16, int8 rows)
      rel = max(rel, float((diff / np.maximum(1.0, np.abs(fresh).max(-1, keepdims=True))).max()))
    report["spot_max_abs_error"], report["spot_max_rel_error"] = err, rel
    if rel > tolerance:
      raise DataError(f"spot recompute differs by {err:.3g} (relative {rel:.3g} > "
                      f"{tolerance})", path=store_dir, field="logp")
  st.close()
  return report


def import_prompt_logprobs(jsonl: str, *, dataset_dir: str, out_dir: str, k: int,
                           teacher_name: str, teacher_vocab_size: int,
                           span_kinds: Sequence[str] = ("reason",), shard_size: int = 256,
                           logp_dtype: str = "float16") -> store_lib.Manifest:
  """A store from server prompt log-probs: one JSON line per example,
  {"id", "prompt_token_ids": [...], "prompt_logprobs": [null, {"<id>": {"logprob": x}
  or x, ...}, ...]} (entry t+1 is the distribution of token t+1 given tokens ≤ t)."""
  builder, _, meta = prepare.load_prepared(dataset_dir)
  student_vocab = int(meta["vocab_size"])
  if teacher_vocab_size < student_vocab:
    raise DataError(f"teacher vocabulary {teacher_vocab_size} is smaller than the dataset "
                    f"tokenizer's {student_vocab}", field="teacher_vocab_size")
  kinds = store_lib.span_kind_ids(span_kinds)
  dataset = {ident: (ids, kd) for ident, ids, kd in _examples(builder)}
  records: dict[str, bytes] = {}
  for line, rec in iter_records(jsonl):
    if isinstance(rec, DataError):
      raise rec
    try:
      ident, toks, lps = str(rec["id"]), rec["prompt_token_ids"], rec["prompt_logprobs"]
    except (KeyError, TypeError) as e:
      raise DataError(f"missing field {e}", path=jsonl, record=line) from None
    if not (isinstance(toks, list) and isinstance(lps, list)):
      raise DataError("prompt_token_ids and prompt_logprobs must be lists", path=jsonl,
                      record=line, field="prompt_logprobs")
    if ident not in dataset:
      raise DataError(f"id {ident!r} is not in the dataset", path=jsonl, record=line,
                      field="id")
    ids, ex_kinds = dataset[ident]
    if toks != ids.tolist():
      first = next((i for i, (a, b) in enumerate(zip(toks, ids, strict=False)) if a != b),
                   min(len(toks), len(ids)))
      raise DataError(f"the server's tokens differ from the dataset's at position {first} "
                      f"(server {len(toks)} tokens, dataset {len(ids)}): tokenize with the "
                      "dataset's tokenizer and send token ids", path=jsonl, record=line,
                      field="prompt_token_ids")
    if len(lps) != len(ids):
      raise DataError(f"{len(lps)} prompt_logprobs entries for {len(ids)} tokens",
                      path=jsonl, record=line, field="prompt_logprobs")
    pos = pc.target_positions(ex_kinds, kinds)
    top_ids = np.zeros((len(pos), k), np.int32)
    top_lp = np.full((len(pos), k), -1e4, np.float32)
    for r, t in enumerate(pos):
      entry = lps[t + 1] or {}
      try:
        items = sorted(((int(tid), float(v["logprob"] if isinstance(v, dict) else v))
                        for tid, v in entry.items()), key=lambda x: -x[1])[:k]
      except (AttributeError, KeyError, TypeError, ValueError) as e:
        raise DataError(f"position {t + 1}: expected {{token id: {{logprob}} or logprob}} "
                        f"({type(e).__name__}: {e})", path=jsonl, record=line,
                        field=f"prompt_logprobs[{t + 1}]") from None
      if len(items) < k:
        raise DataError(f"position {t + 1} has {len(items)} log-probs, k={k} needed",
                        path=jsonl, record=line, field="prompt_logprobs")
      for c, (tid, lp) in enumerate(items):
        if tid >= student_vocab:
          raise DataError(f"token id {tid} at position {t + 1} is outside the student "
                          f"vocabulary ({student_vocab}): the vocabularies differ beyond "
                          f"padding (teacher {teacher_vocab_size})", path=jsonl,
                          record=line, field="prompt_logprobs")
        top_ids[r, c], top_lp[r, c] = tid, lp
    records[ident] = store_lib.encode_record(store_lib.TopK(ident, pos, top_ids, top_lp),
                                             vocab_size=student_vocab, logp_dtype=logp_dtype)
  missing = [i for i in dataset if i not in records]
  if missing:
    raise DataError(f"{len(missing)} dataset examples have no line, e.g. {missing[:3]}",
                    path=jsonl, field="id")
  fileio.makedirs(out_dir)
  order = list(dataset)
  markers = []
  for s in range(0, len(order), shard_size):
    chunk = order[s: s + shard_size]
    name = store_lib.shard_name("all", s // shard_size)
    markers.append({**store_lib.write_shard(out_dir, name, (records[i] for i in chunk), chunk),
                    "split": "all"})
  manifest = store_lib.Manifest(
      teacher=teacher_name, k=k, temperature=1.0, vocab_size=student_vocab,
      teacher_vocab_size=teacher_vocab_size, tokenizer_fingerprint=meta["tokenizer_fingerprint"],
      dataset_fingerprint=meta["fingerprint"], span_kinds=list(span_kinds),
      logp_dtype=logp_dtype, shards=markers)
  with atomic_write(fileio.join(out_dir, "manifest.json")) as f:
    f.write(manifest.to_json())
  return manifest
