"""A prepare config with a syntax error (an unclosed bracket)."""

import ml_collections


def get_config(arg=None):
  config = ml_collections.ConfigDict(dict(inputs=("a.jsonl",), max_len=512)
  return config
