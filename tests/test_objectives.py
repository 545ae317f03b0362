"""Objectives: selection by name, span weights, curriculum term, global counts, PCGrad."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from sad_jax.common.types import SpanKind
from sad_jax.distill import losses as L
from sad_jax.distill import objectives as O
from tests.test_losses import np_log_softmax, random_case, ref_divergence

K = SpanKind


def config(name, **kw):
  c = ml_collections.ConfigDict(dict(
      name=name, divergence="fkl", jsd_beta=0.5, temperature=1.0, tail="tail_bucket",
      label_smoothing=0.0, chunk_size=4, learnable_weights=False, weight_floor=0.05,
      curriculum_gamma=0.0, pcgrad=False))
  c.update(kw)
  return c


def toy(seed=0, B=3, T=8, V=19, D=6):
  c = random_case(seed, B=B, T=T, V=V, D=D)
  # every row has at least one reason target (with its teacher) and one action target
  c["kinds"][:, 0], c["kinds"][:, 1] = int(K.REASON), int(K.ACTION)
  t = c["teacher"]
  c["teacher"] = L.TeacherTopK(t.ids_btk, t.logp_btk, t.mask_bt.at[:, 0].set(True))
  rng = c["rng"]
  params = {"emb": jnp.asarray(rng.normal(size=(V, D)), jnp.float32),
            "w1": jnp.asarray(rng.normal(size=(D, D)) * 0.5, jnp.float32),
            "head": jnp.asarray(c["w"]), "bias": jnp.asarray(c["b"])}
  inputs = jnp.asarray(rng.integers(0, V, (B, T)))

  def features(p):
    return jnp.tanh(p["emb"][inputs] @ p["w1"]), p["head"], p["bias"]

  return c, params, features


def batch_kw(c, teacher=True):
  return dict(labels_bt=jnp.asarray(c["labels"]), label_kinds_bt=jnp.asarray(c["kinds"]),
              teacher=c["teacher"] if teacher else None)


@pytest.mark.parametrize("name, groups", [("sad", ("reason", "action")), ("token_kd", ("kd",)),
                                          ("sft", ("sft",))])
def test_objectives_by_name(name, groups):
  obj = O.build(config(name))
  assert obj.group_names == groups
  c, params, features = toy()
  (loss, metrics), (grads, _) = O.value_and_grad(
      obj, features, params, fixed_weights_g=jnp.ones(len(groups)), **batch_kw(c))
  assert np.isfinite(loss) and set(grads) == set(params)
  for g in groups:
    assert {f"{g}/loss", f"{g}/accuracy", f"{g}/tokens", f"{g}/weight"} <= set(metrics)
  with pytest.raises(ValueError, match="unknown objective"):
    O.build(config("distill"))


def test_sad_value_is_weighted_per_span_means():
  obj = O.build(config("sad", temperature=2.0))
  c, params, features = toy(1)
  h, w, b = features(params)
  loss, m = O.objective_loss(obj, h_btd=h, w_dv=w, b_v=b, fixed_weights_g=jnp.array([0.3, 2.0]),
                             **batch_kw(c))
  z = np.asarray(h @ w + b, np.float64)
  ids, logp, mask = (np.asarray(x) for x in (c["teacher"].ids_btk, c["teacher"].logp_btk,
                                              c["teacher"].mask_bt))
  r, a = [], []
  for i, t in np.ndindex(*c["labels"].shape):
    if c["kinds"][i, t] == K.REASON and mask[i, t]:
      r.append(ref_divergence(z[i, t], ids[i, t], logp[i, t], kind="fkl", tail="tail_bucket",
                              tau=2.0))
    elif c["kinds"][i, t] in (K.ACTION, K.ANSWER):
      a.append(-np_log_softmax(z[i, t])[c["labels"][i, t]])
  np.testing.assert_allclose(float(loss), 0.3 * np.mean(r) + 2.0 * np.mean(a), rtol=1e-5)
  assert float(m["reason/tokens"]) == len(r) and float(m["action/tokens"]) == len(a)


def test_zero_weight_span_does_not_change_the_gradient():
  obj = O.build(config("sad"))
  c, params, features = toy(2)
  kw = batch_kw(c)
  _, (g0, _) = O.value_and_grad(obj, features, params, fixed_weights_g=jnp.array([1.0, 0.0]),
                                **kw)
  # the same batch with the action targets turned into observations
  kinds = np.where(np.isin(c["kinds"], L.ACTION), int(K.OBSERVATION), c["kinds"])
  _, (g1, _) = O.value_and_grad(obj, features, params, fixed_weights_g=jnp.array([1.0, 1.0]),
                                **{**kw, "label_kinds_bt": jnp.asarray(kinds)})
  for k in params:
    np.testing.assert_allclose(g0[k], g1[k], rtol=1e-5, atol=1e-7)


def test_uncertainty_weights():
  obj = O.build(config("sad", learnable_weights=True, weight_floor=0.1))
  c, params, features = toy(3)
  signs = {}
  for s in ([0.0, 0.0], [3.0, -2.0], [50.0, 50.0]):
    s = jnp.asarray(s)
    (loss, m), (_, ds) = O.value_and_grad(obj, features, params, fixed_weights_g=None,
                                          span_params_g=s, **batch_kw(c))
    means = np.array([m["reason/loss"], m["action/loss"]])
    w = 0.1 + 0.5 * np.exp(-np.asarray(s))
    np.testing.assert_allclose([m["reason/weight"], m["action/weight"]], w, rtol=1e-6)
    assert (w >= 0.1).all()  # the floor: a weight never collapses to zero
    # d/ds [w(s)·L + ½s] = −½e^{−s}·L + ½
    want = -0.5 * np.exp(-np.asarray(s)) * means + 0.5
    np.testing.assert_allclose(ds, want, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(float(loss), np.sum(w * means) + 0.5 * np.sum(s), rtol=1e-5)
    signs[tuple(np.asarray(s).tolist())] = (np.sign(np.asarray(ds)), means)
  # Descent moves s against ds. At s = 0 both losses exceed 1 here, so ds < 0: s rises
  # and both weights fall (a hard span is down-weighted). At s = 50 the weights sit near
  # the floor, ds > 0: s falls and the weights rise again.
  sign0, means0 = signs[(0.0, 0.0)]
  assert (means0 > 1).all() and (sign0 < 0).all()
  assert (signs[(50.0, 50.0)][0] > 0).all()


def test_micro_batches_with_global_counts_sum_to_the_full_batch():
  obj = O.build(config("sad", curriculum_gamma=0.5))
  c, params, features = toy(4, B=4)
  ex_w = jnp.asarray([0.1, 1.0, 0.5, 0.0])
  kw = batch_kw(c)
  full_counts = O.counts(obj, label_kinds_bt=kw["label_kinds_bt"], teacher=kw["teacher"])
  member = np.isin(c["kinds"], L.GENERATED)
  norm = float(np.sum(member * np.asarray(ex_w)[:, None]))
  (loss, _), (grads, _) = O.value_and_grad(obj, features, params,
                                           fixed_weights_g=jnp.array([1.0, 0.5]),
                                           example_weight_b=ex_w, **kw)
  total, gsum = 0.0, jax.tree.map(jnp.zeros_like, params)
  for rows in (slice(0, 1), slice(1, 4)):
    c_mb, p_mb = dict(c), params
    sub = {"labels_bt": kw["labels_bt"][rows], "label_kinds_bt": kw["label_kinds_bt"][rows],
           "teacher": jax.tree.map(lambda a, r=rows: a[r], kw["teacher"])}
    del c_mb

    def feats(p, r=rows):
      h, w, b = features(p)
      return h[r], w, b

    (l_mb, _), (g_mb, _) = O.value_and_grad(
        obj, feats, p_mb, fixed_weights_g=jnp.array([1.0, 0.5]), counts_g=full_counts,
        example_weight_b=ex_w[rows], curriculum_norm=norm, **sub)
    total += float(l_mb)
    gsum = jax.tree.map(jnp.add, gsum, g_mb)
  np.testing.assert_allclose(total, float(loss), rtol=1e-5)
  for k in params:
    np.testing.assert_allclose(gsum[k], grads[k], rtol=1e-4, atol=1e-6)


def test_curriculum_term_value():
  obj = O.build(config("sft", curriculum_gamma=2.0))
  c, params, features = toy(5, B=2)
  h, w, b = features(params)
  ex_w = jnp.asarray([0.25, 1.0])
  loss, m = O.objective_loss(obj, h_btd=h, w_dv=w, b_v=b, fixed_weights_g=jnp.ones(1),
                             example_weight_b=ex_w, **batch_kw(c, teacher=False))
  z = np.asarray(h @ w + b, np.float64)
  nll = -np.take_along_axis(np_log_softmax(z), c["labels"][..., None], -1)[..., 0]
  member = np.isin(c["kinds"], L.GENERATED)
  cw = member * np.asarray(ex_w)[:, None]
  curr = np.sum(cw * nll) / np.sum(cw)
  np.testing.assert_allclose(float(m["curriculum/loss"]), curr, rtol=1e-5)
  np.testing.assert_allclose(float(loss), nll[member].mean() + 2.0 * curr, rtol=1e-5)


def test_pcgrad_projection_rule():
  a = {"x": jnp.array([1.0, 0.0]), "y": jnp.array([0.0])}
  b = {"x": jnp.array([1.0, 1.0]), "y": jnp.array([0.0])}
  out, cos = O.pcgrad(a, b)  # no conflict: plain sum
  np.testing.assert_allclose(out["x"], [2.0, 1.0])
  assert float(cos) > 0
  b = {"x": jnp.array([-1.0, 1.0]), "y": jnp.array([0.5])}
  out, cos = O.pcgrad(a, b)
  ga, gb = np.array([1.0, 0.0, 0.0]), np.array([-1.0, 1.0, 0.5])
  pa = ga - ga @ gb / (gb @ gb) * gb
  pb = gb - gb @ ga / (ga @ ga) * ga
  np.testing.assert_allclose(np.concatenate([out["x"], out["y"]]), pa + pb, rtol=1e-6)
  assert abs(pa @ gb) < 1e-6 and abs(pb @ ga) < 1e-6 and float(cos) < 0


def test_pcgrad_value_and_grad_matches_manual():
  obj = O.build(config("sad", pcgrad=True, learnable_weights=True))
  plain = O.build(config("sad", learnable_weights=True))
  c, params, features = toy(6)
  s = jnp.asarray([0.2, -0.1])
  kw = batch_kw(c)
  (loss_p, m_p), (g_p, ds_p) = O.value_and_grad(obj, features, params, fixed_weights_g=None,
                                                span_params_g=s, **kw)
  (loss, m), (_, ds) = O.value_and_grad(plain, features, params, fixed_weights_g=None,
                                        span_params_g=s, **kw)
  np.testing.assert_allclose(float(loss_p), float(loss), rtol=1e-5)
  np.testing.assert_allclose(ds_p, ds, rtol=1e-5)
  w = 0.05 + 0.5 * np.exp(-np.asarray(s))
  per = []
  for i, kinds in enumerate((L.REASON, L.ACTION)):
    keep = np.where(np.isin(c["kinds"], kinds), c["kinds"], int(K.OBSERVATION))
    fixed = jnp.asarray(w * (np.arange(2) == i))
    n = float(m[["reason/tokens", "action/tokens"][i]])
    one = O.build(config("sad"))

    def f(p, keep=keep, fixed=fixed, n=n, one=one):
      h, hw, hb = features(p)
      return O.objective_loss(one, h_btd=h, w_dv=hw, b_v=hb, fixed_weights_g=fixed,
                              counts_g=jnp.asarray([n, n]), labels_bt=kw["labels_bt"],
                              label_kinds_bt=jnp.asarray(keep), teacher=kw["teacher"])[0]
    per.append(jax.grad(f)(params))
  want, _ = O.pcgrad(per[0], per[1])
  for k in params:
    np.testing.assert_allclose(g_p[k], want[k], rtol=1e-4, atol=1e-6)
  assert "pcgrad/cosine" in m_p


@pytest.mark.parametrize("name, kw", [
    ("sad", dict(pcgrad=True, learnable_weights=True, curriculum_gamma=0.5)),
    ("sft", dict(label_smoothing=0.1, action_teacher_weight=0.3, tail="ignore")),
])
def test_compact_head_equals_the_full_head(name, kw):
  """Loss, metrics and every gradient (model and span weights) of the compact head equal
  those of the full-logits head: sad with pcgrad, learnable weights and the curriculum
  term, and the cross-entropy path with smoothing and teacher soft targets (token_kd's
  group takes the divergence path of sad's reason group, over more kinds)."""
  c, params, features = toy(9, B=3, T=40)
  ex_w = jnp.asarray([0.2, 1.0, 0.6])
  span = jnp.asarray([0.3, -0.2]) if kw.get("learnable_weights") else None
  out = {}
  for compact, chunked in ((True, True), (False, False)):
    obj = O.build(config(name, chunk_size=8, compact_head=compact, chunked=chunked, **kw))
    fixed = jnp.asarray([0.8, 1.2][:len(obj.groups)])
    out[compact] = jax.jit(lambda p, s, obj=obj, fixed=fixed: O.value_and_grad(
        obj, features, p, fixed_weights_g=fixed, span_params_g=s, example_weight_b=ex_w,
        **batch_kw(c)))(params, span)
  (loss_c, m_c), (g_c, s_c) = out[True]
  (loss_n, m_n), (g_n, s_n) = out[False]
  np.testing.assert_allclose(loss_c, loss_n, rtol=1e-5)
  for k in m_n:
    np.testing.assert_allclose(m_c[k], m_n[k], rtol=1e-5, atol=1e-6, err_msg=k)
  for k in params:
    np.testing.assert_allclose(g_c[k], g_n[k], rtol=1e-4, atol=1e-6, err_msg=k)
  if span is not None:
    np.testing.assert_allclose(s_c, s_n, rtol=1e-5, atol=1e-6)


def test_shape_errors_before_compute():
  obj = O.build(config("sad"))
  c, params, features = toy(7)
  h, w, b = features(params)
  with pytest.raises(ValueError, match="do not fit"):
    O.objective_loss(obj, h_btd=h, w_dv=w[:-1], b_v=b, fixed_weights_g=jnp.ones(2),
                     **batch_kw(c))
  with pytest.raises(ValueError, match="do not match"):
    O.objective_loss(obj, h_btd=h, w_dv=w, b_v=b, fixed_weights_g=jnp.ones(2),
                     **{**batch_kw(c), "labels_bt": jnp.asarray(c["labels"][:, :-1])})
  with pytest.raises(ValueError, match="needs teacher"):
    O.objective_loss(obj, h_btd=h, w_dv=w, b_v=b, fixed_weights_g=jnp.ones(2),
                     **batch_kw(c, teacher=False))
  t = c["teacher"]
  with pytest.raises(ValueError, match="teacher ids"):
    O.objective_loss(obj, h_btd=h, w_dv=w, b_v=b, fixed_weights_g=jnp.ones(2),
                     **{**batch_kw(c), "teacher": L.TeacherTopK(t.ids_btk[:, :-1],
                                                                t.logp_btk[:, :-1], t.mask_bt)})
  with pytest.raises(ValueError, match="pcgrad needs two"):
    O.build(config("sft", pcgrad=True))
