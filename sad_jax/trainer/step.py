"""Pure train and eval steps. They are jitted at the call site (train.py) with in/out
shardings and donation; nothing here compiles anything by itself.

A batch is a dict of [A, b, T] arrays (A gradient-accumulation micro-batches of b packed
rows of T tokens; see trainer/pipeline.py): ids, kinds, segment_ids, positions, weight
(curriculum weight per token) and, with a teacher store, teacher_ids / teacher_logp
[A, b, T, k] and teacher_mask. Inputs are tokens 0..T−2, targets 1..T−1.

Denominators are global: token counts and the curriculum normaliser are summed over the
whole batch (every micro-batch, every device) before any micro-batch's loss is divided,
so accumulating A micro-batches gives the gradient of the full batch.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sad_jax.distill import losses, objectives
from sad_jax.distill.losses import TeacherTopK
from sad_jax.distill.objectives import Objective
from sad_jax.models import lora as lora_lib
from sad_jax.models import transformer
from sad_jax.models.config import ModelConfig


@dataclasses.dataclass
class TrainState:
  step: jax.Array          # int32: optimizer updates applied
  params: Any              # student parameters
  span_params: jax.Array   # learnable span log-variances s_g (unused with fixed weights)
  opt_state: Any
  rng: jax.Array           # uint32[2] raw key data (checkpointable as a plain array)


jax.tree_util.register_dataclass(
    TrainState, data_fields=["step", "params", "span_params", "opt_state", "rng"],
    meta_fields=[])


@dataclasses.dataclass(frozen=True)
class OnlineTeacher:
  """Teacher forward inside the step (small teachers): top-k at the covered kinds."""

  cfg: ModelConfig
  k: int
  kinds: tuple[int, ...]
  temperature: float = 1.0


# ----------------------------------------------------------------------------- optimizer


def lr_schedule(optim, total_steps: int):
  """Linear warm-up over `warmup_steps` that already trains at step 0 (lr·1/warmup there,
  the peak at step warmup−1; 0 warm-up steps: the peak at once), then cosine decay to
  lr·final_fraction at total_steps. A pure function of the step."""
  peak, warm = float(optim.lr), max(int(optim.warmup_steps), 0)
  end = peak * float(optim.final_fraction)
  decay = max(int(total_steps) - warm, 1)

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    warm_lr = peak * (step + 1.0) / max(warm, 1)
    t = jnp.clip((step - warm) / decay, 0.0, 1.0)
    return jnp.where(step < warm, warm_lr, end + (peak - end) * 0.5 * (1.0 + jnp.cos(jnp.pi * t)))
  return schedule


_NO_DECAY = {"scale", "q_bias", "k_bias", "v_bias"}


def decay_mask(trainable) -> Any:
  """Weight decay on weight matrices and embeddings only: not norms, biases, span weights."""
  def keep(path, _):
    names = [getattr(p, "key", None) for p in path]
    return names[0] == "model" and names[-1] not in _NO_DECAY
  return jax.tree_util.tree_map_with_path(keep, trainable)


def make_optimizer(optim, total_steps: int) -> optax.GradientTransformation:
  chain = []
  if optim.clip_norm:
    chain.append(optax.clip_by_global_norm(optim.clip_norm))
  chain.append(optax.adamw(lr_schedule(optim, total_steps), b1=optim.b1, b2=optim.b2,
                           eps=optim.eps, weight_decay=optim.weight_decay, mask=decay_mask))
  return optax.chain(*chain)


def trainable(state_or_params, span_params=None) -> dict:
  if isinstance(state_or_params, TrainState):
    return {"model": state_or_params.params, "span": state_or_params.span_params}
  return {"model": state_or_params, "span": span_params}


def init_state(params, span_params, tx: optax.GradientTransformation, seed: int) -> TrainState:
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, span_params=span_params,
                    opt_state=tx.init(trainable(params, span_params)),
                    rng=jax.random.key_data(jax.random.key(seed)))


def student_params(params, base_params, lora: lora_lib.LoraSpec | None):
  """What the student model is applied to: its parameters, or with LoRA the frozen base
  with the adapters (`params`) beside their weights."""
  return params if lora is None else lora_lib.combine(base_params, params, lora)


# ----------------------------------------------------------------------------- batch views


def _targets(mb: dict, *, online: OnlineTeacher | None, teacher_params=None,
             dtype=jnp.float32) -> dict:
  """Model inputs and next-token targets of one micro-batch of [b, T] arrays."""
  t = losses.shift_targets(mb["ids"], mb["kinds"], mb["segment_ids"])
  out = {"inputs_bt": t["inputs_bt"], "labels_bt": t["labels_bt"],
         "label_kinds_bt": t["label_kinds_bt"], "positions_bt": mb["positions"][:, :-1],
         "segment_ids_bt": mb["segment_ids"][:, :-1], "weight_bt": mb["weight"][:, 1:],
         "teacher": None}
  if online is not None:
    from sad_jax.teacher.precompute import teacher_topk

    ids, logp = teacher_topk(teacher_params, out["inputs_bt"], cfg=online.cfg, k=online.k,
                             temperature=online.temperature, dtype=dtype,
                             positions_bt=out["positions_bt"],
                             segment_ids_bt=out["segment_ids_bt"])
    mask = jnp.isin(out["label_kinds_bt"], jnp.asarray(online.kinds))
    out["teacher"] = TeacherTopK(jax.lax.stop_gradient(ids), jax.lax.stop_gradient(logp), mask)
  elif "teacher_ids" in mb:
    out["teacher"] = TeacherTopK(mb["teacher_ids"][:, :-1], mb["teacher_logp"][:, :-1],
                                 mb["teacher_mask"][:, :-1])
  return out


def _global_denominators(obj: Objective, batch: dict, online: OnlineTeacher | None):
  """(counts_g, curriculum_norm) over the whole [A, b, T] batch."""
  flat = {k: v.reshape((-1,) + v.shape[2:]) for k, v in batch.items()}
  t = losses.shift_targets(flat["ids"], flat["kinds"], flat["segment_ids"])
  kinds = t["label_kinds_bt"]
  if online is not None:
    mask = jnp.isin(kinds, jnp.asarray(online.kinds))
  else:
    mask = flat["teacher_mask"][:, :-1] if "teacher_mask" in flat else None
  counts_g = losses.group_counts(label_kinds_bt=kinds, teacher_mask_bt=mask, groups=obj.groups)
  member = jnp.isin(kinds, jnp.asarray(losses.GENERATED))
  norm = jnp.sum(jnp.where(member, flat["weight"][:, 1:], 0.0))
  return counts_g, norm


_ADDITIVE = ("/loss", "/accuracy")


def _merge(total: dict, metrics: dict) -> dict:
  """Sum the per-micro-batch shares (losses, accuracies: global denominators); keep the
  rest (token counts, weights) as they are."""
  return {k: (total[k] + v if k == "loss" or k.endswith(_ADDITIVE) else v)
          for k, v in metrics.items()}


# ----------------------------------------------------------------------------- steps


def train_step(state: TrainState, batch: dict, loss_weights_g: jax.Array,
               teacher_params=None, base_params=None, *, model_cfg: ModelConfig,
               obj: Objective, tx: optax.GradientTransformation, schedule,
               dtype=jnp.float32, remat: str = "none", online: OnlineTeacher | None = None,
               lora: lora_lib.LoraSpec | None = None):
  """One optimizer update from a full [A, b, T] batch. Returns (state, metrics).

  With `lora`, state.params are the adapters and `base_params` the frozen base: only the
  adapters get gradients and optimizer state.

  A step whose loss or gradient norm is not finite leaves the state unchanged and
  reports ok=False (the loop stops with a diagnostic; the checkpoint stays good).
  """
  counts_g, cnorm = _global_denominators(obj, batch, online)
  accum = batch["ids"].shape[0]

  def micro(carry, xs):
    grads_acc, metrics_acc = carry
    mb, index = xs
    t = _targets(mb, online=online, teacher_params=teacher_params, dtype=dtype)

    dropout = lora.dropout if lora is not None else 0.0
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), index) if dropout else None

    def features_fn(p):
      return transformer.features(model_cfg, student_params(p, base_params, lora),
                                  t["inputs_bt"], positions_bt=t["positions_bt"],
                                  segment_ids_bt=t["segment_ids_bt"], dtype=dtype, remat=remat,
                                  lora_dropout=dropout, rng=rng)

    (_, metrics), (g_model, g_span) = objectives.value_and_grad(
        obj, features_fn, state.params, labels_bt=t["labels_bt"],
        label_kinds_bt=t["label_kinds_bt"], teacher=t["teacher"],
        fixed_weights_g=loss_weights_g, span_params_g=state.span_params, counts_g=counts_g,
        example_weight_b=t["weight_bt"], curriculum_norm=cnorm,
        reg_scale=(index == 0).astype(jnp.float32), project=False)
    if g_span is None:
      g_span = jnp.zeros_like(state.span_params)
    grads = {"model": g_model, "span": g_span}
    grads_acc = jax.tree.map(jnp.add, grads_acc, grads)
    return (grads_acc, _merge(metrics_acc, metrics)), None

  zero_model = jax.tree.map(jnp.zeros_like, state.params)
  zero_grads = {"model": (zero_model, zero_model) if obj.pcgrad else zero_model,
                "span": jnp.zeros_like(state.span_params)}
  (grads, metrics), _ = jax.lax.scan(
      micro, (zero_grads, _zeros_like_metrics(obj, counts_g)),
      (batch, jnp.arange(accum, dtype=jnp.int32)))
  if obj.pcgrad:
    # project once, on the whole batch's per-group gradients
    projected, cosine = objectives.pcgrad(*grads["model"])
    grads = {"model": projected, "span": grads["span"]}
    metrics = {**metrics, "pcgrad/cosine": cosine}

  grad_norm = optax.tree.norm(grads)
  ok = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)

  def update(params_in, opt_state):
    updates, opt_state = tx.update(grads, opt_state, params_in)
    return optax.apply_updates(params_in, updates), opt_state

  # A cond, not where(ok, new, old): reading the old state after the new one is written
  # made XLA copy the donated vocabulary-sized leaves (4 × 62.5 MiB at bench shape M);
  # in a branch they update in place.
  new, opt_state = jax.lax.cond(ok, update, lambda p, o: (p, o), trainable(state),
                                state.opt_state)
  new_state = TrainState(
      step=state.step + ok.astype(jnp.int32), params=new["model"], span_params=new["span"],
      opt_state=opt_state,
      rng=jax.random.key_data(jax.random.fold_in(jax.random.wrap_key_data(state.rng), 1)))
  # the norm after the update (before it, the old parameters would have to outlive it)
  metrics = {**metrics, "grad_norm": grad_norm, "lr": schedule(state.step), "ok": ok,
             "param_norm": optax.tree.norm(new["model"])}
  return new_state, metrics


def _zeros_like_metrics(obj: Objective, counts_g) -> dict:
  z = jnp.zeros((), jnp.float32)
  out = {"loss": z}
  for name in obj.group_names:
    out |= {f"{name}/loss": z, f"{name}/accuracy": z, f"{name}/tokens": counts_g[0] * 0,
            f"{name}/weight": z}
  if obj.curriculum_gamma:
    out["curriculum/loss"] = z
  return out


def eval_step(params, span_params, batch: dict, loss_weights_g: jax.Array,
              teacher_params=None, base_params=None, *, model_cfg: ModelConfig,
              obj: Objective, dtype=jnp.float32, online: OnlineTeacher | None = None,
              lora: lora_lib.LoraSpec | None = None) -> dict:
  """Per-group (sum, count) and correct counts of one batch: sum them over batches."""
  counts_g, _ = _global_denominators(obj, batch, online)
  params = student_params(params, base_params, lora)

  def micro(acc, mb):
    t = _targets(mb, online=online, teacher_params=teacher_params, dtype=dtype)
    h, w, b = transformer.features(model_cfg, params, t["inputs_bt"],
                                   positions_bt=t["positions_bt"],
                                   segment_ids_bt=t["segment_ids_bt"], dtype=dtype)
    _, m = objectives.objective_loss(obj, h_btd=h, w_dv=w, b_v=b, labels_bt=t["labels_bt"],
                                     label_kinds_bt=t["label_kinds_bt"], teacher=t["teacher"],
                                     fixed_weights_g=loss_weights_g, span_params_g=span_params,
                                     counts_g=counts_g)
    sums = jnp.stack([m[f"{n}/loss"] for n in obj.group_names]) * jnp.maximum(counts_g, 1)
    correct = jnp.stack([m[f"{n}/accuracy"] for n in obj.group_names]) * jnp.maximum(
        counts_g, 1)
    return {"sum": acc["sum"] + sums, "correct": acc["correct"] + correct}, None

  zeros = jnp.zeros((len(obj.groups),), jnp.float32)
  acc, _ = jax.lax.scan(micro, {"sum": zeros, "correct": zeros}, batch)
  return {"sum": acc["sum"], "correct": acc["correct"], "count": counts_g}


def eval_totals(outputs) -> dict[str, np.ndarray]:
  """Sums eval_step outputs over batches on the host: per-group sum, count, correct."""
  total = {"sum": 0.0, "count": 0.0, "correct": 0.0}
  for out in outputs:
    total = {k: total[k] + np.asarray(out[k], np.float64) for k in total}
  return total
