"""The study's outputs: results.jsonl (one line per cell and game), report.md with
bootstrap intervals and paired differences, and plots."""

from __future__ import annotations

import collections
import datetime
import json
import os

import numpy as np

from sad_jax import stats, study
from sad_jax.agent import folds as fold_desc
from sad_jax.fileio import atomic_write

SPLITS_NOTE = ("Settings (each arm's training budget) were chosen on the dev fold; "
               "success figures below are test-fold games unless marked dev.")
PROCESSOR_NOTE = ("Exact figures depend on the processor: XLA's CPU kernels differ between "
                  "CPUs (e.g. AVX-512 against AVX2 reduction orders), so the same command "
                  "trains slightly different models elsewhere. Read the intervals, not the "
                  "digits; a rerun of the same code on this machine gives the same numbers.")

FOLDS_NOTE = ("What the folds measure (against the students' training episodes; a fold whose "
              "games begin as training episodes began tests the seen distribution, one with "
              "unseen sentences tests generalisation, so a dev–test gap is expected there "
              "and dev choices may not carry over):")
TEACHER_NOTE = ("One teacher (one random draw) serves every arm: the comparisons between "
                "students are paired on it, but its own level, and the teacher–student gap, "
                "vary between draws by more than these intervals, which do not include it.")


def won_matrix(evals: list[dict]) -> np.ndarray:
  """[seeds, games] outcomes; every evaluation must have played the same games in order."""
  tasks = [tuple(g["task"] for g in e["games"]) for e in evals]
  if len(set(tasks)) != 1:
    raise ValueError("the evaluations did not play the same games")
  return np.array([[float(g["won"]) for g in e["games"]] for e in evals])


def same_games(evals: dict[str, list[dict]]) -> None:
  """Every model's evaluations played the same games in the same order (the pairing)."""
  tasks = {name: {tuple(g["task"] for g in e["games"]) for e in es} for name, es in evals.items()}
  mixed = sorted(name for name, t in tasks.items() if len(t) > 1)
  if mixed:
    raise ValueError(f"the seeds of {', '.join(mixed)} did not play the same games")
  first = next(iter(tasks), None)
  odd = sorted(name for name, t in tasks.items() if t != tasks[first])
  if odd:
    raise ValueError(f"models did not play the same games: {', '.join(odd)} differ from "
                     f"{first}")


def comparisons(won: dict[str, np.ndarray], reference: str, rivals: list[str], *,
                fold: str = "test") -> tuple[str, list[str]]:
  """The paired differences reference − rival: a markdown table and its verdict lines."""
  diffs = stats.paired_differences(won, [(reference, n) for n in rivals])
  rows = [f"| comparison ({fold}) | difference, points [95% CI] | verdict |", "|---|---:|---|"]
  lines = []
  for (a, b), d in diffs.items():
    v = stats.verdict(a, b, d)
    lines.append(f"{a} − {b}: {d.points()} → {v}")
    rows.append(f"| {a} − {b} | {d.points()} | {v} |")
  return "\n".join(rows), lines


