"""A replication against an earlier run: this − earlier from one bootstrap of both."""

from __future__ import annotations

import numpy as np

from sad_jax.common.errors import DataError
from sad_jax.experiment import stats
from sad_jax.experiment.study.results import check_same_env, reference_run


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

  a, b = reference_run(earlier), reference_run(this)
  if a["tasks"] != b["tasks"]:
    raise DataError(f"the runs played different test games than {a['path']}", path=b["path"],
                    field="task")
  if reference not in a["won"] or reference not in b["won"]:
    raise DataError(f"the reference arm {reference!r} is not in both runs", path=b["path"],
                    field="arm")
  recorded = "not recorded" not in (a["env"], b["env"])
  check_same_env(a, b["env"], b["path"])
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
