"""`sad-jax study`: SAD against token-level KD and SFT (and SAD's own ablations) as a grid
of cells, decided with paired statistics.

  sad-jax study --config configs/study_coin.py [--workdir runs/study] [--config.a.b=v …]

The method's protocol, in stages (a rerun checks each stage's outputs and skips it):
  1. expert      oracle trajectories on the environment's train fold (they train the teacher)
  2. tokenizer   a sentencepiece model and a prepared dataset of the expert trajectories
  3. teacher     a teacher model trained on them (SFT)
  4. teacher     the teacher plays train-fold games itself; its successful episodes, as it
     data        wrote them, are the students' training data (`protocol="oracle"` distils on
                 the expert's trajectories instead: a separately labelled condition). It
                 also plays the dev-fold games: its successful ones carry the per-span
                 metrics, its score is the teacher's dev row.
  5. store       the teacher's top-k log-probs on those trajectories (reason, action, answer)
  6. cells       arm × seed × budget: a student trained on the shared dataset and store, then
                 played on the DEV fold. Each arm's budget is chosen there (best mean dev
                 success over its seeds; the smaller budget on a tie); an arm whose best is
                 its largest budget trains the next of `more_budgets` (its curve has not
                 flattened yet); arms with no budgets of their own (the ablations) take the
                 reference arm's.
  7. test        the chosen cells (and the teacher) play the TEST fold: the reported figures.
  8. report      results.jsonl (one line per cell and game), report.md with bootstrap intervals
                 over games and seeds, paired differences against the reference arm, verdicts
                 only where an interval allows one, and plots.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fractions
import functools
import io
import json
import os
import shutil
import sys
import time
from typing import Any

import ml_collections
import numpy as np

from sad_jax import stats
from sad_jax.errors import DataError
from sad_jax.fileio import atomic_write

_START = [time.perf_counter()]  # set by run(): stage lines say when they began


def _say(text: str) -> None:
  if text.startswith("["):  # a stage or a cell: its start time shows where the time went
    text = f"{text}  (at {(time.perf_counter() - _START[0]) / 60:.1f} min)"
  print(text, flush=True)


@dataclasses.dataclass(frozen=True)
class Cell:
  arm: str
  objective: str
  seed: int
  steps: int
  overrides: tuple[str, ...] = ()
  curriculum: bool = False

  @property
  def name(self) -> str:
    return f"{self.arm}_s{self.seed}_n{self.steps}"


def arms(c: ml_collections.ConfigDict) -> list[ml_collections.ConfigDict]:
  names = [a.name for a in c.arms]
  if len(set(names)) != len(names) or c.reference not in names:
    raise DataError(f"arms must have distinct names and include the reference "
                    f"{c.reference!r}; got {names}", field="config.arms")
  for a in c.arms:
    if a.objective not in ("sad", "token_kd", "sft"):
      raise DataError(f"arm {a.name}: unknown objective {a.objective!r}",
                      field="config.arms.objective")
  ref = next(a for a in c.arms if a.name == c.reference)
  if not ref.budgets:
    raise DataError("the reference arm needs budgets of its own", field="config.arms.budgets")
  return list(c.arms)


def budget_source(arm: ml_collections.ConfigDict, reference: str) -> str:
  """How an arm's budget is set: chosen on dev, fixed by its one budget, or the reference's."""
  return "dev" if len(arm.budgets) > 1 else "fixed" if arm.budgets else reference


def teacher_seed(c) -> int:
  """The teacher's draw (0 in configs from before it was a setting)."""
  return int(c.teacher.get("seed", 0))


def first_seeds(arm_list: list, n: int | None) -> list:
  """`--seeds N`: each arm's first N seeds (a cheaper run, e.g. another teacher draw)."""
  if n is None:
    return arm_list
  if n < 1:
    raise DataError(f"--seeds must be at least 1, got {n}", field="--seeds")
  return [ml_collections.ConfigDict({**a.to_dict(), "seeds": tuple(a.seeds)[:n]})
          for a in arm_list]


