"""The `sad` objective at demo size: KL on reasoning, CE on actions, observations masked.

  sad-jax train --config configs/train_sad.py --workdir runs/sad \
      --config.dataset=runs/fireact --config.teacher_store=runs/fireact_teacher
  sad-jax train --config configs/train_sad.py:runlocal …   (a few steps, small rows)
"""

import ml_collections

from sad_jax.configs import train_base


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  if arg not in (None, "runlocal"):
    raise ValueError(f"unknown argument {arg!r}; the only one is 'runlocal'")
  c = train_base.get_config("sad")
  c.objective.curriculum_gamma = 0.1  # the complexity-weighted curriculum term
  return train_base.runlocal(c) if arg == "runlocal" else c
