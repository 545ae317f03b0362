"""Train-step throughput, peak memory and MFU of the project's full train step, side by side
with a PyTorch peer (bench/peer_torch.py: transformers' LlamaForCausalLM + the same span
losses in plain PyTorch + torch.optim.AdamW).

  python bench/train_step.py [--shapes S,M] [--repeats 3] [--steps 3] [--dtype float32]
                             [--remat none|attention|block]
                             [--peer] [--threads N] [--json OUT.json]

Each framework runs in its own worker process (so that memory is measured alike and the
two never share the cores), with the same shape, dtype and thread count (XLA's CPU client
uses one thread per core; torch.set_num_threads(N)). Workers alternate per shape (JAX,
then the peer). Each reports tokens/s (best and median of --repeats timed repeats of
--steps steps), MFU against its own framework's n×n×n matmul peak measured in the same
worker, and peak memory: the highest resident set size sampled every 2 ms during the timed
steps, less the resident size before the model was built (same method for both). For the
JAX step, XLA's compiled memory analysis is reported as well.

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
import subprocess
import sys
import threading
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
# matmul sizes for the measured peak: an accelerator needs larger ones to reach its peak
PEAK_SIZES = {"cpu": (1024, 2048), "gpu": (4096, 8192), "tpu": (4096, 8192)}


def platform_kind() -> str:
  return jax.devices()[0].platform


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


def build_step(s: dict, *, dtype: str, remat: str, scan: bool = False):
  """The jitted train step of shape `s` on one device and what calling it needs:
  (step, model config, mesh, rules, init fn, state shardings, host batch, its shardings).
  Also compile_time.py's."""
  cfg = model_config(s)
  mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  rules = sharding.DEFAULT_RULES
  obj = objectives.build(objective_config())
  tx = step_lib.make_optimizer(optim_config(), 1000)
  schedule = step_lib.lr_schedule(optim_config(), 1000)

  def init():
    p = transformer.to_layout(transformer.init_params(cfg, jax.random.key(0)), scan=scan)
    return step_lib.init_state(p, objectives.init_span_params(obj), tx, 0)

  state_sh = train.state_shardings(jax.eval_shape(init), mesh, rules, tx)
  batch = host_batch(s)
  batch_sh = train.batch_sharding_for(s["batch"], mesh, rules)
  data_sh = jax.tree.map(lambda _: batch_sh, batch)
  step = train.jit_train_step(model_cfg=cfg, obj=obj, tx=tx, schedule=schedule,
                              dtype=jnp.dtype(dtype), remat=remat, online=None,
                              state_sh=state_sh, data_sh=data_sh, teacher_sh=None)
  return step, cfg, mesh, rules, init, state_sh, batch, data_sh


def bench_shape(name: str, *, repeats: int, steps: int, dtype: str, peak: float,
                remat: str = "none") -> dict:
  s = SHAPES[name]
  step, cfg, mesh, rules, init, state_sh, batch, data_sh = build_step(s, dtype=dtype,
                                                                      remat=remat)
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
    box = {"state": state}

    def one_step():
      box["state"], m = compiled(box["state"], dev_batch, weights, None)
      return m

    times, rss = timed(one_step, repeats=repeats, steps=steps, sync=jax.block_until_ready)
    m = one_step()
  tokens = s["batch"] * s["seq"]
  flops = metrics.model_flops_per_token(cfg, s["seq"]) * tokens
  return {"shape": name, "dtype": dtype, "remat": remat, "times": times, "rss_peak": rss,
          "model_gflop_per_step": flops / 1e9, "peak_memory_mib": peak_bytes / 2**20,
          "temp_memory_mib": mem.temp_size_in_bytes / 2**20, "compile_s": compile_s,
          "loss": float(m["loss"])}


class RssPeak:
  """Highest resident set size seen while active (sampled every 2 ms from /proc)."""

  def __init__(self):
    self.peak = 0
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, daemon=True)

  @staticmethod
  def now() -> int:
    with open("/proc/self/statm") as f:
      return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

  def _run(self):
    while not self._stop.is_set():
      self.peak = max(self.peak, self.now())
      time.sleep(0.002)

  def __enter__(self):
    self._thread.start()
    return self

  def __exit__(self, *exc):
    self._stop.set()
    self._thread.join()
    self.peak = max(self.peak, self.now())


def trim_heap() -> None:
  """Return freed heap pages to the OS, so that compilation's transient memory (kept by
  glibc's allocator) does not count as the step's."""
  import ctypes

  try:
    ctypes.CDLL("libc.so.6").malloc_trim(0)
  except (OSError, AttributeError):
    pass


def timed(step_fn, *, repeats: int, steps: int, sync) -> tuple[list[float], int]:
  """Per-step seconds of each repeat and the peak RSS during them (after one warm-up)."""
  sync(step_fn())
  trim_heap()
  times = []
  with RssPeak() as rss:
    for _ in range(repeats):
      t0 = time.perf_counter()
      for _ in range(steps):
        out = step_fn()
      sync(out)
      times.append((time.perf_counter() - t0) / steps)
  return times, rss.peak


def summary(name: str, framework: str, s: dict, times: list[float], peak: float,
            flops_per_token: float) -> dict:
  tokens = s["batch"] * s["seq"]
  best, med = min(times), statistics.median(times)
  return {"shape": name, "framework": framework, "tokens_per_step": tokens,
          "step_s_best": best, "step_s_median": med, "tokens_per_s_best": tokens / best,
          "tokens_per_s_median": tokens / med, "matmul_peak_gflops": peak / 1e9,
          "mfu_best": flops_per_token * tokens / best / peak,
          "mfu_median": flops_per_token * tokens / med / peak}


