"""The reference attention (transformer.reference_attention) against a float64 reference
and against its previous implementation, and the attention kernels (model.attention,
models/attention.py) against the reference attention; the segment-aware flash attention
(models/flash.py) against float64, its key ranges by hand, sharded against one device, and
in a scanned model with per-layer windows against the unrolled reference model.

Splash runs here only in Pallas interpret mode (`splash_interpret`, CPU): forward and
gradients on packed rows with padding, GQA, a sliding window, Gemma 2's soft-cap and
mixed windows in a scanned model, sharded on a mesh. Its Mosaic (TPU) lowering is checked
in tests/test_configs.py; it has not run on a TPU. cuDNN cannot run on this CPU: its
refusals are checked, and the call it makes through jax.nn.dot_product_attention's "xla"
implementation.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from bench.attention_profile import previous_attention
from sad_jax.common import sharding
from sad_jax.models import attention, flash
from sad_jax.models import transformer as T
from tests.models.test_model import GEMMA2, LLAMA, random_params
from tests.models.test_scan import assert_trees_close


def packed_rows(b: int, t: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """(segment_ids, positions) [b, t]: rows of 1–3 trajectories, positions restarting at
  each, and trailing padding (segment 0) on every other row."""
  rng = np.random.default_rng(seed)
  seg, pos = np.zeros((b, t), np.int32), np.zeros((b, t), np.int32)
  for r in range(b):
    fill = t - (rng.integers(8, t // 4) if r % 2 == 0 else 0)
    cuts = np.sort(rng.choice(np.arange(16, fill - 16), rng.integers(0, 3), replace=False))
    for s, (lo, hi) in enumerate(zip([0, *cuts], [*cuts, fill])):
      seg[r, lo:hi], pos[r, lo:hi] = s + 1, np.arange(hi - lo)
  return seg, pos


def qkv(b, t, h, kv, hd, seed=0):
  rng = np.random.default_rng(seed)
  return [jnp.asarray(rng.normal(size=(b, t, n, hd)), jnp.float32) for n in (h, kv, kv)]


def attention_value_and_grad(fn, q, k, v, weight):
  """A loss of the attention output at the given weights (0 on padding) and its q/k/v
  gradients."""
  return jax.jit(jax.value_and_grad(lambda q, k, v: jnp.sum(fn(q, k, v) * weight),
                                    argnums=(0, 1, 2)))(q, k, v)


def float64_attention(q, k, v, pos, seg, *, scale, window, softcap):
  """Softmax attention in float64 over the whole row (no query blocks), each query head
  reading its KV head through jnp.repeat; fully masked (padding) rows get a finite
  uniform average."""
  group = q.shape[2] // k.shape[2]
  k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
  logits = jnp.einsum("bthd,bshd->bhts", q, k) * scale
  if softcap:
    logits = softcap * jnp.tanh(logits / softcap)
  allowed = ((pos[:, None, :] <= pos[:, :, None]) & (seg[:, :, None] == seg[:, None, :])
             & (seg[:, None, :] > 0))
  if window is not None:
    allowed &= (pos[:, :, None] - pos[:, None, :]) < window
  probs = jax.nn.softmax(jnp.where(allowed[:, None], logits, -1e300), axis=-1)
  return jnp.einsum("bhts,bshd->bthd", probs, v)


REFERENCE_CASES = {
    "gqa": dict(cfg=LLAMA.replace(head_dim=16), window=None),
    "window": dict(cfg=LLAMA.replace(head_dim=16), window=24),
    "softcap_query_scale": dict(cfg=GEMMA2.replace(head_dim=16, attn_softcap=2.0), window=None),
    "recompute_window": dict(cfg=LLAMA.replace(head_dim=16), window=24, recompute=True),
    "one_block": dict(cfg=LLAMA.replace(head_dim=16), window=None, blockwise=False),
}


@pytest.mark.parametrize("case", REFERENCE_CASES, ids=list(REFERENCE_CASES))
def test_reference_attention_equals_float64(case, monkeypatch):
  """Four query blocks of 16 (or one) over packed rows of 1–3 trajectories with padding:
  outputs of real tokens, and the q/k/v gradients of a loss that weights only real tokens,
  equal a float64 softmax attention over whole rows."""
  c = REFERENCE_CASES[case]
  cfg, window = c["cfg"], c["window"]
  monkeypatch.setattr(T, "ATTN_BLOCK", 16)
  b, t = 2, 64
  seg, pos = packed_rows(b, t, seed=11)
  q, k, v = qkv(b, t, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, seed=12)
  real = (seg > 0)[..., None, None]
  weight = jnp.asarray(np.random.default_rng(13).normal(size=q.shape), jnp.float32) * real
  got_out = T.reference_attention(q, k, v, pos, seg, pos, seg, cfg=cfg, window=window,
                                  dtype=jnp.float32, recompute=c.get("recompute", False),
                                  blockwise=c.get("blockwise", True))
  got_loss, got_grads = attention_value_and_grad(
      lambda q, k, v: T.reference_attention(
          q, k, v, pos, seg, pos, seg, cfg=cfg, window=window, dtype=jnp.float32,
          recompute=c.get("recompute", False), blockwise=c.get("blockwise", True)),
      q, k, v, weight)
  assert_equals_float64(got_out, got_loss, got_grads, q, k, v, pos, seg, weight, cfg=cfg,
                        window=window)


def assert_equals_float64(got_out, got_loss, got_grads, q, k, v, pos, seg, weight, *, cfg,
                          window):
  """Outputs at real tokens, the weighted loss and the q/k/v gradients equal
  float64_attention's."""
  with jax.enable_x64(True):
    f64 = lambda x: jnp.asarray(np.asarray(x), jnp.float64)
    ref = lambda q, k, v: float64_attention(q, k, v, jnp.asarray(pos), jnp.asarray(seg),
                                            scale=cfg.scale, window=window,
                                            softcap=cfg.attn_softcap)
    want_out = np.asarray(ref(f64(q), f64(k), f64(v)))
    want_loss, want_grads = jax.value_and_grad(
        lambda q, k, v: jnp.sum(ref(q, k, v) * f64(weight)), argnums=(0, 1, 2))(
            f64(q), f64(k), f64(v))
    want_loss, want_grads = float(want_loss), [np.asarray(g) for g in want_grads]
  np.testing.assert_allclose(np.asarray(got_out)[seg > 0], want_out[seg > 0], atol=2e-6)
  np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
  for name, got, want in zip("qkv", got_grads, want_grads, strict=True):
    np.testing.assert_allclose(got, want, atol=1e-5, err_msg=name)


