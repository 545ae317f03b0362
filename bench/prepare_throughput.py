"""Import + prepare throughput on the FireAct file, in one process.

  python bench/prepare_throughput.py [--repeats 5] [--copies 10] [--json OUT.json]

Measures, interleaved and repeated (spread on these machines reaches 20–35%):
  import    FireAct alpaca JSON → trajectories
  prepare   import + render + tokenize + segment + features + TFDS/ArrayRecord write,
            with an existing tokenizer (the steady state of `sad-jax prepare`)
and prints trajectories/s and tokens/s (best and median) and the ratio to the target of
2,000 trajectories/s. `--copies N` also runs a corpus of N copies of the file (distinct
ids) to separate fixed per-run costs from per-trajectory costs. `--json` writes every figure
(and the arguments) to a file.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sad_jax.common import fileio
from sad_jax.configs import prepare_base
from sad_jax.data import importers, prepare, render, schema
from sad_jax.data.tokenizer import train_sentencepiece
from sad_jax.trainer.metrics import cpu_model

FIREACT = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "fireact",
                       "hotpotqa_react_alpaca.json")
TARGET = 2000.0




def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--copies", type=int, default=10)
  parser.add_argument("--json", default=None, help="write all results here")
  args = parser.parse_args()
  if not os.path.exists(FIREACT):
    sys.exit(f"FireAct data not found at {FIREACT} (needs ../shared beside the repo)")

  work = tempfile.mkdtemp(prefix="bench_prepare_")
  trajs = importers.import_file(FIREACT)
  tok_path = os.path.join(work, "tok.model")
  t0 = time.perf_counter()
  train_sentencepiece([render.render_react(t).text for t in trajs], vocab_size=2000,
                      out_path=tok_path)
  train_s = time.perf_counter() - t0

  # A larger corpus of copies with distinct ids, written in the schema format.
  copies = []
  for c in range(args.copies):
    for t in trajs:
      copies.append(schema.Trajectory(id=f"{t.id}-{c}", segments=t.segments, source=t.source,
                                      success=t.success))
  big = os.path.join(work, "copies.jsonl")
  schema.write_jsonl(big, copies)

  def config(path):
    cfg = prepare_base.get_config()
    cfg.inputs = (path,)
    cfg.tokenizer.path = tok_path
    cfg.max_len = 1024
    return cfg

  runs = {"import": [], "prepare": [], "prepare_copies": []}
  tokens = {}
  for _ in range(args.repeats):
    t0 = time.perf_counter()
    n = len(importers.import_file(FIREACT))
    runs["import"].append(n / (time.perf_counter() - t0))
    for name, path in (("prepare", FIREACT), ("prepare_copies", big)):
      out = os.path.join(work, name)
      t0 = time.perf_counter()
      report = prepare.prepare(config(path), out, progress=False)
      dt = time.perf_counter() - t0
      n = sum(report.written.values())
      tokens[name] = sum(report.tokens.values())
      runs[name].append(n / dt)
      shutil.rmtree(out)
  shutil.rmtree(work)

  print(f"machine: {cpu_model()}, {os.cpu_count()} cores; python {platform.python_version()}")
  print(f"tokenizer training (vocab 2000, 500 trajectories): {train_s:.2f} s (one-off)")
  rows, stages = [], []
  for name, rates in runs.items():
    best, med = max(rates), statistics.median(rates)
    n_traj = 500 * (args.copies if name == "prepare_copies" else 1)
    tok_rate = "" if name == "import" else f"{best * tokens[name] / n_traj:,.0f}"
    rows.append({"stage": name, "trajectories": n_traj, "best_traj_per_s": round(best),
                 "median_traj_per_s": round(med), "best_tokens_per_s": tok_rate,
                 "ratio_to_target_best": round(best / TARGET, 2)})
    stages.append({"stage": name, "trajectories": n_traj, "tokens": tokens.get(name),
                   "traj_per_s": rates, "best_traj_per_s": best, "median_traj_per_s": med,
                   "best_tokens_per_s": None if name == "import" else best * tokens[name] / n_traj,
                   "ratio_to_target_best": best / TARGET})
    print(f"{name:15s} n={n_traj:5d}  best {best:8,.0f} traj/s  median {med:8,.0f} traj/s  "
          f"tokens/s {tok_rate:>10s}  best/target {best / TARGET:.2f}")
  print(json.dumps(rows))
  if args.json:
    out = {"args": {"repeats": args.repeats, "copies": args.copies},
           "machine": cpu_model(), "cores": os.cpu_count(),
           "python": platform.python_version(), "file_trajectories": len(trajs),
           "tokenizer_vocab": 2000, "max_len": 1024, "tokenizer_train_s": train_s,
           "target_traj_per_s": TARGET, "stages": stages}
    fileio.json_dump(args.json, out, indent=1)  # whole or not at all


if __name__ == "__main__":
  main()
