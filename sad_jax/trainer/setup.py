"""train_and_evaluate's named sections and the checks behind them: the mesh (shared with
`sad-jax opd`), the teacher the objective needs, the student's initialisation, the config
checked against the model and platform, the optimizer, and the one builder of a training
state (shared with abstract_parts)."""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

import jax
import jax.numpy as jnp

from sad_jax.common import sharding
from sad_jax.common.errors import DataError
from sad_jax.common.types import SpanKind
from sad_jax.distill import objectives
from sad_jax.models import attention, checkpoint_io, lora, transformer
from sad_jax.models.config import from_hf_dict
from sad_jax.trainer import pipeline
from sad_jax.trainer import step as step_lib

REMAT = ("none", "attention", "block")


def mesh_from_config(config):
  """(mesh, rules) of config.mesh over every process's devices, after the multi-host
  start-up of config.distributed."""
  sharding.init_distributed(coordinator=config.distributed.coordinator,
                            num_processes=config.distributed.num_processes,
                            process_id=config.distributed.process_id)
  try:
    shape = sharding.mesh_shape(config.mesh.shape, jax.device_count())
  except ValueError as e:
    raise DataError(str(e), field="config.mesh.shape") from None
  rules = tuple(tuple(r) for r in config.mesh.rules) or sharding.DEFAULT_RULES
  return sharding.make_mesh(shape), rules


def _dtype(name: str):
  if name not in ("float32", "bfloat16"):
    raise DataError("model.dtype must be float32 or bfloat16", field="config.model.dtype")
  return jnp.dtype(name)


@dataclasses.dataclass(frozen=True)
class TeacherSource:
  """Where the objective's teacher comes from: an online model (`online`, its `params`) or
  a store of its top-k (`store`, `val_store` for validation, `k` slots); all None (k 0)
  for an objective without a teacher."""
  online: Any = None
  params: Any = None
  store: Any = None
  val_store: Any = None
  k: int = 0


def resolve_teacher(config, obj, train_split, val_split, *, mesh) -> TeacherSource:
  """The teacher the objective needs, checked against the dataset and the objective: its
  vocabulary, the span kinds it covers, a sampled store's rules."""
  if config.teacher.online:
    tcfg, teacher_params = checkpoint_io.load_model(config.teacher.online, mesh=mesh)
    if tcfg.vocab_size != int(train_split.meta["vocab_size"]):
      raise DataError(f"online teacher vocab {tcfg.vocab_size} != dataset vocab "
                      f"{train_split.meta['vocab_size']}", path=config.teacher.online,
                      field="vocab_size")
    online = step_lib.OnlineTeacher(
        cfg=tcfg, k=config.teacher.k,
        kinds=tuple(int(SpanKind.from_name(s)) for s in config.teacher.online_kinds))
    check_teacher_kinds(obj, config.teacher.online_kinds, train_split,
                        what="the online teacher covers", field="config.teacher.online_kinds")
    return TeacherSource(online=online, params=teacher_params)
  if not obj.needs_teacher:
    return TeacherSource()
  if not config.teacher_store:
    raise DataError(f"objective {obj.name!r} needs a teacher: set --config.teacher_store "
                    "(or --config.teacher.online)", field="config.teacher_store")
  k = config.teacher.k
  store = pipeline.open_teacher(config.teacher_store, train_split, k=k)
  manifest_path = os.path.join(config.teacher_store, "manifest.json")
  check_sampled_store(obj, store.manifest, k=k, path=manifest_path)
  check_teacher_kinds(obj, store.manifest.span_kinds, train_split,
                      what="the teacher store covers", field="span_kinds", path=manifest_path)
  val_store = None
  if val_split is not None:
    val_store = pipeline.open_teacher(config.teacher_store, val_split, k=k)
  return TeacherSource(store=store, val_store=val_store, k=k)


