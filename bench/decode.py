"""Decode throughput: KV-cache generation against the no-cache loop, in one run.

  python bench/decode.py [--repeats 3] [--batch 4] [--new 64] [--json OUT.json]

Model: a Llama-style decoder (vocab 8192, d_model 256, 4 layers, 4 heads, 2 kv heads,
ffn 704: shape S of the training benchmark), float32, prompts of 64 tokens. The no-cache
loop recomputes a full forward over the padded sequence for every new token (one
compile, static shapes). Prints new tokens/s for each and their ratio; `--json` writes every
figure (and the arguments) to a file.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

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


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--prompt", type=int, default=64)
  parser.add_argument("--new", type=int, default=64)
  parser.add_argument("--json", default=None, help="write all results here")
  args = parser.parse_args()
  params = T.init_params(CFG, jax.random.PRNGKey(0))
  prompts = np.random.default_rng(0).integers(0, CFG.vocab_size, (args.batch, args.prompt))
  forward = jax.jit(lambda p, ids: hf.forward(CFG, p, ids))

  def cached():
    return np.array(G.generate(CFG, params, prompts.tolist(), max_new_tokens=args.new).tokens)

  def uncached():
    return no_cache_generate(params, prompts, args.new, forward)

  a, b = cached(), uncached()  # compile both, and check they agree
  same = bool((a == b).all())
  times = {"kv_cache": [], "no_cache": []}
  for _ in range(args.repeats):
    for name, fn in (("kv_cache", cached), ("no_cache", uncached)):
      t0 = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - t0)
  n = args.batch * args.new
  best = {k: n / min(v) for k, v in times.items()}
  print(f"decode B={args.batch} prompt={args.prompt} new={args.new} (float32, CPU): "
        f"kv-cache {best['kv_cache']:.0f} tok/s, no-cache loop {best['no_cache']:.0f} tok/s, "
        f"ratio {best['kv_cache'] / best['no_cache']:.2f}x; identical greedy tokens: {same}")
  print(json.dumps({"tokens_per_s_best": best, "seconds": times, "identical": same}))
  if args.json:
    out = {"args": {"repeats": args.repeats, "batch": args.batch, "prompt": args.prompt,
                    "new": args.new},
           "device": str(jax.devices()[0].device_kind), "dtype": "float32",
           "model": {"vocab": CFG.vocab_size, "d": CFG.hidden_size, "layers": CFG.num_layers,
                     "heads": CFG.num_heads, "kv": CFG.num_kv_heads,
                     "ffn": CFG.intermediate_size},
           "new_tokens": n, "seconds": times, "tokens_per_s_best": best,
           "tokens_per_s_median": {k: n / float(np.median(v)) for k, v in times.items()},
           "ratio_best": best["kv_cache"] / best["no_cache"], "identical": same}
    with open(args.json, "w") as f:
      json.dump(out, f, indent=1)


if __name__ == "__main__":
  main()
