"""Compile time of the train step against depth, unrolled layers vs scanned layers
(model.scan_layers, issue 21.3).

  python bench/compile_time.py [--depths 2,4,8,16] [--repeats 2] [--remat none]
                               [--step-repeats 3] [--json OUT.json]

The step is `step.train_step` as the trainer jits it (train.jit_train_step: forward, span
losses with the teacher top-k, backward, AdamW; one device) at a small width (vocab 8192,
d_model 256, 4 heads / 2 kv, ffn 704, seq 256, batch 2) and 2 … 16 layers. For each depth
and layout it times tracing + lowering and XLA compilation of a freshly built jit (no
compilation cache), best of --repeats with the two layouts alternating, and reports XLA's
compiled memory analysis and the step time (best of --step-repeats runs after one warm-up).
The scanned model runs the same initial parameters, stacked. Ratios are scanned ÷
unrolled, measured in the same process.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp

jax.config.update("jax_enable_compilation_cache", False)  # every compile is measured cold

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from train_step import build_step  # noqa: E402

from sad_jax.common import sharding  # noqa: E402
from sad_jax.trainer.metrics import cpu_model  # noqa: E402

SHAPE = dict(vocab=8192, d=256, heads=4, kv=2, ffn=704, seq=256, batch=2)


def build(layers: int, *, scan: bool, remat: str):
  """(jitted step, mesh, rules, init fn, state shardings, host batch, its shardings)."""
  step, _, *rest = build_step({**SHAPE, "layers": layers}, dtype="float32", remat=remat,
                              scan=scan)
  return step, *rest


def measure(layers: int, *, scan: bool, remat: str) -> dict:
  step, mesh, rules, init, state_sh, batch, data_sh = build(layers, scan=scan, remat=remat)
  abstract = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                          jax.eval_shape(init), state_sh)
  abstract_batch = jax.tree.map(
      lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), batch, data_sh)
  weights = jax.ShapeDtypeStruct((2,), jnp.float32)
  with sharding.use_mesh(mesh, rules):
    t0 = time.perf_counter()
    lowered = step.lower(abstract, abstract_batch, weights, None)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
  mem = compiled.memory_analysis()
  return {"lower_s": t1 - t0, "compile_s": t2 - t1, "hlo_chars": len(lowered.as_text()),
          "temp_mib": mem.temp_size_in_bytes / 2**20, "compiled": compiled,
          "init": init, "state_sh": state_sh, "batch": batch, "data_sh": data_sh,
          "mesh": mesh, "rules": rules}


def step_time(m: dict, repeats: int) -> tuple[float, float]:
  """(best seconds per step, loss of the first step) of the compiled step."""
  with sharding.use_mesh(m["mesh"], m["rules"]):
    state = jax.jit(m["init"], out_shardings=m["state_sh"])()
    batch = jax.device_put(m["batch"], m["data_sh"])
    weights = jnp.ones(2, jnp.float32)
    state, metrics = m["compiled"](state, batch, weights, None)  # the state is donated
    loss = float(metrics["loss"])
    best = float("inf")
    for _ in range(repeats):
      t0 = time.perf_counter()
      state, metrics = jax.block_until_ready(m["compiled"](state, batch, weights, None))
      best = min(best, time.perf_counter() - t0)
  return best, loss


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--depths", default="2,4,8,16")
  ap.add_argument("--repeats", type=int, default=2)
  ap.add_argument("--step-repeats", type=int, default=3)
  ap.add_argument("--remat", default="none", choices=("none", "attention", "block"))
  ap.add_argument("--json", default=None)
  args = ap.parse_args()
  depths = [int(x) for x in args.depths.split(",")]
  rows = []
  print(f"{cpu_model()}, {os.cpu_count()} cores, JAX {jax.__version__}, {jax.devices()[0]}; "
        f"width {SHAPE}, remat {args.remat}", flush=True)
  print(f"{'layers':>6} {'layout':>8} {'lower s':>8} {'compile s':>9} {'total s':>8} "
        f"{'HLO chars':>10} {'temp MiB':>9} {'step s':>7} {'loss':>8}", flush=True)
  measure(1, scan=False, remat=args.remat)  # warm-up: XLA's one-off start-up is nobody's cost
  for n in depths:
    best: dict[str, dict] = {}
    for _ in range(args.repeats):
      for layout in ("unrolled", "scanned"):
        m = measure(n, scan=layout == "scanned", remat=args.remat)
        total = m["lower_s"] + m["compile_s"]
        if layout not in best or total < best[layout]["lower_s"] + best[layout]["compile_s"]:
          best[layout] = m
    row = {"layers": n}
    for layout in ("unrolled", "scanned"):
      m = best[layout]
      sec, loss = step_time(m, args.step_repeats)
      row[layout] = {k: m[k] for k in ("lower_s", "compile_s", "hlo_chars", "temp_mib")}
      row[layout].update(total_s=m["lower_s"] + m["compile_s"], step_s=sec, loss=loss)
      r = row[layout]
      print(f"{n:>6} {layout:>8} {r['lower_s']:>8.2f} {r['compile_s']:>9.2f} "
            f"{r['total_s']:>8.2f} {r['hlo_chars']:>10,} {r['temp_mib']:>9.1f} "
            f"{r['step_s']:>7.3f} {r['loss']:>8.4f}", flush=True)
    u, s = row["unrolled"], row["scanned"]
    row["ratio_total"] = s["total_s"] / u["total_s"]
    row["ratio_compile"] = s["compile_s"] / u["compile_s"]
    row["ratio_step"] = s["step_s"] / u["step_s"]
    row["same_loss"] = abs(s["loss"] - u["loss"]) <= 1e-4 * abs(u["loss"])
    print(f"{n:>6} {'ratio':>8} scanned/unrolled: lower+compile {row['ratio_total']:.2f}, "
          f"compile {row['ratio_compile']:.2f}, step {row['ratio_step']:.2f}; "
          f"same loss {row['same_loss']}", flush=True)
    rows.append(row)
  first, last = rows[0], rows[-1]
  growth = {layout: last[layout]["total_s"] / first[layout]["total_s"]
            for layout in ("unrolled", "scanned")}
  print(f"{first['layers']} → {last['layers']} layers: unrolled lower+compile grows "
        f"{growth['unrolled']:.1f}×, scanned {growth['scanned']:.1f}×", flush=True)
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"device": jax.devices()[0].platform, "shape": SHAPE, "remat": args.remat,
                 "repeats": args.repeats, "step_repeats": args.step_repeats, "rows": rows,
                 "growth": growth}, f, indent=1)


if __name__ == "__main__":
  main()
