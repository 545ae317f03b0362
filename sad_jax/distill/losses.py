"""Span-masked distillation losses: pure functions, (sum, count) per loss group.

Conventions (docs/design.md, "Losses"):
  * Position t of a [B, T] batch predicts `labels_bt[t]`; `label_kinds_bt[t]` is that
    target token's SpanKind. Teacher arrays are aligned the same way: `teacher.ids_btk`
    and `teacher.logp_btk` are the teacher's top-k for the token at `labels_bt[t]`, and
    `teacher.mask_bt` says where the teacher is present.
  * A loss group is a set of target kinds with one per-token loss: "reason" (divergence
    to the teacher), "action" (cross-entropy), "kd" (divergence on every generated
    token), "sft" (cross-entropy on every generated token). Observation, system, task
    and padding targets belong to no group: they are in no numerator and no denominator.
  * Losses return sums and counts; callers divide by global counts (summed over the
    data axes and over micro-batches), so every token weighs the same wherever it is.

Divergences between teacher p (top-k, log-probs normalised over the full vocabulary)
and student q^τ = softmax(z / τ), all scaled by τ²:
  fkl   KL(p ‖ q)     rkl   KL(q ‖ p)     jsd   β·KL(p ‖ m) + (1−β)·KL(q ‖ m), m = βp + (1−β)q
with a tail rule:
  tail_bucket  the k top entries plus one bucket holding the rest (teacher 1 − Σp, student
               1 − Σ_{top-k} q): a proper KL over k + 1 outcomes.
  ignore       fkl: the teacher renormalised over its top-k against the full student;
               rkl/jsd: both renormalised over the teacher's top-k.
With k = V both rules give the exact full-vocabulary divergence.

Memory: `chunked_head_loss` never holds [B, T, V] float32. It scans over sequence
chunks, computing each chunk's logits from the hidden states, its loss, and — in the
same pass — the loss gradient for the hidden states and the head (the "fused linear
loss": logits are computed once, not recomputed in the backward pass as remat would).
Its backward only scales those gradients by the incoming cotangent.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sad_jax.common.errors import DataError
from sad_jax.common.types import SpanKind

DIVERGENCES = ("fkl", "rkl", "jsd")
TAIL_RULES = ("tail_bucket", "ignore")
_EPS = 1e-12
_NEG = -1e30  # logit of padded vocabulary entries: exp() is exactly 0, no inf arithmetic


@dataclasses.dataclass(frozen=True)
class TeacherTopK:
  """Teacher top-k aligned with the batch's target positions."""

  ids_btk: jax.Array     # int32[B, T, k]
  logp_btk: jax.Array    # float[B, T, k] log-probs over the teacher's full vocabulary
  mask_bt: jax.Array     # bool[B, T] teacher present at this target


jax.tree_util.register_dataclass(TeacherTopK, data_fields=["ids_btk", "logp_btk", "mask_bt"],
                                 meta_fields=[])


@dataclasses.dataclass(frozen=True)
class Group:
  """One loss group: which target kinds, and which per-token loss."""

  name: str
  kinds: tuple[int, ...]
  loss: str                       # "divergence" | "ce"
  needs_teacher: bool = False


@dataclasses.dataclass(frozen=True)
class LossSettings:
  divergence: str = "fkl"
  jsd_beta: float = 0.5
  temperature: float = 1.0
  tail: str = "tail_bucket"
  label_smoothing: float = 0.0
  action_teacher_weight: float = 0.0  # α: (1−α)·CE + α·fkl on actions where the teacher is
  chunk_size: int = 512
  vocab_size: int | None = None       # real vocabulary; columns beyond it are padding
  softcap: float | None = None        # Gemma-2 final logit soft-capping

  def __post_init__(self):
    if self.divergence not in DIVERGENCES:
      raise ValueError(f"divergence must be one of {DIVERGENCES}, got {self.divergence!r}")
    if self.tail not in TAIL_RULES:
      raise ValueError(f"tail must be one of {TAIL_RULES}, got {self.tail!r}")
    if self.divergence == "jsd" and not 0.0 < self.jsd_beta < 1.0:
      raise ValueError(f"jsd_beta must be in (0, 1), got {self.jsd_beta}")
    if self.temperature <= 0:
      raise ValueError("temperature must be > 0")
    if not 0.0 <= self.label_smoothing < 1.0 or not 0.0 <= self.action_teacher_weight <= 1.0:
      raise ValueError("label_smoothing must be in [0, 1) and action_teacher_weight in [0, 1]")


