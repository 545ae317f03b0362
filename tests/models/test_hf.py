"""Parity with transformers for every family: logits, save → load, greedy generation."""

import json
import os
import shutil

import numpy as np
import pytest

from sad_jax.common.errors import DataError
from sad_jax.models import hf, safetensors_io
from sad_jax.models.generate import generate
from tests.models.families import FAMILIES, V, checkpoint

torch = pytest.importorskip("torch", reason="the `hf` extra (torch + transformers) is needed")
transformers = pytest.importorskip("transformers")

IDS = np.random.default_rng(0).integers(0, V, (2, 13))


def torch_logits(model, ids):
  with torch.no_grad():
    return model(torch.tensor(ids)).logits.numpy()


def max_rel(a, b):
  return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers(family):
  folder, model = checkpoint(family)
  cfg, params = hf.load(folder)
  assert cfg.model_type == ("llama" if family == "llama3" else family)
  got = np.asarray(hf.forward(cfg, params, IDS))
  assert got.shape == (2, 13, V)
  assert max_rel(got, torch_logits(model, IDS)) <= 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_save_loads_in_transformers(family, tmp_path):
  folder, _ = checkpoint(family)
  cfg, params = hf.load(folder)
  out = tmp_path / "saved"
  hf.save(cfg, params, out)
  again = transformers.AutoModelForCausalLM.from_pretrained(out).float().eval()
  ours = np.asarray(hf.forward(cfg, params, IDS))
  assert max_rel(torch_logits(again, IDS), ours) <= 1e-4
  cfg2, params2 = hf.load(out)
  assert cfg2 == cfg
  for a, b in zip(*(sorted(_flat(p).items()) for p in (params, params2)), strict=True):
    assert a[0] == b[0]
    np.testing.assert_array_equal(a[1], b[1])


def _flat(tree, prefix=""):
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}/"))
    else:
      out[prefix + k] = np.asarray(v)
  return out


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generation_matches_transformers(family):
  folder, model = checkpoint(family)
  cfg, params = hf.load(folder)
  prompts = np.random.default_rng(1).integers(0, V, (2, 7))
  with torch.no_grad():
    ref = model.generate(torch.tensor(prompts), attention_mask=torch.ones(2, 7, dtype=torch.long),
                         max_new_tokens=32, do_sample=False).numpy()[:, 7:]
  got = generate(cfg, params, prompts.tolist(), max_new_tokens=32)
  np.testing.assert_array_equal(np.array(got.tokens), ref)
  assert got.stop_reason == ["length", "length"]


# ----------------------------------------------------------------------------- bad input


def copy_ckpt(tmp_path, family="llama"):
  folder, _ = checkpoint(family)
  dst = tmp_path / "ckpt"
  shutil.copytree(folder, dst)
  return dst


def edit_config(folder, **changes):
  path = os.path.join(folder, "config.json")
  cfg = json.load(open(path))
  cfg.update(changes)
  json.dump(cfg, open(path, "w"))


def edit_tensors(folder, fn):
  path = os.path.join(folder, "model.safetensors")
  tensors = {k: np.array(v) for k, v in safetensors_io.read(path).items()}
  fn(tensors)
  safetensors_io.write(path, tensors)


def test_unsupported_architectures_list_what_is_supported(tmp_path):
  folder = copy_ckpt(tmp_path)
  edit_config(folder, model_type="gpt_neox")
  with pytest.raises(DataError, match="supported: llama, qwen2, mistral, phi3, gemma, gemma2"):
    hf.load(folder)
  edit_config(folder, model_type="llama", num_local_experts=8)
  with pytest.raises(DataError, match="mixture-of-experts") as e:
    hf.load(folder)
  assert e.value.field == "num_local_experts"
  edit_config(folder, num_local_experts=None, rope_scaling={"rope_type": "yarn", "factor": 4.0})
  with pytest.raises(DataError, match="unsupported RoPE type 'yarn'"):
    hf.load(folder)


def test_tensor_errors_name_the_tensor(tmp_path):
  folder = copy_ckpt(tmp_path)
  name = "model.layers.1.self_attn.k_proj.weight"
  edit_tensors(folder, lambda t: t.pop(name))
  with pytest.raises(DataError, match=r"missing 1 tensor") as e:
    hf.load(folder)
  assert e.value.field == name

  folder = copy_ckpt(tmp_path / "b")
  edit_tensors(folder, lambda t: t.update({name: t[name][:, :-1]}))
  with pytest.raises(DataError, match=r"shape \(16, 31\) does not match the config's \(16, 32\)") as e:
    hf.load(folder)
  assert e.value.field == name

  folder = copy_ckpt(tmp_path / "c")
  edit_tensors(folder, lambda t: t.update({"model.layers.2.mlp.up_proj.weight": t[
      "model.layers.1.mlp.up_proj.weight"]}))
  with pytest.raises(DataError, match="unexpected tensor") as e:
    hf.load(folder)
  assert e.value.field == "model.layers.2.mlp.up_proj.weight"

  folder = copy_ckpt(tmp_path / "d")
  path = os.path.join(folder, "model.safetensors")
  data = open(path, "rb").read()
  open(path, "wb").write(data[: len(data) // 2])
  with pytest.raises(DataError, match="truncated"):
    hf.load(folder)


def test_sharded_checkpoint_index(tmp_path):
  folder = copy_ckpt(tmp_path)
  tensors = safetensors_io.read(os.path.join(folder, "model.safetensors"))
  names = sorted(tensors)
  half = len(names) // 2
  for i, part in enumerate((names[:half], names[half:])):
    safetensors_io.write(os.path.join(folder, f"model-0000{i + 1}-of-00002.safetensors"),
                         {n: np.array(tensors[n]) for n in part})
  json.dump({"weight_map": {n: f"model-0000{1 + (j >= half)}-of-00002.safetensors"
                            for j, n in enumerate(names)}},
            open(os.path.join(folder, "model.safetensors.index.json"), "w"))
  os.remove(os.path.join(folder, "model.safetensors"))
  cfg, params = hf.load(folder)
  ref_cfg, ref = hf.load(checkpoint("llama")[0])
  np.testing.assert_array_equal(hf.forward(cfg, params, IDS), hf.forward(ref_cfg, ref, IDS))
