"""The adapters on the real packages: TextWorld-Express (its JVM), TextWorld (games built
with tw-make), reasoning-gym math with the sandboxed tool. Oracle trajectories win, read
as reasoning, and pass through prepare."""

import json

import pytest

from sad_jax.agent import oracle
from sad_jax.agent.env import make_env, parse_spec
from sad_jax.data import prepare, render, schema
from sad_jax.errors import DataError
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
