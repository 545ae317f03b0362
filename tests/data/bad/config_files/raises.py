"""A config whose get_config fails (a lookup that does not exist)."""

import ml_collections

SIZES = {"small": 512, "large": 2048}


def get_config(arg=None):
  config = ml_collections.ConfigDict()
  config.max_len = SIZES["medium"]
  return config
