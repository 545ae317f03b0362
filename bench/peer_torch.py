"""The PyTorch peer of `bench/train_step.py`: the train step a user of the PyTorch stack would
write for the same job, at the same shape, dtype and thread count.

transformers' `LlamaForCausalLM` (SDPA attention, untied head) → full [B, T, V] logits →
span losses written plainly in PyTorch (forward KL with the teacher's top-k plus a tail
bucket on reason targets, cross-entropy on action and answer targets, other targets masked;
each group averaged over its tokens) → backward → global-norm clipping →
`torch.optim.AdamW`. It is the project's `sad` step (issue 4's loss) without the small
curriculum term.

Variants (issue 23.3), the same model, losses and AdamW hyper-parameters:
  previous  the step as first written: `model(input_ids, position_ids)` with the packed
            batch's position ids (restarting at each trajectory), log-softmax over every
            row, AdamW and clipping with torch's CPU defaults (a per-tensor loop).
  best      the fastest honest eager variant found: what a plain HF user writes,
            `model(input_ids=…, use_cache=False)` (SDPA's `is_causal` path, no KV cache
            built), the teacher's ids and the label gathered at once, the log-softmax only
            over the rows that have a loss target, fused AdamW (its CPU kernel).
  compiled  best's model inputs and optimizer with the forward + loss under
            `torch.compile` (inductor; the `gather_once` loss: the row selection's
            data-dependent shape would break the graph, not tried). At S it compiled in about 3 min
            on a loaded 2-core machine and ran within noise of `best` (about 5% faster in
            CPU time, ±10% noise), so it is an option of --peer-variants, not the default.
Interleaved A/B timings (2026-12-02, CPU seconds at one thread, minimum of 6–30 rounds, on
a 2-core machine shared with other jobs: ±10% noise): fused AdamW made the optimizer step
3.3× faster at S (52 → 16 ms; at two threads under contention the per-tensor loop took 328
ms against 29: its hundreds of small parallel ops each wait for both threads); the loss's
forward + backward took 0.66–0.77× the previous loss's time at S and, at M, 0.65× on FireAct's
layout and 0.40× on the demo's (fewer target rows), but 0.91× on the synthetic mix, where
`gather_once` alone did better (0.78×); dropping the position ids and the KV cache was
within the noise (the model's forward + backward at S). The whole step at S: within the
noise of `previous` (0.98× minimum, 1.03× median over 10 rounds), the changes adding up to
about 5% of it. Foreach AdamW or clipping was no faster than the loop.
All attend causally over the whole packed row (sad_jax attends block-diagonally per
trajectory, which is not more work for the peer): in `previous` the restarting position
ids do not make transformers build a per-trajectory mask, because the KV cache that
`use_cache=True` (the config's default, even in training) builds switches its packed-
sequence detection off. So the variants differ only in the rotary positions (restarting or
0…T−1); at the same positions their losses agree to float rounding
(tests/test_bench_train_step.py), and each worker of bench/train_step.py checks its first
loss against the previous loss formula.

Needs the `hf` extra (torch 2.13.0 CPU, transformers).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable

import numpy as np


@dataclasses.dataclass(frozen=True)
class Variant:
  """One way to write the step. Every variant computes the full [B, T, V] logits, the same
  masked losses and AdamW with the same hyper-parameters."""

  positions: bool = True         # pass the batch's position ids (restarting per trajectory)
  use_cache: bool | None = None  # None: the config's default (True: a DynamicCache in training)
  loss: str = "previous"         # previous | gather_once | rows (see LOSSES)
  adamw: str = "loop"            # loop (torch's CPU default) | foreach | fused
  clip_foreach: bool | None = None  # clip_grad_norm_'s foreach (None: its default)
  compile: bool = False          # torch.compile the forward + loss (inductor, C++ on CPU)


# chosen by interleaved A/B timings at shape S (the module docstring): each change that is
# off in `best` was slower or within noise
VARIANTS = {
    "previous": Variant(),
    "best": Variant(positions=False, use_cache=False, loss="rows", adamw="fused"),
    "compiled": Variant(positions=False, use_cache=False, loss="gather_once", adamw="fused",
                        compile=True),
}


def matmul_peak(dtype: str = "float32", n: int = 1024, repeats: int = 5) -> float:
  """FLOP/s of the best of `repeats` n×n×n torch matmuls (warmed)."""
  import torch

  a = torch.ones((n, n), dtype=getattr(torch, dtype))
  a @ a
  best = math.inf
  for _ in range(repeats):
    t0 = time.perf_counter()
    a @ a
    best = min(best, time.perf_counter() - t0)
  return 2.0 * n**3 / best


def build(shape: dict, dtype: str, seed: int = 0,
          variant: Variant = VARIANTS["previous"]) -> tuple:
  """(model, optimizer) of `shape`, initialised from `seed`."""
  import torch
  from transformers import LlamaConfig, LlamaForCausalLM

  torch.manual_seed(seed)
  cfg = LlamaConfig(vocab_size=shape["vocab"], hidden_size=shape["d"],
                    intermediate_size=shape["ffn"], num_hidden_layers=shape["layers"],
                    num_attention_heads=shape["heads"], num_key_value_heads=shape["kv"],
                    max_position_embeddings=shape["seq"], tie_word_embeddings=False,
                    rms_norm_eps=1e-6, attn_implementation="sdpa")
  model = LlamaForCausalLM(cfg).to(getattr(torch, dtype))
  model.train()
  decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
  no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
  impl = {"loop": {"foreach": False}, "foreach": {"foreach": True},
          "fused": {"fused": True}}[variant.adamw]
  opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01},
                           {"params": no_decay, "weight_decay": 0.0}],
                          lr=1e-4, betas=(0.9, 0.98), eps=1e-8, **impl)
  return model, opt


def topk_kl(q_top, t_logp):
  """KL(p ‖ q) over the teacher's k entries plus one bucket for the rest, per row."""
  import torch

  p_mass = torch.logsumexp(t_logp, -1, keepdim=True)
  q_mass = torch.logsumexp(q_top, -1, keepdim=True)
  p = torch.cat([t_logp, torch.log(-torch.expm1(p_mass.clamp(max=-1e-6)))], -1)
  q = torch.cat([q_top, torch.log(-torch.expm1(q_mass.clamp(max=-1e-6)))], -1)
  return (p.exp() * (p - q)).sum(-1)


