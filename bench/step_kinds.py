"""Where a train step's time goes, by kind of work, for sad_jax and the PyTorch peer alike
(bench/train_step.py --profile): the measured profile behind the ratio of the two.

Kinds: matmuls outside the attention core (projections, MLP, the LM head), the attention
core (its matmuls, softmax and masking together: the peer's SDPA kernel fuses them), the
other element-wise and layout ops (norms, activations, RoPE, residual adds, the loss's
element-wise work, embedding, copies), the optimizer with clipping, and "between ops": the
step's wall time that no op accounts for (Python, dispatch, thread hand-offs, waits). Where
ops ran at the same time, their times sum past the wall time ("overlap_s").

sad_jax: one jax.profiler trace; each executed XLA op (a thunk of the CPU runtime) is a
kind by its HLO name stack (part_of) and whether it is a matmul (a
dot or a fusion around one). The peer: one torch.profiler trace; each op's self time, the
step's phases marked with record_function (peer_torch.make_step(ranges=True)): everything
inside "optimizer" (clipping and AdamW) is the optimizer; outside it, matmul ops (mm, addmm,
bmm) are matmuls, SDPA's ops and their backward the attention core, the own time of
wrappers that only call other ops (aten::linear, aten::matmul, autograd's nodes) is
"between ops", every other op element-wise. Both frameworks report the round with the
least wall time of `rounds`.
"""

from __future__ import annotations

import collections
import glob
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable

KINDS = ("matmuls: projections, MLP, head", "attention core", "element-wise and layout",
         "optimizer and clipping", "between ops")
TORCH_MATMULS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::addbmm")
TORCH_WRAPPERS = ("aten::linear", "aten::matmul")


def jax_kind(part: str, matmul: bool) -> str:
  """The kind of an XLA op from its step part (part_of)."""
  if part.startswith("attention core"):
    return KINDS[1]
  if part == "optimizer":
    return KINDS[3]
  return KINDS[0] if matmul else KINDS[2]


def _with_between(kinds_s: dict[str, float], wall_s: float) -> dict:
  kinds = {k: kinds_s.get(k, 0.0) for k in KINDS[:-1]}
  ops = sum(kinds.values())
  kinds[KINDS[-1]] = max(0.0, wall_s - ops)  # wrappers' own time included
  # XLA's CPU runtime may run independent ops at once: their times then sum past the wall
  return {"wall_s": wall_s, "kinds_s": kinds, "overlap_s": max(0.0, ops - wall_s)}


def jax_kinds(compiled, run: Callable[[], object], rounds: int) -> dict:
  """{wall_s, kinds_s, overlap_s, attention_core_matmuls_s} of the least-wall round of the
  jitted step `run` (`compiled` its compiled executable), under the mesh context the caller
  set. The last: the part of the attention core spent in its matmuls."""
  ops = hlo_ops(compiled.as_text())
  t = traced_op_ns({"step": run}, {"step": ops}, rounds)["step"]
  best = min(range(len(t["walls"])), key=t["walls"].__getitem__)
  kinds, core_matmuls = collections.Counter(), 0.0
  for op, ns in t["rounds"][best].items():
    op_name, matmul = ops[op][1:]
    part = part_of(op_name, matmul)
    kinds[jax_kind(part, matmul)] += ns / 1e9
    if part == "attention core: matmuls":
      core_matmuls += ns / 1e9
  return _with_between(kinds, t["walls"][best]) | {"attention_core_matmuls_s": core_matmuls}


def torch_kind(name: str, in_optimizer: bool) -> str:
  if in_optimizer:
    return KINDS[3]
  if "scaled_dot_product" in name or "flash_attention" in name:
    return KINDS[1]
  if name in TORCH_MATMULS:
    return KINDS[0]
  if name.startswith("autograd::") or "Backward" in name or name in TORCH_WRAPPERS:
    return KINDS[4]  # a wrapper's own time: dispatch
  return KINDS[2]


def torch_kinds(step: Callable[[dict], float], batch: dict, rounds: int) -> dict:
  """{wall_s, kinds_s} of the least-wall round of the peer's `step` (made with
  ranges=True), after one untimed step."""
  from torch.profiler import ProfilerActivity, profile, record_function

  step(batch)
  walls = []
  with profile(activities=[ProfilerActivity.CPU]) as prof:
    for i in range(rounds):
      t0 = time.perf_counter()
      with record_function(f"profiled_step|{i}"):
        step(batch)
      walls.append(time.perf_counter() - t0)
  events = list(prof.events())
  steps = sorted((e.time_range.start, e.time_range.end, int(e.name.split("|")[1]))
                 for e in events if e.name.startswith("profiled_step|"))
  optim = [(e.time_range.start, e.time_range.end) for e in events if e.name == "optimizer"]
  best = min(range(rounds), key=walls.__getitem__)
  lo, hi, _ = next(x for x in steps if x[2] == best)
  kinds = collections.Counter()
  for e in events:
    start = e.time_range.start
    if not lo <= start <= hi or e.name.startswith("profiled_step|") or e.name in (
        "forward", "backward", "optimizer"):
      continue
    in_opt = any(a <= start <= b for a, b in optim)
    kinds[torch_kind(e.name, in_opt)] += e.self_cpu_time_total / 1e6
  return _with_between(kinds, walls[best])