def replication_table(earlier: dict[str, np.ndarray], here: dict[str, np.ndarray], reference: str,
                      rivals: list[str]) -> tuple[str, dict[str, list[str]]]:
  """This run against an earlier run of the same study (another CPU), on the same games.

  For each model's success and each difference reference − rival: both runs' figures (each
  interval as its own report printed it), whether this run's figure lies inside the earlier
  interval, and this − earlier with its 95% interval from one bootstrap of both runs (games
  drawn once, so paired; each run's seeds drawn apart, as they are separate draws). For a
  difference, this − earlier is a difference of differences. Returns the markdown table
  and the findings: "outside" (figures outside the earlier interval) and "shifted" (this −
  earlier excludes 0), for the students; "teacher" for the rows that hold the teacher, one
  draw in each run, whose intervals hold only the games' noise."""
  models = [m for m in (reference, *rivals) if m in earlier and m in here]
  est_earlier, est_here = stats.success(earlier), stats.success(here)
  draws = stats.replicates({**{f"earlier {m}": earlier[m] for m in models},
                            **{f"this {m}": here[m] for m in models}})

  def shift(a: str, b: str | None = None) -> stats.Estimate:
    point = np.mean(here[a]) - np.mean(earlier[a])
    d = draws[f"this {a}"] - draws[f"earlier {a}"]
    if b is not None:
      point -= np.mean(here[b]) - np.mean(earlier[b])
      d = d - (draws[f"this {b}"] - draws[f"earlier {b}"])
    return stats.interval(float(point), d)

  pairs = [(reference, m) for m in models if m != reference]
  d_earlier = stats.paired_differences(earlier, pairs)
  d_here = stats.paired_differences(here, pairs)
  rows = ["| figure (test) | earlier run [95% CI] | this run [95% CI] | inside the earlier "
          "interval | this − earlier, paired [95% CI] |", "|---|---:|---:|---|---:|"]
  found: dict[str, list[str]] = {"outside": [], "shifted": [], "teacher": []}

  def note(name: str, ok: bool, s: stats.Estimate, text: str) -> str:
    teacher = "teacher" in name
    if teacher:
      found["teacher"].append(f"{name} {text} (this − earlier {s.points()})")
    elif not ok:
      found["outside"].append(f"{name} {text}")
    if not teacher and (s.lo > 0 or s.hi < 0):
      found["shifted"].append(f"{name} {s.points()}")
    return "yes" if ok else "**no**"

  for m in models:
    e, h, s = est_earlier[m], est_here[m], shift(m)
    ok = e.lo <= h.mean <= e.hi
    mark = note(m, ok, s, f"{100 * h.mean:.1f}% (earlier {e.pct()})")
    label = f"{m} success" + (" (one draw each)" if m == "teacher" else "")
    rows.append(f"| {label} | {e.pct()} | {h.pct()} | {mark} | {s.points()} |")
  for a, b in pairs:
    e, h, s = d_earlier[(a, b)], d_here[(a, b)], shift(a, b)
    ok = e.lo <= h.mean <= e.hi
    mark = note(f"{a} − {b}", ok, s, f"{h.points()} (earlier {e.points()})")
    same = stats.verdict(a, b, e) == stats.verdict(a, b, h)
    rows.append(f"| {a} − {b}, points | {e.points()} → {stats.verdict(a, b, e)} | {h.points()} "
                f"→ {stats.verdict(a, b, h)}{'' if same else ' (verdict differs)'} | "
                f"{mark} | {s.points()} |")
  return "\n".join(rows), found


def replication_verdict(found: dict[str, list[str]]) -> str:
  """The findings in words: the students' figures, then the teacher's (one draw each)."""
  out, shifted, teacher = found["outside"], found["shifted"], found["teacher"]
  text = (f"{len(out)} of the students' figures lie outside the earlier run's 95% intervals: "
          + "; ".join(out) + "." if out else
          "Every student figure of this run lies inside the earlier run's 95% interval.")
  text += (" This − earlier excludes zero for " + "; ".join(shifted) + "." if shifted else
           " No student figure's this − earlier interval excludes zero.")
  text += (" Each interval is 95% on its own, with no correction for the number of rows.")
  if teacher:
    text += (" The teacher rows compare one teacher with another (one random draw each; "
             "their intervals hold only the games' noise, and every student learned from its "
             "run's teacher): " + "; ".join(teacher) + ".")
  return text


