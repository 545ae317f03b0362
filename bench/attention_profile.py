"""Where the train step's time goes, per part, and the attention changes of issue 23.2
measured against each other in the same run: the previous reference attention, the
current one (`model.attention=reference`) and the segment-aware flash attention
(`model.attention=flash`, models/flash.py, the trainer's default).

  python bench/attention_profile.py [--shapes S,M] [--parts core,step,profile]
                                    [--repeats 5] [--steps 1] [--rounds 3]
                                    [--profile previous,current,flash] [--json OUT]

Shapes are bench/train_step.py's (S and M); float32, remat none, one device.

  core     the attention core alone: jitted value_and_grad of `reference_attention` (q, k, v
           at the step's shapes; packed rows of two trajectories; positions and segment ids
           passed as arguments, not constants), the previous implementation (a copy below,
           `previous_attention`), the current one and flash alternated, best and median of
           --repeats; also the largest loss and gradient differences of previous and current.
  step     the full train step (bench/train_step.build_step) compiled with each of the three
           attentions swapped in, alternated: --repeats of --steps steps; also XLA's
           temporary memory of each.
  profile  one jax.profiler trace of --rounds rounds, each round running the step once with
           each attention named by --profile (default: the current one). Every XLA op
           executed (a thunk of the CPU runtime: a fusion, a dot, a copy) is attributed to a
           part by the name stack in its HLO metadata: the Flax module path (layers_3/attn,
           layers_3/mlp, …_norm) and the named scopes "core" and "rope" of the Attention
           module (the core's ops split into matmuls, i.e. dots and fusions around one, and
           the rest); ops of the loss and the LM head lie in the gradient computation outside
           Transformer.hidden, the optimizer's outside the gradient computation. An op's
           time is the least over the rounds; the table gives each part's op time per step,
           its share, and that share of the step's best wall time.

Timings report CPU time (this process's threads, user + system) next to wall time: on a
machine shared with other work the CPU time is the steadier of the two. Trace op times are
wall durations, so under load read the shares rather than the seconds.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import sys
import time
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.step_kinds import PARTS, hlo_ops, part_of, traced_op_ns
from sad_jax.common import fileio
from sad_jax.models import flash, transformer
from sad_jax.models.config import ModelConfig

# ----------------------------------------------------------------------------- previous


def previous_attention(q, k, v, positions, segment_ids, k_pos, k_seg, *, cfg: ModelConfig,
                       window, dtype, recompute: bool = False, blockwise: bool = True):
  """transformer.reference_attention before issue 23.2 (for the comparisons here and in
  tests/models/test_attention.py): a bool mask and jnp.where on the [B, KV, G, Tq, S]
  logits, jax.nn.softmax, the einsums in [B, T, KV, G, hd] order, autodiff's backward."""
  b, t, h, hd = q.shape
  kv = k.shape[2]
  qg = q.reshape(b, t, kv, h // kv, hd)

  def attend(q_blk, q_pos, q_seg, k_blk, v_blk, kp, ks):
    logits = jnp.einsum("btkgd,bskd->bkgts", q_blk, k_blk,
                        preferred_element_type=jnp.float32) * cfg.scale
    if cfg.attn_softcap:
      logits = cfg.attn_softcap * jnp.tanh(logits / cfg.attn_softcap)
    mask = transformer.attention_mask(q_pos, kp, q_seg, ks, window)
    logits = jnp.where(mask[:, None, None], logits, -1e30)
    probs = jax.nn.softmax(logits, axis=-1).astype(dtype)
    return jnp.einsum("bkgts,bskd->btkgd", probs, v_blk)

  if recompute:
    attend = jax.checkpoint(attend)
  blk = transformer.ATTN_BLOCK
  n_blk = t // blk if blockwise and t % blk == 0 else 1
  if n_blk == 1:
    return attend(qg, positions, segment_ids, k, v, k_pos, k_seg).reshape(b, t, h, hd)
  outs = [attend(qg[:, i * blk:(i + 1) * blk], positions[:, i * blk:(i + 1) * blk],
                 segment_ids[:, i * blk:(i + 1) * blk], k[:, :(i + 1) * blk],
                 v[:, :(i + 1) * blk], k_pos[:, :(i + 1) * blk], k_seg[:, :(i + 1) * blk])
          for i in range(n_blk)]
  return jnp.concatenate(outs, axis=1).reshape(b, t, h, hd)


@contextlib.contextmanager
def attention_impl(fn: Callable) -> Iterator[None]:
  """transformer.reference_attention replaced by `fn` while tracing inside the block."""
  current = transformer.reference_attention
  transformer.reference_attention = fn
  try:
    yield
  finally:
    transformer.reference_attention = current


def flash_attention(q, k, v, positions, segment_ids, k_pos, k_seg, *, cfg: ModelConfig,
                    window, dtype, recompute: bool = False, blockwise: bool = True):
  """models/flash.py's attention (model.attention=flash, the trainer's default) behind the
  reference's signature, so that it swaps in like the others (training rows: k_pos and
  k_seg are the rows' own)."""
  del k_pos, k_seg, recompute, blockwise
  return flash.flash_attention(q, k, v, positions, segment_ids, cfg=cfg, window=window,
                               dtype=dtype)


IMPLS = {"previous": previous_attention, "current": transformer.reference_attention,
         "flash": flash_attention}


# ----------------------------------------------------------------------------- timing


def alternate(fns: dict[str, Callable[[], object]], repeats: int,
              per_call: int = 1) -> dict[str, dict]:
  """Wall and CPU seconds per call of each fn (÷ per_call), the fns alternated within
  each repeat, after one untimed call each. CPU time (this process's threads, user +
  system) counts only the time the step's threads ran, so other work on the machine
  disturbs it far less than the wall time."""
  for fn in fns.values():
    jax.block_until_ready(fn())
  wall, cpu = {name: [] for name in fns}, {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      t0, c0 = time.perf_counter(), time.process_time()
      jax.block_until_ready(fn())
      wall[name].append((time.perf_counter() - t0) / per_call)
      cpu[name].append((time.process_time() - c0) / per_call)
  return {name: {"wall": stats(wall[name]), "cpu": stats(cpu[name])} for name in fns}


def stats(ts: list[float]) -> dict:
  return {"best_s": min(ts), "median_s": float(np.median(ts)), "times_s": ts}


def speedups(row: dict, *, slow: str = "previous", fast: str = "current") -> dict:
  return {f"{clock}_{k}": row[slow][clock][f"{k}_s"] / row[fast][clock][f"{k}_s"]
          for clock in ("wall", "cpu") for k in ("best", "median")}


def packed_inputs(s: dict, seed: int = 0):
  """q, k, v, positions, segment ids and output weights of the attention at shape `s`:
  rows of two trajectories, as bench/train_step.py packs them."""
  rng = np.random.default_rng(seed)
  b, t, h, kv, hd = s["batch"], s["seq"], s["heads"], s["kv"], s["d"] // s["heads"]
  q, k, v = (jnp.asarray(rng.normal(size=(b, t, n, hd)), jnp.float32) for n in (h, kv, kv))
  half = t // 2
  seg = np.ones((b, t), np.int32)
  seg[:, half:] = 2
  pos = np.concatenate([np.arange(half), np.arange(t - half)])[None].repeat(b, 0)
  w = jnp.asarray(rng.normal(size=q.shape), jnp.float32)
  return q, k, v, jnp.asarray(pos, jnp.int32), jnp.asarray(seg), w


def core_ab(name: str, s: dict, cfg: ModelConfig, repeats: int) -> dict:
  """The attention core's forward + backward, previous vs current, alternated."""
  q, k, v, pos, seg, w = packed_inputs(s)
  fns, outs = {}, {}
  for impl, attn in IMPLS.items():
    def loss(q, k, v, pos, seg, w, attn=attn):
      out = attn(q, k, v, pos, seg, pos, seg, cfg=cfg, window=None, dtype=jnp.float32)
      return jnp.sum(out * w)
    f = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
    outs[impl] = f(q, k, v, pos, seg, w)
    fns[impl] = lambda f=f: f(q, k, v, pos, seg, w)
  diffs = [float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(b)) + 1e-30))
           for a, b in zip(jax.tree.leaves(outs["current"]), jax.tree.leaves(outs["previous"]),
                           strict=True)]
  row = {"shape": name, "what": "attention core fwd+bwd (one layer)",
         **alternate(fns, repeats), "max_rel_diff_loss_dq_dk_dv": diffs}
  return {**row, "speedup": speedups(row),
          "flash_speedup": speedups(row, slow="current", fast="flash")}


