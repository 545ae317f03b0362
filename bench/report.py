"""Regenerate BENCHMARKS.md from the benchmark scripts in one command.

  python bench/report.py [--quick] [--only NAME,...] [--render-only] [--out BENCHMARKS.md]

Runs each script of SCRIPTS as a subprocess, one after another (they time the same cores,
so never in parallel), with the arguments BENCHMARKS.md documents, collects the JSON each
writes with `--json`, and writes the markdown file atomically. A full run caches each
script's result in bench/results/NAME.json; `--only` reruns the named scripts and takes the
other sections from that cache. `--quick` passes the smallest arguments (a smoke test: its
figures mean nothing, it does not touch the cache, and the header says so).
"""

from __future__ import annotations

import argparse
import collections
import importlib.metadata
import json
import os
import platform
import queue
import shlex
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from report_sections import RENDER, para  # noqa: E402

from sad_jax.trainer.metrics import cpu_model  # noqa: E402

RESULTS = os.path.join(ROOT, "bench", "results")

# name: (title, documented arguments, quick arguments), in the order of BENCHMARKS.md
SCRIPTS = {
    "prepare_throughput": ("Import + prepare throughput (issue 2)", ["--repeats", "9"],
                           ["--repeats", "1", "--copies", "1"]),
    "loss_memory": ("Loss memory and step time (issue 4)", ["--repeats", "3"],
                    ["--repeats", "1"]),
    "decode": ("Decode (issues 3 and 23)", ["--repeats", "3"],
               ["--repeats", "1", "--new", "8", "--batches", "1"]),
    "teacher_store": ("Teacher-logit store (issue 5)", ["--steps", "300", "--repeats", "2"],
                      ["--steps", "12", "--repeats", "1"]),
    "train_step": ("Train step (issues 6 and 23)",
                   ["--shapes", "S,M", "--mix", "synthetic,demo,fireact", "--repeats", "3",
                    "--steps", "2", "--peer", "--full-head", "--profile", "3"],
                   ["--shapes", "S", "--mix", "synthetic", "--repeats", "1", "--steps", "1",
                    "--peer", "--profile", "1"]),
    "compile_time": ("Compile time vs depth, scanned layers (issue 21.3)",
                     ["--depths", "2,4,8,16", "--repeats", "2"],
                     ["--depths", "2,4", "--repeats", "1", "--step-repeats", "1"]),
    "real_teacher_store": ("The real teacher's store: SmolLM2-135M-Instruct on FireAct "
                           "(issue 20.3)", ["--trajectories", "64"], ["--trajectories", "12"]),
}
HEARTBEAT_S = 60  # print elapsed time when a script has been silent this long


# ---------------------------------------------------------------- machine and versions



def versions() -> str:
  out = [f"Python {platform.python_version()}"]
  for pkg, label in (("jax", "JAX"), ("jaxlib", "jaxlib"), ("torch", "torch")):
    try:
      out.append(f"{label} {importlib.metadata.version(pkg)}")
    except importlib.metadata.PackageNotFoundError:
      out.append(f"{label} not installed")
  return ", ".join(out)


def utc_now() -> str:
  return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())


# ---------------------------------------------------------------- running the scripts

def command(name: str, args: list[str]) -> str:
  return shlex.join(["python", f"bench/{name}.py", *args])


def run_script(name: str, args: list[str], json_path: str, label: str) -> tuple[int, str]:
  """Run one script, echoing its output with the elapsed time; (exit code, output tail)."""
  print(f"{label} {command(name, args)}", flush=True)
  t0 = time.monotonic()
  p = subprocess.Popen([sys.executable, f"bench/{name}.py", *args, "--json", json_path],
                       cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  lines: queue.Queue = queue.Queue()

  def pump():
    for line in p.stdout:
      lines.put(line.rstrip())
    lines.put(None)

  threading.Thread(target=pump, daemon=True).start()
  tail = collections.deque(maxlen=20)
  while True:
    try:
      line = lines.get(timeout=HEARTBEAT_S)
    except queue.Empty:
      print(f"  [{name} {time.monotonic() - t0:5.0f} s] (running)", flush=True)
      continue
    if line is None:
      break
    tail.append(line)
    print(f"  [{name} {time.monotonic() - t0:5.0f} s] {line}", flush=True)
  rc = p.wait()
  print(f"{label} {name}: {'done' if rc == 0 else f'FAILED (exit {rc})'} in "
        f"{time.monotonic() - t0:.0f} s", flush=True)
  return rc, "\n".join(tail)


def write_atomic(path: str, text: str) -> None:
  """Write via a temporary file in the same folder, so a reader never sees half a file."""
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".report.",
                             suffix=".tmp")
  try:
    with os.fdopen(fd, "w") as f:
      f.write(text)
    os.chmod(tmp, 0o644)  # mkstemp's 0600 would otherwise become the file's mode
    os.replace(tmp, path)
  except BaseException:
    os.unlink(tmp)
    raise


