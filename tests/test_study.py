"""`sad-jax study` (and the demo, one instance of it): every config builds, the grid's
plan, the dev-fold choice, the report's lines, and the whole pipeline end to end."""

import json
import re

import jax
import ml_collections
import numpy as np
import pytest

from sad_jax import cli
from sad_jax.common import configlib
from sad_jax.common.errors import DataError
from sad_jax.configs import study_coin
from sad_jax.experiment import stats
from sad_jax.experiment.study import cache as study_cache
from sad_jax.experiment.study import cells as study_cells
from sad_jax.experiment.study import grid as study_grid
from sad_jax.experiment.study import opd_cells as study_opd_cells
from sad_jax.experiment.study import replication as study_replication
from sad_jax.experiment.study import report as study_report
from sad_jax.experiment.study import results as study_results
from sad_jax.experiment.study import runner as study_runner
from sad_jax.models import transformer as T
from sad_jax.models.config import from_hf_dict

CONFIG = "configs/study_coin.py"


def count(model: dict) -> int:
  from sad_jax.configs import train_base

  cfg = from_hf_dict({**train_base.DEMO_STUDENT, **model, "vocab_size": 600})
  shapes = jax.eval_shape(lambda: T.init_params(cfg, jax.random.key(0)))
  return sum(int(x.size) for x in jax.tree.leaves(shapes))


@pytest.mark.parametrize("arg", [None, "rooms6", "demo", "quick", "opd", "opd_quick"])
def test_every_study_config_builds_a_valid_grid(arg):
  c = configlib.load(f"{CONFIG}:{arg}" if arg else CONFIG)
  arms = study_grid.arms(c)
  assert count(c.teacher.model) >= 4 * count(c.student.model)
  if arg in ("opd", "opd_quick"):
    assert {a.name for a in arms} == {"sad", "token_kd", "sad+opd", "sad+guided",
                                      "token_kd+opd", "opd", "gkd"} and c.reference == "sad+opd"
  else:
    assert {a.name for a in arms} >= {"sad", "token_kd", "sft"} and c.reference == "sad"
  if arg in (None, "rooms6"):  # the power: ≥ 128 shared test games, ≥ 5 seeds,
    # ≥ 4 budgets for the main arms, ≥ 3 seeds for each ablation
    assert c.eval.test_games >= 128 and c.eval.dev_games >= 32
    for a in arms:
      assert len(a.seeds) >= (5 if a.budgets else 3)
      assert not a.budgets or len(a.budgets) >= 4
    assert {a.name for a in arms} >= {"sad+learnable", "sad+pcgrad", "sad+curriculum"}
  # each cell's training config builds (overrides are real keys)
  chosen = {a.name: (a.budgets or (10,))[0] for a in arms}
  for a in arms:
    cell = study_grid.cells_of(a, a.budgets or (10,), chosen)[0]
    if a.objective == "opd":
      shared = study_cells.Inputs(dataset="D", store="S", dev=study_cells.DevData(
          dataset="DD", store="DS", jsonl="DJ"), teacher="T", teacher_jsonl="J", tokenizer="K")
      o = study_opd_cells.opd_config("W", c, cell, shared)
      assert o.rounds == cell.steps and o.teacher == "T" and o.env == c.env
      assert o.student == (f"W/cells/{a.start}_s{cell.seed}_n{chosen[a.start]}/final"
                           if a.start else "")
      assert o.loss.per_span == a.name.startswith("sad+") and o.optim.lr == 3e-5
      assert o.guide.prob == (0.5 if a.name == "sad+guided" else 0.0)
      assert o.loss.guided_targets == (a.name == "sad+guided")
      assert o.mix.teacher_share == (0.5 if a.name == "gkd" else 0.0)
      continue
    t = study_grid.train_config(c, "DATA", objective=cell.objective, model=c.student.model,
                           steps=cell.steps, seed=cell.seed, lr=c.student.lr,
                           overrides=cell.overrides, curriculum=cell.curriculum)
    assert t.train.steps == cell.steps and t.objective.name == a.objective
    assert t.objective.pcgrad == ("pcgrad" in a.name)
    assert t.objective.learnable_weights == ("learnable" in a.name)
    assert len(t.curriculum.stages) == (2 if a.curriculum else 1)


def test_a_bad_grid_is_refused_by_name():
  c = configlib.load(f"{CONFIG}:quick", ["--config.reference=nope"])
  with pytest.raises(Exception, match="reference 'nope'"):
    study_grid.arms(c)


def _rec(arm, seed, steps, dev, test=None):
  games = lambda won: {"games": [{"task": i, "won": bool(w), "steps": 1}
                                 for i, w in enumerate(won)],
                       "success_rate": float(np.mean(won))}
  r = {"cell": {"arm": arm, "objective": arm, "seed": seed, "steps": steps}, "dev": games(dev)}
  if test is not None:
    r["test"] = games(test)
  return r


