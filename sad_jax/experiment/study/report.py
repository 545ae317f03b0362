"""The study's report.md, results.jsonl and plots."""

from __future__ import annotations

import collections
import datetime
import json
import os

import numpy as np

from sad_jax.agent import folds as fold_desc
from sad_jax.common import fileio
from sad_jax.common.fileio import atomic_write
from sad_jax.experiment import stats
from sad_jax.experiment.study.cells import Cell, invocations, output_dir
from sad_jax.experiment.study.grid import budget_source, teacher_seed
from sad_jax.experiment.study.replication import replication_table, replication_verdict
from sad_jax.experiment.study.results import (
  FOLDS_NOTE,
  PROCESSOR_NOTE,
  RUN_META,
  SPLITS_NOTE,
  TEACHER_NOTE,
  comparisons,
  results_lines,
  same_games,
  won_matrix,
)


def counterfactual(test: dict[str, np.ndarray], rewritten: dict[str, np.ndarray],
                   dev: dict[str, stats.Estimate], rules: list, *, reference: str = "",
                   rivals: list[str] = ()) -> str:
  """The counterfactual test fold's section: each model's success on the rewritten games
  and rewritten − test, paired over games and seeds (the same model, seed and game: the
  bootstrap resamples the per-game differences); then, given a reference, the comparisons
  on the rewritten fold (in-distribution games that no setting was chosen on)."""
  rows = ["| model | test success | rewritten test success | rewritten − test, points [95% CI] "
          "| dev success |", "|---|---:|---:|---:|---:|"]
  lines = []
  for name in rewritten:
    if rewritten[name].shape != test[name].shape:
      raise ValueError(f"{name}: the rewritten fold has {rewritten[name].shape} outcomes, "
                       f"the test fold {test[name].shape}")
  one_est, rew_est = stats.success(test), stats.success(rewritten)  # as the test table's
  for name in rewritten:
    one, rew = one_est[name], rew_est[name]
    diff = stats.success({name: rewritten[name] - test[name]})[name]
    rows.append(f"| {name} | {one.pct()} | {rew.pct()} | {diff.points()} | "
                f"{dev[name].pct() if name in dev else '–'} |")
    if diff.lo > 0:
      lines.append(f"{name}: the rewrite raises success")
    elif diff.hi < 0:
      lines.append(f"{name}: the rewrite lowers success")
  what = "; ".join(f"`{old}` → `{new}`" for old, new in rules)
  moved = ("; ".join(lines) + ". Others: no significant change.") if lines else (
      "No model's success changes significantly.")
  return f"""## Counterfactual test fold: the test games, their observations rewritten

The same test games, with every observation the agent reads rewritten ({what}): the text by
which these games differ from the training episodes, put back as training has it. The game,
its valid actions and its scoring are unchanged. If a dev–test gap comes from that text,
success here rises towards dev. Intervals: 95% bootstrap over games and seeds; the
difference is paired (the same model, seed and game). {moved}

""" + "\n".join(rows) + "\n\n" + (
      "On the rewritten games:\n\n" + comparisons(rewritten, reference, rivals,
                                                 fold="rewritten test")[0] + "\n\n"
      if reference else "")


def _arm_records(records, arm: str, steps: int) -> list[dict]:
  out = [r for r in records.values() if r["cell"]["arm"] == arm and r["cell"]["steps"] == steps]
  return sorted(out, key=lambda r: r["cell"]["seed"])


def _param_count(folder: str) -> int:
  import jax

  from sad_jax.models.checkpoint_io import load_model

  _, params = load_model(folder)
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