def worker(framework: str, name: str, *, repeats: int, steps: int, dtype: str,
           remat: str = "none") -> dict:
  s = SHAPES[name]
  cfg = model_config(s)
  flops = metrics.model_flops_per_token(cfg, s["seq"])
  if framework == "jax":
    peak = max(metrics.measure_matmul_peak(dtype, n=n) for n in PEAK_SIZES[platform_kind()])
    trim_heap()
    base = RssPeak.now()
    r = bench_shape(name, repeats=repeats, steps=steps, dtype=dtype, peak=peak, remat=remat)
    r.update(summary(name, "jax", s, r.pop("times"), peak, flops))
    r["peak_rss_mib"] = (r.pop("rss_peak") - base) / 2**20
    return r
  import torch

  from bench import peer_torch

  peak = max(peer_torch.matmul_peak(dtype, n=n) for n in (1024, 2048))
  trim_heap()
  base = RssPeak.now()
  model, opt = peer_torch.build(s, dtype)
  batch = peer_torch.to_torch_batch(host_batch(s))
  step = peer_torch.make_step(model, opt, int(SpanKind.REASON), int(SpanKind.ACTION))
  losses = []
  times, rss = timed(lambda: losses.append(step(batch)), repeats=repeats, steps=steps,
                     sync=lambda _: None)
  r = summary(name, "torch", s, times, peak, flops)
  r |= {"dtype": dtype, "peak_rss_mib": (rss - base) / 2**20, "loss": losses[0],
        "threads": torch.get_num_threads(), "version": torch.__version__}
  return r




def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--shapes", default="S,M")
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--steps", type=int, default=3, help="steps per timed repeat")
  ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  ap.add_argument("--remat", default="none", choices=train.REMAT,
                  help="sad_jax's model.remat for the step (attention: recompute the "
                       "attention scores in the backward instead of keeping them)")
  ap.add_argument("--peer", action="store_true", help="also time the PyTorch peer")
  ap.add_argument("--threads", type=int, default=os.cpu_count(),
                  help="threads for both frameworks (XLA: one per core)")
  ap.add_argument("--json", default=None, help="write all results here")
  ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
  args = ap.parse_args()
  if args.worker:
    if args.worker == "torch":
      import torch

      torch.set_num_threads(args.threads)
    r = worker(args.worker, args.shapes, repeats=args.repeats, steps=args.steps,
               dtype=args.dtype, remat=args.remat)
    print("RESULT " + json.dumps(r), flush=True)
    return
  env = dict(os.environ)
  # XLA's CPU client sizes its pool from the visible cores: pin both workers to the same set
  cores = sorted(os.sched_getaffinity(0))[:args.threads]
  print(f"{metrics.cpu_model()}, {os.cpu_count()} cores; {args.threads} threads per framework; "
        f"{args.dtype}; sad_jax remat={args.remat}")
  results = []
  for name in args.shapes.split(","):
    row = {}
    for fw in ("jax", "torch") if args.peer else ("jax",):
      cmd = [sys.executable, os.path.abspath(__file__), "--worker", fw, "--shapes", name,
             "--repeats", str(args.repeats), "--steps", str(args.steps), "--dtype", args.dtype,
             "--threads", str(args.threads), "--remat", args.remat]
      p = subprocess.run(cmd, env=env, capture_output=True, text=True,
                         preexec_fn=lambda: os.sched_setaffinity(0, cores))
      lines = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
      if p.returncode or not lines:
        sys.exit(f"{fw} worker for {name} failed:\n{p.stdout}\n{p.stderr[-3000:]}")
      r = json.loads(lines[-1][len("RESULT "):])
      row[fw] = r
      print(f"{name} {fw:5s}: {r['tokens_per_s_best']:.0f} tokens/s best "
            f"({r['tokens_per_s_median']:.0f} median), MFU {100 * r['mfu_best']:.1f}% of its "
            f"{r['matmul_peak_gflops']:.0f} GFLOP/s matmul peak, peak memory "
            f"{r['peak_rss_mib']:.0f} MiB (RSS)"
            + (f", XLA analysis {r['peak_memory_mib']:.0f} MiB" if fw == "jax" else ""),
            flush=True)
    if "torch" in row:
      ratio = row["jax"]["tokens_per_s_best"] / row["torch"]["tokens_per_s_best"]
      row["speedup_best"] = ratio
      row["speedup_median"] = (row["jax"]["tokens_per_s_median"]
                               / row["torch"]["tokens_per_s_median"])
      row["memory_ratio"] = row["jax"]["peak_rss_mib"] / row["torch"]["peak_rss_mib"]
      print(f"{name}: sad_jax / PyTorch peer = {ratio:.2f}× tokens/s (best), "
            f"{row['speedup_median']:.2f}× (median); memory {row['memory_ratio']:.2f}×")
    results.append({"shape": name, "config": SHAPES[name], **row})
  if args.json:
    out = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpu": metrics.cpu_model(),
           "cores": os.cpu_count(), "threads": args.threads, "dtype": args.dtype,
           "remat": args.remat, "repeats": args.repeats, "steps": args.steps, "shapes": args.shapes,
           "peer": args.peer, "results": results}
    with open(args.json, "w") as f:
      json.dump(out, f, indent=1)


if __name__ == "__main__":
  main()
