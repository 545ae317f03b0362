"""The two pure-JAX attention kernels (`model.attention` flash and reference) in real
training: step agreement along one trajectory, and the spread of training outcomes.

  python bench/kernel_twin.py twin --demo runs/demo/default [--steps 60] [--objective sad]
  python bench/kernel_twin.py spread --demo runs/demo/default [--seeds 0,1,2,3]
                                     [--objective sad] [--steps 200]

--demo: a finished `sad-jax demo` workdir (its prepared data and teacher store are used with
the demo plan's student settings: configs/study_coin.py:demo).

  twin    trains with the reference kernel and, at every step, also runs the flash step
          from a copy of the same state on the same batch: prints both losses and gradient
          norms and the largest difference of their parameter updates relative to the
          reference update's largest entry (Adam's first steps amplify rounding in tiny
          gradient entries to a few 1e-3 of a step).
  spread  trains the cell with each kernel for each seed (same data, schedule, seed) and
          prints the final train loss, the mean over the last 60 steps and the eval losses.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import shutil
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sad_jax.common import configlib
from sad_jax.experiment.study import grid
from sad_jax.trainer import metrics
from sad_jax.trainer import train as train_lib


def cell_config(demo: str, *, objective: str, steps: int, seed: int):
  c = configlib.load("configs/study_coin.py:demo", [])
  store = os.path.join(demo, "store", "train") if objective != "sft" else ""
  return grid.train_config(c, os.path.join(demo, "prepared", "train"), objective=objective,
                            model=c.student.model, steps=steps, seed=seed, lr=c.student.lr,
                            store=store)


def twin(args) -> None:
  config = cell_config(args.demo, objective=args.objective, steps=args.steps, seed=0)
  jit_step = train_lib.jit_train_step

  def both(**kw):
    ref = jit_step(**{**kw, "model_cfg": kw["model_cfg"].replace(attention="reference")})
    fl = jit_step(**{**kw, "model_cfg": kw["model_cfg"].replace(attention="flash")})

    def step(state, batch, w, teacher):
      old = jax.tree.map(jnp.copy, state)
      state_r, m_r = ref(state, batch, w, teacher)
      state_f, m_f = fl(jax.tree.map(jnp.copy, old), batch, w, teacher)
      diff = max(float(jnp.max(jnp.abs((f - o) - (r - o))) / (jnp.max(jnp.abs(r - o)) + 1e-30))
                 for f, r, o in zip(jax.tree.leaves(state_f.params),
                                    jax.tree.leaves(state_r.params),
                                    jax.tree.leaves(old.params), strict=True))
      print(f"step {int(old.step)}: loss {float(m_r['loss']):.6f} / {float(m_f['loss']):.6f}"
            f" (reference / flash), grad norm {float(m_r['grad_norm']):.5f} / "
            f"{float(m_f['grad_norm']):.5f}, update difference {diff:.1e}", flush=True)
      return state_r, m_r

    return step

  train_lib.jit_train_step = both
  run = os.path.join(args.workdir, "twin")
  shutil.rmtree(run, ignore_errors=True)  # a finished run would not step again
  with contextlib.redirect_stderr(io.StringIO()):
    train_lib.train_and_evaluate(config, run)


def spread(args) -> None:
  for seed in (int(s) for s in args.seeds.split(",")):
    for kernel in ("flash", "reference"):
      config = cell_config(args.demo, objective=args.objective, steps=args.steps, seed=seed)
      config.model.attention = kernel
      run = os.path.join(args.workdir, f"{args.objective}_{kernel}_s{seed}")
      if not os.path.isdir(os.path.join(run, "final")):
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
          train_lib.train_and_evaluate(config, run)
      rows = metrics.read_jsonl(run)
      train = {r["step"]: r["loss"] for r in rows if r.get("split") == "train" and "loss" in r}
      last = [train[s] for s in sorted(train) if s > args.steps - 60]
      ev = [r for r in rows if r.get("split") != "train" and "loss" in r][-1]
      print(f"seed {seed} {kernel:9s}: train loss {train[max(train)]:.4f} at step "
            f"{max(train)}, mean {sum(last) / len(last):.4f} over the last 60 steps; eval "
            + ", ".join(f"{k} {v:.4f}" for k, v in ev.items() if "loss" in k), flush=True)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("what", choices=("twin", "spread"))
  ap.add_argument("--demo", required=True, help="a finished sad-jax demo workdir")
  ap.add_argument("--workdir", default="/tmp/kernel_twin")
  ap.add_argument("--objective", default="sad")
  ap.add_argument("--steps", type=int, default=None)
  ap.add_argument("--seeds", default="0,1,2,3")
  args = ap.parse_args()
  args.steps = args.steps or (60 if args.what == "twin" else 200)
  (twin if args.what == "twin" else spread)(args)


if __name__ == "__main__":
  main()