def build_compiled(s: dict, attn: Callable):
  """(compiled step, its state, device batch, weights, mesh, rules) with `attn` as the
  reference attention."""
  from bench import train_step
  from sad_jax.common import sharding

  with attention_impl(attn):  # swapped in where the model calls the reference
    step, _, mesh, rules, init, state_sh, batch, data_sh = train_step.build_step(
        s, dtype="float32", remat="none", attention="reference")
    with sharding.use_mesh(mesh, rules):
      state = jax.jit(init, out_shardings=state_sh)()
      dev_batch = jax.device_put(batch, data_sh)
      weights = jnp.ones(2, jnp.float32)
      compiled = step.lower(state, dev_batch, weights, None).compile()
  return compiled, state, dev_batch, weights, mesh, rules


def step_runner(built, steps: int) -> Callable[[], object]:
  compiled, state, dev_batch, weights, _, _ = built
  box = {"state": state}

  def run():
    m = None
    for _ in range(steps):
      box["state"], m = compiled(box["state"], dev_batch, weights, None)
    return m

  return run


def step_ab(name: str, s: dict, repeats: int, steps: int) -> dict:
  """The full train step with the previous vs the current attention, alternated."""
  built = {impl: build_compiled(s, attn) for impl, attn in IMPLS.items()}
  temp = {impl: b[0].memory_analysis().temp_size_in_bytes / 2**20 for impl, b in built.items()}
  runners = {impl: step_runner(b, steps) for impl, b in built.items()}
  losses = {impl: float(run()["loss"]) for impl, run in runners.items()}
  row = {"shape": name, "what": "train step", **alternate(runners, repeats, steps),
         "first_loss": losses, "xla_temp_mib": temp}
  return {**row, "speedup": speedups(row),
          "flash_speedup": speedups(row, slow="current", fast="flash")}


