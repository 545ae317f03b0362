"""On-policy distillation rounds (`sad-jax opd`): the student plays train-fold episodes,
the teacher scores every token it wrote, and span-weighted losses train it on them.

  sad-jax opd --config configs/train_opd.py --workdir runs/opd \\
      --config.student=RUN/final --config.teacher=TEACHER/final
  sad-jax opd --config configs/train_opd.py:gkd …        (λ = 0.5 of each batch from the
                                                          teacher's episodes, full-distribution
                                                          reverse KL: needs teacher_data)
  sad-jax opd --config configs/train_opd.py:runlocal …   (two tiny rounds)

Loss fields are distill/onpolicy.OPDSettings; the definitions are in docs/design.md,
"On-policy distillation".
"""

import ml_collections

from sad_jax.configs.train_base import distributed

ENV = "twx:coin?numLocations=4&numDistractorItems=0&includeDoors=0&limitInventorySize=0"


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  if arg not in (None, "gkd", "runlocal"):
    raise ValueError(f"unknown argument {arg!r}; expected gkd or runlocal")
  c = ml_collections.ConfigDict()
  c.student = ""            # a model folder (a run's final/) to start from; "" = from init
  c.student_hf_config = ml_collections.ConfigDict(dict(
      model_type="llama", hidden_size=128, intermediate_size=320, num_hidden_layers=2,
      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096))
  c.teacher = ""            # the teacher's model folder (scored online, one forward a batch)
  c.tokenizer = ""          # default: the student folder's tokenizer.model
  c.teacher_data = ""       # the teacher's episodes (JSONL): λ rows and depth prefixes
  c.env = ENV
  c.seed = 0
  c.rounds = 20
  c.updates = 4             # optimizer steps per round
  c.batch = 8               # episode rows per step
  c.teacher_k = 16          # top-k of the teacher kept for the full-distribution term
  c.rollout = ml_collections.ConfigDict(dict(
      episodes=32, slots=16, max_new_tokens=48, max_steps=8, max_len=512, temperature=1.0,
      chunk=16))
  c.loss = ml_collections.ConfigDict(dict(
      sampled_weight=1.0, full_weight=0.0, divergence="rkl", jsd_beta=0.5, tail="tail_bucket",
      reason_weight=1.0, action_weight=1.0, per_span=False, discount=0.0, kl_coef=1.0,
      clip_eps=0.2, logp_floor=-20.0, advantage_cap=20.0, reward=0.0, invalid_penalty=0.0,
      guided_targets=False))
  # LoRA (rank > 0): the rounds train adapters on the frozen student (see train_base.py)
  c.lora = ml_collections.ConfigDict(dict(rank=0, alpha=16.0, dropout=0.0,
                                          targets=r"^(attn/(q|k|v|o)|mlp/(gate|up|down))$",
                                          base_dtype="float32"))
  c.mix = ml_collections.ConfigDict(dict(teacher_share=0.0))   # λ
  # depth curriculum: (from_round, teacher-prefix turns); the last stage reached applies
  c.depth = ((0, 0),)
  # teacher intervention: each rollout turn is the teacher's with probability prob, which
  # decays linearly to 0 at round decay_rounds (0: constant); its turns are context, not
  # targets; temperature 0: the teacher's greedy turn
  c.guide = ml_collections.ConfigDict(dict(prob=0.0, decay_rounds=0, temperature=0.0))
  c.optim = ml_collections.ConfigDict(dict(
      lr=1e-3, warmup_steps=0, final_fraction=1.0, b1=0.9, b2=0.98, eps=1e-8,
      weight_decay=0.0, clip_norm=1.0))
  c.eval = ml_collections.ConfigDict(dict(every=5, episodes=32, split="dev", max_steps=8))
  # (data, fsdp, tensor), -1 = the remaining devices: the update and the teacher's scoring
  # run on it; rollouts too (on several hosts, each process plays its share of the episodes
  # on its own devices, the same axes)
  c.mesh = ml_collections.ConfigDict(dict(shape=(-1, 1, 1), rules=()))
  c.distributed = distributed()
  if arg == "gkd":
    c.mix.teacher_share = 0.5
    c.loss.sampled_weight, c.loss.full_weight = 0.0, 1.0
  if arg == "runlocal":
    c.rounds, c.updates, c.batch = 2, 2, 2
    c.rollout.update(episodes=4, slots=2, max_new_tokens=16, max_steps=2, max_len=1024)
    c.eval.update(every=1, episodes=2, max_steps=2)
  return c
