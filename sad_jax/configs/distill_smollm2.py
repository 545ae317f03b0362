"""A depth-pruned SmolLM2 student distilled from SmolLM2-135M-Instruct on FireAct (issue 20.4).

  python bench/smollm2_students.py --workdir runs/smollm2      # all of it, with the table
  sad-jax train --config configs/distill_smollm2.py:sad --workdir runs/smollm2/sad \
      --config.dataset=runs/smollm2/ds --config.teacher_store=runs/smollm2/store \
      --config.model.path=~/.cache/sad_jax/SmolLM2-135M-Instruct-hf

The student keeps 11 of the teacher's 30 layers (every third, and the last), its
embeddings, final norm and tied head: 67.3 M parameters against 134.5 M. A pruned model
starts far from its teacher (a 4-layer one started at a loss of 19.5), so it keeps more
layers than the 4 of the smoke test. Every objective trains with the same data, rows,
schedule and learning rate, set before any run (a pretrained model is fine-tuned at a
small rate; nothing here was tuned on the validation split, which only scores).
"""

import ml_collections

from sad_jax.configs import train_base

LAYERS = (0, 3, 6, 9, 12, 15, 18, 21, 24, 27, 29)
# SmolLM2-135M-Instruct's architecture at the student's depth (train_and_evaluate reads the
# teacher folder's config.json; this copy serves abstract checks such as `sad-jax plan`)
STUDENT = dict(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
               num_hidden_layers=len(LAYERS), num_attention_heads=9, num_key_value_heads=3,
               max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5,
               tie_word_embeddings=True)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  objective = arg or "sad"
  c = train_base.get_config(objective)  # refuses an unknown objective
  c.model.init = "teacher_layers:" + ",".join(map(str, LAYERS))
  c.model.path = ""                  # the teacher's HF folder (sad-jax convert gguf)
  c.model.hf_config = ml_collections.ConfigDict(STUDENT)
  c.teacher.k = 32                   # the store's top-32 (float16), tail bucket
  c.data.seq_len = 1024              # FireAct in SmolLM2's chat template: most fit one row
  c.data.batch_size = 2
  c.objective.chunk_size = 256
  weights = (1.0, 1.0) if objective == "sad" else (1.0,)
  c.curriculum.stages = (train_base.stage("all", 48, (1.0, 1.0, 1.0), weights),)
  c.optim.lr = 2e-4
  c.optim.warmup_steps = 5
  c.train.steps = 48                 # rows of 2 × 1024 tokens: ≤ 30 min on the 2-core CPU
  c.train.log_every = 10
  c.train.eval_every = 0
  c.train.eval_batches = 0
  c.train.checkpoint_every = 16
  c.checkpoint.keep = 1
  c.checkpoint.keep_best = 0
  c.metrics.mfu = False
  return c
