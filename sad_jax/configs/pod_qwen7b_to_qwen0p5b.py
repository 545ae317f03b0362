"""Pod-size example: Qwen2.5-7B-Instruct teacher → Qwen2.5-0.5B student, span-level (`sad`).

The teacher's top-k is precomputed offline, once, on the same pod. Every host runs the same
command (--coordinator auto: jax.distributed detects the TPU pod); each host runs the
teacher on its own chips — the mesh is per host, here tensor 4 over a v5p host's 4 chips —
and computes its share of the store's shards (shard i on host i mod 64), and host 0 writes
the manifest once every shard is in the store folder:
  sad-jax teacher precompute --config configs/teacher_precompute.py --coordinator auto \
      --config.dataset=gs://BUCKET/agent_traj --config.teacher=gs://BUCKET/Qwen2.5-7B-Instruct \
      --config.out=gs://BUCKET/qwen7b_top64 --config.k=64 --config.mesh='(1,1,4)' \
      --config.compute_dtype=bfloat16
then every host runs the same command (jax.distributed detects the TPU pod):
  sad-jax train --config configs/pod_qwen7b_to_qwen0p5b.py --workdir gs://BUCKET/runs/sad05 \
      --coordinator auto --config.dataset=gs://BUCKET/agent_traj \
      --config.teacher_store=gs://BUCKET/qwen7b_top64 \
      --config.model.path=gs://BUCKET/Qwen2.5-0.5B-Instruct
Every path may be a gs:// one (the `gcs` extra; tested against a GCS emulator, not yet
against GCS itself) or a folder that every host mounts; the store must be one folder that
all hosts see.

Mesh for 256 chips (e.g. a v5p-512 slice): data 8 × fsdp 16 × tensor 2. The 0.5B student
fits with FSDP over 16; tensor 2 splits its 14 query heads and the 152k vocabulary (the head
and the loss are the largest activations at 4k tokens). Rules: the defaults, with the
batch over data and fsdp and the embedding dimension over fsdp.
"""

import ml_collections

from sad_jax.configs import train_base

# Qwen2.5-0.5B's config.json (the fields the model reads); the weights come from model.path.
QWEN25_0P5B = dict(model_type="qwen2", vocab_size=151936, hidden_size=896,
                   intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                   num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1000000.0,
                   rms_norm_eps=1e-6, tie_word_embeddings=True, use_sliding_window=False)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  if arg:  # a typo'd argument must not pass silently
    raise ValueError(f"this config takes no argument, got {arg!r}")
  c = train_base.get_config("sad")
  c.model.init = "pretrained"
  c.model.path = ""                  # the student's HF folder (set on the command line)
  c.model.hf_config = ml_collections.ConfigDict(QWEN25_0P5B)  # for abstract checks
  c.model.dtype = "bfloat16"
  c.model.remat = "block"
  c.model.scan_layers = True         # 24 layers as one scanned body (compile time ~flat in depth)
  c.model.attention = "splash"       # Pallas splash kernel (TPU); "reference" runs anywhere
  c.objective.chunk_size = 512
  c.objective.learnable_weights = True
  c.objective.curriculum_gamma = 0.1
  c.teacher.k = 64
  c.data.seq_len = 4096
  c.data.batch_size = 256            # 1M tokens per step
  c.data.accum = 2
  c.data.prefetch = 4
  # Every stage distils at the store's τ (precompute's --config.temperature, 1.0 above):
  # a store holds one τ, and training refuses a stage at another (README "Temperature").
  c.curriculum.stages = (
      train_base.stage("single_tool", 2000, (1.0, 0.3, 0.0), (1.0, 1.0), temperature=1.0),
      train_base.stage("multi_step", 4000, (0.5, 1.0, 0.5), (1.0, 1.0), temperature=1.0),
      train_base.stage("all", 14000, (1.0, 1.0, 1.0), (1.0, 1.0), temperature=1.0),
  )
  c.optim.lr = 5e-5
  c.optim.warmup_steps = 500
  c.optim.weight_decay = 0.1
  c.train.steps = 20000
  c.train.log_every = 50
  c.train.eval_every = 1000
  c.train.eval_batches = 32
  c.train.checkpoint_every = 500
  c.checkpoint.keep = 3
  c.checkpoint.keep_best = 2
  c.mesh.shape = (-1, 16, 2)
  c.mesh.rules = (("batch", ("data", "fsdp")), ("length", None), ("act_embed", None),
                  ("act_heads", "tensor"), ("act_kv_heads", "tensor"), ("act_mlp", "tensor"),
                  ("act_vocab", "tensor"), ("vocab", "tensor"), ("embed", "fsdp"),
                  ("mlp", "tensor"), ("heads", "tensor"), ("kv_heads", "tensor"),
                  ("head_dim", None), ("norm", None), ("lora", "fsdp"))
  c.distributed.coordinator = "auto"
  return c
