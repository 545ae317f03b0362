"""Tiny random checkpoints of every supported family, made with transformers (no downloads)."""

from __future__ import annotations

import functools
import os
import tempfile

V = 101
BASE = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
            tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=None)


def hf_config(family: str):
  import transformers as tr

  if family == "llama":
    return tr.LlamaConfig(**BASE)
  if family == "llama3":
    return tr.LlamaConfig(**{**BASE, "rope_theta": 500000.0, "rope_scaling": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16}})
  if family == "qwen2":
    return tr.Qwen2Config(**{**BASE, "tie_word_embeddings": True})
  if family == "mistral":
    return tr.MistralConfig(**{**BASE, "sliding_window": 5})
  if family == "phi3":
    return tr.Phi3Config(**BASE)
  if family == "gemma":
    return tr.GemmaConfig(**{**BASE, "head_dim": 16, "tie_word_embeddings": True})
  if family == "gemma2":
    return tr.Gemma2Config(**{**BASE, "head_dim": 16, "sliding_window": 4,
                              "query_pre_attn_scalar": 12, "tie_word_embeddings": True,
                              "attn_logit_softcapping": 5.0, "final_logit_softcapping": 3.0})
  raise KeyError(family)


FAMILIES = ("llama", "llama3", "qwen2", "mistral", "phi3", "gemma", "gemma2")


@functools.cache
def checkpoint(family: str) -> tuple[str, object]:
  """(folder, torch model) of a random model with weights perturbed away from init
  (so that norms, biases and offsets are not trivially 0 or 1)."""
  import torch
  import transformers as tr

  torch.manual_seed(FAMILIES.index(family))
  cfg = hf_config(family)
  cfg._attn_implementation = "eager"
  model = tr.AutoModelForCausalLM.from_config(cfg).float().eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(torch.randn_like(p) * 0.3)
  folder = os.path.join(tempfile.mkdtemp(prefix=f"sadjax_{family}_"), "ckpt")
  model.save_pretrained(folder)
  return folder, model
