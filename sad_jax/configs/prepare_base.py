"""Defaults of `sad-jax prepare`; other prepare configs start from these.

  sad-jax prepare --config configs/prepare_base.py --out OUT --config.inputs='("a.jsonl",)'
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  if arg:  # a typo'd argument must not pass silently
    raise ValueError(f"this config takes no argument, got {arg!r}")
  config = ml_collections.ConfigDict()
  config.inputs = ("",)              # trajectory files, any importer format
  config.format = "auto"             # react | chat | openai | smolagents | sad | auto
  config.on_error = "raise"          # raise | skip (skips are counted and reported)
  config.tokenizer = ml_collections.ConfigDict()
  config.tokenizer.path = ""         # .model / tokenizer.json / HF folder; "" = train one
  config.tokenizer.vocab_size = 4000  # when training
  config.tokenizer.model_type = "bpe"  # when training: bpe | unigram
  config.tokenizer.split_by_whitespace = True  # when training: False = multi-word pieces
  config.tokenizer.max_piece_length = 16  # when training: characters per piece
  config.template = "react"          # react | tokenizer (its chat template) | a file path
  config.observation_role = "user"   # chat templates: user | tool
  config.add_bos = True              # ReAct template only: a chat template writes its own
  config.add_eos = True
  config.max_len = 2048              # tokens per trajectory
  config.length_policy = "truncate"  # truncate (at a step boundary) | drop
  config.val_fraction = 0.1          # by a hash of the id
  return config