def test_the_budget_is_chosen_on_dev_the_smaller_on_a_tie():
  recs = [_rec("sad", s, n, dev) for s in (0, 1) for n, dev in
          ((100, [0, 0, 1, 0]), (200, [1, 1, 1, 0]), (300, [1, 1, 0, 1]), (400, [0, 1, 0, 0]))]
  best, curve = study_grid.choose_budget(recs)
  assert curve == {100: 0.25, 200: 0.75, 300: 0.75, 400: 0.25} and best == 200
  # 10 games, seeds winning 3/2/1 and 1/2/3: a tie; means of float rates once differed in
  # the last bit (0.19999999999999998 against 0.20000000000000004) and chose 200
  won = lambda k: [1] * k + [0] * (10 - k)
  recs = [_rec("sad", s, n, won(k)) for n, ks in ((100, (3, 2, 1)), (200, (1, 2, 3)))
          for s, k in enumerate(ks)]
  assert study_grid.choose_budget(recs)[0] == 100


def test_an_arm_whose_best_budget_is_its_largest_trains_the_next_one():
  arm = study_coin.arm
  own = [arm("sad", "sad", seeds=(0, 1), budgets=(100, 200)),
         arm("sft", "sft", seeds=(0, 1), budgets=(100, 200))]
  records = {}
  for name, dev in (("sad", {100: [1, 1, 0], 200: [1, 0, 0]}),     # flattened: 100 is best
                    ("sft", {100: [0, 0, 1], 200: [1, 1, 0]})):    # still rising at 200
    for s in (0, 1):
      for n, won in dev.items():
        records[f"{name}_s{s}_n{n}"] = _rec(name, s, n, won)
  budgets = {"sad": [100, 200], "sft": [100, 200]}
  assert [a.name for a in study_grid.still_rising(own, budgets, records, 400)] == ["sft"]
  assert study_grid.still_rising(own, budgets, records, 200) == []   # no larger budget to add
  for s in (0, 1):   # after 400 steps sft is best at 200: no further budget
    records[f"sft_s{s}_n400"] = _rec("sft", s, 400, [1, 0, 0])
  budgets["sft"].append(400)
  assert study_grid.still_rising(own, budgets, records, 800) == []


def test_results_lines_hold_one_line_per_cell_and_game_and_mismatched_games_are_refused():
  records = {"sad_s0_n100": _rec("sad", 0, 100, [1, 0], [1, 1, 0])}
  teacher = {"dev": {"games": [{"task": 7, "won": True, "steps": 2}] * 2}}
  lines = study_results.results_lines(records, teacher)
  assert len(lines) == 2 + 2 + 3
  assert {(x["cell"], x["split"]) for x in lines} == {("teacher", "dev"), ("sad_s0_n100", "dev"),
                                                       ("sad_s0_n100", "test")}
  m = study_results.won_matrix([records["sad_s0_n100"]["test"]] * 2)
  assert m.shape == (2, 3) and m.sum() == 4
  other = _rec("sad", 1, 100, [1, 0], [1, 1])["test"]
  with pytest.raises(ValueError, match="same games"):
    study_results.won_matrix([records["sad_s0_n100"]["test"], other])


def test_verdict_lines_on_constructed_results():
  """The report's comparisons on constructed outcomes, reference − rival, teacher included:
  a rival that loses every game the reference wins, one that wins them all, and a twin."""
  ref = np.array([[1.0, 1.0, 0.0, 1.0] * 8] * 3)
  won = {"sad": ref, "sft": np.zeros((3, 32)), "token_kd": np.ones((3, 32)),
         "twin": ref.copy(), "teacher": ref[:1].copy()}
  table, lines = study_results.comparisons(won, "sad", ["sft", "token_kd", "twin", "teacher"])
  assert lines == ["sad − sft: +75.0 [+59.4, +87.5] → sad ahead",
                   "sad − token_kd: -25.0 [-40.6, -12.5] → token_kd ahead",
                   "sad − twin: +0.0 [+0.0, +0.0] → no significant difference",
                   "sad − teacher: +0.0 [+0.0, +0.0] → no significant difference"]
  assert table.splitlines()[2] == "| sad − sft | +75.0 [+59.4, +87.5] | sad ahead |"