def test_flash_key_ranges_by_hand():
  """Row 0: trajectories [0, 40) and [40, 60), padding [60, 64); row 1: one of [0, 64).
  Query blocks of 16, key blocks of 8: a block needs keys from the earliest segment start
  among its queries in any row (padding adds none), or from its window's start."""
  seg = np.array([[1] * 40 + [2] * 20 + [0] * 4, [1] * 64], np.int32)
  starts = np.asarray(flash.segment_starts(jnp.asarray(seg)))
  np.testing.assert_array_equal(starts[0], [0] * 40 + [40] * 20 + list(range(60, 64)))
  np.testing.assert_array_equal(starts[1], [0] * 64)
  rng = lambda rows, lo, window=None: tuple(int(x) for x in flash.key_block_range(
      jnp.asarray(flash.segment_starts(jnp.asarray(rows))), window, q_lo=lo, q_hi=lo + 16,
      bk=8))
  assert rng(seg, 48) == (0, 8)  # row 1's single trajectory needs every earlier key
  assert rng(seg[:1], 48) == (5, 8)  # keys [40, 64): block 5 on
  assert rng(seg[:1], 32) == (0, 6)
  assert rng(seg[:1], 48, window=4) == (5, 8)  # max(40, 48 + 1 − 4 = 45) → block 5
  assert rng(seg[1:], 48, window=4) == (5, 8)  # 45 → block 5
  assert rng(seg[1:], 48, window=17) == (4, 8)  # 32 → block 4
  assert rng(seg[1:], 48, window=10) == (4, 8)  # query 48 reads key 39 (48 − 39 < 10)
  assert rng(seg[1:], 48, window=np.int32(2**31 - 1)) == (0, 8)  # a full layer's window
  padded = np.array([[1] * 16 + [0] * 48], np.int32)
  assert rng(padded, 48) == (6, 8)  # only padding: its own keys, never an empty range


