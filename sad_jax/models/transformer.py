"""The decoder family in Flax (linen): Llama / Qwen2 / Mistral / Phi-3 / Gemma / Gemma 2.

`Transformer(cfg).apply({"params": p}, ids_bt, …)` is the pure functional apply used by
the jitted steps. Parameters are plain arrays; `param_axes(params)` gives their logical
axis names (sad_jax/common/sharding.py maps them to the mesh), and activations are constrained
at block boundaries.

Sequences may be packed: `segment_ids_bt` (0 = padding) keeps attention inside one
trajectory, and `positions_bt` restarts RoPE positions per trajectory. With `cache`
(see `init_cache`) the call appends keys/values at `cache_index` and attends over
everything cached so far (KV-cache decoding).

Layers come in two layouts: per layer (`layers_0`, `layers_1`, …: the HF order, unrolled
at trace time) or stacked (`layers`, every leaf with a leading "layers" axis), which
`Transformer(scan=True)` runs as one compiled layer body under `nn.scan`. `stack_layers`
and `unstack_layers` convert; `is_stacked(params)` tells which a tree is.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sad_jax.common.sharding import constrain
from sad_jax.models import attention, flash
from sad_jax.models.config import ModelConfig
from sad_jax.models.flash import attention_mask, heads_rows, keys_major

_NEG = -1e30  # masked attention logits / padded vocabulary: exp() is exactly 0
ATTN_BLOCK = 256  # query block of the training-time (no cache) causal attention

BTD = ("batch", "length", "act_embed")


def _init(scale: float = 0.02):
  return nn.initializers.normal(stddev=scale)


def _project(mod: nn.Module, name: str, x_rows, shape, *, n_in: int, dtype, dropout: float):
  """x_rows [N, prod(in_dims)] @ the weight `name` (shape in_dims + out_dims) as one GEMM,
  [N, prod(out_dims)]. An int8 weight is dequantised here by its `name_qscale`; with LoRA
  adapters `name_lora_a` / `name_lora_b` beside it (models/lora.py, B already scaled by
  α/r) the low-rank term is added, its input dropped out when a "lora_dropout" rng is given."""
  w = mod.param(name, _init(), shape, jnp.float32).astype(dtype)
  if mod.has_variable("params", name + "_qscale"):
    w = w * mod.get_variable("params", name + "_qscale").astype(dtype)
  k = int(np.prod(shape[:n_in]))
  y = x_rows @ w.reshape(k, -1)
  if mod.has_variable("params", name + "_lora_a"):
    a = mod.get_variable("params", name + "_lora_a").astype(dtype)
    b = mod.get_variable("params", name + "_lora_b").astype(dtype)
    xa = x_rows
    if dropout and mod.has_rng("lora_dropout"):
      keep = jax.random.bernoulli(mod.make_rng("lora_dropout"), 1.0 - dropout, x_rows.shape)
      xa = jnp.where(keep, x_rows / (1.0 - dropout), 0.0).astype(dtype)
    y = y + (xa @ a.reshape(k, -1)) @ b.reshape(a.shape[-1], -1)
  return y


class RMSNorm(nn.Module):
  eps: float
  offset: bool  # Gemma: x · (1 + w), w initialised at 0
  dtype: Any

  @nn.compact
  def __call__(self, x):
    w = self.param("scale", nn.initializers.zeros if self.offset else nn.initializers.ones,
                   (x.shape[-1],), jnp.float32)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    scale = (1.0 + w.astype(jnp.float32)) if self.offset else w.astype(jnp.float32)
    return (y * scale).astype(self.dtype)


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
  """Inverse frequencies (float64 host math), with Llama-3 scaling when configured."""
  dim = int(cfg.head_dim * cfg.partial_rotary_factor)
  inv = 1.0 / (cfg.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
  if cfg.rope_scaling:
    p = dict(cfg.rope_scaling)
    factor, lo, hi, old = (p["factor"], p["low_freq_factor"], p["high_freq_factor"],
                           p["original_max_position_embeddings"])
    wavelen = 2 * np.pi / inv
    scaled = np.where(wavelen > old / lo, inv / factor, inv)
    smooth = (old / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old / hi) & ~(wavelen > old / lo)
    inv = np.where(medium, smoothed, scaled)
  return inv.astype(np.float32)


def apply_rope(x, positions_bt, inv_freq):
  """Rotary embedding on the first 2·len(inv_freq) dims of x [B, T, H, Dh] (rotate-half)."""
  rot = 2 * inv_freq.shape[0]
  freqs = positions_bt.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [B,T,rot/2]
  emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
  cos, sin = jnp.cos(emb), jnp.sin(emb)
  xr, xp = x[..., :rot].astype(jnp.float32), x[..., rot:]
  half = rot // 2
  rotated = jnp.concatenate([-xr[..., half:], xr[..., :half]], axis=-1)
  out = (xr * cos + rotated * sin).astype(x.dtype)
  return jnp.concatenate([out, xp], axis=-1) if xp.shape[-1] else out


def _attend_block(q, k, v, mask_bts, softcap, dtype):
  """Softmax attention of one query block, and what its backward needs: q [B, KV, Tq, G,
  hd] (scaled), k/v [B, S, KV, hd], mask_bts bool[B, Tq, S]."""
  b, kv, tq, g = q.shape[:4]
  s = k.shape[1]
  logits = jnp.einsum("bkrd,bskd->bkrs", heads_rows(q), k,
                      preferred_element_type=jnp.float32).reshape(b, kv, tq, g, s)
  capped = None
  if softcap:
    capped = jnp.tanh(logits / softcap)
    logits = softcap * capped
  logits = jnp.where(mask_bts[:, None, :, None, :], logits, _NEG)
  m = jnp.max(logits, axis=-1, keepdims=True)
  # unnormalised: the row sums divide the [Tq, hd] output, not the [Tq, S] probabilities
  p = jnp.exp(logits - m)
  total = jnp.sum(p, axis=-1, keepdims=True)
  out = jnp.einsum("bkrs,bskd->bkrd", heads_rows(p.astype(dtype)), v,
                   preferred_element_type=jnp.float32).reshape(q.shape) / total
  # a row with no allowed key (padding) averages every value; its logits get no gradient
  return out.astype(dtype), (p, total, m > _NEG / 2, capped)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _attend(q, k, v, mask_bts, softcap, dtype):
  return _attend_block(q, k, v, mask_bts, softcap, dtype)[0]


def _attend_fwd(q, k, v, mask_bts, softcap, dtype):
  out, res = _attend_block(q, k, v, mask_bts, softcap, dtype)
  return out, (q, k, v, out, *res)


def _attend_bwd(softcap, dtype, res, d_out):
  # the softmax backward as dS = P ∘ (dP − rowsum(dO ∘ O)) (from [Tq, hd] arrays, no pass
  # over [Tq, S] for it), with P unnormalised and dO divided by the row sums instead
  del dtype
  q, k, v, out, p, total, has_key, capped = res
  f32 = jnp.float32
  d_out = d_out.astype(f32) / total
  d_v = keys_major(jnp.einsum("bkrd,bkrs->bkds", heads_rows(d_out), heads_rows(p)))
  d_out = jnp.where(has_key, d_out, 0.0)
  delta = jnp.sum(d_out * out.astype(f32), axis=-1, keepdims=True)
  d_logits = p * (jnp.einsum("bkrd,bskd->bkrs", heads_rows(d_out), v,
                             preferred_element_type=f32).reshape(p.shape) - delta)
  if softcap:
    d_logits = d_logits * (1.0 - capped * capped)
  d_q = jnp.einsum("bkrs,bskd->bkrd", heads_rows(d_logits), k,
                   preferred_element_type=f32).reshape(q.shape)
  d_k = keys_major(jnp.einsum("bkrd,bkrs->bkds", heads_rows(q), heads_rows(d_logits),
                               preferred_element_type=f32))
  return d_q.astype(q.dtype), d_k.astype(k.dtype), d_v.astype(v.dtype), None


_attend.defvjp(_attend_fwd, _attend_bwd)


def reference_attention(q, k, v, positions, segment_ids, k_pos, k_seg, *, cfg: ModelConfig,
                        window, dtype, recompute: bool = False, blockwise: bool = True):
  """The pure-JAX attention: q [B, T, H, hd] over k/v [B, S, KV, hd], masked by
  `attention_mask` (causal by position, within a segment, within the window); blockwise
  over 256-query blocks for training rows (S == T, causal in index order). Each block's
  softmax and its backward are written out (`_attend`) to keep the element-wise passes
  over [Tq, S] few."""
  b, t, h, hd = q.shape
  kv = k.shape[2]
  # queries heads first ([B, KV, T, G, hd]), scaled here rather than as [T, S] logits: the
  # logits then come out of their GEMM as [Tq·G, S] rows, the layout the softmax reads
  # (from [B, T, KV, G, hd] XLA wrote them transposed and copied them back)
  qh = (q.astype(jnp.float32) * cfg.scale).astype(q.dtype)
  qh = qh.reshape(b, t, kv, h // kv, hd).transpose(0, 2, 1, 3, 4)

  def attend(q_blk, k_blk, v_blk, mask_bts):
    return _attend(q_blk, k_blk, v_blk, mask_bts, cfg.attn_softcap, jnp.dtype(dtype))

  if recompute:
    # the backward otherwise keeps every block's [T, S] probabilities alive, the largest
    # activation at long sequence lengths; recomputing them costs one more QK^T and softmax
    attend = jax.checkpoint(attend)
  n_blk = t // ATTN_BLOCK if blockwise and t % ATTN_BLOCK == 0 else 1
  if n_blk > 1:
    # Training rows are causal in index order (a packed trajectory's positions rise with
    # its index; other segments are masked), so query block i needs keys [0, (i+1)·blk)
    # only: the exact softmax over fewer keys, about half the work and memory of the
    # full [T, T] einsum.
    outs = []
    for i in range(n_blk):
      lo, hi = i * ATTN_BLOCK, (i + 1) * ATTN_BLOCK
      mask = attention_mask(positions[:, lo:hi], k_pos[:, :hi], segment_ids[:, lo:hi],
                            k_seg[:, :hi], window)
      outs.append(attend(qh[:, :, lo:hi], k[:, :hi], v[:, :hi], mask))
    out = jnp.concatenate(outs, axis=2)
  else:
    out = attend(qh, k, v, attention_mask(positions, k_pos, segment_ids, k_seg, window))
  return out.transpose(0, 2, 1, 3, 4).reshape(b, t, h, hd)


class Attention(nn.Module):
  cfg: ModelConfig
  layer: int  # -1: the scanned body, whose window comes traced from the call
  dtype: Any
  recompute: bool = False  # recompute scores and softmax in the backward (remat="attention")
  lora_dropout: float = 0.0

  @nn.compact
  def __call__(self, x, *, positions, segment_ids, cache=None, cache_index=None, window=None):
    cfg, dt = self.cfg, self.dtype
    h, kv, hd, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size

    b, t = x.shape[:2]
    x_rows = constrain(x.reshape(b * t, d), ("batch", "act_embed"))

    def proj(name, heads):
      # as [B·T, D] @ [D, H·Dh]: plain GEMMs forward and backward (see MLP)
      y = _project(self, name, x_rows, (d, heads, hd), n_in=1, dtype=dt,
                   dropout=self.lora_dropout).reshape(b, t, heads, hd)
      if cfg.qkv_bias:
        y = y + self.param(f"{name}_bias", nn.initializers.zeros, (heads, hd),
                           jnp.float32).astype(dt)
      return y

    inv = rope_inv_freq(cfg)
    q, k, v = proj("q", h), proj("k", kv), proj("v", kv)
    with jax.named_scope("rope"):  # the scopes name the parts in a profile (bench/)
      q, k = apply_rope(q, positions, inv), apply_rope(k, positions, inv)
    q = constrain(q, ("batch", "length", "act_heads", "head_dim"))
    k = constrain(k, ("batch", "length", "act_kv_heads", "head_dim"))
    v = constrain(v, ("batch", "length", "act_kv_heads", "head_dim"))
    k_pos, k_seg = positions, segment_ids
    new_cache = None
    # A prefill (cache_index a literal 0: generate's) fills an empty cache: its queries
    # need only the prompt's own keys, blockwise like training, not the whole cache.
    prefill = cache is not None and isinstance(cache_index, int) and cache_index == 0
    if cache is not None:
      k = jax.lax.dynamic_update_slice_in_dim(cache["k"], k.astype(cache["k"].dtype),
                                              cache_index, axis=1)
      v = jax.lax.dynamic_update_slice_in_dim(cache["v"], v.astype(cache["v"].dtype),
                                              cache_index, axis=1)
      k_pos = jax.lax.dynamic_update_slice_in_dim(cache["pos"], positions, cache_index, axis=1)
      k_seg = jax.lax.dynamic_update_slice_in_dim(cache["seg"], segment_ids, cache_index,
                                                  axis=1)
      new_cache = {"k": k, "v": v, "pos": k_pos, "seg": k_seg}
      k, v = k.astype(dt), v.astype(dt)
      if prefill:
        k, v, k_pos, k_seg = k[:, :t], v[:, :t], positions, segment_ids
    if self.layer >= 0:  # a scanned body (layer -1) gets its layer's window as an input
      window = cfg.window(self.layer)
    with jax.named_scope("core"):
      if cache is None and cfg.attention == "flash":
        # no [T, S] probabilities kept either: remat="attention" has nothing to recompute
        out = flash.flash_attention(q, k, v, positions, segment_ids, cfg=cfg, window=window,
                                    dtype=dt)
      elif cache is None and cfg.attention != "reference":
        # a fused kernel (models/attention.py): it keeps no [T, S] probabilities, so
        # remat="attention" has nothing to recompute here
        out = attention.attend(q, k, v, segment_ids, cfg=cfg, window=window)
      else:
        out = reference_attention(q, k, v, positions, segment_ids, k_pos, k_seg, cfg=cfg,
                                  window=window, dtype=dt, recompute=self.recompute,
                                  blockwise=cache is None or prefill)
    out = constrain(out, ("batch", "length", "act_heads", "head_dim"))
    y = _project(self, "o", out.reshape(b * t, h * hd), (h, hd, d), n_in=2, dtype=dt,
                 dropout=self.lora_dropout)
    return constrain(y.reshape(b, t, d), BTD), new_cache


class MLP(nn.Module):
  cfg: ModelConfig
  dtype: Any
  lora_dropout: float = 0.0

  @nn.compact
  def __call__(self, x):
    cfg, dt = self.cfg, self.dtype
    d, f = cfg.hidden_size, cfg.intermediate_size
    # [B·T, D] rows: the weight gradients are then plain GEMMs. With [B, T, D] they contract
    # two dims, which XLA's CPU backend ran at half the speed (bench/train_step.py).
    b, t = x.shape[:2]
    x = constrain(x.reshape(b * t, d), ("batch", "act_embed"))
    proj = functools.partial(_project, self, n_in=1, dtype=dt, dropout=self.lora_dropout)
    gate, up = proj("gate", x, (d, f)), proj("up", x, (d, f))
    act = jax.nn.silu(gate) if cfg.activation == "silu" else jax.nn.gelu(gate, approximate=True)
    hidden = constrain(act * up, ("batch", "act_mlp"))
    y = proj("down", hidden, (f, d))
    return constrain(y.reshape(b, t, d), BTD)


class Block(nn.Module):
  cfg: ModelConfig
  layer: int
  dtype: Any
  recompute_attention: bool = False
  lora_dropout: float = 0.0

  @nn.compact
  def __call__(self, x, *, positions, segment_ids, cache=None, cache_index=None, window=None):
    cfg = self.cfg
    norm = lambda name: RMSNorm(cfg.rms_norm_eps, cfg.norm_offset, self.dtype, name=name)
    y, new_cache = Attention(cfg, self.layer, self.dtype, self.recompute_attention,
                             self.lora_dropout, name="attn")(
        norm("input_norm")(x), positions=positions, segment_ids=segment_ids, cache=cache,
        cache_index=cache_index, window=window)
    if cfg.post_norms:
      y = norm("post_attn_norm")(y)
    x = constrain(x + y, BTD)
    y = MLP(cfg, self.dtype, self.lora_dropout, name="mlp")(norm("pre_mlp_norm")(x))
    if cfg.post_norms:
      y = norm("post_mlp_norm")(y)
    return constrain(x + y, BTD), new_cache


class Transformer(nn.Module):
  cfg: ModelConfig
  dtype: Any = jnp.float32          # compute dtype (bfloat16 for speed); params stay f32
  # none | attention (recompute attention scores in the backward) | block (recompute blocks)
  remat: str = "none"
  scan: bool = False  # stacked layer params ("layers"), run by nn.scan over one layer body
  lora_dropout: float = 0.0  # on the LoRA adapters' inputs, with a "lora_dropout" rng

  def setup(self):
    cfg = self.cfg
    self.embed = self.param("embed", _init(), (cfg.padded_vocab, cfg.hidden_size),
                            jnp.float32)
    block = nn.remat(Block, static_argnums=()) if self.remat == "block" else Block
    if self.scan:
      # one Block whose params carry a leading layer axis; inside the body it sees one
      # layer's slice, so remat (block or attention) applies per layer as unrolled
      self.layers = block(cfg, -1, self.dtype, self.remat == "attention", self.lora_dropout,
                          name="layers")
    else:
      self.blocks = [block(cfg, i, self.dtype, self.remat == "attention", self.lora_dropout,
                           name=f"layers_{i}") for i in range(cfg.num_layers)]
    self.final_norm = RMSNorm(cfg.rms_norm_eps, cfg.norm_offset, self.dtype)
    if not cfg.tie_embeddings:
      self.lm_head = self.param("lm_head", _init(), (cfg.hidden_size, cfg.padded_vocab),
                                jnp.float32)

  def head(self) -> jax.Array:
    """The [D, V_padded] output projection (the embedding's transpose when tied)."""
    return self.embed.T if self.cfg.tie_embeddings else self.lm_head

  def hidden(self, ids_bt, *, positions_bt=None, segment_ids_bt=None, cache=None,
             cache_index=None):
    """Final-norm hidden states [B, T, D] (and the new cache when decoding)."""
    cfg, dt = self.cfg, self.dtype
    if positions_bt is None:
      positions_bt = jnp.broadcast_to(jnp.arange(ids_bt.shape[1]), ids_bt.shape)
    if segment_ids_bt is None:
      segment_ids_bt = jnp.ones(ids_bt.shape, jnp.int32)
    x = self.embed[ids_bt].astype(dt)
    if cfg.embed_scale:
      x = x * jnp.asarray(cfg.hidden_size ** 0.5, dt)
    x = constrain(x, BTD)
    if self.scan:
      x, new_caches = self._scan_layers(x, positions_bt, segment_ids_bt, cache, cache_index)
    else:
      new_caches = []
      for i, blk in enumerate(self.blocks):
        x, c = blk(x, positions=positions_bt, segment_ids=segment_ids_bt,
                   cache=None if cache is None else cache[i], cache_index=cache_index)
        new_caches.append(c)
    x = self.final_norm(x)
    return constrain(x, BTD), (new_caches if cache is not None else None)

  def _scan_layers(self, x, positions_bt, segment_ids_bt, cache, cache_index):
    """The decoder layers as one nn.scan: x is the carry; each layer's window (and cache,
    stacked from the per-layer list) is scanned over."""
    cfg, n = self.cfg, self.cfg.num_layers
    # full-attention layers of a mixed model get a window no position difference reaches
    windows = None if cfg.sliding_window is None else jnp.asarray(
        [cfg.window(i) or np.iinfo(np.int32).max for i in range(n)], jnp.int32)
    stacked = None if cache is None else jax.tree.map(lambda *c: jnp.stack(c), *cache)

    def body(blk, x, per_layer):
      window, c = per_layer
      x, new_c = blk(x, positions=positions_bt, segment_ids=segment_ids_bt, cache=c,
                     cache_index=cache_index, window=window)
      return x, new_c

    scan = nn.scan(body, variable_axes={"params": 0},
                   split_rngs={"params": True, "lora_dropout": True}, length=n)
    x, new_stacked = scan(self.layers, x, (windows, stacked))
    new_caches = None if cache is None else [
        jax.tree.map(lambda a, i=i: a[i], new_stacked) for i in range(n)]
    return x, new_caches

  def logits(self, h_btd):
    """[B, T, V_padded] float32 logits; padded vocabulary entries are −inf-like."""
    cfg = self.cfg
    z = jnp.einsum("btd,dv->btv", h_btd, self.head().astype(self.dtype),
                   preferred_element_type=jnp.float32)
    if cfg.final_softcap:
      z = cfg.final_softcap * jnp.tanh(z / cfg.final_softcap)
    if cfg.padded_vocab != cfg.vocab_size:
      z = jnp.where(jnp.arange(cfg.padded_vocab) < cfg.vocab_size, z, _NEG)
    return constrain(z, ("batch", "length", "act_vocab"))

  def __call__(self, ids_bt, *, positions_bt=None, segment_ids_bt=None, cache=None,
               cache_index=None):
    h, new_cache = self.hidden(ids_bt, positions_bt=positions_bt, segment_ids_bt=segment_ids_bt,
                               cache=cache, cache_index=cache_index)
    z = self.logits(h)
    return z if cache is None else (z, new_cache)


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=jnp.float32) -> list[dict]:
  """An empty KV cache: per layer k/v [B, S, Hkv, Dh], positions and segment ids (0 =
  empty slot: never attended)."""
  shape = (batch, max_len, cfg.num_kv_heads, cfg.head_dim)
  return [{"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype),
           "pos": jnp.zeros((batch, max_len), jnp.int32),
           "seg": jnp.zeros((batch, max_len), jnp.int32)} for _ in range(cfg.num_layers)]


