"""The shared stages every cell reads: the expert's trajectories, the prepared datasets,
the teacher (its draws), its episodes, its store, the fold shift and the counterfactual fold."""

from __future__ import annotations

import dataclasses
import os
import shutil
import time

from sad_jax.common.errors import DataError
from sad_jax.experiment import stats
from sad_jax.experiment.study.cache import inputs_of, train
from sad_jax.experiment.study.cells import STORE_TEACHER, Cell, _read, _say, _write, model_stamp
from sad_jax.experiment.study.evaluator import Evaluator
from sad_jax.experiment.study.grid import teacher_seed, train_config


def stage_expert(work: str, c) -> str:
  from tqdm.auto import tqdm

  from sad_jax.agent import oracle
  from sad_jax.data import schema

  out = os.path.join(work, "expert")
  path = os.path.join(out, "train.jsonl")
  want = {"episodes": c.expert.episodes, "env": c.env, "noise": c.expert.noise,
          "vary_rooms": c.expert.vary_rooms}
  m = _read(os.path.join(out, "stage.json"))
  if m and {k: m.get(k) for k in want} == want and os.path.exists(path):
    n = sum(1 for _ in open(path, encoding="utf-8"))
    if n == m["written"]:
      _say(f"[1/8] expert: {n} trajectories already in {path} (checked)")
      return path
  os.makedirs(out, exist_ok=True)
  bar = tqdm(total=c.expert.episodes, desc="[1/8] expert episodes", unit="ep", leave=False)

  def kept():
    for t in oracle.generate(c.env, split="train", episodes=c.expert.episodes, varied=False,
                             noise=c.expert.noise, vary_rooms=c.expert.vary_rooms):
      bar.update(1)
      if t.success:
        yield t

  n = schema.write_jsonl(path, kept())
  bar.close()
  _write(os.path.join(out, "stage.json"), {**want, "written": n})
  _say(f"[1/8] expert: {n} successful expert trajectories (train fold, "
       f"{c.expert.noise:.0%} random moves) → {path}")
  return path


def _prepare(work: str, name: str, data: str, c, *, tokenizer: str = "",
             val_fraction: float = 0.05) -> str:
  from sad_jax.configs import prepare_base
  from sad_jax.data import prepare
  from sad_jax.teacher.store import file_sha256

  out = os.path.join(work, "prepared", name)
  marker = out + ".json"
  settings = {"vocab": c.tokenizer.vocab, "max_len": c.data.seq_len + 1,
              "multiword": c.tokenizer.multiword, "tokenizer": tokenizer,
              "val_fraction": val_fraction, "data_sha256": file_sha256(data)}
  m = _read(marker)
  try:
    if m and m["settings"] == settings and \
        prepare.load_prepared(out)[2]["fingerprint"] == m["fingerprint"]:
      _say(f"  prepare {name}: {out} already done (fingerprint checked)")
      return out
  except (OSError, ValueError, KeyError, DataError):
    pass
  shutil.rmtree(out, ignore_errors=True)
  p = prepare_base.get_config()
  p.inputs = (data,)
  p.tokenizer.path = tokenizer
  p.tokenizer.vocab_size = c.tokenizer.vocab
  p.tokenizer.split_by_whitespace = not c.tokenizer.multiword
  p.tokenizer.max_piece_length = 64 if c.tokenizer.multiword else 16
  p.max_len = c.data.seq_len + 1
  p.val_fraction = val_fraction
  report = prepare.prepare(p, out, progress=True)
  _write(marker, {"fingerprint": report.fingerprint, "settings": settings})
  _say(f"  prepare {name}: {report.written} trajectories, {report.tokens} tokens → {out}")
  return out


def tokenizer_of(dataset: str) -> str:
  return next(os.path.join(dataset, n) for n in ("tokenizer.model", "tokenizer.json")
              if os.path.exists(os.path.join(dataset, n)))