REASON = (int(SpanKind.REASON),)
ACTION = (int(SpanKind.ACTION), int(SpanKind.ANSWER))
GENERATED = REASON + ACTION


# ----------------------------------------------------------------------------- per token


def _kl_terms(p_log, q_log):
  """Σ p (log p − log q) over the last axis, 0·log 0 = 0."""
  return jnp.sum(jnp.where(p_log > _NEG / 2, jnp.exp(p_log) * (p_log - q_log), 0.0), axis=-1)


def _log1mexp(x):
  """log(1 − exp(x)) for x ≤ 0, accurate near 0, floored at log(ε)."""
  return jnp.log(jnp.maximum(-jnp.expm1(jnp.minimum(x, 0.0)), _EPS))


def divergence_per_token(q_log_btv, t_ids_btk, t_logp_btk, *, kind: str, tail: str,
                         beta: float = 0.5) -> jax.Array:
  """Per-token divergence between teacher top-k and the student's log-probs [.., V]."""
  t_logp = t_logp_btk.astype(jnp.float32)
  q_top = jnp.take_along_axis(q_log_btv, t_ids_btk, axis=-1)          # log q at top-k ids
  p_log_mass = jax.nn.logsumexp(t_logp, axis=-1, keepdims=True)       # log Σ p
  q_log_mass = jax.nn.logsumexp(q_top, axis=-1, keepdims=True)        # log Σ_top-k q
  if tail == "tail_bucket":
    p = jnp.concatenate([t_logp, _log1mexp(p_log_mass)], axis=-1)     # k + 1 outcomes
    q = jnp.concatenate([q_top, _log1mexp(q_log_mass)], axis=-1)
  elif kind == "fkl":
    # teacher renormalised over its top-k; student over the full vocabulary
    p, q = t_logp - p_log_mass, q_top
  else:
    p, q = t_logp - p_log_mass, q_top - q_log_mass
  if kind == "fkl":
    return _kl_terms(p, q)
  if kind == "rkl":
    return _kl_terms(q, p)
  m = jnp.logaddexp(jnp.log(beta) + p, jnp.log1p(-beta) + q)
  return beta * _kl_terms(p, m) + (1.0 - beta) * _kl_terms(q, m)


def ce_per_token(log_q_btv, labels_bt, *, smoothing: float = 0.0,
                 valid_v: jax.Array | None = None) -> jax.Array:
  nll = -jnp.take_along_axis(log_q_btv, labels_bt[..., None], axis=-1)[..., 0]
  if not smoothing:
    return nll
  if valid_v is None:
    mean_nll = -jnp.mean(log_q_btv, axis=-1)
  else:
    mean_nll = -jnp.sum(jnp.where(valid_v, log_q_btv, 0.0), axis=-1) / jnp.sum(valid_v)
  return (1.0 - smoothing) * nll + smoothing * mean_nll


