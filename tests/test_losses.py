"""Span losses against float64 NumPy references, and the chunked head against the naive one."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sad_jax.common.errors import DataError
from sad_jax.common.types import SpanKind
from sad_jax.distill import losses as L
from tests import helpers

K = SpanKind
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAD = (L.Group("reason", L.REASON, "divergence", needs_teacher=True),
       L.Group("action", L.ACTION, "ce"))


# ----------------------------------------------------------------------------- references


def np_log_softmax(z):
  z = np.asarray(z, np.float64)
  m = z.max(-1, keepdims=True)
  return z - m - np.log(np.exp(z - m).sum(-1, keepdims=True))


def kl(p, q):
  """Σ p log(p/q) in probability space, 0 log 0 = 0."""
  p, q = np.asarray(p, np.float64), np.asarray(q, np.float64)
  nz = p > 0
  return float(np.sum(p[nz] * np.log(p[nz] / q[nz])))


def ref_divergence(z_v, ids_k, logp_k, *, kind, tail, beta=0.5, tau=1.0):
  """One token, from the definitions in losses.py's docstring."""
  q = np.exp(np_log_softmax(np.asarray(z_v, np.float64) / tau))
  p_top = np.exp(np.asarray(logp_k, np.float64))
  q_top = q[ids_k]
  if tail == "tail_bucket":
    P = np.append(p_top, max(1 - p_top.sum(), 0.0))
    Q = np.append(q_top, max(1 - q_top.sum(), 0.0))
  elif kind == "fkl":
    P = p_top / p_top.sum()
    Q = q_top  # against the full student distribution
  else:
    P, Q = p_top / p_top.sum(), q_top / q_top.sum()
  if kind == "fkl":
    d = kl(P, Q)
  elif kind == "rkl":
    d = kl(Q, P)
  else:
    M = beta * P + (1 - beta) * Q
    d = beta * kl(P, M) + (1 - beta) * kl(Q, M)
  return tau ** 2 * d


def random_case(seed, *, B=2, T=6, V=23, k=5, D=7, teacher_frac=0.8):
  rng = np.random.default_rng(seed)
  t_logits = rng.normal(size=(B, T, V)) * 2
  t_logp = np_log_softmax(t_logits)
  ids = np.argsort(-t_logp, axis=-1)[..., :k]
  return {
      "rng": rng,
      "h": rng.normal(size=(B, T, D)).astype(np.float32),
      "w": rng.normal(size=(D, V)).astype(np.float32) * 0.5,
      "b": rng.normal(size=(V,)).astype(np.float32) * 0.1,
      "labels": rng.integers(0, V, (B, T)).astype(np.int32),
      "kinds": rng.integers(0, 7, (B, T)).astype(np.int32),
      "t_full": t_logp,
      "teacher": L.TeacherTopK(jnp.asarray(ids, jnp.int32),
                               jnp.asarray(np.take_along_axis(t_logp, ids, -1), jnp.float32),
                               jnp.asarray(rng.random((B, T)) < teacher_frac)),
  }


def case_seed(kind: str, tail: str, tau: float) -> int:
  return helpers.seed_of(kind, tail, tau)


def test_case_seeds_do_not_depend_on_the_hash_seed():
  """Two interpreters with different PYTHONHASHSEED draw the same cases as this one."""
  code = "from tests.test_losses import case_seed; print(case_seed('jsd', 'ignore', 2.0))"
  got = {subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                        cwd=REPO, env={**os.environ, "PYTHONHASHSEED": h}).stdout.strip()
         for h in ("1", "2")}
  assert got == {str(case_seed("jsd", "ignore", 2.0))}


# ----------------------------------------------------------------------------- divergences


