"""Hugging Face checkpoints in and out.

  from sad_jax.models import hf
  cfg, params = hf.load(path, mesh=None, dtype=None)   # config.json + safetensors
  logits = hf.forward(cfg, params, ids)                # [B, T, V] float32
  hf.save(cfg, params, out_dir)                        # a folder transformers loads

With a mesh, each parameter is built directly in its sharding (by logical axes and
sharding.DEFAULT_RULES), reading only the slices the local devices hold.
"""

from __future__ import annotations

import os
import re

import jax
import jax.numpy as jnp
import numpy as np

from sad_jax.common import sharding
from sad_jax.common.errors import DataError
from sad_jax.common.fileio import atomic_dir
from sad_jax.models import safetensors_io
from sad_jax.models.config import ModelConfig, model_config, to_hf_dict
from sad_jax.models.transformer import Transformer, is_stacked, param_axes, unstack_layers

_IGNORED = re.compile(r"(rotary_emb\.inv_freq|\.masked_bias|\.attn\.bias)$")


def _norm_names(cfg: ModelConfig) -> dict[str, str]:
  if cfg.post_norms:  # Gemma 2
    return {"input_layernorm": "input_norm", "post_attention_layernorm": "post_attn_norm",
            "pre_feedforward_layernorm": "pre_mlp_norm",
            "post_feedforward_layernorm": "post_mlp_norm"}
  return {"input_layernorm": "input_norm", "post_attention_layernorm": "pre_mlp_norm"}


def _layout(cfg: ModelConfig) -> dict[str, tuple[tuple[str, ...], tuple[int, ...], str]]:
  """HF tensor name → (our param path, HF shape, transform)."""
  d, f = cfg.hidden_size, cfg.intermediate_size
  h, kv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  out = {"model.embed_tokens.weight": (("embed",), (cfg.vocab_size, d), "embed"),
         "model.norm.weight": (("final_norm", "scale"), (d,), "copy")}
  if not cfg.tie_embeddings:
    out["lm_head.weight"] = (("lm_head",), (cfg.vocab_size, d), "lm_head")
  for i in range(cfg.num_layers):
    p, L = f"model.layers.{i}.", f"layers_{i}"
    if cfg.fused_qkv:
      out[p + "self_attn.qkv_proj.weight"] = ((L, "attn", "qkv"), ((h + 2 * kv) * hd, d), "qkv")
      out[p + "mlp.gate_up_proj.weight"] = ((L, "mlp", "gate_up"), (2 * f, d), "gate_up")
    else:
      for n, heads in (("q", h), ("k", kv), ("v", kv)):
        out[p + f"self_attn.{n}_proj.weight"] = ((L, "attn", n), (heads * hd, d), f"in:{heads}")
        if cfg.qkv_bias:
          out[p + f"self_attn.{n}_proj.bias"] = ((L, "attn", f"{n}_bias"), (heads * hd,),
                                                 f"bias:{heads}")
      out[p + "mlp.gate_proj.weight"] = ((L, "mlp", "gate"), (f, d), "t")
      out[p + "mlp.up_proj.weight"] = ((L, "mlp", "up"), (f, d), "t")
    out[p + "self_attn.o_proj.weight"] = ((L, "attn", "o"), (d, h * hd), "out")
    out[p + "mlp.down_proj.weight"] = ((L, "mlp", "down"), (d, f), "t")
    for hf_name, ours in _norm_names(cfg).items():
      out[p + f"{hf_name}.weight"] = ((L, ours, "scale"), (d,), "copy")
  return out


def _to_ours(cfg: ModelConfig, kind: str, w: np.ndarray) -> dict[str, np.ndarray]:
  """One HF tensor → our array(s), keyed by the last path element ('' = as named)."""
  d, hd = cfg.hidden_size, cfg.head_dim
  pad = cfg.padded_vocab - cfg.vocab_size
  if kind == "embed":
    return {"": np.pad(w, [(0, pad), (0, 0)])}
  if kind == "lm_head":
    return {"": np.pad(w.T, [(0, 0), (0, pad)])}
  if kind == "copy":
    return {"": w}
  if kind == "t":
    return {"": w.T}
  if kind.startswith("in:"):
    return {"": w.T.reshape(d, int(kind[3:]), hd)}
  if kind.startswith("bias:"):
    return {"": w.reshape(int(kind[5:]), hd)}
  if kind == "out":
    return {"": w.T.reshape(cfg.num_heads, hd, d)}
  if kind == "qkv":
    q_end = cfg.num_heads * hd
    k_end = q_end + cfg.num_kv_heads * hd
    return {"q": w[:q_end].T.reshape(d, cfg.num_heads, hd),
            "k": w[q_end:k_end].T.reshape(d, cfg.num_kv_heads, hd),
            "v": w[k_end:].T.reshape(d, cfg.num_kv_heads, hd)}
  if kind == "gate_up":
    f = cfg.intermediate_size
    return {"gate": w[:f].T, "up": w[f:].T}
  raise AssertionError(kind)


def _set(tree: dict, path: tuple[str, ...], value) -> None:
  for p in path[:-1]:
    tree = tree.setdefault(p, {})
  tree[path[-1]] = value


