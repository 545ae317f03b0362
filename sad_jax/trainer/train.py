"""`sad-jax train`: the trainer. `train_and_evaluate(config, workdir)` reads top to bottom:
mesh → data → state → step → checkpoint → loop.

  sad-jax train --config configs/train_sad.py --workdir runs/sad \
      --config.dataset=runs/fireact --config.teacher_store=runs/fireact_teacher

The workdir holds checkpoints/ (orbax), metrics.jsonl, tb/ (TensorBoard), config.json
and, at the end, final/ (orbax params + config.json: a model folder for eval, export or
as a teacher). Rerunning with the same workdir resumes from the latest checkpoint.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import signal
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sad_jax.common import fileio, sharding
from sad_jax.common.errors import DataError, SadJaxError
from sad_jax.distill import curriculum
from sad_jax.models import checkpoint_io, lora, transformer
from sad_jax.trainer import checkpoint as ckpt_lib
from sad_jax.trainer import metrics as metrics_lib
from sad_jax.trainer import pipeline
from sad_jax.trainer import step as step_lib
from sad_jax.trainer.setup import (
  _dtype,
  at_temperature,
  base_fn,
  check_model,
  check_temperatures,
  init_student,
  lora_spec,
  mesh_from_config,
  objective_for,
  optimizer,
  resolve_teacher,
  state_init_fn,
  student_config,
  with_attention,
)

# Config sections that may change between a run and its resumption (they do not change
# what is computed); anything else differing is an error, not a silent new experiment.
RESUMABLE_CHANGES = ("train.", "checkpoint.", "metrics.", "distributed.", "data.prefetch",
                     "model.attention")  # a kernel computes the same attention (e.g. GPU → TPU)
# Settings added after checkpoints were written, with the value that behaves as those did:
# a checkpoint without the key resumes when the run sets that value.
ADDED_SETTINGS = {"data.pack_lookahead": 1, "model.scan_layers": False,
                  "objective.compact_head": False, "model.lora.rank": 0,
                  "model.lora.alpha": 16.0, "model.lora.dropout": 0.0,
                  "model.lora.targets": lora.DEFAULT_TARGETS, "model.lora.base_dtype": "float32"}


class TrainingDiverged(SadJaxError):
  """A non-finite loss or gradient: the run stops, the last good checkpoint stays."""


@dataclasses.dataclass
class Result:
  step: int
  status: str                        # finished | preempted
  train: dict[str, float]
  validation: dict[str, float]
  checkpoint_steps: list[int]


def config_dict(config) -> dict[str, Any]:
  """The config as JSON values under dotted keys: what config.json and checkpoints record."""
  out = {}

  def walk(prefix, node):
    for k in sorted(node.keys()):
      v = node[k]
      if hasattr(v, "keys"):
        walk(prefix + k + ".", v)
      else:
        out[prefix + k] = v.to_dict() if hasattr(v, "to_dict") else v
  walk("", config)
  return json.loads(json.dumps(out, default=lambda o: o.to_dict() if hasattr(o, "to_dict")
                               else str(o)))


def train_and_evaluate(config, workdir: str) -> Result:
  workdir = fileio.abspath(workdir)  # gs://… stays a bucket path

  # ------------------------------------------------------------------ mesh
  mesh, rules = mesh_from_config(config)
  is_main = jax.process_index() == 0

  # ------------------------------------------------------------------ data
  if not config.dataset:
    raise DataError("required (set --config.dataset=…)", field="config.dataset")
  train_split = pipeline.open_split(config.dataset, "train")
  val_split = None
  try:
    val_split = pipeline.open_split(config.dataset, "validation")
  except DataError as e:
    if e.field != "split":  # a dataset prepared with val_fraction=0 has none; else: raise
      raise
  obj = objective_for(config, None)  # settings completed once the model is known
  teacher = resolve_teacher(config, obj, train_split, val_split, mesh=mesh)
  online, teacher_params, store, val_store, k = (
      teacher.online, teacher.params, teacher.store, teacher.val_store, teacher.k)

  stats_score = curriculum.scores(train_split.stats, dict(config.curriculum.score))
  edges = curriculum.bucket_edges(stats_score, config.curriculum.n_buckets)
  stages = curriculum.stages_from_config(config, n_buckets=config.curriculum.n_buckets,
                                         n_groups=len(obj.groups))
  if store is not None:
    check_temperatures(stages, store.manifest.temperature,
                       path=os.path.join(config.teacher_store, "manifest.json"))
  if config.data.batch_size % config.data.accum:
    raise DataError(f"batch_size {config.data.batch_size} must divide by accum "
                    f"{config.data.accum}", field="config.data.batch_size")
  rows = config.data.batch_size // config.data.accum
  batch_sharding = batch_sharding_for(rows, mesh, rules)
  start, count = local_rows(batch_sharding, rows)
  if jax.process_count() > 1:  # each process says which rows it packs (every one logs)
    _log(True, f"process {jax.process_index()} of {jax.process_count()}: packs rows "
               f"[{start}, {start + count}) of each {rows}-row micro-batch")
  layout = pipeline.Layout(accum=config.data.accum, rows=rows,
                           length=config.data.seq_len + 1, k=k, row_start=start,
                           row_count=count)
  train_iter = pipeline.TrainIterator(
      split=train_split, teacher=store, layout=layout, stages=stages,
      bucket_n=curriculum.bucket_of(stats_score, edges),
      weight_n=curriculum.example_weights(stats_score), seed=config.seed,
      prefetch=config.data.prefetch,
      # a config written before the setting packs as it did then (its checkpoints agree)
      pack_lookahead=config.data.get("pack_lookahead", ADDED_SETTINGS["data.pack_lookahead"]))
  val_weight = None
  if val_split is not None:
    val_score = curriculum.scores(val_split.stats, dict(config.curriculum.score))
    val_weight = curriculum.example_weights(val_score)

  def to_global(host_batch: dict) -> dict:
    return {name: jax.make_array_from_process_local_data(
        batch_sharding, x, (layout.accum, layout.rows) + x.shape[2:])
        for name, x in host_batch.items()}

  # ------------------------------------------------------------------ state
  vocab = int(train_split.meta["vocab_size"])
  model_cfg, params = init_student(config, vocab=vocab, mesh=mesh)
  obj, dtype, model_cfg = check_model(config, model_cfg, vocab=vocab)
  spec = lora_spec(config, params)  # None: every parameter trains
  total_steps = int(config.train.steps)
  tx, schedule = optimizer(config)
  init_fn = state_init_fn(config, model_cfg, obj, tx, spec)
  base = base_sh = None
  if spec is not None:  # a frozen base outside the state; the adapters are drawn against it
    make_base = base_fn(config, spec)
    abstract_base = jax.eval_shape(make_base, params)
    base_sh = sharding.tree_shardings(abstract_base, transformer.param_axes(abstract_base),
                                      mesh, rules)
    with sharding.use_mesh(mesh, rules):
      base = params = jax.jit(make_base, out_shardings=base_sh)(params)
  abstract = jax.eval_shape(init_fn, params)
  state_sh = state_shardings(abstract, mesh, rules, tx)
  with sharding.use_mesh(mesh, rules):
    state = jax.jit(init_fn, out_shardings=state_sh)(params)
  del params

  # ------------------------------------------------------------------ step
  data_sh = jax.tree.map(lambda _: batch_sharding, abstract_batch(layout, store is not None))
  teacher_sh = None if teacher_params is None else sharding.tree_shardings(
      teacher_params, transformer.param_axes(teacher_params), mesh, rules)
  compiled: dict[float, Any] = {}

  def train_fn(index: int):
    # one compiled step per distinct τ (a stage transition may recompile once)
    tau = stages[index].temperature
    if tau not in compiled:
      stage_obj, stage_online = at_temperature(obj, online, tau)
      compiled[tau] = jit_train_step(
          model_cfg=model_cfg, obj=stage_obj, tx=tx, schedule=schedule,
          dtype=dtype, remat=config.model.remat, online=stage_online, state_sh=state_sh,
          data_sh=data_sh, teacher_sh=teacher_sh, base_sh=base_sh, lora=spec)
    return compiled[tau]

  eval_fns: dict[float, Any] = {}

  def eval_fn(index: int):
    tau = stages[index].temperature
    if tau not in eval_fns:
      stage_obj, stage_online = at_temperature(obj, online, tau)
      fn = functools.partial(step_lib.eval_step, model_cfg=model_cfg,
                             obj=stage_obj, dtype=dtype, online=stage_online, lora=spec)
      eval_fns[tau] = jax.jit(fn, in_shardings=(state_sh.params, state_sh.span_params,
                                                data_sh, None, teacher_sh, base_sh))
    return eval_fns[tau]

  def evaluate(index: int) -> dict[str, float]:
    if val_split is None:
      return {}
    w = jnp.asarray(stages[index].loss_weights, jnp.float32)
    with sharding.use_mesh(mesh, rules):
      total = step_lib.eval_totals(
          eval_fn(index)(state.params, state.span_params, to_global(host_batch), w,
                         teacher_params, base)
          for host_batch, _ in pipeline.eval_batches(
              val_split, val_store, layout, weight_n=val_weight,
              max_batches=config.train.eval_batches or None))
    sums, counts, correct = total["sum"], total["count"], total["correct"]
    n = np.maximum(counts, 1)
    res = {"loss": float(np.sum(np.asarray(stages[index].loss_weights) * sums / n))}
    for g, name in enumerate(obj.group_names):
      res |= {f"{name}/loss": float(sums[g] / n[g]), f"{name}/accuracy": float(correct[g] / n[g]),
              f"{name}/tokens": float(counts[g])}
    return res

  # ------------------------------------------------------------------ checkpoint
  ckpt = ckpt_lib.Checkpoints(fileio.join(workdir, "checkpoints"), keep=config.checkpoint.keep,
                              keep_best=config.checkpoint.keep_best,
                              best_metric=config.checkpoint.best_metric,
                              best_mode=config.checkpoint.best_mode,
                              use_async=config.checkpoint.use_async)
  flat_config = config_dict(config)
  fingerprints = {"dataset": train_split.meta["fingerprint"],
                  "teacher_store": None if store is None else store.manifest.dataset_fingerprint,
                  "process_count": jax.process_count()}
  if spec is not None:  # the adapters mean nothing on another base: a resume checks it
    fingerprints["lora_base"] = {"path": fileio.abspath(config.model.path),
                                 "fingerprint": lora.fingerprint_files(
                                     fileio.abspath(config.model.path))}
  start = 0
  latest = ckpt.latest_step()
  if latest is not None:
    _check_resumable(ckpt.read_meta(latest), flat_config, fingerprints,
                     fileio.join(workdir, "checkpoints", str(latest)))
    abstract_state = ckpt_lib.abstract_with_shardings(jax.eval_shape(lambda: state), state_sh)
    del state
    state, meta = ckpt.restore(latest, abstract_state=abstract_state, data_iter=train_iter)
    start = int(meta["step"])
    _log(is_main, f"resumed from step {start} (stage {stages[meta['stage']].name!r})")
  elif is_main:
    fileio.makedirs(workdir)
    fileio.json_dump(fileio.join(workdir, "config.json"), flat_config, indent=1)

  writer = metrics_lib.MetricsWriter(workdir, enabled=is_main)  # `save` flushes it

  def save(step_now: int, val: dict[str, float] | None = None) -> None:
    meta = {"step": step_now, "stage": train_iter.stage, "config": flat_config,
            "fingerprints": fingerprints, "truncated": train_iter.truncated}
    metrics = {f"validation/{k}": v for k, v in (val or {}).items()}
    ckpt.save(step_now, state=state, data_iter=train_iter, meta=meta, metrics=metrics)
    writer.flush()  # on gs:// the metrics objects then hold what the checkpoint covers

  # ------------------------------------------------------------------ loop
  tokens_per_step = layout.lanes * (layout.length - 1)
  flops_per_token = metrics_lib.model_flops_per_token(model_cfg, config.data.seq_len)
  peak = metrics_lib.measure_matmul_peak(config.model.dtype) if config.metrics.mfu else None
  # the peak is one device's; emulated CPU devices share their host's cores
  chips = jax.process_count() if jax.devices()[0].platform == "cpu" else jax.device_count()
  stop = {"signal": None}
  previous = _install_signal_handlers(stop)
  from tqdm.auto import tqdm

  bar = tqdm(total=total_steps, initial=start, desc="train", unit="step", dynamic_ncols=True,
             disable=None if (is_main and config.metrics.progress) else True)
  status, last_train, last_val = "finished", {}, {}
  stage_index = curriculum.stage_at(stages, start)
  _log(is_main, f"stage {stage_index} {stages[stage_index].name!r} from step {start}")
  t_window, steps_window, real_tokens = time.perf_counter(), 0, 0
  try:
    for step_now in range(start, total_steps):
      index = curriculum.stage_at(stages, step_now)
      if index != stage_index:
        stage_index = index
        _log(is_main, f"step {step_now}: stage {index} {stages[index].name!r} "
                      f"(τ={stages[index].temperature}, loss weights "
                      f"{stages[index].loss_weights}, buckets {stages[index].bucket_weights})")
        writer.write(step_now, "train", {"stage": index})
      host_batch, rows = next(train_iter)
      real_tokens += int((host_batch["segment_ids"] > 0).sum())
      weights = jnp.asarray(stages[index].loss_weights, jnp.float32)
      with sharding.use_mesh(mesh, rules):
        state, m = train_fn(index)(state, to_global(host_batch), weights, teacher_params,
                                   *(() if spec is None else (base,)))
      m = jax.device_get(m)
      if not bool(m["ok"]):
        _diverged(workdir, step_now, m, rows, obj, is_main)
      steps_window += 1
      done = step_now + 1
      bar.update(1)
      if done % config.train.log_every == 0 or done == total_steps:
        dt = time.perf_counter() - t_window
        tps = steps_window * tokens_per_step / dt
        last_train = {k: float(v) for k, v in m.items() if k != "ok"}
        last_train |= {"tokens_per_s": tps, "stage": index,
                       "packing": real_tokens * jax.process_count() / (steps_window
                                                                       * layout.lanes
                                                                       * layout.length)}
        if peak:
          last_train["mfu"] = tps * flops_per_token / (peak * chips)
        writer.write(done, "train", last_train)
        bar.set_postfix(loss=f"{last_train['loss']:.3f}", tok_s=f"{tps:.0f}")
        _log(is_main, _line(done, total_steps, last_train, obj))
        t_window, steps_window, real_tokens = time.perf_counter(), 0, 0
      val = None
      if (config.train.eval_every and done % config.train.eval_every == 0) \
          or done == total_steps:
        val = evaluate(index)
        if val:
          last_val = val
          writer.write(done, "validation", val)
          _log(is_main, "validation " + _line(done, total_steps, val, obj))
      if done % config.train.checkpoint_every == 0 or done == total_steps or val:
        save(done, val)
      if stop["signal"] is not None:
        if ckpt.latest_step() != done:
          save(done)
        status = "preempted"
        _log(is_main, f"{stop['signal']}: saved step {done}; exiting")
        break
    ckpt.wait()
  finally:
    _close_all(bar.close, writer.close, train_iter.close,
               lambda: _restore_signal_handlers(previous), ckpt.close,
               failing=sys.exc_info()[1] is not None)
  final_step = int(jax.device_get(state.step))
  if status == "finished" and config.train.export:
    final = fileio.join(workdir, "final")
    params_out = state.params
    if spec is not None:  # final/ is the merged model; its adapters/ go first (config.json
      #                     of final/ is its commit point, written last)
      lora.save_adapters(fileio.join(final, lora.ADAPTERS), state.params, spec,
                         base=fingerprints["lora_base"], init=str(config.model.init))
      merged = jax.eval_shape(functools.partial(lora.merge, spec=spec), base, state.params)
      with sharding.use_mesh(mesh, rules):
        params_out = jax.jit(functools.partial(lora.merge, spec=spec), out_shardings=(
            sharding.tree_shardings(merged, transformer.param_axes(merged), mesh, rules)))(
                base, state.params)
    checkpoint_io.save_params(final, model_cfg, params_out)
    if is_main:  # the tokenizer travels with the model (eval, serving)
      for name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json",
                   "template.json"):
        if fileio.exists(fileio.join(config.dataset, name)):
          fileio.copyfile(fileio.join(config.dataset, name), fileio.join(final, name))
  return Result(step=final_step, status=status, train=last_train, validation=last_val,
                checkpoint_steps=ckpt.all_steps())




# ----------------------------------------------------------------------------- helpers


def batch_sharding_for(rows: int, mesh, rules):
  """[A, b, T, …] batches: rows over the batch axes (data, fsdp), the rest replicated."""
  spec = sharding.spec_for((rows,), ("batch",), mesh, rules)
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, spec[0]))


def local_rows(batch_sharding, rows: int) -> tuple[int, int]:
  """(start, count): the rows of a micro-batch that this process's devices hold. The
  pipeline packs exactly those, so any process count builds the same global batch."""
  spans = {(s[1].start or 0, rows if s[1].stop is None else s[1].stop)
           for s in batch_sharding.addressable_devices_indices_map((1, rows)).values()}
  lo, hi = min(a for a, _ in spans), max(b for _, b in spans)
  covered = sorted(spans)
  if covered[0][0] != lo or any(b1 < a2 for (_, b1), (a2, _) in zip(covered, covered[1:])):
    raise DataError(f"this process's devices hold non-contiguous batch rows {covered}; "
                    "order the mesh so each host's devices are adjacent on the batch axes",
                    field="config.mesh.shape")
  return lo, hi - lo


def abstract_batch(layout: pipeline.Layout, teacher: bool) -> dict:
  """ShapeDtypeStructs of one global batch."""
  host = pipeline.empty_batch(pipeline.Layout(accum=1, rows=1, length=layout.length,
                                              k=layout.k), teacher)
  return {k: jax.ShapeDtypeStruct((layout.accum, layout.rows) + v.shape[2:], v.dtype)
          for k, v in host.items()}


def jit_train_step(*, model_cfg, obj, tx, schedule, dtype, remat, online, state_sh, data_sh,
                   teacher_sh, base_sh=None, lora=None):
  fn = functools.partial(step_lib.train_step, model_cfg=model_cfg, obj=obj, tx=tx,
                         schedule=schedule, dtype=dtype, remat=remat, online=online, lora=lora)
  # a LoRA step takes the frozen base as a fifth argument; without LoRA it takes four
  in_sh = (state_sh, data_sh, None, teacher_sh) + ((base_sh,) if lora is not None else ())
  return jax.jit(fn, in_shardings=in_sh, out_shardings=(state_sh, None), donate_argnums=(0,))


def state_shardings(abstract_state, mesh, rules, tx) -> step_lib.TrainState:
  """Shardings of the whole TrainState: parameters by their logical axes, optimizer moments
  like their parameters, scalars and span weights replicated."""
  import optax

  param_sh = sharding.tree_shardings(abstract_state.params,
                                     transformer.param_axes(abstract_state.params), mesh, rules)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  train_sh = {"model": param_sh, "span": replicated}
  opt_sh = optax.tree_map_params(tx, lambda _, s: s, abstract_state.opt_state, train_sh,
                                 transform_non_params=lambda _: replicated)
  return step_lib.TrainState(step=replicated, params=param_sh, span_params=replicated,
                             opt_state=opt_sh, rng=replicated)


def _check_resumable(meta: dict, flat_config: dict, fingerprints: dict, where: str) -> None:
  old = {**{k: v for k, v in ADDED_SETTINGS.items() if k in flat_config}, **meta.get("config", {})}
  diff = sorted(k for k in set(old) | set(flat_config)
                if old.get(k) != flat_config.get(k) and not k.startswith(RESUMABLE_CHANGES))
  if diff:
    raise DataError(f"the checkpoint was written with a different config ({', '.join(diff)}); "
                    "use a new workdir for a new experiment", path=where, field=diff[0])
  for key, value in fingerprints.items():
    if meta.get("fingerprints", {}).get(key) != value:
      raise DataError(f"the checkpoint's {key} was {meta.get('fingerprints', {}).get(key)!r}, "
                      f"now {value!r}", path=where, field=key)


def _diverged(workdir, step_now, m, rows, obj, is_main) -> None:
  bad = [n for n in obj.group_names if not np.isfinite(m[f"{n}/loss"])]
  report = {"step": step_now, "loss": float(m["loss"]), "grad_norm": float(m["grad_norm"]),
            "spans": bad or ["(losses finite; the gradient is not)"],
            "examples": sorted({i for row in rows for i in row})}
  path = fileio.join(workdir, f"nan_report.process{jax.process_index()}.json")
  fileio.json_dump(path, report, indent=1)
  raise TrainingDiverged(
      f"non-finite loss/gradient at step {step_now} in span group(s) {report['spans']}; "
      f"examples {report['examples'][:5]}{'…' if len(report['examples']) > 5 else ''}; "
      f"the update was not applied and the last good checkpoint is kept (report: {path})")


def _line(step_now: int, total: int, m: dict, obj) -> str:
  parts = [f"step {step_now}/{total}", f"loss {m['loss']:.4f}"]
  for n in obj.group_names:
    if f"{n}/loss" in m:
      parts.append(f"{n} {m[f'{n}/loss']:.4f} acc {m.get(f'{n}/accuracy', 0):.3f}")
  if "tokens_per_s" in m:
    parts.append(f"{m['tokens_per_s']:.0f} tok/s")
  if "mfu" in m:
    parts.append(f"MFU {100 * m['mfu']:.1f}%")
  return " | ".join(parts)


def _close_all(*closers, failing: bool) -> None:
  """Runs every closer. While another error is on its way out, their errors (for example a
  full disk again on the metrics flush) must not replace it; otherwise the first is raised."""
  first = None
  for close in closers:
    try:
      close()
    except Exception as e:
      first = first or e
  if first is not None and not failing:
    raise first


def _log(is_main: bool, text: str) -> None:
  if is_main:
    from tqdm.auto import tqdm

    tqdm.write(text, file=sys.stdout)


def _install_signal_handlers(stop: dict):
  previous = {}

  def handler(signum, _frame):
    stop["signal"] = signal.Signals(signum).name

  for sig in (signal.SIGTERM, signal.SIGINT):
    try:
      previous[sig] = signal.signal(sig, handler)
    except ValueError:  # not the main thread: leave signals alone
      pass
  return previous


def _restore_signal_handlers(previous: dict) -> None:
  for sig, h in previous.items():
    signal.signal(sig, h)


def abstract_parts(config, *, mesh, rules, vocab: int | None = None,
                   platform: str | None = None) -> dict[str, Any]:
  """What the config's train step is made of, as shapes and shardings on `mesh` (an
  AbstractMesh will do): model_cfg, obj, tx, schedule, state (ShapeDtypeStructs) and
  state_sh, batch and batch_sh (one NamedSharding for every batch array). With a
  platform, the attention kernel is checked for it."""
  model_cfg = student_config(config, vocab=vocab or 32000, tensor=int(mesh.shape["tensor"]))
  if platform is not None:
    model_cfg = with_attention(config, model_cfg, dtype=_dtype(config.model.dtype),
                               platform=platform)
  obj = objective_for(config, model_cfg)
  tx, schedule = optimizer(config)
  spec = lora.from_config(config.model.get("lora"))
  state = jax.eval_shape(state_init_fn(config, model_cfg, obj, tx, spec), None)
  base = base_sh = None
  if spec is not None:
    base = jax.eval_shape(lambda: base_fn(config, spec)(
        transformer.init_params(model_cfg, jax.random.key(0))))
    base_sh = sharding.tree_shardings(base, transformer.param_axes(base), mesh, rules)
  rows = config.data.batch_size // config.data.accum
  layout = pipeline.Layout(accum=config.data.accum, rows=rows, length=config.data.seq_len + 1,
                           k=config.teacher.k)
  return {"model_cfg": model_cfg, "obj": obj, "tx": tx, "schedule": schedule, "state": state,
          "lora": spec, "base": base, "base_sh": base_sh,
          "state_sh": state_shardings(state, mesh, rules, tx),
          "batch": abstract_batch(layout, obj.needs_teacher and not config.teacher.online),
          "batch_sh": batch_sharding_for(rows, mesh, rules)}


def lower_abstract(config, *, devices: int, platform: str = "tpu", vocab: int | None = None):
  """Lowers the config's train step for a mesh of `devices` (resolving −1 in
  config.mesh.shape) without any device, dataset or weights: shapes from eval_shape,
  shardings on an AbstractMesh. Checks a pod config on a laptop. Returns jax's Lowered
  (on CPU, `.compile(device_assignment=tuple(jax.devices()))` compiles it)."""
  from jax.sharding import AbstractMesh, AxisType

  shape = sharding.mesh_shape(config.mesh.shape, devices)
  mesh = AbstractMesh(shape, sharding.MESH_AXES, axis_types=(AxisType.Auto,) * len(shape))
  rules = tuple(tuple(r) for r in config.mesh.rules) or sharding.DEFAULT_RULES
  parts = abstract_parts(config, mesh=mesh, rules=rules, vocab=vocab, platform=platform)
  obj, state_sh, batch, batch_sh = (parts[k] for k in ("obj", "state_sh", "batch", "batch_sh"))
  place = lambda tree, sh: jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, sh)
  step = jit_train_step(model_cfg=parts["model_cfg"], obj=obj, tx=parts["tx"],
                        schedule=parts["schedule"], dtype=_dtype(config.model.dtype),
                        remat=config.model.remat, online=None, state_sh=state_sh,
                        data_sh=jax.tree.map(lambda _: batch_sh, batch), teacher_sh=None,
                        base_sh=parts["base_sh"], lora=parts["lora"])
  weights = jax.ShapeDtypeStruct((len(obj.groups),), jnp.float32)
  base = None if parts["base"] is None else place(parts["base"], parts["base_sh"])
  with sharding.use_mesh(mesh, rules):
    traced = step.trace(place(parts["state"], state_sh),
                        place(batch, jax.tree.map(lambda _: batch_sh, batch)), weights, None,
                        *(() if base is None else (base,)))
    return traced.lower(lowering_platforms=(platform,))
