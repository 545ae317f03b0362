"""The jitted train step: sharded runs equal one device (several meshes, incl. (2,2,2)),
gradient accumulation equals the full batch, packing never mixes trajectories, and the
online teacher equals the precomputed store."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from sad_jax.common import sharding
from sad_jax.common.types import SpanKind
from sad_jax.distill import curriculum, losses, objectives
from sad_jax.models import checkpoint_io
from sad_jax.models import transformer as T
from sad_jax.trainer import pipeline, train
from sad_jax.trainer import setup as train_setup
from sad_jax.trainer import step as step_lib
from tests.train.conftest import train_config

STAGES = (curriculum.Stage("all", 10, (1.0,), (1.0, 1.0), 1.0),)


def batches(train_data, *, accum=1, rows=4, n=2, k=8, teacher=True, length=129):
  ds, store_dir, _ = train_data
  split = pipeline.open_split(ds, "train")
  store = pipeline.open_teacher(store_dir, split, k=k) if teacher else None
  layout = pipeline.Layout(accum=accum, rows=rows, length=length, k=k if teacher else 0)
  it = pipeline.TrainIterator(split=split, teacher=store, layout=layout, stages=STAGES,
                              bucket_n=np.zeros(len(split), np.int32),
                              weight_n=np.linspace(0.1, 1, len(split)).astype(np.float32),
                              seed=3, prefetch=0)
  return layout, [next(it)[0] for _ in range(n)]


def run(train_data, mesh_shape, host_batches, layout, *, objective="sad", extra=(),
        online=None, teacher_params=None, steps=None, scan=False, remat="none",
        weights_per_step=None):
  config, _ = train_config(train_data, objective, extra=["--config.optim.warmup_steps=0",
                                                          *extra])
  n = int(np.prod(mesh_shape))
  mesh = sharding.make_mesh(mesh_shape, devices=jax.devices()[:n])
  rules = sharding.DEFAULT_RULES
  model_cfg = train_setup.student_config(config, vocab=600, tensor=mesh.shape["tensor"])
  obj = train_setup.objective_for(config, model_cfg)
  tx = step_lib.make_optimizer(config.optim, 10)
  schedule = step_lib.lr_schedule(config.optim, 10)

  def init():  # scan: the same initial params, stacked
    return step_lib.init_state(T.to_layout(T.init_params(model_cfg, jax.random.key(0)),
                                           scan=scan), jnp.zeros(len(obj.groups)), tx, 0)

  state_sh = train.state_shardings(jax.eval_shape(init), mesh, rules, tx)
  batch_sh = train.batch_sharding_for(layout.rows, mesh, rules)
  data_sh = jax.tree.map(lambda _: batch_sh, host_batches[0])
  teacher_sh = None
  if teacher_params is not None:
    teacher_sh = sharding.tree_shardings(teacher_params, T.param_axes(teacher_params), mesh,
                                         rules)
    teacher_params = jax.device_put(teacher_params, teacher_sh)
  step = train.jit_train_step(model_cfg=model_cfg, obj=obj, tx=tx, schedule=schedule,
                              dtype=jnp.float32, remat=remat, online=online,
                              state_sh=state_sh, data_sh=data_sh, teacher_sh=teacher_sh)
  weights = jnp.ones(len(obj.groups), jnp.float32)
  with sharding.use_mesh(mesh, rules):
    state = jax.jit(init, out_shardings=state_sh)()
    history = []
    for i, b in enumerate(host_batches[:steps]):
      batch = jax.device_put(b, data_sh)
      w = weights if weights_per_step is None else jnp.asarray(weights_per_step[i])
      state, m = step(state, batch, w, teacher_params)
      # the first moment after this step: (1 − b1)·(clipped gradient) at step 0, then its
      # running mean: the step's per-leaf gradients, as the optimizer saw them
      m["mu"] = jax.tree.map(np.asarray, jax.device_get(optax.tree.get(state.opt_state, "mu")))
      m["batch_spec"] = batch["ids"].sharding.spec
      history.append(jax.device_get(m))
  return jax.tree.map(np.asarray, jax.device_get(state.params)), history, state


def leaf_paths(tree) -> list[str]:
  return [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def close(a, b, rtol=1e-5, atol=1e-6):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(x, y, rtol=rtol, atol=atol)


def same_gradients(got, want, *, tol=2e-5, where=""):
  """Per leaf: max |got − want| within `tol` of the leaf's own scale (a small leaf's error
  is not hidden by a large one's)."""
  got_leaves = jax.tree_util.tree_flatten_with_path(got)[0]
  for (path, g), w in zip(got_leaves, jax.tree.leaves(want), strict=True):
    w = np.asarray(w)
    assert np.abs(w).max() > 0, (where, jax.tree_util.keystr(path))  # a leaf that trained
    err = float(np.abs(np.asarray(g) - w).max() / np.abs(w).max())
    assert err < tol, (where, jax.tree_util.keystr(path), err)


