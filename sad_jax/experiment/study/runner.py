"""`sad-jax study`: the stages, the cells and the report, in order."""

from __future__ import annotations

import dataclasses
import json
import os
import time

import ml_collections

from sad_jax.common.errors import DataError
from sad_jax.experiment.study import opd_cells
from sad_jax.experiment.study.cache import inputs_of, train
from sad_jax.experiment.study.cells import (
  _START,
  Cell,
  DevData,
  Inputs,
  _read,
  _say,
  _write,
  model_stamp,
  output_dir,
)
from sad_jax.experiment.study.evaluator import Evaluator, span_metrics
from sad_jax.experiment.study.grid import (
  arms,
  budget_source,
  cells_of,
  choose_budget,
  first_seeds,
  replication_arms,
  select_arms,
  still_rising,
  train_config,
)
from sad_jax.experiment.study.report import write
from sad_jax.experiment.study.results import check_same_env, reference_run
from sad_jax.experiment.study.stages import (
  _prepare,
  stage_counterfactual,
  stage_expert,
  stage_fold_shift,
  stage_store,
  stage_teacher,
  stage_teacher_data,
  tokenizer_of,
)
from sad_jax.experiment.study.teacher_draws import teacher_draws


def run_cell(work: str, c, cell: Cell, shared: Inputs, ev: Evaluator, splits: tuple[str, ...],
             index: str) -> dict:
  """Trains the cell (unless done) and plays it on `splits`; its record is cells/NAME.json."""
  student_store = shared.store
  run = os.path.join(work, "cells", cell.name)
  _say(f"[cell {index}] {cell.name}")
  if cell.objective == "opd":
    did_train = opd_cells.train(work, c, cell, shared)
  else:
    t = train_config(c, shared.dataset, objective=cell.objective, model=c.student.model,
                     steps=cell.steps, seed=cell.seed, lr=c.student.lr,
                     store=student_store if cell.objective != "sft" else "",
                     overrides=cell.overrides, curriculum=cell.curriculum)
    did_train = train(cell.name, run, t, cell.steps,
                      inputs=inputs_of(shared.dataset,
                                       student_store if cell.objective != "sft" else ""))
  folder = os.path.join(run, "final")
  rec_path = os.path.join(work, "cells", cell.name + ".json")
  rec = _read(rec_path) or {}
  stamp = model_stamp(folder)
  if rec.get("model_mtime") != stamp:
    rec = {"cell": dataclasses.asdict(cell), "model_mtime": stamp}
  if did_train:  # figures depend on the processor: say which one trained the model
    from sad_jax.trainer import metrics

    rec["trained_on"] = metrics.cpu_model()
  for split in splits:
    games = c.eval.dev_games if split == "dev" else c.eval.test_games
    rec[split] = ev.play(cell.name, folder, split, games,
                         os.path.join(work, "cells", cell.name, f"eval_{split}.json"))
  if "spans" not in rec:
    rec["spans"] = span_metrics(folder, c, shared.dev, ev)
  if cell.objective == "opd":
    rec["opd"] = opd_cells.summary(run)
  _write(rec_path, rec)
  return rec