def test_the_counterfactual_section_on_constructed_results():
  """rewritten − test per model, paired over games and seeds: a teacher that wins every
  rewritten game and lost every plain one (+100, exactly), a model the rewrite does not
  move (0, exactly, though its seeds differ), and outcomes of another shape refused."""
  ref = np.array([[1.0, 1.0, 0.0, 1.0] * 10, [0.0, 1.0, 0.0, 0.0] * 10])
  test = {"sad": ref, "teacher": np.zeros((1, 40))}
  rewritten = {"sad": ref.copy(), "teacher": np.ones((1, 40))}
  dev = {"sad": stats.Estimate(0.9, 0.8, 1.0)}
  text = study_report.counterfactual(test, rewritten, dev, [["a table", "a cupboard"]])
  assert "(`a table` → `a cupboard`)" in text
  assert "teacher: the rewrite raises success. Others: no significant change." in text
  assert "| sad | 50.0% [" in text and "| +0.0 [+0.0, +0.0] | 90.0% [80.0, 100.0] |" in text
  assert "| teacher | 0.0% [0.0, 0.0] | 100.0% [100.0, 100.0] | +100.0 [+100.0, +100.0] | – |" \
      in text
  assert "comparison (rewritten" not in text
  text = study_report.counterfactual(test, rewritten, dev, [["a", "b"]], reference="sad",
                                     rivals=["teacher"])
  # sad's seeds win 75% and 25% of the rewritten games, the teacher all: −50 points
  assert re.search(r"\| comparison \(rewritten test\) .*\n.*\n\| sad − teacher \| -50\.0 \[-\d+\.\d, "
                   r"-\d+\.\d\] \| teacher ahead \|", text)
  with pytest.raises(ValueError, match="sad: the rewritten fold has"):
    study_report.counterfactual(test, {"sad": ref[:1]}, dev, [["a", "b"]])


def test_the_report_refuses_models_that_played_other_games():
  ev = lambda tasks: {"games": [{"task": t, "won": True, "steps": 1} for t in tasks]}
  study_results.same_games({"sad": [ev([1, 2]), ev([1, 2])], "teacher": [ev([1, 2])]})
  with pytest.raises(ValueError, match="did not play the same games: teacher differ"):
    study_results.same_games({"sad": [ev([1, 2])], "teacher": [ev([2, 1])]})
  with pytest.raises(ValueError, match="the seeds of sad did not play"):
    study_results.same_games({"sad": [ev([1, 2]), ev([1, 3])], "teacher": [ev([1, 2])]})


def test_the_replication_table_on_constructed_results():
  """A run replicated exactly; one whose sft won every game (3 of 4 in the pattern) the
  earlier one lost (it lies outside, this − earlier excludes zero, the verdict flips);
  the teacher's rows are reported apart (one draw each)."""
  ref = np.array([[1.0, 1.0, 0.0, 1.0] * 8] * 3)
  earlier = {"sad": ref, "sft": np.zeros((3, 32)), "teacher": ref[:1].copy()}
  table, found = study_replication.replication_table(earlier, dict(earlier), "sad",
                                                ["sft", "teacher"])
  assert found["outside"] == found["shifted"] == [] and len(found["teacher"]) == 2
  assert "| sad success | 75.0% [59.4, 87.5] | 75.0% [59.4, 87.5] | yes | +0.0 [+0.0, +0.0] |" \
      in table.splitlines()
  assert "| teacher success (one draw each) | 75.0% [59.4, 87.5] |" in table
  assert "| sad − sft, points | +75.0 [+59.4, +87.5] → sad ahead | +75.0 [+59.4, +87.5] → " \
      "sad ahead | yes | +0.0 [+0.0, +0.0] |" in table.splitlines()
  here = {**earlier, "sft": ref.copy()}
  table, found = study_replication.replication_table(earlier, here, "sad", ["sft", "teacher"])
  assert found["outside"] == ["sft 75.0% (earlier 0.0% [0.0, 0.0])",
                              "sad − sft +0.0 [+0.0, +0.0] (earlier +75.0 [+59.4, +87.5])"]
  # this − earlier: sft +75 points paired over the same 32 games (its seeds are identical,
  # so only the games' draw is left: the reference's own interval); sad − sft moves by
  # (75 − 75) − (75 − 0) = −75, a difference of differences
  assert found["shifted"] == ["sft +75.0 [+59.4, +87.5]", "sad − sft -75.0 [-87.5, -59.4]"]
  assert "| sft success | 0.0% [0.0, 0.0] | 75.0% [59.4, 87.5] | **no** | +75.0 [+59.4, " \
      "+87.5] |" in table.splitlines()
  assert "no significant difference (verdict differs)" in table
  words = study_replication.replication_verdict(found)
  assert words.startswith("2 of the students' figures lie outside")
  assert "The teacher rows compare one teacher with another" in words
  assert study_replication.replication_verdict({"outside": [], "shifted": [], "teacher": []}) == (
      "Every student figure of this run lies inside the earlier run's 95% interval. No "
      "student figure's this − earlier interval excludes zero. Each interval is 95% on its "
      "own, with no correction for the number of rows.")