def write(work: str, c, *, arm_list, records: dict[str, dict], chosen: dict[str, int],
          curves: dict[str, dict[int, float]], teacher: dict, seconds: float,
          command: str, replication: dict | None = None,
          folds: dict[str, dict] | None = None) -> str:
  """report.md and results.jsonl. replication: the earlier run this one replicates
  (`reference_run`): its budgets were used, and the report compares against it."""
  lines = results_lines(records, teacher)
  out = output_dir(work, replication is not None)
  os.makedirs(out, exist_ok=True)
  with atomic_write(os.path.join(out, "results.jsonl")) as f:
    for line in lines:
      f.write(json.dumps(line) + "\n")
  when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
  _write_run_meta(out, c, teacher, command=command, when=when)

  names = [a.name for a in arm_list]
  test_evals = {a: [r["test"] for r in _arm_records(records, a, chosen[a])] for a in names}
  test_evals["teacher"] = [teacher["test"]]
  same_games(test_evals)
  test = {a: won_matrix(es) for a, es in test_evals.items()}
  est = stats.success(test)
  rivals = [n for n in names if n != c.reference] + ["teacher"]
  # dev success where the arm played dev (arms with a budget to choose)
  dev_evals = {a: [r["dev"] for r in rs] for a in names
               if (rs := _arm_records(records, a, chosen[a])) and all("dev" in r for r in rs)}
  dev_evals["teacher"] = [teacher["dev"]]
  same_games(dev_evals)
  dev_est = stats.success({a: won_matrix(es) for a, es in dev_evals.items()})

  first = _arm_records(records, c.reference, chosen[c.reference])[0]["cell"]
  s_folder = os.path.join(work, "cells", Cell(**first).name, "final")
  params = _param_count(teacher["folder"]), _param_count(s_folder)
  table = _test_table(c, arm_list, records, chosen, teacher, est, dev_est, params,
                      replication)
  dtable, verdicts = comparisons(test, c.reference, rivals)
  cf = _counterfactual_section(c, names, records, chosen, teacher, test, test_evals,
                               dev_est, rivals)
  ctable, curve_est = _curves_table(records, chosen, curves, replication)
  _plots(out, curve_est, est)
  fold_note = f"{FOLDS_NOTE} {fold_desc.describe(folds)}\n\n" if folds else ""
  opd = _opd_section(arm_list, records, chosen)
  md = _header(work, c, arm_list, records, teacher, params, command=command, when=when,
               seconds=seconds, fold_note=fold_note) + f"""## Test fold

{table}

{dtable}

Decision accuracy: on the teacher's successful dev-fold episodes, the model writes its own
thought and action after the recorded history; the share whose action equals the teacher's.
"forced" action accuracy reads the teacher's thought first, which names the action.

{cf}{opd}## Dev fold: success against training steps (budget chosen per arm: ←)

{ctable}

![learning curves](learning_curves.png)

![test success](test_success.png)
"""
  rep = ""
  if replication is not None:
    rep = _replication_section(replication, teacher, test, c.reference, rivals, verdicts)
  md += rep
  with atomic_write(os.path.join(out, "report.md")) as f:
    f.write(md)
  return (fold_note + table + "\n\n" + dtable + "\n" + "\n".join(verdicts) + rep
          + ("\n" + cf.rstrip() if cf else ""))


def _opd_section(arm_list, records: dict[str, dict], chosen: dict[str, int]) -> str:
  """What each on-policy arm spent (on-policy pays for rollouts and the teacher's scoring),
  and its rounds: dev success where evaluated, the rollouts' invalid-action rate and the
  reverse KL per turn, first round against last (the drift signal: KL up, success down)."""
  opd = [a for a in arm_list if a.objective == "opd"]
  if not opd:
    return ""
  cost = ["| arm | seeds | train steps | student tokens | teacher-scored tokens | teacher-"
          "written (guided) tokens | minutes: rollouts / scoring / updates / dev |",
          "|---|---:|---:|---:|---:|---:|---|"]
  curve = ["| arm | dev success by round (mean over seeds) | invalid actions in rollouts, "
           "first → last round | reverse KL per turn, first round | last round |",
           "|---|---|---|---|---|"]
  for a in opd:
    rs = [r["opd"] for r in _arm_records(records, a.name, chosen[a.name]) if "opd" in r]
    if not rs:
      continue
    spent = [r["spent"] for r in rs]

    def mean(key, scale=1.0, spent=spent):
      return float(np.mean([x.get(key, 0.0) for x in spent])) / scale
    cost.append(f"| {a.name} | {len(rs)} | {mean('train_steps'):.0f} | "
                f"{mean('generated_tokens', 1e3):.1f} k | {mean('teacher_tokens', 1e3):.1f} k | "
                f"{mean('guided_tokens', 1e3):.1f} k | " + " / ".join(
                    f"{mean(k, 60):.1f}" for k in ("rollout_s", "score_s", "update_s", "eval_s"))
                + " |")
    dev: dict[int, list[float]] = collections.defaultdict(list)
    for r in rs:
      for x in r["rounds"]:
        if "dev_success" in x:
          dev[x["round"] + 1].append(x["dev_success"])
    played = [[x for x in r["rounds"] if x["round"] >= 0] for r in rs]

    def per_turn(i, played=played):
      kl = np.asarray([[np.nan if v is None else v for v in p[i]["rkl_per_turn"]]
                       for p in played if p], float)
      return "[" + ", ".join("–" if np.isnan(v) else f"{v:.2f}"
                             for v in np.nanmean(kl, 0)) + "]" if kl.size else "–"
    inv = [np.mean([p[i]["invalid_rate"] for p in played if p]) for i in (0, -1)]
    curve.append(f"| {a.name} | " + ", ".join(f"r{k} {np.mean(v):.2f}"
                                                for k, v in sorted(dev.items()))
                 + f" | {inv[0]:.2f} → {inv[1]:.2f} | {per_turn(0)} | {per_turn(-1)} |")
  return ("## On-policy rounds: what each arm spent, and how its rounds went\n\n"
          "Means over each arm's seeds (its cells' `rounds.jsonl`). Round 0 is the starting "
          "model; dev success is greedy on the dev games; the invalid-action rate and the "
          "sampled reverse KL per turn index (nats per token) are the rollouts' own "
          "(temperature 1).\n\n" + "\n".join(cost) + "\n\n" + "\n".join(curve) + "\n\n")


