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

Every draw has its own key: the row's key (one per episode) folded with the position
of the token drawn. An episode's tokens then depend on its key and its own history,
not on which slot it plays in, what the other rows hold, or how many processes split
the episodes.

`layout` (static: a (mesh, rules) pair, or None) runs the call under `sharding.use_mesh`:
the model's activations follow the rules and the cache is constrained to its logical
axes (rows on the batch axes, KV heads on tensor), so a sharded cache stays sharded.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from sad_jax.common import sharding
from sad_jax.models.config import ModelConfig
from sad_jax.models.transformer import Transformer, unstack_layers

TRACES = {"extend": 0, "decode": 0}  # trace counters, read by tests


CACHE_AXES = {"k": ("batch", None, "act_kv_heads", None),
              "v": ("batch", None, "act_kv_heads", None),
              "pos": ("batch", None), "seg": ("batch", None)}


def draw(logits_bv, keys_b, temperature):
  """(token, its log-prob) per row from softmax(logits / temperature), row b with its
  own key; 0 → argmax (the log-prob is then the temperature-1 one)."""
  tau = jnp.maximum(temperature, 1e-6)
  logp_bv = jax.nn.log_softmax(logits_bv / jnp.where(temperature > 0, tau, 1.0), axis=-1)
  sampled = jax.vmap(jax.random.categorical)(keys_b, logits_bv / tau)
  tok = jnp.where(temperature > 0, sampled, jnp.argmax(logits_bv, axis=-1)).astype(jnp.int32)
  return tok, jnp.take_along_axis(logp_bv, tok[:, None], axis=-1)[:, 0]


def token_keys(row_keys_b2, pos_b):
  """The key of each row's draw at position `pos_b` (uint32 [B, 2] raw row keys)."""
  return jax.vmap(jax.random.fold_in)(row_keys_b2, pos_b)


def cache_shardings(cache, mesh, rules=sharding.DEFAULT_RULES):
  """NamedShardings of a cache (init_cache's list of per-layer dicts) on `mesh`."""
  return [{k: sharding.sharding_for(v.shape, CACHE_AXES[k], mesh, rules) for k, v in c.items()}
          for c in cache]


def _constrain(cache):
  return [{k: sharding.constrain(v, CACHE_AXES[k]) for k, v in c.items()} for c in cache]


def _mesh(layout):
  return sharding.use_mesh(*layout) if layout is not None else sharding.use_mesh(None)


def _view(cache, n: int):
  """The first n slots of every layer's cache: attention then reads only those (the
  slots past the write index hold nothing yet, and each costs a decode step as much as a
  live one)."""
  return [{k: v[:, :n] for k, v in c.items()} for c in cache]


def _put(cache, view):
  return [{k: jax.lax.dynamic_update_slice_in_dim(c[k], w[k], 0, axis=1) for k in c}
          for c, w in zip(cache, view)]


@functools.partial(jax.jit, static_argnames=("cfg", "vocab", "view", "dtype", "layout"),
                   donate_argnums=(1,))
def extend(params, cache, ids_bw, pos_bw, seg_bw, index, valid_bs, row_keys_b2, temperature,
           *, cfg: ModelConfig, vocab: int, view: int, dtype, layout=None):
  """Masks the cache with `valid_bs`, writes the [B, W] block at `index` (within the
  first `view` slots, which are all the block attends to), and samples one token after
  each row's last column (at position last + 1). Returns (cache, token_b, logp_b)."""
  TRACES["extend"] += 1
  with _mesh(layout):
    cache = [dict(c, seg=c["seg"] * valid_bs) for c in cache]
    model = Transformer(cfg, dtype=dtype)
    logits, part = model.apply({"params": unstack_layers(params)}, ids_bw,
                               positions_bt=pos_bw, segment_ids_bt=seg_bw,
                               cache=_view(cache, view), cache_index=index)
    tok, logp = draw(logits[:, -1, :vocab].astype(jnp.float32),
                     token_keys(row_keys_b2, pos_bw[:, -1] + 1), temperature)
    return _constrain(_put(cache, part)), tok, logp


@functools.partial(jax.jit, static_argnames=("cfg", "vocab", "steps", "view", "dtype",
                                             "layout"), donate_argnums=(1,))
def decode(params, cache, token_b, pos_b, index, row_keys_b2, temperature, *, cfg: ModelConfig,
           vocab: int, steps: int, view: int, dtype, layout=None):
  """`steps` tokens per row: step s writes the previous token at index+s (position
  pos_b+s; within the first `view` slots) and samples the next (at position pos_b+s+1).
  Returns (cache, tokens [B, steps], logps [B, steps])."""
  TRACES["decode"] += 1
  with _mesh(layout):
    model = Transformer(cfg, dtype=dtype)
    params = unstack_layers(params)
    full, cache = cache, _view(cache, view)

    def step(carry, _):
      cache, token, pos, idx = carry
      logits, cache = model.apply({"params": params}, token[:, None],
                                  positions_bt=pos[:, None],
                                  segment_ids_bt=jnp.ones_like(token)[:, None], cache=cache,
                                  cache_index=idx)
      nxt, logp = draw(logits[:, -1, :vocab].astype(jnp.float32),
                       token_keys(row_keys_b2, pos + 1), temperature)
      return (cache, nxt, pos + 1, idx + 1), (nxt, logp)

    (cache, _, _, _), (toks, logps) = jax.lax.scan(
        step, (cache, token_b, pos_b, index), None, length=steps)
    return _constrain(_put(full, cache)), toks.T, logps.T
