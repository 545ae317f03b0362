"""How far a fold's games lie from the training data.

A study chooses its settings on the dev fold and reports the test fold. That is sound only
if the reader knows what each fold measures: TextWorld-Express, for one, furnishes its test
fold's rooms with objects that its train and dev folds never show (a coin game's test
kitchens have a dining table where the train kitchens have a cupboard), so dev success is
in-distribution and test success is generalisation. `fold_shift` measures this on the
games a study plays, from their first observations: the observation seen verbatim at the
start of some training episode, and the sentences never seen in any training observation.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Sequence

from sad_jax.common.errors import DataError
from sad_jax.data.schema import Trajectory

_SENTENCE = re.compile(r"(?<=[.!?])\s+|\n+")


def sentences(text: str) -> list[str]:
  """An observation's sentences, whitespace collapsed (the unit of 'seen before')."""
  return [s for s in (" ".join(p.split()) for p in _SENTENCE.split(text)) if s]


def _norm(text: str) -> str:
  return " ".join(text.split())


def training_observations(trajs: Iterable[Trajectory]) -> tuple[set[str], set[str]]:
  """(first observations, sentences of every observation) of the training episodes."""
  starts: set[str] = set()
  seen: set[str] = set()
  for t in trajs:
    obs = [s.text for s in t.segments if s.kind == "observation"]
    if obs:
      starts.add(_norm(obs[0]))
    for o in obs:
      seen.update(sentences(o))
  return starts, seen


def shift(first_obs: Sequence[str], starts: set[str], seen: set[str]) -> dict[str, float]:
  """Over a fold's games (their first observations): the share that begins exactly as a
  training episode began; the share with a sentence no training observation has; and the
  share of all their sentences that no training observation has."""
  if not first_obs:
    raise ValueError("no games to measure")
  n_sent = unseen = games_unseen = same_start = 0
  for o in first_obs:
    ss = sentences(o)
    new = sum(s not in seen for s in ss)
    n_sent += len(ss)
    unseen += new
    games_unseen += new > 0
    same_start += _norm(o) in starts
  return {"games": len(first_obs), "start_seen": same_start / len(first_obs),
          "games_with_unseen_sentence": games_unseen / len(first_obs),
          "sentences_unseen": unseen / max(n_sent, 1)}


def first_observations(env, split: str, games: int) -> list[str]:
  """The first observations of a fold's first `games` tasks: the ones `evaluate` plays."""
  return [env.reset(task=t)[0] for t in env.tasks(split)[:games]]


def fold_shift(env, trajs: Iterable[Trajectory], splits: dict[str, int]) -> dict[str, dict]:
  """`shift` of each fold (split → number of games) against the training episodes."""
  starts, seen = training_observations(trajs)
  return {split: shift(first_observations(env, split, n), starts, seen)
          for split, n in splits.items()}


def describe(result: dict[str, dict]) -> str:
  """One sentence per fold, for a report."""
  return " ".join(
      f"{split.capitalize()} fold ({r['games']} games): {r['start_seen']:.0%} begin with an "
      f"observation that began a training episode, {r['games_with_unseen_sentence']:.0%} show "
      f"a sentence no training observation has ({r['sentences_unseen']:.0%} of their first "
      "observations' sentences)." for split, r in result.items())


def parse_rewrite(rule: str) -> tuple[str, str]:
  """'OLD=>NEW' → (OLD, NEW); OLD must not be empty."""
  old, sep, new = rule.partition("=>")
  if not sep or not old:
    raise DataError(f"rewrite rule {rule!r} is not OLD=>NEW with a non-empty OLD",
                    field="rewrite")
  return old, new


class RewrittenEnv:
  """An environment whose observations have strings replaced: a counterfactual fold.

  Replacing the one sentence by which a fold differs from training (TWX coin's test
  kitchens: the dining table for the train folds' kitchen cupboard) tests whether that
  sentence causes a dev–test gap. Only what the agent reads changes; the game, its valid
  actions and its scoring are the environment's own.
  """

  def __init__(self, env, rules: Sequence[tuple[str, str]]):
    self.env, self.rules = env, list(rules)
    self.spec, self.action_format = env.spec, env.action_format
    self.replaced = 0  # observations changed so far: a rule that never fires is a typo

  def _rewrite(self, text: str) -> str:
    out = text
    for old, new in self.rules:
      out = out.replace(old, new)
    self.replaced += out != text
    return out

  def tasks(self, split: str) -> list[int]:
    return self.env.tasks(split)

  def reset(self, *, task: int):
    obs, info = self.env.reset(task=task)
    return self._rewrite(obs), info

  def step(self, action: str):
    r = self.env.step(action)
    return dataclasses.replace(r, observation=self._rewrite(r.observation))

  def valid_actions(self):
    return self.env.valid_actions()

  def oracle_actions(self):
    return self.env.oracle_actions()

  def close(self) -> None:
    self.env.close()
