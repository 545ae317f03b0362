"""Math problems from reasoning-gym (Apache-2.0), solved with a sandboxed Python tool and
scored by reasoning-gym's own scorer.

Actions:
  python[CODE]     runs CODE in the sandbox (sad_jax/agent/tools.py); its output (or
                   error) is the observation. CODE may span several lines.
  finish[ANSWER]   ends the episode; won = the dataset's score_answer(ANSWER) == 1.
Anything else is an invalid action (the observation says what is expected).

A task is an index into a generated dataset; folds use different dataset seeds (train
1, dev 2, test 3), so problems do not repeat across folds.
"""

from __future__ import annotations

import re
from typing import Any

from sad_jax.agent.envs.base import StepResult, check_split
from sad_jax.agent.tools import SandboxLimits, run_python
from sad_jax.common.errors import DataError

DATASETS = ("basic_arithmetic", "chain_sum", "gsm_symbolic")
FOLD_SEED = {"train": 1, "dev": 2, "test": 3}
FOLD_SIZE = 1000
LIMITS = SandboxLimits(wall_s=10, cpu_s=5)
_ACTION = re.compile(r"^\s*(python|finish)\[(.*)\]\s*$", re.S)


def parse_action(text: str) -> tuple[str, str] | None:
  """('python', code) | ('finish', answer) | None."""
  m = _ACTION.match(text)
  if not m:
    return None
  return m.group(1), m.group(2).strip()


class MathEnv:
  action_format = "react"

  def __init__(self, dataset: str, *, options: dict[str, str] | None = None,
               step_limit: int = 6, limits: SandboxLimits = LIMITS):
    if dataset not in DATASETS:
      raise DataError(f"unknown math dataset {dataset!r}; expected one of {DATASETS}",
                      field="env")
    self.dataset = dataset
    self.options = {k: int(v) if v.isdigit() else v for k, v in (options or {}).items()}
    self.spec = f"math:{dataset}" + ("?" + "&".join(f"{k}={v}" for k, v in sorted(
        (options or {}).items())) if options else "")
    self.step_limit, self.limits = step_limit, limits
    self._data: dict[str, Any] = {}
    self._entry: dict | None = None
    self._fold = "train"
    self._steps = 0

  def _dataset(self, fold: str):
    if fold not in self._data:
      import reasoning_gym

      self._data[fold] = reasoning_gym.create_dataset(self.dataset, size=FOLD_SIZE,
                                                      seed=FOLD_SEED[fold], **self.options)
    return self._data[fold]

  def tasks(self, split: str) -> list[int]:
    base = list(FOLD_SEED).index(check_split(split)) * FOLD_SIZE
    return list(range(base, base + FOLD_SIZE))

  def reset(self, *, task: int) -> tuple[str, dict[str, Any]]:
    fold = list(FOLD_SEED)[int(task) // FOLD_SIZE]
    self._fold = fold
    self._entry = self._dataset(fold)[int(task) % FOLD_SIZE]
    self._steps = 0
    question = self._entry["question"].strip()
    return question, {"goal": question, "task": int(task)}

  def step(self, action: str) -> StepResult:
    self._steps += 1
    parsed = parse_action(action)
    out_of_steps = self._steps >= self.step_limit
    if parsed is None:
      return StepResult("Invalid action. Use python[code] to run Python, or finish[answer] "
                        "to answer.", 0.0, out_of_steps, False, {"invalid": True})
    kind, arg = parsed
    if kind == "python":
      result = run_python(arg, limits=self.limits)
      return StepResult(result.observation(), 0.0, out_of_steps, False,
                        {"tool_error": result.error})
    score = float(self._dataset(self._fold).score_answer(arg, self._entry))
    won = score >= 1.0
    return StepResult("Correct." if won else "Incorrect.", score, True, won, {"score": score})

  def valid_actions(self) -> list[str] | None:
    return None  # open-ended

  def oracle_actions(self) -> list[str] | None:
    """A Python call that computes the answer, then finish[answer]."""
    e = self._entry
    if e is None:
      return None
    expr = e["metadata"].get("expression")
    if expr:
      return [f"python[print({expr})]", f"finish[{e['answer']}]"]
    return [f"finish[{e['answer']}]"]

  def solution_steps(self) -> list[str]:
    """The dataset's worked solution, one line per step (gsm_symbolic), else []."""
    e = self._entry or {}
    cot = e.get("metadata", {}).get("answer_cot") or ""
    return [ln.strip() for ln in cot.splitlines() if ln.strip() and not ln.startswith("####")]

  def close(self) -> None:
    pass
