"""Model parameters as an orbax checkpoint folder: `config.json` (HF form) + `params/`.

This is what training exports for a teacher or student (hf.save writes the HF form).
`load_model(path)` accepts either form.
"""

from __future__ import annotations

import json
import os

import jax

from sad_jax import sharding
from sad_jax.errors import DataError
from sad_jax.fileio import atomic_write
from sad_jax.models import hf
from sad_jax.models.config import ModelConfig, load_config, to_hf_dict
from sad_jax.models.transformer import param_axes


def save_params(path: str | os.PathLike, cfg: ModelConfig, params) -> None:
  import orbax.checkpoint as ocp

  path = os.path.abspath(os.fspath(path))
  os.makedirs(path, exist_ok=True)
  ck = ocp.StandardCheckpointer()
  ck.save(os.path.join(path, "params"), params, force=True)
  ck.wait_until_finished()
  if jax.process_index() == 0:  # every process saves its shards; one writes the config
    with atomic_write(os.path.join(path, "config.json")) as f:
      json.dump({**to_hf_dict(cfg), "vocab_multiple": cfg.vocab_multiple}, f, indent=1)


def load_model(path: str | os.PathLike, mesh=None, dtype=None):
  """(cfg, params) from an orbax params folder or an HF folder."""
  path = os.path.abspath(os.fspath(path))
  if not os.path.isdir(os.path.join(path, "params")):
    return hf.load(path, mesh=mesh, dtype=dtype)
  import orbax.checkpoint as ocp

  cfg = load_config(path)
  with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
    cfg = cfg.replace(vocab_multiple=int(json.load(f).get("vocab_multiple", 1)))
  ck = ocp.StandardCheckpointer()
  try:
    meta = ck.metadata(os.path.join(path, "params"))
    tree = meta.item_metadata if hasattr(meta, "item_metadata") else meta
    abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, dtype or m.dtype), tree)
    if mesh is not None:
      shard = sharding.tree_shardings(abstract, param_axes(abstract), mesh)
      abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                              abstract, shard)
    params = ck.restore(os.path.join(path, "params"), abstract)
  except (FileNotFoundError, ValueError) as e:
    raise DataError(f"cannot restore parameters: {e}", path=path) from None
  return cfg, params
