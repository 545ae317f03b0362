"""`sad-jax demo`: the whole method on the embedded default, end to end, on a laptop CPU.

  sad-jax demo [--quick] [--workdir runs/demo]

The demo is one small instance of `sad-jax study` (configs/study_coin.py, plan "demo";
`--quick`: plan "quick", a smoke run whose figures mean nothing): expert trajectories in
TextWorld-Express coin train a teacher; the teacher plays train-fold games and its
successful episodes are the students' data; its top-k store; sad / token_kd / sft students
× 3 seeds; every model plays the same dev- and test-fold games; report.md with bootstrap
intervals over games and seeds, paired differences and verdicts only where they allow one.
"""

from __future__ import annotations

import os
from typing import Any


def config(quick: bool):
  from sad_jax.configs import study_coin

  c = study_coin.get_config("quick" if quick else "demo")
  c.lock()
  return c


def run(workdir: str = "runs/demo", *, quick: bool = False) -> str:
  from sad_jax.experiment.study import runner

  work = os.path.join(workdir, "quick" if quick else "default")
  return runner.run(config(quick), work, command="sad-jax demo" + (" --quick" if quick else ""))


def main_args(args: Any) -> int:
  run(args.workdir, quick=args.quick)
  return 0
