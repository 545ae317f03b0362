"""Fused attention kernels for the training-time forward (no KV cache), chosen by
`model.attention` (ModelConfig.attention):

  reference         the pure-JAX blockwise attention in transformer.py (default, any backend)
  flash             pure-JAX, segment-aware key ranges and an online softmax (models/flash.py),
                    any backend
  splash            Pallas splash attention (jax.experimental.pallas.ops.tpu.splash_attention),
                    compiled by Mosaic: TPU only
  splash_interpret  the same kernel run by the Pallas interpreter: any backend, slow; it is
                    how the kernel is checked against the reference on CPU
  cudnn             jax.nn.dot_product_attention(implementation="cudnn"): NVIDIA GPUs only

Both kernels take packed rows: segment ids keep attention inside one trajectory, and
causality (and a sliding window) is by index, which equals the reference's by-position
rule because a packed trajectory's positions rise by one per index (trainer/pipeline.py).
Padding tokens (segment 0) attend among themselves instead of to nothing; their outputs
carry zero loss weight, so losses and gradients are unchanged. KV-cache decoding and
prefill always use the reference.

What was checked where (jax 0.10.2, a CPU-only machine; tests/models/test_attention.py):
  splash  forward and gradients equal the reference in interpret mode on CPU (packed
          segments, GQA, sliding windows mixed per layer under scan, Gemma 2 soft-cap, on
          one device and sharded on a (2,2,2) mesh), and the Mosaic kernel lowers for TPU
          from CPU (the pod config on 256 abstract chips). It has not run on a TPU.
  cudnn   the refusals, and the call it makes (mask, window, scale, GQA layout) through
          the same jax.nn API with implementation="xla" against the reference. The cuDNN
          kernel itself has not run here (no GPU).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from sad_jax.common import sharding
from sad_jax.models.config import ModelConfig

IMPLEMENTATIONS = ("reference", "flash", "splash", "splash_interpret", "cudnn")
# query/key block of the splash kernel: the largest of these dividing the sequence
SPLASH_BLOCKS = (512, 256, 128)


def check(cfg: ModelConfig, *, implementation: str, dtype: Any, platform: str,
          seq_len: int) -> None:
  """Raises ValueError (the reason and what to do) if `implementation` cannot run this
  model on `platform` (a jax platform name: cpu, tpu, gpu/cuda) at `seq_len` tokens."""
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"unknown attention {implementation!r}; expected one of "
                     f"{', '.join(IMPLEMENTATIONS)}")
  if implementation in ("reference", "flash"):  # pure JAX: any backend
    return
  if implementation.startswith("splash"):
    if implementation == "splash" and platform != "tpu":
      raise ValueError(f"attention 'splash' is a TPU (Mosaic) kernel; this platform is "
                       f"{platform!r}: use 'reference' (or 'splash_interpret' to check the "
                       "kernel off TPU, slowly)")
    if seq_len % SPLASH_BLOCKS[-1]:
      raise ValueError(f"splash attention tiles the sequence in blocks of "
                       f"{SPLASH_BLOCKS[-1]}: data.seq_len {seq_len} is not a multiple")
    return
  # cudnn
  if platform not in ("gpu", "cuda"):
    raise ValueError(f"attention 'cudnn' runs on NVIDIA GPUs only; this platform is "
                     f"{platform!r}: use 'reference'")
  if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
    raise ValueError(f"cuDNN flash attention computes in bfloat16/float16, not "
                     f"{jnp.dtype(dtype).name}: set model.dtype=bfloat16 (or use 'reference')")
  if cfg.attn_softcap:
    raise ValueError(f"cuDNN attention has no logit soft-capping, which {cfg.model_type} uses "
                     f"(attn_logit_softcapping={cfg.attn_softcap}): use 'reference'")
  if cfg.head_dim % 8 or cfg.head_dim > 256:
    raise ValueError(f"cuDNN flash attention needs a head dim that is a multiple of 8 and at "
                     f"most 256 (128 before Hopper), got {cfg.head_dim}")


def attend(q_bthd, k_bskd, v_bskd, segment_ids_bt, *, cfg: ModelConfig, window) -> jax.Array:
  """Causal, segment-masked attention of packed rows with cfg.attention's kernel.

  q [B, T, H, hd], k/v [B, T, KV, hd] (H a multiple of KV; query head i reads KV head
  i // (H/KV)), RoPE applied; window: None, a static int, or a traced int32 scalar (a
  scanned layer's; full-attention layers carry int32 max). Returns [B, T, H, hd]."""
  if cfg.attention.startswith("splash"):
    return _sharded_splash(q_bthd, k_bskd, v_bskd, segment_ids_bt, cfg=cfg, window=window,
                           interpret=cfg.attention == "splash_interpret")
  if cfg.attention == "cudnn":
    return cudnn_attention(q_bthd, k_bskd, v_bskd, segment_ids_bt, cfg=cfg, window=window)
  raise ValueError(f"attend() takes a kernel, not {cfg.attention!r}")


def _by_window(run, window, cfg: ModelConfig):
  """run(static window or None) for a window that may be traced: a scanned model with
  sliding and full layers selects between the two kernels per layer."""
  if window is None or isinstance(window, (int, np.integer)):
    return run(None if window is None else int(window))
  # kernels need the window at trace time: both variants compiled, one runs per layer
  return jax.lax.cond(window == cfg.sliding_window,
                      lambda: run(cfg.sliding_window), lambda: run(None))


# ----------------------------------------------------------------------------- splash


def _splash_kernel(seq_len: int, heads: int, window: int | None, softcap: float | None,
                   interpret: bool):
  from jax.experimental.pallas.ops.tpu.splash_attention import (
      splash_attention_kernel as sk,
  )
  from jax.experimental.pallas.ops.tpu.splash_attention import (
      splash_attention_mask as sm,
  )

  # built per trace (it holds its mask info as arrays, which must not outlive a trace);
  # jax caches the mask processing itself
  shape = (seq_len, seq_len)
  # causal, within the window: q − (window − 1) ≤ k ≤ q
  one = sm.CausalMask(shape) if window is None else sm.LocalMask(shape, (window - 1, 0), 0)
  block = next((b for b in SPLASH_BLOCKS if seq_len % b == 0), None)
  if block is None:
    raise ValueError(f"splash attention tiles the sequence in blocks of {SPLASH_BLOCKS[-1]}: "
                     f"length {seq_len} is not a multiple")
  sizes = sk.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                        block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                        use_fused_bwd_kernel=True)
  # GQA natively: query head h reads KV head h // (heads / kv_heads)
  return sk.make_splash_mha(sm.MultiHeadMask([one] * heads), block_sizes=sizes,
                            head_shards=1, q_seq_shards=1, attn_logits_soft_cap=softcap,
                            interpret=interpret)


