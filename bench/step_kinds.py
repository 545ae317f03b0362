"""Where a train step's time goes, by kind of work, for sad_jax and the PyTorch peer alike
(bench/train_step.py --profile): the measured profile behind the ratio of the two.

Kinds: matmuls outside the attention core (projections, MLP, the LM head), the attention
core (its matmuls, softmax and masking together: the peer's SDPA kernel fuses them), the
other element-wise and layout ops (norms, activations, RoPE, residual adds, the loss's
element-wise work, embedding, copies), the optimizer with clipping, and "between ops": the
step's wall time that no op accounts for (Python, dispatch, thread hand-offs, waits). Where
ops ran at the same time, their times sum past the wall time ("overlap_s").

sad_jax: one jax.profiler trace; each executed XLA op (a thunk of the CPU runtime) is a
kind by its HLO name stack (bench/attention_profile.part_of) and whether it is a matmul (a
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
import time
from collections.abc import Callable

KINDS = ("matmuls: projections, MLP, head", "attention core", "element-wise and layout",
         "optimizer and clipping", "between ops")
TORCH_MATMULS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::addbmm")
TORCH_WRAPPERS = ("aten::linear", "aten::matmul")


def jax_kind(part: str, matmul: bool) -> str:
  """The kind of an XLA op from its step part (bench/attention_profile.part_of)."""
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
  from bench import attention_profile

  ops = attention_profile.hlo_ops(compiled.as_text())
  t = attention_profile.traced_op_ns({"step": run}, {"step": ops}, rounds)["step"]
  best = min(range(len(t["walls"])), key=t["walls"].__getitem__)
  kinds, core_matmuls = collections.Counter(), 0.0
  for op, ns in t["rounds"][best].items():
    op_name, matmul = ops[op][1:]
    part = attention_profile.part_of(op_name, matmul)
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