_AXES = {
    "embed": ("vocab", "embed"), "lm_head": ("embed", "vocab"),
    "q": ("embed", "heads", "head_dim"), "k": ("embed", "kv_heads", "head_dim"),
    "v": ("embed", "kv_heads", "head_dim"), "o": ("heads", "head_dim", "embed"),
    "q_bias": ("heads", "head_dim"), "k_bias": ("kv_heads", "head_dim"),
    "v_bias": ("kv_heads", "head_dim"),
    "gate": ("embed", "mlp"), "up": ("embed", "mlp"), "down": ("mlp", "embed"),
    "scale": ("norm",),
}
# The projection weights `_project` applies: name → (module, number of leading input dims)
PROJECTIONS = {"q": ("attn", 1), "k": ("attn", 1), "v": ("attn", 1), "o": ("attn", 2),
               "gate": ("mlp", 1), "up": ("mlp", 1), "down": ("mlp", 1)}
# LoRA adapters follow their weight's axes (A: its input axes, B: its output axes) with a
# rank axis "lora"; an int8 weight's per-channel scales its output axes (models/lora.py)
for _name, (_, _n_in) in PROJECTIONS.items():
  _AXES[f"{_name}_lora_a"] = _AXES[_name][:_n_in] + ("lora",)
  _AXES[f"{_name}_lora_b"] = ("lora",) + _AXES[_name][_n_in:]
  _AXES[f"{_name}_qscale"] = _AXES[_name][_n_in:]


