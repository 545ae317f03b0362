"""LoRA students (issue 42): the adapter maths against float64 NumPy and a PyTorch/PEFT
float64 gradient, the trainer (adapters-only checkpoints, frozen base bit-identical, exact
resume, a changed base refused), the PEFT and merged exports loaded by transformers/peft,
sharded steps on (2,2,2) and (1,2,4) against one device with the specs asserted, and every
objective, pcgrad and learnable span weights on a LoRA student."""

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from sad_jax.common import sharding
from sad_jax.common.errors import DataError
from sad_jax.models import checkpoint_io, hf, lora
from sad_jax.models import transformer as T
from sad_jax.models.config import ModelConfig
from sad_jax.trainer import step as step_lib
from sad_jax.trainer import train
from tests.train.conftest import REPO, train_config
from tests.train.test_step import batches, leaf_paths

SPEC = lora.LoraSpec(rank=4, alpha=8.0)
CFG = ModelConfig(model_type="llama", vocab_size=61, hidden_size=32, intermediate_size=48,
                  num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                  attention="reference")


@jax.jit
def _logits(params, ids):
  """The model's forward, compiled: eager Flax dispatches op by op, the tests' main cost."""
  return T.Transformer(CFG, scan="layers" in params).apply({"params": params}, ids)


def _moved(adapters, seed=5, scale=0.1):
  """Adapters with B (and A) moved off their initial values, as after training."""
  leaves, tree = jax.tree.flatten(adapters)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(tree, [x + scale * jax.random.normal(k, x.shape)
                                   for k, x in zip(keys, leaves)])


def test_adapters_start_at_the_base_and_merge_to_w_plus_scaled_ab():
  base = T.init_params(CFG, jax.random.key(0))
  ad = lora.init_adapters(base, SPEC, jax.random.key(1))
  ids = jnp.asarray(np.random.default_rng(0).integers(0, 61, (2, 9)))
  model = T.Transformer(CFG)
  # B = 0: the LoRA model's logits are the base's, bit for bit
  np.testing.assert_array_equal(model.apply({"params": lora.combine(base, ad, SPEC)}, ids),
                                model.apply({"params": base}, ids))
  ad = _moved(ad)
  merged = lora.merge(base, ad, SPEC)
  s = SPEC.alpha / SPEC.rank
  for layer in ("layers_0", "layers_1"):
    for mod, name in (("attn", "q"), ("attn", "o"), ("mlp", "down")):
      w = np.asarray(base[layer][mod][name], np.float64)
      a = np.asarray(ad[layer][mod][name + "_lora_a"], np.float64)
      b = np.asarray(ad[layer][mod][name + "_lora_b"], np.float64)
      want = w + s * np.tensordot(a, b, axes=([a.ndim - 1], [0]))
      np.testing.assert_allclose(merged[layer][mod][name], want, rtol=0, atol=2e-6)
    # untargeted leaves pass through
    np.testing.assert_array_equal(merged[layer]["input_norm"]["scale"],
                                  base[layer]["input_norm"]["scale"])
  # the unmerged forward (x@W + s·(x@A)@B) is the merged model's
  z = _logits(lora.combine(base, ad, SPEC), ids)
  np.testing.assert_allclose(z, _logits(merged, ids), atol=2e-5)
  # the stacked layout computes the same
  stacked = T.stack_layers(base)
  st_ad = {"layers": jax.tree.map(lambda *x: jnp.stack(x), ad["layers_0"], ad["layers_1"])}
  np.testing.assert_allclose(_logits(lora.combine(stacked, st_ad, SPEC), ids), z, atol=2e-5)
  # a target regex: only the value and down projections
  only = lora.LoraSpec(rank=2, alpha=2.0, targets=r"^(attn/v|mlp/down)$")
  got = lora.init_adapters(base, only, jax.random.key(1))
  assert sorted(got["layers_0"]["attn"]) == ["v_lora_a", "v_lora_b"]
  assert sorted(got["layers_0"]["mlp"]) == ["down_lora_a", "down_lora_b"]