# Rows every mesh's batch axes (data × fsdp: 8, 4, 2) divide, so each mesh is
# data-parallel; specs written out by hand from DEFAULT_RULES (embed → fsdp, heads / mlp /
# vocab → tensor; a mesh axis of size 1 leaves its dimension replicated).
BATCH = P(None, ("data", "fsdp"))
PARAM_SPECS = {
    (2, 2, 2): {"['embed']": P("tensor", "fsdp"), "['layers_0']['attn']['q']": P("fsdp", "tensor"),
                "['layers_0']['mlp']['down']": P("tensor", "fsdp")},
    (1, 2, 4): {"['embed']": P("tensor", "fsdp"), "['layers_0']['attn']['q']": P("fsdp", "tensor"),
                "['layers_0']['mlp']['down']": P("tensor", "fsdp"),
                "['layers_0']['attn']['k']": P("fsdp")},  # 2 KV heads: not split 4 ways
    (8, 1, 1): {"['embed']": P(), "['layers_0']['attn']['q']": P(),
                "['layers_0']['mlp']['down']": P()},
}


def assert_specs(shape, state, hist):
  """The batch is split over the batch axes; the parameters and both Adam moments are
  split as the rules say (checked per leaf in the moments: each like its parameter)."""
  for h in hist:
    assert h["batch_spec"] == BATCH, (shape, h["batch_spec"])
  params = dict(zip(leaf_paths(state.params), jax.tree.leaves(state.params)))
  for path, spec in PARAM_SPECS[shape].items():
    got = params[path].sharding.spec
    assert tuple(got) + (None,) * (params[path].ndim - len(got)) == \
        tuple(spec) + (None,) * (params[path].ndim - len(spec)), (shape, path, got)
  for moment in ("mu", "nu"):
    tree = optax.tree.get(state.opt_state, moment)["model"]
    for path, leaf, param in zip(leaf_paths(tree), jax.tree.leaves(tree),
                                 jax.tree.leaves(state.params)):
      assert leaf.sharding.spec == param.sharding.spec, (shape, moment, path)


@pytest.mark.slow
def test_a_non_finite_step_leaves_the_sharded_state_bit_identical(train_data):
  """A step whose loss is not finite (NaN span weights) updates nothing: on a (2,2,2) mesh,
  NaN-step-then-step on one batch ends bit-identical to the step alone (parameters, both
  Adam moments, step counter), and reports ok=False for the skipped step."""
  layout, hb = batches(train_data, n=1)
  ones = np.ones(2, np.float32)
  skipped, hist, st = run(train_data, (2, 2, 2), [hb[0], hb[0]], layout,
                          weights_per_step=[np.full(2, np.nan, np.float32), ones])
  alone, hist1, st1 = run(train_data, (2, 2, 2), hb, layout, weights_per_step=[ones])
  assert [bool(h["ok"]) for h in hist] == [False, True] and bool(hist1[0]["ok"])
  assert int(st.step) == int(st1.step) == 1
  for a, b in zip(jax.tree.leaves(jax.device_get((skipped, st.opt_state))),
                  jax.tree.leaves(jax.device_get((alone, st1.opt_state))), strict=True):
    np.testing.assert_array_equal(a, b)
  # the skipped step left the first moment at zero; the finite one moved it
  assert not any(np.any(m) for m in jax.tree.leaves(hist[0]["mu"]))
  assert any(np.any(m) for m in jax.tree.leaves(hist[1]["mu"]))


