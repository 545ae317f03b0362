"""Loss memory and step time: the chunked (fused) head loss against the naive one.

  python bench/loss_memory.py [--repeats 3] [--time-batch 1] [--json OUT.json]

1. Peak temporary memory of value_and_grad(sad loss) w.r.t. hidden states and LM head,
   from XLA's compiled memory analysis (deterministic), at B=8, T=2048, V=32000, d=1024
   (k=64 teacher top-k; reason/action/observation targets mixed).
2. Step time of the same value_and_grad, naive vs chunked, interleaved and repeated, at
   the same T, V, d with --time-batch rows (B=8 takes about a minute per step on 2 cores).
3. PCGrad's cost: objectives.value_and_grad with pcgrad on vs off, a one-layer trunk.
Targets (issue 4): chunked peak ≤ 25% of naive; chunked time within 10% of naive.
`--json` writes every figure (and the arguments) to a file.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sad_jax.common import fileio
from sad_jax.common.types import SpanKind
from sad_jax.distill import losses
from sad_jax.distill import objectives as O


def make_inputs(B, T, V, D, k, seed=0):
  rng = np.random.default_rng(seed)
  kinds = rng.choice([SpanKind.REASON, SpanKind.ACTION, SpanKind.OBSERVATION], size=(B, T),
                     p=[0.4, 0.2, 0.4]).astype(np.int32)
  logp = np.log(rng.dirichlet(np.ones(k), size=(B, T)) * 0.95).astype(np.float16)
  return {
      "h": jnp.asarray(rng.normal(size=(B, T, D)), jnp.float32),
      "w": jnp.asarray(rng.normal(size=(D, V)) / np.sqrt(D), jnp.float32),
      "labels": jnp.asarray(rng.integers(0, V, (B, T)), jnp.int32),
      "kinds": jnp.asarray(kinds),
      "teacher": losses.TeacherTopK(jnp.asarray(rng.integers(0, V, (B, T, k)), jnp.int32),
                                    jnp.asarray(logp), jnp.asarray(kinds == SpanKind.REASON)),
  }


def loss_fn(kind: str, chunk: int):
  obj = O.Objective(name="sad", groups=O.groups_for("sad"),
                    settings=losses.LossSettings(chunk_size=chunk), chunked=kind == "chunked")

  def f(h, w, labels, kinds, teacher):
    loss, _ = O.objective_loss(obj, h_btd=h, w_dv=w, labels_bt=labels, label_kinds_bt=kinds,
                               teacher=teacher, fixed_weights_g=jnp.ones(2))
    return loss

  return jax.jit(jax.value_and_grad(f, argnums=(0, 1)))


def memory(B, T, V, D, k, chunk):
  x = make_inputs(1, 1, 1, 1, 1)  # shapes only: abstract arguments below
  del x
  spec = (jax.ShapeDtypeStruct((B, T, D), jnp.float32), jax.ShapeDtypeStruct((D, V), jnp.float32),
          jax.ShapeDtypeStruct((B, T), jnp.int32), jax.ShapeDtypeStruct((B, T), jnp.int32),
          losses.TeacherTopK(jax.ShapeDtypeStruct((B, T, k), jnp.int32),
                             jax.ShapeDtypeStruct((B, T, k), jnp.float16),
                             jax.ShapeDtypeStruct((B, T), jnp.bool_)))
  out = {}
  for kind in ("naive", "chunked"):
    mem = loss_fn(kind, chunk).lower(*spec).compile().memory_analysis()
    out[kind] = int(mem.temp_size_in_bytes)
  return out


def timing(B, T, V, D, k, chunk, repeats):
  x = make_inputs(B, T, V, D, k)
  args = (x["h"], x["w"], x["labels"], x["kinds"], x["teacher"])
  fns = {kind: loss_fn(kind, chunk) for kind in ("naive", "chunked")}
  for f in fns.values():
    jax.block_until_ready(f(*args))
  times = {kind: [] for kind in fns}
  for _ in range(repeats):
    for kind, f in fns.items():
      t0 = time.perf_counter()
      jax.block_until_ready(f(*args))
      times[kind].append(time.perf_counter() - t0)
  (ln, (gh_n, gw_n)), (lc, (gh_c, gw_c)) = fns["naive"](*args), fns["chunked"](*args)
  err = max(float(jnp.max(jnp.abs(gw_n - gw_c)) / jnp.max(jnp.abs(gw_n))),
            float(jnp.max(jnp.abs(gh_n - gh_c)) / jnp.max(jnp.abs(gh_n))))
  return times, abs(float(ln) - float(lc)) / abs(float(ln)), err


def pcgrad_cost(B, T, V, D, k, repeats):
  x = make_inputs(B, T, V, D, k)
  rng = np.random.default_rng(1)
  params = {"w1": jnp.asarray(rng.normal(size=(D, D)) / np.sqrt(D), jnp.float32), "head": x["w"]}

  def features(p):
    return jnp.tanh(x["h"] @ p["w1"]), p["head"], None

  fns = {}
  for mode in ("plain", "pcgrad"):
    obj = O.Objective(name="sad", groups=O.groups_for("sad"),
                      settings=losses.LossSettings(chunk_size=256), pcgrad=mode == "pcgrad")
    fns[mode] = jax.jit(lambda p, obj=obj: O.value_and_grad(
        obj, features, p, labels_bt=x["labels"], label_kinds_bt=x["kinds"],
        teacher=x["teacher"], fixed_weights_g=jnp.ones(2)))
    jax.block_until_ready(fns[mode](params))
  times = {m: [] for m in fns}
  for _ in range(repeats):
    for m, f in fns.items():
      t0 = time.perf_counter()
      jax.block_until_ready(f(params))
      times[m].append(time.perf_counter() - t0)
  return times


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--time-batch", type=int, default=1)
  parser.add_argument("--chunk", type=int, default=256)
  parser.add_argument("--json", default=None, help="write all results here")
  args = parser.parse_args()
  B, T, V, D, k = 8, 2048, 32000, 1024, 64
  mem = memory(B, T, V, D, k, args.chunk)
  mib = {kk: v / 2**20 for kk, v in mem.items()}
  print(f"memory  B={B} T={T} V={V} d={D} k={k} chunk={args.chunk}: naive {mib['naive']:.0f} MiB,"
        f" chunked {mib['chunked']:.0f} MiB, ratio {mem['chunked'] / mem['naive']:.3f} "
        f"(target <= 0.25)")
  tb = args.time_batch
  times, loss_err, grad_err = timing(tb, T, V, D, k, args.chunk, args.repeats)
  best = {kk: min(v) for kk, v in times.items()}
  med = {kk: float(np.median(v)) for kk, v in times.items()}
  print(f"time    B={tb} T={T} V={V} d={D}: naive best {best['naive']:.2f} s (median "
        f"{med['naive']:.2f}), chunked best {best['chunked']:.2f} s (median {med['chunked']:.2f}); "
        f"chunked/naive best {best['chunked'] / best['naive']:.3f}, median "
        f"{med['chunked'] / med['naive']:.3f} (target <= 1.10); rel. loss diff {loss_err:.1e}, "
        f"rel. grad diff {grad_err:.1e}")
  pc = pcgrad_cost(1, 1024, V, 512, k, args.repeats)
  pbest = {kk: min(v) for kk, v in pc.items()}
  print(f"pcgrad  B=1 T=1024 V={V} d=512, one-layer trunk: plain {pbest['plain']:.2f} s, pcgrad "
        f"{pbest['pcgrad']:.2f} s, ratio {pbest['pcgrad'] / pbest['plain']:.2f}")
  print(json.dumps({"memory_mib": mib, "time_best_s": best, "time_median_s": med,
                    "pcgrad_best_s": pbest, "device": str(jax.devices()[0].device_kind)}))
  if args.json:
    out = {"args": {"repeats": args.repeats, "time_batch": tb, "chunk": args.chunk},
           "device": str(jax.devices()[0].device_kind), "dtype": "float32",
           "memory": {"B": B, "T": T, "V": V, "d": D, "k": k, "naive_mib": mib["naive"],
                      "chunked_mib": mib["chunked"], "ratio": mem["chunked"] / mem["naive"],
                      "target_ratio": 0.25},
           "time": {"B": tb, "T": T, "V": V, "d": D, "k": k, "seconds": times,
                    "best_s": best, "median_s": med,
                    "ratio_best": best["chunked"] / best["naive"],
                    "ratio_median": med["chunked"] / med["naive"], "target_ratio": 1.10,
                    "rel_loss_diff": loss_err, "rel_grad_diff": grad_err},
           "pcgrad": {"B": 1, "T": 1024, "V": V, "d": 512, "k": k, "seconds": pc,
                      "best_s": pbest, "ratio_best": pbest["pcgrad"] / pbest["plain"]}}
    fileio.json_dump(args.json, out, indent=1)  # whole or not at all


if __name__ == "__main__":
  main()