def compare_runs(earlier: str, this: str, *, reference: str = "sad") -> str:
  """Two finished runs of one study (e.g. two CPUs), each at its own chosen budgets: the
  replication table of `this` against `earlier` (`sad-jax compare-runs`)."""
  from sad_jax.errors import DataError

  a, b = study.reference_run(earlier), study.reference_run(this)
  if a["tasks"] != b["tasks"]:
    raise DataError(f"the runs played different test games than {a['path']}", path=b["path"],
                    field="task")
  if reference not in a["won"] or reference not in b["won"]:
    raise DataError(f"the reference arm {reference!r} is not in both runs", path=b["path"],
                    field="arm")
  recorded = "not recorded" not in (a["env"], b["env"])
  study.check_same_env(a, b["env"], b["path"])
  only = [f"{m} (only in {'earlier' if m in a['won'] else 'this'})"
          for m in sorted(set(a["won"]) ^ set(b["won"]))]
  # the flat objectives first, then the reference's variants (its ablations)
  rivals = sorted((m for m in a["won"] if m not in (reference, "teacher") and m in b["won"]),
                  key=lambda m: (m.startswith(reference + "+"), m))
  table, found = replication_table(a["won"], b["won"], reference, [*rivals, "teacher"])
  budgets = ", ".join(f"{m} {a['chosen'][m]} → {b['chosen'][m]} steps" for m in
                      [reference, *rivals])
  seeds = ", ".join(f"{m} {len(a['seeds'][m])} → {len(b['seeds'][m])}" for m in
                    [reference, *rivals])
  return f"""# `{b['path']}` against `{a['path']}`

Earlier run trained on {a['cpu']}; this run on {b['cpu']}. The same {len(a['tasks'])} test
games{'' if recorded else ' (the environment was not checked: a report.md is missing)'}.
Each run at its own budgets (earlier → this: {budgets}) and seeds ({seeds}).{
    ' Not compared: ' + ', '.join(only) + '.' if only else ''}
"this − earlier" is paired over the games; the seeds are separate draws.
{replication_verdict(found)}

{table}
"""


def pool_runs(paths: list[str], *, reference: str = "sad", split: str = "test") -> str:
  """Runs of one study that differ in the teacher's draw (`--config.teacher.seed=N`), pooled:
  each model's success and each paired difference with a 95% interval over games, teacher
  draws and seeds (`sad-jax pool-runs`). One run's intervals hold its one teacher fixed;
  these include how much another teacher draw moves every figure."""
  from sad_jax.errors import DataError

  if len(paths) < 2:
    raise DataError("pool-runs needs two runs or more (one per teacher draw)", field="runs")
  runs = [study.reference_run(p, split) for p in paths]
  first = runs[0]
  for r in runs[1:]:
    if r["tasks"] != first["tasks"]:
      raise DataError(f"the runs played different test games than {first['path']}",
                      path=r["path"], field="task")
    study.check_same_env(first, r["env"], r["path"])
  by_seed: dict[int, str] = {}
  for r in runs:
    if r["teacher_seed"] in by_seed:
      raise DataError(f"two runs have teacher seed {r['teacher_seed']} (also "
                      f"{by_seed[r['teacher_seed']]}): one teacher draw counted twice",
                      path=r["path"], field="teacher seed")
    by_seed[r["teacher_seed"]] = r["path"]
  common = set.intersection(*(set(r["won"]) for r in runs))
  if reference not in common:
    raise DataError(f"the reference arm {reference!r} is not in every run", path=paths[0],
                    field="arm")
  rivals = sorted((m for m in common if m not in (reference, "teacher")),
                  key=lambda m: (m.startswith(reference + "+"), m))
  models = [reference, *rivals, "teacher"]
  won = {m: [r["won"][m] for r in runs] for m in models}
  est = stats.nested_success(won)
  diffs = stats.nested_differences(won, [(reference, m) for m in models[1:]])
  seeds = [r["teacher_seed"] for r in runs]
  label = "rewritten test" if split == "test_rewritten" else split
  rows = [f"| model | steps per teacher | seeds per teacher | {label} success over teacher "
          "draws [95% CI] | per teacher (seed " + " / ".join(map(str, seeds)) + ") |",
          "|---|---|---|---:|---|"]
  for m in models:
    steps = " / ".join(str(r["chosen"].get(m, "–")) for r in runs) if m != "teacher" else "–"
    n = " / ".join(str(len(r["seeds"][m])) for r in runs) if m != "teacher" else "1 each"
    per = " / ".join(f"{100 * np.mean(w):.1f}" for w in won[m])
    rows.append(f"| {m} | {steps} | {n} | {est[m].pct()} | {per} |")
  drows = [f"| comparison ({label}) | difference over teacher draws, points [95% CI] | per teacher "
           "| verdict |", "|---|---:|---|---|"]
  lines = []
  for (a, b), d in diffs.items():
    v = stats.verdict(a, b, d)
    per = " / ".join(f"{100 * (np.mean(x) - np.mean(y)):+.1f}" for x, y in zip(won[a], won[b]))
    drows.append(f"| {a} − {b} | {d.points()} | {per} | {v} |")
    lines.append(f"{a} − {b}: {d.points()} → {v}")
  left = sorted(set().union(*(set(r["won"]) for r in runs)) - common)
  primary = [f"{reference} − {m}" for m in rivals if not m.startswith(reference + "+")]
  fold = (f"{label} (the counterfactual fold: the test games, their observations rewritten)"
          if split == "test_rewritten" else split)
  return f"""# Pooled over teacher draws: {len(runs)} runs

Runs (teacher seed: folder · CPU): {'; '.join(f"{r['teacher_seed']}: `{r['path']}` · {r['cpu']}"
                                           for r in runs)}.
The same {len(first['tasks'])} {fold} games in every run. Each model's figure is the mean of its
per-teacher means (every teacher weighs the same, whatever its number of seeds). Intervals:
95% bootstrap over the games and the teacher draws (both shared by every model, so the
differences are paired on them) and the seeds within each teacher. A single run's interval
holds its teacher fixed; these also hold how far another teacher draw moves a figure, so
they are the ones a run with a new teacher should fall inside. Primary comparisons:
{', '.join(primary) or 'none'}; the rest are secondary (no correction for their number).{
    ' Not in every run (left out): ' + ', '.join(left) + '.' if left else ''}

{chr(10).join(rows)}

{chr(10).join(drows)}

{chr(10).join(lines)}
"""


