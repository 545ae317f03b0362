"""Segment-aware blockwise attention with an online softmax (`model.attention="flash"`),
in pure JAX for training rows (no KV cache), on any backend.

Packed agent rows hold several trajectories, and a query attends only inside its own:
query block i (BQ queries) needs keys from the earliest segment start among its queries
(or its sliding window's start) up to its own end, not the whole causal prefix
[0, (i+1)·BQ) that `transformer.reference_attention` computes. Those bounds depend on
the batch, so each query block loops (`lax.fori_loop`, a traced trip count) over the key
blocks (BK keys) it needs, keeping a running max and sum (online softmax): no [T, S]
probabilities are materialised. The backward recomputes each block's probabilities from
the saved log-sum-exp, the usual flash-attention trade (one more QK^T per block) for
residuals of [T] instead of [T, S].

The bounds are a minimum over the rows of the batch (one trip count per block); a key
block outside a query's segment is masked like in the reference. Query rows with no
allowed key (padding) average the values of the key blocks visited, as the reference's
padding rows average their block's; they get no gradient to their logits, and a loss
never weights them.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from sad_jax.models.config import ModelConfig

BQ = 256  # queries per block
BK = 256  # keys per inner-loop step: smaller skips more, larger makes bigger GEMMs
_NEG = -1e30


def heads_rows(x):
  """[B, KV, Tq, G, ·] → [B, KV, Tq·G, ·]: a query block's rows of one KV head (the layout
  both attentions here and in transformer.py feed their GEMMs)."""
  return x.reshape(*x.shape[:2], -1, x.shape[-1])


def keys_major(x_bkds):
  """[B, KV, hd, S] → [B, S, KV, hd]. A key (or value) gradient contracts the query rows;
  XLA's CPU backend (jax 0.10) ran that GEMM about twice as fast in the [hd, Tq]·[Tq, S]
  form as in the [S, Tq]·[Tq, hd] one autodiff emits; the barrier keeps XLA from folding
  this transpose back into the dot."""
  return jax.lax.optimization_barrier(x_bkds).transpose(0, 3, 1, 2)


def block_sizes(t: int, *, bq: int | None = None, bk: int | None = None) -> tuple[int, int]:
  """(query block, key block) for rows of t tokens: BQ and BK by default; one block when t
  is not a multiple of the query block, whole query blocks when BK does not divide it."""
  bq = bq or BQ
  if t % bq:
    bq = t
  bk = min(bk or BK, bq)
  return bq, (bk if bq % bk == 0 else bq)


def attention_mask(q_pos, k_pos, q_seg, k_seg, window: int | None):
  """bool[B, T, S]: causal by position, within one segment (0 = padding), and within
  the sliding window when given (key within the last `window` positions)."""
  allowed = (k_pos[:, None, :] <= q_pos[:, :, None])
  allowed &= (q_seg[:, :, None] == k_seg[:, None, :]) & (k_seg[:, None, :] > 0)
  if window is not None:
    allowed &= (q_pos[:, :, None] - k_pos[:, None, :]) < window
  return allowed


def segment_starts(segment_ids_bt):
  """int32[B, T]: the index where each token's segment starts; a padding token (segment
  0) gets its own index, so it never widens a block's key range."""
  t = segment_ids_bt.shape[1]
  idx = jnp.arange(t, dtype=jnp.int32)[None]
  prev = jnp.pad(segment_ids_bt[:, :-1], ((0, 0), (1, 0)), constant_values=-1)
  starts = jax.lax.cummax(jnp.where(segment_ids_bt != prev, idx, 0), axis=1)
  return jnp.where(segment_ids_bt > 0, starts, idx)


