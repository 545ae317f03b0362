"""TextWorld (Microsoft, MIT): games generated with `tw-make` (compiled by the Inform 7
tools that ship in the wheel) and played through `textworld.start`, with the
`policy_commands` oracle (a winning command sequence from the current state).

Challenges: `coin` (tw-coin_collector), `treasure` (tw-treasure_hunter), `cooking`
(tw-cooking). A task is a seed; folds are disjoint seed ranges (train 0–9,999, dev
10,000–19,999, test 20,000–29,999; cooking also uses its own train/valid/test noun split).
Generated games are cached by (challenge, options, seed) under `game_dir` (default
$SAD_JAX_TEXTWORLD_GAMES, else ~/.cache/sad_jax/textworld).
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

from sad_jax.agent.envs.base import StepResult, check_split
from sad_jax.common.errors import DataError

CHALLENGES = {"coin": "tw-coin_collector", "treasure": "tw-treasure_hunter",
              "cooking": "tw-cooking"}
DEFAULT_OPTIONS = {"coin": {"level": "5"}, "treasure": {"level": "1"},
                   "cooking": {"recipe": "1", "take": "1", "go": "1"}}
FOLD_BASE = {"train": 0, "dev": 10_000, "test": 20_000}
FOLD_SIZE = 10_000


class TextWorldEnv:
  action_format = "react"

  def __init__(self, challenge: str, *, options: dict[str, str] | None = None,
               game_dir: str | None = None, step_limit: int = 50):
    if challenge not in CHALLENGES:
      raise DataError(f"unknown TextWorld challenge {challenge!r}; expected one of "
                      f"{', '.join(CHALLENGES)}", field="env")
    self.challenge = challenge
    self.options = {**DEFAULT_OPTIONS[challenge], **(options or {})}
    self.spec = f"textworld:{challenge}" + ("?" + "&".join(
        f"{k}={v}" for k, v in sorted((options or {}).items())) if options else "")
    self.game_dir = game_dir or os.environ.get("SAD_JAX_TEXTWORLD_GAMES") or os.path.join(
        os.path.expanduser("~"), ".cache", "sad_jax", "textworld")
    self.step_limit = step_limit
    self._env = None
    self._state = None
    self._steps = 0

  def tasks(self, split: str) -> list[int]:
    base = FOLD_BASE[check_split(split)]
    return list(range(base, base + FOLD_SIZE))

  def game_path(self, task: int) -> str:
    """Generates the game for this seed on first use (tw-make, a few seconds)."""
    opts = "_".join(f"{k}{v}" for k, v in sorted(self.options.items()))
    path = os.path.join(self.game_dir, f"{self.challenge}_{opts}_{int(task)}.z8")
    if os.path.exists(path):
      return path
    os.makedirs(self.game_dir, exist_ok=True)
    fold = next(f for f, b in FOLD_BASE.items() if b <= int(task) < b + FOLD_SIZE)
    cmd = [_tw_make(), CHALLENGES[self.challenge]]
    for k, v in self.options.items():
      cmd += [f"--{k}"] if v == "" else [f"--{k}", str(v)]
    if self.challenge == "cooking":
      cmd += ["--split", {"train": "train", "dev": "valid", "test": "test"}[fold]]
    tmp = path[:-3] + ".tmp.z8"
    cmd += ["--seed", str(int(task)), "--output", tmp, "-f", "--silent"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0 or not os.path.exists(tmp):
      raise DataError(f"tw-make failed: {(proc.stderr or proc.stdout).strip()[-500:]}",
                      path=path, field="tw-make")
    for ext in (".json", ".ni"):  # textworld keeps the game's metadata next to it
      if os.path.exists(tmp[:-3] + ext):
        os.replace(tmp[:-3] + ext, path[:-3] + ext)
    os.replace(tmp, path)
    return path

  def reset(self, *, task: int) -> tuple[str, dict[str, Any]]:
    import textworld

    self.close()
    infos = textworld.EnvInfos(policy_commands=True, admissible_commands=True, objective=True,
                               won=True, lost=True, inventory=True, score=True,
                               max_score=True)
    self._env = textworld.start(self.game_path(task), request_infos=infos)
    self._state = self._env.reset()
    self._steps = 0
    # the opening feedback is banner art + objective + the room: keep the room
    text = self._state.feedback
    start = text.find("-= ")
    return _clean(text[start:] if start >= 0 else text), {
        "goal": self._state.objective.strip(), "task": int(task)}

  def step(self, action: str) -> StepResult:
    self._state, reward, done = self._env.step(action.strip())
    self._steps += 1
    won = bool(self._state.won)
    done = bool(done) or self._steps >= self.step_limit
    return StepResult(observation=_clean(self._state.feedback), reward=float(reward),
                      done=done, won=won,
                      info={"score": float(self._state.score) / max(1, self._state.max_score),
                            "failed": bool(self._state.lost)})

  def valid_actions(self) -> list[str] | None:
    return sorted(self._state.admissible_commands or []) if self._state else None

  def oracle_actions(self) -> list[str] | None:
    return list(self._state.policy_commands) if self._state else None

  def inventory(self) -> str:
    return _clean(self._state.inventory or "") if self._state else ""

  def close(self) -> None:
    if self._env is not None:
      self._env.close()
      self._env = None


def _tw_make() -> str:
  """The tw-make script of this Python environment (next to its interpreter), else PATH."""
  import shutil

  local = os.path.join(os.path.dirname(sys.executable), "tw-make")
  found = local if os.path.exists(local) else shutil.which("tw-make")
  if not found:
    raise DataError("tw-make not found: install the `textworld` package", field="env")
  return found


def _clean(text: str) -> str:
  """Feedback without the banner art, the status line and runs of blank lines."""
  lines = [ln.rstrip() for ln in text.splitlines()]
  out, blank = [], False
  for ln in lines:
    if ln.strip().startswith(">"):  # the prompt and the status line (room, score)
      continue
    if not ln.strip():
      blank = bool(out)
      continue
    if blank:
      out.append("")
      blank = False
    out.append(ln.strip())
  return "\n".join(out).strip()