def init_student(config, *, vocab: int, mesh) -> tuple[Any, Any]:
  """(model_cfg, params) of the student: loaded (`pretrained`), the chosen layers of the
  model at model.path (`teacher_layers:…`, a depth-pruned student), or (model_cfg, None)
  for `scratch`, whose parameters the state builder draws."""
  tensor = int(mesh.shape["tensor"])
  params = None
  init = str(config.model.init)
  if init == "pretrained" or init.startswith(checkpoint_io.TEACHER_LAYERS):
    if not config.model.path:
      raise DataError(f"model.init={init} needs --config.model.path", field="config.model.path")
    if init == "pretrained":
      model_cfg, params = checkpoint_io.load_model(config.model.path, mesh=mesh)
    else:  # a depth-pruned student: the chosen layers of the model at model.path
      model_cfg, params = checkpoint_io.load_layers(
          config.model.path, checkpoint_io.parse_layers(init), mesh=mesh)
    model_cfg = model_cfg.replace(vocab_multiple=tensor)
  elif init == "scratch":
    model_cfg = student_config(config, vocab=vocab, tensor=tensor)
  else:
    raise DataError(f"model.init must be scratch, pretrained or {checkpoint_io.TEACHER_LAYERS}"
                    f"I,J,…, got {init!r}", field="config.model.init")
  return model_cfg, params


def check_model(config, model_cfg, *, vocab: int):
  """(objective, compute dtype, model_cfg with its attention kernel) once the student is
  known; a setting the model or platform cannot take is a DataError naming it."""
  if model_cfg.vocab_size < vocab:
    raise DataError(f"student vocabulary {model_cfg.vocab_size} is smaller than the "
                    f"dataset's tokenizer ({vocab})", field="config.model")
  obj = objective_for(config, model_cfg)
  dtype = _dtype(config.model.dtype)
  if config.model.remat not in REMAT:
    raise DataError(f"model.remat must be one of {', '.join(REMAT)}, got "
                    f"{config.model.remat!r}", field="config.model.remat")
  model_cfg = with_attention(config, model_cfg, dtype=dtype, platform=jax.devices()[0].platform)
  return obj, dtype, model_cfg


def optimizer(config):
  """(optax transformation, learning-rate schedule) of config.optim over train.steps."""
  steps = int(config.train.steps)
  return step_lib.make_optimizer(config.optim, steps), step_lib.lr_schedule(config.optim, steps)


def lora_spec(config, params) -> lora.LoraSpec | None:
  """config.model.lora's spec (None: full fine-tuning). Adapters train on a loaded base:
  a scratch student with LoRA is refused."""
  spec = lora.from_config(config.model.get("lora"))
  if spec is not None and params is None and str(config.model.init) == "scratch":
    raise DataError("LoRA trains adapters on a frozen pretrained or pruned student; "
                    "model.init is scratch (set model.init and model.path, or lora.rank=0)",
                    field="config.model.lora.rank")
  return spec


def base_fn(config, spec: lora.LoraSpec):
  """Loaded parameters → the frozen LoRA base in the run's layout and spec.base_dtype;
  train_and_evaluate jits it into the base's shardings."""
  scan = bool(config.model.get("scan_layers", False))
  return lambda params: lora.prepare_base(transformer.to_layout(params, scan=scan), spec)


def state_init_fn(config, model_cfg, obj, tx, spec: lora.LoraSpec | None = None):
  """The one builder of a training state from loaded parameters (with LoRA: the frozen
  base, whose adapters it draws), or from a fresh draw when given None: train_and_evaluate
  jits it into its shardings, abstract_parts takes its shapes."""
  scan = bool(config.model.get("scan_layers", False))

  def init_fn(params_in):
    # stacked inside the jit: the per-layer loaded copy is not kept beside the stacked one
    p = params_in if params_in is not None else transformer.init_params(
        model_cfg, jax.random.key(config.seed))
    p = transformer.to_layout(p, scan=scan)
    if spec is not None:  # the state holds the adapters; the base stays outside it
      p = lora.init_adapters(p, spec, jax.random.fold_in(jax.random.key(config.seed), 1))
    return step_lib.init_state(p, objectives.init_span_params(obj), tx, config.seed)

  return init_fn


def student_config(config, *, vocab: int, tensor: int):
  """The student's ModelConfig from config.model.hf_config (vocab_size 0: the dataset's),
  its vocabulary padded to the tensor axis. For pretrained students train_and_evaluate
  reads the folder's config.json instead (this one serves abstract checks)."""
  hf = dict(config.model.hf_config)
  hf["vocab_size"] = hf.get("vocab_size") or vocab
  return from_hf_dict(hf, where="config.model.hf_config").replace(vocab_multiple=tensor)


def with_attention(config, model_cfg, *, dtype, platform: str):
  """model_cfg with config.model.attention's kernel, refused (a DataError naming the
  setting) where it cannot run: another platform, dtype or model feature."""
  impl = str(config.model.get("attention", "reference"))
  try:
    attention.check(model_cfg, implementation=impl, dtype=dtype, platform=platform,
                    seq_len=int(config.data.seq_len))
  except ValueError as e:
    raise DataError(str(e), field="config.model.attention") from None
  return model_cfg.replace(attention=impl)


