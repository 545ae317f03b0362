"""Fold shift: how a fold's first observations stand to the training episodes."""

import pytest

from sad_jax.agent import folds
from sad_jax.common.errors import DataError
from sad_jax.data.schema import Segment, Trajectory


def traj(*observations: str) -> Trajectory:
  segs = [Segment("task", "find the coin")]
  for o in observations:
    segs += [Segment("observation", o), Segment("action", "look")]
  return Trajectory(id=str(hash(observations)), segments=segs)


def test_sentences_split_on_stops_and_lines_and_collapse_space():
  assert folds.sentences("You are in A.  There is a coin. \nTo the North  you see B.") == [
      "You are in A.", "There is a coin.", "To the North you see B."]
  assert folds.sentences("  \n ") == []


def test_shift_on_a_hand_computed_case():
  train = [traj("You are in A. There is a coin.", "You are in B."),
           traj("You are in A.\nTo the North you see B.")]
  starts, seen = folds.training_observations(train)
  assert starts == {"You are in A. There is a coin.", "You are in A. To the North you see B."}
  assert seen == {"You are in A.", "There is a coin.", "You are in B.",
                  "To the North you see B."}
  fold = ["You are in A.  There is a coin.",       # a training start (spaces aside)
          "You are in B. There is a coin.",        # every sentence seen; not a start
          "You are in C. There is a coin.",        # 1 of 2 sentences unseen
          "You are in D. There is a table."]       # 2 of 2 unseen
  r = folds.shift(fold, starts, seen)
  assert r == {"games": 4, "start_seen": 0.25, "games_with_unseen_sentence": 0.5,
               "sentences_unseen": 3 / 8}
  with pytest.raises(ValueError):
    folds.shift([], starts, seen)
  text = folds.describe({"dev": r})
  assert text.startswith("Dev fold (4 games): 25% begin with") and "50% show" in text


def test_twx_coin_test_fold_shows_furniture_its_train_and_dev_folds_never_do():
  """The reason the coin study's dev and test success differ: TextWorld-Express furnishes
  test-fold kitchens with objects (a dining table) absent from train and dev, so every test
  game begins with an unseen sentence and no dev game does."""
  from sad_jax.agent import oracle
  from sad_jax.agent.envs.registry import make_env

  spec = "twx:coin?numLocations=4&numDistractorItems=0&includeDoors=0&limitInventorySize=0"
  trajs = list(oracle.generate(spec, split="train", episodes=100, varied=False, noise=0.0,
                               vary_rooms=False))
  env = make_env(spec)
  try:
    r = folds.fold_shift(env, trajs, {"dev": 32, "test": 32})
    _, seen = folds.training_observations(trajs)
    new = {s for o in folds.first_observations(env, "test", 32) for s in folds.sentences(o)
           if s not in seen}
  finally:
    env.close()
  assert r["dev"]["games_with_unseen_sentence"] == 0.0 and r["dev"]["start_seen"] > 0.8
  assert r["test"]["games_with_unseen_sentence"] == 1.0 and r["test"]["start_seen"] == 0.0
  assert any("dining table" in s for s in new)


TABLE = "In one part of the room you see a dining table, that has nothing on it."
CUPBOARD = "In one part of the room you see a kitchen cupboard that is closed."


def test_parse_rewrite():
  assert folds.parse_rewrite("a table=>a cupboard") == ("a table", "a cupboard")
  assert folds.parse_rewrite("a table=>") == ("a table", "")
  for bad in ("a table", "=>a cupboard"):
    with pytest.raises(DataError, match="OLD=>NEW"):
      folds.parse_rewrite(bad)


def test_rewritten_twx_coin_test_fold_reads_as_train_and_plays_as_test():
  """The counterfactual fold: with its one test-only sentence put back as the train kitchens
  have it, no test game shows an unseen sentence any more, while the game is unchanged (the
  oracle's path wins it in the same number of steps, with the same rewards)."""
  from sad_jax.agent import oracle
  from sad_jax.agent.envs.registry import make_env

  spec = "twx:coin?numLocations=4&numDistractorItems=0&includeDoors=0&limitInventorySize=0"
  trajs = list(oracle.generate(spec, split="train", episodes=100, varied=False, noise=0.0,
                               vary_rooms=False))
  plain = make_env(spec)
  env = folds.RewrittenEnv(make_env(spec), [(TABLE, CUPBOARD)])
  try:
    assert folds.fold_shift(env, trajs, {"test": 16})["test"]["games_with_unseen_sentence"] == 0
    assert env.replaced >= 16
    for task in env.tasks("test")[:4]:
      obs, _ = env.reset(task=task)
      raw, _ = plain.reset(task=task)
      assert obs == raw.replace(TABLE, CUPBOARD) != raw
      path = plain.oracle_actions()
      assert env.oracle_actions() == path
      a = [env.step(x) for x in path]
      b = [plain.step(x) for x in path]
      assert [(r.reward, r.done, r.won) for r in a] == [(r.reward, r.done, r.won) for r in b]
      assert a[-1].won
      assert [r.observation for r in a] == [r.observation.replace(TABLE, CUPBOARD) for r in b]
  finally:
    env.close()
    plain.close()
