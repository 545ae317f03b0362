"""Teacher trajectories from an environment's oracle (gold path), with reasoning text.

Each thought states the facts that decide the next action: the goal, what is still
missing, where it is (here or elsewhere), and why this action. It is built from the
oracle's remaining plan and the current observation and inventory, and its phrasing
varies (several templates per case, drawn with a seeded RNG). Observations are the
environment's own. The trajectories are in the project's schema, with a success flag,
and go straight into `sad-jax prepare`.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator

from sad_jax.agent.env import Env, act, make_env
from sad_jax.data.schema import Segment, Trajectory

_DIRECTIONS = {"north", "south", "east", "west", "up", "down"}


def _obj(action: str, verbs: int = 1) -> str:
  words = action.split()
  return " ".join(words[verbs:]).split(" in ")[0].split(" with ")[0].split(" from ")[0]


def _missing(plan: list[str], inventory: str) -> list[str]:
  """Objects of the plan's remaining `take` actions that are not carried yet."""
  out = []
  for a in plan:
    if a.startswith(("take ", "pick up ")):
      thing = _obj(a, 2 if a.startswith("pick up") else 1)
      if thing and thing not in inventory and thing not in out:
        out.append(thing)
  return out


def _list(items: list[str]) -> str:
  if not items:
    return "nothing else"
  return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _short_goal(goal: str) -> str:
  sents = [s.strip() for s in re.split(r"(?<=[.!?])\s+", goal) if s.strip()]
  for s in sents:
    low = s.lower()
    if any(w in low for w in ("task", "find", "take", "cook", "put", "coin", "meal", "goal")):
      return s.rstrip(".!")
  return (sents[0] if sents else goal).rstrip(".!")


def thought(*, action: str, plan: list[str], goal: str, observation: str, inventory: str,
            rng: random.Random) -> str:
  """The reasoning before `action` (plan = the oracle's actions from here on)."""
  g = _short_goal(goal)
  missing = _missing(plan, inventory)
  obs = observation.lower()
  verb = action.split()[0] if action.split() else action
  obj = _obj(action)
  here = bool(obj) and obj.lower() in obs
  pick = rng.choice
  simon = re.match(r"simon says, '(.+)'", obs.strip())
  if simon:  # Simon Says: the instruction is the whole plan; say it, then do exactly that
    said = simon.group(1)
    return pick([f"Simon says to {said}, so I {action}.",
                 f"The instruction is '{said}' and Simon said it. I will {action}."])
  if verb in ("take", "pick"):
    rest = [m for m in missing if m != obj]
    return pick([
        f"The goal: {g}. I still need {_list(missing)}. The {obj} is right here, so I'll take it.",
        f"I need the {obj} for this task and I can see it here. Taking it"
        + (f"; after that, {_list(rest)} remain." if rest else "; that is the last item."),
        f"The {obj} is in reach, and the plan needs it. Take it now"
        + (f", then find {_list(rest)}." if rest else "."),
    ])
  if verb in ("move", "go") or verb in _DIRECTIONS:
    direction = action.split()[-1]
    target = "the " + _list(missing) if missing else "what the task needs"
    return pick([
        f"I don't see {target} in this room. I'll go {direction} to keep searching.",
        f"Nothing here completes the goal ({g}). Heading {direction} leads on to where "
        f"{target} should be.",
        f"I have not found {target} yet, and going {direction} brings me closer. Go "
        f"{direction}.",
    ])
  if verb == "open":
    inside = f" ({_list(missing)})" if missing else ""
    return pick([
        f"The {obj} is closed, and what I am looking for{inside} may be inside. Open it.",
        f"I can't see inside the {obj} yet; opening it shows what it holds{inside}.",
    ])
  if verb == "read":
    return pick([
        f"The {obj} tells me the recipe, which decides what I still need. Read it first.",
        f"Before I gather anything I need the recipe: read the {obj}.",
    ])
  if verb in ("cook", "slice", "chop", "dice", "roast", "fry", "grill"):
    tool = action.split(" in ")[-1] if " in " in action else action.split(" with ")[-1]
    return pick([
        f"The recipe needs the {obj} prepared this way, and the {tool} does it: {action}.",
        f"I have the {obj}; the recipe says to {verb} it, so I'll use the {tool}.",
    ])
  if action.startswith("prepare meal"):
    return pick(["Everything the recipe asks for is ready, so I can prepare the meal now.",
                 "All ingredients are prepared as the recipe says. Time to prepare the meal."])
  if verb == "eat":
    return pick(["The meal is in my inventory; eating it completes the task.",
                 "The meal is ready. Eating it is the last step of the goal."])
  if verb in ("put", "insert", "drop", "place"):
    dest = re.split(r" (?:in|on|into) ", action)[-1]
    return pick([f"The {obj} belongs {('in' if ' in ' in action else 'on')} the {dest}; "
                 f"putting it there moves me toward the goal ({g}).",
                 f"I am carrying the {obj} and the {dest} is where it goes. {action[0].upper()}"
                 f"{action[1:]}."])
  if verb == "close":
    return pick([f"I have what I needed from the {obj}; close it.",
                 f"Done with the {obj}. Closing it keeps things tidy."])
  where = " It is here." if here else ""
  return pick([f"To make progress on the goal ({g}), the next step is: {action}.{where}",
               f"The goal is: {g}. Next I will {action}.{where}"])


