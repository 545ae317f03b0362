"""The registry of environment adapters: a spec string to an environment.

Specs: `twx:GAME` (TextWorld-Express: cookingworld, twc, coin, mapreader, arithmetic,
sorting, simonsays, peckingorder), `textworld:CHALLENGE` (coin, treasure, cooking: games
generated with tw-make), `math:DATASET` (reasoning-gym, with a sandboxed Python tool).
Options follow after a '?' as key=value pairs: `twx:coin?numLocations=3`. Adapters are
imported when asked for: each pulls in its own engine.
"""

from __future__ import annotations

from sad_jax.agent.envs.base import Env, parse_spec
from sad_jax.common.errors import DataError


def make_env(spec: str, **kwargs) -> Env:
  kind, name, options = parse_spec(spec)
  if kind == "twx":
    from sad_jax.agent.envs.twx import TWXEnv

    return TWXEnv(name, options=options, **kwargs)
  if kind == "textworld":
    from sad_jax.agent.envs.textworld_env import TextWorldEnv

    return TextWorldEnv(name, options=options, **kwargs)
  if kind == "math":
    from sad_jax.agent.envs.math_env import MathEnv

    return MathEnv(name, options=options, **kwargs)
  raise DataError(f"unknown environment kind {kind!r}; expected twx, textworld or math",
                  field="env")