# ----------------------------------------------------------------------------- profile


def profile_steps(s: dict, impls: list[str], rounds: int) -> dict[str, dict]:
  """Per-part op time of the step with each attention in `impls` (traced_op_ns)."""
  from sad_jax.common import sharding

  built = {impl: build_compiled(s, IMPLS[impl]) for impl in impls}
  ops = {impl: hlo_ops(b[0].as_text()) for impl, b in built.items()}
  runs = {impl: step_runner(b, 1) for impl, b in built.items()}
  mesh, rules = next(iter(built.values()))[4:]
  with sharding.use_mesh(mesh, rules):
    traced = traced_op_ns(runs, ops, rounds)
  out = {}
  for impl in impls:
    op_ns = collections.Counter()
    for op, ns in traced[impl]["op_ns"].items():
      op_ns[part_of(*ops[impl][op][1:])] += ns
    total = sum(op_ns.values())
    wall = traced[impl]["wall_s"]
    parts = {p: {"op_s": op_ns[p] / 1e9, "share": op_ns[p] / total if total else 0.0,
                 "wall_s": wall * op_ns[p] / total if total else 0.0} for p in PARTS}
    out[impl] = {"wall_s_per_step": wall, "cpu_s_per_step": traced[impl]["cpu_s"],
                 "op_s_per_step": total / 1e9, "parts": parts}
  return out


# ----------------------------------------------------------------------------- main


def print_ab(row: dict) -> None:
  for clock in ("cpu", "wall"):
    p, c, f = (row[i][clock] for i in ("previous", "current", "flash"))
    up, fl = row["speedup"], row["flash_speedup"]
    print(f"| {row['shape']} | {row['what']} | {clock} | {p['best_s']:.3f} ({p['median_s']:.3f})"
          f" | {c['best_s']:.3f} ({c['median_s']:.3f}) | {up[clock + '_best']:.2f}× "
          f"({up[clock + '_median']:.2f}×) | {f['best_s']:.3f} ({f['median_s']:.3f}) | "
          f"{fl[clock + '_best']:.2f}× ({fl[clock + '_median']:.2f}×) |")


def print_profile(name: str, profiles: dict[str, dict]) -> None:
  impls = list(profiles)
  head = " | ".join(f"{i}: op s/step | share | ≈ wall s" for i in impls)
  print(f"\n{name}: " + ", ".join(f"{i} step {p['wall_s_per_step']:.2f} s wall, "
                                    f"{p['cpu_s_per_step']:.2f} s CPU, "
                                    f"{p['op_s_per_step']:.2f} s op time"
                                    for i, p in profiles.items()))
  print(f"| part | {head} |")
  print("| --- |" + " ---: | ---: | ---: |" * len(impls))
  for part in PARTS:
    cells = " | ".join(f"{p['parts'][part]['op_s']:.3f} | {100 * p['parts'][part]['share']:.1f}% "
                       f"| {p['parts'][part]['wall_s']:.2f}" for p in profiles.values())
    print(f"| {part} | {cells} |")


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--shapes", default="S,M")
  ap.add_argument("--parts", default="core,step,profile")
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--steps", type=int, default=1, help="train steps per timing (step)")
  ap.add_argument("--rounds", type=int, default=3, help="traced rounds (profile)")
  ap.add_argument("--profile", default="current",
                  help="the attentions to profile the step with: previous, current or both")
  ap.add_argument("--json", default=None)
  args = ap.parse_args()
  from bench import train_step

  parts = args.parts.split(",")
  out = {"jax": jax.__version__, "cpus": os.cpu_count(), "results": []}
  for name in args.shapes.split(","):
    s = train_step.SHAPES[name]
    cfg = train_step.model_config(s)
    if "core" in parts or "step" in parts:
      print("| shape | measure | clock | previous best (median) s | current best (median) s |"
            " speed-up best (median) | flash best (median) s | flash speed-up over current |"
            "\n| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |")
    if "core" in parts:
      row = core_ab(name, s, cfg, args.repeats)
      print_ab(row)
      print(f"  max relative difference (loss, dq, dk, dv): "
            f"{', '.join(f'{d:.1e}' for d in row['max_rel_diff_loss_dq_dk_dv'])}")
      out["results"].append(row)
    if "step" in parts:
      row = step_ab(name, s, args.repeats, args.steps)
      print_ab(row)
      print(f"  first loss {row['first_loss']}; XLA temporaries (MiB) "
            f"{ {k: round(v) for k, v in row['xla_temp_mib'].items()} }")
      out["results"].append(row)
    if "profile" in parts:
      profiles = profile_steps(s, args.profile.split(","), args.rounds)
      print_profile(name, profiles)
      out["results"].append({"shape": name, "what": "profile", **profiles})
  if args.json:
    fileio.json_dump(args.json, out, indent=1)  # whole or not at all


if __name__ == "__main__":
  main()
