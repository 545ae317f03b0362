"""Runs with different teacher draws pooled, with a bootstrap over games, teachers and seeds."""

from __future__ import annotations

import numpy as np

from sad_jax.common.errors import DataError
from sad_jax.experiment import stats
from sad_jax.experiment.study.results import check_same_env, reference_run


def pool_runs(paths: list[str], *, reference: str = "sad", split: str = "test") -> str:
  """Runs of one study that differ in the teacher's draw (`--config.teacher.seed=N`), pooled:
  each model's success and each paired difference with a 95% interval over games, teacher
  draws and seeds (`sad-jax pool-runs`). One run's intervals hold its one teacher fixed;
  these include how much another teacher draw moves every figure."""

  if len(paths) < 2:
    raise DataError("pool-runs needs two runs or more (one per teacher draw)", field="runs")
  runs = [reference_run(p, split) for p in paths]
  first = runs[0]
  for r in runs[1:]:
    if r["tasks"] != first["tasks"]:
      raise DataError(f"the runs played different test games than {first['path']}",
                      path=r["path"], field="task")
    check_same_env(first, r["env"], r["path"])
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
