"""The study's on-policy cells: `sad-jax opd` rounds from another cell's final model (an
arm's `start`) or from initialisation, with the run's teacher, its train-fold episodes
(λ rows, depth prefixes), the students' tokenizer and the study's agent limits. A cell's
budget is its number of rounds; what the rounds spent (train steps, generated and
teacher-scored tokens, seconds) is in its record."""

from __future__ import annotations

import json
import os
import shutil

import ml_collections

from sad_jax.experiment.study.cells import Inputs, _read, _say, _write, model_stamp


def opd_config(work: str, c, cell, shared: Inputs) -> ml_collections.ConfigDict:
  from sad_jax.common import configlib
  from sad_jax.configs import train_opd

  o = train_opd.get_config()
  o.student = os.path.join(work, "cells", cell.start, "final") if cell.start else ""
  o.student_hf_config = ml_collections.ConfigDict(
      {"model_type": "llama", "max_position_embeddings": 4096, **dict(c.student.model)})
  o.teacher, o.teacher_data = shared.teacher, shared.teacher_jsonl
  o.tokenizer, o.env, o.seed, o.rounds = shared.tokenizer, c.env, cell.seed, cell.steps
  o.rollout.update(max_new_tokens=c.eval.max_new_tokens, max_steps=c.eval.max_steps,
                   max_len=c.data.seq_len)
  o.eval.update(episodes=c.eval.dev_games, max_steps=c.eval.max_steps)
  # the study's settings for every opd arm (chosen on dev), then the arm's own
  configlib.apply_overrides(o, [f"--config.{x}" for x in (*c.get("opd_overrides", ()),
                                                            *cell.overrides)])
  return o


def _done(run: str, rounds: int) -> bool:
  path = os.path.join(run, "rounds.jsonl")
  if not os.path.exists(os.path.join(run, "final", "config.json")) or not os.path.exists(path):
    return False
  with open(path, encoding="utf-8") as f:
    return any(json.loads(x).get("round") == rounds - 1 for x in f if x.strip())


def train(work: str, c, cell, shared: Inputs) -> bool:
  """Runs the cell's rounds unless the same config already finished on the same start
  model and teacher (a changed input trains again); True if it trained."""
  from sad_jax.agent import onpolicy

  run = os.path.join(work, "cells", cell.name)
  config = opd_config(work, c, cell, shared)
  inputs = {"config": json.loads(config.to_json()), "teacher": model_stamp(config.teacher),
            "start": model_stamp(config.student) if config.student else None}
  path = os.path.join(run, "study_inputs.json")
  before = _read(path)
  if before is not None and before != inputs:
    _say(f"  {cell.name}: its inputs changed since it was trained; training again")
    shutil.rmtree(run)
  elif before is not None and _done(run, cell.steps):
    _say(f"  {cell.name}: already trained ({run}, {cell.steps} rounds)")
    return False
  os.makedirs(run, exist_ok=True)
  _write(path, inputs)
  onpolicy.train_onpolicy(config, run)
  return True


def summary(run: str) -> dict:
  """The rounds' log (per-round reverse KL per turn, invalid-action rate, dev success) and
  the budgets the cell spent."""
  with open(os.path.join(run, "rounds.jsonl"), encoding="utf-8") as f:
    rounds = [json.loads(x) for x in f if x.strip()]
  return {"rounds": rounds, "spent": rounds[-1].get("spent", {}) if rounds else {}}