def _write_run_meta(out: str, c, teacher: dict, *, command: str, when: str) -> None:
  """run.json beside results.jsonl: what a later replication or pool reads about this run
  (`results.reference_run`), recorded rather than read back out of report.md."""
  import jax

  from sad_jax.trainer import metrics

  fileio.json_dump(os.path.join(out, RUN_META), {
      "cpu": metrics.cpu_model(), "cores": os.cpu_count(), "env": c.env,
      "teacher_seed": int(teacher.get("seed", teacher_seed(c))), "jax": jax.__version__,
      "command": command, "date": when}, indent=1)


def _test_table(c, arm_list, records: dict[str, dict], chosen: dict[str, int], teacher: dict,
                est: dict, dev_est: dict, params: tuple[int, int],
                replication: dict | None) -> str:
  """The test fold's table: one row per arm at its chosen budget, then the teacher."""
  t_params, s_params = params
  how = {a.name: "earlier run's dev" if replication else budget_source(a, c.reference)
         for a in arm_list}
  rows = ["| model | objective | steps (chosen by) | params | test success [95% CI] | per seed "
          "| dev success | decision acc (dev) | reason KL (dev) | action acc, forced (dev) "
          "| mean turns | invalid actions |",
          "|---|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|"]

  def span(rs, key):
    return float(np.mean([r["spans"][key] for r in rs]))

  for a in arm_list:
    rs = _arm_records(records, a.name, chosen[a.name])
    per_seed = " / ".join(f"{100 * r['test']['success_rate']:.0f}" for r in rs)
    rows.append(
        f"| {a.name} | {a.objective} | {chosen[a.name]} ({how[a.name]}) | "
        f"{s_params / 1e6:.2f} M | "
        f"{est[a.name].pct()} | {per_seed} | "
        f"{dev_est[a.name].pct() if a.name in dev_est else '–'} | "
        f"{span(rs, 'decision_accuracy'):.3f} | {span(rs, 'reason_kl'):.3f} | "
        f"{span(rs, 'action_accuracy'):.3f} | "
        f"{np.mean([r['test']['mean_steps'] for r in rs]):.2f} | "
        f"{100 * np.mean([r['test']['invalid_action_rate'] for r in rs]):.0f}% |")
  ts = teacher["spans"]
  rows.append(f"| teacher | sft on expert | {c.teacher.steps} (config) | "
              f"{t_params / 1e6:.2f} M | "
              f"{est['teacher'].pct()} | – | {dev_est['teacher'].pct()} | "
              f"{ts['decision_accuracy']:.3f} | {ts['reason_kl']:.3f} | "
              f"{ts['action_accuracy']:.3f} | {teacher['test']['mean_steps']:.2f} | "
              f"{100 * teacher['test']['invalid_action_rate']:.0f}% |")
  return "\n".join(rows)


