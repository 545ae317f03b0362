"""Precompute a teacher's top-k log-probs over a prepared dataset.

  sad-jax teacher precompute --config configs/teacher_precompute.py \
      --config.dataset=runs/fireact --config.teacher=PATH --config.out=runs/fireact_teacher

`teacher` is an HF folder (config.json + safetensors) or an orbax params folder
written by training. --config.sampling=sampled --config.k=64 stores 64 draws per position
from the teacher's distribution instead of its top-64 (an unbiased p̂ = count/64; train
on it with objective.tail=ignore and objective.divergence=fkl). The mesh shape is
(data, fsdp, tensor) over one process's local devices (-1: the remaining ones); the
default uses one device. Across hosts every host runs the same command with
--coordinator/--num-processes/--process-id (as `sad-jax train`; or --coordinator auto on
a TPU pod): each process computes its own shards on its own mesh into the shared `out`,
and process 0 writes the manifest once every shard is there (a sampled store's draws are
keyed by seed, example id and position, so it too is the same bytes on any split).
"""

import ml_collections

from sad_jax.configs import train_base


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  if arg:  # a typo'd argument must not pass silently
    raise ValueError(f"this config takes no argument, got {arg!r}")
  config = ml_collections.ConfigDict()
  config.dataset = ""                 # prepared dataset folder
  config.teacher = ""                 # HF folder or orbax params folder
  config.teacher_name = ""            # recorded in the manifest (default: the folder name)
  config.out = ""                     # store folder (resumable: rerun to complete it)
  config.k = 64                       # top-k ids, or the draws N per position if sampled
  config.sampling = "topk"            # topk | sampled (N draws, unbiased; train: fkl, ignore)
  config.seed = 0                     # of the sampled draws (with example id and position)
  config.temperature = 1.0
  config.span_kinds = ("reason",)     # ("reason", "action") for token_kd / action KD
  config.logp_dtype = "float16"       # float16 | bfloat16 | int8
  config.shard_size = 256             # trajectories per shard (the unit of resumption)
  config.batch_size = 8
  config.mesh = (1, 1, 1)             # (data, fsdp, tensor) per process, over its devices
  config.compute_dtype = "float32"    # or bfloat16
  config.distributed = train_base.distributed()  # multi-host, as in train
  return config