def test_an_earlier_run_is_read_from_its_results_and_bad_records_are_named(tmp_path):
  """The coin study's own results (its report: sad 66.9%, sft 600 steps, 5 and 3 seeds)."""
  ref = study_results.reference_run("docs/study/coin")
  assert ref["chosen"] == {"sad": 400, "token_kd": 400, "sft": 600, "sad+learnable": 400,
                           "sad+pcgrad": 400, "sad+curriculum": 400}
  assert ref["seeds"]["sad"] == [0, 1, 2, 3, 4] and ref["seeds"]["sad+pcgrad"] == [0, 1, 2]
  assert ref["won"]["sad"].shape == (5, 128) and ref["won"]["teacher"].shape == (1, 128)
  assert round(100 * ref["won"]["sad"].mean(), 1) == 66.9
  assert round(100 * ref["won"]["teacher"].mean(), 1) == 78.9
  assert ref["cpu"] == "AMD EPYC" and len(ref["tasks"]) == 128
  bad = tmp_path / "results.jsonl"
  line = {"cell": "teacher", "arm": "teacher", "seed": None, "steps": None, "split": "test",
          "task": 1, "won": True}
  bad.write_text(json.dumps(line) + "\n" + json.dumps({**line, "won": None} | {"x": 1})[:-1]
                 + "\n")
  with pytest.raises(DataError, match=r"results.jsonl, record 2: not JSON"):
    study_results.reference_run(str(tmp_path))
  del line["task"]
  bad.write_text(json.dumps(line) + "\n")
  with pytest.raises(DataError, match=r"record 1, field 'task': missing"):
    study_results.reference_run(str(bad))
  (tmp_path / "empty").mkdir()
  with pytest.raises(DataError, match="not a study's output folder"):
    study_results.reference_run(str(tmp_path / "empty"))
  with pytest.raises(DataError, match="nothing: cannot read"):
    study_results.reference_run(str(tmp_path / "nothing"))


def test_compare_runs_reproduces_each_reports_intervals_and_refuses_other_environments(
    tmp_path, capsys):
  """The coin study against itself: each interval is the one its report.md printed, every
  figure lies inside; against the 6-room study (the same task numbers): refused by name."""
  out = tmp_path / "cmp.md"
  assert cli.main(["compare-runs", "docs/study/coin", "docs/study/coin", "--out", str(out)]) == 0
  text = out.read_text()
  assert text == capsys.readouterr().out.rstrip("\n") + "\n"
  report = open("docs/study/coin/report.md", encoding="utf-8").read()
  for row, figure in (("sad", "66.9% [54.8, 78.1]"), ("sft", "68.8% [61.3, 76.2]"),
                      ("teacher", "78.9% [71.9, 85.9]")):
    assert figure in report
    label = f"{row} success" + (" (one draw each)" if row == "teacher" else "")
    assert f"| {label} | {figure} | {figure} | yes |" in text
  assert "| sad − sft, points | -1.9 [-14.7, +9.7] → no significant difference |" in text
  assert "Every student figure of this run lies inside" in text
  rows = [r.split(" |")[0] for r in text.splitlines() if r.startswith("| sad − ")]
  assert set(rows[:2]) == {"| sad − token_kd, points", "| sad − sft, points"}  # primary first
  assert cli.main(["compare-runs", "docs/study/coin", "docs/study/rooms6"]) == 2
  assert "field 'env': the runs played different environments" in capsys.readouterr().err