@pytest.mark.slow
@pytest.mark.parametrize("objective,extra", [
    ("sad", ()),
    ("sad", ("--config.objective.learnable_weights=true", "--config.objective.pcgrad=true")),
])
def test_sharded_steps_equal_one_device(train_data, objective, extra):
  """The reference is the full head on one device; the meshes run the compact head (loss
  positions only, chunks of 16: each micro-batch's loop stops early, checked below)."""
  layout, host = batches(train_data, accum=2, rows=8)
  ref_params, ref_hist, _ = run(train_data, (1, 1, 1), host, layout, objective=objective,
                                extra=(*extra, "--config.objective.compact_head=false"))
  for b in host:
    for mb in range(layout.accum):
      t = losses.shift_targets(b["ids"][mb], b["kinds"][mb], b["segment_ids"][mb])
      need = np.asarray(losses.loss_positions(
          label_kinds_bt=t["label_kinds_bt"], teacher_mask_bt=b["teacher_mask"][mb][:, :-1],
          groups=objectives.groups_for(objective))).sum(1).max()
      assert 0 < need <= layout.length - 1 - 16, need
  compact = (*extra, "--config.objective.chunk_size=16")
  meshes = [(2, 2, 2), (1, 2, 4), (8, 1, 1)] if not extra else [(2, 2, 2)]
  for shape in meshes:
    params, hist, state = run(train_data, shape, host, layout, objective=objective,
                              extra=compact)
    assert_specs(shape, state, hist)
    for i, (h, r) in enumerate(zip(hist, ref_hist)):
      assert bool(h["ok"]) and h["lr"] > 0
      for key in ("loss", "grad_norm", "reason/loss", "action/loss", "curriculum/loss"):
        np.testing.assert_allclose(h[key], r[key], rtol=2e-5, err_msg=f"{shape} {key}")
      same_gradients(h["mu"]["model"], r["mu"]["model"], where=f"{shape} step {i}")
      np.testing.assert_allclose(h["mu"]["span"], r["mu"]["span"], rtol=2e-5, atol=1e-9)
    # Adam divides by √v: where a gradient entry is ~0, float noise in it moves the update
    # by up to a few 1e-3 of a step (lr 3e-3), hence atol 3e-5 on the parameters
    close(params, ref_params, atol=3e-5)


@pytest.mark.slow
def test_scanned_layer_steps_on_meshes_equal_the_unrolled_one_device_steps(train_data):
  """model.scan_layers: the stacked student's train steps on (2,2,2) and (1,2,4), with
  block remat inside the scanned body, against the unrolled student on one device: losses,
  per-leaf gradients (Adam's first moment) and parameters, the stacked leaves split as
  their per-layer slices are (the layer axis whole)."""
  layout, host = batches(train_data, accum=2, rows=8)
  ref_params, ref_hist, _ = run(train_data, (1, 1, 1), host, layout)
  for shape, remat in (((2, 2, 2), "block"), ((1, 2, 4), "none")):
    params, hist, state = run(train_data, shape, host, layout, scan=True, remat=remat)
    stacked = state.params["layers"]
    assert stacked["attn"]["q"].shape[0] == 2 and "layers_0" not in state.params
    assert stacked["attn"]["q"].sharding.spec == P(None, "fsdp", "tensor", None), shape
    assert stacked["mlp"]["down"].sharding.spec == P(None, "tensor", "fsdp"), shape
    for h, r in zip(hist, ref_hist, strict=True):
      assert bool(h["ok"])
      for key in ("loss", "grad_norm", "reason/loss", "action/loss"):
        np.testing.assert_allclose(h[key], r[key], rtol=2e-5, err_msg=f"{shape} {key}")
      same_gradients(T.unstack_layers(h["mu"]["model"]), r["mu"]["model"], where=str(shape))
    close(T.unstack_layers(params), ref_params, atol=3e-5)