def stage_teacher(work: str, c, dataset: str, ev: Evaluator, *,
                  score: bool = False) -> tuple[str, dict]:
  """The teacher: SFT on the expert's episodes. With `teacher.draws` N > 1, N candidates
  (seeds seed … seed+N−1) are trained and the one that wins most dev games is kept (the
  lower seed on a tie): a teacher's quality varies between draws far more than the
  students' (6 rooms: 2, 40 and 18 of 64 dev games for seeds 0–2). Every candidate also
  plays the test fold, reported and never used to choose: how far the draws spread.
  score: play dev and test with a single draw too (`--teachers`). Returns the kept final/
  folder and {"seed", "candidates": {seed: dev games won}, "scores": {seed: (dev, test)}}."""
  seed, draws = teacher_seed(c), int(c.teacher.get("draws", 1))
  if draws < 1:
    raise DataError(f"teacher.draws must be at least 1, got {draws}", field="config.teacher.draws")
  _say(f"[3/8] teacher: SFT on the expert trajectories, {c.teacher.steps} steps, seed "
       + (f"{seed}" if draws == 1 else f"{seed}–{seed + draws - 1}, the best on dev kept"))
  wins: dict[int, int] = {}
  finals: dict[int, str] = {}
  scores: dict[int, tuple[dict, dict]] = {}
  for s in range(seed, seed + draws):
    run = os.path.join(work, "teacher" if s == seed else f"teacher_s{s}")
    finals[s] = os.path.join(run, "final")
    t = train_config(c, dataset, objective="sft", model=c.teacher.model,
                     steps=c.teacher.steps, seed=s, lr=c.teacher.lr,
                     curriculum=c.teacher.curriculum)
    train("teacher" if draws == 1 else f"teacher seed {s}", run, t, c.teacher.steps,
          inputs=inputs_of(dataset))
    if draws > 1 or score:
      scores[s] = tuple(ev.play(f"teacher seed {s}", finals[s], split, games,
                                os.path.join(run, f"{split}.json"))
                        for split, games in (("dev", c.eval.dev_games),
                                             ("test", c.eval.test_games)))
      wins[s] = int(scores[s][0]["successes"])
  best = stats.best_draw(wins) if draws > 1 else seed
  if draws > 1:
    _say(f"  teacher: seed {best} kept (dev games won: "
         + ", ".join(f"seed {s} {n}" for s, n in wins.items()) + ")")
  return finals[best], {"seed": best, "candidates": wins if draws > 1 else {},
                        "scores": scores}


def stage_teacher_data(work: str, c, teacher: str, ev: Evaluator) -> tuple[str, str, dict]:
  """The teacher's own successful episodes on train-fold games (students' data) and on the
  dev-fold games (per-span metrics); also its dev score."""
  from sad_jax.data import schema

  out = os.path.join(work, "teacher_data")
  if c.teacher_data.keep not in ("success", "all"):
    raise DataError(f"teacher_data.keep must be success or all, got {c.teacher_data.keep!r}",
                    field="config.teacher_data.keep")
  which = "successful episodes" if c.teacher_data.keep == "success" else "episodes (all)"
  _say(f"[4/8] teacher data: the teacher plays {c.teacher_data.train_games} train-fold and "
       f"{c.eval.dev_games} dev-fold games; its {which} are kept as it wrote them")
  paths = {}
  dev_result = {}
  for split, games in (("train", c.teacher_data.train_games), ("dev", c.eval.dev_games)):
    r = ev.play("teacher", teacher, split, games, os.path.join(out, f"{split}.json"),
                transcripts=True)
    if split == "dev":
      dev_result = r
    path = os.path.join(out, f"{split}_success.jsonl")
    src = os.path.join(out, f"{split}.jsonl")
    if not (os.path.exists(path) and os.path.getmtime(path) >= os.path.getmtime(src)):
      kept = [dataclasses.replace(t, source="teacher") for t in schema.read_jsonl(src)
              if t.success or c.teacher_data.keep == "all"]
      if not kept:
        raise DataError(f"the teacher won none of its {games} {split}-fold games: nothing to "
                        "distil", path=src, field="success")
      schema.write_jsonl(path, kept)
    paths[split] = path
    _say(f"  teacher [{split}]: {r['successes']}/{r['episodes']} games won, kept → {path}")
  return paths["train"], paths["dev"], dev_result


