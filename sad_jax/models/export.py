"""`sad-jax export`: a trained model as a Hugging Face folder ready to serve.

  from sad_jax.models import export
  export.export("runs/sad", "out/student", dtype="bfloat16")

The source is a training run (`RUN`, meaning RUN/final), its `final/` (orbax params +
config.json) or an HF folder. The output holds config.json, generation_config.json, the
weights as safetensors (one file, or shards with model.safetensors.index.json above
`max_shard_bytes`), the tokenizer as tokenizer.json + tokenizer_config.json (a
sentencepiece model is converted, see `SentencePieceTokenizer.to_hf_json`) with the chat
template the model was trained with, and template.json (the full record, for `sad-jax eval`).

Parameters are gathered one at a time (an all-gather per parameter across processes) and
written as they come, so the whole state is never on one host. Only process 0 writes.
"""

from __future__ import annotations

import json
import os

import jax
import ml_dtypes
import numpy as np

from sad_jax.common import fileio
from sad_jax.common.errors import DataError
from sad_jax.common.fileio import atomic_dir
from sad_jax.models import hf, safetensors_io
from sad_jax.models.checkpoint_io import check_model_dir, load_model, resolve_source
from sad_jax.models.config import ModelConfig, to_hf_dict
from sad_jax.models.transformer import unstack_layers

DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}
DEFAULT_SHARD_BYTES = 2 << 30


def _leaf(params, path: tuple[str, ...]) -> np.ndarray:
  """One parameter on this host, as float32 (gathered from every process that holds it)."""
  a = params
  for p in path:
    a = a[p]
  if isinstance(a, jax.Array) and not a.is_fully_addressable:
    from jax.experimental import multihost_utils

    a = multihost_utils.process_allgather(a, tiled=True)
  return np.asarray(jax.device_get(a), np.float32)


def _from_ours(cfg: ModelConfig, params, path: tuple[str, ...], kind: str) -> np.ndarray:
  """The HF tensor of `hf._layout` entry (path, kind) from our parameters (the inverse of
  hf._to_ours)."""
  d, hd, v = cfg.hidden_size, cfg.head_dim, cfg.vocab_size
  get = lambda *p: _leaf(params, p)
  if kind == "embed":
    return get(*path)[:v]
  if kind == "lm_head":
    return get(*path)[:, :v].T
  if kind == "copy":
    return get(*path)
  if kind == "t":
    return get(*path).T
  if kind.startswith("in:"):
    return get(*path).reshape(d, -1).T
  if kind.startswith("bias:"):
    return get(*path).reshape(-1)
  if kind == "out":
    return get(*path).reshape(cfg.num_heads * hd, d).T
  if kind == "qkv":
    return np.concatenate([get(*path[:-1], n).reshape(d, -1).T for n in ("q", "k", "v")])
  if kind == "gate_up":
    return np.concatenate([get(*path[:-1], "gate").T, get(*path[:-1], "up").T])
  raise AssertionError(kind)