def param_axes(params):
  """Logical axis names for every parameter (same tree structure, tuples at the leaves);
  stacked layers (under "layers") lead with the "layers" axis."""
  def axes(path, leaf):
    name = path[-1].key
    if name not in _AXES:
      raise KeyError(f"no logical axes for parameter {jax.tree_util.keystr(path)}")
    out = ("layers",) + _AXES[name] if path[0].key == STACKED else _AXES[name]
    assert len(out) == leaf.ndim, (path, leaf.shape)
    return out
  return jax.tree_util.tree_map_with_path(axes, params)


STACKED = "layers"


def is_stacked(params) -> bool:
  """Whether `params` holds its layers stacked (scan layout) rather than per layer."""
  return STACKED in params


def _layer_keys(params) -> list[str]:
  keys = [k for k in params if k.startswith("layers_")]
  return sorted(keys, key=lambda k: int(k.removeprefix("layers_")))


def stack_layers(params):
  """Per-layer params (layers_0 … layers_{L-1}) → the scan layout: one "layers" subtree
  whose leaves are [L, …], layer i at index i. Stacked params pass through."""
  if is_stacked(params):
    return params
  keys = _layer_keys(params)
  if keys != [f"layers_{i}" for i in range(len(keys))]:
    raise ValueError(f"layer params are not layers_0 … layers_{len(keys) - 1}: {keys}")
  out = {k: v for k, v in params.items() if k not in keys}
  out[STACKED] = jax.tree.map(lambda *a: jnp.stack(a), *(params[k] for k in keys))
  return out


