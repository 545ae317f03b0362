"""Decode throughput in one run: KV-cache generation against the no-cache loop, and against
transformers' `generate` on the same model (greedy, batch 1 and 8).

  python bench/decode.py [--repeats 3] [--batches 1,8] [--prompt 64] [--new 64] [--no-hf]
                         [--json OUT.json]

Model: a Llama-style decoder (vocab 8192, d_model 256, 4 layers, 4 heads, 2 kv heads,
ffn 704: shape S of the training benchmark), float32, prompts of 64 random tokens, 64 new
tokens (no stop token). The no-cache loop recomputes a full forward over the padded
sequence for every new token (one compile, static shapes). The transformers peer loads the
same weights (written by `sad_jax.models.hf.save`) into `LlamaForCausalLM` (SDPA attention,
its default dynamic KV cache) and runs `generate(do_sample=False, max_new_tokens=new,
min_new_tokens=new)` with torch's threads set to the cores; JAX and torch run one after the
other in this process, never at once. Times are best of --repeats after one warm-up call
(which compiles the JAX paths). The greedy tokens of each pair are compared: float32 paths
that agree to rounding pick the same tokens unless two logits tie to within it.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sad_jax.common import fileio
from sad_jax.models import generate as G
from sad_jax.models import hf
from sad_jax.models import transformer as T
from sad_jax.models.config import ModelConfig

CFG = ModelConfig(model_type="llama", vocab_size=8192, hidden_size=256, intermediate_size=704,
                  num_layers=4, num_heads=4, num_kv_heads=2, head_dim=64)


def no_cache_generate(params, prompts: np.ndarray, new: int, forward) -> np.ndarray:
  b, p = prompts.shape
  seq = np.zeros((b, p + new), np.int32)
  seq[:, :p] = prompts
  for t in range(p, p + new):
    seq[:, t] = np.asarray(jnp.argmax(forward(params, seq)[:, t - 1], axis=-1))
  return seq[:, p:]


def hf_generator(params, folder: str):
  """transformers' greedy generate on our weights: prompts [B, P] → new tokens [B, N]."""
  import torch
  from transformers import LlamaForCausalLM

  torch.set_num_threads(os.cpu_count() or 1)
  hf.save(CFG, params, folder)
  model = LlamaForCausalLM.from_pretrained(folder, torch_dtype=torch.float32,
                                           attn_implementation="sdpa").eval()

  def run(prompts: np.ndarray, new: int) -> np.ndarray:
    ids = torch.from_numpy(np.asarray(prompts, np.int64))
    with torch.inference_mode():
      out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                           max_new_tokens=new, min_new_tokens=new, pad_token_id=0)
    return out[:, prompts.shape[1]:].numpy()

  return run, torch.__version__


def best_of(fn, repeats: int) -> list[float]:
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return times


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--batches", default="1,8")
  parser.add_argument("--prompt", type=int, default=64)
  parser.add_argument("--new", type=int, default=64)
  parser.add_argument("--no-hf", action="store_true", help="skip the transformers peer")
  parser.add_argument("--json", default=None, help="write all results here")
  args = parser.parse_args()
  params = T.init_params(CFG, jax.random.PRNGKey(0))
  forward = jax.jit(lambda p, ids: hf.forward(CFG, p, ids))
  peer, torch_version = None, None
  tmp = tempfile.TemporaryDirectory()
  if not args.no_hf:
    peer, torch_version = hf_generator(params, os.path.join(tmp.name, "hf"))
  rows = []
  for batch in (int(b) for b in args.batches.split(",")):
    prompts = np.random.default_rng(batch).integers(0, CFG.vocab_size, (batch, args.prompt))
    paths = {
        "kv_cache": lambda p=prompts: np.array(G.generate(
            CFG, params, p.tolist(), max_new_tokens=args.new).tokens),
        "no_cache": lambda p=prompts: no_cache_generate(params, p, args.new, forward),
    }
    if peer is not None:
      paths["transformers"] = lambda p=prompts: peer(p, args.new)
    tokens = {name: fn() for name, fn in paths.items()}  # warm-up (and compile)
    times = {name: [] for name in paths}
    for _ in range(args.repeats):  # interleaved, so drift hits every path alike
      for name, fn in paths.items():
        times[name] += best_of(fn, 1)
    n = batch * args.new
    best = {k: n / min(v) for k, v in times.items()}
    agree = {k: float(np.mean(tokens[k] == tokens["kv_cache"])) for k in tokens
             if k != "kv_cache"}
    row = {"batch": batch, "new_tokens": n, "seconds": times, "tokens_per_s_best": best,
           "tokens_per_s_median": {k: n / float(np.median(v)) for k, v in times.items()},
           "agreement_with_kv_cache": agree,
           "ratio_vs_no_cache": best["kv_cache"] / best["no_cache"]}
    line = (f"decode B={batch} prompt={args.prompt} new={args.new} (float32, CPU): kv-cache "
            f"{best['kv_cache']:.0f} tok/s, no-cache loop {best['no_cache']:.0f} tok/s "
            f"({row['ratio_vs_no_cache']:.2f}x)")
    if peer is not None:
      row["ratio_vs_transformers"] = best["kv_cache"] / best["transformers"]
      line += (f", transformers generate {best['transformers']:.0f} tok/s "
               f"(sad_jax / transformers {row['ratio_vs_transformers']:.2f}x)")
    print(line + f"; greedy tokens equal to the kv-cache path's: {agree}", flush=True)
    rows.append(row)
  tmp.cleanup()
  if args.json:
    out = {"args": {"repeats": args.repeats, "batches": args.batches, "prompt": args.prompt,
                    "new": args.new, "hf": peer is not None},
           "device": str(jax.devices()[0].device_kind), "dtype": "float32",
           "torch": torch_version,
           "model": {"vocab": CFG.vocab_size, "d": CFG.hidden_size, "layers": CFG.num_layers,
                     "heads": CFG.num_heads, "kv": CFG.num_kv_heads,
                     "ffn": CFG.intermediate_size},
           "rows": rows}
    fileio.json_dump(args.json, out, indent=1)  # whole or not at all


if __name__ == "__main__":
  main()