def _splash_local(q_bthd, k_bskd, v_bskd, segment_ids_bt, window, *, cfg: ModelConfig,
                  interpret: bool):
  """One device's splash attention (a vmap over its rows of the per-row kernel)."""
  from jax.experimental.pallas.ops.tpu.splash_attention import SegmentIds

  t, h = q_bthd.shape[1], q_bthd.shape[2]
  # the kernel takes unscaled logits: scale q in float32 (then the soft-cap sees the
  # reference's logits)
  q = (q_bthd.astype(jnp.float32) * cfg.scale).astype(q_bthd.dtype).transpose(0, 2, 1, 3)
  k, v = k_bskd.transpose(0, 2, 1, 3), v_bskd.transpose(0, 2, 1, 3)

  def run(win):
    kernel = _splash_kernel(t, h, win, cfg.attn_softcap, interpret)
    return jax.vmap(lambda q1, k1, v1, s1: kernel(q1, k1, v1, segment_ids=SegmentIds(s1, s1)))(
        q, k, v, segment_ids_bt)

  return _by_window(run, window, cfg).transpose(0, 2, 1, 3)


def _sharded_splash(q, k, v, segment_ids_bt, *, cfg: ModelConfig, window, interpret: bool):
  """The kernel per device under shard_map (a pallas_call has no SPMD partitioning rule):
  rows over the batch axes, heads over the tensor axis as the rules place them."""
  current = sharding.current()
  traced_window = window is not None and not isinstance(window, (int, np.integer))
  local = functools.partial(_splash_local, cfg=cfg, interpret=interpret)
  if current is None:
    return local(q, k, v, segment_ids_bt, window)
  mesh, rules = current
  q_spec = sharding.spec_for(q.shape, ("batch", "length", "act_heads", "head_dim"), mesh, rules)
  kv_spec = sharding.spec_for(k.shape, ("batch", "length", "act_kv_heads", "head_dim"), mesh,
                              rules)
  if q_spec[1] is not None or kv_spec[1] is not None:
    raise ValueError("splash attention keeps each row's whole sequence on one device: the "
                     "rules must not split 'length'")
  if kv_spec[2] != q_spec[2]:
    # KV heads kept whole while query heads are split (e.g. 2 KV heads on tensor 4): each
    # query head gets its own copy of its KV head so the local grouping is the global one
    group = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
    kv_spec = q_spec
  seg_spec = PartitionSpec(q_spec[0], None)
  if traced_window:
    fn = lambda q1, k1, v1, s1, w1: local(q1, k1, v1, s1, w1)
    args, specs = (q, k, v, segment_ids_bt, window), (q_spec, kv_spec, kv_spec, seg_spec,
                                                      PartitionSpec())
  else:
    fn = lambda q1, k1, v1, s1: local(q1, k1, v1, s1, window)
    args, specs = (q, k, v, segment_ids_bt), (q_spec, kv_spec, kv_spec, seg_spec)
  return jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=q_spec, check_vma=False)(*args)


# ----------------------------------------------------------------------------- cuDNN


def cudnn_attention(q_bthd, k_bskd, v_bskd, segment_ids_bt, *, cfg: ModelConfig, window,
                    implementation: str = "cudnn") -> jax.Array:
  """jax.nn.dot_product_attention with cuDNN: causal, GQA, a [B, 1, T, T] segment mask
  (cuDNN adds it as a bias: T² per row, unlike splash's block skipping) and the window as
  local_window_size. implementation="xla" runs the same call through XLA (how CPU tests
  check the arguments)."""
  seg = segment_ids_bt
  # padding attends to padding, so no row is fully masked (its output is never used)
  mask_b1ts = (seg[:, :, None] == seg[:, None, :])[:, None]

  def run(win):
    return jax.nn.dot_product_attention(
        q_bthd, k_bskd, v_bskd, mask=mask_b1ts, scale=cfg.scale, is_causal=True,
        local_window_size=None if win is None else (win - 1, 0),
        implementation=implementation)

  return _by_window(run, window, cfg)
