"""Batched KV-cache generation: greedy or temperature / top-k / top-p sampling, stop
tokens and stop strings, with static shapes.

Prompts are left-padded to a length bucket (`length_bucket`), so one prefill
compiles per bucket and the decode step compiles once per (batch, cache length):
sampling settings are traced values, not compile-time constants. Decoding runs `chunk`
steps per device call (a lax.scan); between calls the host checks stop strings.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sad_jax.models.config import ModelConfig
from sad_jax.models.transformer import Transformer, init_cache, unstack_layers

TRACES = {"prefill": 0, "decode": 0}  # trace counters, read by tests


def bucket(n: int, minimum: int = 16) -> int:
  return max(minimum, 1 << (max(n, 1) - 1).bit_length())


def length_bucket(n: int) -> int:
  """Padded sequence length: powers of two up to 256, then multiples of 256 (a 600-token
  prompt is padded to 768, not 1024; the forward's time grows with the padded length, and
  multiples of the attention block keep attention blockwise)."""
  return bucket(n) if n <= 256 else -(-n // 256) * 256


def sample(logits_bv, rng, *, temperature, top_k, top_p):
  """One token per row. temperature 0 → argmax; top_k 0 → off; top_p 1 → off."""

  def sampled(z):
    z = z / jnp.maximum(temperature, 1e-6)
    order = jnp.argsort(-z, axis=-1)
    sorted_z = jnp.take_along_axis(z, order, axis=-1)
    rank = jnp.arange(z.shape[-1])
    keep = jnp.where(top_k > 0, rank < top_k, True)
    probs = jax.nn.softmax(jnp.where(keep, sorted_z, -jnp.inf), axis=-1)
    keep &= (jnp.cumsum(probs, axis=-1) - probs) < top_p  # nucleus: keeps the first always
    choice = jax.random.categorical(rng, jnp.where(keep, sorted_z, -jnp.inf), axis=-1)
    return jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)

  def greedy(z):
    return jnp.argmax(z, axis=-1).astype(jnp.int32)

  # a traced switch: one compiled step serves every setting, and greedy skips the sort
  return jax.lax.cond(temperature > 0, sampled, greedy, logits_bv)


@functools.partial(jax.jit, static_argnames=("cfg", "cache_len", "dtype"))
def _prefill(params, ids_bp, pos_bp, seg_bp, rng, knobs, *, cfg: ModelConfig, cache_len: int,
             dtype):
  TRACES["prefill"] += 1
  model = Transformer(cfg, dtype=dtype)
  params = unstack_layers(params)  # decoding unrolled: a scan would restack the cache per token
  cache = init_cache(cfg, ids_bp.shape[0], cache_len, dtype)
  logits, cache = model.apply({"params": params}, ids_bp, positions_bt=pos_bp,
                              segment_ids_bt=seg_bp, cache=cache, cache_index=0)
  last = logits[:, -1, :cfg.vocab_size]
  return sample(last, rng, **knobs), cache


@functools.partial(jax.jit, static_argnames=("cfg", "steps", "dtype"), donate_argnums=(1,))
def _decode(params, cache, token_b, pos_b, index, rng, knobs, *, cfg: ModelConfig,
            steps: int, dtype):
  TRACES["decode"] += 1
  model = Transformer(cfg, dtype=dtype)
  params = unstack_layers(params)

  def step(carry, key):
    cache, token, pos, idx = carry
    logits, cache = model.apply({"params": params}, token[:, None], positions_bt=pos[:, None],
                                segment_ids_bt=jnp.ones_like(token)[:, None], cache=cache,
                                cache_index=idx)
    nxt = sample(logits[:, -1, :cfg.vocab_size], key, **knobs)
    return (cache, nxt, pos + 1, idx + 1), nxt

  (cache, token, pos, index), tokens = jax.lax.scan(
      step, (cache, token_b, pos_b, index), jax.random.split(rng, steps))
  return cache, token, pos, index, tokens.T


@dataclasses.dataclass
class Generation:
  tokens: list[list[int]]      # new tokens per prompt (up to and including the stop)
  stop_reason: list[str]       # "stop_token" | "stop_string" | "length"


def generate(cfg: ModelConfig, params, prompts: Sequence[Sequence[int]], *,
             max_new_tokens: int, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, stop_token_ids: Sequence[int] = (),
             stop_strings: Sequence[str] = (), decode: Callable[[list[int]], str] | None = None,
             seed: int = 0, chunk: int = 16, min_batch: int = 1,
             dtype=jnp.float32) -> Generation:
  if stop_strings and decode is None:
    raise ValueError("stop_strings need a decode function (token ids → text)")
  if any(len(p) == 0 for p in prompts):
    raise ValueError("every prompt needs at least one token")
  # The batch is bucketed too (rows repeat the first prompt, and are dropped): an agent's
  # batch shrinks as episodes end, and each new size would compile prefill and decode again.
  # `min_batch` pins the size for a caller whose compile time outweighs padded rows.
  n_real = len(prompts)
  b = bucket(max(n_real, min_batch), minimum=1)
  prompts = list(prompts) + [prompts[0]] * (b - n_real)
  p_len = length_bucket(max(len(p) for p in prompts))
  steps = -(-max_new_tokens // chunk) * chunk
  ids = np.zeros((b, p_len), np.int32)
  seg = np.zeros((b, p_len), np.int32)
  pos = np.zeros((b, p_len), np.int32)
  for i, p in enumerate(prompts):
    ids[i, p_len - len(p):] = p
    seg[i, p_len - len(p):] = 1
    pos[i, p_len - len(p):] = np.arange(len(p))
  knobs = {"temperature": jnp.float32(temperature), "top_k": jnp.int32(top_k),
           "top_p": jnp.float32(top_p)}
  rng = jax.random.PRNGKey(seed)
  rng, key = jax.random.split(rng)
  first, cache = _prefill(params, ids, pos, seg, key, knobs, cfg=cfg, cache_len=p_len + steps,
                          dtype=dtype)
  out = [[int(t)] for t in np.asarray(first)]
  reason = ["" for _ in prompts]
  stops = set(int(t) for t in stop_token_ids)

  def check(i):
    if reason[i]:
      return
    toks = out[i]
    if toks[-1] in stops:
      reason[i] = "stop_token"
    elif stop_strings and any(s in decode(toks) for s in stop_strings):
      reason[i] = "stop_string"
    elif len(toks) >= max_new_tokens:
      reason[i] = "length"

  for i in range(n_real, b):
    reason[i] = "padding"
  for i in range(b):
    check(i)
  token = first
  # host values in, host values back: the decode's outputs carry the mesh's axis types, and
  # feeding them back would trace and compile the decode a second time per length
  position = np.asarray([len(p) for p in prompts], np.int32)
  index = np.int32(p_len)
  produced = 1
  while produced < max_new_tokens and not all(reason):
    rng, key = jax.random.split(rng)
    cache, token, position, index, toks = _decode(params, cache, token, position, index, key,
                                                  knobs, cfg=cfg, steps=chunk, dtype=dtype)
    position, index, toks = np.asarray(position), np.asarray(index), np.asarray(toks)
    for j in range(chunk):
      if produced >= max_new_tokens:
        break
      produced += 1
      for i in range(b):
        if not reason[i]:
          out[i].append(int(toks[i, j]))
          check(i)
  for i in range(b):
    reason[i] = reason[i] or "length"
  return Generation(tokens=out[:n_real], stop_reason=reason[:n_real])
