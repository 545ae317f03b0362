"""Train-step throughput, peak memory and MFU of the project's full train step.

  python bench/train_step.py [--shapes S,M] [--repeats 3] [--steps 3] [--dtype float32]

The step is `step.train_step` exactly as the trainer jits it (forward, span losses with the
teacher top-k, backward, AdamW, one device), on packed rows of random tokens whose span
kinds are mixed (40% reason, 20% action, 40% observation; k=16 teacher top-k).
MFU = model FLOPs per token (metrics.model_flops_per_token: 6·matmul params + attention)
× tokens/s ÷ the matmul peak measured in the same run (best n×n×n matmul, n ∈ {1024, 2048}).
Peak memory is XLA's compiled memory analysis of the step (arguments + outputs + temporaries
− donated aliases), a deterministic figure.

Shapes (issue 6):
  S: vocab 8192, d_model 256, 4 layers, 4 heads (2 kv), ffn 704, seq 512, batch 4
  M: vocab 32000, d_model 512, 8 layers, 8 heads (4 kv), ffn 1408, seq 1024, batch 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sad_jax import metrics, objectives, sharding, train
from sad_jax import step as step_lib
from sad_jax.data import pipeline
from sad_jax.models import transformer
from sad_jax.models.config import ModelConfig
from sad_jax.types import SpanKind

SHAPES = {
    "S": dict(vocab=8192, d=256, layers=4, heads=4, kv=2, ffn=704, seq=512, batch=4),
    "M": dict(vocab=32000, d=512, layers=8, heads=8, kv=4, ffn=1408, seq=1024, batch=2),
}
K = 16


def model_config(s) -> ModelConfig:
  return ModelConfig(model_type="llama", vocab_size=s["vocab"], hidden_size=s["d"],
                     intermediate_size=s["ffn"], num_layers=s["layers"], num_heads=s["heads"],
                     num_kv_heads=s["kv"], head_dim=s["d"] // s["heads"])


def host_batch(s, seed=0) -> dict:
  rng = np.random.default_rng(seed)
  layout = pipeline.Layout(accum=1, rows=s["batch"], length=s["seq"] + 1, k=K)
  b = pipeline.empty_batch(layout, teacher=True)
  shape = b["ids"].shape
  b["ids"][:] = rng.integers(0, s["vocab"], shape)
  b["kinds"][:] = rng.choice([SpanKind.REASON, SpanKind.ACTION, SpanKind.OBSERVATION],
                             size=shape, p=[0.4, 0.2, 0.4])
  # two trajectories per row
  half = shape[-1] // 2
  b["segment_ids"][..., :half], b["segment_ids"][..., half:] = 1, 2
  b["positions"][..., :half] = np.arange(half)
  b["positions"][..., half:] = np.arange(shape[-1] - half)
  b["weight"][:] = 1.0
  b["teacher_ids"][:] = rng.integers(0, s["vocab"], shape + (K,))
  b["teacher_logp"][:] = np.log(rng.dirichlet(np.ones(K), size=shape) * 0.9)
  b["teacher_mask"][:] = b["kinds"] == SpanKind.REASON
  return b


def optim_config():
  c = ml_collections.ConfigDict(dict(lr=1e-4, warmup_steps=10, final_fraction=0.1, b1=0.9,
                                     b2=0.98, eps=1e-8, weight_decay=0.01, clip_norm=1.0))
  return c


def objective_config():
  return ml_collections.ConfigDict(dict(
      name="sad", divergence="fkl", jsd_beta=0.5, temperature=1.0, tail="tail_bucket",
      label_smoothing=0.0, chunk_size=256, learnable_weights=False, weight_floor=0.05,
      curriculum_gamma=0.1, pcgrad=False))


def bench_shape(name: str, *, repeats: int, steps: int, dtype: str, peak: float) -> dict:
  s = SHAPES[name]
  cfg = model_config(s)
  mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  rules = sharding.DEFAULT_RULES
  obj = objectives.build(objective_config())
  tx = step_lib.make_optimizer(optim_config(), 1000)
  schedule = step_lib.lr_schedule(optim_config(), 1000)

  def init():
    return step_lib.init_state(transformer.init_params(cfg, jax.random.key(0)),
                               objectives.init_span_params(obj), tx, 0)

  state_sh = train.state_shardings(jax.eval_shape(init), mesh, rules, tx)
  batch = host_batch(s)
  batch_sh = train.batch_sharding_for(s["batch"], mesh, rules)
  data_sh = jax.tree.map(lambda _: batch_sh, batch)
  step = train.jit_train_step(model_cfg=cfg, obj=obj, tx=tx, schedule=schedule,
                              dtype=jnp.dtype(dtype), remat="none", online=None,
                              state_sh=state_sh, data_sh=data_sh, teacher_sh=None)
  weights = jnp.ones(2, jnp.float32)
  with sharding.use_mesh(mesh, rules):
    state = jax.jit(init, out_shardings=state_sh)()
    dev_batch = jax.device_put(batch, data_sh)
    t0 = time.perf_counter()
    compiled = step.lower(state, dev_batch, weights, None).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    peak_bytes = (mem.argument_size_in_bytes + mem.output_size_in_bytes
                  + mem.temp_size_in_bytes - mem.alias_size_in_bytes)
    state, m = compiled(state, dev_batch, weights, None)  # warm-up
    jax.block_until_ready(m)
    times = []
    for _ in range(repeats):
      t0 = time.perf_counter()
      for _ in range(steps):
        state, m = compiled(state, dev_batch, weights, None)
      jax.block_until_ready(m)
      times.append((time.perf_counter() - t0) / steps)
  tokens = s["batch"] * s["seq"]
  flops = metrics.model_flops_per_token(cfg, s["seq"]) * tokens
  best, med = min(times), statistics.median(times)
  return {"shape": name, "dtype": dtype, "tokens_per_step": tokens,
          "step_s_best": best, "step_s_median": med, "tokens_per_s_best": tokens / best,
          "tokens_per_s_median": tokens / med, "model_gflop_per_step": flops / 1e9,
          "mfu_best": flops / best / peak, "mfu_median": flops / med / peak,
          "peak_memory_mib": peak_bytes / 2**20, "temp_memory_mib": mem.temp_size_in_bytes / 2**20,
          "compile_s": compile_s, "loss": float(m["loss"])}


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--shapes", default="S,M")
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--steps", type=int, default=3, help="steps per timed repeat")
  ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  args = ap.parse_args()
  peak = max(metrics.measure_matmul_peak(args.dtype, n=n) for n in (1024, 2048))
  print(f"device: {jax.devices()[0].device_kind} ×1; matmul peak ({args.dtype}) "
        f"{peak / 1e9:.1f} GFLOP/s")
  for name in args.shapes.split(","):
    r = bench_shape(name, repeats=args.repeats, steps=args.steps, dtype=args.dtype, peak=peak)
    r["matmul_peak_gflops"] = peak / 1e9
    print(json.dumps(r))
    print(f"{name}: {r['tokens_per_s_best']:.0f} tokens/s best ({r['tokens_per_s_median']:.0f} "
          f"median), step {r['step_s_best']:.2f} s, MFU {100 * r['mfu_best']:.1f}% best "
          f"({100 * r['mfu_median']:.1f}% median) of the measured matmul peak, peak memory "
          f"{r['peak_memory_mib']:.0f} MiB, compile {r['compile_s']:.1f} s")


if __name__ == "__main__":
  main()