def teacher_draws(work: str, c, info: dict, *, command: str, seconds: float) -> str:
  """`sad-jax study --teachers`: every teacher draw's dev and test success, how far they
  spread, and what keeping the best on dev of k draws (`teacher.draws = k`) gives on test.
  A study's intervals hold its one teacher fixed; this is the teacher's own variance, the
  range a second machine's teacher (another draw) should be judged against. Writes
  teacher_draws.md and teacher_draws.json in `work`."""
  import jax

  from sad_jax import metrics

  scores = info["scores"]
  seeds = sorted(scores)
  dev = [int(scores[s][0]["successes"]) for s in seeds]
  test = [float(scores[s][1]["success_rate"]) for s in seeds]
  rows = ["| seed | dev games won | test success | test invalid actions | test mean turns |",
          "|---:|---:|---:|---:|---:|"]
  for s, d, t in zip(seeds, dev, test):
    r = scores[s][1]
    rows.append(f"| {s} | {d}/{c.eval.dev_games} | {100 * t:.1f}% ({r['successes']}/"
                f"{r['episodes']}) | {100 * r['invalid_action_rate']:.0f}% | "
                f"{r['mean_steps']:.2f} |")
  n = len(seeds)
  summary = {"seeds": seeds, "dev_won": dev, "test_success": test,
             "dev_games": c.eval.dev_games, "test_games": c.eval.test_games}
  lines = []
  if n >= 2:
    cover = stats.draw_coverage(n)
    summary.update(test_mean=float(np.mean(test)), test_sd=float(np.std(test, ddof=1)),
                   test_range=[min(test), max(test)], range_coverage=cover)
    lines.append(f"Test success over the {n} draws: mean {100 * np.mean(test):.1f}%, SD "
                 f"{100 * np.std(test, ddof=1):.1f} points, range {100 * min(test):.1f}–"
                 f"{100 * max(test):.1f}%. Another draw of this recipe lies within that range "
                 f"with probability {cover:.0%}: (n − 1)/(n + 1) for n = {n} exchangeable "
                 "draws, with no assumption on their distribution (another seed here; a "
                 "teacher trained on another processor, if its kernels do not shift the "
                 "distribution).")
    krows = ["| draws k (best on dev kept) | kept teacher's test success: mean over all "
             "k-subsets | worst subset | subsets whose kept teacher wins under half the "
             "test games |", "|---:|---:|---:|---:|"]
    best_k = {}
    for k in range(1, min(n, 5) + 1):
      kept = stats.best_of_k(dev, test, k)
      best_k[k] = {"mean": float(kept.mean()), "min": float(kept.min()),
                   "under_half": float(np.mean(kept < 0.5)), "subsets": len(kept)}
      krows.append(f"| {k} | {100 * kept.mean():.1f}% | {100 * kept.min():.1f}% | "
                   f"{np.mean(kept < 0.5):.0%} of {len(kept)} |")
    summary["best_of_k"] = best_k
    lines += ["", "What `teacher.draws = k` would have kept, estimated from these draws (every "
              "k-subset, its best on dev; the mean is unbiased for k draws of this recipe):",
              "", *krows]
  when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
  # older lines lack the flag; their command names it
  before = [x for x in study.invocations(work)
            if x.get("teachers", "--teachers" in (x.get("command") or ""))]
  total = (sum(x["seconds"] for x in before) + seconds) / 60
  md = f"""# Teacher draws: {c.name}

Command: `{command}` · {when} · CPU: {metrics.cpu_model()} ({os.cpu_count()} cores) ·
jax {jax.__version__} · wall time: this invocation {seconds / 60:.1f} min, all {len(before) + 1}
recorded `--teachers` invocations {total:.1f} min (a rerun skips the draws it finds trained
and played, those a study trained too).

Environment: `{c.env}`. One recipe ({c.teacher.steps} steps of SFT at {c.teacher.lr} on the
same {c.expert.episodes} expert episodes and tokenizer), {n} seeds; each plays the same
{c.eval.dev_games} dev-fold and {c.eval.test_games} test-fold games. Nothing here chose
anything: the test column is each draw's own figure. {PROCESSOR_NOTE}

{chr(10).join(rows)}

{chr(10).join(lines)}
"""
  for name, text in (("teacher_draws.md", md),
                     ("teacher_draws.json", json.dumps(summary, indent=1) + "\n")):
    with atomic_write(os.path.join(work, name)) as f:
      f.write(text)
  return md