def kinds_rows(row: dict) -> list[list[str]]:
  """Per kind of work (bench/step_kinds.py): seconds per step of sad_jax and of each peer
  that was profiled (bench/train_step.py's result row), and the GFLOP/s the matmuls and the
  attention core reached (executed FLOPs over their time): a header row, then one per kind
  and the step's wall time."""
  fws = [("sad_jax", row["jax"])] + [(f"peer {v}", p) for v, p in row["peers"].items()]
  fws = [(label, r) for label, r in fws if "profile" in r]
  rate_of = {KINDS[0]: "matmuls", KINDS[1]: "attention"}
  out = []
  for kind in (*KINDS, "step (wall)"):
    cells = [kind]
    for _, r in fws:
      prof, tokens = r["profile"], r["tokens_per_step"]
      sec = prof["wall_s"] if kind == "step (wall)" else prof["kinds_s"][kind]
      share = "" if kind == "step (wall)" else f" ({100 * sec / prof['wall_s']:.0f}%)"
      rate = ""
      if kind in rate_of and sec > 0:
        rate = f", {r['executed_flops_parts'][rate_of[kind]] * tokens / sec / 1e9:.0f} GFLOP/s"
      cells.append((f"{sec:.2f} s" if sec >= 1 else f"{1e3 * sec:.0f} ms") + share + rate)
    out.append(cells)
  return [["kind of work", *(label for label, _ in fws)], *out] if fws else []


# ----------------------------------------------------------------------------- XLA op times
# (shared with bench/attention_profile.py, which reports them per step part)

PARTS = ("embedding", "attention core: matmuls", "attention core: element-wise, layout",
         "QKV/O projections", "RoPE", "MLP", "norms", "residual adds", "head + loss",
         "optimizer", "unattributed")


def hlo_ops(hlo_text: str) -> dict[str, tuple[str, str, bool]]:
  """HLO instruction name → (opcode, op_name metadata, whether it is a matmul: a dot or a
  fusion around one) of a compiled module's text."""
  with_dot, computation = set(), None
  for line in hlo_text.splitlines():
    head = re.match(r"(?:ENTRY )?%([\w.\-]+) .*\{$", line)
    if head:
      computation = head.group(1)
    elif " dot(" in line and computation:
      with_dot.add(computation)
  ops = {}
  for line in hlo_text.splitlines():
    m = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = .*? ([\w\-]+)\(", line)
    if m:
      meta = re.search(r'op_name="([^"]*)"', line)
      calls = re.search(r"calls=%([\w.\-]+)", line)
      matmul = m.group(2) == "dot" or bool(calls and calls.group(1) in with_dot)
      ops[m.group(1)] = (m.group(2), meta.group(1) if meta else "", matmul)
  return ops


def part_of(op_name: str, matmul: bool = False) -> str:
  """The step part an op belongs to, from its name stack (bench/attention_profile.py's
  docstring names the scopes)."""
  in_model = "Transformer.hidden" in op_name or re.search(r"/layers(_\d+)?/", op_name)
  if in_model:
    if "/attn/core/" in op_name:
      return "attention core: " + ("matmuls" if matmul else "element-wise, layout")
    if "/attn/rope/" in op_name:
      return "RoPE"
    if "/attn/" in op_name:
      return "QKV/O projections"
    if "/mlp/" in op_name:
      return "MLP"
    if re.search(r"_norm/", op_name):
      return "norms"
    if re.search(r"/layers(_\d+)?/", op_name):
      return "residual adds"
    return "embedding"
  if "/while/body/" in op_name or "closed_call" in op_name:
    return "head + loss"
  if op_name.startswith("jit(train_step)"):
    return "optimizer"
  return "unattributed"


def traced_op_ns(runs: dict[str, Callable[[], object]], ops: dict[str, dict],
                 rounds: int) -> dict[str, dict]:
  """Per variant: each executed op's least time over `rounds` traced rounds (ns), each
  round's op times and wall seconds, and the best wall and CPU seconds of its step. One
  jax.profiler trace; each round runs every variant's `run` once in turn, after one untimed
  run each. The least over the rounds drops most of what other work on the machine added
  (an op preempted in one round rarely is in all). `ops`: per variant, hlo_ops of its
  compiled module."""
  import jax
  from jax.profiler import ProfileData

  walls, cpus = collections.defaultdict(list), collections.defaultdict(list)
  for run in runs.values():
    jax.block_until_ready(run())
  folder = tempfile.mkdtemp(prefix="step_profile_")
  with jax.profiler.trace(folder):
    for i in range(rounds):
      for name, run in runs.items():
        t0, c0 = time.perf_counter(), time.process_time()
        with jax.profiler.TraceAnnotation(f"profiled_step|{name}|{i}"):
          jax.block_until_ready(run())
        walls[name].append(time.perf_counter() - t0)
        cpus[name].append(time.process_time() - c0)
  path = glob.glob(os.path.join(folder, "**", "*.xplane.pb"), recursive=True)[0]
  events = [ev for plane in ProfileData.from_file(path).planes for line in plane.lines
            for ev in line.events]
  shutil.rmtree(folder, ignore_errors=True)
  spans = sorted((ev.start_ns, ev.end_ns, ev.name.split("|")[1]) for ev in events
                  if ev.name.startswith("profiled_step|"))
  per_round = [collections.Counter() for _ in spans]  # op → ns in that round
  for ev in events:
    for counter, (lo, hi, name) in zip(per_round, spans, strict=True):
      if lo <= ev.start_ns <= hi:
        opcode = ops[name].get(ev.name, (None,))[0]
        # control flow (a while loop's thunk spans its body's ops) would count them twice
        if opcode is not None and opcode not in ("while", "call", "conditional"):
          counter[ev.name] += ev.duration_ns
        break
  out = {}
  for name in runs:
    mine = [c for c, r in zip(per_round, spans, strict=True) if r[2] == name]
    out[name] = {"op_ns": {op: min(c[op] for c in mine) for op in set().union(*mine)},
                 "rounds": mine, "walls": walls[name],
                 "wall_s": min(walls[name]), "cpu_s": min(cpus[name])}
  return out