@pytest.mark.parametrize("kind", L.DIVERGENCES)
@pytest.mark.parametrize("tail", L.TAIL_RULES)
@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_divergence_matches_numpy(kind, tail, tau):
  c = random_case(case_seed(kind, tail, tau))
  z = np.einsum("btd,dv->btv", c["h"], c["w"]) + c["b"]
  s = L.LossSettings(divergence=kind, tail=tail, temperature=tau, jsd_beta=0.3)
  out = L.logits_loss(jnp.asarray(z), labels_bt=c["labels"], label_kinds_bt=c["kinds"],
                      teacher=c["teacher"], groups=SAD, settings=s)
  ids, logp, mask = (np.asarray(x) for x in (c["teacher"].ids_btk, c["teacher"].logp_btk,
                                              c["teacher"].mask_bt))
  want_r = want_a = 0.0
  for b, t in np.ndindex(*c["labels"].shape):
    kind_t = c["kinds"][b, t]
    if kind_t == K.REASON and mask[b, t]:
      want_r += ref_divergence(z[b, t], ids[b, t], logp[b, t], kind=kind, tail=tail, beta=0.3,
                               tau=tau)
    if kind_t in (K.ACTION, K.ANSWER):
      want_a += -np_log_softmax(z[b, t])[c["labels"][b, t]]
  np.testing.assert_allclose(np.asarray(out["sums"]), [want_r, want_a], rtol=2e-5, atol=1e-5)


@pytest.mark.parametrize("kind", L.DIVERGENCES)
@pytest.mark.parametrize("tail", L.TAIL_RULES)
def test_topk_with_k_equal_v_is_the_full_divergence(kind, tail):
  V = 17
  c = random_case(7, V=V, k=V)
  z = jnp.asarray(np.einsum("btd,dv->btv", c["h"], c["w"]))
  kinds = np.full(c["labels"].shape, int(K.REASON), np.int32)
  teacher = L.TeacherTopK(c["teacher"].ids_btk, c["teacher"].logp_btk,
                          jnp.ones(kinds.shape, bool))
  s = L.LossSettings(divergence=kind, tail=tail)
  got = L.logits_loss(z, labels_bt=c["labels"], label_kinds_bt=kinds, teacher=teacher,
                      groups=SAD, settings=s)["sums"][0]
  p, q = np.exp(c["t_full"]), np.exp(np_log_softmax(np.asarray(z)))
  want = 0.0
  for b, t in np.ndindex(*kinds.shape):
    if kind == "fkl":
      want += kl(p[b, t], q[b, t])
    elif kind == "rkl":
      want += kl(q[b, t], p[b, t])
    else:
      m = 0.5 * p[b, t] + 0.5 * q[b, t]
      want += 0.5 * kl(p[b, t], m) + 0.5 * kl(q[b, t], m)
  np.testing.assert_allclose(float(got), want, rtol=1e-4, atol=1e-5)


def test_ce_label_smoothing_padding_and_softcap():
  c = random_case(3, V=12)
  z = np.einsum("btd,dv->btv", c["h"], c["w"]) * 4
  kinds = np.full(c["labels"].shape, int(K.ACTION), np.int32)
  labels = c["labels"] % 9  # real vocabulary 9, columns 9..11 are padding
  s = L.LossSettings(label_smoothing=0.1, vocab_size=9, softcap=5.0)
  got = L.logits_loss(jnp.asarray(z), labels_bt=labels, label_kinds_bt=kinds, teacher=None,
                      groups=(L.Group("action", L.ACTION, "ce"),), settings=s)["sums"][0]
  zc = 5.0 * np.tanh(z[..., :9] / 5.0)
  logq = np_log_softmax(zc)
  nll = -np.take_along_axis(logq, labels[..., None], -1)[..., 0]
  want = np.sum(0.9 * nll + 0.1 * -logq.mean(-1))
  np.testing.assert_allclose(float(got), want, rtol=1e-5)