def test_accumulation_equals_the_full_batch(train_data):
  # lanes are numbered micro-batch-major, so A=2×b=2 holds the same rows as A=1×b=4
  lay1, host1 = batches(train_data, accum=1, rows=4, n=1)
  lay2, host2 = batches(train_data, accum=2, rows=2, n=1)
  np.testing.assert_array_equal(host1[0]["ids"].reshape(4, -1), host2[0]["ids"].reshape(4, -1))
  extra = ("--config.objective.learnable_weights=true",)
  p0, _, _ = run(train_data, (1, 1, 1), host1, lay1, extra=extra, steps=0)
  p1, h1, s1 = run(train_data, (1, 1, 1), host1, lay1, extra=extra)
  p2, h2, s2 = run(train_data, (1, 1, 1), host2, lay2, extra=extra)
  for key in ("loss", "grad_norm", "reason/loss", "action/loss", "reason/accuracy",
              "curriculum/loss", "reason/tokens"):
    np.testing.assert_allclose(h1[0][key], h2[0][key], rtol=1e-5, err_msg=key)
  # step 0 trained (lr is the peak there): every leaf moved by ~lr, so the comparison
  # below is of updated parameters, not of the initial ones with themselves
  assert h1[0]["lr"] > 0
  for path, a, b in zip(leaf_paths(p0), jax.tree.leaves(p1), jax.tree.leaves(p0)):
    assert np.abs(a - b).max() > 0.1 * h1[0]["lr"], path
  same_gradients(h2[0]["mu"]["model"], h1[0]["mu"]["model"], where="accumulation")
  assert np.abs(h1[0]["mu"]["span"]).min() > 0  # the learnable weights have gradients too
  np.testing.assert_allclose(h2[0]["mu"]["span"], h1[0]["mu"]["span"], rtol=2e-5)
  close(p1, p2)
  np.testing.assert_allclose(s1.span_params, s2.span_params, rtol=1e-5, atol=1e-7)


def test_packed_rows_equal_trajectories_run_alone(train_data):
  """Sums and counts of the eval step over packed rows equal those over the same
  trajectories one per row: attention and targets never cross a trajectory."""
  _, host = batches(train_data, accum=1, rows=2, n=1, length=513)
  packed = host[0]
  assert packed["segment_ids"].max() >= 2
  # unpack: each trajectory alone in a row
  alone = {k: [] for k in packed}
  for r in range(2):
    seg = packed["segment_ids"][0, r]
    for s in range(1, seg.max() + 1):
      cols = np.flatnonzero(seg == s)
      for k, v in packed.items():
        row = np.zeros_like(v[0, r])
        row[: len(cols)] = v[0, r, cols]
        if k == "positions":
          row[: len(cols)] = np.arange(len(cols))
        alone[k].append(row)
  alone = {k: np.stack(v)[None] for k, v in alone.items()}
  config, _ = train_config(train_data)
  model_cfg = train_setup.student_config(config, vocab=600, tensor=1)
  obj = train_setup.objective_for(config, model_cfg)
  params = T.init_params(model_cfg, jax.random.key(1))
  w = jnp.ones(2)
  out = [step_lib.eval_step(params, jnp.zeros(2), {k: jnp.asarray(v) for k, v in b.items()}, w,
                            model_cfg=model_cfg, obj=obj) for b in (packed, alone)]
  np.testing.assert_array_equal(out[0]["count"], out[1]["count"])
  np.testing.assert_allclose(out[0]["sum"], out[1]["sum"], rtol=1e-5)
  np.testing.assert_allclose(out[0]["correct"], out[1]["correct"])