def at_temperature(obj, online, tau: float):
  """The objective and the online teacher of a stage at τ. Distillation compares teacher
  and student softened at the same τ (τ²·D(p_τ ‖ q_τ), README "Temperature"): the stage's
  τ softens the student, and the online teacher, which sees all its logits, too."""
  obj = dataclasses.replace(obj, settings=dataclasses.replace(obj.settings, temperature=tau))
  return obj, None if online is None else dataclasses.replace(online, temperature=tau)


def check_temperatures(stages, store_tau: float, *, path: str | None = None) -> None:
  """A store holds the teacher at one τ, and its top-k cannot be re-softened exactly (the
  tail's mass at another τ is unknown): every stage must distil at the store's τ."""
  for i, stage in enumerate(stages):
    if not math.isclose(stage.temperature, store_tau, rel_tol=1e-6):
      raise DataError(
          f"curriculum stage {stage.name!r} distils at τ={stage.temperature:g} but the teacher "
          f"store holds the teacher's top-k at τ={store_tau:g}: teacher and student must be "
          f"softened alike; set the stage's temperature to {store_tau:g}, or precompute a "
          f"store at τ={stage.temperature:g}, or use an online teacher",
          path=path, field=f"config.curriculum.stages[{i}].temperature")


def check_teacher_kinds(obj, covered, split, *, what: str, field: str,
                        path: str | None = None) -> None:
  """Refuses a teacher that lacks a span kind the objective distils and the data holds:
  those tokens would silently drop out of the loss (token_kd on a reason-only store would
  be reason-only KD)."""
  have = {int(SpanKind.from_name(name)) for name in covered}
  present = split.kind_tokens
  missing = [k for k in objectives.teacher_kinds(obj)
             if k not in have and (present is None or present[k] > 0)]
  if missing:
    name = lambda kinds: ", ".join(SpanKind(k).name.lower() for k in sorted(kinds))
    raise DataError(
        f"objective {obj.name!r} learns {name(objectives.teacher_kinds(obj))} tokens from the "
        f"teacher but {what} only {name(have) or 'nothing'}: {name(missing)} tokens would "
        f"have no teacher (recompute the top-k with span_kinds including "
        f"{name(missing)})", path=path, field=field)


def check_sampled_store(obj, manifest, *, k: int, path: str | None = None) -> None:
  """A sampled store's p̂ = count/N is an unbiased estimate of the whole teacher
  distribution: only fkl with the ignore rule (Σ p̂ (log p̂ − log q) against the full
  student, gradient q − p̂) uses it as one. tail_bucket would treat it as a top-k with the
  rest of the vocabulary in its tail, rkl/jsd renormalise the student over the drawn ids
  (biased), and fewer than its N slots would drop draws."""
  if not manifest.sampled:
    return
  what = f"the teacher store is sampled ({manifest.k} draws per position)"
  if obj.settings.tail != "ignore":
    raise DataError(f"{what}: its p̂ = count/N is a whole distribution, not a top-k with a "
                    f"tail; set --config.objective.tail=ignore (not {obj.settings.tail!r})",
                    path=path, field="config.objective.tail")
  if (any(g.loss == "divergence" for g in obj.groups)
      and obj.settings.divergence != "fkl"):
    raise DataError(f"{what}: only fkl is unbiased on sampled teacher tokens; set "
                    f"--config.objective.divergence=fkl (not {obj.settings.divergence!r}) "
                    "or precompute a top-k store", path=path,
                    field="config.objective.divergence")
  if k != manifest.k:
    raise DataError(f"{what}: training must read all its {manifest.k} slots (fewer would "
                    f"drop draws); set --config.teacher.k={manifest.k} (not {k})", path=path,
                    field="config.teacher.k")


def objective_for(config, model_cfg):
  """The configured objective (its vocabulary and soft-cap from the model, when given);
  a bad objective section is a DataError naming it, not a traceback."""
  try:
    obj = objectives.build(config.objective)
    if model_cfg is None:
      return obj
    return dataclasses.replace(obj, settings=dataclasses.replace(
        obj.settings, vocab_size=model_cfg.vocab_size, softcap=model_cfg.final_softcap))
  except ValueError as e:
    raise DataError(str(e), field="config.objective") from None