def write_run(folder, *, teacher_seed: int, won: dict[str, list[list[int]]],
              env: str = "twx:coin?numLocations=4",
              rewritten: dict[str, list[list[int]]] | None = None) -> str:
  """A finished run's results.jsonl (test games 1..G; rewritten: the counterfactual fold's)
  and the report.md lines it is read by."""
  folder.mkdir()
  lines = []
  for split, outcomes in (("test", won), ("test_rewritten", rewritten or {})):
    for arm, seeds in outcomes.items():
      for seed, games in enumerate(seeds):
        teacher = arm == "teacher"
        for task, w in enumerate(games, 1):
          lines.append({"cell": arm if teacher else f"{arm}_s{seed}_n10", "arm": arm,
                        "seed": None if teacher else seed, "steps": None if teacher else 10,
                        "split": split, "task": task, "won": bool(w)})
  (folder / "results.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
  (folder / "report.md").write_text(
      f"CPU: Test CPU (2 cores)\nEnvironment: `{env}`. The teacher (1.74 M parameters, seed\n"
      f"{teacher_seed}) is trained\n")
  return str(folder)


def test_the_teacher_kept_is_the_draw_that_won_most_dev_games_the_lower_seed_on_a_tie():
  assert stats.best_draw({0: 2, 1: 40, 2: 18}) == 1
  assert stats.best_draw({3: 5, 4: 7, 5: 7}) == 4
  assert stats.best_draw({0: 0}) == 0


def test_seeds_option_keeps_each_arms_first_seeds():
  arms = study_grid.arms(configlib.load(CONFIG))
  cut = study_grid.first_seeds(arms, 2)
  assert [a.seeds for a in cut] == [(0, 1)] * len(arms) and arms[0].seeds == tuple(range(5))
  assert study_grid.first_seeds(arms, None) is arms
  with pytest.raises(DataError, match="--seeds must be at least 1"):
    study_grid.first_seeds(arms, 0)


def test_pool_runs_over_teacher_draws_on_constructed_runs(tmp_path, capsys):
  """Teacher 0's students (2 seeds) win all 4 games under sad, teacher 1's (3 seeds) none;
  token_kd wins games 1–2 under both. Pooled: each teacher weighs the same (sad 50%, not
  40%), the per-teacher differences are +50 and −50, and the teacher draw alone spans
  sad's interval [0, 100]. The same teacher seed twice, or another environment, is refused."""
  a = write_run(tmp_path / "t0", teacher_seed=0, won={
      "sad": [[1, 1, 1, 1]] * 2, "token_kd": [[1, 1, 0, 0]] * 2, "teacher": [[1, 1, 1, 1]]})
  b = write_run(tmp_path / "t1", teacher_seed=1, won={
      "sad": [[0, 0, 0, 0]] * 3, "token_kd": [[1, 1, 0, 0]] * 3, "teacher": [[1, 1, 0, 0]],
      "sft": [[1, 0, 0, 0]]})
  out = tmp_path / "pool.md"
  assert cli.main(["pool-runs", a, b, "--out", str(out)]) == 0
  text = out.read_text()
  assert text == capsys.readouterr().out.rstrip("\n") + "\n"
  assert "| sad | 10 / 10 | 2 / 3 | 50.0% [0.0, 100.0] | 100.0 / 0.0 |" in text
  assert "| teacher | – | 1 each | 75.0% [" in text and "| 100.0 / 50.0 |" in text
  assert "| sad − token_kd | +0.0 [" in text and "| +50.0 / -50.0 | no significant" in text
  assert "Not in every run (left out): sft." in text
  c = write_run(tmp_path / "t1b", teacher_seed=1, won={"sad": [[1, 0, 0, 0]],
                                                       "teacher": [[1, 1, 1, 1]]})
  assert cli.main(["pool-runs", a, b, c]) == 2
  assert "two runs have teacher seed 1" in capsys.readouterr().err
  d = write_run(tmp_path / "six", teacher_seed=2, won={"sad": [[1, 0, 0, 0]],
                                                       "teacher": [[1, 1, 1, 1]]},
                env="twx:coin?numLocations=6")
  assert cli.main(["pool-runs", a, d]) == 2
  assert "field 'env': the runs played different environments" in capsys.readouterr().err
  # the counterfactual fold pools the same way, from its own lines; a run without it is named
  assert cli.main(["pool-runs", a, b, "--split", "test_rewritten"]) == 2
  assert "t0/results.jsonl, field 'arm': no teacher test_rewritten games" in \
      capsys.readouterr().err
  e = write_run(tmp_path / "r0", teacher_seed=0, won={"sad": [[0, 0, 0, 0]], "teacher": [[1] * 4]},
                rewritten={"sad": [[1, 1, 1, 1]], "teacher": [[1, 1, 1, 0]]})
  f = write_run(tmp_path / "r1", teacher_seed=1, won={"sad": [[0, 0, 0, 0]], "teacher": [[1] * 4]},
                rewritten={"sad": [[1, 1, 0, 0]], "teacher": [[1, 1, 1, 1]]})
  assert cli.main(["pool-runs", e, f, "--split", "test_rewritten"]) == 0
  text = capsys.readouterr().out
  assert "The same 4 rewritten test (the counterfactual fold" in text
  assert "| sad | 10 / 10 | 1 / 1 | 75.0% [" in text and "| 100.0 / 50.0 |" in text
  assert "| comparison (rewritten test) | difference over" in text
  assert cli.main(["pool-runs", a]) == 2
  # a report from before the seed was recorded: the code then always drew seed 0
  assert study_results.reference_run("docs/study/coin")["teacher_seed"] == 0


def tiny_config(tmp_env_games: int = 2):
  """The quick plan, shrunk further: tiny models, 2 steps, 2 games per fold."""
  c = configlib.load(f"{CONFIG}:quick")
  c.unlock()
  tiny = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
              num_key_value_heads=1)
  c.expert.episodes = 30
  c.data.seq_len, c.data.batch = 128, 8
  c.teacher.model = {**tiny, "hidden_size": 64}
  c.teacher.steps = 2
  c.student.model = tiny
  c.teacher_data.train_games = 4
  c.arms = tuple(list(c.arms) + [study_coin.arm(
      "sad+pcgrad", "sad", seeds=(0,), overrides=("objective.pcgrad=True",)),
      # on-policy rounds from the sad cell: one round of two episodes
      study_coin.arm("sad+opd", "opd", seeds=(0,), budgets=(1,), start="sad", overrides=(
          "rollout.episodes=2", "rollout.slots=2", "updates=1", "batch=2", "eval.every=1",
          "loss.per_span=True", "loss.full_weight=1.0"))])
  for a in c.arms:
    if a.budgets and a.objective != "opd":  # sad chooses between two budgets on dev
      a.budgets = (2, 3) if a.name == "sad" else (2,)
  c.eval.dev_games = c.eval.test_games = tmp_env_games
  c.more_budgets = (4,)  # sad's best is its smaller budget (asserted below): none is added
  c.eval.max_steps, c.eval.batch, c.eval.max_new_tokens = 1, 2, 8
  c.eval.test_rewrite = (study_coin.TABLE_TO_CUPBOARD,)
  c.teacher.draws = 2  # two candidate teachers, the better on dev kept
  c.lock()
  return c