def token_losses(logits_btv, *, labels_bt, label_kinds_bt, teacher: TeacherTopK | None,
                 groups: Sequence[Group], settings: LossSettings):
  """Per-token loss, group id (−1: none) and correctness for one chunk of logits."""
  z = logits_btv.astype(jnp.float32)
  v = z.shape[-1]
  valid_v = None
  if settings.softcap:
    z = settings.softcap * jnp.tanh(z / settings.softcap)
  if settings.vocab_size is not None and settings.vocab_size < v:
    valid_v = jnp.arange(v) < settings.vocab_size
    z = jnp.where(valid_v, z, _NEG)
  log_q = jax.nn.log_softmax(z, axis=-1)
  tau = settings.temperature
  log_q_tau = log_q if tau == 1.0 else jax.nn.log_softmax(z / tau, axis=-1)

  if teacher is not None:
    # Where the teacher is absent its arrays are filler: make them a harmless uniform
    # distribution so that no inf/NaN reaches a gradient through the masked branch.
    live = teacher.mask_bt[..., None]
    k = teacher.ids_btk.shape[-1]
    teacher = TeacherTopK(
        ids_btk=jnp.where(live, teacher.ids_btk, 0),
        logp_btk=jnp.where(live, jnp.maximum(teacher.logp_btk.astype(jnp.float32), -1e4),
                           -float(np.log(k))),
        mask_bt=teacher.mask_bt)
  group_bt = jnp.full(labels_bt.shape, -1, jnp.int32)
  loss_bt = jnp.zeros(labels_bt.shape, jnp.float32)
  for gi, g in enumerate(groups):
    member = group_member(g, label_kinds_bt=label_kinds_bt,
                          teacher_mask_bt=None if teacher is None else teacher.mask_bt)
    if g.loss == "divergence":
      per_tok = tau ** 2 * divergence_per_token(
          log_q_tau, teacher.ids_btk, teacher.logp_btk, kind=settings.divergence,
          tail=settings.tail, beta=settings.jsd_beta)
    else:
      per_tok = ce_per_token(log_q, labels_bt, smoothing=settings.label_smoothing,
                             valid_v=valid_v)
      if settings.action_teacher_weight and teacher is not None:
        a = settings.action_teacher_weight
        kd = tau ** 2 * divergence_per_token(log_q_tau, teacher.ids_btk, teacher.logp_btk,
                                             kind="fkl", tail=settings.tail)
        per_tok = jnp.where(teacher.mask_bt, (1 - a) * per_tok + a * kd, per_tok)
    group_bt = jnp.where(member, gi, group_bt)
    loss_bt = jnp.where(member, per_tok, loss_bt)
  correct_bt = jnp.argmax(z, axis=-1) == labels_bt
  return loss_bt, group_bt, correct_bt


def group_member(g: Group, *, label_kinds_bt, teacher_mask_bt) -> jax.Array:
  """bool[B, T]: targets of group g (of its kinds, and with the teacher where it needs one)."""
  member = jnp.isin(label_kinds_bt, jnp.asarray(g.kinds))
  if g.needs_teacher:
    member &= teacher_mask_bt
  return member


def group_counts(*, label_kinds_bt, teacher_mask_bt, groups: Sequence[Group]) -> jax.Array:
  """float32[G]: tokens per group (the denominators; sum these over micro-batches)."""
  out = []
  for g in groups:
    member = group_member(g, label_kinds_bt=label_kinds_bt, teacher_mask_bt=teacher_mask_bt)
    out.append(jnp.sum(member, dtype=jnp.float32))
  return jnp.stack(out)


def _reduce(loss_bt, group_bt, correct_bt, n_groups: int):
  onehot = (group_bt[..., None] == jnp.arange(n_groups)).astype(jnp.float32)   # [B,T,G]
  sums = jnp.einsum("bt,btg->g", loss_bt, onehot)
  correct = jnp.einsum("bt,btg->g", correct_bt.astype(jnp.float32), onehot)
  return sums, correct


# ----------------------------------------------------------------------------- from logits


def logits_loss(logits_btv, *, labels_bt, label_kinds_bt, teacher: TeacherTopK | None,
                groups: Sequence[Group], settings: LossSettings) -> dict[str, jax.Array]:
  """The plain path: full logits in memory. Differentiable by ordinary autodiff."""
  loss_bt, group_bt, correct_bt = token_losses(
      logits_btv, labels_bt=labels_bt, label_kinds_bt=label_kinds_bt, teacher=teacher,
      groups=groups, settings=settings)
  sums, correct = _reduce(loss_bt, group_bt, correct_bt, len(groups))
  return {"sums": sums, "correct": correct}


# ----------------------------------------------------------------------------- chunked head


