"""Prepare the FireAct HotpotQA ReAct trajectories (../shared/data/fireact).

  sad-jax prepare --config configs/prepare_fireact.py --out /tmp/sad/fireact
  sad-jax prepare --config configs/prepare_fireact.py:chat --out /tmp/sad/fireact_chat

The argument picks the input file: `alpaca` (default, ReAct text) or `chat` (messages).
Both give the same trajectories, ids and tokens.
"""

import ml_collections

from sad_jax.configs import prepare_base

FIREACT = "../shared/data/fireact"


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  files = {"alpaca": "hotpotqa_react_alpaca.json", "chat": "hotpotqa_react_chat.jsonl"}
  if (arg or "alpaca") not in files:
    raise ValueError(f"unknown argument {arg!r}; expected one of {', '.join(files)}")
  config = prepare_base.get_config()
  name = files[arg or "alpaca"]
  config.inputs = (f"{FIREACT}/{name}",)
  config.tokenizer.vocab_size = 2000
  config.max_len = 1024
  return config
