"""The `sft` objective at demo size: the SFT baseline (CE on every generated token).

  sad-jax train --config configs/train_sft.py --workdir runs/sft \
      --config.dataset=runs/fireact
  sad-jax train --config configs/train_sft.py:runlocal …   (a few steps, small rows)
"""

import ml_collections

from sad_jax.configs import train_base


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  if arg not in (None, "runlocal"):
    raise ValueError(f"unknown argument {arg!r}; the only one is 'runlocal'")
  c = train_base.get_config("sft")
  return train_base.runlocal(c) if arg == "runlocal" else c