def _head_forward_and_grads(h_btd, w_dv, b_v, scale_g, row_scale_bt, labels_bt,
                            label_kinds_bt, teacher, groups, settings, live_chunks=None):
  """One loop over sequence chunks: Σ_t (scale[g(t)] + row_scale[t])·loss_t, per-group
  sums, and the gradients for h, w and b.

  live_chunks (traced int32, optional): run the first live_chunks chunks only; the caller
  guarantees that the others hold no loss target (their dh stays 0). The loop then has a
  dynamic trip count: one compiled body whatever the number of targets.
  """
  t = h_btd.shape[1]
  c = min(settings.chunk_size, t)
  pad = -t % c
  if pad:  # padded targets have kind PAD: in no group, no loss, no gradient
    pad_bt = lambda a, v=0: jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2),
                                    constant_values=v)
    h_btd, labels_bt, row_scale_bt = pad_bt(h_btd), pad_bt(labels_bt), pad_bt(row_scale_bt)
    label_kinds_bt = pad_bt(label_kinds_bt, int(SpanKind.PAD))
    if teacher is not None:
      teacher = jax.tree.map(pad_bt, teacher)
  n_groups = len(groups)
  d, v = w_dv.shape

  def chunk_loss(z, x):
    loss_bt, group_bt, correct_bt = token_losses(
        z, labels_bt=x["labels"], label_kinds_bt=x["kinds"], teacher=x.get("teacher"),
        groups=groups, settings=settings)
    sums, correct = _reduce(loss_bt, group_bt, correct_bt, n_groups)
    member_loss = jnp.where(group_bt >= 0, loss_bt, 0.0)
    weighted = jnp.sum(sums * scale_g) + jnp.sum(member_loss * x["row"])
    return weighted, (sums, correct)

  def body(i, carry):
    dw, db, dh, weighted, sums, correct = carry
    chunk = lambda a: jax.lax.dynamic_slice_in_dim(a, i * c, c, axis=1)
    x = {"labels": chunk(labels_bt), "kinds": chunk(label_kinds_bt),
         "row": chunk(row_scale_bt)}
    if teacher is not None:
      x["teacher"] = jax.tree.map(chunk, teacher)
    h = chunk(h_btd)
    z = jnp.einsum("bcd,dv->bcv", h, w_dv, preferred_element_type=jnp.float32)
    if b_v is not None:
      z = z + b_v
    (weighted_i, (sums_i, correct_i)), dz = jax.value_and_grad(chunk_loss, has_aux=True)(z, x)
    dh_i = jnp.einsum("bcv,dv->bcd", dz.astype(w_dv.dtype), w_dv,
                      preferred_element_type=jnp.float32).astype(h_btd.dtype)
    # as one [B·C, D]ᵀ[B·C, V] GEMM: XLA's CPU dot with two contracting dims ran at half speed
    dw = dw + jnp.matmul(h.reshape(-1, d).T, dz.astype(h.dtype).reshape(-1, v),
                         preferred_element_type=jnp.float32)
    if b_v is not None:
      db = db + jnp.sum(dz, axis=(0, 1))
    dh = jax.lax.dynamic_update_slice_in_dim(dh, dh_i, i * c, axis=1)
    return dw, db, dh, weighted + weighted_i, sums + sums_i, correct + correct_i

  zeros_g = jnp.zeros((n_groups,), jnp.float32)
  init = (jnp.zeros(w_dv.shape, jnp.float32),
          None if b_v is None else jnp.zeros(b_v.shape, jnp.float32),
          jnp.zeros_like(h_btd), jnp.float32(0.0), zeros_g, zeros_g)
  n_chunks = h_btd.shape[1] // c
  dw, db, dh, weighted, sums, correct = jax.lax.fori_loop(
      0, n_chunks if live_chunks is None else jnp.minimum(live_chunks, n_chunks), body, init)
  grads = (dh[:, :t], dw.astype(w_dv.dtype), None if db is None else db.astype(b_v.dtype))
  return weighted, sums, correct, grads


def _fused(run, h, w, bias, *rest):
  """run(h, w, bias, *rest) → (total, sums, correct, (dh, dw, db)) as a differentiable
  function of h, w and bias whose backward only scales the gradients `run` computed in
  its forward pass by the incoming cotangent. Everything the loss reads is an explicit
  argument (no closed-over tracers); only h, w and bias get cotangents."""

  @jax.custom_vjp
  def fused(h, w, bias, *rest):
    return run(h, w, bias, *rest)[:3]

  def fwd(h, w, bias, *rest):
    total, sums, correct, grads = run(h, w, bias, *rest)
    return (total, sums, correct), grads

  def bwd(grads, cotangents):
    g = cotangents[0]  # the per-group sums and counts are for logging: no gradient
    dh, dw, db = grads
    return (g.astype(dh.dtype) * dh, g.astype(dw.dtype) * dw,
            None if db is None else g.astype(db.dtype) * db) + (None,) * len(rest)

  fused.defvjp(fwd, bwd)
  return fused(h, w, bias, *rest)