@pytest.mark.slow
@pytest.mark.early
def test_study_runs_every_stage_end_to_end_then_a_rerun_skips_them(tmp_path, monkeypatch,
                                                                   capsys):
  """The demo's path (`sad-jax demo --quick` through cli.main) on a shrunken plan: expert
  data → prepare → teacher → the teacher's own episodes → stores → cells on dev → the
  budget choice → test → results.jsonl and report.md; a rerun checks and skips every stage;
  a changed plan retrains."""
  from sad_jax.experiment import demo

  c = tiny_config()
  monkeypatch.setattr(demo, "config", lambda quick: c)
  assert cli.main(["demo", "--quick", "--workdir", str(tmp_path)]) == 0
  work = tmp_path / "quick"
  out = capsys.readouterr().out
  # ties go to the smaller budget, and the ablation takes sad's
  assert ("budgets: sad 2 (dev), token_kd 2 (fixed), sft 2 (fixed), sad+opd 1 (fixed), "
          "sad+pcgrad 2 (sad)") in out
  lines = [json.loads(x) for x in (work / "results.jsonl").read_text().splitlines()]
  # two games a line: teacher dev + test; sad's two budgets on dev; five cells on test; the
  # teacher and the five cells on the rewritten test fold
  assert len(lines) == 2 * (2 + 2 + 5 + 6)
  assert {x["cell"] for x in lines if x["split"] == "test_rewritten"} == {
      "teacher", "sad_s0_n2", "token_kd_s0_n2", "sft_s0_n2", "sad+pcgrad_s0_n2", "sad+opd_s0_n1"}
  assert sorted({(x["cell"], x["split"]) for x in lines if x["split"] == "dev"}) == [
      ("sad_s0_n2", "dev"), ("sad_s0_n3", "dev"), ("teacher", "dev")]
  assert {x["arm"] for x in lines} == {"teacher", "sad", "token_kd", "sft", "sad+pcgrad",
                                       "sad+opd"}
  opd = json.loads((work / "cells" / "sad+opd_s0_n1.json").read_text())
  assert opd["cell"]["start"] == "sad_s0_n2"
  assert [r["round"] for r in opd["opd"]["rounds"]] == [-1, 0]
  assert opd["opd"]["spent"]["train_steps"] == 1 and opd["opd"]["spent"]["generated_tokens"] > 0
  report = (work / "report.md").read_text()
  for needle in ("| sad − token_kd |", "| sad − sft |", "| sad − sad+pcgrad |",
                 "Exact figures depend on the processor", "chosen on the dev fold",
                 "One teacher (one random draw) serves every arm",
                 "What the folds measure", "Test fold (2 games): ",
                 "## Counterfactual test fold", "| sad+pcgrad | ",
                 "| comparison (rewritten test) |",
                 "Command: `sad-jax demo --quick`",
                 "## On-policy rounds: what each arm spent"):
    assert needle in report
  # the cost row: one seed, one update; the rounds' row: the start and the one round on dev
  spent = opd["opd"]["spent"]
  assert (f"| sad+opd | 1 | 1 | {spent['generated_tokens'] / 1e3:.1f} k | "
          f"{spent['teacher_tokens'] / 1e3:.1f} k | 0.0 k |") in report
  dev = [r["dev_success"] for r in opd["opd"]["rounds"]]
  assert f"| sad+opd | r0 {dev[0]:.2f}, r1 {dev[1]:.2f} |" in report
  from sad_jax.trainer.metrics import cpu_model

  # six cells trained (sad's two budgets, then token_kd, sft, sad+pcgrad, sad+opd), stamped
  assert f"Students trained on: {cpu_model()}: 6 cells." in report
  assert re.search(r"^\[7/8\] .*\(at \d+\.\d min\)$", out, re.M)  # stage lines say when
  kept = re.search(r"teacher: seed (\d) kept \(dev games won: seed 0 (\d), seed 1 (\d)\)", out)
  assert kept and int(kept[1]) == stats.best_draw({0: int(kept[2]), 1: int(kept[3])})
  assert (f"seed\n{kept[1]}) is trained\n2 steps on 30 expert episodes (kept as the best on "
          "dev of 2 draws; dev games won: seed 0") in report
  # every candidate also played the test fold, reported and not used to choose
  cand = {s: json.loads((work / d / "test.json").read_text())
          for s, d in ((0, "teacher"), (1, "teacher_s1"))}
  assert all(r["split"] == "test" and r["episodes"] == 2 for r in cand.values())
  assert ("optimistic; on the test fold, not used to choose: " + ", ".join(
      f"seed {s} {100 * r['success_rate']:.1f}%" for s, r in cand.items()) + ")") in report
  for png in ("learning_curves.png", "test_success.png"):
    assert (work / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  teacher_data = [json.loads(x) for x in (work / "teacher_data" / "train_success.jsonl")
                  .read_text().splitlines()]
  assert len(teacher_data) == 4 and {t["source"] for t in teacher_data} == {"teacher"}

  assert cli.main(["demo", "--quick", "--workdir", str(tmp_path)]) == 0
  out = capsys.readouterr().out
  assert re.search(r"expert: \d+ trajectories already", out)
  assert out.count("already trained") == 2 + 2 + 5  # 2 teachers; 2 cells on dev, 5 on test
  assert out.count("already done") == 3 and out.count("already complete") == 2
  assert "steps in" not in out and "episodes: success" not in out  # nothing retrained/replayed
  # a rerun keeps the processor that trained each cell, and sums both invocations' time
  report = (work / "report.md").read_text()
  assert f"Students trained on: {cpu_model()}: 6 cells." in report
  assert "all\n2 recorded invocations" in report and len(study_cells.invocations(str(work))) == 2

  # replicating a run (here: itself, in its own workdir) trains nothing new, plays no dev
  # cell, and every figure lies inside its intervals; an arm it did not test is refused
  (tmp_path / "earlier").mkdir()
  for name in ("results.jsonl", "report.md", "run.json"):  # run.json: the CPU that trained it
    (tmp_path / "earlier" / name).write_bytes((work / name).read_bytes())
  with pytest.raises(DataError, match=r"arms \['nope'\] are not arms of both"):
    study_runner.run(c, str(work), replicate=str(tmp_path / "earlier"), only=["sad", "nope"])
  text = study_runner.run(c, str(work), replicate=str(tmp_path / "earlier"), only=["sad", "sft"])
  out = capsys.readouterr().out
  assert "replicating" in out and "sad 2 steps × 1 seeds, sft 2 steps × 1 seeds" in out
  assert "[6/8] cells on the dev fold: none" in out and "steps in" not in out
  assert "Every student figure of this run lies inside the earlier run's 95% interval." in text
  report = (work / "replication" / "report.md").read_text()
  assert "## Replication: this run against" in report and "(the same CPU model" in report
  assert "| sad − sft, points |" in report and "sad+pcgrad" not in report
  assert "2 (earlier run's dev)" in report
  assert "sad+pcgrad" in (work / "report.md").read_text()  # the study's own report is kept
  assert study_results.reference_run(str(work / "replication"))["chosen"] == {"sad": 2, "sft": 2}
  assert study_results.reference_run(str(work))["teacher_seed"] == int(kept[1])  # the kept draw
  meta = json.loads((work / "run.json").read_text())  # recorded, not read out of report.md
  assert meta["teacher_seed"] == int(kept[1]) and meta["cpu"] == cpu_model() and meta["env"] == c.env
  other = ml_collections.ConfigDict(c.to_dict())
  other.env = other.env.replace("numLocations=4", "numLocations=6")
  with pytest.raises(DataError, match="field 'env': the runs played different environments: twx:coin"):
    study_runner.run(other, str(tmp_path / "other"), replicate=str(tmp_path / "earlier"))

  # another teacher under the same paths: everything that learned from it is redone, the
  # store from scratch (its shards would resume) and each KD cell (its config names the
  # store only by path); each cell's inputs are recorded beside it
  assert json.loads((work / "cells" / "sad_s0_n2" / "study_inputs.json").read_text())[
      "teacher"] == json.loads((work / "store" / "train" / "study_teacher.json").read_text())[
      "model_mtime"]
  c3 = ml_collections.ConfigDict(c.to_dict())
  c3.teacher.steps = 3
  study_runner.run(c3, str(work))
  out = capsys.readouterr().out
  assert "teacher seed 0: the plan changed" in out
  assert "store train: " in out and "holds another teacher's or dataset's top-k" in out
  assert "sad_s0_n2: its inputs changed since it was trained (" in out
  assert "sad+pcgrad_s0_n2: already trained" not in out
  study_runner.run(c, str(work))  # and back: the first teacher's plan again, so all of it again
  assert "sad_s0_n2: its inputs changed" in capsys.readouterr().out

  # --teachers: the two draws (trained and played above) are tabled, nothing is retrained,
  # and best-of-2 keeps the draw the study kept
  with pytest.raises(DataError, match="--teachers trains no students"):
    study_runner.run(c, str(work), teachers_only=True, seeds=1)
  text = study_runner.run(c, str(work), teachers_only=True)
  out = capsys.readouterr().out
  assert "steps in" not in out and "episodes: success" not in out
  dev_won = {s: json.loads((work / d / "dev.json").read_text())["successes"]
             for s, d in ((0, "teacher"), (1, "teacher_s1"))}
  cand = {s: json.loads((work / d / "test.json").read_text())  # the retrained teachers'
          for s, d in ((0, "teacher"), (1, "teacher_s1"))}
  for s in (0, 1):
    assert (f"| {s} | {dev_won[s]}/2 | {100 * cand[s]['success_rate']:.1f}% "
            f"({cand[s]['successes']}/2) |") in text
  summary = json.loads((work / "teacher_draws.json").read_text())
  assert summary["range_coverage"] == pytest.approx(1 / 3)
  assert summary["best_of_k"]["2"]["mean"] == cand[stats.best_draw(dev_won)]["success_rate"]
  assert (work / "teacher_draws.md").read_text() == text

  c2 = study_grid.train_config(c, str(work / "prepared" / "train"), objective="sft",
                          model=c.student.model, steps=3, seed=0, lr=c.student.lr)
  run = str(work / "cells" / "sft_s0_n2")
  study_cache.train("sft_s0_n2", run, c2, 3)
  assert "the plan changed" in capsys.readouterr().out
  # a run from before a config key existed (the key is missing from its config.json) is
  # still the same plan; a key whose value differs is not (above)
  cfg_path = work / "cells" / "sft_s0_n2" / "config.json"
  old = json.loads(cfg_path.read_text())
  del old["model.attention"]
  cfg_path.write_text(json.dumps(old))
  assert not study_cache.train("sft_s0_n2", run, c2, 3)
  assert "config keys added since: model.attention" in capsys.readouterr().out
  # a cell trained with another attention kernel (the same computation) is the same plan
  old["model.attention"] = "reference"
  cfg_path.write_text(json.dumps(old))
  assert not study_cache.train("sft_s0_n2", run, c2, 3)
  assert "trained with attention 'reference'" in capsys.readouterr().out

  # a signal during a run stops the study (later stages need the export), and a rerun
  # resumes it: the signal arrives as training starts, so one step is saved
  from sad_jax.trainer import train as train_lib

  install = train_lib._install_signal_handlers

  def signalled(stop):
    previous = install(stop)
    stop["signal"] = "SIGTERM"
    return previous

  monkeypatch.setattr(train_lib, "_install_signal_handlers", signalled)
  run = str(work / "cells" / "interrupted")
  with pytest.raises(SystemExit, match=r"interrupted stopped at step 1 of 3 \(preempted\)"):
    study_cache.train("interrupted", run, c2, 3)
  assert not study_cache.trained(run, 3)
  monkeypatch.setattr(train_lib, "_install_signal_handlers", install)
  assert study_cache.train("interrupted", run, c2, 3) and study_cache.trained(run, 3)


def test_run_metadata_is_read_from_run_json_not_scraped(tmp_path):
  """A run records its CPU, environment and teacher seed in run.json; report.md's text is
  read only for runs written before run.json (the committed docs/study ones)."""
  folder = write_run(tmp_path / "r", teacher_seed=3, won={"sad": [[1, 0]], "teacher": [[1, 1]]})
  old = study_results.reference_run(folder)
  assert (old["cpu"], old["env"], old["teacher_seed"]) == ("Test CPU", "twx:coin?numLocations=4", 3)
  (tmp_path / "r" / "run.json").write_text(json.dumps(
      {"cpu": "Other CPU", "cores": 2, "env": "twx:coin?numLocations=6", "teacher_seed": 5}))
  new = study_results.reference_run(folder)
  assert (new["cpu"], new["env"], new["teacher_seed"]) == ("Other CPU", "twx:coin?numLocations=6", 5)
  (tmp_path / "r" / "run.json").write_text("{}")
  with pytest.raises(DataError, match=r"run.json.*cannot read the run's metadata"):
    study_results.reference_run(folder)
