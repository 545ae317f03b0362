"""A config that returns a plain dict, not an ml_collections.ConfigDict."""


def get_config(arg=None):
  return {"inputs": ("a.jsonl",), "max_len": 512}
