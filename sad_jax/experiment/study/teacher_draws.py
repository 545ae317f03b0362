"""teacher_draws.md: the spread of the teacher recipe's draws and what best-of-k keeps."""

from __future__ import annotations

import datetime
import json
import os

import numpy as np

from sad_jax.common.fileio import atomic_write
from sad_jax.experiment import stats
from sad_jax.experiment.study.cells import invocations
from sad_jax.experiment.study.results import PROCESSOR_NOTE


def teacher_draws(work: str, c, info: dict, *, command: str, seconds: float) -> str:
  """`sad-jax study --teachers`: every teacher draw's dev and test success, how far they
  spread, and what keeping the best on dev of k draws (`teacher.draws = k`) gives on test.
  A study's intervals hold its one teacher fixed; this is the teacher's own variance, the
  range a second machine's teacher (another draw) should be judged against. Writes
  teacher_draws.md and teacher_draws.json in `work`."""
  import jax

  from sad_jax.trainer import metrics

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
  before = [x for x in invocations(work)
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