def test_online_teacher_equals_the_store(train_data):
  """The teacher's forward inside the step gives the loss of its precomputed top-k
  (float16 storage: 1e-3)."""
  _, _, teacher_dir = train_data
  tcfg, tparams = checkpoint_io.load_model(teacher_dir)
  layout, host = batches(train_data, rows=4, n=1, k=16)
  online = step_lib.OnlineTeacher(cfg=tcfg, k=16, kinds=(int(SpanKind.REASON),
                                                         int(SpanKind.ACTION)))
  extra = ("--config.teacher.k=16",)
  _, h_store, _ = run(train_data, (1, 1, 1), host, layout, extra=extra)
  no_store = [{k: v for k, v in b.items() if not k.startswith("teacher")} for b in host]
  layout0 = dataclasses.replace(layout, k=0)
  _, h_online, _ = run(train_data, (1, 1, 1), no_store, layout0, extra=extra, online=online,
                       teacher_params=tparams)
  assert h_store[0]["reason/tokens"] == h_online[0]["reason/tokens"] > 0
  np.testing.assert_allclose(h_online[0]["reason/loss"], h_store[0]["reason/loss"], rtol=1e-3)
  np.testing.assert_allclose(h_online[0]["action/loss"], h_store[0]["action/loss"], rtol=1e-6)


def test_lr_schedule_trains_at_step_0_and_decays_by_hand():
  """Warm-up that already trains at step 0 (hand-computed values), warmup_steps=0 is the
  peak at once, and the cosine ends at lr·final_fraction."""
  import math
  import types

  optim = types.SimpleNamespace(lr=1e-2, warmup_steps=4, final_fraction=0.1)
  f = step_lib.lr_schedule(optim, 14)
  want = {0: 2.5e-3, 1: 5e-3, 3: 1e-2, 4: 1e-2, 9: 1e-3 + 9e-3 * 0.5 * (1 + math.cos(math.pi / 2)),
          14: 1e-3, 20: 1e-3}
  for s, v in want.items():
    np.testing.assert_allclose(float(f(s)), v, rtol=1e-6, err_msg=f"step {s}")
  g = step_lib.lr_schedule(types.SimpleNamespace(lr=1e-2, warmup_steps=0, final_fraction=0.1),
                           10)
  np.testing.assert_allclose(float(g(0)), 1e-2, rtol=1e-6)
  np.testing.assert_allclose(float(g(5)), 1e-3 + 9e-3 * 0.5, rtol=1e-6)


def np_log_softmax(z):
  z = np.asarray(z, np.float64)
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def test_a_stage_temperature_softens_teacher_and_student_alike(train_data):
  """At a stage's τ = 2, the reason loss is τ²·KL(softmax(z_t/2) ‖ softmax(z_s/2)) per
  target, from both models' full logits in float64 (k = the whole vocabulary, so the
  top-k is exact): the online teacher is softened by the stage's τ, not left at 1."""
  tau = 2.0
  _, _, teacher_dir = train_data
  tcfg, tparams = checkpoint_io.load_model(teacher_dir)
  _, host = batches(train_data, rows=2, n=1, teacher=False)
  batch = {k: jnp.asarray(v) for k, v in host[0].items()}
  config, _ = train_config(train_data, extra=["--config.objective.tail=ignore"])
  model_cfg = train_setup.student_config(config, vocab=tcfg.vocab_size, tensor=1)
  online = step_lib.OnlineTeacher(cfg=tcfg, k=tcfg.vocab_size, kinds=(int(SpanKind.REASON),))
  obj, online = train_setup.at_temperature(train_setup.objective_for(config, model_cfg), online, tau)
  params = T.init_params(model_cfg, jax.random.key(1))
  out = step_lib.eval_step(params, jnp.zeros(2), batch, jnp.ones(2), tparams,
                           model_cfg=model_cfg, obj=obj, online=online)

  mb = {k: np.asarray(v[0]) for k, v in host[0].items()}
  inputs, pos, seg = mb["ids"][:, :-1], mb["positions"][:, :-1], mb["segment_ids"][:, :-1]

  def logits(cfg, p):
    h, w, _ = T.features(cfg, p, jnp.asarray(inputs), positions_bt=jnp.asarray(pos),
                         segment_ids_bt=jnp.asarray(seg))
    return np.asarray(h, np.float64) @ np.asarray(w, np.float64)[:, :cfg.vocab_size]

  log_p = np_log_softmax(logits(tcfg, tparams) / tau)
  log_q = np_log_softmax(logits(model_cfg, params) / tau)
  kl = tau ** 2 * np.sum(np.exp(log_p) * (log_p - log_q), axis=-1)
  same = (mb["segment_ids"][:, 1:] == seg) & (seg > 0)
  reason = same & (mb["kinds"][:, 1:] == SpanKind.REASON)
  assert reason.sum() > 0 and out["count"][0] == reason.sum()
  np.testing.assert_allclose(float(out["sum"][0]), kl[reason].sum(), rtol=2e-4)


