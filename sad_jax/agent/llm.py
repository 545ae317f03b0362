"""Teacher trajectories from an LLM behind an OpenAI-compatible endpoint (vLLM, a hosted
API), in the environments of `sad_jax.agent.envs`.

First-thought prefix (Kang et al. 2025): before the episode, the teacher answers the task
with free chain-of-thought; the first sentence of that answer seeds its first ReAct
thought, which the teacher then continues. Episodes the teacher fails are dropped unless
`keep_failed`. The client is plain HTTP (urllib): no SDK needed, retries with backoff on
429/5xx, and clear errors naming the endpoint.
"""

from __future__ import annotations

import json
import re
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

from sad_jax.agent import react
from sad_jax.agent.envs.base import Env, act, start_episode
from sad_jax.agent.envs.registry import make_env
from sad_jax.common.errors import DataError
from sad_jax.data import render
from sad_jax.data.schema import Segment, Trajectory

SYSTEM = ("You are an agent acting in an environment. At every turn reply with exactly two "
          "lines:\nThought: <your reasoning: the goal, what is still missing, where it is, "
          "why the next action>\nAction: <one action>\n{actions}")
ACTION_HELP = {
    "math": "Actions: python[code] runs Python and shows its output; finish[answer] submits "
            "the final answer.",
    "default": "Actions are text commands such as 'take knife', 'open fridge', 'move north'.",
}


class Client:
  def __init__(self, endpoint: str, *, model: str, api_key: str = "", timeout: float = 120,
               retries: int = 3):
    self.url = endpoint.rstrip("/") + "/chat/completions"
    self.model, self.api_key, self.timeout, self.retries = model, api_key, timeout, retries

  def chat(self, messages: list[dict], *, temperature: float = 0.0, max_tokens: int = 256,
           stop: list[str] | None = None) -> str:
    body = {"model": self.model, "messages": messages, "temperature": temperature,
            "max_tokens": max_tokens}
    if stop:
      body["stop"] = stop
    data = json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if self.api_key:
      headers["Authorization"] = f"Bearer {self.api_key}"
    delay = 1.0
    for attempt in range(self.retries + 1):
      req = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
      try:
        with urllib.request.urlopen(req, timeout=self.timeout) as resp:
          payload = json.loads(resp.read())
        return payload["choices"][0]["message"]["content"] or ""
      except urllib.error.HTTPError as e:
        if e.code in (429, 500, 502, 503, 504) and attempt < self.retries:
          time.sleep(delay)
          delay *= 2
          continue
        raise DataError(f"HTTP {e.code}: {e.read()[:300].decode(errors='replace')}",
                        path=self.url) from None
      except urllib.error.URLError as e:
        if attempt < self.retries:
          time.sleep(delay)
          delay *= 2
          continue
        raise DataError(f"cannot reach the endpoint: {e.reason}", path=self.url) from None
      except (KeyError, IndexError, ValueError) as e:
        raise DataError(f"not an OpenAI chat completion response: {e}", path=self.url,
                        field="choices") from None
    raise AssertionError("unreachable")


def first_sentence(text: str) -> str:
  text = re.sub(r"\s+", " ", text).strip()
  m = re.match(r"(.+?[.!?])(\s|$)", text)
  return (m.group(1) if m else text)[:300]


def episode(client: Client, env: Env, task: int, *, first_thought: bool = True,
            max_steps: int = 30, temperature: float = 0.0) -> Trajectory:
  segments, obs, goal = start_episode(env, task=task)
  kind = env.spec.split(":")[0]
  system = SYSTEM.format(actions=ACTION_HELP.get(kind, ACTION_HELP["default"]))
  prefix = ""
  if first_thought:
    cot = client.chat([{"role": "user", "content": f"{goal}\n\n{obs if obs != goal else ''}\n"
                        "Think step by step about how to solve this."}],
                      temperature=temperature, max_tokens=256)
    prefix = first_sentence(cot)
  won, steps = False, 0
  for step in range(max_steps):
    transcript = render.render_react(Trajectory(id="x", segments=segments)).text
    user = transcript + ("\nBegin your thought with: " + prefix if step == 0 and prefix else "")
    reply = client.chat([{"role": "system", "content": system},
                         {"role": "user", "content": user}], temperature=temperature,
                        max_tokens=256, stop=["\nObservation:", "Observation:"])
    thought, action = react.parse_turn(reply)
    if step == 0 and prefix and not thought.startswith(prefix):
      thought = f"{prefix} {thought}".strip()
    segments.append(Segment("reason", thought or "(none)"))
    if action is None:
      segments.append(Segment("action", reply.strip() or "(nothing)"))
      segments.append(Segment("observation", react.INVALID))
      steps += 1
      continue
    r = act(env, segments, action)
    steps += 1
    if r.done:
      won = r.won
      break
  traj = Trajectory(id=f"{env.spec}#{task}", segments=segments,
                    source=f"llm:{client.model}:{env.spec}", success=won,
                    meta={"env": env.spec, "task": int(task), "steps": steps,
                          "teacher": client.model, "first_thought": prefix})
  traj.validate()
  return traj


def generate(client: Client, spec: str, *, split: str, episodes: int, start: int = 0,
             first_thought: bool = True, keep_failed: bool = False, max_steps: int = 30,
             **env_kwargs) -> Iterator[Trajectory]:
  """Teacher episodes on the first `episodes` tasks of a fold; failed ones are dropped
  unless keep_failed."""
  env = make_env(spec, **env_kwargs)
  try:
    for task in env.tasks(split)[start: start + episodes]:
      traj = episode(client, env, task, first_thought=first_thought, max_steps=max_steps)
      if traj.success or keep_failed:
        yield traj
  finally:
    env.close()
