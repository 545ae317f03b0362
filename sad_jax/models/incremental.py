"""Incremental decoding into a persistent KV cache: the ops of a multi-turn rollout.

`generate` prefills a fresh cache per call, so an agent loop re-reads its whole history
every turn. Here the cache outlives the turn: `extend` appends a left-padded block (an
observation, a new episode's prompt) at the shared write index and samples the first
token of the reply; `decode` samples `steps` more tokens. Both return each sampled
token's log-probability under the distribution it was drawn from (at temperature 1: the
policy's own), which on-policy training needs as the behaviour log-prob.

Slots are invalidated, not moved: the host keeps a validity mask [B, S] (a row's tokens
decoded past the end of its turn, a finished episode's history), and `extend` applies it
(segment id 0 is never attended) before it writes. Rows share the write index, so a row
with nothing to append contributes a block of padding. Both read and write only the
first `view` slots (static: the caller rounds the live length up, in steps of 256), so a
step costs what the cache holds, not its capacity. Shapes: a `decode` per view and an
`extend` per (block width, view).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from sad_jax.models.config import ModelConfig
from sad_jax.models.transformer import Transformer, unstack_layers

TRACES = {"extend": 0, "decode": 0}  # trace counters, read by tests


def draw(logits_bv, rng, temperature):
  """(token, its log-prob) per row from softmax(logits / temperature); 0 → argmax (the
  log-prob is then the temperature-1 one)."""
  tau = jnp.maximum(temperature, 1e-6)
  logp_bv = jax.nn.log_softmax(logits_bv / jnp.where(temperature > 0, tau, 1.0), axis=-1)
  tok = jnp.where(temperature > 0, jax.random.categorical(rng, logits_bv / tau, axis=-1),
                  jnp.argmax(logits_bv, axis=-1)).astype(jnp.int32)
  return tok, jnp.take_along_axis(logp_bv, tok[:, None], axis=-1)[:, 0]


def _view(cache, n: int):
  """The first n slots of every layer's cache: attention then reads only those (the
  slots past the write index hold nothing yet, and each costs a decode step as much as a
  live one)."""
  return [{k: v[:, :n] for k, v in c.items()} for c in cache]


def _put(cache, view):
  return [{k: jax.lax.dynamic_update_slice_in_dim(c[k], w[k], 0, axis=1) for k in c}
          for c, w in zip(cache, view)]


@functools.partial(jax.jit, static_argnames=("cfg", "vocab", "view", "dtype"),
                   donate_argnums=(1,))
def extend(params, cache, ids_bw, pos_bw, seg_bw, index, valid_bs, rng, temperature, *,
           cfg: ModelConfig, vocab: int, view: int, dtype):
  """Masks the cache with `valid_bs`, writes the [B, W] block at `index` (within the
  first `view` slots, which are all the block attends to), and samples one token after
  each row's last column. Returns (cache, token_b, logp_b)."""
  TRACES["extend"] += 1
  cache = [dict(c, seg=c["seg"] * valid_bs) for c in cache]
  model = Transformer(cfg, dtype=dtype)
  logits, part = model.apply({"params": unstack_layers(params)}, ids_bw, positions_bt=pos_bw,
                             segment_ids_bt=seg_bw, cache=_view(cache, view),
                             cache_index=index)
  tok, logp = draw(logits[:, -1, :vocab].astype(jnp.float32), rng, temperature)
  return _put(cache, part), tok, logp


@functools.partial(jax.jit, static_argnames=("cfg", "vocab", "steps", "view", "dtype"),
                   donate_argnums=(1,))
def decode(params, cache, token_b, pos_b, index, rng, temperature, *, cfg: ModelConfig,
           vocab: int, steps: int, view: int, dtype):
  """`steps` tokens per row: step s writes the previous token at index+s (position
  pos_b+s; within the first `view` slots) and samples the next. Returns (cache, tokens
  [B, steps], logps [B, steps])."""
  TRACES["decode"] += 1
  model = Transformer(cfg, dtype=dtype)
  params = unstack_layers(params)
  full, cache = cache, _view(cache, view)

  def step(carry, key):
    cache, token, pos, idx = carry
    logits, cache = model.apply({"params": params}, token[:, None], positions_bt=pos[:, None],
                                segment_ids_bt=jnp.ones_like(token)[:, None], cache=cache,
                                cache_index=idx)
    nxt, logp = draw(logits[:, -1, :vocab].astype(jnp.float32), key, temperature)
    return (cache, nxt, pos + 1, idx + 1), (nxt, logp)

  (cache, _, _, _), (toks, logps) = jax.lax.scan(
      step, (cache, token_b, pos_b, index), jax.random.split(rng, steps))
  return _put(full, cache), toks.T, logps.T