@pytest.mark.parametrize("case", ["gqa", "window", "softcap_query_scale"])
def test_flash_attention_equals_float64(case):
  """Query blocks of 16 and key blocks of 8 over packed rows of 1–3 trajectories with
  padding, each block looping over its rows' key range only: outputs of real tokens, and
  the q/k/v gradients of a loss that weights only real tokens, equal a float64 softmax
  attention over whole rows; and a row of fewer trajectories visits more key blocks."""
  c = REFERENCE_CASES[case]
  cfg, window = c["cfg"], c["window"]
  b, t = 2, 64
  seg, pos = packed_rows(b, t, seed=13)  # 14 of the causal prefix's 20 key blocks
  q, k, v = qkv(b, t, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, seed=12)
  weight = jnp.asarray(np.random.default_rng(13).normal(size=q.shape),
                       jnp.float32) * (seg > 0)[..., None, None]
  attend = lambda q, k, v: flash.flash_attention(q, k, v, pos, seg, cfg=cfg, window=window,
                                                 dtype=jnp.float32, bq=16, bk=8)
  got_out = jax.jit(attend)(q, k, v)
  got_loss, got_grads = attention_value_and_grad(attend, q, k, v, weight)
  assert_equals_float64(got_out, got_loss, got_grads, q, k, v, pos, seg, weight, cfg=cfg,
                        window=window)
  # the key ranges skip blocks here (else this test would not exercise them)
  starts = flash.segment_starts(jnp.asarray(seg))
  visited = sum(int(e) - int(f) for f, e in (
      flash.key_block_range(starts, window, q_lo=lo, q_hi=lo + 16, bk=8)
      for lo in range(0, t, 16)))
  assert visited < 2 + 4 + 6 + 8, visited  # the causal prefix of every block


