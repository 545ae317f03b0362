"""Scanned layers (model.scan_layers): the stacked layout against the unrolled model it was
converted from — logits, gradients (with remat, on one device and on meshes), KV-cache
decoding, HF/orbax save and load, teacher_layers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from sad_jax.common import sharding
from sad_jax.models import checkpoint_io, export, hf
from sad_jax.models import transformer as T
from tests.models.test_model import GEMMA2, LLAMA, QWEN, random_params

LLAMA4 = LLAMA.replace(num_layers=4)
# Gemma 2 with 4 layers alternating sliding (window 4) and full attention: the scanned body
# must take each layer's window from its scanned input, not one window for all
GEMMA2_4 = GEMMA2.replace(num_layers=4, layer_types=("sliding_attention", "full_attention") * 2)
CFGS = [LLAMA4, QWEN, GEMMA2_4]
IDS = lambda cfg: cfg.model_type


def ids_for(cfg, b=2, t=16, seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(0, cfg.vocab_size, (b, t)))


def assert_trees_close(got, want, *, tol=1e-5, where=""):
  """Per leaf, max |got − want| relative to the leaf's own scale."""
  got_leaves = jax.tree_util.tree_flatten_with_path(got)[0]
  want_leaves = jax.tree_util.tree_flatten_with_path(want)[0]
  assert [p for p, _ in got_leaves] == [p for p, _ in want_leaves], where
  for (path, g), (_, w) in zip(got_leaves, want_leaves, strict=True):
    w = np.asarray(w)
    err = float(np.abs(np.asarray(g) - w).max() / (np.abs(w).max() + 1e-12))
    assert err < tol, (where, jax.tree_util.keystr(path), err)


@pytest.mark.slow
def test_stack_and_unstack_are_inverse_and_keep_layer_order():
  params = random_params(LLAMA4)
  stacked = T.stack_layers(params)
  assert T.is_stacked(stacked) and not T.is_stacked(params)
  assert not any(k.startswith("layers_") for k in stacked)
  for i in range(4):  # layer i is slice i, leaf by leaf
    for got, want in zip(jax.tree.leaves(jax.tree.map(lambda a, i=i: a[i], stacked["layers"])),
                         jax.tree.leaves(params[f"layers_{i}"]), strict=True):
      np.testing.assert_array_equal(got, want)
  back = T.unstack_layers(stacked)
  assert jax.tree.structure(back) == jax.tree.structure(params)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params), strict=True):
    np.testing.assert_array_equal(a, b)
  assert T.stack_layers(stacked) is stacked and T.unstack_layers(params) is params
  axes = T.param_axes(stacked)
  assert axes["layers"]["attn"]["q"] == ("layers", "embed", "heads", "head_dim")
  assert axes["embed"] == ("vocab", "embed")
  # the rules leave the layer axis whole on every device
  mesh = sharding.make_mesh((2, 2, 2))
  assert sharding.spec_for((4, 32, 4, 8), axes["layers"]["attn"]["q"], mesh) == \
      P(None, "fsdp", "tensor", None)
  with pytest.raises(ValueError, match="layers_0"):
    T.stack_layers({k: v for k, v in params.items() if k != "layers_1"})


def test_init_params_scan_has_the_stacked_shapes():
  stacked = T.init_params(LLAMA4, jax.random.key(0), scan=True)
  want = jax.eval_shape(T.stack_layers, T.init_params(LLAMA4, jax.random.key(0)))
  assert jax.tree.map(lambda a: a.shape, stacked) == jax.tree.map(lambda a: a.shape, want)


@pytest.mark.parametrize("cfg", CFGS, ids=IDS)
def test_scanned_logits_equal_unrolled(cfg):
  params = random_params(cfg)
  ids = ids_for(cfg)
  want = T.Transformer(cfg).apply({"params": params}, ids)
  got = jax.jit(lambda p: T.Transformer(cfg, scan=True).apply({"params": p}, ids))(
      T.stack_layers(params))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  # hf.forward picks the layout from the params
  np.testing.assert_allclose(hf.forward(cfg, T.stack_layers(params), ids),
                             hf.forward(cfg, params, ids), rtol=1e-5, atol=1e-5)


def _loss(cfg, remat):
  def loss(p, ids):
    h, w, _ = T.features(cfg, p, ids, remat=remat)
    return jnp.mean(jnp.tanh(h @ w))
  return loss


@pytest.mark.slow
@pytest.mark.parametrize("cfg", [LLAMA4, GEMMA2_4], ids=IDS)
def test_scanned_gradients_equal_unrolled_with_every_remat(cfg):
  params = random_params(cfg)
  ids = ids_for(cfg)
  want = jax.jit(jax.grad(_loss(cfg, "none")))(params, ids)
  for remat in ("none", "block", "attention"):
    f = jax.grad(_loss(cfg, remat))
    got = jax.jit(f)(T.stack_layers(params), ids)
    assert_trees_close(T.unstack_layers(got), want, where=remat)
    # the remat is inside the scanned body: one checkpoint in the scan, none outside it
    jaxpr = jax.make_jaxpr(f)(T.stack_layers(params), ids)
    scans = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "scan"]
    assert scans, "no scan in the scanned model's jaxpr"
    inside = any("checkpoint" in str(s.params["jaxpr"]) or "remat" in str(s.params["jaxpr"])
                 for s in scans)
    assert inside == (remat != "none"), remat