def cells_of(arm: ml_collections.ConfigDict, budgets) -> list[Cell]:
  return [Cell(arm=arm.name, objective=arm.objective, seed=int(s), steps=int(n),
               overrides=tuple(arm.overrides), curriculum=bool(arm.curriculum))
          for n in budgets for s in arm.seeds]


# ----------------------------------------------------------------------------- markers


def _read(path: str) -> dict | None:
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def model_stamp(folder: str) -> float:
  """Which export of a model folder this is: a result or store made from it records this."""
  return os.path.getmtime(os.path.join(folder, "config.json"))


def _write(path: str, obj: Any) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with atomic_write(path) as f:
    json.dump(obj, f, indent=1)


# ----------------------------------------------------------------------------- stages 1–5


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
  from configs import prepare_base
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


def train_config(c, dataset: str, *, objective: str, model, steps: int, seed: int, lr: float,
                 store: str = "", overrides=(), curriculum: bool = False):
  """One training run of the study: the same data, batch, schedule and window for every
  arm; an arm differs only by its objective and its overrides."""
  from configs import train_base
  from sad_jax import configlib

  t = train_base.get_config(objective)
  t.dataset = dataset
  t.teacher_store = store
  t.seed = seed
  for k, v in dict(model).items():
    t.model.hf_config[k] = v
  t.data.seq_len = c.data.seq_len
  t.data.batch_size = c.data.batch
  t.data.pack_lookahead = c.data.pack_lookahead
  t.teacher.k = c.store_k
  t.objective.chunk_size = 128
  weights = (1.0, 1.0) if objective == "sad" else (1.0,)
  if curriculum:  # SAD's curriculum: simple trajectories first, and the complexity term
    warm = max(steps // 4, 1)
    t.curriculum.stages = (train_base.stage("simple", warm, (1.0, 1.0, 0.3), weights),
                           train_base.stage("all", steps - warm, (1.0, 1.0, 1.0), weights))
    t.objective.curriculum_gamma = 0.1 if objective == "sad" else 0.0
  else:
    t.curriculum.stages = (train_base.stage("all", steps, (1.0, 1.0, 1.0), weights),)
    t.objective.curriculum_gamma = 0.0
  t.optim.lr = lr
  t.optim.warmup_steps = max(steps // 10, 1)
  t.train.steps = steps
  t.train.log_every = max(steps // 20, 1)
  t.train.eval_every = steps
  t.train.eval_batches = 4
  t.train.checkpoint_every = steps
  t.checkpoint.keep = 1
  t.checkpoint.keep_best = 0
  t.metrics.mfu = False
  t.metrics.progress = True
  t.mesh.shape = (-1, 1, 1)
  configlib.apply_overrides(t, [f"--config.{o}" for o in overrides])
  t.lock()
  return t


def trained(run: str, steps: int) -> bool:
  """A finished run: final params exist and metrics reached `steps`."""
  from sad_jax import metrics

  if not os.path.isdir(os.path.join(run, "final", "params")):
    return False
  try:
    rows = metrics.read_jsonl(run)
  except OSError:
    return False
  return any(r.get("step") == steps and r.get("split") == "train" and "loss" in r for r in rows)


def inputs_of(dataset: str, store: str = "") -> dict:
  """What a run learns from, beyond its config (which names the dataset and store only by
  path): the prepared data's fingerprint and the store's manifest and teacher. A run whose
  inputs changed under the same paths (another teacher, its episodes) is trained again."""
  from sad_jax.data import prepare
  from sad_jax.teacher.store import file_sha256

  out = {"dataset": prepare.load_prepared(dataset)[2]["fingerprint"]}
  if store:
    out["store"] = file_sha256(os.path.join(store, "manifest.json"))
    out["teacher"] = (_read(os.path.join(store, STORE_TEACHER)) or {}).get("model_mtime")
  return out


def train(name: str, run: str, config, steps: int, *, inputs: dict | None = None) -> bool:
  """Trains unless the same config already finished on the same `inputs` (`inputs_of`; a
  run from before they were recorded is taken as is); True if it trained."""
  from sad_jax import train as train_lib

  inputs_path = os.path.join(run, "study_inputs.json")
  before = _read(inputs_path)
  if inputs is not None and before is not None and before != inputs:
    changed = sorted(k for k in set(before) | set(inputs) if before.get(k) != inputs.get(k))
    _say(f"  {name}: its inputs changed since it was trained ({', '.join(changed)}); "
         "training again")
    shutil.rmtree(run)
  cfg = _read(os.path.join(run, "config.json"))
  new = train_lib.config_dict(config)
  # the attention kernel computes the same attention (to float rounding, like another
  # CPU): a cell trained with another one is the same plan, not hours to retrain
  kernel = (cfg or {}).get("model.attention", new.get("model.attention"))
  if cfg is not None and kernel != new.get("model.attention"):
    cfg = {**cfg, "model.attention": new.get("model.attention")}
  same = None if cfg is None else cfg == new
  # A finished run whose config lacks only keys added to the code since (with whatever
  # value they now have) is the same plan: the code ran without them. Otherwise every new
  # config field would retrain a study's hours of finished cells.
  added = sorted(set(new) - set(cfg or {}))
  older = bool(cfg and added and all(new.get(k) == v for k, v in cfg.items()))
  if (same or older) and trained(run, steps):
    since = f"; config keys added since: {', '.join(added)}" if older else ""
    if kernel != new.get("model.attention"):
      since += f"; trained with attention {kernel!r}"
    _say(f"  {name}: already trained ({run}, checked{since})")
    return False
  if same is False:  # another plan's run: its checkpoints would refuse to resume
    _say(f"  {name}: the plan changed since {run} was trained; training again")
    shutil.rmtree(run)
  t0 = time.perf_counter()
  with contextlib.redirect_stdout(io.StringIO()):  # step lines go to metrics.jsonl
    result = train_lib.train_and_evaluate(config, run)
  if result.status != "finished":  # a signal stopped it: later stages need its export
    raise SystemExit(f"sad-jax study: {name} stopped at step {result.step} of {steps} "
                     f"({result.status}); its checkpoint is in {run}; run the same command "
                     "again to resume")
  if inputs is not None:
    _write(inputs_path, inputs)
  _say(f"  {name}: {steps} steps in {time.perf_counter() - t0:.0f} s, validation loss "
       f"{result.validation.get('loss', float('nan')):.3f}")
  return True


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


class Evaluator:
  """Plays models on a fold's games; one set of environments (a JVM each for TWX) serves
  every model. Results are cached per (model, split, games) next to `out`."""

  def __init__(self, c):
    self.c = c
    self.envs: list = []

  def close(self) -> None:
    for env in self.envs:
      env.close()
    self.envs = []

  def play(self, name: str, folder: str, split: str, games: int, out: str, *,
           transcripts: bool = False, rewrite: list[tuple[str, str]] | None = None) -> dict:
    """rewrite: (old, new) replacements in every observation (a counterfactual fold)."""
    from sad_jax.agent import evaluate, folds
    from sad_jax.agent.env import make_env

    stamp = model_stamp(folder)
    rules = [list(x) for x in rewrite or []]
    r = _read(out)
    if r and r.get("episodes") == games and r.get("model_mtime") == stamp and \
        r.get("split") == split and r.get("rewrite", []) == rules and \
        (not transcripts or os.path.exists(out + "l")):
      return r
    batch = min(self.c.eval.batch, games)
    self.envs.extend(make_env(self.c.env) for _ in range(batch - len(self.envs)))
    # the wrappers share the JVMs (and are not closed: that would close them)
    envs = [folds.RewrittenEnv(e, rewrite) for e in self.envs] if rewrite else self.envs
    policy = self.policy(folder)
    res = evaluate.evaluate(policy, env_spec=self.c.env, split=split, episodes=games,
                            max_steps=self.c.eval.max_steps, batch=batch, envs=envs,
                            transcripts=out + "l" if transcripts else None, progress=True)
    if rewrite and not sum(e.replaced for e in envs):
      raise DataError(f"no rule of {rules} matched an observation of the {split} fold",
                      field="eval.test_rewrite")
    r = {**dataclasses.asdict(res), "model_mtime": stamp, "rewrite": rules}
    _write(out, r)
    _say(f"  {name} [{split}]: {res.summary()}")
    return r

  def policy(self, folder: str):
    from sad_jax.agent import evaluate

    return evaluate.load_policy(folder, max_new_tokens=self.c.eval.max_new_tokens,
                                max_prompt_tokens=self.c.eval.max_prompt_tokens)


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


STORE_TEACHER = "study_teacher.json"


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
  from sad_jax.agent.env import make_env
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


# ----------------------------------------------------------------------------- per-span


@functools.lru_cache(maxsize=8)
def _eval_fn(cfg, vocab: int):
  import jax

  from sad_jax import objectives, step
  from sad_jax.losses import LossSettings

  obj = objectives.Objective(name="sad", groups=objectives.groups_for("sad"),
                             settings=LossSettings(vocab_size=vocab, chunk_size=128))
  return jax.jit(functools.partial(step.eval_step, model_cfg=cfg, obj=obj))


def per_span_eval(folder: str, dataset: str, store: str, *, seq_len: int, k: int,
                  split: str = "validation") -> dict[str, float]:
  """Teacher-forced reason KL to the teacher and action accuracy on a prepared split, the
  same measurement for every model (the `sad` eval step with unit weights)."""
  import jax.numpy as jnp

  from sad_jax import step
  from sad_jax.data import pipeline
  from sad_jax.models.checkpoint_io import load_model

  cfg, params = load_model(folder)
  data = pipeline.open_split(dataset, split)
  teacher = pipeline.open_teacher(store, data, k=k)
  layout = pipeline.Layout(accum=1, rows=4, length=seq_len + 1, k=k)
  fn = _eval_fn(cfg, cfg.vocab_size)
  total = step.eval_totals(fn(params, jnp.zeros(2), batch, jnp.ones(2))
                           for batch, _ in pipeline.eval_batches(data, teacher, layout))
  n = np.maximum(total["count"], 1)
  return {"reason_kl": float(total["sum"][0] / n[0]),
          "action_accuracy": float(total["correct"][1] / n[1])}


def span_metrics(folder: str, c, dev: dict, ev: Evaluator) -> dict[str, float]:
  """Per-span metrics on the teacher's dev-fold trajectories: teacher-forced reason KL and
  action accuracy, and the decision accuracy that the recorded thought cannot give away."""
  from sad_jax.agent import evaluate
  from sad_jax.data import schema

  out = per_span_eval(folder, dev["dataset"], dev["store"], seq_len=c.data.seq_len,
                      k=c.store_k, split="train")
  trajs = list(schema.read_jsonl(dev["jsonl"]))
  out.update(evaluate.decision_accuracy(ev.policy(folder), trajs, batch=c.eval.batch))
  return out


# ----------------------------------------------------------------------------- cells


def run_cell(work: str, c, cell: Cell, shared: dict, ev: Evaluator, splits: tuple[str, ...],
             index: str) -> dict:
  """Trains the cell (unless done) and plays it on `splits`; its record is cells/NAME.json."""
  student_store = shared["store"]
  run = os.path.join(work, "cells", cell.name)
  t = train_config(c, shared["dataset"], objective=cell.objective, model=c.student.model,
                   steps=cell.steps, seed=cell.seed, lr=c.student.lr,
                   store=student_store if cell.objective != "sft" else "",
                   overrides=cell.overrides, curriculum=cell.curriculum)
  _say(f"[cell {index}] {cell.name}")
  did_train = train(cell.name, run, t, cell.steps,
                    inputs=inputs_of(shared["dataset"],
                                     student_store if cell.objective != "sft" else ""))
  folder = os.path.join(run, "final")
  rec_path = os.path.join(work, "cells", cell.name + ".json")
  rec = _read(rec_path) or {}
  stamp = model_stamp(folder)
  if rec.get("model_mtime") != stamp:
    rec = {"cell": dataclasses.asdict(cell), "model_mtime": stamp}
  if did_train:  # figures depend on the processor: say which one trained the model
    from sad_jax import metrics

    rec["trained_on"] = metrics.cpu_model()
  for split in splits:
    games = c.eval.dev_games if split == "dev" else c.eval.test_games
    rec[split] = ev.play(cell.name, folder, split, games,
                         os.path.join(work, "cells", cell.name, f"eval_{split}.json"))
  if "spans" not in rec:
    rec["spans"] = span_metrics(folder, c, shared["dev"], ev)
  _write(rec_path, rec)
  return rec


def choose_budget(records: list[dict]) -> tuple[int, dict[int, float]]:
  """The budget with the best mean dev success over seeds (the smaller one on a tie)."""
  by: dict[int, list[fractions.Fraction]] = {}
  for r in records:  # exact rates: a tie must not be broken by float rounding
    games = r["dev"]["games"]
    by.setdefault(r["cell"]["steps"], []).append(
        fractions.Fraction(sum(bool(g["won"]) for g in games), len(games)))
  exact = {n: sum(v) / len(v) for n, v in sorted(by.items())}
  best = max(exact.values())
  return min(n for n, v in exact.items() if v == best), {n: float(v) for n, v in exact.items()}


def invocations(work: str) -> list[dict]:
  """The study's earlier invocations in `work` (each appends a line when it ends)."""
  path = os.path.join(work, "invocations.jsonl")
  if not os.path.exists(path):
    return []
  out = []
  with open(path) as f:
    for line in f:
      with contextlib.suppress(json.JSONDecodeError):  # a line cut short by a crash
        out.append(json.loads(line))
  return out


def still_rising(own: list, budgets: dict[str, list[int]], records: dict[str, dict],
                 extra: int) -> list:
  """The arms whose best budget on dev is their largest one, smaller than `extra`."""
  return [a for a in own if extra > max(budgets[a.name]) and choose_budget(
      [records[x.name] for x in cells_of(a, budgets[a.name])])[0] == max(budgets[a.name])]


# ----------------------------------------------------------------------------- replication


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
  import re

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
  report = os.path.join(os.path.dirname(path), "report.md")
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
  return {"path": path, "cpu": cpu, "env": env, "teacher_seed": teacher, "chosen": chosen,
          "seeds": seeds, "won": won,
          "tasks": list(next(iter(tasks)))}


def output_dir(work: str, replicating: bool) -> str:
  """Where the report goes: a replication writes beside the study it may share a workdir
  with (reusing its trained cells), not over it."""
  return os.path.join(work, "replication") if replicating else work


def check_same_env(earlier: dict, env: str, path: str) -> None:
  """Refuses a run of another environment than `earlier` (a `reference_run`): coin with 4
  and 6 rooms share their task numbers. A run without its report.md is not checked."""
  if "not recorded" not in (earlier["env"], env) and earlier["env"] != env:
    raise DataError(f"the runs played different environments: {earlier['env']} "
                    f"({earlier['path']}) and {env}", path=path, field="env")


def replication_arms(arm_list: list, ref: dict, names: list[str] | None,
                     reference: str) -> list:
  """The config's arms that the earlier run tested (or the `names` among them), each with
  the earlier run's seeds; the reference arm must be among them."""
  have = [a for a in arm_list if a.name in ref["chosen"]]
  if names is not None:
    unknown = sorted(set(names) - {a.name for a in have})
    if unknown:
      raise DataError(f"arms {unknown} are not arms of both this config and the earlier run "
                      f"(it tested {sorted(ref['chosen'])})", path=ref["path"], field="arm")
    have = [a for a in have if a.name in names]
  if reference not in {a.name for a in have}:
    raise DataError(f"the reference arm {reference!r} must be replicated", path=ref["path"],
                    field="arm")
  return [ml_collections.ConfigDict({**a.to_dict(), "seeds": tuple(ref["seeds"][a.name])})
          for a in have]


def select_arms(arm_list: list, names: list[str] | None, reference: str) -> list:
  """`--arms`: run only these arms (the reference among them)."""
  if names is None:
    return arm_list
  unknown = sorted(set(names) - {a.name for a in arm_list})
  if unknown or reference not in names:
    raise DataError(f"--arms must name arms of the config, the reference {reference!r} among "
                    f"them; unknown: {unknown}", field="--arms")
  return [a for a in arm_list if a.name in names]


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
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  if repo not in sys.path:
    sys.path.insert(0, repo)  # configs/
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
  _say(f"sad-jax study {c.name}: workdir {work}; protocol: students learn from the "
       f"{'teacher' if c.protocol == 'teacher' else 'expert (oracle)'}'s trajectories")
  expert = stage_expert(work, c)
  _say("[2/8] tokenizer + prepared expert data")
  expert_ds = _prepare(work, "expert", expert, c)
  tok = tokenizer_of(expert_ds)
  teacher, teacher_draw = stage_teacher(work, c, expert_ds, ev, score=teachers_only)
  if teachers_only:
    from sad_jax import study_report

    text = study_report.teacher_draws(work, c, teacher_draw, command=command,
                                      seconds=time.perf_counter() - t0)
    _say(text)
    _say(f"report: {os.path.join(work, 'teacher_draws.md')}")
    return text
  train_jsonl, dev_jsonl, teacher_dev = stage_teacher_data(work, c, teacher, ev)
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
  dev = {"dataset": dev_ds, "store": stage_store(work, "dev", c, dev_ds, teacher),
         "jsonl": dev_jsonl}
  shared = {"dataset": dataset, "store": store, "dev": dev}
  fold_shift = stage_fold_shift(work, c, train_jsonl if c.protocol == "teacher" else expert, ev)

  # dev: every budget of the arms that have a choice to make (two budgets or more); then
  # each arm's choice. An arm with one budget takes it; one with none takes the reference's.
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

  # test: the chosen cells, reference's rivals first, ablations after
  final = [cell for a in arm_list for cell in cells_of(a, (chosen[a.name],))]
  _say(f"[7/8] the chosen cells on the test fold: {len(final)}, {c.eval.test_games} games each")
  for i, cell in enumerate(final):
    records[cell.name] = run_cell(work, c, cell, shared, ev, ("test",),
                                  f"test {i + 1}/{len(final)}")
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
  _say("[8/8] report")
  from sad_jax import study_report

  text = study_report.write(work, c, arm_list=arm_list, records=records, chosen=chosen,
                            curves=curves, teacher={"dev": teacher_dev, "test": teacher_test,
                                                    "spans": teacher_spans,
                                                    "folder": teacher, **teacher_draw,
                                                    **({"test_rewritten": teacher_rewritten}
                                                       if teacher_rewritten else {})},
                            seconds=time.perf_counter() - t0, command=command,
                            replication=ref, folds=fold_shift)
  _say(text)
  out = output_dir(work, ref is not None)
  _say(f"report: {os.path.join(out, 'report.md')}; {(time.perf_counter() - t0) / 60:.1f} min")
  return text


def main_args(args, overrides) -> int:
  from sad_jax import configlib

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