def test_int8_and_bfloat16_bases_are_dequantised_at_the_layer():
  base = T.init_params(CFG, jax.random.key(0))
  ad = _moved(lora.init_adapters(base, SPEC, jax.random.key(1)))
  ids = jnp.asarray(np.random.default_rng(1).integers(0, 61, (1, 7)))
  for dtype, leaf_dtype in (("bfloat16", jnp.bfloat16), ("int8", jnp.int8)):
    spec = lora.LoraSpec(rank=4, alpha=8.0, base_dtype=dtype)
    q = lora.prepare_base(base, spec)
    assert q["layers_0"]["attn"]["q"].dtype == leaf_dtype
    assert q["layers_0"]["input_norm"]["scale"].dtype == jnp.float32
    w = np.asarray(base["layers_0"]["mlp"]["down"], np.float64)
    deq = np.asarray(lora.dequantize(q)["layers_0"]["mlp"]["down"], np.float64)
    if dtype == "int8":  # absmax per output channel: error ≤ half a step of 127 levels
      step = np.abs(w).max(axis=0) / 127
      assert np.all(np.abs(deq - w) <= step / 2 + 1e-7)
      assert q["layers_0"]["mlp"]["down_qscale"].shape == (CFG.hidden_size,)
    # the quantised base in the model == the dequantised dense weights plus the adapters
    np.testing.assert_allclose(_logits(lora.combine(q, ad, spec), ids),
                               _logits(lora.merge(q, ad, spec), ids), atol=3e-5)


def _torch_llama(cfg: ModelConfig, params, folder: str):
  hf.save(cfg, params, folder)
  import torch
  import transformers

  return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float64).eval()


def test_adapter_gradients_equal_peft_in_float64(tmp_path):
  """Cross-entropy of a sequence through the LoRA student: our float32 gradients of the
  adapters against PEFT's float64 autograd on the same weights (an independent model)."""
  torch = pytest.importorskip("torch", reason="the `hf` extra is needed")
  peft = pytest.importorskip("peft", reason="the `hf` extra (peft) is needed")
  cfg = CFG.replace(attention="reference")
  base = jax.tree.map(lambda a: a * 4, T.init_params(cfg, jax.random.key(2)))
  ad = _moved(lora.init_adapters(base, SPEC, jax.random.key(3)), scale=0.3)
  ids = np.random.default_rng(2).integers(0, 61, (2, 12))

  def loss(a):
    z = T.Transformer(cfg).apply({"params": lora.combine(base, a, SPEC)}, jnp.asarray(ids))
    logp = jax.nn.log_softmax(z[:, :-1], axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, jnp.asarray(ids)[:, 1:, None], -1))

  ours = jax.grad(loss)(ad)
  model = _torch_llama(cfg, base, str(tmp_path / "base"))
  lc = peft.LoraConfig(r=SPEC.rank, lora_alpha=SPEC.alpha, target_modules=[
      "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
  pm = peft.get_peft_model(model, lc).double()
  hf_module = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
               "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj",
               "down": "mlp.down_proj"}
  mods = dict(pm.named_modules())
  for i in range(cfg.num_layers):
    for mod in ("attn", "mlp"):
      for name in ad[f"layers_{i}"][mod]:
        if not name.endswith("_lora_a"):
          continue
        w = name.removesuffix("_lora_a")
        m = mods[f"base_model.model.model.layers.{i}.{hf_module[w]}"]
        a = np.asarray(ad[f"layers_{i}"][mod][name], np.float64)
        b = np.asarray(ad[f"layers_{i}"][mod][w + "_lora_b"], np.float64)
        m.lora_A["default"].weight.data = torch.tensor(a.reshape(-1, SPEC.rank).T)
        m.lora_B["default"].weight.data = torch.tensor(b.reshape(SPEC.rank, -1).T)
  logits = pm(torch.tensor(ids)).logits
  ref = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 61),
                                          torch.tensor(ids[:, 1:]).reshape(-1))
  ref.backward()
  np.testing.assert_allclose(float(loss(ad)), ref.item(), rtol=1e-5)
  checked = 0
  for i in range(cfg.num_layers):
    for w in ("q", "o", "down"):  # one weight of each input layout
      mod = "mlp" if w == "down" else "attn"
      m = mods[f"base_model.model.model.layers.{i}.{hf_module[w]}"]
      ga = m.lora_A["default"].weight.grad.numpy().T.reshape(
          ad[f"layers_{i}"][mod][w + "_lora_a"].shape)
      gb = m.lora_B["default"].weight.grad.numpy().T.reshape(
          ad[f"layers_{i}"][mod][w + "_lora_b"].shape)
      for got, want in ((ours[f"layers_{i}"][mod][w + "_lora_a"], ga),
                        (ours[f"layers_{i}"][mod][w + "_lora_b"], gb)):
        assert np.abs(want).max() > 1e-6
        err = np.abs(np.asarray(got, np.float64) - want).max() / np.abs(want).max()
        assert err < 1e-4, (i, w, err)
        checked += 1
  assert checked == 12


