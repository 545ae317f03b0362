"""`evaluate` on policies whose scores are known in advance: the environment's own gold
path must score 100% success and 0% invalid actions, a policy that never writes a valid
action 0% and 100%; the decision metric scores a replay of the recorded actions 1 and a
policy that always does the same wrong thing 0."""

import dataclasses
import shutil

import pytest

from sad_jax.agent import evaluate, react
from sad_jax.agent.envs.registry import make_env
from sad_jax.data import schema

COIN = "twx:coin?numLocations=4&numDistractorItems=0&includeDoors=0&limitInventorySize=0"
pytestmark = pytest.mark.skipif(shutil.which("java") is None,
                                reason="TextWorld-Express needs Java (tools/ensure-java)")


class _Ids:
  def __init__(self, text):
    self.ids = text.split()


class _Tok:
  eos_id = None

  def encode(self, text):
    return _Ids(text)


@dataclasses.dataclass
class Scripted:
  """A policy (the `react.Policy` interface evaluate uses) that answers from a function of
  the trajectory so far."""

  decide: object
  tokenizer: object = dataclasses.field(default_factory=_Tok)
  generated_tokens: int = 0
  generate_seconds: float = 1.0

  def turns(self, trajs, *, samples=1, temperature=None, seed=0, min_batch=1):
    del temperature, seed, min_batch
    out = []
    for t in trajs:
      thought, action = self.decide(t)
      out.append([react.Turn(thought, action, f"Thought: {thought}\nAction: {action}", 1)]
                 * samples)
    return out


def _actions_so_far(traj):
  return sum(s.kind == "action" for s in traj.segments)


@pytest.fixture(scope="module")
def gold():
  """Each test-fold game's gold path, read from a separate environment."""
  env = make_env(COIN)
  try:
    paths = {}
    for task in env.tasks("test")[:6]:
      env.reset(task=task)
      paths[task] = env.oracle_actions()
    return paths
  finally:
    env.close()


def test_gold_path_policy_scores_100_percent_and_no_invalid_action(gold):
  policy = Scripted(lambda t: ("follow the gold path",
                               gold[t.meta["task"]][_actions_so_far(t)]))
  res = evaluate.evaluate(policy, env_spec=COIN, split="test", episodes=6, max_steps=10,
                          batch=3, progress=False)
  assert (res.successes, res.success_rate, res.invalid_action_rate) == (6, 1.0, 0.0)
  assert [g["task"] for g in res.games] == list(gold) and all(g["won"] for g in res.games)
  assert [g["steps"] for g in res.games] == [len(p) for p in gold.values()]


def test_invalid_only_policy_scores_0_percent_and_all_invalid():
  policy = Scripted(lambda t: ("I will not say an action", None))
  res = evaluate.evaluate(policy, env_spec=COIN, split="test", episodes=4, max_steps=3,
                          batch=2, progress=False)
  assert (res.successes, res.invalid_action_rate, res.mean_steps) == (0, 1.0, 3.0)
  assert not any(g["won"] for g in res.games)


def test_decision_accuracy_of_a_replay_a_constant_and_a_silent_policy(gold, tmp_path):
  replay = Scripted(lambda t: ("x", gold[t.meta["task"]][_actions_so_far(t)]))
  # recorded trajectories: the gold games, played and transcribed
  evaluate.evaluate(replay, env_spec=COIN, split="test", episodes=6, max_steps=10, batch=3,
                    progress=False, transcripts=str(tmp_path / "t.jsonl"))
  trajs = list(schema.read_jsonl(str(tmp_path / "t.jsonl")))
  n = sum(len(p) for p in gold.values())
  assert evaluate.decision_accuracy(replay, trajs, batch=4) == {
      "decision_accuracy": 1.0, "decision_valid": 1.0, "decisions": n}
  wrong = Scripted(lambda t: ("x", "look around"))
  assert evaluate.decision_accuracy(wrong, trajs)["decision_accuracy"] == 0.0
  silent = Scripted(lambda t: ("x", None))
  assert evaluate.decision_accuracy(silent, trajs)["decision_valid"] == 0.0
  # case and surrounding spaces do not count: "MOVE NORTH " is the recorded "move north"
  shouty = Scripted(lambda t: ("x", gold[t.meta["task"]][_actions_so_far(t)].upper() + " "))
  assert evaluate.decision_accuracy(shouty, trajs)["decision_accuracy"] == 1.0
