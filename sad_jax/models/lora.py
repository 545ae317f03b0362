"""LoRA and QLoRA-style students: low-rank adapters on a frozen base (docs/design.md, "LoRA").

A targeted weight W (x @ W, shape in_dims + out_dims: q/k/v [D, H, Dh], o [H, Dh, D], gate
and up [D, F], down [F, D]) gets A (in_dims + [r]) and B ([r] + out_dims), and the layer
computes x @ W + (α/r)·(x @ A) @ B. B starts at zero, so step 0 is the base model. The
adapters live beside their weight in the model's param tree (`q_lora_a`, `q_lora_b`),
and the model adds the term wherever it finds them (models/transformer.py, `_project`):
training differentiates the adapters only, so no gradient of W is ever computed.

The frozen base may be held in bfloat16, or its targeted weights in int8 with one float32
scale per output channel (`q_qscale`, …), dequantised at the layer that uses them.

Trees: `adapters` mirrors the base's nesting with only the `_lora_a` / `_lora_b` leaves;
`combine(base, adapters, spec)` is what the model is applied to; `merge` folds them into
dense float32 weights (export, rollouts, evaluation).
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sad_jax.common.errors import DataError
from sad_jax.models.checkpoint_io import restore_params
from sad_jax.models.transformer import PROJECTIONS, STACKED, unstack_layers

# weight name → (its module, number of leading input dims): the model's projections
TARGETABLE = PROJECTIONS
DEFAULT_TARGETS = r"^(attn/(q|k|v|o)|mlp/(gate|up|down))$"
BASE_DTYPES = ("float32", "bfloat16", "int8")
A, B, QSCALE = "_lora_a", "_lora_b", "_qscale"


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoraSpec:
  rank: int
  alpha: float
  dropout: float = 0.0
  targets: str = DEFAULT_TARGETS   # regex over module names "attn/q", "mlp/down", …
  base_dtype: str = "float32"      # the frozen base: float32 | bfloat16 | int8

  @property
  def scale(self) -> float:
    return self.alpha / self.rank

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


def from_config(c) -> LoraSpec | None:
  """The spec of config.model.lora (None: rank 0, LoRA off); bad values are DataErrors
  naming the field."""
  if c is None or int(c.get("rank", 0)) == 0:
    return None
  field = "config.model.lora"
  rank, alpha, dropout = int(c.rank), float(c.alpha), float(c.get("dropout", 0.0))
  if rank < 0:
    raise DataError(f"must be ≥ 0, got {rank}", field=f"{field}.rank")
  if alpha <= 0:
    raise DataError(f"must be > 0, got {alpha}", field=f"{field}.alpha")
  if not 0.0 <= dropout < 1.0:
    raise DataError(f"must be in [0, 1), got {dropout}", field=f"{field}.dropout")
  base_dtype = str(c.get("base_dtype", "float32"))
  if base_dtype not in BASE_DTYPES:
    raise DataError(f"must be one of {', '.join(BASE_DTYPES)}, got {base_dtype!r}",
                    field=f"{field}.base_dtype")
  targets = str(c.get("targets", DEFAULT_TARGETS))
  try:
    pattern = re.compile(targets)
  except re.error as e:
    raise DataError(f"not a regular expression: {e}", field=f"{field}.targets") from None
  if not any(pattern.search(f"{m}/{n}") for n, (m, _) in TARGETABLE.items()):
    raise DataError(f"{targets!r} matches none of "
                    f"{', '.join(f'{m}/{n}' for n, (m, _) in TARGETABLE.items())}",
                    field=f"{field}.targets")
  return LoraSpec(rank=rank, alpha=alpha, dropout=dropout, targets=targets,
                  base_dtype=base_dtype)


def module_names(spec: LoraSpec) -> list[str]:
  """The targeted weights' names (q, k, …), in TARGETABLE's order."""
  pattern = re.compile(spec.targets)
  return [n for n, (m, _) in TARGETABLE.items() if pattern.search(f"{m}/{n}")]


def _targets(base, spec: LoraSpec):
  """(path to the weight's module dict, weight name, stacked) for every targeted weight."""
  names = set(module_names(spec))
  out = []
  for key, layer in base.items():
    if key != STACKED and not key.startswith("layers_"):
      continue
    for module in ("attn", "mlp"):
      for name in layer.get(module, {}):
        if name in names and TARGETABLE[name][0] == module:
          out.append(((key, module), name, key == STACKED))
  return out


def _get(tree, path):
  for p in path:
    tree = tree[p]
  return tree


def _set(tree: dict, path, name: str, value) -> None:
  for p in path:
    tree = tree.setdefault(p, {})
  tree[name] = value


def init_adapters(base, spec: LoraSpec, rng: jax.Array) -> dict:
  """Adapters for `base` (per-layer or stacked): A ~ U(±1/√fan_in) (PyTorch's Linear
  default, which PEFT's A uses), B = 0."""
  out: dict = {}
  targets = _targets(base, spec)
  keys = jax.random.split(rng, max(len(targets), 1))
  for key, (path, name, stacked) in zip(keys, targets, strict=False):
    w = _get(base, path)[name]
    lead = w.shape[:1] if stacked else ()
    n_in = TARGETABLE[name][1]
    dims = w.shape[len(lead):]
    in_dims, out_dims = dims[:n_in], dims[n_in:]
    bound = 1.0 / np.sqrt(np.prod(in_dims))
    _set(out, path, name + A, jax.random.uniform(
        key, lead + in_dims + (spec.rank,), jnp.float32, -bound, bound))
    _set(out, path, name + B, jnp.zeros(lead + (spec.rank,) + out_dims, jnp.float32))
  return out


def combine(base, adapters, spec: LoraSpec) -> dict:
  """The tree the model is applied to: the base with each adapter pair beside its weight,
  B scaled by α/r (so the gradient of the stored B is the standard LoRA one)."""
  def merge_into(b, a):
    if not isinstance(a, dict):
      return a
    out = dict(b)
    for k, v in a.items():
      if k.endswith(B):
        out[k] = v * spec.scale
      elif isinstance(v, dict):
        out[k] = merge_into(b[k], v)
      else:
        out[k] = v
    return out
  return merge_into(base, adapters)


def delta(a: jax.Array, b: jax.Array, *, n_in: int, stacked: bool) -> jax.Array:
  """A @ B as a weight of W's shape (in_dims + out_dims), float32."""
  lead = 1 if stacked else 0
  eq_a = "LIr" if stacked else "Ir"
  eq_b = "LrO" if stacked else "rO"
  in_shape, out_shape = a.shape[lead:-1], b.shape[lead + 1:]
  a2 = a.reshape(a.shape[:lead] + (int(np.prod(in_shape)), a.shape[-1]))
  b2 = b.reshape(b.shape[:lead + 1] + (int(np.prod(out_shape)),))
  d = jnp.einsum(f"{eq_a},{eq_b}->{eq_a[:-1]}{eq_b[-1]}", a2.astype(jnp.float32),
                 b2.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
  return d.reshape(a.shape[:lead] + in_shape + out_shape)


def dequantize(base) -> dict:
  """The base as float32 weights (int8 weights times their scales; others cast)."""
  def walk(node):
    out = {}
    for k, v in node.items():
      if k.endswith(QSCALE):
        continue
      if isinstance(v, dict):
        out[k] = walk(v)
      elif k + QSCALE in node:
        out[k] = v.astype(jnp.float32) * node[k + QSCALE].astype(jnp.float32)
      else:
        out[k] = v.astype(jnp.float32)
    return out
  return walk(base)


def merge(base, adapters, spec: LoraSpec) -> dict:
  """Dense float32 parameters W + (α/r)·A@B: the model the adapters make, for export,
  rollouts and evaluation."""
  dense = dequantize(base)
  for path, name, stacked in _targets(dense, spec):
    mod = _get(adapters, path)
    w = _get(dense, path)
    w[name] = w[name] + spec.scale * delta(mod[name + A], mod[name + B],
                                           n_in=TARGETABLE[name][1], stacked=stacked)
  return dense


def prepare_base(params, spec: LoraSpec) -> dict:
  """The frozen base in spec.base_dtype: float32 as given; bfloat16 for every weight (norm
  scales stay float32); int8 for the targeted weights with a float32 absmax scale per
  output channel, and bfloat16 for the rest."""
  if spec.base_dtype == "float32":
    return params
  targets = {(path, name) for path, name, _ in _targets(params, spec)}

  def walk(node, path):
    out = {}
    for k, v in node.items():
      if isinstance(v, dict):
        out[k] = walk(v, path + (k,))
      elif k == "scale":
        out[k] = v
      elif spec.base_dtype == "int8" and (path, k) in targets:
        stacked = path[0] == STACKED
        n_in = TARGETABLE[k][1] + (1 if stacked else 0)
        axes = tuple(range(1 if stacked else 0, n_in))
        amax = jnp.max(jnp.abs(v.astype(jnp.float32)), axis=axes, keepdims=True)
        s = jnp.maximum(amax, 1e-30) / 127.0
        out[k] = jnp.clip(jnp.round(v / s), -127, 127).astype(jnp.int8)
        out[k + QSCALE] = jnp.squeeze(s, axes)
      else:
        out[k] = v.astype(jnp.bfloat16)
    return out
  return walk(params, ())


def fingerprint_files(folder: str) -> str:
  """A content fingerprint of a model folder: sha256 over every file's relative name and
  content hash (on an object store, the hash its listing gives). Names the base a LoRA run
  trained on, so that a resume on another base is refused."""
  import os

  from sad_jax.common import fileio

  h = hashlib.sha256()
  if fileio.is_remote(folder):
    entries = {rel: str(info.get("md5Hash") or info.get("crc32c") or info.get("size"))
               for rel, info in fileio._listing(folder).items()}
  else:
    entries = {}
    for root, _, names in os.walk(folder):
      for n in names:
        full = os.path.join(root, n)
        with open(full, "rb") as f:
          entries[os.path.relpath(full, folder)] = hashlib.file_digest(f, "sha256").hexdigest()
  for rel in sorted(entries):
    h.update(f"{rel}\0{entries[rel]}\0".encode())
  return h.hexdigest()[:32]


def num_params(adapters: Any) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(adapters))


ADAPTERS = "adapters"      # final/adapters: the adapters of a LoRA run
SPEC_FILE = "lora.json"    # its spec and base; written last (the folder's commit point)


def save_adapters(folder: str, adapters, spec: LoraSpec, *, base: dict, init: str) -> None:
  """Adapters (per layer, orbax) and lora.json: the spec and the base they train on."""
  import orbax.checkpoint as ocp

  from sad_jax.common import fileio

  folder = fileio.abspath(folder)
  fileio.makedirs(folder)
  ck = ocp.StandardCheckpointer()
  ck.save(fileio.join(folder, "params"), unstack_layers(adapters), force=True)
  ck.wait_until_finished()
  if jax.process_index() == 0:
    fileio.json_dump(fileio.join(folder, SPEC_FILE),
                     {"spec": spec.to_dict(), "base": base, "init": init}, indent=1)


def load_adapters(folder: str) -> tuple[LoraSpec, dict, dict]:
  """(spec, adapters per layer as host arrays, lora.json) of a save_adapters folder."""
  import json

  from sad_jax.common import fileio

  folder = fileio.abspath(folder)
  path = fileio.join(folder, SPEC_FILE)
  if not fileio.exists(path):
    raise DataError(f"no {SPEC_FILE}: not the adapters of a LoRA run (train with "
                    "model.lora.rank > 0)", path=folder)
  try:
    info = json.loads(fileio.read_text(path))
    spec = LoraSpec(**info["spec"])
  except (ValueError, KeyError, TypeError) as e:
    raise DataError(f"cannot read the adapters' spec: {e}", path=path, field="spec") from None
  return spec, jax.tree.map(np.asarray, restore_params(fileio.join(folder, "params"))), info