@pytest.mark.parametrize("mesh_shape, q_spec, kv_spec", [
    ((2, 2, 2), P(("data", "fsdp"), None, "tensor", None),
     P(("data", "fsdp"), None, "tensor", None)),
    ((2, 1, 4), P("data", None, "tensor", None), P("data", None, None, None)),
])
def test_flash_attention_sharded_equals_one_device(mesh_shape, q_spec, kv_spec):
  """Rows split over data (and fsdp), query heads over tensor (KV heads too where they
  divide), a sliding window: the loss and q/k/v gradients, computed from arrays that are
  really sharded (their specs asserted), equal flash on one device and float64. A block's
  key range is a minimum over rows that live on other devices."""
  cfg = LLAMA.replace(head_dim=16)
  b, t, window = 4, 64, 24
  seg, pos = packed_rows(b, t, seed=31)
  q, k, v = qkv(b, t, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, seed=32)
  weight = jnp.asarray(np.random.default_rng(33).normal(size=q.shape),
                       jnp.float32) * (seg > 0)[..., None, None]
  attend = lambda q, k, v, pos, seg: flash.flash_attention(
      q, k, v, pos, seg, cfg=cfg, window=window, dtype=jnp.float32, bq=16, bk=8)
  loss = lambda q, k, v, pos, seg, w: jnp.sum(attend(q, k, v, pos, seg) * w)
  grad_fn = jax.value_and_grad(loss, argnums=(0, 1, 2))
  want_loss, want_grads = jax.jit(grad_fn)(q, k, v, pos, seg, weight)
  mesh = sharding.make_mesh(mesh_shape)
  put = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))
  rows = P(q_spec[0], None)
  args = (put(q, q_spec), put(k, kv_spec), put(v, kv_spec), put(jnp.asarray(pos), rows),
          put(jnp.asarray(seg), rows), put(weight, q_spec))
  assert args[0].sharding.spec == q_spec and len(args[0].addressable_shards) == 8
  assert args[0].addressable_shards[0].data.shape == (4 // mesh_shape[0] // mesh_shape[1],
                                                      t, 4 // mesh_shape[2], 16)
  with sharding.use_mesh(mesh):
    got_loss, got_grads = jax.jit(grad_fn, out_shardings=(
        NamedSharding(mesh, P()), tuple(NamedSharding(mesh, s)
                                        for s in (q_spec, kv_spec, kv_spec))))(*args)
  assert got_grads[0].sharding.spec == q_spec
  np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
  for name, got, want in zip("qkv", got_grads, want_grads, strict=True):
    np.testing.assert_allclose(got, want, atol=1e-5, err_msg=f"{mesh_shape} {name}")
  assert_equals_float64(jax.jit(attend)(q, k, v, pos, seg), want_loss, want_grads, q, k, v,
                        pos, seg, weight, cfg=cfg, window=window)


@pytest.mark.parametrize("case", ["gqa", "softcap_query_scale"])
def test_reference_attention_equals_its_previous_implementation(case, monkeypatch):
  """Against the implementation before issue 23.2 (bench/attention_profile.py keeps it), on
  every row, padding included: padding queries (no allowed key) average all of their
  block's values as before, and a loss weighting them too gets the same gradients (none to
  their logits, as jnp.where gave)."""
  c = REFERENCE_CASES[case]
  cfg, window = c["cfg"], c["window"]
  monkeypatch.setattr(T, "ATTN_BLOCK", 16)
  b, t = 2, 64
  seg, pos = packed_rows(b, t, seed=21)
  assert (seg == 0).any()
  q, k, v = qkv(b, t, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, seed=22)
  weight = jnp.asarray(np.random.default_rng(23).normal(size=q.shape), jnp.float32)
  results = {}
  for name, fn in (("current", T.reference_attention), ("previous", previous_attention)):
    attend = lambda q, k, v, fn=fn: fn(q, k, v, pos, seg, pos, seg, cfg=cfg, window=window,
                                       dtype=jnp.float32, recompute=c.get("recompute", False))
    results[name] = (jax.jit(attend)(q, k, v), *attention_value_and_grad(attend, q, k, v, weight))
  (got_out, got_loss, got_grads), (want_out, want_loss, want_grads) = (
      results["current"], results["previous"])
  np.testing.assert_allclose(got_out, want_out, atol=2e-6)
  np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
  for name, got, want in zip("qkv", got_grads, want_grads, strict=True):
    np.testing.assert_allclose(got, want, atol=1e-5, err_msg=name)


def test_splash_equals_reference_on_packed_gqa_rows_sharded():
  """Splash (interpret mode) on a (2,1,4) mesh: 4 query heads split over tensor 4 while
  the 2 KV heads stay whole (each query head gets its KV head's copy), rows over data,
  a sliding window of 40; loss and q/k/v gradients equal the reference on one device."""
  cfg = LLAMA.replace(head_dim=32, attention="splash_interpret")
  b, t, window = 2, 128, 40
  seg, pos = packed_rows(b, t)
  q, k, v = qkv(b, t, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim)
  weight = jnp.asarray(np.random.default_rng(1).normal(size=q.shape)) * (seg > 0)[..., None, None]
  ref = lambda q, k, v: T.reference_attention(q, k, v, pos, seg, pos, seg, cfg=cfg, window=window,
                                              dtype=jnp.float32)
  want_loss, want_grads = attention_value_and_grad(ref, q, k, v, weight)
  mesh = sharding.make_mesh((2, 1, 4))
  with sharding.use_mesh(mesh):
    got_loss, got_grads = attention_value_and_grad(
        lambda q, k, v: attention.attend(q, k, v, jnp.asarray(seg), cfg=cfg, window=window),
        q, k, v, weight)
  np.testing.assert_allclose(got_loss, want_loss, rtol=1e-4)  # a sum of ~10⁴ terms
  for name, got, want in zip("qkv", got_grads, want_grads, strict=True):
    np.testing.assert_allclose(got, want, atol=2e-5, err_msg=name)
  # the window matters here: the full-causal reference differs
  full = lambda q, k, v: T.reference_attention(q, k, v, pos, seg, pos, seg, cfg=cfg, window=None,
                                               dtype=jnp.float32)
  assert abs(float(attention_value_and_grad(full, q, k, v, weight)[0] - want_loss)) > 1e-2


GEMMA2_W = GEMMA2.replace(head_dim=32, sliding_window=40)  # layer 0 sliding, layer 1 full


def hidden_loss(cfg, params, ids, seg, pos, weight):
  h, _, _ = T.features(cfg, params, ids, positions_bt=pos, segment_ids_bt=seg)
  return jnp.sum(h * weight)


@pytest.mark.slow
def test_scanned_gemma2_with_splash_equals_the_reference_model():
  """A scanned Gemma 2 with splash: soft-capped logits, a sliding and a full layer (the
  kernel picks the window per scanned layer, both variants compiled), packed rows with
  padding; loss and every parameter gradient equal the unrolled reference model's."""
  assert_scanned_kernel_equals_the_reference_model("splash_interpret", seed=2, tol=1e-4)


def assert_scanned_kernel_equals_the_reference_model(kernel: str, *, seed: int, tol: float):
  """The scanned GEMMA2_W with model.attention=kernel against the unrolled reference model
  on packed rows of 128 with padding: the loss of a weighted sum of hidden states and every
  parameter gradient."""
  b, t = 2, 128
  seg, pos = packed_rows(b, t, seed=seed)
  ids = jnp.asarray(np.random.default_rng(3).integers(0, GEMMA2_W.vocab_size, (b, t)))
  weight = jnp.asarray(np.random.default_rng(4).normal(
      size=(b, t, GEMMA2_W.hidden_size)), jnp.float32) * (seg > 0)[..., None]
  params = random_params(GEMMA2_W)
  want_loss, want_grads = jax.jit(jax.value_and_grad(
      lambda p: hidden_loss(GEMMA2_W, p, ids, seg, pos, weight)))(params)
  cfg = GEMMA2_W.replace(attention=kernel)
  got_loss, got_grads = jax.jit(jax.value_and_grad(
      lambda p: hidden_loss(cfg, p, ids, seg, pos, weight)))(T.stack_layers(params))
  np.testing.assert_allclose(got_loss, want_loss, rtol=tol)
  assert_trees_close(T.unstack_layers(got_grads), want_grads, tol=tol)


def test_cudnn_call_equals_reference_through_xla():
  """The cuDNN path's jax.nn.dot_product_attention call (segment mask, causal, window as
  local_window_size, scale, GQA grouping), run with implementation="xla" since cuDNN
  cannot run on CPU: equal to the reference at every non-padding position, gradients too."""
  cfg = LLAMA.replace(head_dim=16, query_scale=0.3)
  b, t, window = 2, 64, 24
  seg, pos = packed_rows(b, t, seed=5)
  q, k, v = qkv(b, t, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, seed=6)
  weight = jnp.asarray(np.random.default_rng(7).normal(size=q.shape)) * (seg > 0)[..., None, None]
  for win in (None, window):
    want = attention_value_and_grad(
        lambda q, k, v, win=win: T.reference_attention(q, k, v, pos, seg, pos, seg, cfg=cfg,
                                                       window=win, dtype=jnp.float32),
        q, k, v, weight)
    got = attention_value_and_grad(
        lambda q, k, v, win=win: attention.cudnn_attention(q, k, v, jnp.asarray(seg), cfg=cfg,
                                                           window=win, implementation="xla"),
        q, k, v, weight)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-4)
    for g, w in zip(got[1], want[1], strict=True):
      np.testing.assert_allclose(g, w, atol=1e-5)