def target_masks(batch: dict, reason_kinds, action_kinds) -> tuple:
  """[B, T] masks of the reason targets (with a teacher record) and the action targets."""
  import torch

  kinds = batch["label_kinds"]
  reason = torch.isin(kinds, torch.tensor(reason_kinds)) & batch["teacher_mask"]
  return reason, torch.isin(kinds, torch.tensor(action_kinds))


def span_loss(logits_btv, batch, reason_kinds, action_kinds):
  """Mean top-k KL on reason targets + mean CE on action targets, the log-softmax over
  every row (the previous step's loss)."""
  import torch

  logq = torch.log_softmax(logits_btv.float(), dim=-1)
  reason, action = target_masks(batch, reason_kinds, action_kinds)
  kl = topk_kl(torch.gather(logq, -1, batch["teacher_ids"]), batch["teacher_logp"].float())
  nll = -torch.gather(logq, -1, batch["labels"][..., None])[..., 0]
  reason_loss = (kl * reason).sum() / reason.sum().clamp(min=1)
  action_loss = (nll * action).sum() / action.sum().clamp(min=1)
  return reason_loss + action_loss


def span_loss_gather_once(logits_btv, batch, reason_kinds, action_kinds):
  """The same loss with the teacher's ids and the label gathered in one gather: its
  backward scatters into one [B, T, V] gradient instead of two that are then added."""
  import torch

  logq = torch.log_softmax(logits_btv.float(), dim=-1)
  reason, action = target_masks(batch, reason_kinds, action_kinds)
  g = torch.gather(logq, -1, torch.cat([batch["teacher_ids"], batch["labels"][..., None]], -1))
  kl = topk_kl(g[..., :-1], batch["teacher_logp"].float())
  reason_loss = (kl * reason).sum() / reason.sum().clamp(min=1)
  action_loss = (-g[..., -1] * action).sum() / action.sum().clamp(min=1)
  return reason_loss + action_loss


def span_loss_rows(logits_btv, batch, reason_kinds, action_kinds):
  """gather_once with the log-softmax over the rows that have a loss target only: the
  logits are still computed at every position, but the other rows skip the normalisation
  and its backward."""
  import torch

  reason, action = target_masks(batch, reason_kinds, action_kinds)
  sel = (reason | action).flatten().nonzero()[:, 0]
  logq = torch.log_softmax(logits_btv.flatten(0, 1)[sel].float(), dim=-1)
  ids = torch.cat([batch["teacher_ids"], batch["labels"][..., None]], -1).flatten(0, 1)[sel]
  g = torch.gather(logq, -1, ids)
  reason, action = reason.flatten()[sel], action.flatten()[sel]
  kl = topk_kl(g[:, :-1], batch["teacher_logp"].flatten(0, 1)[sel].float())
  reason_loss = (kl * reason).sum() / reason.sum().clamp(min=1)
  action_loss = (-g[:, -1] * action).sum() / action.sum().clamp(min=1)
  return reason_loss + action_loss


