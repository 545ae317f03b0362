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

from sad_jax.agent.envs.base import Env, act, start_episode
from sad_jax.agent.envs.registry import make_env
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
                   varied: bool = True, noise: float = 0.0,
                   vary: list[str] | None = None) -> Trajectory:
  """One episode that follows the oracle, written as a trajectory. `varied`: phrasings
  drawn at random per thought (else always the first). `noise`, `vary`: see
  `_search_episode` (TWX coin only)."""
  rng = random.Random(f"{env.spec}:{task}:{seed}") if varied else _FirstPhrasing()
  segments, obs, goal = start_episode(env, task=task)
  if env.spec.startswith("math:"):
    return _math_episode(env, task, segments, rng)
  if env.spec.split("?")[0] == "twx:coin":
    rng = random.Random(f"{env.spec}:{task}:{seed}:noise")
    if vary is not None and len(segments) > 1:
      segments[1] = Segment("observation", vary_room(obs, rng, vary))
    return _search_episode(env, task, segments, obs, max_steps, noise, rng, vary)
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


_ROOM = re.compile(r"You are in the ([^.]+)\.")
_EXIT = re.compile(r"To the (North|South|East|West) you see the ([^.]+)\.")
_DIRECTIONS = ("north", "south", "east", "west")


def search_action(obs: str, seen: dict[str, dict[str, str]]) -> tuple[str, str]:
  """One step of a search for the coin, from what the agent has read: take it if it is
  here; else move to the first listed room not seen yet; else walk toward the nearest room
  that the seen rooms list but nobody entered. `obs`: the last room description; `seen`:
  room → {direction: neighbour} for every room entered. Returns (thought, action).

  The thought first copies the exits in the observation's order ("Exits: south pantry,
  west corridor."), then decides from those words: a small model copies a list in order
  far more reliably than it picks one direction out of a description 100 tokens back."""
  if re.search(r"\bcoin\b", obs.split("To the")[0]):
    return "The coin is here. Take it.", "take coin"
  room = m.group(1) if (m := _ROOM.search(obs)) else ""
  exits = _EXIT.findall(obs)
  listed = "Exits: " + ", ".join(f"{d.lower()} {other}" for d, other in exits) + ". "
  for direction, other in exits:
    if other not in seen:
      d = direction.lower()
      return f"{listed}No coin here; the {other} is not seen yet: move {d}.", f"move {d}"
  # breadth-first over the known map to the nearest room with an unseen neighbour
  first: dict[str, str] = {room: ""}
  queue = [room]
  while queue:
    here = queue.pop(0)
    for d, other in seen.get(here, {}).items():
      if other not in seen:
        d0 = (first[here] or d).lower()
        return (f"{listed}No coin here, and all of these are seen; the {other} is not: "
                f"move {d0}."), f"move {d0}"
      if other not in first:
        first[other] = first[here] or d
        queue.append(other)
  return f"{listed}No coin here and no room left to search. Look around.", "look around"


def vary_room(obs: str, rng: random.Random, pool: list[str]) -> str:
  """The same room, described differently: its furniture sentences shuffled, some dropped,
  and some borrowed from other rooms (`pool`, grown as rooms are seen); the room's name,
  anything with the coin, and the exits are kept. Decisions do not change, only the text
  around them: the train fold of TWX coin shows one kitchen text and its test fold
  another, and a small model trained on one text learns its positions, not its content."""
  head, sep, exits = obs.partition("\n")
  sentences = [x for x in re.split(r"(?<=\.)\s+", head.strip()) if x]
  if not sep or not sentences or not _ROOM.match(sentences[0]):
    return obs
  keep = [x for x in sentences[1:] if "coin" in x]
  furniture = [x for x in sentences[1:] if "coin" not in x]
  for x in furniture:
    if x not in pool:
      pool.append(x)
  body = [x for x in furniture if rng.random() > 0.3] + keep
  body += rng.sample([x for x in pool if x not in furniture],
                     k=min(rng.randint(0, 2), len(pool) - len(furniture)))
  rng.shuffle(body)
  return " ".join([sentences[0], *body]) + " " + sep + exits


def _search_episode(env, task, segments, obs, max_steps, noise: float,
                    rng: random.Random, vary: list[str] | None = None) -> Trajectory:
  """The coin's room is hidden from the agent, and the gold path goes straight to it: a
  student imitating that path learns to guess. This teacher searches instead
  (`search_action`: the first unseen listed room, else a breadth-first walk over the rooms
  seen so far, from the observations alone), so each action follows from what the agent
  can read.

  `noise`: the chance, per move, of a random move instead (DART-style: Laskey et al., 2017),
  followed by the search's recovery from wherever it led, a room or "Unknown action". A
  model trained on clean paths alone has never read a failed action and derails after its
  first mistake; at a small rate the expert's choice stays the most likely one in every
  state, so greedy decoding does not learn the mistakes.

  `vary`: a pool of furniture sentences; when given, the recorded room descriptions are
  varied (`vary_room`), the decisions still made from the real ones."""
  seen: dict[str, dict[str, str]] = {}
  room_obs = obs
  won, steps, failed = False, 0, False
  while steps < max_steps:
    if (m := _ROOM.search(obs)):
      room_obs = obs
      seen[m.group(1)] = {d: other for d, other in _EXIT.findall(obs)}
    text, action = search_action(room_obs, seen)
    if failed:
      text = "That did not work. " + text
    if action.startswith("move ") and noise and rng.random() < noise:
      action = f"move {rng.choice([d for d in _DIRECTIONS if d != action.split()[1]])}"
      text = f"I'll try {action}."
    segments.append(Segment("reason", text))
    r = act(env, segments, action)
    steps += 1
    obs = r.observation
    if vary is not None:
      segments[-1] = Segment("observation", vary_room(obs, rng, vary))
    failed = _ROOM.search(obs) is None and not r.done
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
             varied: bool = True, noise: float = 0.0, vary_rooms: bool = False,
             **env_kwargs) -> Iterator[Trajectory]:
  """Oracle trajectories for the first `episodes` tasks of a fold (from `start`).
  `vary_rooms`: room descriptions varied in the record (`vary_room`; TWX coin)."""
  env = make_env(spec, **env_kwargs)
  pool: list[str] | None = [] if vary_rooms else None
  try:
    for task in env.tasks(split)[start: start + episodes]:
      yield oracle_episode(env, task, seed=seed, varied=varied, noise=noise, vary=pool)
  finally:
    env.close()
