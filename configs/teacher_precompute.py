"""Precompute a teacher's top-k log-probs over a prepared dataset.

  sad-jax teacher precompute --config configs/teacher_precompute.py \
      --config.dataset=runs/fireact --config.teacher=PATH --config.out=runs/fireact_teacher

`teacher` is an HF folder (config.json + safetensors) or an orbax params folder
written by training. The mesh shape is (data, fsdp, tensor) over one process's local
devices (-1: the remaining ones); the default uses one device. Across hosts every host
runs the same command with --coordinator/--num-processes/--process-id (as `sad-jax train`;
or --coordinator auto on a TPU pod): each process computes its own shards on its own mesh
into the shared `out`, and process 0 writes the manifest once every shard is there.
"""

import ml_collections

from configs import train_base


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  if arg:  # a typo'd argument must not pass silently
    raise ValueError(f"this config takes no argument, got {arg!r}")
  config = ml_collections.ConfigDict()
  config.dataset = ""                 # prepared dataset folder
  config.teacher = ""                 # HF folder or orbax params folder
  config.teacher_name = ""            # recorded in the manifest (default: the folder name)
  config.out = ""                     # store folder (resumable: rerun to complete it)
  config.k = 64
  config.temperature = 1.0
  config.span_kinds = ("reason",)     # ("reason", "action") for token_kd / action KD
  config.logp_dtype = "float16"       # float16 | bfloat16 | int8
  config.shard_size = 256             # trajectories per shard (the unit of resumption)
  config.batch_size = 8
  config.mesh = (1, 1, 1)             # (data, fsdp, tensor) per process, over its devices
  config.compute_dtype = "float32"    # or bfloat16
  config.distributed = train_base.distributed()  # multi-host, as in train
  return config