def key_block_range(starts_bt, window, *, q_lo: int, q_hi: int, bk: int):
  """(first, end) key-block indices that the queries [q_lo, q_hi) of every row need:
  from the earliest segment start among them (and the window's start, for a sliding
  window) to the block holding q_hi − 1. Never empty: the diagonal block is included."""
  lo = jnp.min(starts_bt[:, q_lo:q_hi])
  if window is not None:
    # the block's first query has the earliest window start (int32 max: full attention)
    lo = jnp.maximum(lo, q_lo + 1 - jnp.asarray(window, jnp.int32))
  end = -(-q_hi // bk)
  return jnp.minimum(lo // bk, end - 1).astype(jnp.int32), end


def _block_logits(q, k_blk, q_pos, q_seg, k_pos, k_seg, window, softcap):
  """Masked logits [B, KV, Tq, G, BK] of a query block against a key block, and the
  soft-capped tanh (None without soft-cap) the backward needs."""
  b, kv, tq, g = q.shape[:4]
  s = jnp.einsum("bkrd,bskd->bkrs", heads_rows(q), k_blk,
                 preferred_element_type=jnp.float32).reshape(b, kv, tq, g, -1)
  capped = None
  if softcap:
    capped = jnp.tanh(s / softcap)
    s = softcap * capped
  allowed = attention_mask(q_pos, k_pos, q_seg, k_seg, window)
  return jnp.where(allowed[:, None, :, None, :], s, _NEG), capped


def _slice_keys(x, j, bk):
  return jax.lax.dynamic_slice_in_dim(x, j * bk, bk, axis=1)


def _add_keys(acc, x, j, bk):
  """acc[:, j·bk : (j+1)·bk] += x (a key block's gradient)."""
  return jax.lax.dynamic_update_slice_in_dim(acc, _slice_keys(acc, j, bk) + x, j * bk, axis=1)


def _forward(q, k, v, pos, seg, window, softcap, dtype, bq, bk):
  """out [B, KV, T, G, hd] and the log-sum-exp [B, KV, T, G, 1] (float32)."""
  t = q.shape[2]
  starts = segment_starts(seg)
  outs, lses = [], []
  for lo_q in range(0, t, bq):
    hi_q = lo_q + bq
    q_blk, q_pos, q_seg = q[:, :, lo_q:hi_q], pos[:, lo_q:hi_q], seg[:, lo_q:hi_q]
    first, end = key_block_range(starts, window, q_lo=lo_q, q_hi=hi_q, bk=bk)

    def body(j, carry, q_blk=q_blk, q_pos=q_pos, q_seg=q_seg):
      acc, m, total = carry
      s, _ = _block_logits(q_blk, _slice_keys(k, j, bk), q_pos, q_seg, _slice_keys(pos, j, bk),
                           _slice_keys(seg, j, bk), window, softcap)
      m_new = jnp.maximum(m, jnp.max(s, axis=-1, keepdims=True))
      # A row whose keys so far are all masked has m_new = _NEG and p = 1: the first
      # allowed key's block rescales that by exp(_NEG − max) = 0.
      p = jnp.exp(s - m_new)
      corr = jnp.exp(m - m_new)
      pv = jnp.einsum("bkrs,bskd->bkrd", heads_rows(p.astype(dtype)), _slice_keys(v, j, bk),
                      preferred_element_type=jnp.float32).reshape(acc.shape)
      return acc * corr + pv, m_new, total * corr + jnp.sum(p, axis=-1, keepdims=True)

    stat = jnp.full((*q_blk.shape[:4], 1), _NEG, jnp.float32)
    acc, m, total = jax.lax.fori_loop(first, end, body,
                                      (jnp.zeros(q_blk.shape, jnp.float32), stat,
                                       jnp.zeros_like(stat)))
    outs.append((acc / total).astype(dtype))
    lses.append(m + jnp.log(total))
  return jnp.concatenate(outs, axis=2), jnp.concatenate(lses, axis=2)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9))
def _flash(q, k, v, pos, seg, window, softcap, dtype, bq, bk):
  return _forward(q, k, v, pos, seg, window, softcap, dtype, bq, bk)[0]


def _flash_fwd(q, k, v, pos, seg, window, softcap, dtype, bq, bk):
  out, lse = _forward(q, k, v, pos, seg, window, softcap, dtype, bq, bk)
  return out, (q, k, v, pos, seg, window, out, lse)


