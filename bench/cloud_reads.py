"""Reads from gs:// against the same local folder, in one run (issue 41, point 2).

  python bench/cloud_reads.py [--repeats 5] [--json OUT.json]

Prepares FireAct (`sad-jax prepare --config configs/prepare_fireact.py`, ../shared beside
the repo), copies the dataset to a bucket on the GCS emulator (tests/cloud/gcs_emulator.py,
loopback: the network's latency is the emulator's, not a real store's), then times, each
in a fresh process with an empty staging cache, on the local folder and on gs://:

  inspect       `sad-jax inspect DATASET --index 3` (wall, with the CLI's start-up)
  eval reads    the dataset's builder, metadata and tokenizer (`prepare.load_prepared`)
  first batch   `pipeline.open_split` (one pass over the split's records for the packing
                stats) and the first evaluation batch
(the last two after the gs:// client's start-up, timed apart)

Only STORAGE_EMULATOR_HOST is set, as a user would: the other clients take its endpoint
(sad_jax/common/cloud.py). Prints the median seconds and the ratio gs:// / local of each,
and the number of requests a gs:// inspect makes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
FIREACT = os.path.join(ROOT, "..", "shared", "data", "fireact")
BUCKET = "sad-jax-bench"


def _child(op: str, path: str) -> None:
  """One measured operation (after the imports), seconds on stdout."""
  from sad_jax.common import fileio
  from sad_jax.data import prepare
  from sad_jax.trainer import pipeline

  t = time.perf_counter()
  if fileio.is_remote(path):  # the client's one-time start-up (imports, session), apart
    fileio.exists(path)
  setup = time.perf_counter() - t
  t = time.perf_counter()
  if op == "eval_reads":
    prepare.load_prepared(path)
  elif op == "first_batch":
    split = pipeline.open_split(path, "train")
    layout = pipeline.Layout(accum=1, rows=4, length=1024, k=0)
    next(iter(pipeline.eval_batches(split, None, layout, max_batches=1)))
  else:
    raise SystemExit(f"unknown op {op}")
  print(setup, time.perf_counter() - t)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _run(cmd: list[str], env: dict) -> tuple[float, str]:
  t = time.perf_counter()
  r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
  if r.returncode:
    raise SystemExit(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stderr[-2000:]}")
  return time.perf_counter() - t, r.stdout


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--json", default=None)
  args = parser.parse_args()
  if not os.path.isdir(FIREACT):
    sys.exit(f"FireAct data not found at {FIREACT} (needs ../shared beside the repo)")
  work = tempfile.mkdtemp(prefix="bench_cloud_")
  cli = [sys.executable, "-m", "sad_jax.cli"]
  from sad_jax.common import cloud

  env = {k: v for k, v in os.environ.items() if k not in cloud.CLIENT_VARS}
  local = os.path.join(work, "fireact")
  _run([*cli, "prepare", "--config", os.path.join(ROOT, "sad_jax/configs/prepare_fireact.py"),
        "--out", local], env)

  port = _free_port()
  url = f"http://127.0.0.1:{port}"
  log = open(os.path.join(work, "emulator.log"), "wb")
  emulator = subprocess.Popen([sys.executable, os.path.join(ROOT, "tests/cloud/gcs_emulator.py"),
                               str(port), BUCKET], stdout=log, stderr=subprocess.STDOUT)
  try:
    for _ in range(600):
      try:
        urllib.request.urlopen(url, timeout=1).read()
        break
      except OSError:
        time.sleep(0.05)
    env["STORAGE_EMULATOR_HOST"] = url
    os.environ["STORAGE_EMULATOR_HOST"] = url
    from sad_jax.common import fileio

    remote = f"gs://{BUCKET}/fireact"
    with fileio.atomic_dir(remote) as tmp:
      for name in os.listdir(local):
        if name != fileio.COMPLETE_MARKER:
          shutil.copy(os.path.join(local, name), os.path.join(tmp, name))

    ops = {
        "inspect": lambda p: [*cli, "inspect", p, "--index", "3"],
        "eval_reads": lambda p: [sys.executable, __file__, "--child", "eval_reads", p],
        "first_batch": lambda p: [sys.executable, __file__, "--child", "first_batch", p],
    }
    times: dict[str, dict[str, list[float]]] = {op: {"local": [], "gs": []} for op in ops}
    setup: list[float] = []
    for r in range(args.repeats):  # interleaved: drift hits both sides alike
      for op, cmd in ops.items():
        for side, path in (("local", local), ("gs", remote)):
          run_env = dict(env, SAD_JAX_CACHE=os.path.join(work, f"cache_{op}_{side}_{r}"))
          wall, out = _run(cmd(path), run_env)
          if op == "inspect":
            times[op][side].append(wall)
          else:
            first, rest = (float(x) for x in out.split()[-2:])
            times[op][side].append(rest)
            if side == "gs":
              setup.append(first)
  finally:
    emulator.terminate()
    emulator.wait(timeout=10)
    log.close()

  from sad_jax.trainer.metrics import cpu_model

  print(f"cloud reads, gs:// (GCS emulator, loopback) against local; median of {args.repeats};"
        f" {cpu_model()} ({os.cpu_count()} cores), Python {platform.python_version()}")
  print(f"{'operation':<14}{'local s':>10}{'gs:// s':>10}{'gs / local':>12}")
  rows = {}
  for op, sides in times.items():
    lo, gs = statistics.median(sides["local"]), statistics.median(sides["gs"])
    rows[op] = {"local_s": lo, "gs_s": gs, "ratio": gs / lo, "all": sides}
    print(f"{op:<14}{lo:>10.3f}{gs:>10.3f}{gs / lo:>11.2f}×")
  print(f"(eval reads and first batch exclude the gs:// client's start-up, its first "
        f"request with the imports and session it needs: median {statistics.median(setup):.3f}"
        " s, paid once per process; inspect's wall time includes it)")
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump({"repeats": args.repeats, "cpu": cpu_model(), "results": rows,
                 "client_setup_s": setup}, f, indent=1)
  shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
  if len(sys.argv) > 3 and sys.argv[1] == "--child":
    _child(sys.argv[2], sys.argv[3])
  else:
    main()
