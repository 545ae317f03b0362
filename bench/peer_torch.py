"""The PyTorch peer of `bench/train_step.py`: the train step a user of the PyTorch stack would
write for the same job, at the same shape, dtype and thread count.

transformers' `LlamaForCausalLM` (SDPA attention, untied head) → full [B, T, V] logits →
span losses written plainly in PyTorch (forward KL with the teacher's top-k plus a tail
bucket on reason targets, cross-entropy on action targets, observation targets masked; each
group averaged over its tokens) → backward → global-norm clipping → `torch.optim.AdamW`.
It is the same computation as the project's `sad` step (issue 4's loss, without the small
curriculum term), except that the peer attends causally over the whole packed row instead
of block-diagonally per trajectory, which is less work for the peer.

Needs the `hf` extra (torch 2.13.0 CPU, transformers).
"""

from __future__ import annotations

import math
import time

import numpy as np


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


def build(shape: dict, dtype: str, seed: int = 0):
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
  opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01},
                           {"params": no_decay, "weight_decay": 0.0}],
                          lr=1e-4, betas=(0.9, 0.98), eps=1e-8)
  return model, opt


def span_loss(logits_btv, batch, reason_kind: int, action_kind: int):
  """Mean forward KL (top-k + tail bucket) on reason targets + mean CE on action targets."""
  import torch

  logq = torch.log_softmax(logits_btv.float(), dim=-1)
  kinds = batch["label_kinds"]
  # reason: KL(p ‖ q) over the teacher's k entries plus one bucket for the rest
  t_logp = batch["teacher_logp"].float()
  q_top = torch.gather(logq, -1, batch["teacher_ids"])
  p_mass = torch.logsumexp(t_logp, -1, keepdim=True)
  q_mass = torch.logsumexp(q_top, -1, keepdim=True)
  p = torch.cat([t_logp, torch.log(-torch.expm1(p_mass.clamp(max=-1e-6)))], -1)
  q = torch.cat([q_top, torch.log(-torch.expm1(q_mass.clamp(max=-1e-6)))], -1)
  kl = (p.exp() * (p - q)).sum(-1)
  reason = (kinds == reason_kind) & batch["teacher_mask"]
  action = kinds == action_kind
  nll = -torch.gather(logq, -1, batch["labels"][..., None])[..., 0]
  reason_loss = (kl * reason).sum() / reason.sum().clamp(min=1)
  action_loss = (nll * action).sum() / action.sum().clamp(min=1)
  return reason_loss + action_loss


def to_torch_batch(host: dict):
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


def make_step(model, opt, reason_kind: int, action_kind: int):
  import torch

  def step(batch):
    opt.zero_grad(set_to_none=True)
    logits = model(input_ids=batch["inputs"], position_ids=batch["positions"]).logits
    loss = span_loss(logits, batch, reason_kind, action_kind)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return float(loss.detach())

  return step
