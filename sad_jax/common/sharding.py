"""Meshes and logical axis rules.

Model code names axes logically; a short rule list maps them to the mesh axes
`data`, `fsdp`, `tensor`. A dimension that a mesh axis does not divide stays
replicated (e.g. 2 KV heads on a tensor axis of 8), rather than failing.

Activations are constrained at block boundaries with `constrain`: the known trap is XLA
on CPU returning wrong gradients for an FSDP+TP matmul chain whose output carried no
sharding constraint (docs/design.md). tests/models/test_model.py records, per JAX version,
whether the unconstrained chain is wrong (not on 0.10.2), and tests/train/test_step.py
counts the constraints in the lowered train step.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# logical name → mesh axis (or axes, or None)
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("norm", None),
    ("layers", None),  # the stacked-layer axis of scanned params: each device holds every layer
    # a LoRA adapter's rank axis: over fsdp where its weight's axes leave fsdp free (B of
    # q/k/v/gate/up, A of o/down), so that adapters split about as finely as their weights
    ("lora", "fsdp"),
)

_CURRENT: contextvars.ContextVar = contextvars.ContextVar("sad_jax_mesh", default=None)


def make_mesh(shape: Sequence[int], axis_names: Sequence[str] = MESH_AXES,
              devices=None) -> Mesh:
  """A mesh with Auto axis types (jax.make_mesh defaults to Explicit in this JAX)."""
  shape = tuple(int(s) for s in shape)
  if devices is None:
    return jax.make_mesh(shape, tuple(axis_names), axis_types=(AxisType.Auto,) * len(shape))
  return Mesh(np.asarray(devices).reshape(shape), tuple(axis_names),
              axis_types=(AxisType.Auto,) * len(shape))


@contextlib.contextmanager
def use_mesh(mesh: Mesh | None, rules=DEFAULT_RULES) -> Iterator[None]:
  """Within the block, `constrain` applies the rules on this mesh."""
  token = _CURRENT.set(None if mesh is None else (mesh, tuple(rules)))
  try:
    yield
  finally:
    _CURRENT.reset(token)


def current() -> tuple[Mesh, tuple] | None:
  """(mesh, rules) of the enclosing `use_mesh`, or None (kernels under shard_map need it)."""
  return _CURRENT.get()


def spec_for(shape: Sequence[int], axes: Sequence[str | None], mesh: Mesh,
             rules=DEFAULT_RULES) -> PartitionSpec:
  """PartitionSpec for a value of `shape` with logical `axes` (None: replicated)."""
  table = dict(rules)
  used: set[str] = set()
  out = []
  for dim, name in zip(shape, axes, strict=True):
    target = table.get(name) if name is not None else None
    names = (target,) if isinstance(target, str) else tuple(target or ())
    names = tuple(n for n in names if n in mesh.shape and n not in used)
    size = int(np.prod([mesh.shape[n] for n in names])) if names else 1
    if not names or size == 1 or dim % size:
      out.append(None)
      continue
    used.update(names)
    out.append(names[0] if len(names) == 1 else names)
  return PartitionSpec(*out)


def sharding_for(shape, axes, mesh: Mesh, rules=DEFAULT_RULES) -> NamedSharding:
  return NamedSharding(mesh, spec_for(shape, axes, mesh, rules))


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
  """Sharding constraint by logical axes under `use_mesh`; a no-op without one."""
  current = _CURRENT.get()
  if current is None:
    return x
  mesh, rules = current
  return jax.lax.with_sharding_constraint(x, sharding_for(x.shape, axes, mesh, rules))


def tree_shardings(values, axes_tree, mesh: Mesh, rules=DEFAULT_RULES):
  """NamedShardings for a pytree of arrays (or ShapeDtypeStructs) and its logical axes
  (a tree of the same structure whose leaves are tuples of names)."""
  return jax.tree.map(lambda v, a: sharding_for(v.shape, a, mesh, rules), values, axes_tree)


def init_distributed(*, coordinator: str = "", num_processes: int = 0,
                     process_id: int = -1) -> None:
  """Multi-host start-up with jax.distributed, from arguments or the environment.

  coordinator "host:port" (or env SAD_JAX_COORDINATOR with SAD_JAX_NUM_PROCESSES and
  SAD_JAX_PROCESS_ID) starts an explicit cluster; "auto" lets JAX detect SLURM, TPU pods,
  MPI and the like; "" (and no env) is a single process. On CPU, collectives across
  processes use gloo. Idempotent.
  """
  import os

  coordinator = coordinator or os.environ.get("SAD_JAX_COORDINATOR", "")
  if not coordinator:
    return
  if jax.distributed.is_initialized():
    return
  if coordinator == "auto":
    jax.distributed.initialize()
    return
  n = num_processes or int(os.environ.get("SAD_JAX_NUM_PROCESSES", "0"))
  pid = process_id if process_id >= 0 else int(os.environ.get("SAD_JAX_PROCESS_ID", "-1"))
  from sad_jax.common.errors import DataError

  if n < 1 or pid < 0:
    raise DataError(f"coordinator {coordinator} needs num_processes and process_id "
                    "(config.distributed.* or SAD_JAX_NUM_PROCESSES / SAD_JAX_PROCESS_ID)",
                    field="config.distributed")
  if pid >= n:  # else the coordinator would wait for a process that never comes
    raise DataError(f"process_id {pid} is not below num_processes {n} (ids are 0 … {n - 1})",
                    field="config.distributed.process_id")
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=coordinator, num_processes=n, process_id=pid)


def mesh_shape(shape: Sequence[int], n_devices: int) -> tuple[int, ...]:
  """Resolves one −1 in a mesh shape to the remaining devices; checks the product."""
  shape = [int(s) for s in shape]
  if shape.count(-1) > 1:
    raise ValueError(f"mesh shape {tuple(shape)} has more than one -1")
  if -1 in shape:
    rest = int(np.prod([s for s in shape if s != -1]))
    if n_devices % rest:
      raise ValueError(f"mesh shape {tuple(shape)} does not divide {n_devices} devices")
    shape[shape.index(-1)] = n_devices // rest
  if int(np.prod(shape)) != n_devices:
    raise ValueError(f"mesh shape {tuple(shape)} needs {int(np.prod(shape))} devices, "
                     f"there are {n_devices}")
  return tuple(shape)
