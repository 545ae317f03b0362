"""The environment protocol and the registry of adapters.

An environment is reset to one task of a fold and then stepped with action text:

  env = make_env("twx:cookingworld")
  obs, info = env.reset(task=env.tasks("test")[0])   # info["goal"]: what to achieve
  step = env.step("take knife")                        # observation, reward, done, won, info
  env.valid_actions()   # list or None;  env.oracle_actions()  # gold path or None

Specs: `twx:GAME` (TextWorld-Express: cookingworld, twc, coin, mapreader, arithmetic,
sorting, simonsays, peckingorder), `textworld:CHALLENGE` (coin, treasure, cooking: games
generated with tw-make), `math:DATASET` (reasoning-gym, with a sandboxed Python tool).
Options follow after a '?' as key=value pairs: `twx:coin?numLocations=3`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

from sad_jax.errors import DataError

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


def make_env(spec: str, **kwargs) -> Env:
  kind, name, options = parse_spec(spec)
  if kind == "twx":
    from sad_jax.agent.twx import TWXEnv

    return TWXEnv(name, options=options, **kwargs)
  if kind == "textworld":
    from sad_jax.agent.textworld_env import TextWorldEnv

    return TextWorldEnv(name, options=options, **kwargs)
  if kind == "math":
    from sad_jax.agent.math_env import MathEnv

    return MathEnv(name, options=options, **kwargs)
  raise DataError(f"unknown environment kind {kind!r}; expected twx, textworld or math",
                  field="env")


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