def unstack_layers(params):
  """The scan layout → per-layer params (the inverse of stack_layers); per-layer params
  pass through."""
  if not is_stacked(params):
    return params
  stacked = params[STACKED]
  n = jax.tree.leaves(stacked)[0].shape[0]
  out = {k: v for k, v in params.items() if k != STACKED}
  out.update({f"layers_{i}": jax.tree.map(lambda a, i=i: a[i], stacked) for i in range(n)})
  return out


def to_layout(params, *, scan: bool):
  """`params` in the layout a model with `scan_layers=scan` takes."""
  return stack_layers(params) if scan else unstack_layers(params)


def init_params(cfg: ModelConfig, rng: jax.Array, *, scan: bool = False):
  """Random parameters (float32) for a config (stacked layers when `scan`)."""
  # the parameters do not depend on the attention kernel, which may not take 1 token
  model = Transformer(cfg.replace(attention="reference"), scan=scan)
  ids = jnp.zeros((1, 1), jnp.int32)

  def init(rng):
    # Drawn with XLA's RngBitGenerator ("rbg": threefry splits, RBG bits) in one jit: on a
    # CPU, compiling a threefry draw for every parameter shape took 2-4x longer.
    if not jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
      rng = jax.random.wrap_key_data(rng)
    data_u32 = jax.random.key_data(rng).reshape(-1)
    rbg = jax.random.wrap_key_data(jnp.concatenate([data_u32, data_u32]), impl="rbg")
    return model.init(rbg, ids)["params"]

  return jax.jit(init)(rng)


def features(cfg: ModelConfig, params, ids_bt, *, positions_bt=None, segment_ids_bt=None,
             dtype=jnp.float32, remat: str = "none", lora_dropout: float = 0.0,
             rng: jax.Array | None = None):
  """(hidden [B,T,D], head [D,V_padded], None): what the chunked loss consumes. Scanned
  when `params` are stacked. With LoRA adapters in `params` and an `rng`, their inputs
  are dropped out at `lora_dropout`."""
  model = Transformer(cfg, dtype=dtype, remat=remat, scan=is_stacked(params),
                      lora_dropout=lora_dropout)
  rngs = None if rng is None or not lora_dropout else {"lora_dropout": rng}
  h, _ = model.apply({"params": params}, ids_bt, positions_bt=positions_bt,
                     segment_ids_bt=segment_ids_bt, method=Transformer.hidden, rngs=rngs)
  head = model.apply({"params": params}, method=Transformer.head)
  return h, head, None
