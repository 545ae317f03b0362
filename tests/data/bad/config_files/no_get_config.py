"""A config file without get_config."""

import ml_collections

CONFIG = ml_collections.ConfigDict(dict(max_len=512))