def loss_positions(*, label_kinds_bt, teacher_mask_bt, groups: Sequence[Group]) -> jax.Array:
  """bool[B, T]: targets in some loss group, the only positions whose logits matter."""
  out = jnp.zeros(label_kinds_bt.shape, bool)
  for g in groups:
    out |= group_member(g, label_kinds_bt=label_kinds_bt, teacher_mask_bt=teacher_mask_bt)
  return out


def _compacted(h, w, bias, scale, row, labels, kinds, teach, *, groups, settings):
  """_head_forward_and_grads at the loss positions only.

  Each row's loss targets are moved, in order, to the front of the row (one permutation
  per row, a batched gather: rows stay on their devices); the chunk loop then stops after
  the chunks that hold the fullest row's targets, so the head's matmuls, softmax and
  their backward run over about ⌈max-row targets / chunk⌉·chunk positions instead of T.
  Positions outside every group have no loss and a zero dh, so nothing else changes;
  only dh is moved back.
  """
  member_bt = loss_positions(label_kinds_bt=kinds, groups=groups,
                             teacher_mask_bt=None if teach is None else teach.mask_bt)
  order_bt = jnp.argsort(~member_bt, axis=1, stable=True)   # targets first, in order
  back_bt = jnp.argsort(order_bt, axis=1)                   # the inverse permutation
  take = jax.vmap(lambda a, i: a[i])
  move = lambda a: take(a, order_bt)
  c = min(settings.chunk_size, h.shape[1])
  need = jnp.max(jnp.sum(member_bt, axis=1, dtype=jnp.int32))
  total, sums, correct, (dh, dw, db) = _head_forward_and_grads(
      move(h), w, bias, scale, move(row), move(labels), move(kinds),
      None if teach is None else jax.tree.map(move, teach), groups, settings,
      live_chunks=(need + c - 1) // c)
  return total, sums, correct, (take(dh, back_bt), dw, db)


def _constant_scales(scale_g, row_scale_bt, labels_bt):
  """The loss scales as float32 constants (row scales default to 0)."""
  row = (jnp.zeros(labels_bt.shape, jnp.float32) if row_scale_bt is None
         else jnp.asarray(row_scale_bt, jnp.float32))
  return (jax.lax.stop_gradient(jnp.asarray(scale_g, jnp.float32)),
          jax.lax.stop_gradient(row))


def chunked_head_loss(h_btd, w_dv, b_v=None, *, scale_g, labels_bt, label_kinds_bt,
                      teacher: TeacherTopK | None, groups: Sequence[Group],
                      settings: LossSettings, row_scale_bt=None,
                      compact: bool = False) -> dict[str, jax.Array]:
  """Σ_t (scale_g[group of t] + row_scale_bt[t]) · loss_t over group members, computed
  over sequence chunks; with `compact`, at the loss positions only (same values and
  gradients: see _compacted).

  Differentiable in h_btd, w_dv and b_v only (the scales are constants: see
  objectives.py for learnable weights). Returns {"total", "sums", "correct"}; "sums"
  (per-group loss sums) and "correct" (per-group argmax hits) carry no gradient.
  """
  groups = tuple(groups)
  scale_g, row_scale_bt = _constant_scales(scale_g, row_scale_bt, labels_bt)
  if compact:
    run = functools.partial(_compacted, groups=groups, settings=settings)
  else:
    run = lambda *args: _head_forward_and_grads(*args, groups, settings)
  total, sums, correct = _fused(run, h_btd, w_dv, b_v, scale_g, row_scale_bt, labels_bt,
                                label_kinds_bt, teacher)
  return {"total": total, "sums": jax.lax.stop_gradient(sums),
          "correct": jax.lax.stop_gradient(correct)}


def naive_head_loss(h_btd, w_dv, b_v=None, *, scale_g, labels_bt, label_kinds_bt,
                    teacher: TeacherTopK | None, groups: Sequence[Group],
                    settings: LossSettings, row_scale_bt=None) -> dict[str, jax.Array]:
  """Same result as chunked_head_loss through the full [B, T, V] logits (the baseline)."""
  z = jnp.einsum("btd,dv->btv", h_btd, w_dv, preferred_element_type=jnp.float32)
  if b_v is not None:
    z = z + b_v
  loss_bt, group_bt, correct_bt = token_losses(
      z, labels_bt=labels_bt, label_kinds_bt=label_kinds_bt, teacher=teacher,
      groups=tuple(groups), settings=settings)
  sums, correct = _reduce(loss_bt, group_bt, correct_bt, len(groups))
  total = jnp.sum(sums * jax.lax.stop_gradient(jnp.asarray(scale_g, jnp.float32)))
  if row_scale_bt is not None:
    total += jnp.sum(jnp.where(group_bt >= 0, loss_bt, 0.0)
                     * jax.lax.stop_gradient(row_scale_bt))
  out = {"sums": sums, "correct": correct}
  return {"total": total,
          "sums": jax.lax.stop_gradient(out["sums"]),
          "correct": jax.lax.stop_gradient(out["correct"])}


# ----------------------------------------------------------------------------- targets


def shift_targets(ids_bt, kinds_bt, segment_ids_bt=None) -> dict[str, jax.Array]:
  """Inputs and next-token targets of a [B, T] batch (T shrinks by one).

  A target across a packed-sequence boundary (segment id changes) or onto padding
  (segment id 0) gets kind PAD, so it is in no loss group.
  """
  label_kinds = kinds_bt[:, 1:]
  if segment_ids_bt is not None:
    same = (segment_ids_bt[:, 1:] == segment_ids_bt[:, :-1]) & (segment_ids_bt[:, 1:] > 0)
    label_kinds = jnp.where(same, label_kinds, int(SpanKind.PAD))
  return {"inputs_bt": ids_bt[:, :-1], "labels_bt": ids_bt[:, 1:],
          "label_kinds_bt": label_kinds}


# ----------------------------------------------------------------------------- boundary checks


def check_teacher(teacher: Mapping[str, Any] | TeacherTopK, *, batch_shape: tuple[int, int],
                  vocab_size: int, k: int | None = None, where: str = "teacher") -> None:
  """Host-side checks before jit: shapes, k, id range, finite log-probs (clear errors,
  not NaN losses). `teacher` holds concrete (NumPy or JAX) arrays."""
  get = (lambda n: getattr(teacher, n)) if isinstance(teacher, TeacherTopK) else teacher.get
  ids, logp, mask = (np.asarray(get(n)) for n in ("ids_btk", "logp_btk", "mask_bt"))
  if ids.shape != logp.shape or ids.ndim != 3:
    raise DataError(f"ids {ids.shape} and logp {logp.shape} must be equal [B, T, k] shapes",
                    path=where, field="ids_btk")
  if ids.shape[:2] != tuple(batch_shape) or mask.shape != tuple(batch_shape):
    raise DataError(f"teacher [B, T] is {ids.shape[:2]} (mask {mask.shape}), batch is "
                    f"{tuple(batch_shape)}", path=where, field="mask_bt")
  if k is not None and ids.shape[2] != k:
    raise DataError(f"teacher k is {ids.shape[2]}, expected {k}", path=where, field="ids_btk")
  live = mask.astype(bool)
  if live.any():
    live_ids, live_logp = ids[live], logp[live]
    bad = (live_ids < 0) | (live_ids >= vocab_size)
    if bad.any():
      b, t = np.argwhere(live)[np.argwhere(bad.any(-1))[0, 0]]
      raise DataError(f"teacher token id {live_ids[bad][0]} outside the vocabulary "
                      f"[0, {vocab_size}) at batch row {b}, position {t}", path=where,
                      field="ids_btk")
    if not np.isfinite(live_logp).all():
      b, t = np.argwhere(live)[np.argwhere(~np.isfinite(live_logp).all(-1))[0, 0]]
      raise DataError(f"non-finite teacher log-prob at batch row {b}, position {t}",
                      path=where, field="logp_btk")
    if (live_logp > 1e-3).any():
      raise DataError("teacher log-probs must be <= 0", path=where, field="logp_btk")