def load_cached(name: str) -> dict | None:
  try:
    with open(os.path.join(RESULTS, f"{name}.json")) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def render_section(name: str, rec: dict | None, failure: str | None) -> str:
  title = SCRIPTS[name][0]
  parts = [f"## {title}"]
  if failure:
    parts.append(f"This run could not regenerate this section: {failure}")
  if rec is None:
    parts.append(para(f"""Not run yet: there is no result for `{name}`
        (bench/results/{name}.json). Run `python bench/report.py --only {name}`."""))
    return "\n\n".join(parts)
  quick = " **Quick run: a smoke test, not measurements.**" if rec["quick"] else ""
  parts.append(para(f"`{rec['command']}` — {rec['date']}, {rec['cpu']}, {rec['cores']} cores, "
                    f"took {rec['elapsed_s']:.0f} s.{quick}"))
  try:
    parts.append(RENDER[name](rec["result"]))
  except (KeyError, TypeError, ZeroDivisionError) as e:  # e.g. a cache from an older script
    parts.append(f"Could not render this result ({type(e).__name__}: {e}).")
  return "\n\n".join(parts)


def render(records: dict, failures: dict, regenerated: list[str], quick: bool, argv: str,
           elapsed: float) -> str:
  head = ["# Benchmarks", para(f"""Generated {utc_now()} by `{argv}` ({elapsed / 60:.1f} min)
      on {cpu_model()}, {os.cpu_count()} cores; {versions()}. Do not edit by hand: change the
      scripts in `bench/` or the prose in `bench/report_sections.py`, then rerun.""")]
  if quick:
    head.append(para("""**Quick run (`--quick`): the regenerated sections use the smallest
        arguments; their figures are a smoke test, not measurements.**"""))
  kept = [n for n in SCRIPTS if n not in regenerated]
  if kept:
    head.append(para(f"""Regenerated by this command: {', '.join(regenerated) or 'none'}. The
        other sections come from the last full run of each script, cached in `bench/results/`,
        and give their own dates."""))
  head.append(para("""Each figure comes from a script in `bench/`, run on the machine named
      with it. Scripts print ratios measured in one run; nothing here is a timed test. A ✓ or ✗
      says whether this run met the target stated in the script's docstring and its issue."""))
  sections = [render_section(n, records.get(n), failures.get(n)) for n in SCRIPTS]
  return "\n\n".join(head + sections) + "\n"


# ---------------------------------------------------------------- main

def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--quick", action="store_true", help="smallest arguments (smoke test)")
  ap.add_argument("--only", default=None, help=f"comma-separated subset of {','.join(SCRIPTS)}")
  ap.add_argument("--out", default=os.path.join(ROOT, "BENCHMARKS.md"))
  ap.add_argument("--render-only", action="store_true",
                  help="run nothing: every section from bench/results/ (after a prose change)")
  args = ap.parse_args()
  names = list(SCRIPTS) if not args.only else args.only.split(",")
  if args.render_only:
    names = []
  unknown = [n for n in names if n not in SCRIPTS]
  if unknown:
    ap.error(f"unknown script(s) {', '.join(unknown)}; choose from {', '.join(SCRIPTS)}")
  names = [n for n in SCRIPTS if n in names]  # always in the file's order
  argv = shlex.join(["python", "bench/report.py", *sys.argv[1:]])
  os.makedirs(RESULTS, exist_ok=True)

  records = {n: load_cached(n) for n in SCRIPTS if n not in names}
  failures = {}
  t_all = time.monotonic()
  with tempfile.TemporaryDirectory(prefix="bench_report_") as tmp:
    for i, name in enumerate(names, 1):
      script_args = SCRIPTS[name][2 if args.quick else 1]
      json_path = os.path.join(tmp, f"{name}.json")
      date, t0 = utc_now(), time.monotonic()
      rc, tail = run_script(name, script_args, json_path,
                            f"[{i}/{len(names)} {time.monotonic() - t_all:4.0f} s]")
      try:
        with open(json_path) as f:
          result = json.load(f)
      except (OSError, ValueError) as e:
        result, rc = None, rc or f"no JSON ({e})"
      if rc:
        why = f"exit {rc}" if isinstance(rc, int) else rc
        last = tail.splitlines()[-1] if tail else ""
        failures[name] = f"`{command(name, script_args)}` failed on {date} ({why}): `{last}`."
        records[name] = load_cached(name)  # the last good figures, with their own date
        continue
      rec = {"name": name, "command": command(name, script_args), "date": date,
             "elapsed_s": time.monotonic() - t0, "quick": args.quick, "cpu": cpu_model(),
             "cores": os.cpu_count(), "versions": versions(), "result": result}
      records[name] = rec
      if not args.quick:  # the cache holds full runs only
        write_atomic(os.path.join(RESULTS, f"{name}.json"), json.dumps(rec, indent=1) + "\n")
  elapsed = time.monotonic() - t_all
  write_atomic(args.out, render(records, failures, names, args.quick, argv, elapsed))
  print(f"wrote {args.out} in {elapsed:.0f} s"
        + (f"; failed: {', '.join(failures)}" if failures else ""), flush=True)
  sys.exit(1 if failures else 0)


if __name__ == "__main__":
  main()