def results_lines(records: dict[str, dict], teacher: dict) -> list[dict]:
  lines = []
  for split in ("dev", "test", "test_rewritten"):
    if split in teacher:
      for g in teacher[split]["games"]:
        lines.append({"cell": "teacher", "arm": "teacher", "objective": "teacher", "seed": None,
                      "steps": None, "split": split, "task": g["task"], "won": g["won"],
                      "turns": g["steps"]})
    for name, r in sorted(records.items()):
      if split not in r:
        continue
      cell = r["cell"]
      for g in r[split]["games"]:
        lines.append({"cell": name, "arm": cell["arm"], "objective": cell["objective"],
                      "seed": cell["seed"], "steps": cell["steps"], "split": split,
                      "task": g["task"], "won": g["won"], "turns": g["steps"]})
  return lines


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
  (`study.reference_run`): its budgets were used, and the report compares against it."""
  from sad_jax import metrics

  lines = results_lines(records, teacher)
  out = study.output_dir(work, replication is not None)
  os.makedirs(out, exist_ok=True)
  with atomic_write(os.path.join(out, "results.jsonl")) as f:
    for line in lines:
      f.write(json.dumps(line) + "\n")

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
  dev = {a: won_matrix(es) for a, es in dev_evals.items()}
  dev_est = stats.success(dev)

  first = _arm_records(records, c.reference, chosen[c.reference])[0]["cell"]
  s_folder = os.path.join(work, "cells", study.Cell(**first).name, "final")
  t_params, s_params = _param_count(teacher["folder"]), _param_count(s_folder)

  how = {a.name: "earlier run's dev" if replication else study.budget_source(a, c.reference)
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
  table = "\n".join(rows)

  dtable, verdicts = comparisons(test, c.reference, rivals)
  cf = ""
  if "test_rewritten" in teacher:  # the counterfactual fold: the same games, text rewritten
    rew_evals = {a: [r["test_rewritten"] for r in _arm_records(records, a, chosen[a])]
                 for a in names}
    rew_evals["teacher"] = [teacher["test_rewritten"]]
    same_games({**test_evals, **{f"{a} (rewritten)": es for a, es in rew_evals.items()}})
    rewritten = {a: won_matrix(rew_evals[a]) for a in test}  # in the test table's order
    cf = counterfactual(test, rewritten, dev_est, teacher["test_rewritten"]["rewrite"],
                        reference=c.reference, rivals=rivals)

  # learning curves on dev: each budget of the arms that had their own
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

  _plots(out, curve_est, est)
  cpus = collections.Counter(r.get("trained_on", "not recorded") for r in records.values())
  trained_on = "; ".join(f"{k}: {v} cells" for k, v in sorted(cpus.items()))
  n_seeds = {a.name: len(a.seeds) for a in arm_list}
  primary = ", ".join(a.name for a in arm_list if a.objective in ("token_kd", "sft")) or "none"
  when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
  before = study.invocations(work)
  total = (sum(x["seconds"] for x in before) + seconds) / 60
  import jax

  protocol = ("the teacher's own successful train-fold episodes (the method's protocol)"
              if c.protocol == "teacher" else "the expert's (oracle's) trajectories: the "
              "oracle condition, not the method's protocol")
  fold_note = f"{FOLDS_NOTE} {fold_desc.describe(folds)}\n\n" if folds else ""
  cands = teacher.get("candidates") or {}
  chosen_teacher = (f" (kept as the best on dev of {len(cands)} draws; dev games won: "
                    + ", ".join(f"seed {s} {n}/{c.eval.dev_games}" for s, n in cands.items())
                    + "; its dev figure below is therefore optimistic; on the test fold, "
                    "not used to choose: " + ", ".join(
                        f"seed {s} {100 * t['success_rate']:.1f}%"
                        for s, (_, t) in (teacher.get("scores") or {}).items())
                    + ")" if cands else "")
  md = f"""# sad-jax study: {c.name}

