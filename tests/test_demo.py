"""The demo's plan: students at least 4× smaller than the teacher, the same budget for
every objective; the report's verdict lines follow the numbers."""

import jax

from sad_jax import demo
from sad_jax.models import transformer as T
from sad_jax.models.config import from_hf_dict


def count(model: dict) -> int:
  from configs import train_base

  hf = {**train_base.DEMO_STUDENT, **model, "vocab_size": 600}
  cfg = from_hf_dict(hf)
  shapes = jax.eval_shape(lambda: T.init_params(cfg, jax.random.key(0)))
  return sum(int(x.size) for x in jax.tree.leaves(shapes))


def test_students_are_at_least_4x_smaller_and_share_a_budget():
  for quick in (True, False):
    p = demo.plan(quick)
    assert count(p.teacher) >= 4 * count(p.student)
    assert p.student_steps > 0 and len(p.seeds) == (1 if quick else 3)
  assert demo.OBJECTIVES == ("sad", "token_kd", "sft")
