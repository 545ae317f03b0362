"""The demo's plan: students at least 4× smaller than the teacher, the same budget for
every objective; the report's verdict lines follow the numbers."""

import jax
import pytest

from sad_jax import demo
from sad_jax import metrics as metrics_lib
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


@pytest.mark.slow
def test_demo_runs_every_stage_end_to_end_then_a_rerun_skips_them(tmp_path, monkeypatch,
                                                                     capsys):
  """The README's first command on a shrunken plan: expert data → prepare → teacher →
  store → three students → eval → report.md, PNGs and a table; the rerun checks each
  stage's outputs and skips it."""
  tiny = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
              num_key_value_heads=1)
  small = demo.Plan(train_episodes=40, vocab=600, seq_len=128, teacher={**tiny, "hidden_size": 64},
                    student=tiny, teacher_steps=2, student_steps=2, batch=8, seeds=(0,),
                    eval_episodes=1, max_steps=1, max_len=1024)
  monkeypatch.setattr(demo, "plan", lambda quick: small)
  table = demo.run(str(tmp_path), quick=True)
  work = tmp_path / "quick"
  for name in ("teacher", "sad", "token_kd", "sft"):
    assert f"| {name} |" in table
    assert (work / "eval" / f"{name if name == 'teacher' else name + '_s0'}.json").exists()
  report = (work / "report.md").read_text()
  assert table.splitlines()[0] in report and "loss_curves.png" in report
  for png in ("loss_curves.png", "success_rates.png"):
    assert (work / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  capsys.readouterr()
  demo.run(str(tmp_path), quick=True)
  out = capsys.readouterr().out
  assert "[1/7] data: 40 expert trajectories already" in out
  assert "prepare: " in out and "already done" in out
  assert out.count("already trained") == 4 and out.count("already evaluated") == 4
  assert "store: " in out and "already complete" in out
  # another plan for a trained run: it is trained again (its checkpoints would not resume)
  run = str(work / "students" / "sft_s0")
  config = demo._train_config(str(work / "prepared"), objective="sft", model=small.student,
                              steps=3, p=small, seed=0, lr=demo.STUDENT_LR)
  demo._train("sft_s0", run, config, 3)
  assert "the plan changed" in capsys.readouterr().out
  assert [r["step"] for r in metrics_lib.read_jsonl(run) if r["split"] == "validation"] == [3]
