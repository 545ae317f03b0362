"""The `token_kd` objective at demo size: the token-level KD baseline (flat KL on every
generated token, no span structure).

  sad-jax train --config configs/train_token_kd.py --workdir runs/token_kd \
      --config.dataset=runs/fireact --config.teacher_store=runs/fireact_teacher
  sad-jax train --config configs/train_token_kd.py:runlocal …   (a few steps, small rows)
"""

import ml_collections

from sad_jax.configs import train_base


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  if arg not in (None, "runlocal"):
    raise ValueError(f"unknown argument {arg!r}; the only one is 'runlocal'")
  c = train_base.get_config("token_kd")
  return train_base.runlocal(c) if arg == "runlocal" else c
