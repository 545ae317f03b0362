"""`sad-jax demo`: the whole method on the embedded default, end to end, on a laptop CPU.

  sad-jax demo [--quick] [--workdir runs/demo]

Stages (each shows progress; a rerun skips a stage whose outputs check out):
  1. data      expert teacher trajectories in TextWorld-Express coin (train fold)
  2. prepare   → a tokenized dataset with its own sentencepiece tokenizer
  3. teacher   a teacher model trained on them (SFT)
  4. store     its top-k log-probs on reason and action targets (k=16)
  5. students  three students ≥ 4× smaller, same data and steps: sad, token_kd, sft,
               for each seed
  6. eval      teacher and students as agents on held-out test-fold games
  7. report    a results table, report.md, and PNG plots (per-span loss curves; success
               rates with 95% intervals)
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from typing import Any

import numpy as np

from sad_jax.errors import DataError
from sad_jax.fileio import atomic_write

# Coin: search four rooms for the coin and take it. Its test fold has only words seen
# in training (simonsays and peckingorder hold objects out of the train fold, and a model of
# this size cannot learn to spell unseen words in minutes), and the expert searches from
# what it reads (oracle._search_episode), so every action is learnable.
ENV = "twx:coin?numLocations=4&numDistractorItems=0&includeDoors=0&limitInventorySize=0"
OBJECTIVES = ("sad", "token_kd", "sft")
NOISE = 0.1  # the expert's random-move rate (oracle._search_episode): recovery is in the data
# The narrower students take twice the teacher's peak learning rate, the same for every
# objective (at 3e-3, sad seed 0 reached 6% success, at 6e-3 38%; token_kd 19% at both).
TEACHER_LR, STUDENT_LR = 3e-3, 6e-3


@dataclasses.dataclass(frozen=True)
class Plan:
  train_episodes: int
  vocab: int
  seq_len: int
  teacher: dict
  student: dict
  teacher_steps: int
  student_steps: int
  batch: int
  seeds: tuple[int, ...]
  eval_episodes: int
  max_steps: int
  # tokens per trajectory, 0 = the training window (seq_len + 1): prepare truncates a longer
  # one at a step boundary (the packer would cut it at the window anyway, mid-step; the
  # store then skips what no row holds)
  max_len: int = 0
  # multi-word tokenizer pieces ("▁In▁one▁part▁of▁the▁room▁you▁see▁a"): the game's templated
  # text takes about half the tokens, so every stage does about half the work
  multiword: bool = True
  # rows filled in order (1), as the measured default was; 8 (first fit, 93% of tokens real
  # against 70%) changed every run's data order, and sad fell to 48% (README)
  pack_lookahead: int = 1


def plan(quick: bool) -> Plan:
  # Two heads of 64 or 96: on a CPU the per-head softmax work, not the matmuls, bounds a
  # step at these widths (a 4-head teacher's step is 1.4× slower, measured), and a wider
  # student with fewer heads learned faster per step than a 96-wide one with four.
  teacher = dict(hidden_size=192, intermediate_size=512, num_hidden_layers=4,
                 num_attention_heads=2, num_key_value_heads=1)
  student = dict(hidden_size=128, intermediate_size=320, num_hidden_layers=2,
                 num_attention_heads=2, num_key_value_heads=1)
  if quick:
    return Plan(train_episodes=100, vocab=600, seq_len=512, teacher=teacher, student=student,
                teacher_steps=20, student_steps=12, batch=2, seeds=(0,), eval_episodes=2,
                max_steps=4)
  # With multi-word pieces an episode is ~230 tokens (97% fit 512). A student learns to read
  # the room between 150 and 200 steps (seed 0, sad: 6% success at 150 steps, 94% at 200).
  return Plan(train_episodes=800, vocab=600, seq_len=512, teacher=teacher, student=student,
              teacher_steps=150, student_steps=200, batch=4, seeds=(0, 1, 2), eval_episodes=16,
              max_steps=8)


def _say(text: str) -> None:
  print(text, flush=True)


def _marker(path: str) -> dict | None:
  try:
    with open(os.path.join(path, "demo_stage.json"), encoding="utf-8") as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def _mark(path: str, info: dict) -> None:
  with atomic_write(os.path.join(path, "demo_stage.json")) as f:
    json.dump(info, f, indent=1)


# ----------------------------------------------------------------------------- stages


def stage_data(work: str, p: Plan) -> str:
  from sad_jax.agent import oracle
  from sad_jax.data import schema

  out = os.path.join(work, "data")
  path = os.path.join(out, "train.jsonl")
  m = _marker(out)
  if m and m.get("episodes") == p.train_episodes and m.get("env") == ENV and \
      m.get("noise") == NOISE and os.path.exists(path):
    n = sum(1 for _ in open(path, encoding="utf-8"))
    if n == m["written"]:
      _say(f"[1/7] data: {n} expert trajectories already in {path} (checked)")
      return path
  os.makedirs(out, exist_ok=True)
  from tqdm.auto import tqdm

  bar = tqdm(total=p.train_episodes, desc="[1/7] data: expert episodes", unit="ep", leave=False)
  won = [0]

  def counted():
    for t in oracle.generate(ENV, split="train", episodes=p.train_episodes, varied=False,
                             noise=NOISE, vary_rooms=True):
      bar.update(1)
      won[0] += bool(t.success)
      if t.success:
        yield t

  n = schema.write_jsonl(path, counted())
  bar.close()
  _mark(out, {"episodes": p.train_episodes, "written": n, "won": won[0], "env": ENV,
              "noise": NOISE})
  _say(f"[1/7] data: {n} successful expert trajectories ({ENV.split('?')[0]}, train fold, "
       f"{NOISE:.0%} random moves) → {path}")
  return path


def stage_prepare(work: str, p: Plan, data: str) -> str:
  from configs import prepare_base
  from sad_jax.data import prepare
  from sad_jax.teacher.store import file_sha256

  out = os.path.join(work, "prepared")
  marker = os.path.join(work, "prepared.json")
  data_sha = file_sha256(data)
  settings = {"vocab": p.vocab, "max_len": p.max_len or p.seq_len + 1, "multiword": p.multiword}
  try:
    with open(marker, encoding="utf-8") as f:
      m = json.load(f)
    _, _, meta = prepare.load_prepared(out)
    if meta["fingerprint"] == m["fingerprint"] and m["data_sha256"] == data_sha and \
        m.get("settings") == settings:
      _say(f"[2/7] prepare: {out} already done (fingerprint {m['fingerprint'][:12]}… checked)")
      return out
  except (OSError, ValueError, KeyError, DataError):
    pass
  import shutil

  shutil.rmtree(out, ignore_errors=True)
  c = prepare_base.get_config()
  c.inputs = (data,)
  c.tokenizer.vocab_size = p.vocab
  c.tokenizer.split_by_whitespace = not p.multiword
  c.tokenizer.max_piece_length = 64 if p.multiword else 16
  c.max_len = p.max_len or p.seq_len + 1
  c.val_fraction = 0.05
  report = prepare.prepare(c, out, progress=True)
  with atomic_write(marker) as f:
    json.dump({"fingerprint": report.fingerprint, "data_sha256": data_sha,
               "settings": settings}, f)
  _say(f"[2/7] prepare: {report.written} trajectories, tokens {report.tokens} → {out}")
  return out


def _train_config(dataset: str, *, objective: str, model: dict, steps: int, p: Plan,
                  seed: int, lr: float, store: str = ""):
  from configs import train_base

  c = train_base.get_config(objective)
  c.dataset = dataset
  c.teacher_store = store
  c.seed = seed
  for k, v in model.items():
    c.model.hf_config[k] = v
  c.data.seq_len = p.seq_len
  c.data.batch_size = p.batch
  c.data.pack_lookahead = p.pack_lookahead
  c.teacher.k = 16
  c.objective.chunk_size = 128
  if objective == "sad":
    c.objective.curriculum_gamma = 0.1
  weights = (1.0, 1.0) if objective == "sad" else (1.0,)
  warm = max(steps // 4, 1)
  c.curriculum.stages = (train_base.stage("simple", warm, (1.0, 1.0, 0.3), weights),
                         train_base.stage("all", steps - warm, (1.0, 1.0, 1.0), weights))
  c.optim.lr = lr
  c.optim.warmup_steps = max(steps // 10, 1)
  c.train.steps = steps
  c.train.log_every = max(steps // 20, 1)
  c.train.eval_every = steps  # validation once, at the end (report.md measures per span)
  c.train.eval_batches = 4
  c.train.checkpoint_every = steps
  c.checkpoint.keep = 1
  c.checkpoint.keep_best = 0
  c.metrics.mfu = False
  c.metrics.progress = True
  c.mesh.shape = (-1, 1, 1)  # every local device on the data axis (one on a laptop CPU)
  c.lock()
  return c


def _trained(run: str, steps: int) -> bool:
  """A finished run: final params load and metrics reached `steps`."""
  from sad_jax import metrics

  if not os.path.isdir(os.path.join(run, "final", "params")):
    return False
  try:
    rows = metrics.read_jsonl(run)
  except OSError:
    return False
  return any(r.get("step") == steps and r.get("split") == "train" and "loss" in r
             for r in rows)


def _train(name: str, run: str, config, steps: int) -> None:
  import contextlib
  import io

  from sad_jax import train

  try:
    with open(os.path.join(run, "config.json"), encoding="utf-8") as f:
      same = json.load(f) == train.config_dict(config)
  except (OSError, ValueError):
    same = None  # no run yet (or one killed before it wrote its config)
  if same and _trained(run, steps):
    _say(f"  {name}: already trained ({run}, checked)")
    return
  if same is False:  # another plan's run: its checkpoints would refuse to resume
    import shutil

    _say(f"  {name}: the plan changed since {run} was trained; training again")
    shutil.rmtree(run)
  t0 = time.perf_counter()
  log = io.StringIO()
  with contextlib.redirect_stdout(log):  # the step lines go to the run's metrics.jsonl
    result = train.train_and_evaluate(config, run)
  val = result.validation
  _say(f"  {name}: {steps} steps in {time.perf_counter() - t0:.0f} s, validation loss "
       f"{val.get('loss', float('nan')):.3f}")


def stage_teacher(work: str, p: Plan, dataset: str) -> str:
  _say("[3/7] teacher: SFT on the expert trajectories")
  run = os.path.join(work, "teacher")
  c = _train_config(dataset, objective="sft", model=p.teacher, steps=p.teacher_steps, p=p,
                    seed=0, lr=TEACHER_LR)
  _train("teacher", run, c, p.teacher_steps)
  return os.path.join(run, "final")


def stage_store(work: str, p: Plan, dataset: str, teacher: str) -> str:
  from sad_jax.models.checkpoint_io import load_model
  from sad_jax.teacher import precompute
  from sad_jax.teacher.store import Manifest

  out = os.path.join(work, "store")
  try:
    m = Manifest.read(out)
    from sad_jax.data import prepare

    _, _, meta = prepare.load_prepared(dataset)
    if m.dataset_fingerprint == meta["fingerprint"] and m.k == 16:
      _say(f"[4/7] store: {out} already complete (fingerprint checked)")
      return out
  except DataError:
    pass
  cfg, params = load_model(teacher)
  t0 = time.perf_counter()
  m = precompute.precompute(dataset_dir=dataset, cfg=cfg, params=params, teacher_name="teacher",
                            out_dir=out, k=16, span_kinds=("reason", "action", "answer"),
                            batch_size=16, progress=True)
  n = sum(len(s["ids"]) for s in m.shards)
  _say(f"[4/7] store: teacher top-16 on reason+action targets of {n} trajectories in "
       f"{time.perf_counter() - t0:.0f} s → {out}")
  return out


def stage_students(work: str, p: Plan, dataset: str, store: str) -> dict[str, str]:
  _say(f"[5/7] students: {', '.join(OBJECTIVES)} × seeds {list(p.seeds)}, "
       f"{p.student_steps} steps each")
  runs = {}
  for seed in p.seeds:
    for obj in OBJECTIVES:
      name = f"{obj}_s{seed}"
      run = os.path.join(work, "students", name)
      c = _train_config(dataset, objective=obj, model=p.student, steps=p.student_steps,
                        p=p, seed=seed, lr=STUDENT_LR, store=store if obj != "sft" else "")
      _train(name, run, c, p.student_steps)
      runs[name] = run
  return runs


def stage_eval(work: str, p: Plan, teacher: str, runs: dict[str, str]) -> dict[str, dict]:
  _say(f"[6/7] eval: {p.eval_episodes} test-fold games each, up to {p.max_steps} steps")
  out = os.path.join(work, "eval")
  os.makedirs(out, exist_ok=True)
  results = {}
  models = {"teacher": teacher, **{k: os.path.join(v, "final") for k, v in runs.items()}}
  envs: list = []  # started on first use, shared by every model (each is a JVM: ~0.6 s)
  try:
    for name, folder in models.items():
      _eval_one(name, folder, p, out, envs, results)
  finally:
    for env in envs:
      env.close()
  return results


def _eval_one(name: str, folder: str, p: Plan, out: str, envs: list, results: dict) -> None:
  from sad_jax.agent import evaluate
  from sad_jax.agent.env import make_env

  path = os.path.join(out, f"{name}.json")
  stamp = os.path.getmtime(os.path.join(folder, "config.json"))
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      r = json.load(f)
    if r.get("episodes") == p.eval_episodes and r.get("model_mtime") == stamp:
      results[name] = r
      _say(f"  {name}: already evaluated (checked)")
      return
  batch = min(16, p.eval_episodes)
  envs.extend(make_env(ENV) for _ in range(batch - len(envs)))
  policy = evaluate.load_policy(folder, max_new_tokens=48, max_prompt_tokens=1024)
  res = evaluate.evaluate(policy, env_spec=ENV, split="test", episodes=p.eval_episodes,
                          max_steps=p.max_steps, batch=batch, envs=envs,
                          transcripts=os.path.join(out, f"{name}.jsonl"), progress=True)
  r = {**dataclasses.asdict(res), "model_mtime": stamp}
  with atomic_write(path) as f:
    json.dump(r, f, indent=1)
  results[name] = r
  _say(f"  {name}: {res.summary()}")


# ----------------------------------------------------------------------------- report


def _span_metrics(run: str) -> dict[str, float]:
  from sad_jax import metrics

  rows = [r for r in metrics.read_jsonl(run) if r["split"] == "validation"]
  last = rows[-1] if rows else {}
  out = {}
  for key, value in last.items():
    if key.endswith("/loss") or key.endswith("/accuracy"):
      out[key] = value
  return out


def _param_count(folder: str) -> int:
  from sad_jax.models.checkpoint_io import load_model

  _, params = load_model(folder)
  import jax

  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


def per_span_eval(folder: str, dataset: str, store: str, *, seq_len: int) -> dict[str, float]:
  """Reason KL to the teacher and action accuracy on the validation split, the same
  measurement for every student (the `sad` objective's eval step with unit weights)."""
  import functools

  import jax
  import jax.numpy as jnp

  from sad_jax import objectives, step
  from sad_jax.data import pipeline
  from sad_jax.losses import LossSettings
  from sad_jax.models.checkpoint_io import load_model

  cfg, params = load_model(folder)
  split = pipeline.open_split(dataset, "validation")
  teacher = pipeline.open_teacher(store, split, k=16)
  layout = pipeline.Layout(accum=1, rows=4, length=seq_len + 1, k=16)
  obj = objectives.Objective(name="sad", groups=objectives.groups_for("sad"),
                             settings=LossSettings(vocab_size=cfg.vocab_size, chunk_size=128))
  fn = jax.jit(functools.partial(step.eval_step, model_cfg=cfg, obj=obj))  # once per model
  total = step.eval_totals(fn(params, jnp.zeros(2), batch, jnp.ones(2))
                           for batch, _ in pipeline.eval_batches(split, teacher, layout))
  n = np.maximum(total["count"], 1)
  return {"reason_kl": float(total["sum"][0] / n[0]),
          "action_accuracy": float(total["correct"][1] / n[1])}


def report(work: str, p: Plan, results: dict[str, dict], runs: dict[str, str], dataset: str,
           store: str, teacher: str, seconds: float) -> str:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  from sad_jax import metrics

  t_params, s_params = _param_count(teacher), _param_count(os.path.join(
      next(iter(runs.values())), "final"))
  rows = []
  spans: dict[str, dict[str, list[float]]] = {}
  for obj in OBJECTIVES:
    names = [f"{obj}_s{s}" for s in p.seeds]
    succ = [results[n]["success_rate"] for n in names]
    wins = sum(results[n]["successes"] for n in names)
    eps = sum(results[n]["episodes"] for n in names)
    from sad_jax.agent.evaluate import wilson

    lo, hi = wilson(wins, eps)
    per = [per_span_eval(os.path.join(runs[n], "final"), dataset, store, seq_len=p.seq_len)
           for n in names]
    spans[obj] = {k: [x[k] for x in per] for k in per[0]}
    rows.append({"model": obj, "success": float(np.mean(succ)), "seeds": succ, "ci": (lo, hi),
                 "reason_kl": float(np.mean(spans[obj]["reason_kl"])),
                 "action_acc": float(np.mean(spans[obj]["action_accuracy"])),
                 "steps": float(np.mean([results[n]["mean_steps"] for n in names])),
                 "invalid": float(np.mean([results[n]["invalid_action_rate"] for n in names]))})
  tr = results["teacher"]
  t_span = per_span_eval(teacher, dataset, store, seq_len=p.seq_len)
  rows.insert(0, {"model": "teacher", "success": tr["success_rate"], "seeds": [],
                  "ci": tuple(tr["ci95"]), "reason_kl": t_span["reason_kl"],
                  "action_acc": t_span["action_accuracy"], "steps": tr["mean_steps"],
                  "invalid": tr["invalid_action_rate"]})
  header = ("| model | params | success (95% CI) | per seed | reason KL → teacher | action acc "
            "| mean steps | invalid actions |\n|---|---:|---:|---|---:|---:|---:|---:|")
  lines = [header]
  for r in rows:
    params = t_params if r["model"] == "teacher" else s_params
    lines.append(f"| {r['model']} | {params / 1e6:.2f} M | {100 * r['success']:.1f}% "
                 f"({100 * r['ci'][0]:.0f}–{100 * r['ci'][1]:.0f}) | "
                 + (" / ".join(f"{100 * s:.0f}%" for s in r["seeds"]) or "–")
                 + f" | {r['reason_kl']:.3f} | {r['action_acc']:.3f} | {r['steps']:.1f} | "
                 f"{100 * r['invalid']:.0f}% |")
  table = "\n".join(lines)

  # plots
  fig, axes = plt.subplots(1, 3, figsize=(15, 4))
  for ax, obj in zip(axes, OBJECTIVES):
    rows_m = metrics.read_jsonl(runs[f"{obj}_s{p.seeds[0]}"])
    train_rows = [r for r in rows_m if r["split"] == "train" and "loss" in r]
    for key in sorted({k for r in train_rows for k in r if k.endswith("/loss")}):
      ax.plot([r["step"] for r in train_rows], [r[key] for r in train_rows], label=key)
    ax.set_title(f"{obj} (seed {p.seeds[0]}): per-span training loss")
    ax.set_xlabel("step")
    ax.legend()
  fig.tight_layout()
  curves = os.path.join(work, "loss_curves.png")
  fig.savefig(curves, dpi=90)
  plt.close(fig)
  fig, ax = plt.subplots(figsize=(6, 4))
  names = [r["model"] for r in rows]
  vals = [100 * r["success"] for r in rows]
  err = [[100 * (r["success"] - r["ci"][0]) for r in rows],
         [100 * (r["ci"][1] - r["success"]) for r in rows]]
  ax.bar(names, vals, yerr=err, capsize=6, color=["#555", "#2a7", "#27a", "#a72"])
  ax.set_ylabel("success rate on test-fold games (%)")
  ax.set_ylim(0, 100)
  ax.set_title("Agent success with 95% Wilson intervals")
  fig.tight_layout()
  bars = os.path.join(work, "success_rates.png")
  fig.savefig(bars, dpi=90)
  plt.close(fig)

  best = max(rows[1:], key=lambda r: r["success"])
  sad = next(r for r in rows if r["model"] == "sad")
  kd = next(r for r in rows if r["model"] == "token_kd")
  ranking = ", ".join(r["model"] for r in sorted(rows[1:], key=lambda r: -r["success"]))
  if len({r["success"] for r in rows}) == 1:
    verdict = [f"- Every model, the teacher included, succeeds on {100 * rows[0]['success']:.0f}%"
               " of the games: success does not rank the objectives in this run. Rank them by"
               " the per-span columns instead (higher action accuracy, lower reason KL)."]
  else:
    students = {r["success"] for r in rows[1:]}
    verdict = [
        f"- The three students tie at {100 * rows[1]['success']:.1f}% success: success does "
        "not rank the objectives in this run; the per-span columns do." if len(students) == 1
        else f"- Ranking by success: {ranking} (best student: {best['model']}).",
        f"- sad vs token_kd on success: {100 * sad['success']:.1f}% vs "
        f"{100 * kd['success']:.1f}% ({'met' if sad['success'] >= kd['success'] else 'not met'}"
        ": sad ≥ token_kd).",
        f"- sad vs teacher: {100 * (rows[0]['success'] - sad['success']):.1f} points behind "
        f"({'met' if rows[0]['success'] - sad['success'] <= 0.10 else 'not met'}: within 10).",
    ]
  pieces = " (multi-word pieces)" if p.multiword else ""
  md = f"""# sad-jax demo report

Environment: TextWorld-Express `{ENV}`. Training data: {p.train_episodes} episodes of a
search expert that decides from what it reads (train fold; {NOISE:.0%} of its moves random,
so the data shows recovering from mistakes), tokenized by a {p.vocab}-piece sentencepiece model
trained on them{pieces}. Evaluation: {p.eval_episodes} test-fold games
per model, up to {p.max_steps} steps each.
Teacher: {t_params / 1e6:.2f} M parameters, SFT for {p.teacher_steps} steps. Students:
{s_params / 1e6:.2f} M parameters ({t_params / s_params:.1f}× fewer), {p.student_steps} steps
each, seeds {list(p.seeds)}; the same data, batch ({p.batch} × {p.seq_len + 1} tokens),
learning-rate schedule and curriculum for all three objectives. Reason KL and action
accuracy: the validation split, one measurement for every model. Total time
{seconds / 60:.1f} min.

{table}

{chr(10).join(verdict)}

![per-span loss curves](loss_curves.png)

![success rates](success_rates.png)
"""
  with atomic_write(os.path.join(work, "report.md")) as f:
    f.write(md)
  return table + "\n" + "\n".join(verdict)


def run(workdir: str = "runs/demo", *, quick: bool = False) -> str:
  t0 = time.perf_counter()
  work = os.path.abspath(os.path.join(workdir, "quick" if quick else "default"))
  os.makedirs(work, exist_ok=True)
  p = plan(quick)
  _say(f"sad-jax demo{' --quick' if quick else ''}: workdir {work}")
  import jax

  # the three seeds of an objective compile the same step, and the students' evaluations
  # the same prefill and decode: XLA's persistent cache compiles each once. Restored after,
  # for a caller that goes on in this process.
  saved = {k: getattr(jax.config, k) for k in ("jax_compilation_cache_dir",
                                               "jax_persistent_cache_min_compile_time_secs")}
  jax.config.update("jax_compilation_cache_dir", os.path.join(work, "xla_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  try:
    return _stages(work, p, t0)
  finally:
    for k, v in saved.items():
      jax.config.update(k, v)


def _stages(work: str, p: Plan, t0: float) -> str:
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  if repo not in sys.path:
    sys.path.insert(0, repo)  # configs/
  data = stage_data(work, p)
  dataset = stage_prepare(work, p, data)
  teacher = stage_teacher(work, p, dataset)
  store = stage_store(work, p, dataset, teacher)
  runs = stage_students(work, p, dataset, store)
  results = stage_eval(work, p, teacher, runs)
  _say("[7/7] report")
  text = report(work, p, results, runs, dataset, store, teacher, time.perf_counter() - t0)
  _say(text)
  _say(f"report: {os.path.join(work, 'report.md')} (plots: loss_curves.png, "
       f"success_rates.png); {(time.perf_counter() - t0) / 60:.1f} min")
  return text


def main_args(args: Any) -> int:
  run(args.workdir, quick=args.quick)
  return 0