def load(path: str | os.PathLike, mesh: jax.sharding.Mesh | None = None, dtype=None,
         *, rules=sharding.DEFAULT_RULES, vocab_multiple: int = 1):
  """(cfg, params) from an HF folder; missing, extra or mis-shaped tensors are errors
  naming the tensor. On a mesh, parameters are created in their shardings."""

  path = os.fspath(path)
  return from_tensors(model_config(path), safetensors_io.read_checkpoint(path), where=path,
                      mesh=mesh, dtype=dtype, rules=rules, vocab_multiple=vocab_multiple)


def from_tensors(cfg: ModelConfig, tensors, *, where: str, mesh=None, dtype=None,
                 rules=sharding.DEFAULT_RULES, vocab_multiple: int = 1):
  """(cfg, params) from (HF name, array, file) triples in the HF layout (safetensors, or a
  GGUF file's tensors renamed): the one place that checks and places them."""
  if mesh is not None and vocab_multiple == 1:
    vocab_multiple = int(mesh.shape.get("tensor", 1))
  cfg = cfg.replace(vocab_multiple=vocab_multiple)
  layout = _layout(cfg)
  host: dict = {}
  seen = set()
  for name, w, fpath in tensors:
    if _IGNORED.search(name):
      continue
    if name == "lm_head.weight" and cfg.tie_embeddings:
      continue  # some tied checkpoints store the head too; the embedding is used
    if name not in layout:
      raise DataError(f"unexpected tensor for a {cfg.model_type} model of {cfg.num_layers} "
                      f"layers", path=fpath, field=name)
    ours, shape, kind = layout[name]
    if tuple(w.shape) != shape:
      raise DataError(f"shape {tuple(w.shape)} does not match the config's {shape}",
                      path=fpath, field=name)
    seen.add(name)
    for sub, arr in _to_ours(cfg, kind, np.asarray(w)).items():
      _set(host, ours[:-1] + (sub,) if sub else ours, arr)
  missing = sorted(set(layout) - seen)
  if missing:
    raise DataError(f"missing {len(missing)} tensor(s), e.g. {missing[:3]}", path=where,
                    field=missing[0])
  params = _place(host, mesh, dtype, rules)
  return cfg, params


def _place(host: dict, mesh, dtype, rules):
  axes = param_axes(host)

  def put(arr, ax):
    arr = np.asarray(arr)
    want = np.dtype(dtype) if dtype is not None else (
        np.float32 if arr.dtype.kind == "f" and arr.dtype != np.float32 else arr.dtype)
    if mesh is None:
      return jnp.asarray(arr.astype(want))
    sh = sharding.sharding_for(arr.shape, ax, mesh, rules)
    return jax.make_array_from_callback(arr.shape, sh, lambda idx: arr[idx].astype(want))

  return jax.tree.map(put, host, axes)


def forward(cfg: ModelConfig, params, ids, *, dtype=jnp.float32) -> jax.Array:
  """Logits [B, T, V] float32 (the real vocabulary; padding columns dropped)."""
  z = Transformer(cfg, dtype=dtype, scan=is_stacked(params)).apply({"params": params},
                                                                   jnp.asarray(ids))
  return z[..., :cfg.vocab_size]


def _to_hf(cfg: ModelConfig, params) -> dict[str, np.ndarray]:
  p = jax.tree.map(lambda a: np.asarray(jax.device_get(a), np.float32), params)
  p = unstack_layers(p)  # scanned models save the same per-layer HF tensors
  d, hd = cfg.hidden_size, cfg.head_dim
  out = {"model.embed_tokens.weight": p["embed"][:cfg.vocab_size],
         "model.norm.weight": p["final_norm"]["scale"]}
  if not cfg.tie_embeddings:
    out["lm_head.weight"] = p["lm_head"][:, :cfg.vocab_size].T
  for i in range(cfg.num_layers):
    L, pre = p[f"layers_{i}"], f"model.layers.{i}."
    a, m = L["attn"], L["mlp"]
    qkv = [a[n].reshape(d, -1).T for n in ("q", "k", "v")]
    if cfg.fused_qkv:
      out[pre + "self_attn.qkv_proj.weight"] = np.concatenate(qkv, axis=0)
      out[pre + "mlp.gate_up_proj.weight"] = np.concatenate([m["gate"].T, m["up"].T], axis=0)
    else:
      for n, w in zip(("q", "k", "v"), qkv, strict=True):
        out[pre + f"self_attn.{n}_proj.weight"] = w
        if cfg.qkv_bias:
          out[pre + f"self_attn.{n}_proj.bias"] = a[f"{n}_bias"].reshape(-1)
      out[pre + "mlp.gate_proj.weight"] = m["gate"].T
      out[pre + "mlp.up_proj.weight"] = m["up"].T
    out[pre + "self_attn.o_proj.weight"] = a["o"].reshape(cfg.num_heads * hd, d).T
    out[pre + "mlp.down_proj.weight"] = m["down"].T
    for hf_name, ours in _norm_names(cfg).items():
      out[pre + f"{hf_name}.weight"] = L[ours]["scale"]
  return {k: np.ascontiguousarray(v) for k, v in out.items()}


def save(cfg: ModelConfig, params, out_dir: str | os.PathLike) -> None:
  """Writes config.json + model.safetensors (float32) atomically."""
  import json

  tensors = _to_hf(cfg, params)
  with atomic_dir(out_dir) as tmp:
    with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
      json.dump({**to_hf_dict(cfg), "torch_dtype": "float32"}, f, indent=1)
    safetensors_io.write(os.path.join(tmp, "model.safetensors"), tensors,
                         metadata={"format": "pt"})