LOSSES = {"previous": span_loss, "gather_once": span_loss_gather_once, "rows": span_loss_rows}


def to_torch_batch(host: dict) -> dict:
  """The JAX bench's packed batch ([1, B, T+1] rows) as shifted torch inputs/targets."""
  import torch

  ids = torch.from_numpy(np.asarray(host["ids"][0], np.int64))
  return {
      "inputs": ids[:, :-1].contiguous(),
      "positions": torch.from_numpy(np.asarray(host["positions"][0][:, :-1], np.int64)),
      "labels": ids[:, 1:].contiguous(),
      "label_kinds": torch.from_numpy(np.asarray(host["kinds"][0][:, 1:], np.int64)),
      "teacher_ids": torch.from_numpy(np.asarray(host["teacher_ids"][0][:, 1:], np.int64)),
      "teacher_logp": torch.from_numpy(np.asarray(host["teacher_logp"][0][:, 1:], np.float32)),
      "teacher_mask": torch.from_numpy(np.asarray(host["teacher_mask"][0][:, 1:], bool)),
  }


def model_inputs(batch, variant: Variant) -> dict:
  kw = {"input_ids": batch["inputs"]}
  if variant.use_cache is not None:
    kw["use_cache"] = variant.use_cache
  if variant.positions:
    kw["position_ids"] = batch["positions"]
  return kw


def make_step(model, opt, reason_kinds, action_kinds,
              variant: Variant = VARIANTS["previous"],
              ranges: bool = False) -> Callable[[dict], float]:
  """step(batch) → the loss before the update (a float). `ranges`: mark the forward,
  backward and optimizer phases for torch.profiler (bench/step_kinds.py)."""
  import contextlib

  import torch

  def phase(name: str):
    return torch.profiler.record_function(name) if ranges else contextlib.nullcontext()

  loss_fn = LOSSES[variant.loss]
  reason_kinds, action_kinds = tuple(map(int, reason_kinds)), tuple(map(int, action_kinds))

  def forward(batch):
    logits = model(**model_inputs(batch, variant)).logits
    return loss_fn(logits, batch, reason_kinds, action_kinds)

  if variant.compile:
    forward = torch.compile(forward)

  def step(batch):
    opt.zero_grad(set_to_none=True)
    with phase("forward"):
      loss = forward(batch)
    with phase("backward"):
      loss.backward()
    with phase("optimizer"):
      torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=variant.clip_foreach)
      opt.step()
    return float(loss.detach())

  return step


def reference_loss(model, batch, variant: Variant, reason_kinds, action_kinds) -> float:
  """The previous step's loss (log-softmax over every row) at `variant`'s model inputs,
  without gradients or an update: a variant's first loss must equal it."""
  import torch

  with torch.no_grad():
    logits = model(**model_inputs(batch, variant)).logits
    return float(span_loss(logits, batch, tuple(map(int, reason_kinds)),
                           tuple(map(int, action_kinds))))


def executed_flops_parts(shape: dict) -> dict[str, float]:
  """Matmul FLOPs the step executes per token, counted analytically: "matmuls", the
  projections, MLP and the untied head at every position, forward and backward (6 per
  weight); "attention", SDPA's causal attention over the whole row: on its `is_causal` path
  (no mask) the CPU flash kernel visits the keys up to each query, (T + 1) / 2 on average,
  with 4·Dh FLOPs per key in the forward (QKᵀ, PV) and 10·Dh in the backward (the scores
  recomputed, then dV, dP, dQ, dK). The kernel works in query blocks, so it does somewhat
  more than the triangle; softmax, norms, the loss's elementwise work and the optimizer are
  not counted (nor in sad_jax's figure, train_step.executed_flops_parts)."""
  d, h, kv, f, t = shape["d"], shape["heads"], shape["kv"], shape["ffn"], shape["seq"]
  dh = d // h
  per_layer = d * (h + 2 * kv) * dh + h * dh * d + 3 * d * f
  weights = shape["layers"] * per_layer + d * shape["vocab"]
  return {"matmuls": 6.0 * weights,
          "attention": shape["layers"] * h * (4 + 10) * dh * (t + 1) / 2}


def executed_flops_per_token(shape: dict) -> float:
  """All of executed_flops_parts."""
  return sum(executed_flops_parts(shape).values())