class _FirstPhrasing:
  """Stands in for the RNG where one phrasing per case is wanted: a small model then spends
  its first reasoning token on the decision (coin here or not) rather than on a template."""

  def choice(self, options):
    return options[0]


def oracle_episode(env: Env, task: int, *, seed: int = 0, max_steps: int = 60,
                   varied: bool = True) -> Trajectory:
  """One episode that follows the oracle, written as a trajectory. `varied`: phrasings
  drawn at random per thought (else always the first)."""
  rng = random.Random(f"{env.spec}:{task}:{seed}") if varied else _FirstPhrasing()
  obs, info = env.reset(task=task)
  goal = info["goal"]
  segments = [Segment("task", goal)]
  if obs and obs != goal:
    segments.append(Segment("observation", obs))
  if env.spec.startswith("math:"):
    return _math_episode(env, task, segments, rng)
  won, steps = False, 0
  while steps < max_steps:
    plan = env.oracle_actions() or []
    if not plan:
      break
    action = plan[0]
    inventory = env.inventory() if hasattr(env, "inventory") else ""
    segments.append(Segment("reason", thought(action=action, plan=plan, goal=goal,
                                              observation=obs, inventory=inventory, rng=rng)))
    r = act(env, segments, action)
    steps += 1
    obs = r.observation
    if r.done:
      won = r.won
      break
  return _trajectory(env, task, segments, won, steps)


def _math_episode(env, task, segments, rng) -> Trajectory:
  plan = env.oracle_actions() or []
  steps, won = 0, False
  cot = env.solution_steps() if hasattr(env, "solution_steps") else []
  for action in plan:
    if action.startswith("python["):
      expr = action[len("python[print("):-2]
      text = rng.choice([f"I need the value of {expr}. Python computes it exactly.",
                         f"To avoid an arithmetic slip I'll evaluate {expr} in Python.",
                         f"Let me compute {expr} with the Python tool."])
    else:
      answer = action[len("finish["):-1]
      last = segments[-1].text.strip() if segments[-1].kind == "observation" else ""
      if cot:
        text = " ".join(cot) + f" So the answer is {answer}."
      elif last:
        text = rng.choice([f"Python printed {last}, so the answer is {answer}.",
                           f"The result is {last}. That is the final answer."])
      else:
        text = f"The answer is {answer}."
    segments.append(Segment("reason", text))
    r = act(env, segments, action)
    steps += 1
    if r.done:
      won = r.won
      break
  return _trajectory(env, task, segments, won, steps)


def _trajectory(env, task, segments, won, steps) -> Trajectory:
  traj = Trajectory(id=f"{env.spec}#{task}", segments=segments, source=f"oracle:{env.spec}",
                    success=won, meta={"env": env.spec, "task": int(task), "steps": steps,
                                       "teacher": "oracle"})
  traj.validate()
  return traj


def generate(spec: str, *, split: str, episodes: int, seed: int = 0, start: int = 0,
             varied: bool = True, **env_kwargs) -> Iterator[Trajectory]:
  """Oracle trajectories for the first `episodes` tasks of a fold (from `start`)."""
  env = make_env(spec, **env_kwargs)
  try:
    for task in env.tasks(split)[start: start + episodes]:
      yield oracle_episode(env, task, seed=seed, varied=varied)
  finally:
    env.close()
