"""Train-step throughput, peak memory and MFU of the project's full train step, side by side
with a PyTorch peer (bench/peer_torch.py: transformers' LlamaForCausalLM + the same span
losses in plain PyTorch + torch.optim.AdamW), on several span mixes.

  python bench/train_step.py [--shapes S,M] [--mix synthetic,demo,fireact] [--repeats 3]
                             [--steps 3] [--dtype float32] [--remat none|attention|block]
                             [--attention flash|reference]
                             [--peer] [--peer-variants previous,best] [--full-head]
                             [--profile ROUNDS] [--threads N] [--json OUT.json]

Each framework (and each peer variant) runs in its own worker process (so that memory is
measured alike and no two share the cores), with the same shape, dtype, thread count
(XLA's CPU client uses one thread per core; torch.set_num_threads(N)) and the very same
packed batch. Workers alternate per shape and mix (JAX, then each peer variant). Each
reports tokens/s (best and median of --repeats timed repeats of --steps steps), MFU against
its own framework's n×n×n matmul peak measured in the same worker, the FLOPs the step
executes per token, and peak memory: the highest resident set size sampled every 2 ms
during the timed steps, less the resident size before the model was built (same method
for all). For the JAX step, XLA's compiled memory analysis is reported as well.

The step is `step.train_step` exactly as the trainer jits it (forward, span losses with the
teacher top-k, backward, AdamW, one device), on packed rows of random tokens whose span
kinds, trajectory lengths and row layout come from --mix (bench/span_mixes.py: synthetic
40/20/40 reason/action/observation, or the demo's or FireAct's prepared trajectories
packed by the trainer's packing; k=16 teacher top-k on the reason tokens). Each mix's
token shares (reason, action, answer, observation, other, padding) and loss-target share
are printed and saved. The peer's variants (issue 23.3): `previous`, the step as first
written, and `best`, the fastest honest variant (bench/peer_torch.py says what differs).
MFU = model FLOPs per token (metrics.model_flops_per_token: 6·matmul params + attention)
× tokens/s ÷ the matmul peak measured in the same worker (best n×n×n matmul, n ∈ {1024,
2048}). Executed FLOPs per token: for both, an analytic count of the matmuls the step
runs (sad_jax: the head only over the chunks the compact loop runs, blockwise attention,
executed_flops_parts; the peer: the full head at every position, causal attention over
the whole row, peer_torch.executed_flops_parts); "executed fraction" = executed
FLOP/s ÷ the same peak. XLA's compiled memory analysis of the step (arguments + outputs +
temporaries − donated aliases) is reported next to RSS, a deterministic figure.
--profile ROUNDS: after the timing, each worker (not the full-head one) traces ROUNDS more
steps and reports where its time went by kind of work (bench/step_kinds.py: matmuls,
attention core, element-wise, optimizer, between ops), with the GFLOP/s its matmuls and
attention reached.

Shapes (issue 6):
  S: vocab 8192, d_model 256, 4 layers, 4 heads (2 kv), ffn 704, seq 512, batch 4
  M: vocab 32000, d_model 512, 8 layers, 8 heads (4 kv), ffn 1408, seq 1024, batch 2
  XS: a smoke size for the tests (vocab 512, d_model 64, 2 layers, seq 256, batch 2)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import span_mixes, step_kinds
from sad_jax.common import fileio, sharding
from sad_jax.distill import losses, objectives
from sad_jax.models import flash, transformer
from sad_jax.models.config import ModelConfig
from sad_jax.trainer import metrics, train
from sad_jax.trainer import setup as train_setup
from sad_jax.trainer import step as step_lib

SHAPES = {
    "S": dict(vocab=8192, d=256, layers=4, heads=4, kv=2, ffn=704, seq=512, batch=4),
    "M": dict(vocab=32000, d=512, layers=8, heads=8, kv=4, ffn=1408, seq=1024, batch=2),
    "XS": dict(vocab=512, d=64, layers=2, heads=2, kv=1, ffn=128, seq=256, batch=2),
}
K = 16
# the trainer's default kernel (configs/train_base.py: model.attention)
DEFAULT_ATTENTION = "flash"
# matmul sizes for the measured peak: an accelerator needs larger ones to reach its peak
PEAK_SIZES = {"cpu": (1024, 2048), "gpu": (4096, 8192), "tpu": (4096, 8192)}


def platform_kind() -> str:
  return jax.devices()[0].platform


def model_config(s, attention: str = DEFAULT_ATTENTION) -> ModelConfig:
  return ModelConfig(model_type="llama", vocab_size=s["vocab"], hidden_size=s["d"],
                     intermediate_size=s["ffn"], num_layers=s["layers"], num_heads=s["heads"],
                     num_kv_heads=s["kv"], head_dim=s["d"] // s["heads"], attention=attention)


def host_batch(s, seed=0) -> dict:
  """The synthetic mix's packed batch of shape `s` (compile_time.py's too)."""
  return span_mixes.synthetic_batch(s, k=K, seed=seed)


def optim_config():
  c = ml_collections.ConfigDict(dict(lr=1e-4, warmup_steps=10, final_fraction=0.1, b1=0.9,
                                     b2=0.98, eps=1e-8, weight_decay=0.01, clip_norm=1.0))
  return c


def objective_config(compact_head: bool = True):
  """configs/train_base.py's objective (chunk 128, the head at the loss positions only)."""
  return ml_collections.ConfigDict(dict(
      name="sad", divergence="fkl", jsd_beta=0.5, temperature=1.0, tail="tail_bucket",
      label_smoothing=0.0, chunk_size=128, compact_head=compact_head, learnable_weights=False,
      weight_floor=0.05, curriculum_gamma=0.1, pcgrad=False))


