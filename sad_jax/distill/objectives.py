"""Objectives by name: which loss groups, how they are weighted, and gradient projection.

  sad       L = w_r·KL_reason + w_a·CE_action + γ·L_curriculum
  token_kd  flat divergence on every generated token (reason, action, answer): the
            token-level KD baseline, no span structure
  sft       cross-entropy on every generated token

Span weights are fixed per curriculum stage (passed in) or learnable by uncertainty
weighting: w_g = floor + ½·exp(−s_g), with a regulariser ½·s_g per group, so a weight
can shrink as its loss grows but never below `floor`.

L_curriculum is the complexity-weighted mean of the same per-token losses:
Σ_t c_b(t)·ℓ_t / Σ_t c_b(t), with c_b the example's curriculum weight.

Gradient projection (`pcgrad`, Yu et al. 2020) takes the reason and action gradients
separately (one trunk forward, two trunk backwards) and, only when they conflict
(negative inner product), removes from each its component along the other.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from sad_jax.distill import losses
from sad_jax.distill.losses import Group, LossSettings, TeacherTopK

OBJECTIVES = ("sad", "token_kd", "sft")


@dataclasses.dataclass(frozen=True)
class Objective:
  name: str
  groups: tuple[Group, ...]
  settings: LossSettings
  learnable_weights: bool = False
  weight_floor: float = 0.05
  curriculum_gamma: float = 0.0
  pcgrad: bool = False
  chunked: bool = True
  compact_head: bool = True   # the chunked head at the loss positions only

  @property
  def group_names(self) -> tuple[str, ...]:
    return tuple(g.name for g in self.groups)

  @property
  def needs_teacher(self) -> bool:
    return any(g.needs_teacher for g in self.groups) or self.settings.action_teacher_weight > 0


def groups_for(name: str) -> tuple[Group, ...]:
  if name == "sad":
    return (Group("reason", losses.REASON, "divergence", needs_teacher=True),
            Group("action", losses.ACTION, "ce"))
  if name == "token_kd":
    return (Group("kd", losses.GENERATED, "divergence", needs_teacher=True),)
  if name == "sft":
    return (Group("sft", losses.GENERATED, "ce"),)
  raise ValueError(f"unknown objective {name!r}; expected one of {OBJECTIVES}")


def teacher_kinds(obj: Objective) -> tuple[int, ...]:
  """The span kinds whose tokens learn from the teacher: the kinds of the groups that
  need it, and the action kinds when actions mix in teacher KD (action_teacher_weight)."""
  kinds = {k for g in obj.groups if g.needs_teacher for k in g.kinds}
  if obj.settings.action_teacher_weight > 0:
    kinds |= set(losses.ACTION)
  return tuple(sorted(kinds))


def build(config) -> Objective:
  """From an ml_collections config (the `objective` section of a training config)."""
  settings = LossSettings(
      divergence=config.divergence, jsd_beta=config.jsd_beta, temperature=config.temperature,
      tail=config.tail, label_smoothing=config.label_smoothing,
      action_teacher_weight=config.get("action_teacher_weight", 0.0),
      chunk_size=config.chunk_size, vocab_size=config.get("vocab_size"),
      softcap=config.get("softcap"))
  obj = Objective(name=config.name, groups=groups_for(config.name), settings=settings,
                  learnable_weights=config.learnable_weights, weight_floor=config.weight_floor,
                  curriculum_gamma=config.curriculum_gamma, pcgrad=config.pcgrad,
                  chunked=config.get("chunked", True),
                  compact_head=config.get("compact_head", True))
  if obj.pcgrad and len(obj.groups) != 2:
    raise ValueError(f"pcgrad needs two loss groups; objective {obj.name!r} has "
                     f"{len(obj.groups)}")
  return obj


def init_span_params(obj: Objective) -> jax.Array:
  """Learnable log-variances s_g (zeros: w_g = floor + ½)."""
  return jnp.zeros((len(obj.groups),), jnp.float32)


def span_weights(obj: Objective, *, fixed_g: jax.Array, span_params_g: jax.Array | None):
  """(weights w_g, regulariser). Fixed weights pass through; learnable ones are derived."""
  if not obj.learnable_weights:
    return jnp.asarray(fixed_g, jnp.float32), jnp.float32(0.0)
  s = span_params_g
  return obj.weight_floor + 0.5 * jnp.exp(-s), 0.5 * jnp.sum(s)


def counts(obj: Objective, *, label_kinds_bt, teacher: TeacherTopK | None) -> jax.Array:
  """Global token counts per group for this batch (sum them over micro-batches)."""
  mask = None if teacher is None else teacher.mask_bt
  if mask is None and obj.needs_teacher:
    raise ValueError(f"objective {obj.name!r} needs teacher top-k")
  return losses.group_counts(label_kinds_bt=label_kinds_bt, teacher_mask_bt=mask,
                             groups=obj.groups)


def _check(obj: Objective, h_btd, w_dv, labels_bt, label_kinds_bt, teacher) -> None:
  """Shape checks at trace time: a clear error instead of a broadcast surprise."""
  if h_btd.ndim != 3 or w_dv.ndim != 2 or h_btd.shape[-1] != w_dv.shape[0]:
    raise ValueError(f"hidden {h_btd.shape} and head {w_dv.shape} do not fit [B,T,D]·[D,V]")
  if labels_bt.shape != h_btd.shape[:2] or label_kinds_bt.shape != labels_bt.shape:
    raise ValueError(f"labels {labels_bt.shape} / kinds {label_kinds_bt.shape} do not match "
                     f"hidden [B,T] {h_btd.shape[:2]}")
  if obj.needs_teacher and teacher is None:
    raise ValueError(f"objective {obj.name!r} needs teacher top-k")
  if teacher is not None and (teacher.ids_btk.shape[:2] != labels_bt.shape
                              or teacher.logp_btk.shape != teacher.ids_btk.shape
                              or teacher.mask_bt.shape != labels_bt.shape):
    raise ValueError(f"teacher ids {teacher.ids_btk.shape}, logp {teacher.logp_btk.shape}, "
                     f"mask {teacher.mask_bt.shape} do not match the batch {labels_bt.shape}")


def objective_loss(obj: Objective, *, h_btd, w_dv, b_v=None, labels_bt, label_kinds_bt,
                   teacher: TeacherTopK | None, fixed_weights_g, span_params_g=None,
                   counts_g=None, example_weight_b=None, curriculum_norm=None,
                   only_group: int | None = None, reg_scale=1.0):
  """(loss, metrics). Differentiable in h, w, b and span_params_g.

  counts_g / curriculum_norm: global denominators; computed from this batch if None
  (pass the totals over all micro-batches when accumulating gradients).
  example_weight_b: curriculum weight per row [B] or per target token [B, T] (packed rows
  hold several trajectories).
  only_group: keep only this group's terms (its weighted loss and its tokens' share of
  the curriculum term): pcgrad's per-group gradients.
  reg_scale: multiplies the span-weight regulariser (1 on one micro-batch, 0 on the others).
  """
  _check(obj, h_btd, w_dv, labels_bt, label_kinds_bt, teacher)
  if counts_g is None:
    counts_g = counts(obj, label_kinds_bt=label_kinds_bt, teacher=teacher)
  n_g = jnp.maximum(counts_g, 1.0)
  w_g, reg = span_weights(obj, fixed_g=fixed_weights_g, span_params_g=span_params_g)
  reg = reg * reg_scale
  scale_g = jax.lax.stop_gradient(w_g) / n_g
  if only_group is not None:
    scale_g = jnp.where(jnp.arange(len(obj.groups)) == only_group, scale_g, 0.0)
  row_scale = None
  gamma = obj.curriculum_gamma
  if gamma and example_weight_b is not None:
    member = jnp.isin(label_kinds_bt, jnp.asarray(losses.GENERATED))
    c = example_weight_b if example_weight_b.ndim == 2 else example_weight_b[:, None]
    c_bt = jnp.where(member, c, 0.0)
    if curriculum_norm is None:
      curriculum_norm = jnp.sum(c_bt)
    row_scale = gamma * c_bt / jnp.maximum(curriculum_norm, 1e-6)
    if only_group is not None:
      mine = jnp.isin(label_kinds_bt, jnp.asarray(obj.groups[only_group].kinds))
      row_scale = jnp.where(mine, row_scale, 0.0)
  head = (functools.partial(losses.chunked_head_loss, compact=obj.compact_head)
          if obj.chunked else losses.naive_head_loss)
  out = head(h_btd, w_dv, b_v, scale_g=scale_g, row_scale_bt=row_scale, labels_bt=labels_bt,
             label_kinds_bt=label_kinds_bt, teacher=teacher, groups=obj.groups,
             settings=obj.settings)
  mean_g = out["sums"] / n_g
  # Weights path: gradients reach span_params_g only through w_g; its value is already
  # inside out["total"], so add it with its own value subtracted.
  weight_path = jnp.sum(w_g * mean_g)
  loss = out["total"] + (weight_path - jax.lax.stop_gradient(weight_path)) + reg
  metrics = {"loss": loss}
  for i, name in enumerate(obj.group_names):
    metrics[f"{name}/loss"] = mean_g[i]
    metrics[f"{name}/accuracy"] = out["correct"][i] / n_g[i]
    metrics[f"{name}/tokens"] = counts_g[i]
    metrics[f"{name}/weight"] = w_g[i]
  if row_scale is not None:
    # total = Σ_g scale_g·S_g + γ·L_curriculum
    metrics["curriculum/loss"] = (jax.lax.stop_gradient(out["total"])
                                  - jnp.sum(scale_g * out["sums"])) / gamma
  return loss, metrics


# ----------------------------------------------------------------------------- gradients


def _tree_dot(a, b):
  return sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b),
                                            strict=True))


def pcgrad(g_a, g_b):
  """Projected sum of two gradient pytrees, and their cosine (a metric).

  If ⟨g_a, g_b⟩ < 0: g_a' = g_a − (⟨g_a,g_b⟩/‖g_b‖²)·g_b and g_b' likewise against the
  original g_a; else the plain sum.
  """
  dot = _tree_dot(g_a, g_b)
  na, nb = _tree_dot(g_a, g_a), _tree_dot(g_b, g_b)
  conflict = dot < 0
  ca = jnp.where(conflict, dot / jnp.maximum(nb, 1e-30), 0.0)
  cb = jnp.where(conflict, dot / jnp.maximum(na, 1e-30), 0.0)
  out = jax.tree.map(lambda a, b: (a - ca * b) + (b - cb * a), g_a, g_b)
  return out, dot / jnp.maximum(jnp.sqrt(na * nb), 1e-30)


def value_and_grad(obj: Objective, features_fn: Callable[[Any], tuple], params, *,
                   labels_bt, label_kinds_bt, teacher, fixed_weights_g, span_params_g=None,
                   counts_g=None, example_weight_b=None, curriculum_norm=None, reg_scale=1.0,
                   project: bool = True):
  """((loss, metrics), (param_grads, span_param_grads)).

  features_fn(params) → (h_btd, w_dv, b_v or None): the student trunk and its head.
  With pcgrad and project=False, param_grads is the pair of per-group gradients, to be
  summed over micro-batches and projected once (`pcgrad`) on the whole batch.
  """
  kw = dict(labels_bt=labels_bt, label_kinds_bt=label_kinds_bt, teacher=teacher,
            fixed_weights_g=fixed_weights_g, counts_g=counts_g,
            example_weight_b=example_weight_b, curriculum_norm=curriculum_norm,
            reg_scale=reg_scale)
  if not obj.pcgrad:
    def loss_fn(p, s):
      h, w, b = features_fn(p)
      return objective_loss(obj, h_btd=h, w_dv=w, b_v=b, span_params_g=s, **kw)
    (loss, metrics), grads = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(
        params, span_params_g)
    return (loss, metrics), grads

  # PCGrad: one trunk forward, the head once per group, two trunk backwards.
  (h, w, b), trunk_vjp = jax.vjp(features_fn, params)
  per_group, loss = [], 0.0
  for i in range(len(obj.groups)):
    (loss_i, metrics), head_grads = jax.value_and_grad(
        lambda h_, w_, b_, i=i: objective_loss(
            obj, h_btd=h_, w_dv=w_, b_v=b_, span_params_g=span_params_g, only_group=i, **kw),
        argnums=(0, 1, 2), has_aux=True)(h, w, b)
    per_group.append(trunk_vjp(head_grads)[0])
    loss = loss + loss_i
  # each loss_i holds the regulariser once; the per-group means are the same in both
  _, reg = span_weights(obj, fixed_g=fixed_weights_g, span_params_g=span_params_g)
  loss = loss - (len(obj.groups) - 1) * reg * reg_scale
  means = jnp.stack([metrics[f"{n}/loss"] for n in obj.group_names])
  span_grads = None
  if obj.learnable_weights:
    span_grads = jax.grad(lambda s: jnp.sum(
        span_weights(obj, fixed_g=fixed_weights_g, span_params_g=s)[0] * means)
        + span_weights(obj, fixed_g=fixed_weights_g, span_params_g=s)[1] * reg_scale)(
            span_params_g)
  if not project:
    return (loss, {**metrics, "loss": loss}), (tuple(per_group), span_grads)
  grads, cos = pcgrad(per_group[0], per_group[1])
  metrics = {**metrics, "loss": loss, "pcgrad/cosine": cos}
  return (loss, metrics), (grads, span_grads)
