"""`sad-jax plan`: the per-device memory of a training config, from abstract shapes only
(no devices, dataset or weights), for the mesh the config names at a given device count.

  sad-jax plan --config configs/pod_qwen7b_to_qwen0p5b.py --devices 256

Exact from the shardings: parameters (with LoRA: the frozen base and the adapters apart),
optimizer state and the batch (the teacher top-k
part shown apart), each leaf's bytes on one device. Estimated by formula: gradients (one
float32 copy like the parameters, two with gradient accumulation: the running sum and the
micro-batch's), activations under the configured remat policy and attention kernel (see
`activation_bytes`), and the transient all-gathered weights of FSDP. Against XLA's compiled
memory analysis of the same step on 8 CPU devices the state is exact and the total was
0.81–1.42× with remat none or block (tests/test_plan.py allows 0.75–1.5×); XLA on CPU
allocated about twice the plan with remat=attention and with unrolled block remat over 2
micro-batches. On TPU, XLA schedules and fuses differently (not checked here: no TPU), so
treat it as a sizing guide, not a guarantee.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np

from sad_jax.common import sharding
from sad_jax.models.config import ModelConfig

GiB = 2**30
TEACHER_KEYS = ("teacher_ids", "teacher_logp", "teacher_mask")


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
  devices: int
  mesh: dict[str, int]
  params: int          # bytes per device (exact)
  optimizer: int       # exact: AdamW moments, step, RNG, span weights
  batch: int           # exact: ids, kinds, segment ids, positions, weights (all micro-batches)
  teacher_batch: int   # exact: the teacher top-k ids, log-probs and mask
  gradients: int       # estimated
  activations: dict[str, int]  # estimated, by part
  frozen: int = 0      # exact: a LoRA run's frozen base (`params` are then the adapters)

  @property
  def state(self) -> int:
    """Arguments of the step: what stays resident between steps."""
    return self.params + self.frozen + self.optimizer + self.batch + self.teacher_batch

  @property
  def temporaries(self) -> int:
    """What the step allocates while it runs."""
    return self.gradients + sum(self.activations.values())

  @property
  def total(self) -> int:
    return self.state + self.temporaries

  def table(self) -> str:
    mesh = " × ".join(f"{k} {v}" for k, v in self.mesh.items())
    rows = [("parameters", self.params)] if not self.frozen else [
        ("frozen base (LoRA)", self.frozen), ("adapters (LoRA)", self.params)]
    rows += [("optimizer state", self.optimizer),
            ("batch (ids, kinds, …)", self.batch), ("teacher top-k batch", self.teacher_batch),
            ("gradients", self.gradients)]
    rows += [(f"activations: {k}", v) for k, v in self.activations.items()]
    width = max(len(name) for name, _ in rows)
    lines = [f"per-device memory on {self.devices} devices ({mesh})"]
    lines += [f"  {name:<{width}}  {v / GiB:9.3f} GiB" for name, v in rows]
    lines += [f"  {'resident (state + batch)':<{width}}  {self.state / GiB:9.3f} GiB",
              f"  {'temporaries':<{width}}  {self.temporaries / GiB:9.3f} GiB",
              f"  {'total':<{width}}  {self.total / GiB:9.3f} GiB"]
    return "\n".join(lines)


def _device_bytes(tree, shardings) -> int:
  """Σ over leaves of one device's shard: shape from the sharding, bytes from the dtype."""
  total = 0
  for leaf, sh in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings), strict=True):
    total += math.prod(sh.shard_shape(leaf.shape)) * np.dtype(leaf.dtype).itemsize
  return total


def _local(n: int, axis: str, mesh, rules) -> int:
  """A dimension of size n with logical `axis`: its size on one device."""
  spec = sharding.spec_for((n,), (axis,), mesh, rules)[0]
  names = (spec,) if isinstance(spec, str) else tuple(spec or ())
  return n // math.prod(mesh.shape[a] for a in names)