def build_step(s: dict, *, dtype: str, remat: str, scan: bool = False,
               batch: dict | None = None, compact_head: bool = True,
               attention: str = DEFAULT_ATTENTION):
  """The jitted train step of shape `s` on one device and what calling it needs:
  (step, model config, mesh, rules, init fn, state shardings, host batch, its shardings).
  `batch`: the host batch (default: the synthetic mix). Also compile_time.py's."""
  cfg = model_config(s, attention)
  mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  rules = sharding.DEFAULT_RULES
  obj = objectives.build(objective_config(compact_head))
  tx = step_lib.make_optimizer(optim_config(), 1000)
  schedule = step_lib.lr_schedule(optim_config(), 1000)

  def init():
    p = transformer.to_layout(transformer.init_params(cfg, jax.random.key(0)), scan=scan)
    return step_lib.init_state(p, objectives.init_span_params(obj), tx, 0)

  state_sh = train.state_shardings(jax.eval_shape(init), mesh, rules, tx)
  batch = host_batch(s) if batch is None else batch
  batch_sh = train.batch_sharding_for(s["batch"], mesh, rules)
  data_sh = jax.tree.map(lambda _: batch_sh, batch)
  step = train.jit_train_step(model_cfg=cfg, obj=obj, tx=tx, schedule=schedule,
                              dtype=jnp.dtype(dtype), remat=remat, online=None,
                              state_sh=state_sh, data_sh=data_sh, teacher_sh=None)
  return step, cfg, mesh, rules, init, state_sh, batch, data_sh


@jax.jit
def _fullest_row(ids_bt, kinds_bt, segment_ids_bt, teacher_mask_bt):
  """The most loss targets of the sad objective in one row of a micro-batch (jitted: the
  same functions eagerly dispatch an op at a time)."""
  tg = losses.shift_targets(ids_bt, kinds_bt, segment_ids_bt)
  member = losses.loss_positions(label_kinds_bt=tg["label_kinds_bt"],
                                 teacher_mask_bt=teacher_mask_bt[:, 1:].astype(bool),
                                 groups=objectives.groups_for("sad"))
  return jnp.max(jnp.sum(member, axis=1))


