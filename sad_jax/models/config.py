"""ModelConfig: one decoder family, configured from a Hugging Face `config.json`.

Supported `model_type`s: llama (2; 3 with rope_scaling type llama3), qwen2, mistral,
phi3, gemma, gemma2. Anything else (MoE, other RoPE types, …) is an error that lists
what is supported.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from sad_jax.common import fileio
from sad_jax.common.errors import DataError

SUPPORTED = ("llama", "qwen2", "mistral", "phi3", "gemma", "gemma2")
_SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
          "num_attention_heads")  # required, positive integers
_COUNTS = ("num_key_value_heads", "head_dim", "max_position_embeddings", "sliding_window",
           "max_window_layers")  # optional, non-negative integers
_FLOATS = ("rms_norm_eps", "rope_theta", "partial_rotary_factor", "query_pre_attn_scalar")
_MOE_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_intermediate_size")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  model_type: str
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  rope_scaling: tuple[tuple[str, Any], ...] | None = None   # llama3 parameters, sorted items
  partial_rotary_factor: float = 1.0
  max_position_embeddings: int = 4096
  tie_embeddings: bool = False
  qkv_bias: bool = False
  activation: str = "silu"            # silu | gelu_tanh
  norm_offset: bool = False           # Gemma: x · (1 + w)
  embed_scale: bool = False           # Gemma: embeddings · sqrt(hidden_size)
  post_norms: bool = False            # Gemma 2: norms after attention and MLP too
  attn_softcap: float | None = None
  final_softcap: float | None = None
  query_scale: float | None = None    # Gemma 2: query_pre_attn_scalar ** -0.5
  sliding_window: int | None = None
  layer_types: tuple[str, ...] | None = None  # "sliding_attention" | "full_attention"
  fused_qkv: bool = False             # Phi-3 checkpoints store qkv / gate_up fused
  bos_token_id: int | None = None
  eos_token_id: int | tuple[int, ...] | None = None
  pad_token_id: int | None = None
  # Not from HF: vocabulary padded to a multiple (of the tensor axis); logits beyond
  # vocab_size are −inf.
  vocab_multiple: int = 1
  # Not from HF: the training-time attention kernel (models/attention.py: reference |
  # flash | splash | splash_interpret | cudnn); decoding always runs the reference.
  attention: str = "reference"

  @property
  def padded_vocab(self) -> int:
    m = self.vocab_multiple
    return -(-self.vocab_size // m) * m

  @property
  def scale(self) -> float:
    return self.query_scale if self.query_scale is not None else self.head_dim ** -0.5

  def window(self, layer: int) -> int | None:
    """The sliding window of layer `layer`, or None for full attention."""
    if self.sliding_window is None:
      return None
    if self.layer_types is None:
      return self.sliding_window
    return self.sliding_window if self.layer_types[layer] == "sliding_attention" else None

  def replace(self, **kw) -> ModelConfig:
    return dataclasses.replace(self, **kw)


def _rope(hf: dict) -> tuple[float, tuple | None, float]:
  """(theta, llama3 scaling items or None, partial rotary factor) from either the
  classic keys (rope_theta, rope_scaling) or transformers 5's rope_parameters."""
  params = hf.get("rope_parameters") or {}
  scaling = hf.get("rope_scaling") or None
  theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
  # rope_scaling (older configs) wins over rope_parameters (transformers 5) if both exist
  rope_type = ((scaling or {}).get("rope_type") or (scaling or {}).get("type")
               or params.get("rope_type") or "default")
  partial = float(params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)))
  if rope_type == "default":
    return theta, None, partial
  if rope_type != "llama3":
    raise DataError(f"unsupported RoPE type {rope_type!r}; supported: default, llama3",
                    field="rope_scaling")
  src = {**params, **(scaling or {})}
  keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
  missing = [k for k in keys if k not in src]
  if missing:
    raise DataError(f"llama3 RoPE scaling lacks {missing}", field="rope_scaling")
  return theta, tuple((k, float(src[k])) for k in keys), partial


