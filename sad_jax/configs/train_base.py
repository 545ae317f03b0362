"""Defaults of `sad-jax train`; the objective configs (train_sad.py, train_token_kd.py,
train_sft.py) and the pod example start from these.

  sad-jax train --config configs/train_sad.py --workdir runs/sad \
      --config.dataset=runs/fireact --config.teacher_store=runs/fireact_teacher

Sizes here are the demo's: a small Llama-style student on a 2-core CPU in minutes.
"""

import ml_collections

# A 2-layer Llama-style student (vocab_size 0: taken from the dataset's tokenizer).
DEMO_STUDENT = dict(model_type="llama", vocab_size=0, hidden_size=128, intermediate_size=352,
                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                    max_position_embeddings=4096, rope_theta=10000.0, rms_norm_eps=1e-6,
                    tie_word_embeddings=True)


def stage(name, steps, bucket_weights, loss_weights, temperature=1.0):
  return ml_collections.ConfigDict(dict(name=name, steps=steps, bucket_weights=bucket_weights,
                                        loss_weights=loss_weights, temperature=temperature))


def distributed() -> ml_collections.ConfigDict:
  """Multi-host start-up (sharding.init_distributed), shared by train and teacher precompute."""
  d = ml_collections.ConfigDict()
  d.coordinator = ""   # host:port; or env SAD_JAX_COORDINATOR (then NUM_PROCESSES,
  d.num_processes = 0  # PROCESS_ID); "auto" lets jax detect SLURM / TPU / …
  d.process_id = -1
  return d


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  objective = arg or "sad"
  if objective not in ("sad", "token_kd", "sft"):
    raise ValueError(f"unknown objective {objective!r}; expected sad, token_kd or sft")
  c = ml_collections.ConfigDict()
  c.dataset = ""                   # prepared dataset folder (sad-jax prepare)
  c.teacher_store = ""             # top-k store (sad-jax teacher precompute); "" = none
  c.seed = 0

  c.model = ml_collections.ConfigDict()
  c.model.init = "scratch"         # scratch (from hf_config) | pretrained (from path) |
  #                                  teacher_layers:0,4,8,… (those layers of the model at path)
  c.model.path = ""                # HF folder or orbax params folder, for pretrained
  c.model.hf_config = ml_collections.ConfigDict(DEMO_STUDENT)
  c.model.dtype = "float32"        # compute dtype: float32 | bfloat16 (params stay float32)
  c.model.remat = "none"           # none | attention | block
  c.model.scan_layers = False      # layers stacked and run as one nn.scan body (compile time
  #                                  flat in depth); HF/final/ folders stay per layer
  c.model.attention = "flash"      # flash (pure JAX, any backend: segment-aware key ranges,
  #                                  online softmax) | reference (pure JAX, keeps [T, S]
  #                                  probabilities) | splash (Pallas, TPU) | cudnn (GPU,
  #                                  bfloat16) | splash_interpret (slow; checks)

  # LoRA (rank > 0): adapters on the frozen pretrained/pruned student, trained alone
  c.model.lora = ml_collections.ConfigDict()
  c.model.lora.rank = 0            # 0: full fine-tuning
  c.model.lora.alpha = 16.0        # the update is (alpha/rank)·A@B
  c.model.lora.dropout = 0.0       # on the adapters' inputs
  c.model.lora.targets = r"^(attn/(q|k|v|o)|mlp/(gate|up|down))$"  # regex over attn/q, mlp/down, …
  c.model.lora.base_dtype = "float32"  # the frozen base: float32 | bfloat16 | int8 (QLoRA-style)

  c.objective = ml_collections.ConfigDict()
  c.objective.name = objective     # sad | token_kd | sft
  c.objective.divergence = "fkl"   # fkl | rkl | jsd
  c.objective.jsd_beta = 0.5
  c.objective.temperature = 1.0    # overridden per curriculum stage
  c.objective.tail = "tail_bucket"  # tail_bucket | ignore
  c.objective.label_smoothing = 0.0
  c.objective.action_teacher_weight = 0.0
  c.objective.chunk_size = 128     # sequence chunk of the fused head loss (compact: its grain)
  c.objective.compact_head = True  # LM head at the loss positions only (same values/grads)
  c.objective.learnable_weights = False
  c.objective.weight_floor = 0.05
  c.objective.curriculum_gamma = 0.0
  c.objective.pcgrad = False

  c.teacher = ml_collections.ConfigDict()
  c.teacher.k = 16                 # top-k used in training (<= the store's k)
  c.teacher.online = ""            # a teacher model folder: its forward runs inside the step
  c.teacher.online_kinds = ("reason",)

  c.data = ml_collections.ConfigDict()
  c.data.seq_len = 512             # model inputs per row; rows hold seq_len + 1 tokens
  c.data.batch_size = 8            # rows per optimizer step (global, all micro-batches)
  c.data.accum = 1                 # gradient-accumulation micro-batches per step
  c.data.prefetch = 2              # batches prepared ahead in a thread
  c.data.pack_lookahead = 8        # examples a row may pass over to fill itself (1: in order)

  c.curriculum = ml_collections.ConfigDict()
  # score = Σ weight·stats field (steps, tool_calls, tokens, observation_tokens,
  # reason_tokens, action_tokens, success, truncated)
  c.curriculum.score = ml_collections.ConfigDict(dict(steps=1.0, tool_calls=0.5, tokens=1 / 512))
  c.curriculum.n_buckets = 3       # quantiles of the score (0 = simplest)
  weights = (1.0, 1.0) if objective == "sad" else (1.0,)
  c.curriculum.stages = (
      stage("simple", 40, (1.0, 0.5, 0.0), weights),
      stage("all", 60, (1.0, 1.0, 1.0), weights),
  )

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 3e-3
  c.optim.warmup_steps = 10
  c.optim.final_fraction = 0.1     # cosine decays to lr · final_fraction
  c.optim.b1 = 0.9
  c.optim.b2 = 0.98
  c.optim.eps = 1e-8
  c.optim.weight_decay = 0.01      # not on norms, biases or span weights
  c.optim.clip_norm = 1.0

  c.train = ml_collections.ConfigDict()
  c.train.steps = 100
  c.train.log_every = 10
  c.train.eval_every = 50          # 0: only at the end
  c.train.eval_batches = 8         # 0: the whole validation split
  c.train.checkpoint_every = 50
  c.train.export = True            # write workdir/final (orbax params + config.json)

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.keep = 2
  c.checkpoint.keep_best = 1
  c.checkpoint.best_metric = "validation/loss"
  c.checkpoint.best_mode = "min"
  c.checkpoint.use_async = True

  c.mesh = ml_collections.ConfigDict()
  c.mesh.shape = (-1, 1, 1)        # (data, fsdp, tensor); -1 = the remaining devices
  c.mesh.rules = ()                # ((logical, mesh axis), …); () = sharding.DEFAULT_RULES

  c.distributed = distributed()

  c.metrics = ml_collections.ConfigDict()
  c.metrics.mfu = True             # measure the matmul peak at start and report MFU
  c.metrics.progress = True        # progress bar with ETA (on a terminal)
  return c


def runlocal(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A shrink for a quick CPU check: few steps, small rows."""
  c.data.seq_len = 256
  c.data.batch_size = 4
  c.train.steps = 6
  c.train.log_every = 2
  c.train.eval_every = 3
  c.train.eval_batches = 2
  c.train.checkpoint_every = 3
  c.curriculum.stages = tuple(
      stage(s.name, 3, s.bucket_weights, s.loss_weights, s.temperature)
      for s in c.curriculum.stages)
  c.metrics.mfu = False
  return c
