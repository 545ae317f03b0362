"""The environment protocol: what every adapter (twx.py, textworld_env.py, math_env.py)
implements and what the agent loops use; the adapters are built by `registry.make_env`.

An environment is reset to one task of a fold and then stepped with action text:

  env = make_env("twx:cookingworld")
  obs, info = env.reset(task=env.tasks("test")[0])   # info["goal"]: what to achieve
  step = env.step("take knife")                        # observation, reward, done, won, info
  env.valid_actions()   # list or None;  env.oracle_actions()  # gold path or None
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

from sad_jax.common.errors import DataError

SPLITS = ("train", "dev", "test")


@dataclasses.dataclass
class StepResult:
  observation: str
  reward: float
  done: bool
  won: bool
  info: dict[str, Any] = dataclasses.field(default_factory=dict)


class Env(Protocol):
  spec: str
  action_format: str      # "react" (one command per line) or "code"

  def tasks(self, split: str) -> list[int]: ...
  def reset(self, *, task: int) -> tuple[str, dict[str, Any]]: ...
  def step(self, action: str) -> StepResult: ...
  def valid_actions(self) -> list[str] | None: ...
  def oracle_actions(self) -> list[str] | None: ...
  def close(self) -> None: ...


def parse_spec(spec: str) -> tuple[str, str, dict[str, str]]:
  """'kind:name?k=v&k2=v2' → (kind, name, options)."""
  head, _, query = spec.partition("?")
  kind, sep, name = head.partition(":")
  if not sep or not name:
    raise DataError(f"environment spec {spec!r} is not KIND:NAME (twx:cookingworld, "
                    "textworld:coin, math:basic_arithmetic)", field="env")
  options = {}
  for part in filter(None, query.split("&")):
    k, eq, v = part.partition("=")
    if not eq:
      raise DataError(f"environment option {part!r} is not key=value", field="env")
    options[k] = v
  return kind, name, options


def start_episode(env: Env, *, task: int) -> tuple[list, str, str]:
  """Resets `env` to `task`: (the episode's first segments, the first observation, the
  goal). Every teacher and the student agent begin an episode so: the goal as the task,
  then the first observation unless it only repeats the goal."""
  from sad_jax.data.schema import Segment

  obs, info = env.reset(task=task)
  segments = [Segment("task", info["goal"])]
  if obs and obs != info["goal"]:
    segments.append(Segment("observation", obs))
  return segments, obs, info["goal"]


def act(env: Env, segments: list, action: str) -> StepResult:
  """Steps the environment and records the action and its observation in `segments`
  (trajectory segments), as every teacher and the student agent write them."""
  from sad_jax.data.schema import Segment

  segments.append(Segment("action", action))
  result = env.step(action)
  segments.append(Segment("observation", result.observation))
  return result


def check_split(split: str) -> str:
  if split not in SPLITS:
    raise DataError(f"split must be one of {SPLITS}, got {split!r}", field="split")
  return split
