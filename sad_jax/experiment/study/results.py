"""Results of a run, as recorded: the reference run read back, won-game matrices paired
by game, and the comparisons between arms."""

from __future__ import annotations

import json
import os

import numpy as np

from sad_jax.common.errors import DataError
from sad_jax.experiment import stats


def _results_path(path: str) -> str:
  if not os.path.isdir(path):
    return path
  for name in ("results.jsonl", "results.jsonl.gz"):
    if os.path.exists(os.path.join(path, name)):
      return os.path.join(path, name)
  raise DataError("no results.jsonl or results.jsonl.gz here: not a study's output folder",
                  path=path)


def reference_run(path: str, split: str = "test") -> dict:
  """An earlier run of a study, to replicate (`--replicate`): its results.jsonl[.gz] or the
  folder holding it. Returns each arm's test budget and seeds, each model's [seeds, games]
  outcomes on `split` (test, or test_rewritten: the counterfactual fold; the teacher as
  "teacher"), the games, and the CPU its report.md names."""
  import gzip

  path = _results_path(path)
  cells: dict[str, dict] = {}
  opener = gzip.open if path.endswith(".gz") else open
  try:
    with opener(path, "rt", encoding="utf-8") as f:
      for i, line in enumerate(f, 1):
        try:
          r = json.loads(line)
        except json.JSONDecodeError as e:
          raise DataError(f"not JSON: {e.msg}", path=path, record=i) from None
        for key in ("cell", "arm", "seed", "steps", "split", "task", "won"):
          if key not in r:
            raise DataError("missing", path=path, record=i, field=key)
        if r["split"] != split:
          continue
        cell = cells.setdefault(r["cell"], {"arm": r["arm"], "seed": r["seed"],
                                            "steps": r["steps"], "games": []})
        cell["games"].append((r["task"], bool(r["won"])))
  except (OSError, EOFError, UnicodeDecodeError) as e:  # also a cut or non-gzip .gz
    raise DataError(f"cannot read: {getattr(e, 'strerror', None) or e}", path=path) from None
  by_arm: dict[str, list[dict]] = {}
  for c in cells.values():
    by_arm.setdefault(c["arm"], []).append(c)
  if "teacher" not in by_arm:
    raise DataError(f"no teacher {split} games: not a finished study's results" + (
        " (or one without the counterfactual fold: eval.test_rewrite)"
        if split != "test" else ""), path=path, field="arm")
  tasks = {tuple(t for t, _ in c["games"]) for c in cells.values()}
  if len(tasks) != 1:
    raise DataError(f"its models did not play the same {split} games", path=path,
                    field="task")
  chosen, seeds, won = {}, {}, {}
  for arm, cs in by_arm.items():
    steps = {c["steps"] for c in cs}
    if len(steps) != 1:
      raise DataError(f"arm {arm} has test cells at several budgets: {sorted(steps)}",
                      path=path, field="steps")
    cs.sort(key=lambda c: -1 if c["seed"] is None else c["seed"])
    won[arm] = np.array([[float(w) for _, w in c["games"]] for c in cs])
    if arm != "teacher":
      chosen[arm], seeds[arm] = int(steps.pop()), [int(c["seed"]) for c in cs]
  cpu, env, teacher = _run_meta(os.path.dirname(path))
  return {"path": path, "cpu": cpu, "env": env, "teacher_seed": teacher, "chosen": chosen,
          "seeds": seeds, "won": won,
          "tasks": list(next(iter(tasks)))}


RUN_META = "run.json"  # beside results.jsonl: the run's machine, environment and teacher seed


def _run_meta(folder: str) -> tuple[str, str, int]:
  """(CPU, environment, teacher seed) of a run: from its run.json; a run written before
  run.json existed has them only in its report.md's text, read as a fallback."""
  import re

  meta = os.path.join(folder, RUN_META)
  if os.path.exists(meta):
    try:
      with open(meta, encoding="utf-8") as f:
        m = json.load(f)
      return str(m["cpu"]), str(m["env"]), int(m["teacher_seed"])
    except (OSError, ValueError, KeyError, TypeError) as e:
      raise DataError(f"cannot read the run's metadata: {e}", path=meta) from None
  report = os.path.join(folder, "report.md")
  cpu = env = "not recorded"
  teacher = 0  # reports from before the seed was a setting: the code always drew seed 0
  if os.path.exists(report):
    with open(report, encoding="utf-8") as f:
      text = f.read()
    if m := re.search(r"CPU: (.+?) \(\d+ cores\)", text):
      cpu = m.group(1)
    if m := re.search(r"Environment: `([^`]+)`", text):
      env = m.group(1)
    if m := re.search(r"parameters, seed\s+(\d+)\)", text):
      teacher = int(m.group(1))
  return cpu, env, teacher


def check_same_env(earlier: dict, env: str, path: str) -> None:
  """Refuses a run of another environment than `earlier` (a `reference_run`): coin with 4
  and 6 rooms share their task numbers. A run without its report.md is not checked."""
  if "not recorded" not in (earlier["env"], env) and earlier["env"] != env:
    raise DataError(f"the runs played different environments: {earlier['env']} "
                    f"({earlier['path']}) and {env}", path=path, field="env")


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