# ----------------------------------------------------------------------------- trainer


def _base_folder(train_data, tmp_path) -> str:
  """The teacher of the shared data as an HF folder: the pretrained base LoRA adapts."""
  _, _, teacher_dir = train_data
  cfg, params = checkpoint_io.load_model(teacher_dir)
  folder = str(tmp_path / "base")
  hf.save(cfg, params, folder)
  return folder


def _lora_args(base: str, *extra) -> list[str]:
  return ["--config.model.init=pretrained", f"--config.model.path={base}",
          "--config.model.lora.rank=4", "--config.model.lora.alpha=8",
          "--config.optim.lr=0.02", "--config.optim.warmup_steps=0", *extra]


@pytest.mark.slow
def test_lora_trains_resumes_exactly_and_exports_merged_and_peft(train_data, tmp_path):
  torch = pytest.importorskip("torch", reason="the `hf` extra is needed")
  transformers = pytest.importorskip("transformers")
  peft = pytest.importorskip("peft")
  base_dir = _base_folder(train_data, tmp_path)
  args = _lora_args(base_dir, "--config.train.steps=4", "--config.train.checkpoint_every=2",
                    "--config.model.lora.dropout=0.1", "--config.checkpoint.keep=3")
  config, _ = train_config(train_data, extra=args)
  work = str(tmp_path / "run")
  result = train.train_and_evaluate(config, work)
  assert result.status == "finished" and result.step == 4

  # the checkpoint holds the adapters and their Adam moments only
  import orbax.checkpoint as ocp

  meta = ocp.StandardCheckpointer().metadata(os.path.join(work, "checkpoints", "4", "state"))
  tree = meta.item_metadata if hasattr(meta, "item_metadata") else meta
  paths = [p for p in leaf_paths(tree) if "params" in p or "opt_state" in p]
  weights = [p for p in paths if "lora" in p]
  assert weights and all("_lora_a" in p or "_lora_b" in p for p in paths
                         if "['params']" in p and "span" not in p), paths

  # final/ is the merged model: untargeted leaves bit-identical to the base, targeted ones
  # the base plus (α/r)·A@B of final/adapters
  cfg, base = checkpoint_io.load_model(base_dir)
  _, merged = checkpoint_io.load_model(os.path.join(work, "final"))
  spec, ad, info = lora.load_adapters(os.path.join(work, "final", "adapters"))
  assert spec == lora.LoraSpec(rank=4, alpha=8.0, dropout=0.1)
  assert info["base"]["path"] == base_dir and len(info["base"]["fingerprint"]) == 32
  for path, leaf in jax.tree_util.tree_flatten_with_path(base)[0]:
    names = [p.key for p in path]
    got = np.asarray(merged[names[0]] if len(names) == 1 else
                     merged[names[0]][names[1]][names[2]] if len(names) == 3 else
                     merged[names[0]][names[1]])
    if names[-1] in lora.TARGETABLE:
      a = np.asarray(ad[names[0]][names[1]][names[2] + "_lora_a"], np.float64)
      b = np.asarray(ad[names[0]][names[1]][names[2] + "_lora_b"], np.float64)
      assert np.abs(b).max() > 0  # trained
      want = np.asarray(leaf, np.float64) + 2.0 * np.tensordot(a, b, axes=([a.ndim - 1], [0]))
      np.testing.assert_allclose(got, want, atol=2e-6)
    else:
      assert np.array_equal(got.view(np.uint32), np.asarray(leaf).view(np.uint32)), names

  # resume: drop the last checkpoint and final/; the rerun from step 2 ends bit-identical
  resumed = str(tmp_path / "resumed")
  shutil.copytree(work, resumed)
  shutil.rmtree(os.path.join(resumed, "checkpoints", "4"))
  shutil.rmtree(os.path.join(resumed, "final"))
  again = train.train_and_evaluate(config, resumed)
  assert again.step == 4
  _, merged2 = checkpoint_io.load_model(os.path.join(resumed, "final"))
  for x, y in zip(jax.tree.leaves(merged), jax.tree.leaves(merged2), strict=True):
    assert np.array_equal(np.asarray(x).view(np.uint32), np.asarray(y).view(np.uint32))

  # another base under the same path: the resume is refused, naming the base
  other = str(tmp_path / "other_base")
  hf.save(cfg, jax.tree.map(lambda a: a * 1.01, base), other)
  shutil.rmtree(base_dir)
  shutil.copytree(other, base_dir)
  shutil.rmtree(os.path.join(resumed, "checkpoints", "4"))
  with pytest.raises(DataError, match="lora_base") as e:
    train.train_and_evaluate(config, resumed)
  assert e.value.field == "lora_base"
  shutil.rmtree(base_dir)
  hf.save(cfg, base, base_dir)

  # the PEFT export (the CLI) and the merged export load in peft / transformers; logits
  # within 1e-4 of our forward of base + adapters, greedy generation token for token
  peft_dir, merged_dir = str(tmp_path / "peft"), str(tmp_path / "merged")
  for extra, out in ((["--adapters"], peft_dir), ([], merged_dir)):
    p = subprocess.run([sys.executable, "-m", "sad_jax.cli", "export", work, out,
                        "--dtype=float32", *extra], cwd=REPO, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
  assert "exported LoRA adapters (r 4, alpha 8" in p.stdout or os.path.isdir(peft_dir)
  adapter_cfg = json.loads(open(os.path.join(peft_dir, "adapter_config.json")).read())
  assert adapter_cfg["r"] == 4 and adapter_cfg["lora_alpha"] == 8.0
  hf_base = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
  with_adapters = peft.PeftModel.from_pretrained(hf_base, peft_dir).eval()
  merged_hf = transformers.AutoModelForCausalLM.from_pretrained(
      merged_dir, dtype=torch.float32).eval()
  combined = lora.combine(base, ad, spec)
  ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 19))
  ours = np.asarray(hf.forward(cfg, combined, ids))
  for model in (with_adapters, merged_hf):
    with torch.no_grad():
      theirs = model(torch.tensor(ids)).logits.numpy()
    assert np.max(np.abs(ours - theirs)) / np.max(np.abs(ours)) <= 1e-4
  from sad_jax.models.generate import generate

  prompts = [ids[0, :7].tolist(), ids[1, :13].tolist()]
  gen = generate(cfg, combined, prompts, max_new_tokens=10)
  for prompt, toks in zip(prompts, gen.tokens, strict=True):
    for model in (with_adapters, merged_hf):
      with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=10,
                             do_sample=False,
                             attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
      assert out[0, len(prompt):].tolist()[:len(toks)] == toks