def activation_bytes(cfg: ModelConfig, *, rows: int, seq_len: int, dtype_bytes: int,
                     remat: str, chunk: int, mesh, rules) -> dict[str, int]:
  """Estimated live activations at the backward's peak, per device, by part.

  b local rows of T tokens; a [b, T, D] tensor is "resid". Each layer keeps for its
  backward: its two norm inputs and outputs (4 resid), q/k/v and the attention output,
  the attention probabilities (reference: float32 unnormalised probabilities of every
  256-query block against its causal keys, and as much again for the soft-cap's tanh
  when the model caps its logits; remat="attention" or a fused kernel:
  none, the kernel keeps a float32 log-sum-exp per query and head), and the MLP's gate,
  up and product. remat="block" keeps only each layer's input (1 resid per layer) and
  one layer's set while that layer's backward runs. The chunked head loss holds the
  hidden states and their gradient, four float32 [b, chunk, V] arrays and the gathered
  head with its float32 gradient sum. FSDP gathers one layer's weights at a time (two in
  flight)."""
  from sad_jax.models.transformer import ATTN_BLOCK

  b = _local(rows, "batch", mesh, rules)
  t, d, hd = seq_len, cfg.hidden_size, cfg.head_dim
  h = _local(cfg.num_heads, "act_heads", mesh, rules)
  kv = _local(cfg.num_kv_heads, "act_kv_heads", mesh, rules)
  f = _local(cfg.intermediate_size, "act_mlp", mesh, rules)
  v = _local(cfg.padded_vocab, "act_vocab", mesh, rules)
  resid = b * t * d * dtype_bytes
  if cfg.attention != "reference":
    probs = b * h * t * 4
  elif remat == "attention":
    probs = 0
  else:
    n = t // ATTN_BLOCK if t % ATTN_BLOCK == 0 else 1
    blk = t // n
    probs = b * h * blk * blk * (n * (n + 1) // 2) * (8 if cfg.attn_softcap else 4)
  layer = (4 * resid + b * t * (2 * h + 2 * kv) * hd * dtype_bytes + probs
           + 3 * b * t * f * dtype_bytes)
  layers = cfg.num_layers * resid + layer if remat == "block" else cfg.num_layers * layer
  c = min(chunk, t)
  head = (b * t * d * (dtype_bytes + 4) + 4 * b * c * v * 4
          + d * v * (dtype_bytes + 4))
  # one layer's weights gathered over the fsdp axis (kept split over tensor), two in flight
  per_layer = (d * (cfg.num_heads + 2 * cfg.num_kv_heads) * hd + cfg.num_heads * hd * d
               + 3 * d * cfg.intermediate_size)
  tensor = mesh.shape["tensor"]
  gathered = 2 * per_layer // tensor * dtype_bytes
  return {"layers (saved for the backward)": layers, "head and loss (chunked)": head,
          "gathered weights (FSDP)": gathered}


def plan(config, *, devices: int, vocab: int | None = None) -> MemoryPlan:
  """The per-device memory of `config`'s train step on `devices` devices."""
  from jax.sharding import AbstractMesh, AxisType

  from sad_jax.trainer import train

  shape = sharding.mesh_shape(config.mesh.shape, devices)
  mesh = AbstractMesh(shape, sharding.MESH_AXES, axis_types=(AxisType.Auto,) * len(shape))
  rules = tuple(tuple(r) for r in config.mesh.rules) or sharding.DEFAULT_RULES
  parts = train.abstract_parts(config, mesh=mesh, rules=rules, vocab=vocab)
  state, state_sh = parts["state"], parts["state_sh"]
  batch, batch_sh = parts["batch"], parts["batch_sh"]
  model_cfg = parts["model_cfg"]
  params = _device_bytes(state.params, state_sh.params)
  frozen = 0 if parts["base"] is None else _device_bytes(parts["base"], parts["base_sh"])
  # the optimizer moments, and the step counter, RNG and span weights beside them
  optimizer = _device_bytes(
      [state.opt_state, state.step, state.rng, state.span_params],
      [state_sh.opt_state, state_sh.step, state_sh.rng, state_sh.span_params])
  pick = lambda keys: _device_bytes([batch[k] for k in keys], [batch_sh] * len(keys))
  teacher_keys = [k for k in TEACHER_KEYS if k in batch]
  dtype_bytes = np.dtype(config.model.dtype).itemsize
  return MemoryPlan(
      devices=devices, mesh=dict(zip(sharding.MESH_AXES, shape, strict=True)), params=params,
      frozen=frozen, optimizer=optimizer, batch=pick([k for k in batch if k not in TEACHER_KEYS]),
      teacher_batch=pick(teacher_keys),
      gradients=params * (2 if config.data.accum > 1 else 1),
      activations=activation_bytes(
          model_cfg, rows=config.data.batch_size // config.data.accum,
          seq_len=int(config.data.seq_len), dtype_bytes=dtype_bytes,
          remat=str(config.model.remat), chunk=int(config.objective.chunk_size), mesh=mesh,
          rules=rules))