def test_action_teacher_soft_targets():
  c = random_case(4)
  z = jnp.asarray(np.einsum("btd,dv->btv", c["h"], c["w"]))
  kinds = np.full(c["labels"].shape, int(K.ACTION), np.int32)
  s0, s1 = L.LossSettings(), L.LossSettings(action_teacher_weight=0.25)
  groups = (L.Group("action", L.ACTION, "ce"),)
  ce = L.logits_loss(z, labels_bt=c["labels"], label_kinds_bt=kinds, teacher=None,
                     groups=groups, settings=s0)["sums"][0]
  mixed = L.logits_loss(z, labels_bt=c["labels"], label_kinds_bt=kinds, teacher=c["teacher"],
                        groups=groups, settings=s1)["sums"][0]
  ids, logp, mask = (np.asarray(x) for x in (c["teacher"].ids_btk, c["teacher"].logp_btk,
                                              c["teacher"].mask_bt))
  zz = np.asarray(z)
  want = 0.0
  for b, t in np.ndindex(*kinds.shape):
    nll = -np_log_softmax(zz[b, t])[c["labels"][b, t]]
    if mask[b, t]:
      want += 0.75 * nll + 0.25 * ref_divergence(zz[b, t], ids[b, t], logp[b, t], kind="fkl",
                                                  tail="tail_bucket")
    else:
      want += nll
  assert float(mixed) != pytest.approx(float(ce))
  np.testing.assert_allclose(float(mixed), want, rtol=1e-5)


# ----------------------------------------------------------------------------- chunked head


def head_fn(fn, c, settings, scale, row=None, bias=True):
  def f(h, w, b):
    return fn(h, w, b if bias else None, scale_g=scale, row_scale_bt=row,
              labels_bt=c["labels"], label_kinds_bt=c["kinds"], teacher=c["teacher"],
              groups=SAD, settings=settings)
  return f


# Chunk sizes that divide T, do not divide it, exceed it and equal 1; every divergence
# and tail rule; with and without bias and per-row scales.
CHUNK_CASES = [
    (0, 3, 12, "fkl", "tail_bucket", True, False),
    (1, 5, 12, "fkl", "ignore", False, True),
    (2, 4, 9, "rkl", "tail_bucket", True, True),
    (3, 1, 7, "rkl", "ignore", True, False),
    (4, 20, 6, "jsd", "tail_bucket", False, False),
    (5, 2, 11, "jsd", "ignore", True, True),
]