def test_lora_needs_a_loaded_base_and_a_valid_spec(train_data, tmp_path):
  config, _ = train_config(train_data, extra=["--config.model.lora.rank=4"])
  with pytest.raises(DataError, match="frozen pretrained or pruned") as e:
    train.train_and_evaluate(config, str(tmp_path / "a"))
  assert e.value.field == "config.model.lora.rank"
  for bad, field in (("--config.model.lora.targets=attn/qq", "targets"),
                     ("--config.model.lora.base_dtype=int4", "base_dtype"),
                     ("--config.model.lora.alpha=0", "alpha")):
    config, _ = train_config(train_data, extra=["--config.model.lora.rank=4", bad])
    with pytest.raises(DataError) as e:
      lora.from_config(config.model.lora)
    assert e.value.field == f"config.model.lora.{field}"


# ----------------------------------------------------------------------------- sharded


def _run_lora(train_data, mesh_shape, host, layout, *, objective="sad", extra=(),
              base_dtype="float32"):
  config, _ = train_config(train_data, objective, extra=[
      "--config.optim.warmup_steps=0", "--config.optim.lr=0.02", *extra])
  n = int(np.prod(mesh_shape))
  mesh = sharding.make_mesh(mesh_shape, devices=jax.devices()[:n])
  rules = sharding.DEFAULT_RULES
  model_cfg = train.student_config(config, vocab=600, tensor=mesh.shape["tensor"])
  obj = train.objective_for(config, model_cfg)
  tx = step_lib.make_optimizer(config.optim, 10)
  spec = lora.LoraSpec(rank=4, alpha=8.0, base_dtype=base_dtype)
  raw = jax.tree.map(lambda a: a * 5, T.init_params(model_cfg, jax.random.key(0)))
  base = lora.prepare_base(raw, spec)
  base_sh = sharding.tree_shardings(base, T.param_axes(base), mesh, rules)
  init = train.state_init_fn(config, model_cfg, obj, tx, spec)
  state_sh = train.state_shardings(jax.eval_shape(init, base), mesh, rules, tx)
  data_sh = jax.tree.map(lambda _: train.batch_sharding_for(layout.rows, mesh, rules), host[0])
  step = train.jit_train_step(model_cfg=model_cfg, obj=obj, tx=tx,
                              schedule=step_lib.lr_schedule(config.optim, 10),
                              dtype=jnp.float32, remat="none", online=None, state_sh=state_sh,
                              data_sh=data_sh, teacher_sh=None, base_sh=base_sh, lora=spec)
  with sharding.use_mesh(mesh, rules):
    base = jax.device_put(base, base_sh)
    state = jax.jit(init, out_shardings=state_sh)(base)
    hist = []
    for b in host:
      state, m = step(state, jax.device_put(b, data_sh), jnp.ones(len(obj.groups)), None, base)
      m["mu"] = jax.device_get(optax.tree.get(state.opt_state, "mu"))
      hist.append(jax.device_get(m))
  return state, hist, base


