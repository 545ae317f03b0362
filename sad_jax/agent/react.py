"""The student as a ReAct agent: prompts in the training template, generation with the
project's KV-cache decoder, action parsing, and self-consistent action generation (SAG).

A turn: the trajectory so far is rendered exactly as `prepare` rendered the training data
(`render.render_react`, or the chat template the student was trained with, up to its
generation prompt), the model continues with `Thought: …\nAction: …\n`, and generation
stops at `Observation:` (or EOS, the chat template's end-of-turn token, the token budget).
Episodes run batched: every active episode's prompt goes into one `generate` call per turn.

SAG (Kang et al., "Distilling LLM Agent into Small Models with Retrieval and Code Tools"):
sample N candidate thought+action pairs, drop those that do not parse (and, for code
actions, those whose code fails in the sandbox), take the majority outcome — the
normalised action, or the code's output — and fall back to the first candidate.
"""

from __future__ import annotations

import collections
import dataclasses
import time

import jax.numpy as jnp
import numpy as np

from sad_jax.data import render, segment
from sad_jax.data.schema import Segment, Trajectory
from sad_jax.models import generate as gen

STOP_STRINGS = ("\nObservation:", "Observation:")
INVALID = ("Invalid action: reply with 'Thought: <reasoning>' on one line, then "
           "'Action: <command>'.")


@dataclasses.dataclass
class Turn:
  thought: str
  action: str | None       # None: the text did not parse
  raw: str
  tokens: int


def parse_turn(text: str) -> tuple[str, str | None]:
  """(thought, action) from generated text; action None when there is no `Action:`.
  A react action is its first line; a python[...] action may span lines."""
  text = text.split("Observation:")[0]
  idx = text.find("Action:")
  thought = (text if idx < 0 else text[:idx]).strip()
  if thought.startswith("Thought:"):
    thought = thought[len("Thought:"):].strip()
  if idx < 0:
    return thought, None
  action = text[idx + len("Action:"):].strip()
  if not action.startswith("python["):
    action = action.splitlines()[0].strip() if action else ""
  return thought, action or None


@dataclasses.dataclass
class Policy:
  """A model + tokenizer that produces turns for a batch of trajectories."""

  cfg: object
  params: object
  tokenizer: object
  max_new_tokens: int = 96
  max_prompt_tokens: int = 1536
  temperature: float = 0.0
  dtype: object = jnp.float32
  template: render.ChatTemplate | None = None  # None: the ReAct template
  generated_tokens: int = 0
  generate_seconds: float = 0.0

  def prompt(self, traj: Trajectory) -> list[int]:
    """Token ids of the rendered trajectory; the oldest steps are dropped (keeping the
    task and first observation) when it is longer than max_prompt_tokens."""
    segs = list(traj.segments)
    head = 2 if len(segs) > 1 and segs[1].kind == "observation" else 1
    while True:
      cut = dataclasses.replace(traj, segments=segs)
      if self.template is not None:
        ids = self._chat_prompt(cut)
      else:
        ids = list(self.tokenizer.encode(render.render_react(cut).text).ids)
        if self.tokenizer.bos_id is not None:
          ids = [self.tokenizer.bos_id, *ids]
      if len(ids) <= self.max_prompt_tokens or len(segs) <= head + 3:
        return ids[-self.max_prompt_tokens:]
      segs = segs[:head] + segs[head + 3:]  # drop the oldest reason/action/observation

  def _chat_prompt(self, traj: Trajectory) -> list[int]:
    """The chat rendering up to the assistant turn's content, tokenized as prepare did:
    a placeholder turn is rendered and the tokens from its content on are dropped (the
    content starts after the generation prompt; no token crosses that point)."""
    probe = dataclasses.replace(traj, segments=[*traj.segments, Segment("reason", "x")])
    rendered = self.template.render(probe)
    start = int(rendered.starts[np.flatnonzero(rendered.segment == len(traj.segments))[0]])
    enc = segment.encode_rendered(self.tokenizer, [rendered], parse_special=True)[0]
    return [int(i) for i in enc.ids[enc.starts < start]]

  def stop_ids(self) -> list[int]:
    return render.stop_ids(self.tokenizer, self.template)

  def turns(self, trajs: list[Trajectory], *, samples: int = 1, temperature: float | None = None,
            seed: int = 0, min_batch: int = 1) -> list[list[Turn]]:
    """`samples` candidate turns per trajectory (`min_batch`: see gen.generate)."""
    prompts = [self.prompt(t) for t in trajs for _ in range(samples)]
    tau = self.temperature if temperature is None else temperature
    stop = self.stop_ids()
    t0 = time.perf_counter()
    out = gen.generate(self.cfg, self.params, prompts, max_new_tokens=self.max_new_tokens,
                       temperature=tau, top_k=0, top_p=1.0, stop_token_ids=stop,
                       stop_strings=STOP_STRINGS, decode=self.tokenizer.decode, seed=seed,
                       min_batch=min_batch, dtype=self.dtype)
    self.generate_seconds += time.perf_counter() - t0
    result: list[list[Turn]] = [[] for _ in trajs]
    for i, toks in enumerate(out.tokens):
      toks = [t for t in toks if t not in stop]
      self.generated_tokens += len(toks)
      text = self.tokenizer.decode(toks)
      thought, action = parse_turn(text)
      result[i // samples].append(Turn(thought, action, text, len(toks)))
    return result


def choose(candidates: list[Turn], *, code_runner=None) -> tuple[Turn, dict]:
  """SAG's choice among candidates: parseable ones (whose code runs, for python[...]),
  majority by outcome, else the first candidate."""
  valid, outcomes = [], []
  for c in candidates:
    if c.action is None:
      continue
    if c.action.startswith("python[") and code_runner is not None:
      result = code_runner(c.action[len("python["):-1] if c.action.endswith("]") else c.action)
      if not result.ok:
        continue
      outcomes.append(("code", result.output.strip()))
    else:
      outcomes.append(("action", " ".join(c.action.lower().split())))
    valid.append(c)
  if not valid:
    return candidates[0], {"valid": 0, "votes": 0}
  counts = collections.Counter(outcomes)
  best, votes = counts.most_common(1)[0]
  chosen = valid[outcomes.index(best)]
  return chosen, {"valid": len(valid), "votes": votes}