def from_hf_dict(hf: dict, *, where: str = "config.json") -> ModelConfig:
  mt = hf.get("model_type")
  if mt not in SUPPORTED:
    raise DataError(f"unsupported model_type {mt!r}; supported: {', '.join(SUPPORTED)}",
                    path=where, field="model_type")
  moe = [k for k in _MOE_KEYS if hf.get(k)]
  if moe:
    raise DataError(f"mixture-of-experts models are not supported (found {moe}); supported: "
                    f"dense {', '.join(SUPPORTED)}", path=where, field=moe[0])
  _check_numbers(hf, where)
  heads = int(hf["num_attention_heads"])
  d = int(hf["hidden_size"])
  try:
    theta, scaling, partial = _rope(hf)
  except DataError as e:
    raise e.located(path=where) from None
  except (TypeError, ValueError) as e:
    raise DataError(f"bad RoPE parameters: {e}", path=where, field="rope_scaling") from None
  gemma = mt in ("gemma", "gemma2")
  act = hf.get("hidden_activation") or hf.get("hidden_act") or "silu"
  if act in ("gelu_pytorch_tanh", "gelu_tanh", "gelu"):
    act = "gelu_tanh"
  elif act != "silu":
    raise DataError(f"unsupported activation {act!r}; supported: silu, gelu_pytorch_tanh",
                    path=where, field="hidden_act")
  sliding = hf.get("sliding_window")
  if mt == "qwen2" and not hf.get("use_sliding_window", False):
    sliding = None
  layer_types = hf.get("layer_types")
  if mt == "gemma2" and layer_types is None:
    layer_types = ["sliding_attention" if (i + 1) % 2 else "full_attention"
                   for i in range(int(hf["num_hidden_layers"]))]
  if mt == "qwen2" and sliding is not None and layer_types is None:
    top = int(hf.get("max_window_layers", hf["num_hidden_layers"]))
    layer_types = ["sliding_attention" if i >= top else "full_attention"
                   for i in range(int(hf["num_hidden_layers"]))]
  eos = hf.get("eos_token_id")
  return ModelConfig(
      model_type=mt, vocab_size=int(hf["vocab_size"]), hidden_size=d,
      intermediate_size=int(hf["intermediate_size"]),
      num_layers=int(hf["num_hidden_layers"]), num_heads=heads,
      num_kv_heads=int(hf.get("num_key_value_heads") or heads),
      head_dim=int(hf.get("head_dim") or d // heads),
      rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)), rope_theta=theta,
      rope_scaling=scaling, partial_rotary_factor=partial,
      max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
      tie_embeddings=bool(hf.get("tie_word_embeddings", gemma)),
      qkv_bias=mt == "qwen2" or bool(hf.get("attention_bias", False)),
      activation=act, norm_offset=gemma, embed_scale=gemma, post_norms=mt == "gemma2",
      attn_softcap=hf.get("attn_logit_softcapping") if mt == "gemma2" else None,
      final_softcap=hf.get("final_logit_softcapping") if mt == "gemma2" else None,
      query_scale=(float(hf["query_pre_attn_scalar"]) ** -0.5
                   if mt == "gemma2" and hf.get("query_pre_attn_scalar") else None),
      sliding_window=int(sliding) if sliding else None,
      layer_types=tuple(layer_types) if layer_types else None,
      fused_qkv=mt == "phi3", bos_token_id=hf.get("bos_token_id"),
      pad_token_id=hf.get("pad_token_id"),
      eos_token_id=tuple(eos) if isinstance(eos, list) else eos)


def _check_numbers(hf: dict, where: str) -> None:
  """Sizes are integers, other numbers are numbers: a located error, not a ValueError from
  int() or a shape error later."""
  for key in _SIZES + _COUNTS:
    value = hf.get(key)
    if value is None:
      if key in _SIZES:
        raise DataError("missing field", path=where, field=key)
      continue
    low = 1 if key in _SIZES else 0
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
      raise DataError(f"expected an integer ≥ {low}, got {value!r}", path=where, field=key)
  for key in _FLOATS:
    value = hf.get(key)
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
      raise DataError(f"expected a number, got {value!r}", path=where, field=key)