LORA_SPECS = {  # adapters follow their weight's axes (A its input axes, B its output axes);
    #            the rank axis takes fsdp where the weight's axes leave it free
    (2, 2, 2): {"['layers_0']['attn']['q_lora_a']": P("fsdp"),
                "['layers_0']['attn']['q_lora_b']": P("fsdp", "tensor"),
                "['layers_0']['attn']['o_lora_a']": P("tensor", None, "fsdp"),
                "['layers_0']['mlp']['down_lora_a']": P("tensor", "fsdp"),
                "['layers_0']['mlp']['down_lora_b']": P("fsdp")},
    (1, 2, 4): {"['layers_0']['attn']['q_lora_a']": P("fsdp"),
                "['layers_0']['attn']['q_lora_b']": P("fsdp", "tensor"),
                "['layers_0']['attn']['k_lora_b']": P("fsdp"),  # 2 KV heads: not split 4 ways
                "['layers_0']['mlp']['gate_lora_b']": P("fsdp", "tensor")},
}


def _same_gradients(got, want, *, tol=2e-5, where=""):
  """Per leaf, relative to the leaf's own scale; a leaf with no gradient (A while B is 0)
  must have none on the mesh either."""
  for path, g, w in zip(leaf_paths(want), jax.tree.leaves(got), jax.tree.leaves(want),
                        strict=True):
    g, w = np.asarray(g), np.asarray(w)
    scale = np.abs(w).max()
    if scale == 0:
      assert not np.any(g), (where, path)
    else:
      assert np.abs(g - w).max() / scale < tol, (where, path, np.abs(g - w).max() / scale)


