"""The adapters on the real packages: TextWorld-Express (its JVM), TextWorld (games built
with tw-make), reasoning-gym math with the sandboxed tool. Oracle trajectories win, read
as reasoning, and pass through prepare."""

import json

import pytest

from sad_jax.agent import oracle
from sad_jax.agent.envs.base import parse_spec
from sad_jax.agent.envs.registry import make_env
from sad_jax.common.errors import DataError
from sad_jax.data import prepare, render, schema
from tests.data.test_prepare import make_config


@pytest.fixture(scope="session")
def tw_games(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tw_games"))


def test_twx_folds_gold_path_and_valid_actions():
  env = make_env("twx:cookingworld")
  try:
    train, test = set(env.tasks("train")), set(env.tasks("test"))
    assert len(train) == len(test) == 1000 and not train & test
    obs, info = env.reset(task=min(test))
    assert "cook" in info["goal"].lower() and "kitchen" in obs
    assert "read cookbook" in env.valid_actions() or "take cookbook" in env.valid_actions()
    plan = env.oracle_actions()
    r = None
    for a in plan:
      r = env.step(a)
    assert r.done and r.won and r.info["score"] == 1.0
    # leaving the gold path ends the oracle; an unknown command is the env's own message
    env.reset(task=min(test))
    r = env.step("dance wildly")
    assert not r.done and env.oracle_actions() is None
  finally:
    env.close()


def test_twx_fold_seeds_equal_the_package_lists():
  from textworld_express import TextWorldExpressEnv

  env = make_env("twx:coin")
  ref = TextWorldExpressEnv(envStepLimit=10)
  try:
    ref.load("coin", env.params)
    assert env.tasks("train") == ref.getValidSeedsTrain()
    assert env.tasks("test") == ref.getValidSeedsTest()
    assert env.tasks("dev") == ref.getValidSeedsDev()
  finally:
    env.close()
    ref.close()


COIN4 = "twx:coin?numLocations=4&numDistractorItems=0&includeDoors=0&limitInventorySize=0"


def test_coin_search_expert_reads_instead_of_peeking():
  """The coin expert decides from what it has read: its first action is `take coin` exactly
  when the first room shows a coin, else a move to the first listed exit, wherever the
  coin is; it wins every game within 2·(rooms − 1) moves + the take, and with random moves
  injected it recovers (from "Unknown action" too) and still wins."""
  import re

  clean = list(oracle.generate(COIN4, split="test", episodes=40, varied=False))
  for t in clean:
    assert t.success, t.id
    acts = [s.text for s in t.segments if s.kind == "action"]
    first_obs = t.segments[1].text
    assert len(acts) <= 2 * 3 + 1 and acts[-1] == "take coin"
    if "coin" in first_obs.split("To the")[0]:
      assert acts == ["take coin"]
    else:
      listed = re.findall(r"To the (\w+) you see", first_obs)
      assert acts[0] == f"move {listed[0].lower()}", t.id
  assert len({len([s for s in t.segments if s.kind == "action"]) for t in clean}) >= 4
  noisy = list(oracle.generate(COIN4, split="train", episodes=60, varied=False, noise=0.3))
  assert all(t.success for t in noisy)
  texts = [s.text for t in noisy for s in t.segments]
  assert any(x.startswith("I'll try move") for x in texts)
  assert any(x.startswith("Unknown action") for x in texts)
  assert any(x.startswith("That did not work.") for x in texts)


def test_vary_room_keeps_what_decides_and_changes_the_rest():
  import random

  obs = ("You are in the kitchen. In one part of the room you see a stove. There is also an "
         "oven. You also see a fridge that is closed. There is also a coin. \nTo the South you "
         "see the pantry. To the West you see the corridor.")
  pool = ["You also see a bed, that has nothing on it.", "There is also a shelf."]
  texts = set()
  for seed in range(30):
    out = oracle.vary_room(obs, random.Random(seed), pool)
    head, exits = out.split("\n")
    assert head.startswith("You are in the kitchen. ") and "There is also a coin." in head
    assert exits == "To the South you see the pantry. To the West you see the corridor."
    assert oracle.search_action(out, {"kitchen": {}}) == oracle.search_action(obs, {"kitchen": {}})
    texts.add(head)
  assert len(texts) > 10  # shuffled, dropped, borrowed
  assert {"You also see a bed, that has nothing on it.", "There is also an oven."} <= {
      x for t in texts for x in pool + ["There is also an oven."] if x in t}
  assert "There is also an oven." in pool  # the room's own sentences join the pool
  assert oracle.vary_room("Unknown action: I'm not sure.", random.Random(0), pool) == \
      "Unknown action: I'm not sure."


def test_textworld_generated_game_and_policy_oracle(tw_games):
  env = make_env("textworld:coin?level=1", game_dir=tw_games)
  try:
    obs, _ = env.reset(task=env.tasks("test")[0])
    assert obs.startswith("-= ") and "$$" not in obs   # the banner art is gone
    plan = env.oracle_actions()
    assert plan and plan[-1] == "take coin"
    for a in plan:
      r = env.step(a)
    assert r.won and r.done
  finally:
    env.close()


def test_math_tool_and_scorer():
  env = make_env("math:basic_arithmetic")
  env.reset(task=env.tasks("test")[3])
  code, finish = env.oracle_actions()
  r = env.step(code)
  answer = finish[len("finish["):-1]
  assert not r.done and float(r.observation) == pytest.approx(float(answer))
  assert env.step("shout[42]").info.get("invalid")
  r = env.step(finish)
  assert r.done and r.won and r.reward == 1.0
  env.reset(task=env.tasks("test")[3])
  r = env.step("finish[123456789]")
  assert r.done and not r.won


def test_bad_specs_are_clear():
  with pytest.raises(DataError, match="KIND:NAME"):
    parse_spec("cookingworld")
  with pytest.raises(DataError, match="unknown TextWorld-Express game"):
    make_env("twx:chess")
  with pytest.raises(DataError, match="unknown environment kind"):
    make_env("gym:cartpole")


def test_oracle_trajectories_win_reason_and_prepare(tmp_path, spm_path, tw_games):
  trajs = (list(oracle.generate("twx:cookingworld", split="train", episodes=6))
           + list(oracle.generate("twx:coin", split="train", episodes=4))
           + list(oracle.generate("math:basic_arithmetic", split="train", episodes=4))
           + list(oracle.generate("math:gsm_symbolic", split="train", episodes=2))
           + list(oracle.generate("textworld:coin?level=1", split="train", episodes=1,
                                  game_dir=tw_games)))
  assert all(t.success for t in trajs)
  cook = trajs[0]
  thoughts = [s.text for s in cook.segments if s.kind == "reason"]
  actions = [s.text for s in cook.segments if s.kind == "action"]
  # the thought before each take names the item and what is still missing
  for th, a in zip(thoughts, actions):
    if a.startswith("take "):
      assert a[5:] in th
  # phrasing varies across episodes
  all_thoughts = [s.text for t in trajs[:6] for s in t.segments if s.kind == "reason"]
  assert len(set(all_thoughts)) > len(all_thoughts) // 2
  math_text = render.render_react(trajs[10]).text
  assert "Action: python[print(" in math_text and "Action: finish[" in math_text
  path = tmp_path / "oracle.jsonl"
  schema.write_jsonl(path, trajs)
  report = prepare.prepare(make_config([str(path)], tokenizer__path=spm_path, max_len=2048,
                                       val_fraction=0.0), str(tmp_path / "ds"), progress=False)
  assert report.written == {"train": len(trajs)} and report.skipped == 0
  assert report.tokens["reason"] > 0 and report.tokens["action"] > 0
  rows = [json.loads(line) for line in path.read_text().splitlines()]
  assert {r["meta"]["env"] for r in rows} >= {"twx:cookingworld", "math:basic_arithmetic"}


@pytest.mark.parametrize("game", ["cookingworld", "twc", "coin", "mapreader", "arithmetic",
                                  "sorting", "simonsays", "peckingorder"])
def test_every_twx_game_oracle_wins(game):
  traj = next(oracle.generate(f"twx:{game}", split="dev", episodes=1))
  assert traj.success, render.render_react(traj).text[-500:]


@pytest.mark.slow
def test_textworld_treasure_and_cooking_oracles_win(tw_games):
  for spec in ("textworld:treasure", "textworld:cooking"):
    traj = next(oracle.generate(spec, split="dev", episodes=1, game_dir=tw_games))
    assert traj.success, (spec, render.render_react(traj).text[-800:])
  traj = next(oracle.generate("math:chain_sum", split="dev", episodes=1))
  assert traj.success


def test_generate_command_writes_the_oracle_trajectories(tmp_path, capsys):
  """`sad-jax generate` through cli.main: the file holds what oracle.generate yields for
  the same fold, start and seed, and the summary line counts them."""
  from sad_jax import cli

  spec = "twx:coin?numLocations=3&numDistractorItems=0&includeDoors=0&limitInventorySize=0"
  out = tmp_path / "gen.jsonl"
  assert cli.main(["generate", "--env", spec, "--split", "dev", "--episodes", "3", "--start",
                   "2", "--seed", "5", "-o", str(out)]) == 0
  got = [t.to_dict() for t in schema.read_jsonl(str(out))]
  want = [t.to_dict() for t in oracle.generate(spec, split="dev", episodes=3, start=2, seed=5)]
  assert got == want and len(got) == 3
  assert f"wrote 3 trajectories to {out} ({sum(t['success'] for t in want)} successful)" in \
      capsys.readouterr().out