Command: `{command}` · {when} · CPU: {metrics.cpu_model()} ({os.cpu_count()} cores) ·
jax {jax.__version__} · wall time: this invocation {seconds / 60:.1f} min, all
{len(before) + 1} recorded invocations {total:.1f} min (a rerun skips the stages it finds
done; each cell's own times are in its run folder).

Environment: `{c.env}`. The teacher ({t_params / 1e6:.2f} M parameters, seed
{teacher.get('seed', study.teacher_seed(c))}) is trained
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

## Test fold

{table}

{dtable}

Decision accuracy: on the teacher's successful dev-fold episodes, the model writes its own
thought and action after the recorded history; the share whose action equals the teacher's.
"forced" action accuracy reads the teacher's thought first, which names the action.

{cf}## Dev fold: success against training steps (budget chosen per arm: ←)

{ctable}

![learning curves](learning_curves.png)

![test success](test_success.png)
"""
  rep = ""
  if replication is not None:
    if replication["tasks"] != [g["task"] for g in teacher["test"]["games"]]:
      from sad_jax.errors import DataError

      raise DataError("this run played other test games: a replication needs the same games "
                      "(eval.test_games, env)", path=replication["path"], field="task")
    rtable, found = replication_table(replication["won"], test, c.reference, rivals)
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
  md += rep
  with atomic_write(os.path.join(out, "report.md")) as f:
    f.write(md)
  return (fold_note + table + "\n\n" + dtable + "\n" + "\n".join(verdicts) + rep
          + ("\n" + cf.rstrip() if cf else ""))


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