def _flash_bwd(softcap, dtype, bq, bk, res, d_out):
  q, k, v, pos, seg, window, out, lse = res
  f32 = jnp.float32
  t = q.shape[2]
  starts = segment_starts(seg)
  # padding rows (no allowed key, lse ≈ _NEG) pass no gradient, as in the reference
  d_out = jnp.where(lse > _NEG / 2, d_out.astype(f32), 0.0)
  delta = jnp.sum(d_out * out.astype(f32), axis=-1, keepdims=True)
  d_k, d_v = jnp.zeros(k.shape, f32), jnp.zeros(v.shape, f32)
  d_qs = []
  for lo_q in range(0, t, bq):
    hi_q = lo_q + bq
    q_blk, q_pos, q_seg = q[:, :, lo_q:hi_q], pos[:, lo_q:hi_q], seg[:, lo_q:hi_q]
    do_blk, lse_blk, delta_blk = (x[:, :, lo_q:hi_q] for x in (d_out, lse, delta))
    first, end = key_block_range(starts, window, q_lo=lo_q, q_hi=hi_q, bk=bk)

    def body(j, carry, q_blk=q_blk, q_pos=q_pos, q_seg=q_seg, do_blk=do_blk,
             lse_blk=lse_blk, delta_blk=delta_blk):
      d_q, d_k, d_v = carry
      k_blk, v_blk = _slice_keys(k, j, bk), _slice_keys(v, j, bk)
      s, capped = _block_logits(q_blk, k_blk, q_pos, q_seg, _slice_keys(pos, j, bk),
                                _slice_keys(seg, j, bk), window, softcap)
      p = jnp.exp(s - lse_blk)
      d_v_blk = keys_major(jnp.einsum("bkrd,bkrs->bkds", heads_rows(do_blk), heads_rows(p)))
      d_p = jnp.einsum("bkrd,bskd->bkrs", heads_rows(do_blk), v_blk,
                       preferred_element_type=f32).reshape(p.shape)
      d_s = p * (d_p - delta_blk)
      if softcap:
        d_s = d_s * (1.0 - capped * capped)
      d_q = d_q + jnp.einsum("bkrs,bskd->bkrd", heads_rows(d_s), k_blk,
                             preferred_element_type=f32).reshape(d_q.shape)
      d_k_blk = keys_major(jnp.einsum("bkrd,bkrs->bkds", heads_rows(q_blk), heads_rows(d_s),
                                       preferred_element_type=f32))
      return d_q, _add_keys(d_k, d_k_blk, j, bk), _add_keys(d_v, d_v_blk, j, bk)

    d_q, d_k, d_v = jax.lax.fori_loop(first, end, body,
                                      (jnp.zeros(q_blk.shape, f32), d_k, d_v))
    d_qs.append(d_q)
  d_q = jnp.concatenate(d_qs, axis=2)
  return d_q.astype(q.dtype), d_k.astype(k.dtype), d_v.astype(v.dtype), None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def flash_attention(q_bthd, k_bskd, v_bskd, positions_bt, segment_ids_bt, *,
                    cfg: ModelConfig, window, dtype, bq: int | None = None,
                    bk: int | None = None) -> jax.Array:
  """Causal, segment-masked attention of packed training rows (k/v are the rows' own,
  S == T): q [B, T, H, hd], k/v [B, T, KV, hd], RoPE applied; window None, an int or a
  traced int32 scalar. Returns [B, T, H, hd]. Block sizes: `block_sizes`."""
  b, t, h, hd = q_bthd.shape
  kv = k_bskd.shape[2]
  bq, bk = block_sizes(t, bq=bq, bk=bk)
  # heads first and scaled, as in transformer.reference_attention
  qh = (q_bthd.astype(jnp.float32) * cfg.scale).astype(q_bthd.dtype)
  qh = qh.reshape(b, t, kv, h // kv, hd).transpose(0, 2, 1, 3, 4)
  if window is not None and not isinstance(window, int):
    window = jnp.asarray(window, jnp.int32)
  out = _flash(qh, k_bskd, v_bskd, positions_bt, segment_ids_bt, window,
               cfg.attn_softcap, jnp.dtype(dtype), bq, bk)
  return out.transpose(0, 2, 1, 3, 4).reshape(b, t, h, hd)