def to_hf_dict(cfg: ModelConfig) -> dict:
  """The config.json that transformers reads back to the same model."""
  archs = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
           "mistral": "MistralForCausalLM", "phi3": "Phi3ForCausalLM",
           "gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM"}
  hf: dict[str, Any] = {
      "architectures": [archs[cfg.model_type]], "model_type": cfg.model_type,
      "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
      "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_layers,
      "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
      "head_dim": cfg.head_dim, "rms_norm_eps": cfg.rms_norm_eps,
      "max_position_embeddings": cfg.max_position_embeddings,
      "tie_word_embeddings": cfg.tie_embeddings, "rope_theta": cfg.rope_theta,
      "bos_token_id": cfg.bos_token_id, "pad_token_id": cfg.pad_token_id,
      "eos_token_id": list(cfg.eos_token_id) if isinstance(cfg.eos_token_id, tuple)
      else cfg.eos_token_id,
  }
  if cfg.rope_scaling:
    hf["rope_scaling"] = {"rope_type": "llama3", **dict(cfg.rope_scaling)}
    hf["rope_scaling"]["original_max_position_embeddings"] = int(
        hf["rope_scaling"]["original_max_position_embeddings"])
  if cfg.partial_rotary_factor != 1.0:
    hf["partial_rotary_factor"] = cfg.partial_rotary_factor
  if cfg.model_type in ("gemma", "gemma2"):
    hf["hidden_activation"] = "gelu_pytorch_tanh"
  else:
    hf["hidden_act"] = "silu" if cfg.activation == "silu" else "gelu_pytorch_tanh"
  if cfg.model_type == "llama":
    hf["attention_bias"] = cfg.qkv_bias
  if cfg.model_type == "gemma2":
    hf.update(attn_logit_softcapping=cfg.attn_softcap, final_logit_softcapping=cfg.final_softcap,
              query_pre_attn_scalar=(round(cfg.query_scale ** -2) if cfg.query_scale
                                     else cfg.head_dim),
              sliding_window=cfg.sliding_window,
              layer_types=list(cfg.layer_types) if cfg.layer_types else None)
  elif cfg.model_type == "mistral":
    hf["sliding_window"] = cfg.sliding_window
  elif cfg.model_type == "qwen2":
    hf.update(use_sliding_window=cfg.sliding_window is not None,
              sliding_window=cfg.sliding_window,
              layer_types=list(cfg.layer_types) if cfg.layer_types else None)
  return hf


def load_config(path: str | os.PathLike) -> ModelConfig:
  path = os.fspath(path)
  cfg_path = os.path.join(path, "config.json") if os.path.isdir(path) else path
  try:
    with open(cfg_path, encoding="utf-8") as f:
      hf = json.load(f)
  except OSError as e:
    raise DataError(f"cannot read model config: {e.strerror}", path=cfg_path) from None
  except ValueError as e:
    raise DataError(f"malformed JSON: {e}", path=cfg_path) from None
  if not isinstance(hf, dict):
    raise DataError(f"expected a JSON object, got {type(hf).__name__}", path=cfg_path)
  if hf.get("model_type") in ("gemma2", "gemma") and hf.get("text_config"):
    hf = {**hf, **hf["text_config"]}
  return from_hf_dict(hf, where=cfg_path)


def model_config(path: str | os.PathLike) -> ModelConfig:
  """load_config for a local or gs:// model folder (or config.json): a remote config is
  read from a staged copy, and its errors name the remote file."""
  path = os.fspath(path)
  if not fileio.is_remote(path):
    return load_config(path)
  cfg_path = fileio.join(path, "config.json") if fileio.isdir(path) else path
  try:
    local = fileio.local_copy(cfg_path)
  except OSError as e:
    raise DataError(f"cannot read model config: {e.strerror or e}", path=cfg_path) from None
  try:
    return load_config(local)
  except DataError as e:
    raise DataError(e.message, path=cfg_path, record=e.record, field=e.field) from None
