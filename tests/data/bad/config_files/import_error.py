"""A config that imports a module that does not exist."""

import ml_collections
import no_such_module_for_sad_jax  # noqa: F401


def get_config(arg=None):
  return ml_collections.ConfigDict()