@pytest.mark.parametrize("impl, cfg, dtype, platform, seq_len, match", [
    ("flash2", LLAMA, "bfloat16", "tpu", 512, "unknown attention 'flash2'"),
    ("splash", LLAMA, "float32", "cpu", 512, "TPU .*splash_interpret"),
    ("splash", LLAMA, "bfloat16", "tpu", 500, "multiple"),
    ("cudnn", LLAMA, "bfloat16", "cpu", 512, "NVIDIA GPUs only"),
    ("cudnn", LLAMA, "float32", "gpu", 512, "model.dtype=bfloat16"),
    ("cudnn", GEMMA2, "bfloat16", "gpu", 512, "soft-capping"),
    ("cudnn", LLAMA.replace(head_dim=12), "bfloat16", "cuda", 512, "multiple of 8"),
])
def test_kernels_refuse_what_they_cannot_run(impl, cfg, dtype, platform, seq_len, match):
  with pytest.raises(ValueError, match=match):
    attention.check(cfg, implementation=impl, dtype=jnp.dtype(dtype), platform=platform,
                    seq_len=seq_len)


@pytest.mark.parametrize("impl, cfg, dtype, platform", [
    ("reference", GEMMA2, "float32", "cpu"), ("flash", GEMMA2, "float32", "cpu"),
    ("flash", LLAMA, "bfloat16", "gpu"), ("splash", GEMMA2, "bfloat16", "tpu"),
    ("splash_interpret", LLAMA, "float32", "cpu"), ("cudnn", LLAMA, "bfloat16", "gpu"),
    ("cudnn", LLAMA.replace(sliding_window=64), "float16", "cuda"),
])
def test_kernels_accept_what_they_run(impl, cfg, dtype, platform):
  attention.check(cfg, implementation=impl, dtype=jnp.dtype(dtype), platform=platform,
                  seq_len=4096)