@pytest.mark.slow
def test_scanned_kv_cache_decoding_equals_full_forward():
  cfg = GEMMA2_4
  params = random_params(cfg)
  stacked = T.stack_layers(params)
  ids = ids_for(cfg, b=1, t=12)
  full = T.Transformer(cfg).apply({"params": params}, ids)
  model = T.Transformer(cfg, scan=True)
  cache = T.init_cache(cfg, 1, 16)
  z, cache = model.apply({"params": stacked}, ids[:, :8], cache=cache, cache_index=0)
  outs = [z]
  for i in range(8, 12):
    z, cache = model.apply({"params": stacked}, ids[:, i:i + 1],
                           positions_bt=jnp.full((1, 1), i), cache=cache, cache_index=i)
    outs.append(z)
  np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, rtol=1e-5, atol=1e-5)


def sharded_grads(cfg, shape, params):
  """(loss, grads) of a scalar loss through the model with `params` placed on a mesh of
  `shape` by their logical axes, the activations constrained as in training."""
  ids = ids_for(cfg, b=8)
  mesh = sharding.make_mesh(shape)
  psh = sharding.tree_shardings(params, T.param_axes(params), mesh)
  bsh = sharding.sharding_for(ids.shape, ("batch", "length"), mesh)
  params, ids = jax.device_put(params, psh), jax.device_put(ids, bsh)
  with sharding.use_mesh(mesh):
    f = jax.jit(jax.value_and_grad(_loss(cfg, "block")), in_shardings=(psh, bsh),
                out_shardings=(NamedSharding(mesh, P()), psh))
    return params, f(params, ids)


@pytest.mark.slow
@pytest.mark.parametrize("cfg, shape", [(LLAMA4, (2, 2, 2)), (GEMMA2_4, (1, 2, 4))],
                         ids=lambda x: x.model_type if hasattr(x, "model_type")
                         else "x".join(map(str, x)))
def test_sharded_scanned_gradients_equal_one_device_unrolled(cfg, shape):
  params = random_params(cfg)
  ref_loss, ref_grads = jax.jit(jax.value_and_grad(_loss(cfg, "none")))(params, ids_for(cfg, b=8))
  placed, (loss, grads) = sharded_grads(cfg, shape, T.stack_layers(params))
  # really split: the stacked q over fsdp (embed) and tensor (heads), its layer axis whole
  want_q = P(None, "fsdp", "tensor", None)
  assert placed["layers"]["attn"]["q"].sharding.spec == want_q
  assert grads["layers"]["attn"]["q"].sharding.spec == want_q
  assert placed["layers"]["mlp"]["down"].sharding.spec == P(None, "tensor", "fsdp")
  assert not placed["layers"]["attn"]["q"].sharding.is_fully_replicated
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  assert_trees_close(T.unstack_layers(grads), ref_grads, where=str(shape))


# ----------------------------------------------------------------------------- load / save


def test_hf_save_and_export_of_a_scanned_model_write_the_same_tensors(tmp_path):
  params = random_params(QWEN)
  stacked = T.stack_layers(params)
  want, got = hf._to_hf(QWEN, params), hf._to_hf(QWEN, stacked)
  assert sorted(got) == sorted(want)
  for name in want:
    np.testing.assert_array_equal(got[name], want[name], err_msg=name)
  for layout, p in (("unrolled", params), ("scanned", stacked)):
    (tmp_path / layout).mkdir()
    export.write_weights(QWEN, p, str(tmp_path / layout), dtype="float32")
  assert (tmp_path / "unrolled" / "model.safetensors").read_bytes() == \
      (tmp_path / "scanned" / "model.safetensors").read_bytes()
  # and an HF folder loads back per layer, which stacks to the same scanned model
  hf.save(QWEN, stacked, tmp_path / "hf")
  cfg, loaded = hf.load(tmp_path / "hf")
  assert cfg.num_layers == QWEN.num_layers
  assert not T.is_stacked(loaded)
  for a, b in zip(jax.tree.leaves(T.stack_layers(loaded)), jax.tree.leaves(stacked),
                  strict=True):
    np.testing.assert_array_equal(a, b)


def test_orbax_model_folder_of_a_scanned_model_is_per_layer(tmp_path):
  params = random_params(LLAMA4)
  checkpoint_io.save_params(tmp_path / "m", LLAMA4, T.stack_layers(params))
  cfg, loaded = checkpoint_io.load_model(tmp_path / "m")
  assert cfg.num_layers == 4 and not T.is_stacked(loaded)
  for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(params), strict=True):
    np.testing.assert_array_equal(a, b)


def test_teacher_layers_of_a_scanned_model_equal_those_of_the_unrolled():
  params = random_params(LLAMA4)
  want_cfg, want = checkpoint_io.select_layers(LLAMA4, params, (0, 2, 3))
  got_cfg, got = checkpoint_io.select_layers(LLAMA4, T.stack_layers(params), (0, 2, 3))
  assert got_cfg == want_cfg and want_cfg.num_layers == 3
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(got["layers_1"]["attn"]["q"], params["layers_2"]["attn"]["q"])


def test_teacher_topk_of_a_stacked_teacher_equals_the_unrolled():
  from sad_jax.teacher import precompute

  params = random_params(GEMMA2_4)
  ids = ids_for(GEMMA2_4, t=12)
  kw = dict(cfg=GEMMA2_4, k=5, temperature=1.0, chunk=4)
  want_ids, want_lp = precompute.teacher_topk(params, ids, **kw)
  got_ids, got_lp = precompute.teacher_topk(T.stack_layers(params), ids, **kw)
  np.testing.assert_array_equal(got_ids, want_ids)
  np.testing.assert_allclose(got_lp, want_lp, rtol=1e-5, atol=1e-5)