def stage_store(work: str, name: str, c, dataset: str, teacher: str) -> str:
  from sad_jax.data import prepare
  from sad_jax.models.checkpoint_io import load_model
  from sad_jax.teacher import precompute
  from sad_jax.teacher.store import Manifest

  out = os.path.join(work, "store", name)
  # the manifest names the teacher only as "teacher": which one is recorded beside it
  who = {"teacher": os.path.abspath(teacher),
         "model_mtime": model_stamp(teacher)}
  recorded = _read(os.path.join(out, STORE_TEACHER))
  try:
    m = Manifest.read(out)
    if m.dataset_fingerprint == prepare.load_prepared(dataset)[2]["fingerprint"] and \
        m.k == c.store_k and recorded in (None, who):  # None: a store from before the record
      _say(f"  store {name}: {out} already complete (fingerprint checked)")
      return out
    stale = True  # complete, but of other data or another teacher
  except DataError:
    stale = recorded not in (None, who)  # part of another teacher's store
  if stale:  # precompute would resume its shards (or refuse the folder): start again
    _say(f"  store {name}: {out} holds another teacher's or dataset's top-k; computing again")
    shutil.rmtree(out)
  _write(os.path.join(out, STORE_TEACHER), who)  # first: a resumed part is this teacher's
  cfg, params = load_model(teacher)
  t0 = time.perf_counter()
  m = precompute.precompute(dataset_dir=dataset, cfg=cfg, params=params, teacher_name="teacher",
                            out_dir=out, k=c.store_k, span_kinds=("reason", "action", "answer"),
                            batch_size=16, progress=True)
  n = sum(len(s["ids"]) for s in m.shards)
  _say(f"  store {name}: top-{c.store_k} on reason+action targets of {n} trajectories in "
       f"{time.perf_counter() - t0:.0f} s → {out}")
  return out


def stage_fold_shift(work: str, c, trajectories: str, ev: Evaluator) -> dict[str, dict]:
  """What the dev and test folds measure: how their games' first observations stand to the
  students' training episodes (agent/folds.py). Cached in fold_shift.json."""
  from sad_jax.agent import folds
  from sad_jax.agent.envs.registry import make_env
  from sad_jax.data import schema

  path = os.path.join(work, "fold_shift.json")
  key = {"env": c.env, "data": os.path.abspath(trajectories),
         "data_mtime": os.path.getmtime(trajectories), "dev": c.eval.dev_games,
         "test": c.eval.test_games}
  r = _read(path)
  if r and r.get("key") == key:
    return r["folds"]
  env = ev.envs[0] if ev.envs else make_env(c.env)
  try:
    out = folds.fold_shift(env, schema.read_jsonl(trajectories),
                           {"dev": c.eval.dev_games, "test": c.eval.test_games})
  finally:
    if not ev.envs:
      env.close()
  _write(path, {"key": key, "folds": out})
  _say("  folds: " + folds.describe(out))
  return out


def stage_counterfactual(work: str, c, final: list[Cell], records: dict[str, dict],
                         teacher: str, ev: Evaluator) -> dict | None:
  """The test fold again with `eval.test_rewrite` applied to every observation: the same
  games with the text by which they differ from training put back as training has it. If a
  dev–test gap comes from that text, success on the rewritten fold rises towards dev.
  Each cell's result goes to its record as "test_rewritten"; returns the teacher's."""
  from sad_jax.agent import folds

  rules = [folds.parse_rewrite(r) for r in c.eval.get("test_rewrite", ())]
  if not rules:
    return None
  _say(f"[7/8] the counterfactual test fold ({len(final)} cells and the teacher): every "
       "observation rewritten " + "; ".join(f"{a!r} → {b!r}" for a, b in rules))
  for cell in final:
    rec = records[cell.name]
    rec["test_rewritten"] = ev.play(
        cell.name + " (rewritten)", os.path.join(work, "cells", cell.name, "final"), "test",
        c.eval.test_games, os.path.join(work, "cells", cell.name, "eval_test_rewritten.json"),
        rewrite=rules)
    _write(os.path.join(work, "cells", cell.name + ".json"), rec)
  return ev.play("teacher (rewritten)", teacher, "test", c.eval.test_games,
                 os.path.join(work, "teacher_data", "test_rewritten.json"), rewrite=rules)