def _norm(spec, ndim):
  return tuple(spec) + (None,) * (ndim - len(spec))


@pytest.mark.slow
def test_sharded_lora_steps_equal_one_device(train_data):
  """Two LoRA steps (accumulating 2 micro-batches) on (2,2,2) and (1,2,4) against one device:
  losses, adapter gradients (Adam's first moment) and adapters, the adapters and the base
  really split as the rules say; the frozen base leaves the step untouched."""
  layout, host = batches(train_data, accum=2, rows=8)
  ref, ref_hist, _ = _run_lora(train_data, (1, 1, 1), host, layout)
  for shape in ((2, 2, 2), (1, 2, 4)):
    state, hist, base = _run_lora(train_data, shape, host, layout)
    got = dict(zip(leaf_paths(state.params), jax.tree.leaves(state.params)))
    for path, spec in LORA_SPECS[shape].items():
      assert _norm(got[path].sharding.spec, got[path].ndim) == _norm(spec, got[path].ndim), (
          shape, path, got[path].sharding.spec)
    assert _norm(base["layers_0"]["attn"]["q"].sharding.spec, 3) == ("fsdp", "tensor", None)
    for h, r in zip(hist, ref_hist, strict=True):
      for key in ("loss", "grad_norm", "reason/loss", "action/loss"):
        np.testing.assert_allclose(h[key], r[key], rtol=2e-5, err_msg=f"{shape} {key}")
      _same_gradients(h["mu"]["model"], r["mu"]["model"], where=str(shape))
    # step 1: B = 0, so A's gradient is exactly 0; step 2: every adapter has one
    assert not any(np.any(x) for p, x in zip(leaf_paths(ref_hist[0]["mu"]["model"]),
                                              jax.tree.leaves(ref_hist[0]["mu"]["model"]))
                   if p.endswith("_lora_a']"))
    assert all(np.any(x) for x in jax.tree.leaves(ref_hist[1]["mu"]["model"]))
    for x, y in zip(jax.tree.leaves(jax.device_get(state.params)),
                    jax.tree.leaves(jax.device_get(ref.params)), strict=True):
      np.testing.assert_allclose(x, y, atol=3e-5)


@pytest.mark.slow
@pytest.mark.parametrize("objective,extra,base_dtype", [
    ("sad", ("--config.objective.learnable_weights=true", "--config.objective.pcgrad=true"),
     "int8"),
    ("token_kd", (), "bfloat16"),
    ("sft", (), "float32"),
])
def test_every_objective_trains_a_lora_student(train_data, objective, extra, base_dtype):
  """sad with pcgrad and learnable span weights (on an int8 base), token_kd (bfloat16
  base) and sft: the loss falls over steps on one batch, every adapter gets a gradient, and
  the span weights move where they are learnable."""
  layout, host = batches(train_data, accum=1, rows=4, n=1, teacher=objective != "sft")
  state, hist, _ = _run_lora(train_data, (1, 1, 1), host * 4, layout, objective=objective,
                             extra=extra, base_dtype=base_dtype)
  losses = [float(h["loss"]) for h in hist]
  assert all(np.isfinite(losses)) and losses[-1] < losses[0], losses
  for path, g in zip(leaf_paths(hist[0]["mu"]["model"]), jax.tree.leaves(hist[0]["mu"]["model"])):
    if path.endswith("_lora_b']"):  # B starts at 0: its gradient is A's input through
      assert np.abs(g).max() > 0, path
  if "pcgrad" in " ".join(extra):
    assert "pcgrad/cosine" in hist[-1]
    assert np.abs(np.asarray(state.span_params)).max() > 0