def attention_keys_per_query(s: dict, batch: dict, attention: str) -> float:
  """Mean keys each query's attention visits: blockwise reference, query block i of 256
  visits keys [0, 256·(i+1)); flash, the key blocks models/flash.key_block_range gives each
  query block of each micro-batch (from its segment starts)."""
  t = s["seq"]
  if attention != "flash":
    block = transformer.ATTN_BLOCK if t % transformer.ATTN_BLOCK == 0 else t
    return block * (t // block + 1) / 2
  bq, bk = flash.block_sizes(t)
  keys = []
  for seg in batch["segment_ids"]:
    starts = flash.segment_starts(jnp.asarray(seg))
    for lo in range(0, t, bq):
      first, end = flash.key_block_range(starts, None, q_lo=lo, q_hi=lo + bq, bk=bk)
      keys.append((int(end) - int(first)) * bk)
  return float(np.mean(keys))


def executed_flops_parts(s: dict, batch: dict, *, compact_head: bool, chunk: int,
                         attention: str = DEFAULT_ATTENTION) -> dict[str, float]:
  """Matmul FLOPs sad_jax's step executes per token, counted like the peer's
  (peer_torch.executed_flops_parts): "matmuls", the projections and MLP at every position
  (6 per weight) and the head only over the chunks the compact loop runs (per micro-batch,
  the fullest row's loss targets rounded up to the chunk; every position without
  compact_head); "attention", the keys attention_keys_per_query visits, 4·Dh FLOPs per key
  forward and 8·Dh backward (reference: probabilities kept) or 10·Dh (flash: QK^T
  recomputed). XLA's cost
  analysis is not used: it counts a while loop's body once, whatever its trip count (the
  head's chunk loop)."""
  d, h, kv, f, t, v = s["d"], s["heads"], s["kv"], s["ffn"], s["seq"], s["vocab"]
  dh = d // h
  per_layer = d * (h + 2 * kv) * dh + h * dh * d + 3 * d * f
  trunk = 6.0 * s["layers"] * per_layer
  keys = attention_keys_per_query(s, batch, attention)
  attn = s["layers"] * h * (4 + (10 if attention == "flash" else 8)) * dh * keys
  head_positions = t
  if compact_head:
    c = min(chunk, t)
    need = [int(_fullest_row(batch["ids"][mb], batch["kinds"][mb], batch["segment_ids"][mb],
                             batch["teacher_mask"][mb])) for mb in range(batch["ids"].shape[0])]
    head_positions = float(np.mean([min(t, -(-n // c) * c) for n in need]))
  return {"matmuls": trunk + 6.0 * d * v * head_positions / t, "attention": attn}


def executed_flops_per_token(s: dict, batch: dict, *, compact_head: bool, chunk: int,
                             attention: str = DEFAULT_ATTENTION) -> float:
  """All of executed_flops_parts."""
  return sum(executed_flops_parts(s, batch, compact_head=compact_head, chunk=chunk,
                                  attention=attention).values())


def peak_mib(compiled) -> float:
  """XLA's memory analysis of a compiled step: arguments + outputs + temporaries − donated
  aliases, in MiB."""
  m = compiled.memory_analysis()
  return (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
          - m.alias_size_in_bytes) / 2**20


def bench_shape(name: str, *, repeats: int, steps: int, dtype: str, peak: float,
                remat: str = "none", batch: dict | None = None,
                compact_head: bool = True, profile_rounds: int = 0,
                attention: str = DEFAULT_ATTENTION) -> dict:
  s = SHAPES[name]
  step, cfg, mesh, rules, init, state_sh, batch, data_sh = build_step(
      s, dtype=dtype, remat=remat, batch=batch, compact_head=compact_head, attention=attention)
  weights = jnp.ones(2, jnp.float32)
  with sharding.use_mesh(mesh, rules):
    state = jax.jit(init, out_shardings=state_sh)()
    # the state is donated to the step: its shapes, for lowering other variants later
    state_shapes = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    dev_batch = jax.device_put(batch, data_sh)
    t0 = time.perf_counter()
    compiled = step.lower(state, dev_batch, weights, None).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    parts = executed_flops_parts(s, batch, compact_head=compact_head,
                                 chunk=objective_config().chunk_size, attention=attention)
    box = {"state": state}

    def one_step():
      box["state"], m = compiled(box["state"], dev_batch, weights, None)
      return m

    first = []
    times, rss = timed(one_step, repeats=repeats, steps=steps, sync=jax.block_until_ready,
                       first=first)
    kinds = step_kinds.jax_kinds(compiled, one_step, profile_rounds) if profile_rounds else None
    kept_mib = None
    if profile_rounds and remat == "none" and attention == "flash":
      # what keeping the attention probabilities for the backward would cost in memory:
      # the same step with the reference attention (compiled only, not run)
      alt = build_step(s, dtype=dtype, remat=remat, batch=batch,
                       compact_head=compact_head, attention="reference")[0]
      kept_mib = peak_mib(alt.lower(state_shapes, dev_batch, weights, None).compile())
  tokens = s["batch"] * s["seq"]
  return {"shape": name, "dtype": dtype, "remat": remat, "attention": attention,
          "times": times, "rss_peak": rss,
          "model_gflop_per_step": metrics.model_flops_per_token(cfg, s["seq"]) * tokens / 1e9,
          "executed_flops_per_token": sum(parts.values()), "executed_flops_parts": parts,
          "executed_flops_source": "analytic (bench/train_step.executed_flops_parts)",
          "peak_memory_mib": peak_mib(compiled),
          "temp_memory_mib": mem.temp_size_in_bytes / 2**20, "compile_s": compile_s,
          "loss": float(first[0]["loss"]), **({"profile": kinds} if kinds else {}),
          **({"reference_attention_peak_memory_mib": kept_mib} if kept_mib else {})}


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


def timed(step_fn, *, repeats: int, steps: int, sync,
          first: list | None = None) -> tuple[list[float], int]:
  """Per-step seconds of each repeat and the peak RSS during them (after one warm-up step,
  whose output and seconds are appended to `first`)."""
  t0 = time.perf_counter()
  out = step_fn()
  sync(out)
  if first is not None:
    first += [out, time.perf_counter() - t0]
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
            flops_per_token: float, executed_per_token: float | None = None) -> dict:
  """Tokens/s and MFU (model FLOPs) of the best and median repeat; with the FLOPs a step
  executes, its share of the peak too ("executed_fraction")."""
  tokens = s["batch"] * s["seq"]
  best, med = min(times), statistics.median(times)
  r = {"shape": name, "framework": framework, "tokens_per_step": tokens,
       "step_s_best": best, "step_s_median": med, "tokens_per_s_best": tokens / best,
       "tokens_per_s_median": tokens / med, "matmul_peak_gflops": peak / 1e9,
       "model_flops_per_token": flops_per_token,
       "mfu_best": flops_per_token * tokens / best / peak,
       "mfu_median": flops_per_token * tokens / med / peak}
  if executed_per_token:
    r["executed_fraction_best"] = executed_per_token * tokens / best / peak
  return r


def worker(framework: str, name: str, *, repeats: int, steps: int, dtype: str,
           remat: str = "none", batch_path: str | None = None,
           variant: str = "previous", profile_rounds: int = 0,
           attention: str = DEFAULT_ATTENTION) -> dict:
  s = SHAPES[name]
  cfg = model_config(s)
  flops = metrics.model_flops_per_token(cfg, s["seq"])
  host = host_batch(s) if batch_path is None else dict(np.load(batch_path))
  if framework in ("jax", "jax_full_head"):
    peak = max(metrics.measure_matmul_peak(dtype, n=n) for n in PEAK_SIZES[platform_kind()])
    trim_heap()
    base = RssPeak.now()
    r = bench_shape(name, repeats=repeats, steps=steps, dtype=dtype, peak=peak, remat=remat,
                    batch=host, compact_head=framework == "jax",
                    profile_rounds=profile_rounds if framework == "jax" else 0,
                    attention=attention)
    r.update(summary(name, "jax", s, r.pop("times"), peak, flops,
                     r["executed_flops_per_token"]))
    r["peak_rss_mib"] = (r.pop("rss_peak") - base) / 2**20
    return r
  import torch

  from bench import peer_torch

  v = peer_torch.VARIANTS[variant]
  peak = max(peer_torch.matmul_peak(dtype, n=n) for n in (1024, 2048))
  trim_heap()
  base = RssPeak.now()
  model, opt = peer_torch.build(s, dtype, variant=v)
  batch = peer_torch.to_torch_batch(host)
  # the previous step's loss at this variant's inputs, before any update: the variant's
  # own first loss must equal it (its loss is written differently, not changed)
  check = peer_torch.reference_loss(model, batch, v, span_mixes.REASON_KINDS,
                                    span_mixes.ACTION_KINDS)
  step = peer_torch.make_step(model, opt, span_mixes.REASON_KINDS, span_mixes.ACTION_KINDS, v)
  losses = []
  first = []
  times, rss = timed(lambda: losses.append(step(batch)), repeats=repeats, steps=steps,
                     sync=lambda _: None, first=first)
  parts = peer_torch.executed_flops_parts(s)
  executed = sum(parts.values())
  r = summary(name, "torch", s, times, peak, flops, executed)
  r |= {"dtype": dtype, "variant": variant, "settings": dataclasses.asdict(v),
        "peak_rss_mib": (rss - base) / 2**20, "loss": losses[0],
        "loss_rel_diff_to_previous_formula": abs(losses[0] - check) / abs(check),
        "first_step_s": first[1], "executed_flops_per_token": executed,
        "executed_flops_parts": parts,
        "executed_flops_source": "analytic (bench/peer_torch.executed_flops_parts)",
        "threads": torch.get_num_threads(), "version": torch.__version__}
  if profile_rounds:  # after the timing, which it must not disturb
    ranged = peer_torch.make_step(model, opt, span_mixes.REASON_KINDS, span_mixes.ACTION_KINDS,
                                  v, ranges=True)
    r["profile"] = step_kinds.torch_kinds(ranged, batch, profile_rounds)
  return r


def run_worker(args, fw: str, name: str, cores: list[int], batch_path: str,
               variant: str | None = None) -> dict:
  cmd = [sys.executable, os.path.abspath(__file__), "--worker", fw, "--shapes", name,
         "--repeats", str(args.repeats), "--steps", str(args.steps), "--dtype", args.dtype,
         "--threads", str(args.threads), "--remat", args.remat, "--batch", batch_path,
         "--attention", args.attention,
         "--profile", str(args.profile if fw != "jax_full_head" else 0)]
  if variant:
    cmd += ["--peer-variants", variant]
  p = subprocess.run(cmd, env=dict(os.environ), capture_output=True, text=True,
                     preexec_fn=lambda: os.sched_setaffinity(0, cores))
  lines = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
  if p.returncode or not lines:
    sys.exit(f"{fw} {variant or ''} worker for {name} failed:\n{p.stdout}\n"
             f"{p.stderr[-3000:]}")
  return json.loads(lines[-1][len("RESULT "):])


def describe(label: str, r: dict) -> str:
  ex = r.get("executed_flops_per_token")
  return (f"  {label:15s} {r['tokens_per_s_best']:7.0f} tokens/s best "
          f"({r['tokens_per_s_median']:.0f} median), MFU {100 * r['mfu_best']:.1f}% of its "
          f"{r['matmul_peak_gflops']:.0f} GFLOP/s matmul peak, executed "
          + (f"{ex / 1e6:.1f} MFLOP/token" if ex else "n/a")
          + f", peak memory {r['peak_rss_mib']:.0f} MiB (RSS)"
          + (f", XLA analysis {r['peak_memory_mib']:.0f} MiB" if "peak_memory_mib" in r else "")
          + f", first loss {r['loss']:.6f}")


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--shapes", default="S,M")
  ap.add_argument("--mix", default="synthetic",
                  help=f"comma-separated span mixes, of {','.join(span_mixes.MIXES)}")
  ap.add_argument("--mix-dir", default=None,
                  help="where the mixes' prepared datasets are cached (default "
                       "$SAD_JAX_CACHE/bench_mixes)")
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--steps", type=int, default=3, help="steps per timed repeat")
  ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  ap.add_argument("--remat", default="none", choices=train_setup.REMAT,
                  help="sad_jax's model.remat for the step (attention: recompute the "
                       "attention scores in the backward instead of keeping them)")
  ap.add_argument("--attention", default=DEFAULT_ATTENTION, choices=("reference", "flash"),
                  help="sad_jax's model.attention (the trainer's default: %(default)s)")
  ap.add_argument("--peer", action="store_true", help="also time the PyTorch peer")
  ap.add_argument("--full-head", action="store_true",
                  help="also time sad_jax's step with the LM head at every position "
                       "(objective.compact_head=false): the compact head's gain in this run")
  ap.add_argument("--peer-variants", default="previous,best",
                  help="the peer's variants to time with --peer (bench/peer_torch.VARIANTS)")
  ap.add_argument("--threads", type=int, default=os.cpu_count(),
                  help="threads for both frameworks (XLA: one per core)")
  ap.add_argument("--profile", type=int, default=0, metavar="ROUNDS",
                  help="after timing, trace ROUNDS more steps of sad_jax and of each peer "
                       "and report where the time goes by kind of work (bench/step_kinds.py)")
  ap.add_argument("--json", default=None, help="write all results here")
  ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
  ap.add_argument("--batch", default=None, help=argparse.SUPPRESS)
  args = ap.parse_args()
  if args.worker:
    if args.worker == "torch":
      import torch

      torch.set_num_threads(args.threads)
    r = worker(args.worker, args.shapes, repeats=args.repeats, steps=args.steps,
               dtype=args.dtype, remat=args.remat, batch_path=args.batch,
               variant=args.peer_variants, profile_rounds=args.profile,
               attention=args.attention)
    print("RESULT " + json.dumps(r), flush=True)
    return
  mixes = args.mix.split(",")
  variants = args.peer_variants.split(",") if args.peer else []
  from bench import peer_torch  # names only: torch is imported by the workers

  bad = [m for m in mixes if m not in span_mixes.MIXES] + [
      v for v in variants if v not in peer_torch.VARIANTS]
  if bad:
    ap.error(f"unknown mix or peer variant: {', '.join(bad)}")
  # XLA's CPU client sizes its pool from the visible cores: pin every worker to the same set
  cores = sorted(os.sched_getaffinity(0))[:args.threads]
  print(f"{metrics.cpu_model()}, {os.cpu_count()} cores; {args.threads} threads per framework; "
        f"{args.dtype}; sad_jax remat={args.remat}, attention={args.attention}; "
        f"mixes {', '.join(mixes)}"
        + (f"; peers {', '.join(variants)}" if variants else ""), flush=True)
  results = []
  with tempfile.TemporaryDirectory(prefix="train_step_") as tmp:
    for name in args.shapes.split(","):
      for mix in mixes:
        s = SHAPES[name]
        batch = span_mixes.host_batch(mix, s, k=K, work=args.mix_dir)
        path = os.path.join(tmp, f"{name}_{mix}.npz")
        np.savez(path, **batch)
        sh = span_mixes.shares(batch)
        print(f"{name} {mix}: tokens " + ", ".join(
            f"{k} {100 * sh[k]:.1f}%" for k in span_mixes.SHARE_KINDS)
              + f"; loss targets {100 * sh['targets']:.1f}% of positions; "
              f"{sh['trajectories_per_row']:.1f} trajectories per row of "
              f"{sh['mean_trajectory_tokens']:.0f} tokens on average", flush=True)
        row = {"shape": name, "mix": mix, "config": s, "shares": sh}
        row["jax"] = run_worker(args, "jax", name, cores, path)
        print(describe("sad_jax", row["jax"]), flush=True)
        if args.full_head:
          row["jax_full_head"] = run_worker(args, "jax_full_head", name, cores, path)
          row["compact_head_speedup"] = (row["jax"]["tokens_per_s_best"]
                                         / row["jax_full_head"]["tokens_per_s_best"])
          print(describe("full head", row["jax_full_head"])
                + f"; compact head {row['compact_head_speedup']:.2f}× faster", flush=True)
        row["peers"], row["ratios"] = {}, {}
        for v in variants:
          p = run_worker(args, "torch", name, cores, path, v)
          row["peers"][v] = p
          j = row["jax"]
          row["ratios"][v] = {
              "speedup_best": j["tokens_per_s_best"] / p["tokens_per_s_best"],
              "speedup_median": j["tokens_per_s_median"] / p["tokens_per_s_median"],
              "memory_ratio": j["peak_rss_mib"] / p["peak_rss_mib"]}
          print(describe(f"peer {v}", p), flush=True)
        for v, x in row["ratios"].items():
          print(f"  sad_jax / peer {v}: {x['speedup_best']:.2f}× tokens/s (best), "
                f"{x['speedup_median']:.2f}× (median); memory {x['memory_ratio']:.2f}×",
                flush=True)
        kinds = step_kinds.kinds_rows(row)
        if kinds:
          print("  where the step's time goes (the least-wall traced step):")
          for cells in kinds:
            print("    " + " | ".join(f"{c:<34s}" for c in cells), flush=True)
        if "previous" in row["peers"] and len(row["peers"]) > 1:
          prev = row["peers"]["previous"]["tokens_per_s_best"]
          row["peer_vs_previous"] = {v: p["tokens_per_s_best"] / prev
                                     for v, p in row["peers"].items() if v != "previous"}
          print("  peer speed against the previous peer (best): " + ", ".join(
              f"{v} {x:.2f}×" for v, x in row["peer_vs_previous"].items()), flush=True)
        results.append(row)
  if args.json:
    out = {"version": 2, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "cpu": metrics.cpu_model(), "cores": os.cpu_count(), "threads": args.threads,
           "dtype": args.dtype, "remat": args.remat, "attention": args.attention,
           "repeats": args.repeats,
           "steps": args.steps, "shapes": args.shapes, "mixes": mixes, "peer": args.peer,
           "peer_variants": variants, "full_head": args.full_head, "profile": args.profile,
           "results": results}
    fileio.json_dump(args.json, out, indent=1)  # whole or not at all


if __name__ == "__main__":
  main()
