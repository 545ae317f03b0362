"""Model parameters as an orbax checkpoint folder: `config.json` (HF form) + `params/`.

This is what training exports for a teacher or student (hf.save writes the HF form).
`load_model(path)` accepts either form.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re

import jax

from sad_jax.common import fileio, sharding
from sad_jax.common.errors import DataError
from sad_jax.models import hf, safetensors_io
from sad_jax.models.config import ModelConfig, model_config, to_hf_dict
from sad_jax.models.transformer import param_axes, unstack_layers


def save_params(path: str | os.PathLike, cfg: ModelConfig, params) -> None:
  import orbax.checkpoint as ocp

  path = fileio.abspath(path)
  fileio.makedirs(path)
  ck = ocp.StandardCheckpointer()
  # model folders hold layers per layer whatever the run's layout (scan_layers stacks them
  # again on load), so eval, export and teacher_layers read one form
  ck.save(fileio.join(path, "params"), unstack_layers(params), force=True)
  ck.wait_until_finished()
  # config.json last: load_model needs it, so a folder whose params are still being written
  # (or failed) is never read as a model
  if jax.process_index() == 0:  # every process saves its shards; one writes the config
    fileio.json_dump(fileio.join(path, "config.json"),
                     {**to_hf_dict(cfg), "vocab_multiple": cfg.vocab_multiple}, indent=1)


def load_model(path: str | os.PathLike, mesh=None, dtype=None):
  """(cfg, params) from an orbax params folder or an HF folder."""
  path = fileio.abspath(path)
  if not fileio.isdir(fileio.join(path, "params")):
    return hf.load(path, mesh=mesh, dtype=dtype)
  cfg = model_config(path)
  cfg = cfg.replace(vocab_multiple=int(json.loads(fileio.read_text(
      fileio.join(path, "config.json"))).get("vocab_multiple", 1)))
  return cfg, restore_params(fileio.join(path, "params"), mesh=mesh, dtype=dtype)


def restore_params(folder: str, *, mesh=None, dtype=None):
  """The parameter tree of an orbax folder, shaped by its own metadata: on the mesh by the
  model's logical axes (adapters' included), else on the default device."""
  import orbax.checkpoint as ocp

  folder = fileio.abspath(folder)
  ck = ocp.StandardCheckpointer()
  try:
    meta = ck.metadata(folder)
    tree = meta.item_metadata if hasattr(meta, "item_metadata") else meta
    abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, dtype or m.dtype), tree)
    if mesh is not None:
      shard = sharding.tree_shardings(abstract, param_axes(abstract), mesh)
      abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                              abstract, shard)
    return ck.restore(folder, abstract)
  except (FileNotFoundError, ValueError) as e:
    raise DataError(f"cannot restore parameters: {e}", path=folder) from None


TEACHER_LAYERS = "teacher_layers:"


def parse_layers(init: str, *, field: str = "config.model.init") -> tuple[int, ...]:
  """The layer indices of `teacher_layers:0,4,8,…` (distinct, increasing)."""
  body = init[len(TEACHER_LAYERS):] if init.startswith(TEACHER_LAYERS) else None
  try:
    layers = tuple(int(x) for x in body.split(",")) if body else ()
  except ValueError:
    layers = ()
  if not layers or any(b <= a for a, b in zip(layers, layers[1:])) or layers[0] < 0:
    raise DataError(f"expected {TEACHER_LAYERS}I,J,… with increasing layer indices, got "
                    f"{init!r}", field=field)
  return layers


def _layers_config(cfg: ModelConfig, layers: tuple[int, ...]) -> ModelConfig:
  bad = [i for i in layers if not 0 <= i < cfg.num_layers]
  if bad or not layers or len(set(layers)) != len(layers):
    raise DataError(f"layers {list(layers)} are not distinct layers of a {cfg.num_layers}-"
                    "layer model", field="config.model.init")
  types = None if cfg.layer_types is None else tuple(cfg.layer_types[i] for i in layers)
  return cfg.replace(num_layers=len(layers), layer_types=types)


def select_layers(cfg: ModelConfig, params, layers) -> tuple[ModelConfig, dict]:
  """A model of the chosen layers of (cfg, params), in order, with the embeddings, final
  norm and head kept: a depth-pruned student initialised from its teacher."""
  layers = tuple(int(i) for i in layers)
  sub_cfg = _layers_config(cfg, layers)
  params = unstack_layers(params)
  out = {k: v for k, v in params.items() if not k.startswith("layers_")}
  out.update({f"layers_{j}": params[f"layers_{i}"] for j, i in enumerate(layers)})
  return sub_cfg, out


def load_layers(path: str | os.PathLike, layers, mesh=None, dtype=None):
  """(cfg, params) of the chosen layers of the model at `path` (as load_model reads it).
  From an HF folder only those layers' tensors are placed (on a mesh, a replicated
  teacher would take a copy per device)."""
  path = fileio.abspath(path)
  layers = tuple(int(i) for i in layers)
  try:
    if fileio.isdir(fileio.join(path, "params")):
      return select_layers(*load_model(path, mesh=mesh, dtype=dtype), layers)
    sub_cfg = _layers_config(model_config(path), layers)
  except DataError as e:
    raise e.located(path=path) from None
  new_index = {i: j for j, i in enumerate(layers)}

  def chosen():
    for name, w, fpath in safetensors_io.read_checkpoint(path):
      m = _LAYER_NAME.match(name)
      if m is None:
        yield name, w, fpath
      elif int(m.group(1)) in new_index:
        yield f"model.layers.{new_index[int(m.group(1))]}.{m.group(2)}", w, fpath

  return hf.from_tensors(sub_cfg, chosen(), where=path, mesh=mesh, dtype=dtype)


_LAYER_NAME = re.compile(r"model\.layers\.(\d+)\.(.+)")

@dataclasses.dataclass(frozen=True)
class ModelSource:
  """Where a model's files are: its folder, and the prepared dataset it was trained on
  (None when unknown), which holds its tokenizer and template when the folder does not."""

  model_dir: str
  dataset: str | None = None

  def tokenizer_path(self) -> str | None:
    for folder in (self.model_dir, self.dataset):
      for name in ("tokenizer.model", "tokenizer.json") if folder else ():
        if fileio.exists(fileio.join(folder, name)):
          return fileio.join(folder, name)
    return None

  def template(self, tok=None):
    """The chat template the model was trained with (None: the ReAct template, also for
    a folder that records none, such as an imported HF model)."""
    from sad_jax.data import prepare

    if fileio.exists(fileio.join(self.model_dir, prepare.TEMPLATE_FILE)):
      return prepare.load_template(self.model_dir)
    if self.dataset is not None:
      return prepare.load_template(self.dataset, tok)
    return None


def resolve_source(src: str | os.PathLike) -> ModelSource:
  """A training run (`RUN`, meaning RUN/final), its `final/` (orbax params + config.json),
  or an HF folder. The run's config.json names its dataset."""
  src = fileio.abspath(src)
  run_dir = None
  if _run_config(src) is not None:
    if not fileio.isdir(fileio.join(src, "final")):
      raise DataError("a training run without final/ (not finished, or train.export off)",
                      path=src, field="final")
    run_dir, model_dir = src, fileio.join(src, "final")
  else:
    model_dir = src
    if _run_config(fileio.dirname(src)) is not None:
      run_dir = fileio.dirname(src)
  dataset = None
  if run_dir is not None:
    ds = _run_config(run_dir).get("dataset")
    for cand in (ds, fileio.join(run_dir, ds)) if isinstance(ds, str) and ds else ():
      if fileio.isdir(cand):
        dataset = fileio.abspath(cand)
        break
  return ModelSource(model_dir=model_dir, dataset=dataset)


def check_model_dir(model_dir: str) -> None:
  """Fails early, naming the file and field, on a folder that holds no model (its
  config.json is read and checked; weights must be there as orbax params or safetensors)."""
  model_config(model_dir)
  if not (fileio.isdir(fileio.join(model_dir, "params"))
          or fileio.exists(fileio.join(model_dir, "model.safetensors"))
          or fileio.exists(fileio.join(model_dir, "model.safetensors.index.json"))):
    raise DataError("no weights: neither params/ (orbax) nor model.safetensors (a training "
                    "run holds them in final/)", path=model_dir, field="params")


def _run_config(folder: str) -> dict | None:
  """A training run's config.json (flat dotted keys, with `dataset`), else None."""
  path = fileio.join(folder, "config.json")
  try:
    cfg = json.loads(fileio.read_text(path))
  except (OSError, ValueError):
    return None
  return cfg if isinstance(cfg, dict) and "dataset" in cfg else None
