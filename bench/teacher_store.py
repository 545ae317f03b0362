"""Teacher store figures on the prepared FireAct data with a teacher trained here.

  python bench/teacher_store.py [--steps 300] [--repeats 3] [--json OUT.json]

1. Trains a small teacher (Llama-style, d=128, 2 layers) with SFT on FireAct for
   --steps steps, and keeps an early checkpoint (step steps/6) as a stand-in student.
2. Bytes per supervised (reason) token at k = 16 / 64 / 128 (float16, bf16, int8), and the
   error of the top-k KL (both tail rules) against the exact full-vocabulary KL between
   the teacher and that student, on validation reason tokens.
3. Precompute throughput (trajectories/s) against a pure forward of the same teacher over
   the same fixed batches (target ≥ 90%): the trained teacher, one of the demo teacher's
   size (d=192, 4 layers) and one at shape S (d=256, 4 layers), the last two untrained
   (only their cost matters here).
4. Reader throughput (random access + gather into [B, T, k], trajectories/s) against what
   a training step at shape S consumes (target ≥ 20×).
`--json` writes every figure (and the arguments) to a file.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sad_jax.common import fileio
from sad_jax.common.types import SpanKind
from sad_jax.configs import prepare_fireact
from sad_jax.data import prepare
from sad_jax.distill import losses
from sad_jax.distill import objectives as O
from sad_jax.models import transformer as T
from sad_jax.models.config import ModelConfig
from sad_jax.teacher import precompute as pc
from sad_jax.teacher import store as S

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def batches(source, batch, length, rng):
  n = len(source)
  while True:
    idx = rng.integers(0, n, batch)
    ids = np.zeros((batch, length), np.int32)
    kinds = np.zeros((batch, length), np.int32)
    for j, i in enumerate(idx):
      ex = source[int(i)]
      m = min(length, len(ex["ids"]))
      ids[j, :m], kinds[j, :m] = ex["ids"][:m], ex["kinds"][:m]
    yield ids, kinds


def train_teacher(cfg, source, steps):
  params = T.init_params(cfg, jax.random.PRNGKey(0))
  opt = optax.adamw(3e-3, weight_decay=0.0)
  state = opt.init(params)
  obj = O.Objective(name="sft", groups=O.groups_for("sft"),
                    settings=losses.LossSettings(chunk_size=128))

  @jax.jit
  def step(params, state, ids, kinds):
    def loss(p):
      h, w, b = T.features(cfg, p, ids[:, :-1])
      return O.objective_loss(obj, h_btd=h, w_dv=w, b_v=b, labels_bt=ids[:, 1:],
                              label_kinds_bt=kinds[:, 1:], teacher=None,
                              fixed_weights_g=jnp.ones(1))[0]
    val, g = jax.value_and_grad(loss)(params)
    upd, state = opt.update(g, state, params)
    return optax.apply_updates(params, upd), state, val

  gen = batches(source, 16, 513, np.random.default_rng(0))
  early = None
  for s in range(steps):
    ids, kinds = next(gen)
    params, state, val = step(params, state, ids, kinds)
    if s == steps // 6:
      early = params
  print(f"teacher: {steps} SFT steps, final loss {float(val):.3f}")
  return params, early, float(val)


def kl_errors(cfg, teacher, student, source, ks, n_examples=24):
  """Relative error of top-k KL (per tail rule) vs the exact full KL, summed over tokens."""
  full_sum, approx = 0.0, {(k, t): 0.0 for k in ks for t in losses.TAIL_RULES}
  fwd = jax.jit(lambda p, ids: T.Transformer(cfg).apply({"params": p}, ids))
  for i in range(min(n_examples, len(source))):
    ex = source[i]
    ids = np.asarray(ex["ids"])[None]
    pos = pc.target_positions(np.asarray(ex["kinds"]), [int(SpanKind.REASON)])
    if not len(pos):
      continue
    zt = np.asarray(fwd(teacher, ids))[0, pos].astype(np.float64)
    zs = np.asarray(fwd(student, ids))[0, pos]
    lt = zt - np.log(np.exp(zt - zt.max(-1, keepdims=True)).sum(-1, keepdims=True)) - zt.max(
        -1, keepdims=True)
    log_q = jax.nn.log_softmax(jnp.asarray(zs), axis=-1)
    full_sum += float(np.sum(np.exp(lt) * (lt - np.asarray(log_q, np.float64))))
    order = np.argsort(-lt, axis=-1)
    for k in ks:
      top = order[:, :k]
      rec = S.decode_record(S.encode_record(
          S.TopK("x", pos, top, np.take_along_axis(lt, top, -1).astype(np.float32)),
          vocab_size=cfg.vocab_size, logp_dtype="float16"))
      for tail in losses.TAIL_RULES:
        d = losses.divergence_per_token(log_q, jnp.asarray(rec.ids), jnp.asarray(rec.logp),
                                        kind="fkl", tail=tail)
        approx[(k, tail)] += float(jnp.sum(d))
  return full_sum, {key: abs(v - full_sum) / full_sum for key, v in approx.items()}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--json", default=None, help="write all results here")
  args = parser.parse_args()
  work = tempfile.mkdtemp(prefix="bench_store_")
  cfgp = prepare_fireact.get_config()
  cfgp.inputs = tuple(os.path.join(ROOT, p) for p in cfgp.inputs)
  ds = os.path.join(work, "ds")
  prepare.prepare(cfgp, ds, progress=False)
  builder, tok, _ = prepare.load_prepared(ds)
  train, val = builder.as_data_source("train"), builder.as_data_source("validation")
  cfg = ModelConfig(model_type="llama", vocab_size=tok.vocab_size, hidden_size=128,
                    intermediate_size=352, num_layers=2, num_heads=4, num_kv_heads=2,
                    head_dim=32)
  teacher, student, final_loss = train_teacher(cfg, train, args.steps)

  # 2. bytes per token and KL error
  ks = (16, 64, 128)
  full, errs = kl_errors(cfg, teacher, student, val, ks)
  sizes = {}
  for k in ks:
    for dt in S.LOGP_DTYPES:
      out = os.path.join(work, f"st_{k}_{dt}")
      m = pc.precompute(dataset_dir=ds, cfg=cfg, params=teacher, teacher_name="bench",
                        out_dir=out, k=k, progress=False, logp_dtype=dt, batch_size=8)
      tokens = 0
      st = S.TeacherStore(out)
      for ident in st.ids():
        tokens += len(st.get(ident).positions)
      sizes[(k, dt)] = sum(s["bytes"] for s in m.shards) / tokens
      if (k, dt) != (64, "float16"):
        shutil.rmtree(out)
  print(f"reason tokens KL (teacher ‖ early student), exact full vocabulary: sum {full:.1f}")
  for k in ks:
    print(f"k={k:3d}: bytes/token float16 {sizes[(k, 'float16')]:.0f}, bfloat16 "
          f"{sizes[(k, 'bfloat16')]:.0f}, int8 {sizes[(k, 'int8')]:.0f}; KL rel. error "
          f"tail_bucket {errs[(k, 'tail_bucket')]:.2e}, ignore {errs[(k, 'ignore')]:.2e}")

  # 3. precompute vs pure forward over the same fixed batches, for the trained teacher
  # and for a larger one (shape S, untrained: only its cost matters here)
  n = len(train) + len(val)
  exs = [src[i] for src in (train, val) for i in range(len(src))]
  groups = []
  for lo in range(0, len(exs), 8):
    b = exs[lo: lo + 8]
    length = pc._bucket(max(len(e["ids"]) for e in b), 1024)
    ids = np.zeros((8, length), np.int32)
    for j, e in enumerate(b):
      ids[j, :len(e["ids"])] = e["ids"]
    groups.append(ids)
  cfg_big = cfg.replace(hidden_size=256, intermediate_size=704, num_layers=4, head_dim=64)
  # the demo's (and the coin study's) teacher: configs/study_coin.py TEACHER
  cfg_demo = cfg.replace(hidden_size=192, intermediate_size=512, num_layers=4, num_heads=2,
                         num_kv_heads=1, head_dim=96)
  rates, rate_times = {}, {}
  for label, c, p in (("trained d=128 x2", cfg, teacher),
                      ("demo teacher d=192 x4", cfg_demo,
                       T.init_params(cfg_demo, jax.random.PRNGKey(3))),
                      ("shape S d=256 x4", cfg_big, T.init_params(cfg_big, jax.random.PRNGKey(2)))):
    fwd = jax.jit(lambda p, ids, c=c: jax.nn.log_softmax(T.Transformer(c).apply({"params": p},
                                                                                 ids)))
    for g in groups:
      jax.block_until_ready(fwd(p, g))
    t_pre, t_fwd = [], []
    for r in range(args.repeats):
      out = os.path.join(work, f"pre{r}")
      t0 = time.perf_counter()
      pc.precompute(dataset_dir=ds, cfg=c, params=p, teacher_name="bench", out_dir=out,
                    k=64, progress=False, batch_size=8)
      t_pre.append(time.perf_counter() - t0)
      shutil.rmtree(out)
      t0 = time.perf_counter()
      for g in groups:
        np.asarray(fwd(p, g)[:, :, :1])  # to host, as precompute does with its top-k
      t_fwd.append(time.perf_counter() - t0)
    pre_rate, fwd_rate = n / min(t_pre), n / min(t_fwd)
    rates[label] = (pre_rate, fwd_rate)
    rate_times[label] = {"precompute_s": t_pre, "forward_s": t_fwd}
    print(f"{label}: precompute {pre_rate:.1f} traj/s vs pure forward {fwd_rate:.1f} traj/s: "
          f"{pre_rate / fwd_rate:.2f} (target >= 0.90)")
  pre_rate, fwd_rate = rates["trained d=128 x2"]

  # 4. reader vs training consumption (shape S step, batch 4 × 512)
  st = S.TeacherStore(os.path.join(work, "st_64_float16"))
  ids_all = st.ids()
  rng = np.random.default_rng(0)
  t0 = time.perf_counter()
  reads = 0
  while time.perf_counter() - t0 < 3.0:
    pick = rng.choice(ids_all, 8, replace=False)
    S.gather(st, [[(str(i), 0)] for i in pick], length=1024)
    reads += 8
  read_rate = reads / (time.perf_counter() - t0)
  cfg_s = ModelConfig(model_type="llama", vocab_size=8192, hidden_size=256,
                      intermediate_size=704, num_layers=4, num_heads=4, num_kv_heads=2,
                      head_dim=64)
  ps = T.init_params(cfg_s, jax.random.PRNGKey(1))
  obj = O.Objective(name="sad", groups=O.groups_for("sad"),
                    settings=losses.LossSettings(chunk_size=256))
  B, L, k = 4, 512, 64
  x = jnp.asarray(rng.integers(0, 8192, (B, L)))
  kinds = jnp.asarray(rng.choice([3, 4, 5], (B, L)))
  teach = losses.TeacherTopK(jnp.asarray(rng.integers(0, 8192, (B, L, k))),
                             jnp.full((B, L, k), -6.0), kinds == 3)
  step = jax.jit(lambda p: O.value_and_grad(
      obj, lambda q: T.features(cfg_s, q, x), p, labels_bt=x, label_kinds_bt=kinds,
      teacher=teach, fixed_weights_g=jnp.ones(2)))
  jax.block_until_ready(step(ps))
  times = []
  for _ in range(args.repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(step(ps))
    times.append(time.perf_counter() - t0)
  train_rate = B / min(times)
  print(f"reader {read_rate:.0f} traj/s vs training consumption {train_rate:.1f} traj/s "
        f"(shape S, batch {B}×{L}): {read_rate / train_rate:.0f}x (target >= 20x)")
  print(json.dumps({"bytes_per_token": {f"{k}_{d}": v for (k, d), v in sizes.items()},
                    "kl_rel_error": {f"{k}_{t}": v for (k, t), v in errs.items()},
                    "precompute_vs_forward_traj_s": rates,
                    "reader_traj_s": read_rate, "train_traj_s": train_rate}))
  if args.json:
    out = {"args": {"steps": args.steps, "repeats": args.repeats},
           "device": str(jax.devices()[0].device_kind), "dtype": "float32",
           "vocab_size": tok.vocab_size, "trajectories": n,
           "teacher": {"d": cfg.hidden_size, "layers": cfg.num_layers, "sft_steps": args.steps,
                       "final_loss": final_loss, "student_step": args.steps // 6},
           "kl_full_sum": full,
           "bytes_per_token": {str(k): {d: sizes[(k, d)] for d in S.LOGP_DTYPES} for k in ks},
           "kl_rel_error": {str(k): {t: errs[(k, t)] for t in losses.TAIL_RULES} for k in ks},
           "precompute": [{"teacher": label, "precompute_traj_s": pre, "forward_traj_s": fwd,
                           "ratio": pre / fwd, **rate_times[label]}
                          for label, (pre, fwd) in rates.items()],
           "precompute_target": 0.90,
           "reader": {"traj_s": read_rate, "batch": 8, "length": 1024, "k": 64},
           "train": {"traj_s": train_rate, "batch": B, "length": L, "step_s": times},
           "reader_vs_train": read_rate / train_rate, "reader_target": 20.0}
    fileio.json_dump(args.json, out, indent=1)  # whole or not at all
  shutil.rmtree(work)


if __name__ == "__main__":
  main()