def _counterfactual_section(c, names: list[str], records: dict[str, dict],
                            chosen: dict[str, int], teacher: dict, test: dict,
                            test_evals: dict, dev_est: dict, rivals: list[str]) -> str:
  """The counterfactual fold's section: the same games with their text rewritten."""
  if "test_rewritten" not in teacher:
    return ""
  rew_evals = {a: [r["test_rewritten"] for r in _arm_records(records, a, chosen[a])]
               for a in names}
  rew_evals["teacher"] = [teacher["test_rewritten"]]
  same_games({**test_evals, **{f"{a} (rewritten)": es for a, es in rew_evals.items()}})
  rewritten = {a: won_matrix(rew_evals[a]) for a in test}  # in the test table's order
  return counterfactual(test, rewritten, dev_est, teacher["test_rewritten"]["rewrite"],
                        reference=c.reference, rivals=rivals)


def _curves_table(records: dict[str, dict], chosen: dict[str, int], curves: dict,
                  replication: dict | None) -> tuple[str, dict[str, dict[int, stats.Estimate]]]:
  """Learning curves on dev: each budget of the arms that had their own."""
  crows = ["| arm | " + " | ".join(f"{n} steps" for n in sorted({n for v in curves.values()
                                                                    for n in v})) + " |"]
  budgets = sorted({n for v in curves.values() for n in v})
  crows.append("|---|" + "---:|" * len(budgets))
  curve_est: dict[str, dict[int, stats.Estimate]] = {}
  for arm in curves:
    curve_est[arm] = {}
    cells = []
    for n in budgets:
      rs = _arm_records(records, arm, n)
      if rs:
        curve_est[arm][n] = stats.success({arm: won_matrix([r["dev"] for r in rs])})[arm]
        cells.append(curve_est[arm][n].pct(0) + (" ←" if n == chosen[arm] else ""))
      else:
        cells.append("–")
    crows.append(f"| {arm} | " + " | ".join(cells) + " |")
  ctable = "\n".join(crows) if curves else (
      "No dev cells: this run replicates the earlier run's budgets, which its dev fold chose."
      if replication else
      "No arm had budgets to choose between: each arm trained for its one budget.")
  top = [f"{arm} ({max(curve)} steps)" for arm, curve in curves.items()
         if len(curve) > 1 and chosen[arm] == max(curve)]
  if top:  # `more_budgets` ran out: the study cannot say where these curves flatten
    ctable += ("\n\n**Not flattened:** best at the largest budget trained: "
               f"{', '.join(top)}. A larger budget may do better on dev.")
  return ctable, curve_est


def _header(work: str, c, arm_list, records: dict[str, dict], teacher: dict,
            params: tuple[int, int], *, command: str, when: str, seconds: float,
            fold_note: str) -> str:
  """The report's opening: command, machine, wall time, environment, teacher, protocol."""
  from sad_jax.trainer import metrics

  t_params, s_params = params
  cpus = collections.Counter(r.get("trained_on", "not recorded") for r in records.values())
  trained_on = "; ".join(f"{k}: {v} cells" for k, v in sorted(cpus.items()))
  n_seeds = {a.name: len(a.seeds) for a in arm_list}
  primary = ", ".join(a.name for a in arm_list if a.objective in ("token_kd", "sft")) or "none"
  before = invocations(work)
  total = (sum(x["seconds"] for x in before) + seconds) / 60
  import jax

  protocol = ("the teacher's own successful train-fold episodes (the method's protocol)"
              if c.protocol == "teacher" else "the expert's (oracle's) trajectories: the "
              "oracle condition, not the method's protocol")
  cands = teacher.get("candidates") or {}
  chosen_teacher = (f" (kept as the best on dev of {len(cands)} draws; dev games won: "
                    + ", ".join(f"seed {s} {n}/{c.eval.dev_games}" for s, n in cands.items())
                    + "; its dev figure below is therefore optimistic; on the test fold, "
                    "not used to choose: " + ", ".join(
                        f"seed {s} {100 * t['success_rate']:.1f}%"
                        for s, (_, t) in (teacher.get("scores") or {}).items())
                    + ")" if cands else "")
  return f"""# sad-jax study: {c.name}

Command: `{command}` · {when} · CPU: {metrics.cpu_model()} ({os.cpu_count()} cores) ·
jax {jax.__version__} · wall time: this invocation {seconds / 60:.1f} min, all
{len(before) + 1} recorded invocations {total:.1f} min (a rerun skips the stages it finds
done; each cell's own times are in its run folder).

Environment: `{c.env}`. The teacher ({t_params / 1e6:.2f} M parameters, seed
{teacher.get('seed', teacher_seed(c))}) is trained
{c.teacher.steps} steps on {c.expert.episodes} expert episodes{chosen_teacher}; the students
({s_params / 1e6:.2f} M, {t_params / s_params:.1f}× fewer) learn from {protocol}, with the
teacher's top-{c.store_k} log-probs on reason and action tokens. Every model plays the same
{c.eval.test_games} test-fold games (and {c.eval.dev_games} dev-fold games), up to
{c.eval.max_steps} turns each; seeds per arm: {n_seeds}.

{SPLITS_NOTE} Intervals: 95% bootstrap over games (shared by all models: differences are
paired) and seeds. A ranking is written only where a difference's interval excludes zero.
The primary comparisons are {c.reference} against the flat objectives ({primary}); the
others are secondary: each interval is 95% on its own, with no correction for the number of
comparisons.

{fold_note}{PROCESSOR_NOTE} Students trained on: {trained_on}. {TEACHER_NOTE}

"""


