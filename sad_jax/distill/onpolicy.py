"""On-policy distillation losses on the student's own tokens, per span.

Rows are whole episodes (agent/rollout.py). Position t predicts token t+1; a target is a
reason or action token the student wrote (`mine`); on rows of the teacher's stored
episodes (off-policy, `offpolicy_b`) every reason and action token is a target of the
full-distribution term only, and so, with `guided_targets`, is every token the teacher
wrote in a guided turn (its label in the student's own state, as DAgger's).
Observation, task and prompt tokens are attended to and never targets.

(a) Sampled-token reverse KL as a per-token advantage. With the behaviour log-prob
    ℓ_old (logged at sampling) and the teacher's ℓ_T of the same token, both floored at
    `logp_floor`:  k_t = ℓ_old,t − ℓ_T,t.  The return G_t = k_t + γ·G_{t+1} runs over
    the row's later targets (γ = `discount`; γ = 1: Σ_{s≥t} k_s, whose score-function
    gradient is the unbiased gradient of the sequence-level reverse KL; γ = 0: k_t
    alone, the per-token form of tinker-cookbook and slime). The advantage is
        A_t = r_t − c·G_t,  clipped to [−cap, cap],
    with r_t the optional task reward (reward·won − penalty·invalid, on action tokens).
    The surrogate, with ρ_t = exp(ℓ_θ,t − ℓ_old,t):
        ε > 0:  −min(ρ_t·A_t, clip(ρ_t, 1−ε, 1+ε)·A_t)      (PPO)
        ε = 0:  −ρ_t·A_t                                    (importance-weighted)
    At θ = θ_old its gradient is −A_t·∇ℓ_θ,t.
(b) A full-distribution divergence at the same positions: `divergence_per_token` over
    the teacher's top-k (rkl / fkl / jsd with β, the tail rule), as in GKD.

Both are weighted per span (reason_weight, action_weight) and divided by their target
count (flat, token_kd's form) or, with `per_span`, by each span's own count (SAD's split:
an action token then weighs as much as all of its turn's reasoning tokens together).
Losses return (sum, count) pairs.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from sad_jax.common.errors import DataError
from sad_jax.common.types import SpanKind
from sad_jax.distill import losses
from sad_jax.models.config import ModelConfig
from sad_jax.models.transformer import Transformer


@dataclasses.dataclass(frozen=True)
class OPDSettings:
  sampled_weight: float = 1.0    # (a)
  full_weight: float = 0.0       # (b)
  divergence: str = "rkl"        # (b): rkl | fkl | jsd
  jsd_beta: float = 0.5
  tail: str = "tail_bucket"
  reason_weight: float = 1.0
  action_weight: float = 1.0
  per_span: bool = False         # True: w_r·mean over reason + w_a·mean over action (SAD's
  #                                split); False: Σ w_t·ℓ_t / Σ targets (flat, token_kd's)
  discount: float = 0.0          # γ
  kl_coef: float = 1.0           # c
  clip_eps: float = 0.2          # ε; 0: plain importance weight
  logp_floor: float = -20.0
  advantage_cap: float = 20.0    # the per-token loss cap: |A_t| ≤ cap
  reward: float = 0.0            # task reward on action tokens of a won episode
  invalid_penalty: float = 0.0   # subtracted on an invalid turn's action tokens
  guided_targets: bool = False   # the teacher's guided turns (in the student's states) are
  #                                targets of (b) too: DAgger's labels


def check(s: OPDSettings) -> OPDSettings:
  """Settings that would silently do nothing are refused."""
  if s.guided_targets and not s.full_weight:
    raise DataError("loss.guided_targets trains on the teacher's guided turns through the "
                    "full-distribution term: it needs loss.full_weight > 0",
                    field="config.loss.guided_targets")
  return s


def targets(batch: dict) -> dict:
  """Next-token views of a batch of [B, T] episode rows (see rollout.to_arrays)."""
  label_kinds = batch["kinds"][:, 1:]
  supervised = jnp.isin(label_kinds, jnp.asarray(losses.GENERATED))
  mine = batch["mine"][:, 1:] & supervised
  off = batch.get("offpolicy_b")
  full = mine if off is None else mine | (supervised & off[:, None])
  return {"inputs_bt": batch["ids"][:, :-1], "labels_bt": batch["ids"][:, 1:],
          "positions_bt": batch["positions"][:, :-1],
          "segment_ids_bt": batch["segment_ids"][:, :-1], "label_kinds_bt": label_kinds,
          "old_logp_bt": batch["logp"][:, 1:] if "logp" in batch else None, "sampled_mask_bt": mine,
          "full_mask_bt": full,
          "guided_bt": (batch["guided"][:, 1:] & supervised if "guided" in batch
                        else jnp.zeros_like(mine))}


def span_weight(label_kinds_bt, s: OPDSettings):
  return jnp.where(label_kinds_bt == SpanKind.REASON, s.reason_weight,
                   jnp.where(jnp.isin(label_kinds_bt, jnp.asarray(losses.ACTION)),
                             s.action_weight, 0.0))


def returns(k_bt, mask_bt, discount: float):
  """G_t = k_t + γ·G_{t+1} over the masked positions of each row (carried across the
  unmasked ones); 0 where unmasked."""
  def body(g, xs):
    k, m = xs
    g = jnp.where(m, k + discount * g, g)
    return g, jnp.where(m, g, 0.0)
  _, g_tb = jax.lax.scan(body, jnp.zeros(k_bt.shape[0], k_bt.dtype),
                         (k_bt.T, mask_bt.T), reverse=True)
  return g_tb.T


def advantages(*, old_logp_bt, teacher_logp_bt, mask_bt, label_kinds_bt, s: OPDSettings,
               reward_bt=None):
  """A_t (no gradient) and the per-token sampled reverse KL k_t."""
  k = (jnp.maximum(old_logp_bt, s.logp_floor) - jnp.maximum(teacher_logp_bt, s.logp_floor))
  k = jnp.where(mask_bt, k, 0.0)
  a = -s.kl_coef * returns(k, mask_bt, s.discount)
  if reward_bt is not None:
    a = a + jnp.where(jnp.isin(label_kinds_bt, jnp.asarray(losses.ACTION)), reward_bt, 0.0)
  a = jnp.clip(a, -s.advantage_cap, s.advantage_cap)
  return jax.lax.stop_gradient(jnp.where(mask_bt, a, 0.0)), jax.lax.stop_gradient(k)


def reduce(values_bt, *, mask_bt, label_kinds_bt, s: OPDSettings):
  """(loss sum, count) with loss = sum / count: flat, Σ w_t·v_t / Σ mask; per span,
  Σ_g w_g·(Σ_{t∈g} v_t / n_g), returned with count 1."""
  w = span_weight(label_kinds_bt, s)
  if not s.per_span:
    return jnp.sum(jnp.where(mask_bt, w * values_bt, 0.0)), jnp.sum(mask_bt)
  total = 0.0
  for kinds, weight in ((losses.REASON, s.reason_weight), (losses.ACTION, s.action_weight)):
    m = mask_bt & jnp.isin(label_kinds_bt, jnp.asarray(kinds))
    total = total + weight * jnp.sum(jnp.where(m, values_bt, 0.0)) / jnp.maximum(jnp.sum(m), 1)
  return total, jnp.float32(1.0)


def surrogate(new_logp_bt, adv_bt, *, old_logp_bt, s: OPDSettings):
  """Per-token term (a): −min(ρ·A, clip(ρ)·A), or −ρ·A with ε = 0."""
  ratio = jnp.exp(new_logp_bt - jax.lax.stop_gradient(old_logp_bt))
  if s.clip_eps > 0:
    return -jnp.minimum(ratio * adv_bt,
                        jnp.clip(ratio, 1 - s.clip_eps, 1 + s.clip_eps) * adv_bt)
  return -ratio * adv_bt


def sampled_loss(new_logp_bt, adv_bt, *, old_logp_bt, mask_bt, label_kinds_bt,
                 s: OPDSettings):
  """(sum, count) of term (a)."""
  return reduce(surrogate(new_logp_bt, adv_bt, old_logp_bt=old_logp_bt, s=s), mask_bt=mask_bt,
                label_kinds_bt=label_kinds_bt, s=s)


def full_loss(student_logp_btv, teacher_ids_btk, teacher_logp_btk, *, mask_bt, label_kinds_bt,
              s: OPDSettings):
  """(sum, count) of term (b)."""
  d = losses.divergence_per_token(student_logp_btv, teacher_ids_btk, teacher_logp_btk,
                                  kind=s.divergence, tail=s.tail, beta=s.jsd_beta)
  return reduce(d, mask_bt=mask_bt, label_kinds_bt=label_kinds_bt, s=s)


def reward_tokens(batch: dict, s: OPDSettings):
  """r_t per target position: reward·won − penalty·(the token's turn was invalid)."""
  if not (s.reward or s.invalid_penalty):
    return None
  won = batch["won_b"].astype(jnp.float32)[:, None]
  return s.reward * won - s.invalid_penalty * batch["invalid"][:, 1:].astype(jnp.float32)


def log_probs(cfg: ModelConfig, params, t: dict, *, vocab: int, dtype=jnp.float32):
  """The model's log-softmax over the first `vocab` ids at every input position."""
  logits = Transformer(cfg, dtype=dtype).apply(
      {"params": params}, t["inputs_bt"], positions_bt=t["positions_bt"],
      segment_ids_bt=t["segment_ids_bt"])
  return jax.nn.log_softmax(logits[..., :vocab].astype(jnp.float32), axis=-1)


def score(teacher_params, batch: dict, *, cfg: ModelConfig, vocab: int, k: int,
          dtype=jnp.float32) -> dict:
  """The teacher on the student's rows, one forward: log πT of every label and its top-k
  (pure: agent/onpolicy jits it on the mesh).
  A teacher vocabulary padded past the tokenizer's is cut to the tokenizer's `vocab` and
  renormalised there (the padded rows carry no trained mass)."""
  t = targets(batch)
  lp = log_probs(cfg, teacher_params, t, vocab=vocab, dtype=dtype)
  label = jnp.take_along_axis(lp, t["labels_bt"][..., None], axis=-1)[..., 0]
  top_logp, top_ids = jax.lax.top_k(lp, k)
  return {"teacher_logp": label, "teacher_ids": top_ids.astype(jnp.int32),
          "teacher_topk_logp": top_logp}


def loss_and_metrics(student_logp_btv, batch: dict, scores: dict, *, s: OPDSettings):
  """(loss, metrics) of one batch, given the student's log-probs [B, T, V] (the only
  input with a gradient path) and the teacher's scores."""
  t = targets(batch)
  new_logp = jnp.take_along_axis(student_logp_btv, t["labels_bt"][..., None], axis=-1)[..., 0]
  m_a, m_b = t["sampled_mask_bt"], t["full_mask_bt"]
  if s.guided_targets:
    m_b = m_b | t["guided_bt"]
  adv, k = advantages(old_logp_bt=t["old_logp_bt"], teacher_logp_bt=scores["teacher_logp"],
                      mask_bt=m_a, label_kinds_bt=t["label_kinds_bt"], s=s,
                      reward_bt=reward_tokens(batch, s))
  sum_a, n_a = sampled_loss(new_logp, adv, old_logp_bt=t["old_logp_bt"], mask_bt=m_a,
                            label_kinds_bt=t["label_kinds_bt"], s=s)
  loss = s.sampled_weight * sum_a / jnp.maximum(n_a, 1)
  n_tok = jnp.maximum(jnp.sum(m_a), 1)
  metrics = {"sampled/loss": sum_a / jnp.maximum(n_a, 1), "sampled/tokens": jnp.sum(m_a),
             "rkl": jnp.sum(k) / n_tok,
             "ratio": jnp.sum(jnp.where(m_a, jnp.exp(new_logp - t["old_logp_bt"]), 0.0)) / n_tok}
  if s.full_weight:
    sum_b, n_b = full_loss(student_logp_btv, scores["teacher_ids"], scores["teacher_topk_logp"],
                           mask_bt=m_b, label_kinds_bt=t["label_kinds_bt"], s=s)
    loss = loss + s.full_weight * sum_b / jnp.maximum(n_b, 1)
    metrics |= {"full/loss": sum_b / jnp.maximum(n_b, 1), "full/tokens": jnp.sum(m_b)}
  return loss, {**metrics, "loss": loss}