def run(config: ml_collections.ConfigDict, workdir: str, *, command: str = "",
        replicate: str | None = None, only: list[str] | None = None,
        seeds: int | None = None, teachers_only: bool = False) -> str:
  """The whole study; returns the report's text. `command`: what the report says ran it.

  replicate: an earlier run's results (another CPU's): train and test the arms it tested
  at its budgets and seeds (no dev cells), and report this run against its intervals.
  only: run these arms (names), not all of the config's.
  seeds: train only each arm's first `seeds` seeds.
  teachers_only: train and score the teacher draws (`teacher.draws` seeds) on dev and test,
  write teacher_draws.md, and stop: no students (`--teachers`)."""
  if teachers_only and (replicate or only or seeds):
    raise DataError("--teachers trains no students: --replicate, --arms and --seeds do not "
                    "apply", field="teachers")
  t0 = _START[0] = time.perf_counter()
  work = os.path.abspath(workdir)
  os.makedirs(work, exist_ok=True)
  _write(os.path.join(work, "study_config.json"), json.loads(config.to_json()))
  import jax

  # seeds and budgets of an arm compile the same step, and every student's evaluation the
  # same prefill and decode: XLA's persistent cache compiles each once (restored after)
  saved = {k: getattr(jax.config, k) for k in ("jax_compilation_cache_dir",
                                               "jax_persistent_cache_min_compile_time_secs")}
  jax.config.update("jax_compilation_cache_dir", os.path.join(work, "xla_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  ev = Evaluator(config)
  started = time.time()
  try:
    return _run(work, config, ev, t0, command or f"sad-jax study ({config.name})",
                ref=reference_run(replicate) if replicate else None, only=only, seeds=seeds,
                teachers_only=teachers_only)
  finally:
    ev.close()
    # a study resumed over days: its report sums the wall time of every invocation
    with open(os.path.join(work, "invocations.jsonl"), "a") as f:
      f.write(json.dumps({"started": started, "seconds": time.perf_counter() - t0,
                          "command": command, "teachers": teachers_only}) + "\n")
    for k, v in saved.items():
      jax.config.update(k, v)


def _run(work: str, c, ev: Evaluator, t0: float, command: str, *, ref: dict | None,
         only: list[str] | None, seeds: int | None, teachers_only: bool = False) -> str:
  arm_list = _arms_to_run(c, ref, only, seeds)
  _say(f"sad-jax study {c.name}: workdir {work}; protocol: students learn from the "
       f"{'teacher' if c.protocol == 'teacher' else 'expert (oracle)'}'s trajectories")
  expert = stage_expert(work, c)
  _say("[2/8] tokenizer + prepared expert data")
  expert_ds = _prepare(work, "expert", expert, c)
  teacher, teacher_draw = stage_teacher(work, c, expert_ds, ev, score=teachers_only)
  if teachers_only:
    text = teacher_draws(work, c, teacher_draw, command=command,
                         seconds=time.perf_counter() - t0)
    _say(text)
    _say(f"report: {os.path.join(work, 'teacher_draws.md')}")
    return text
  train_jsonl, dev_jsonl, teacher_dev = stage_teacher_data(work, c, teacher, ev)
  shared = _datasets_and_stores(work, c, expert, expert_ds, teacher, train_jsonl, dev_jsonl)
  fold_shift = stage_fold_shift(work, c, train_jsonl if c.protocol == "teacher" else expert, ev)
  records, chosen, curves = _dev_cells(work, c, arm_list, ref, shared, ev)
  final = _test_cells(work, c, arm_list, chosen, shared, ev, records)
  teacher_row = _teacher_row(work, c, final, records, teacher, teacher_draw, teacher_dev,
                             shared.dev, ev)
  _say("[8/8] report")
  text = write(work, c, arm_list=arm_list, records=records, chosen=chosen, curves=curves,
               teacher=teacher_row, seconds=time.perf_counter() - t0, command=command,
               replication=ref, folds=fold_shift)
  _say(text)
  out = output_dir(work, ref is not None)
  _say(f"report: {os.path.join(out, 'report.md')}; {(time.perf_counter() - t0) / 60:.1f} min")
  return text


def _arms_to_run(c, ref: dict | None, only: list[str] | None, seeds: int | None) -> list:
  """The arms this invocation trains: the config's (or `--arms`), or for a replication the
  earlier run's, at most `seeds` seeds each."""
  arm_list = arms(c)
  if ref is None:
    arm_list = select_arms(arm_list, only, c.reference)
  else:
    check_same_env(ref, c.env, ref["path"])
    if len(ref["tasks"]) != c.eval.test_games:
      raise DataError(f"the earlier run played {len(ref['tasks'])} test games, this config "
                      f"{c.eval.test_games}", path=ref["path"], field="eval.test_games")
    arm_list = replication_arms(arm_list, ref, only, c.reference)
  arm_list = first_seeds(arm_list, seeds)
  if ref is not None:
    _say(f"replicating {ref['path']} (trained on {ref['cpu']}): "
         + ", ".join(f"{a.name} {ref['chosen'][a.name]} steps × {len(a.seeds)} seeds"
                     for a in arm_list) + "; budgets as it chose them on dev" + (
                         "; not replicated: " + ", ".join(missed)
                         if (missed := sorted(set(ref["chosen"]) - {a.name for a in arm_list}))
                         else ""))
  return arm_list


def _datasets_and_stores(work: str, c, expert: str, expert_ds: str, teacher: str,
                         train_jsonl: str, dev_jsonl: str) -> Inputs:
  """The students' prepared data and the teacher's stores on it, train and dev."""
  tok = tokenizer_of(expert_ds)
  _say("[5/8] datasets and teacher stores")
  if c.protocol == "teacher":
    dataset = _prepare(work, "train", train_jsonl, c, tokenizer=tok)
  elif c.protocol == "oracle":
    dataset = expert_ds
  else:
    raise DataError(f"protocol must be teacher or oracle, got {c.protocol!r}",
                    field="config.protocol")
  store = stage_store(work, "train", c, dataset, teacher)
  dev_ds = _prepare(work, "dev", dev_jsonl, c, tokenizer=tok, val_fraction=0.0)
  dev = DevData(dataset=dev_ds, store=stage_store(work, "dev", c, dev_ds, teacher),
                jsonl=dev_jsonl)
  return Inputs(dataset=dataset, store=store, dev=dev, teacher=teacher,
                teacher_jsonl=train_jsonl, tokenizer=tok)


def _dev_cells(work: str, c, arm_list: list, ref: dict | None, shared: Inputs,
               ev: Evaluator) -> tuple[dict[str, dict], dict[str, int], dict]:
  """Every budget of the arms that have a choice to make (two budgets or more) on the dev
  fold, then each arm's choice. An arm with one budget takes it; one with none takes the
  reference's; a replication takes the earlier run's."""
  own = [a for a in arm_list if len(a.budgets) > 1 and ref is None]
  # seed-major order: a study stopped part-way has whole learning curves for its first seeds
  order = {a.name: i for i, a in enumerate(own)}
  plan = sorted((cell for a in own for cell in cells_of(a, a.budgets)),
                key=lambda x: (x.seed, x.steps, order[x.arm]))
  _say(f"[6/8] cells on the dev fold: {len(plan)} ({', '.join(a.name for a in own)} × their "
       f"seeds × budgets), {c.eval.dev_games} dev games each" if plan else
       "[6/8] cells on the dev fold: none (no arm has budgets to choose between)")
  records: dict[str, dict] = {}
  for i, cell in enumerate(plan):
    records[cell.name] = run_cell(work, c, cell, shared, ev, ("dev",), f"{i + 1}/{len(plan)}")
  # a curve that still rises at its largest budget has not shown its plateau: such an arm
  # trains the next of `more_budgets`, all its seeds, until its best budget is not its last
  budgets = {a.name: [int(n) for n in a.budgets] for a in own}
  for extra in c.get("more_budgets", ()):
    rising = still_rising(own, budgets, records, extra)
    if not rising:
      break
    _say(f"  dev curves still rising at their largest budget: "
         f"{', '.join(a.name for a in rising)}; adding {extra} steps")
    more = sorted((cell for a in rising for cell in cells_of(a, (extra,))),
                  key=lambda x: (x.seed, order[x.arm]))
    for i, cell in enumerate(more):
      records[cell.name] = run_cell(work, c, cell, shared, ev, ("dev",),
                                    f"{extra} steps: {i + 1}/{len(more)}")
    for a in rising:
      budgets[a.name].append(extra)
  chosen, curves = {}, {}
  for a in own:
    chosen[a.name], curves[a.name] = choose_budget(
        [records[x.name] for x in cells_of(a, budgets[a.name])])
  for a in arm_list:
    if ref is not None:
      chosen[a.name] = ref["chosen"][a.name]
    elif len(a.budgets) == 1:
      chosen[a.name] = int(a.budgets[0])
  for a in arm_list:
    chosen.setdefault(a.name, chosen[c.reference])
  how = {a.name: "earlier run" if ref else budget_source(a, c.reference) for a in arm_list}
  _say("  budgets: " + ", ".join(f"{k} {v} ({how[k]})" for k, v in chosen.items()))
  return records, chosen, curves


def _test_cells(work: str, c, arm_list: list, chosen: dict[str, int], shared: Inputs,
                ev: Evaluator, records: dict[str, dict]) -> list[Cell]:
  """The chosen cells on the test fold, reference's rivals first, ablations after (their
  records join `records`)."""
  final = [cell for a in arm_list for cell in cells_of(a, (chosen[a.name],), chosen)]
  _say(f"[7/8] the chosen cells on the test fold: {len(final)}, {c.eval.test_games} games each")
  for i, cell in enumerate(final):
    records[cell.name] = run_cell(work, c, cell, shared, ev, ("test",),
                                  f"test {i + 1}/{len(final)}")
  return final


def _teacher_row(work: str, c, final: list[Cell], records: dict[str, dict], teacher: str,
                 teacher_draw: dict, teacher_dev: dict, dev: DevData, ev: Evaluator) -> dict:
  """The teacher's row of the report: dev and test play, per-span metrics, its draws, and
  the counterfactual fold."""
  # beside its checkpoint, where stage_teacher scored the candidates: played once
  teacher_test = ev.play("teacher", teacher, "test", c.eval.test_games,
                         os.path.join(os.path.dirname(teacher), "test.json"))
  teacher_rewritten = stage_counterfactual(work, c, final, records, teacher, ev)
  spans_path = os.path.join(work, "teacher_data", "spans.json")
  stamp = model_stamp(teacher)
  teacher_spans = (_read(spans_path) or {}).get(str(stamp))
  if teacher_spans is None:
    teacher_spans = span_metrics(teacher, c, dev, ev)
    _write(spans_path, {str(stamp): teacher_spans})
  return {"dev": teacher_dev, "test": teacher_test, "spans": teacher_spans,
          "folder": teacher, **teacher_draw,
          **({"test_rewritten": teacher_rewritten} if teacher_rewritten else {})}


def main_args(args, overrides) -> int:
  from sad_jax.common import configlib

  config = configlib.load(args.config, overrides)
  extra = ([f"--replicate {args.replicate}"] if args.replicate else []) + (
      [f"--arms {args.arms}"] if args.arms else []) + (
      [f"--seeds {args.seeds}"] if args.seeds else []) + (
      ["--teachers"] if args.teachers else [])
  run(config, args.workdir or os.path.join(
      "runs", "study", config.name + ("_replication" if args.replicate else "")),
      command=" ".join(["sad-jax study --config", args.config, *extra, *overrides]),
      replicate=args.replicate,
      only=[n.strip() for n in args.arms.split(",")] if args.arms else None,
      seeds=args.seeds, teachers_only=args.teachers)
  return 0