def _replication_section(replication: dict, teacher: dict, test: dict, reference: str,
                         rivals: list[str], verdicts: list[str]) -> str:
  """This run against the earlier one it replicates (its verdict joins `verdicts`)."""
  from sad_jax.trainer import metrics

  if replication["tasks"] != [g["task"] for g in teacher["test"]["games"]]:
    from sad_jax.common.errors import DataError

    raise DataError("this run played other test games: a replication needs the same games "
                    "(eval.test_games, env)", path=replication["path"], field="task")
  rtable, found = replication_table(replication["won"], test, reference, rivals)
  here, there = metrics.cpu_model(), replication["cpu"]
  verdict = replication_verdict(found)
  rep = f"""
## Replication: this run against `{replication['path']}`

The earlier run trained on {there}; this one on {here}{
  ' (the same CPU model: not a second processor)' if here == there else ''}. The same
{len(replication['tasks'])} test games; each arm at the earlier run's budget (chosen on its
dev fold) and seeds. "this − earlier" is paired over the games; the seeds are separate
draws, so it carries both runs' seed noise. {verdict}

{rtable}
"""
  verdicts.append(verdict)
  return rep


def _plots(work: str, curves: dict[str, dict[int, stats.Estimate]],
           est: dict[str, stats.Estimate]) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(6, 4))
  for arm, pts in curves.items():
    xs = sorted(pts)
    ys = [100 * pts[x].mean for x in xs]
    err = [[100 * (pts[x].mean - pts[x].lo) for x in xs], [100 * (pts[x].hi - pts[x].mean)
                                                            for x in xs]]
    ax.errorbar(xs, ys, yerr=err, marker="o", capsize=4, label=arm)
  if not curves:
    ax.text(0.5, 0.5, "no arm had budgets to choose between", ha="center",
            transform=ax.transAxes)
  ax.set_xlabel("training steps")
  ax.set_ylabel("dev-fold success (%)")
  ax.set_ylim(0, 100)
  if curves:
    ax.legend()
  ax.set_title("Learning curves (95% bootstrap intervals)")
  fig.tight_layout()
  fig.savefig(os.path.join(work, "learning_curves.png"), dpi=90)
  plt.close(fig)
  fig, ax = plt.subplots(figsize=(7, 4))
  names = list(est)
  ax.bar(names, [100 * est[n].mean for n in names],
         yerr=[[100 * (est[n].mean - est[n].lo) for n in names],
               [100 * (est[n].hi - est[n].mean) for n in names]], capsize=6)
  ax.set_ylabel("test-fold success (%)")
  ax.set_ylim(0, 100)
  ax.set_title("Success, 95% bootstrap over games and seeds")
  plt.setp(ax.get_xticklabels(), rotation=20)
  fig.tight_layout()
  fig.savefig(os.path.join(work, "test_success.png"), dpi=90)
  plt.close(fig)