def test_a_stage_temperature_must_be_the_stores(train_data, tmp_path):
  """A store holds the teacher at one τ: a stage at another τ is refused, naming both."""
  config, _ = train_config(train_data)
  stages = list(config.curriculum.stages)
  stages[1] = {**stages[1].to_dict(), "temperature": 2.0}
  config.curriculum.stages = tuple(stages)
  with pytest.raises(train.DataError) as e:
    train.train_and_evaluate(config, str(tmp_path))
  assert e.value.field == "config.curriculum.stages[1].temperature"
  assert e.value.path.endswith("manifest.json")
  assert "stage 'all' distils at τ=2 but the teacher store holds the teacher's top-k at τ=1" \
      in str(e.value)


@pytest.mark.parametrize("scan", [False, True])
def test_lowered_train_step_constrains_every_block_boundary(scan):
  """The lowered (2,2,2) train step of a 2-layer student holds the block-boundary sharding
  constraints, counted by hand: per layer, the attention and MLP inputs as rows [B·T, D],
  q and the attention output [B,T,H,hd], k and v [B,T,KV,hd], the MLP hidden [B·T, F], and
  [B,T,D] after attention, after the MLP and after each residual add; per model, [B,T,D]
  after the embedding and after the final norm. The backward pass constrains each
  cotangent too (×2). Scanned layers emit one layer body, so its constraints appear once.
  A dropped constraint, or a step traced outside the mesh context (constrain is then a
  no-op), fails here."""
  import collections
  import re

  from sad_jax.common import configlib
  from tests.train.conftest import REPO, TINY

  config = configlib.load(f"{REPO}/sad_jax/configs/train_sad.py:runlocal",
                          [*TINY, "--config.mesh.shape=(2,2,2)",
                           f"--config.model.scan_layers={scan}"])
  text = train.lower_abstract(config, devices=8, platform="cpu", vocab=600).as_text()
  found = collections.Counter(re.findall(
      r"sdy\.sharding_constraint %\S+ <@mesh, (\[.*?\])> : tensor<(\w+)>", text))
  b, t, d, f, h, kv, hd = 4, 128, 32, 64, 4, 2, 8  # runlocal batch 4, TINY sizes
  layers = 1 if scan else 2  # layer bodies in the program
  rows, split = '[{"data", "fsdp"}, {}]', '[{"data", "fsdp"}, {}, {"tensor"}, {}]'
  want = {
      (rows, f"{b * t}x{d}xf32"): 2 * layers * 2,
      (split, f"{b}x{t}x{h}x{hd}xf32"): 2 * layers * 2,
      (split, f"{b}x{t}x{kv}x{hd}xf32"): 2 * layers * 2,
      ('[{"data", "fsdp"}, {"tensor"}]', f"{b * t}x{f}xf32"): 2 * layers * 1,
      ('[{"data", "fsdp"}, {}, {}]', f"{b}x{t}x{d}xf32"): 2 * (layers * 4 + 2),
  }
  assert dict(found) == want