def write_weights(cfg: ModelConfig, params, folder: str, *, dtype: str = "bfloat16",
                  max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> list[str]:
  """Safetensors files of the HF layout into `folder`; returns their names. Above
  max_shard_bytes the tensors go to several files listed in model.safetensors.index.json."""
  np_dtype = np.dtype(DTYPES[dtype])
  params = unstack_layers(params)  # a scanned model's layer i is its stacked slice i
  layout = hf._layout(cfg)
  shards: list[list] = [[]]
  size = total = 0
  for name in sorted(layout):
    path, shape, kind = layout[name]
    nbytes = int(np.prod(shape)) * np_dtype.itemsize
    if shards[-1] and size + nbytes > max_shard_bytes:
      shards.append([])
      size = 0
    make = lambda path=path, kind=kind: _from_ours(cfg, params, path, kind).astype(np_dtype)
    shards[-1].append((name, shape, np_dtype, make))
    size += nbytes
    total += nbytes
  names = (["model.safetensors"] if len(shards) == 1 else
           [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
  main = jax.process_index() == 0
  for fname, entries in zip(names, shards, strict=True):
    if main:
      safetensors_io.write_lazy(os.path.join(folder, fname), entries, metadata={"format": "pt"})
    else:  # the other processes take part in each parameter's gather, in the same order
      for *_, make in entries:
        make()
  if len(shards) > 1 and main:
    _write_json(os.path.join(folder, "model.safetensors.index.json"), {
        "metadata": {"total_size": total},
        "weight_map": {e[0]: f for f, entries in zip(names, shards) for e in entries}})
  return names


def export(src: str | os.PathLike, out_dir: str | os.PathLike, *, dtype: str = "bfloat16",
           max_shard_bytes: int = DEFAULT_SHARD_BYTES, tokenizer: str | None = None,
           mesh: jax.sharding.Mesh | None = None) -> dict:
  """Writes the HF folder `out_dir` (atomically) from a run, its final/ or an HF folder.
  Returns a summary: {model_dir, dataset, files, dtype, template, params}."""
  from sad_jax.data import render
  from sad_jax.data.tokenizer import HFTokenizer, SentencePieceTokenizer, load_tokenizer

  if dtype not in DTYPES:
    raise DataError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}", field="dtype")
  if max_shard_bytes < 1:
    raise DataError(f"must be positive, got {max_shard_bytes}", field="max_shard_bytes")
  source = resolve_source(src)
  check_model_dir(source.model_dir)
  tok_path = tokenizer or source.tokenizer_path()
  if tok_path is None:
    raise DataError("no tokenizer in the model folder or its run's dataset: pass one",
                    path=source.model_dir, field="tokenizer")
  tok = load_tokenizer(tok_path)
  template = source.template(tok)
  # Everything that can fail on the input fails before the model is read.
  if isinstance(tok, SentencePieceTokenizer):
    tok_json, tok_config = tok.to_hf_json(), tok.hf_config()
  else:
    assert isinstance(tok, HFTokenizer)
    tok_json, tok_config = tok._json, _hf_tokenizer_config(tok_path)
  cfg, params = load_model(source.model_dir, mesh=mesh)
  if tok.vocab_size > cfg.vocab_size:
    raise DataError(f"tokenizer has {tok.vocab_size} tokens, the model {cfg.vocab_size}",
                    path=tok_path, field="vocab_size")
  files = write_folder(out_dir, cfg=cfg, params=params, tok=tok, tok_json=tok_json,
                       tok_config=tok_config, template=template, dtype=dtype,
                       max_shard_bytes=max_shard_bytes)
  out_dir = fileio.abspath(out_dir)
  n_params = sum(int(np.prod(s)) for _, s, _ in hf._layout(cfg).values())
  return {"model_dir": source.model_dir, "dataset": source.dataset, "out_dir": out_dir,
          "files": files, "dtype": dtype, "template": render.template_fingerprint(template),
          "params": n_params}


def write_folder(out_dir: str | os.PathLike, *, cfg: ModelConfig, params, tok, tok_json: str,
                 tok_config: dict, template, dtype: str = "bfloat16",
                 max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> list[str]:
  """The HF folder of a model and its tokenizer (tokenizer.json text and its config), with
  `template` (a ChatTemplate, or None for ReAct) as its chat template; atomically. Shared
  by export and `sad-jax convert gguf`. Returns the weight files' names."""
  from sad_jax.data import prepare

  if dtype not in DTYPES:
    raise DataError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}", field="dtype")
  tok_config = {k: v for k, v in tok_config.items() if k != "chat_template"}
  if template is not None:
    tok_config["chat_template"] = template.source
  tok_config["model_max_length"] = cfg.max_position_embeddings
  # Generation stops where the model was taught to stop: EOS, and with a chat template its
  # end-of-turn token.
  from sad_jax.data.render import stop_ids

  stop = stop_ids(tok, template)
  hf_cfg = {**to_hf_dict(cfg), "torch_dtype": dtype}
  for key, value in (("bos_token_id", tok.bos_id), ("pad_token_id", tok.pad_id)):
    if value is not None:
      hf_cfg[key] = value
  if stop:
    hf_cfg["eos_token_id"] = stop[0] if len(stop) == 1 else stop
  gen_cfg = {k: hf_cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")
             if hf_cfg.get(k) is not None}
  main = jax.process_index() == 0
  if not main:
    files = write_weights(cfg, params, "", dtype=dtype, max_shard_bytes=max_shard_bytes)
  else:
    with atomic_dir(out_dir) as tmp:
      files = write_weights(cfg, params, tmp, dtype=dtype, max_shard_bytes=max_shard_bytes)
      _write_json(os.path.join(tmp, "config.json"), hf_cfg)
      _write_json(os.path.join(tmp, "generation_config.json"), gen_cfg)
      with open(os.path.join(tmp, "tokenizer.json"), "w", encoding="utf-8") as f:
        f.write(tok_json)
      _write_json(os.path.join(tmp, "tokenizer_config.json"), tok_config)
      prepare.write_template(os.path.join(tmp, prepare.TEMPLATE_FILE), template)
  return files


def _hf_tokenizer_config(tok_path: str) -> dict:
  path = fileio.join(fileio.dirname(tok_path), "tokenizer_config.json")
  if not fileio.exists(path):
    return {"tokenizer_class": "PreTrainedTokenizerFast"}
  try:
    cfg = json.loads(fileio.read_text(path))
  except (OSError, ValueError) as e:
    raise DataError(f"cannot read tokenizer config: {e}", path=path) from None
  if not isinstance(cfg, dict):
    raise DataError("not a JSON object", path=path)
  cfg.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
  return cfg


def _write_json(path: str, obj) -> None:
  with open(path, "w", encoding="utf-8") as f:
    json.dump(obj, f, indent=1)


# our weight name → (its HF module under model.layers.{i}, how A and B become lora_A / lora_B)
_PEFT_MODULES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
                 "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj",
                 "down": "mlp.down_proj"}


def export_adapters(src: str | os.PathLike, out_dir: str | os.PathLike, *,
                    dtype: str = "float32") -> dict:
  """A PEFT LoRA folder (adapter_config.json + adapter_model.safetensors) from a LoRA run,
  its final/ or final/adapters: `PeftModel.from_pretrained(base, out_dir)` loads it on
  the base the run trained on (lora.json names it). Our A (in_dims + [r]) and B ([r] +
  out_dims) of x @ W become torch's lora_A [r, in] and lora_B [out, r] of W·x."""
  from sad_jax.models import lora

  if dtype not in DTYPES:
    raise DataError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}", field="dtype")
  folder = fileio.abspath(src)
  if not fileio.exists(fileio.join(folder, lora.SPEC_FILE)):
    source = resolve_source(folder)
    folder = fileio.join(source.model_dir, lora.ADAPTERS)
  spec, adapters, info = lora.load_adapters(folder)
  cfg_dir = fileio.dirname(folder)
  from sad_jax.models.config import model_config

  cfg = model_config(cfg_dir)
  if cfg.fused_qkv:
    raise DataError(f"{cfg.model_type} fuses q/k/v and gate/up in its HF layout, which our "
                    "per-projection adapters do not map to: export the merged model instead",
                    path=folder, field="model_type")
  np_dtype = np.dtype(DTYPES[dtype])
  entries = []
  for key in sorted(k for k in adapters if k.startswith("layers_")):
    i = int(key.removeprefix("layers_"))
    for module in ("attn", "mlp"):
      for name, ours in adapters[key].get(module, {}).items():
        if not name.endswith(lora.A):
          continue
        w = name.removesuffix(lora.A)
        a = np.asarray(ours, np.float32)
        b = np.asarray(adapters[key][module][w + lora.B], np.float32)
        a_t = a.reshape(-1, spec.rank).T                 # [r, in]
        b_t = b.reshape(spec.rank, -1).T                 # [out, r]
        prefix = f"base_model.model.model.layers.{i}.{_PEFT_MODULES[w]}"
        for suffix, arr in (("lora_A.weight", a_t), ("lora_B.weight", b_t)):
          entries.append((f"{prefix}.{suffix}", arr.shape, np_dtype,
                          lambda arr=arr: arr.astype(np_dtype)))
  modules = sorted({_PEFT_MODULES[n].split(".")[-1] for n in lora.module_names(spec)})
  base = info.get("base") or {}
  adapter_cfg = {
      "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": spec.rank,
      "lora_alpha": spec.alpha, "lora_dropout": spec.dropout, "target_modules": modules,
      "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
      "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
      "base_model_name_or_path": base.get("path")}
  if jax.process_index() == 0:
    with atomic_dir(out_dir) as tmp:
      safetensors_io.write_lazy(os.path.join(tmp, "adapter_model.safetensors"), entries,
                                metadata={"format": "pt"})
      _write_json(os.path.join(tmp, "adapter_config.json"), adapter_cfg)
      _write_json(os.path.join(tmp, lora.SPEC_FILE), info)  # the base's fingerprint, init
  return {"out_dir": fileio.abspath(out_dir), "adapters": folder, "rank": spec.rank,
          "alpha": spec.alpha, "modules": modules, "tensors": len(entries),
          "params": sum(int(np.prod(e[1])) for e in entries), "base": base.get("path")}