def test_splash_refuses_a_split_sequence():
  cfg = LLAMA.replace(attention="splash_interpret")
  q, k, v = qkv(2, 128, 4, 2, 8)
  mesh = sharding.make_mesh((2, 2, 2))
  rules = (*sharding.DEFAULT_RULES[:1], ("length", "fsdp"), *sharding.DEFAULT_RULES[2:])
  with sharding.use_mesh(mesh, rules), pytest.raises(ValueError, match="'length'"):
    jax.eval_shape(lambda q, k, v: attention.attend(q, k, v, jnp.ones((2, 128), jnp.int32),
                                                    cfg=cfg, window=None), q, k, v)


def test_decoding_with_a_kernel_configured_uses_the_reference():
  """KV-cache decoding never reaches a kernel: a model configured with the TPU-only
  splash kernel still lowers its cached forward for CPU (a Mosaic kernel would not)."""
  cfg = LLAMA.replace(attention="splash")
  params = jax.eval_shape(lambda: T.init_params(cfg, jax.random.key(0)))
  ids = jnp.zeros((1, 6), jnp.int32)
  step = jax.jit(lambda p, c, i: T.Transformer(cfg).apply({"params": p}, ids, cache=c,
                                                          cache_index=i))
  step.trace(params, T.init_cache(cfg, 1, 8), 0).lower(lowering_platforms=("cpu",))
  long_ids = jnp.zeros((1, 128), jnp.int32)
  with pytest.raises(Exception, match="interpret mode"):  # the training forward would
    jax.jit(lambda p: T.Transformer(cfg).apply({"params": p}, long_ids)).trace(params).lower(
        lowering_platforms=("cpu",))


def test_scanned_gemma2_with_flash_equals_the_reference_model(monkeypatch):
  """A scanned Gemma 2 with model.attention=flash (query blocks of 32, key blocks of 16, so
  key ranges skip blocks): soft-capped logits, a sliding and a full layer (the window a
  traced per-layer scalar), packed rows with padding; loss and every parameter gradient
  equal the unrolled reference model's."""
  monkeypatch.setattr(flash, "BQ", 32)
  monkeypatch.setattr(flash, "BK", 16)
  # rows of seed 5 visit 16 of the causal prefix's 20 key blocks
  assert_scanned_kernel_equals_the_reference_model("flash", seed=5, tol=1e-5)