@pytest.mark.parametrize("seed, chunk, T, kind, tail, bias, row", CHUNK_CASES)
def test_chunked_equals_naive_values_and_grads(seed, chunk, T, kind, tail, bias, row):
  c = random_case(seed, T=T)
  s = L.LossSettings(divergence=kind, tail=tail, chunk_size=chunk, temperature=1.5,
                     label_smoothing=0.05)
  scale = jnp.array([0.7, 1.3])
  row_bt = jnp.asarray(c["rng"].random(c["labels"].shape), jnp.float32) if row else None
  args = (jnp.asarray(c["h"]), jnp.asarray(c["w"]), jnp.asarray(c["b"]))
  fc = head_fn(L.chunked_head_loss, c, s, scale, row_bt, bias)
  fn = head_fn(L.naive_head_loss, c, s, scale, row_bt, bias)
  oc, on = jax.jit(fc)(*args), jax.jit(fn)(*args)
  np.testing.assert_allclose(oc["total"], on["total"], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(oc["sums"], on["sums"], rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(oc["correct"], on["correct"])
  gc = jax.jit(jax.grad(lambda *a: fc(*a)["total"], argnums=(0, 1, 2)))(*args)
  gn = jax.jit(jax.grad(lambda *a: fn(*a)["total"], argnums=(0, 1, 2)))(*args)
  for x, y in zip(gc, gn):
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)


def test_chunked_head_under_jit_scales_by_cotangent():
  c = random_case(11, T=8)
  s = L.LossSettings(chunk_size=3)
  args = (jnp.asarray(c["h"]), jnp.asarray(c["w"]), jnp.asarray(c["b"]))
  f = head_fn(L.chunked_head_loss, c, s, jnp.array([1.0, 1.0]))
  g1 = jax.jit(jax.grad(lambda *a: f(*a)["total"]))(*args)
  g3 = jax.jit(jax.grad(lambda *a: 3.0 * f(*a)["total"]))(*args)
  np.testing.assert_allclose(g3, 3.0 * g1, rtol=1e-6)


def test_context_targets_do_not_matter():
  """Changing hidden states (hence logits) where the target is observation, task, system
  or padding changes neither the loss nor the head gradient; their own gradient is 0."""
  c = random_case(5, T=10)
  s = L.LossSettings(chunk_size=4)
  ctx = np.isin(c["kinds"], [K.OBSERVATION, K.TASK, K.SYSTEM, K.PAD])
  assert ctx.any() and (~ctx).any()
  h2 = c["h"] + np.where(ctx[..., None], c["rng"].normal(size=c["h"].shape) * 5, 0).astype(
      np.float32)
  for fn in (L.chunked_head_loss, L.naive_head_loss):
    f = head_fn(fn, c, s, jnp.array([1.0, 1.0]))
    g = jax.jit(jax.value_and_grad(lambda *a, f=f: f(*a)["total"], argnums=(0, 1, 2)))
    (v1, (dh1, dw1, db1)) = g(jnp.asarray(c["h"]), jnp.asarray(c["w"]), jnp.asarray(c["b"]))
    (v2, (_, dw2, db2)) = g(jnp.asarray(h2), jnp.asarray(c["w"]), jnp.asarray(c["b"]))
    np.testing.assert_allclose(v1, v2, rtol=1e-6)
    np.testing.assert_allclose(dw1, dw2, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(db1, db2, rtol=1e-5, atol=1e-6)
    assert float(jnp.abs(dh1[ctx]).max()) == 0.0


def test_filler_teacher_values_give_no_nan():
  """Absent-teacher positions may hold any filler (−inf, NaN, huge ids): masked out."""
  c = random_case(6)
  t = c["teacher"]
  absent = ~np.asarray(t.mask_bt)[..., None]
  bad = L.TeacherTopK(jnp.where(absent, 10**6, t.ids_btk) % 23,
                      jnp.where(absent, -jnp.inf, t.logp_btk), t.mask_bt)
  c["teacher"] = bad
  for kind in L.DIVERGENCES:
    f = head_fn(L.chunked_head_loss, c, L.LossSettings(divergence=kind, chunk_size=4),
                jnp.array([1.0, 1.0]))
    v, g = jax.jit(jax.value_and_grad(lambda *a, f=f: f(*a)["total"], argnums=(0, 1)))(
        jnp.asarray(c["h"]), jnp.asarray(c["w"]), jnp.asarray(c["b"]))
    assert np.isfinite(v) and all(np.isfinite(x).all() for x in g)


# ----------------------------------------------------------------------------- compact head


def edge_case(seed, T, need):
  """A random case whose fullest row has exactly `need` loss targets (sad groups)."""
  c = random_case(seed, T=T)
  rng = np.random.default_rng(seed)
  mask = np.array(c["teacher"].mask_bt)
  kinds = np.full((2, T), int(K.OBSERVATION), np.int32)
  for b, n in enumerate((need, need // 2)):
    pos = rng.choice(T, n, replace=False)
    kinds[b, pos] = rng.choice([K.REASON, K.ACTION, K.ANSWER], n)
    # a reason target without its teacher is in no group: give those the teacher
    mask[b, pos] |= kinds[b, pos] == K.REASON
  # context targets elsewhere: system, task, padding
  rest = kinds == K.OBSERVATION
  kinds[rest] = rng.choice([K.OBSERVATION, K.SYSTEM, K.TASK, K.PAD], rest.sum())
  c["kinds"] = kinds
  c["teacher"] = L.TeacherTopK(c["teacher"].ids_btk, c["teacher"].logp_btk, jnp.asarray(mask))
  return c


def ref_total(c, settings, scale, row):
  """Σ_t (scale[g(t)] + row[t])·loss_t in float64 from the definitions (sad groups)."""
  z = np.einsum("btd,dv->btv", c["h"].astype(np.float64), c["w"]) + c["b"]
  ids, logp, mask = (np.asarray(x) for x in (c["teacher"].ids_btk, c["teacher"].logp_btk,
                                              c["teacher"].mask_bt))
  total = 0.0
  for b, t in np.ndindex(*c["labels"].shape):
    kind = c["kinds"][b, t]
    if kind == K.REASON and mask[b, t]:
      g, loss = 0, ref_divergence(z[b, t], ids[b, t], logp[b, t], kind=settings.divergence,
                                  tail=settings.tail, tau=settings.temperature)
    elif kind in (K.ACTION, K.ANSWER):
      g, loss = 1, -np_log_softmax(z[b, t])[c["labels"][b, t]]
    else:
      continue
    total += (float(scale[g]) + (0.0 if row is None else float(row[b, t]))) * loss
  return total


# (seed, T, chunk, need): the fullest row's targets filling its chunks exactly, one over
# (one more chunk), none at all, every position (a padded last chunk)
COMPACT_CASES = [
    (0, 40, 8, 16, "fkl", "tail_bucket"),
    (1, 40, 8, 17, "rkl", "ignore"),
    (2, 40, 8, 0, "jsd", "tail_bucket"),
    (3, 37, 8, 37, "fkl", "ignore"),
]


def compact_fn(c, s, scale, row):
  return head_fn(lambda *a, **k: L.chunked_head_loss(*a, compact=True, **k), c, s, scale, row)


def value_and_grads(f, args):
  return jax.jit(jax.value_and_grad(lambda *a: f(*a)["total"], argnums=(0, 1, 2)))(*args)


@pytest.mark.parametrize("seed, T, chunk, need, kind, tail", COMPACT_CASES)
def test_compact_head_equals_naive_and_float64(seed, T, chunk, need, kind, tail):
  c = edge_case(seed, T, need)
  s = L.LossSettings(divergence=kind, tail=tail, chunk_size=chunk, temperature=1.5)
  scale = jnp.array([0.7, 1.3])
  row_bt = jnp.asarray(c["rng"].random(c["labels"].shape), jnp.float32)
  args = (jnp.asarray(c["h"]), jnp.asarray(c["w"]), jnp.asarray(c["b"]))
  member = np.asarray(L.loss_positions(label_kinds_bt=c["kinds"], groups=SAD,
                                       teacher_mask_bt=c["teacher"].mask_bt))
  assert member.sum(1).max() == need
  fc, fn = compact_fn(c, s, scale, row_bt), head_fn(L.naive_head_loss, c, s, scale, row_bt)
  oc, on = jax.jit(fc)(*args), jax.jit(fn)(*args)
  np.testing.assert_allclose(oc["sums"], on["sums"], rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(oc["correct"], on["correct"])
  (vc, gc), (vn, gn) = value_and_grads(fc, args), value_and_grads(fn, args)
  np.testing.assert_allclose(vc, vn, rtol=1e-5, atol=1e-5)
  if kind == "fkl":
    np.testing.assert_allclose(float(vc), ref_total(c, s, scale, row_bt), rtol=1e-5, atol=1e-6)
  for x, y in zip(gc, gn):
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)
  # the hidden-state gradient is exactly 0 off the loss positions, and not 0 on them
  dh = np.asarray(gc[0])
  assert np.abs(dh[~member]).max() == 0.0
  if need:
    assert (np.abs(dh[member]).max(-1) > 0).all()


def test_compact_head_never_computes_the_other_positions():
  """Hidden states that are NaN off the loss positions: the full chunked head's gradient
  turns NaN (it computes the head there and multiplies its NaN softmax by 0), the compact
  head's stays finite and equals the result with those states zeroed, because its chunk
  loop stops after the targets (both rows here hold exactly 2 chunks of them)."""
  c = edge_case(8, 48, 16)
  kinds = c["kinds"]
  member = np.array(L.loss_positions(label_kinds_bt=kinds, groups=SAD,
                                      teacher_mask_bt=c["teacher"].mask_bt))
  # give row 1 as many targets as row 0 (16 = 2 chunks of 8)
  extra = np.flatnonzero(~member[1])[:16 - member[1].sum()]
  kinds[1, extra] = int(K.ACTION)
  member[1, extra] = True
  assert (member.sum(1) == 16).all()
  s = L.LossSettings(chunk_size=8)
  scale = jnp.array([1.0, 1.0])
  h_nan = np.where(member[..., None], c["h"], np.nan).astype(np.float32)
  h_zero = np.where(member[..., None], c["h"], 0.0).astype(np.float32)
  w, b = jnp.asarray(c["w"]), jnp.asarray(c["b"])
  v, g = value_and_grads(compact_fn(c, s, scale, None), (jnp.asarray(h_nan), w, b))
  v0, g0 = value_and_grads(head_fn(L.naive_head_loss, c, s, scale), (jnp.asarray(h_zero), w, b))
  np.testing.assert_allclose(v, v0, rtol=1e-5)
  for x, y in zip(g, g0):
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)
  _, g_full = value_and_grads(head_fn(L.chunked_head_loss, c, s, scale),
                              (jnp.asarray(h_nan), w, b))
  assert not np.isfinite(np.asarray(g_full[1])).all()


# ----------------------------------------------------------------------------- targets, counts


def test_shift_targets_packing_and_padding():
  ids = jnp.array([[5, 6, 7, 8, 9, 1, 0, 0]])
  kinds = jnp.array([[2, 3, 4, 2, 3, 4, 0, 0]])
  seg = jnp.array([[1, 1, 1, 2, 2, 2, 0, 0]])  # two packed trajectories, then padding
  out = L.shift_targets(ids, kinds, seg)
  np.testing.assert_array_equal(out["labels_bt"], [[6, 7, 8, 9, 1, 0, 0]])
  # the target across the boundary (7→8) and targets onto padding get PAD
  np.testing.assert_array_equal(out["label_kinds_bt"], [[3, 4, 0, 3, 4, 0, 0]])
  counts = L.group_counts(label_kinds_bt=out["label_kinds_bt"],
                          teacher_mask_bt=jnp.ones((1, 7), bool), groups=SAD)
  np.testing.assert_array_equal(counts, [2, 2])


# ----------------------------------------------------------------------------- bad input


def test_check_teacher_errors():
  good = {"ids_btk": np.zeros((2, 3, 4), np.int32), "logp_btk": np.full((2, 3, 4), -1.5),
          "mask_bt": np.ones((2, 3), bool)}
  L.check_teacher(good, batch_shape=(2, 3), vocab_size=10, k=4)
  cases = [
      ({"ids_btk": np.zeros((2, 3, 5), np.int32)}, "equal"),
      ({"mask_bt": np.ones((2, 4), bool)}, "batch is"),
      ({"ids_btk": np.full((2, 3, 4), 10, np.int32)}, "outside the vocabulary"),
      ({"logp_btk": np.where(np.arange(4) == 2, np.nan, -1.0) * np.ones((2, 3, 1))},
       "non-finite"),
      ({"logp_btk": np.full((2, 3, 4), 0.5)}, "<= 0"),
  ]
  for change, msg in cases:
    with pytest.raises(DataError, match=msg):
      L.check_teacher({**good, **change}, batch_shape=(2, 3), vocab_size=10,
                      k=4 if "ids_btk" not in change or change["ids_btk"].shape[-1] == 4
                      else None, where="store.arrayrecord")
  with pytest.raises(DataError, match="k is 4, expected 8"):
    L.check_teacher(good, batch_shape=(2, 3), vocab_size=10, k=8)
  # a bad id where the teacher is absent is fine (filler)
  L.check_teacher({**good, "ids_btk": np.full((2, 3, 4), 99, np.int32),
                   "mask_bt": np.zeros((2, 3), bool)}, batch_shape=(2, 3), vocab_size=10)


def test_settings_validation():
  for bad in ({"divergence": "tvd"}, {"tail": "drop"}, {"divergence": "jsd", "jsd_beta": 1.0},
              {"temperature": 0.0}, {"label_smoothing": 1.0}):
    with pytest.raises(ValueError):
      L.LossSettings(**bad)
