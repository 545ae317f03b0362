"""TextWorld-Express (Jansen & Côté, Apache-2.0): text games simulated in Java at
millisecond steps, with gold paths and train/dev/test seed folds.

The package ships its jar and starts a JVM through py4j; it needs a Java runtime
(`java` on PATH). One JVM serves one environment; `close()` stops it.
"""

from __future__ import annotations

import shutil
from typing import Any

from sad_jax.agent.envs.base import StepResult, check_split
from sad_jax.common.errors import DataError

GAMES = ("cookingworld", "twc", "coin", "mapreader", "arithmetic", "sorting", "simonsays",
         "peckingorder")
# Small default worlds: the demo's students are tiny and episodes must stay short.
DEFAULT_PARAMS = {
    "cookingworld": "numLocations=1,numIngredients=2,numDistractorItems=2,includeDoors=0,"
                    "limitInventorySize=0",
    "coin": "numLocations=3,numDistractorItems=0,includeDoors=0,limitInventorySize=0",
    "twc": "numLocations=1,numItemsToPutAway=1,includeDoors=0,limitInventorySize=0",
    "mapreader": "numLocations=3,maxDistanceApart=2,includeDoors=0,limitInventorySize=0",
}
_FOLD = {"train": "train", "dev": "dev", "test": "test"}
# (game, params, split) → seeds. A fold's seeds depend on nothing else, and the package
# copies a Java list one py4j call per element: thousands of round trips per fold and env.
_SEEDS: dict[tuple[str, str, str], list[int]] = {}


class TWXEnv:
  action_format = "react"

  def __init__(self, game: str, *, options: dict[str, str] | None = None, step_limit: int = 50):
    if game not in GAMES:
      raise DataError(f"unknown TextWorld-Express game {game!r}; games: {', '.join(GAMES)}",
                      field="env")
    if shutil.which("java") is None:
      raise DataError("TextWorld-Express needs a Java runtime: install one (e.g. apt-get "
                      "install default-jre-headless) so that `java` is on PATH", field="env")
    from textworld_express import TextWorldExpressEnv

    self.game = game
    options = dict(options or {})
    self.params = ",".join(f"{k}={v}" for k, v in options.items()) or DEFAULT_PARAMS.get(game, "")
    self.spec = f"twx:{game}" + (f"?{'&'.join(f'{k}={v}' for k, v in options.items())}"
                                 if options else "")
    self._env = TextWorldExpressEnv(envStepLimit=step_limit)
    self._env.load(game, self.params)
    self._info: dict[str, Any] = {}
    self._gold: list[str] | None = None
    self._gold_pos = 0
    self._folds: dict[int, str] = {}

  def tasks(self, split: str) -> list[int]:
    split = check_split(split)
    key = (self.game, self.params, split)
    if key not in _SEEDS:
      server = self._env.server
      seeds = {"train": server.getSeedsTrain, "dev": server.getSeedsDev,
               "test": server.getSeedsTest}[split]()
      # one call: the Java list's text form, parsed here
      _SEEDS[key] = [int(x) for x in str(seeds.toString()).strip("[]").split(",") if x.strip()]
    return list(_SEEDS[key])

  def reset(self, *, task: int, fold: str | None = None) -> tuple[str, dict[str, Any]]:
    fold = fold or self._fold_of(task)
    obs, info = self._env.reset(seed=int(task), gameFold=_FOLD[fold], gameName=self.game,
                                gameParams=self.params, generateGoldPath=True)
    self._info = info
    gold = list(self._env.getGoldActionSequence())
    # the gold path opens with "look around", which the first observation already shows
    self._gold = _shortcut(gold[1:] if gold and gold[0] == "look around" else gold)
    self._gold_pos = 0  # the gold path is fixed at reset: track progress along it
    return obs.strip(), {"goal": info["taskDescription"].strip(), "task": int(task),
                         "fold": fold}

  def _fold_of(self, task: int) -> str:
    if not self._folds:
      self._folds = {t: fold for fold in ("train", "dev", "test") for t in self.tasks(fold)}
    if int(task) in self._folds:
      return self._folds[int(task)]
    raise DataError(f"seed {task} is in no fold of {self.game}", field="task")

  def step(self, action: str) -> StepResult:
    action = action.strip()
    if self._gold is not None:
      on_path = self._gold_pos < len(self._gold) and action == self._gold[self._gold_pos]
      self._gold_pos = self._gold_pos + 1 if on_path else -1
      if self._gold_pos < 0:
        self._gold = None  # off the gold path: no oracle from here
    obs, reward, done, info = self._env.step(action)
    self._info = info
    return StepResult(observation=obs.strip(), reward=float(reward), done=bool(done),
                      won=bool(info.get("tasksuccess")),
                      info={"score": float(info["score"]), "failed": bool(info["taskfailure"])})

  def valid_actions(self) -> list[str] | None:
    return sorted(self._info.get("validActions", [])) or None

  def oracle_actions(self) -> list[str] | None:
    """The rest of the gold path; None once an action left it."""
    return list(self._gold[self._gold_pos:]) if self._gold is not None else None

  def inventory(self) -> str:
    return str(self._info.get("inventory", "")).strip()

  def close(self) -> None:
    try:
      self._env.close()
    except Exception:  # the JVM may already be gone
      pass
    # the package's __del__ closes again and prints a BrokenPipeError: once is enough
    self._env.close = lambda: None


_OPPOSITE = {"north": "south", "south": "north", "east": "west", "west": "east"}


def _shortcut(path: list[str]) -> list[str]:
  """Drops back-and-forth moves (`move west`, `move east`) from a gold path: the games
  here have no doors, so such a pair returns to the same state. The oracle episode
  checks that the shortened path still wins."""
  out: list[str] = []
  for a in path:
    if out and a.startswith("move ") and out[-1].startswith("move ") and \
        _OPPOSITE.get(out[-1].split()[-1]) == a.split()[-1]:
      out.pop()
      continue
    out.append(a)
  return out
