"""On-policy losses against exact references: a tabular two-state environment whose every
trajectory is enumerated, in float64."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sad_jax.common.types import SpanKind
from sad_jax.distill import onpolicy

A, O, R = int(SpanKind.ACTION), int(SpanKind.OBSERVATION), int(SpanKind.REASON)
# two states; three tokens; a turn is one token; the next state depends on it, randomly
TRANSITION = np.array([[[0.7, 0.3], [0.2, 0.8], [0.5, 0.5]],
                       [[0.1, 0.9], [0.6, 0.4], [1.0, 0.0]]])   # [s, y, s']
TEACHER = np.log(np.array([[0.6, 0.3, 0.1], [0.2, 0.2, 0.6]]))
S0 = 0


def _trajectories():
  """Every (s0, y0, s1, y1) with its probability factor from the environment."""
  for y0, s1, y1 in itertools.product(range(3), range(2), range(3)):
    yield (S0, y0, s1, y1), TRANSITION[S0, y0, s1]


def _rows(theta, obs_param, kinds=(O, A, O, A), mine=(False, True, False, True)):
  """Episode rows of all trajectories and the student's log-probs [N, 3, 3]: position t
  predicts token t+1; position 1 predicts the observation (its logits: obs_param)."""
  trajs = list(_trajectories())
  ids = np.array([t for t, _ in trajs], np.int32)
  lp_s = jax.nn.log_softmax(theta, axis=-1)        # [2, 3]
  lp_obs = jax.nn.log_softmax(obs_param, axis=-1)  # [3]
  student = jnp.stack([jnp.stack([lp_s[t[0]], lp_obs, lp_s[t[2]]]) for t, _ in trajs])
  batch = {"ids": jnp.asarray(ids), "kinds": jnp.asarray(np.tile(kinds, (len(ids), 1))),
           "mine": jnp.asarray(np.tile(mine, (len(ids), 1))),
           "positions": jnp.tile(jnp.arange(4), (len(ids), 1)),
           "segment_ids": jnp.ones((len(ids), 4), jnp.int32)}
  return ids, student, batch, np.array([p for _, p in trajs])


def _prob(theta, ids, env_p):
  lp = jax.nn.log_softmax(theta, axis=-1)
  return jnp.exp(lp[ids[:, 0], ids[:, 1]] + lp[ids[:, 2], ids[:, 3]]) * env_p


def _expected_grad(theta, obs_param, s: onpolicy.OPDSettings, **kw):
  """Σ_τ P_θ(τ)·∇ surrogate(τ) at θ_old = θ: the expected on-policy gradient."""
  ids, _student, batch, env_p = _rows(theta, obs_param, **kw)
  weight = _prob(theta, ids, env_p)

  def surrogate(th, ph):
    _, st, _, _ = _rows(th, ph, **kw)
    t = onpolicy.targets(batch)
    new = jnp.take_along_axis(st, t["labels_bt"][..., None], axis=-1)[..., 0]
    old = jax.lax.stop_gradient(new)
    teacher = jnp.asarray(TEACHER)[ids[:, [0, 1, 2]], ids[:, [1, 2, 3]]]
    adv, _ = onpolicy.advantages(old_logp_bt=old, teacher_logp_bt=teacher,
                                 mask_bt=t["sampled_mask_bt"],
                                 label_kinds_bt=t["label_kinds_bt"], s=s)
    per_row = jnp.sum(jnp.where(t["sampled_mask_bt"], onpolicy.span_weight(
        t["label_kinds_bt"], s) * _surr(new, old, adv, s), 0.0), axis=1)
    return jnp.sum(jax.lax.stop_gradient(weight) * per_row)
  return jax.grad(surrogate, argnums=(0, 1))(theta, obs_param)


def _surr(new, old, adv, s):
  # the per-token surrogate of onpolicy.sampled_loss, row by row
  ratio = jnp.exp(new - old)
  if s.clip_eps > 0:
    return -jnp.minimum(ratio * adv, jnp.clip(ratio, 1 - s.clip_eps, 1 + s.clip_eps) * adv)
  return -ratio * adv


def _sequence_rkl(theta):
  """Exact sequence-level reverse KL: Σ_τ P_θ(τ) Σ_t (log πθ − log πT)."""
  ids, _, _, env_p = _rows(theta, jnp.zeros(3))
  lp = jax.nn.log_softmax(theta, axis=-1)
  r = (lp[ids[:, 0], ids[:, 1]] - TEACHER[ids[:, 0], ids[:, 1]]
       + lp[ids[:, 2], ids[:, 3]] - TEACHER[ids[:, 2], ids[:, 3]])
  return jnp.sum(_prob(theta, ids, env_p) * r)


def _per_state_kl(theta, theta_fixed):
  """Σ_t Σ_s d_t(s) KL(πθ(·|s) ‖ πT(·|s)), the state visits d_t of θ_fixed held still."""
  lp = jax.nn.log_softmax(theta, axis=-1)
  kl = jnp.sum(jnp.exp(lp) * (lp - TEACHER), axis=-1)          # [2]
  p0 = jax.nn.softmax(theta_fixed, axis=-1)[S0]                 # [3]
  d1 = jnp.einsum("y,ys->s", p0, jnp.asarray(TRANSITION[S0]))
  return kl[S0] + jnp.sum(d1 * kl)


@pytest.fixture
def x64():
  with jax.enable_x64(True):
    yield


@pytest.mark.parametrize("clip_eps", [0.0, 0.2])
def test_expected_gradient_is_the_sequence_reverse_kl_gradient(x64, clip_eps):
  theta = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3)))
  s = onpolicy.OPDSettings(discount=1.0, clip_eps=clip_eps, logp_floor=-1e9,
                           advantage_cap=1e9)
  g, g_obs = _expected_grad(theta, jnp.zeros(3), s)
  want = jax.grad(_sequence_rkl)(theta)
  np.testing.assert_allclose(np.asarray(g), np.asarray(want), rtol=1e-10, atol=1e-12)
  assert np.abs(np.asarray(want)).max() > 1e-2   # a real gradient, not zeros on both sides
  assert np.all(np.asarray(g_obs) == 0)


def test_per_token_advantage_gives_the_per_state_kl_gradient(x64):
  theta = jnp.asarray(np.random.default_rng(1).normal(size=(2, 3)))
  s = onpolicy.OPDSettings(discount=0.0, logp_floor=-1e9, advantage_cap=1e9)
  g, _ = _expected_grad(theta, jnp.zeros(3), s)
  want = jax.grad(_per_state_kl)(theta, jax.lax.stop_gradient(theta))
  np.testing.assert_allclose(np.asarray(g), np.asarray(want), rtol=1e-10, atol=1e-12)
  # and γ = 0 is not γ = 1: the two references differ here
  assert np.abs(np.asarray(want - jax.grad(_sequence_rkl)(theta))).max() > 1e-3


def test_span_weights_scale_reason_and_action_separately(x64):
  theta = jnp.asarray(np.random.default_rng(2).normal(size=(2, 3)))
  kinds = (O, R, O, A)   # the first turn's token is reasoning, the second's an action
  base = onpolicy.OPDSettings(discount=0.0, logp_floor=-1e9, advantage_cap=1e9)
  g1, _ = _expected_grad(theta, jnp.zeros(3), base, kinds=kinds)
  g_r, _ = _expected_grad(theta, jnp.zeros(3), onpolicy.OPDSettings(
      discount=0.0, logp_floor=-1e9, advantage_cap=1e9, action_weight=0.0), kinds=kinds)
  # action weight 0 leaves the first turn's (reason) part: the s0 row of the per-state KL
  want = jax.grad(lambda th: jnp.sum(jnp.exp(jax.nn.log_softmax(th)[S0]) * (
      jax.nn.log_softmax(th)[S0] - TEACHER[S0])))(theta)
  np.testing.assert_allclose(np.asarray(g_r), np.asarray(want), rtol=1e-10, atol=1e-12)
  assert not np.allclose(np.asarray(g1), np.asarray(g_r))


def test_observation_tokens_get_no_gradient_and_would_if_unmasked(x64):
  theta = jnp.asarray(np.random.default_rng(3).normal(size=(2, 3)))
  phi = jnp.asarray([0.3, -0.2, 0.1])
  s = onpolicy.OPDSettings(discount=1.0)
  _, g_obs = _expected_grad(theta, phi, s)
  assert np.all(np.asarray(g_obs) == 0)
  # the same computation with the observation marked as the student's own and as an
  # action: its logits now get a gradient, so the assertion above can fail
  _, g_leak = _expected_grad(theta, phi, s, kinds=(O, A, A, A), mine=(False, True, True, True))
  assert np.abs(np.asarray(g_leak)).max() > 1e-3


def test_student_equal_to_teacher_gives_zero_loss_and_gradient():
  theta = jnp.asarray(TEACHER, jnp.float32)
  ids, student, batch, _ = _rows(theta, jnp.zeros(3))
  t = onpolicy.targets(batch)
  new = jnp.take_along_axis(student, t["labels_bt"][..., None], axis=-1)[..., 0]
  batch = {**batch, "logp": jnp.pad(new, ((0, 0), (1, 0)))}
  scores = {"teacher_logp": jnp.asarray(TEACHER, jnp.float32)[ids[:, :3], ids[:, 1:]]}
  topk = jax.lax.top_k(student, 3)
  scores |= {"teacher_topk_logp": topk[0], "teacher_ids": topk[1]}
  s = onpolicy.OPDSettings(full_weight=1.0, divergence="rkl", discount=1.0)

  def loss(th):
    _, st, _, _ = _rows(th, jnp.zeros(3))
    return onpolicy.loss_and_metrics(st, batch, scores, s=s)

  (value, metrics), grad = jax.value_and_grad(loss, has_aux=True)(theta)
  assert abs(float(metrics["rkl"])) < 1e-6 and abs(float(metrics["full/loss"])) < 1e-6
  assert abs(float(value)) < 1e-6 and np.abs(np.asarray(grad)).max() < 1e-6
  # and a student that differs has both
  (value, metrics), grad = jax.value_and_grad(loss, has_aux=True)(theta + jnp.asarray(
      [[0.5, 0.0, 0.0], [0.0, 0.0, 0.5]]))
  assert float(metrics["full/loss"]) > 1e-3 and np.abs(np.asarray(grad)).max() > 1e-3


def test_returns_discount_over_targets_only():
  k = jnp.asarray([[1.0, 5.0, 2.0, 4.0]])
  mask = jnp.asarray([[True, False, True, True]])
  g = onpolicy.returns(k, mask, 0.5)
  # G_3 = 4, G_2 = 2 + 0.5·4 = 4, G_0 = 1 + 0.5·4 = 3 (position 1 skipped, 0 there)
  np.testing.assert_allclose(np.asarray(g), [[3.0, 0.0, 4.0, 4.0]])


def test_clip_floor_cap_and_reward():
  s = onpolicy.OPDSettings(clip_eps=0.2, logp_floor=-5.0, advantage_cap=3.0, reward=2.0,
                           invalid_penalty=1.0)
  old = jnp.asarray([[-1.0, -1.0, -1.0]])
  teacher = jnp.asarray([[-30.0, -1.5, -1.0]])
  kinds = jnp.asarray([[R, A, A]])
  mask = jnp.asarray([[True, True, True]])
  adv, k = onpolicy.advantages(old_logp_bt=old, teacher_logp_bt=teacher, mask_bt=mask,
                               label_kinds_bt=kinds, s=s,
                               reward_bt=jnp.asarray([[2.0, 2.0, 1.0]]))
  # floor: k_0 = −1 − (−5) = 4 → A = −4, capped at −3; action tokens add their reward
  np.testing.assert_allclose(np.asarray(k), [[4.0, 0.5, 0.0]])
  np.testing.assert_allclose(np.asarray(adv), [[-3.0, 1.5, 1.0]])
  # PPO: a ratio of 2 on a positive advantage counts as 1.2; on a negative one as 2
  new = old + jnp.log(2.0)
  total, n = onpolicy.sampled_loss(new, adv, old_logp_bt=old, mask_bt=mask,
                                   label_kinds_bt=kinds, s=s)
  assert int(n) == 3
  np.testing.assert_allclose(float(total), -(2.0 * -3.0) - 1.2 * 1.5 - 1.2 * 1.0, rtol=1e-6)


def test_per_span_normalises_each_span_by_its_own_count():
  values = jnp.asarray([[1.0, 2.0, 3.0, 10.0]])
  kinds = jnp.asarray([[R, R, R, A]])
  mask = jnp.asarray([[True, True, True, True]])
  flat = onpolicy.OPDSettings(reason_weight=1.0, action_weight=2.0)
  total, n = onpolicy.reduce(values, mask_bt=mask, label_kinds_bt=kinds, s=flat)
  assert float(total / n) == pytest.approx((1 + 2 + 3 + 2 * 10) / 4)
  split = onpolicy.OPDSettings(reason_weight=1.0, action_weight=2.0, per_span=True)
  total, n = onpolicy.reduce(values, mask_bt=mask, label_kinds_bt=kinds, s=split)
  assert float(total / n) == pytest.approx(2.0 + 2 * 10.0)


def test_guided_turns_are_targets_of_the_full_term_only_when_asked(x64):
  """A teacher-written action in the student's state (a guided turn) is not the student's
  sample: never a target of (a); with guided_targets a target of (b), whose value is then
  the mean reverse KL over both actions (by hand, top-k = the whole vocabulary)."""
  theta = jnp.asarray([[0.3, -0.2, 0.9], [1.1, 0.0, -0.4]])
  ids, student, batch, _ = _rows(theta, jnp.zeros(3))
  ids, student, batch = ids[:1], student[:1], {k: v[:1] for k, v in batch.items()}
  batch |= {"guided": jnp.asarray([[False, True, False, False]]),
            "mine": jnp.asarray([[False, False, False, True]]),
            "logp": jnp.zeros((1, 4))}
  t_lp = jnp.asarray(TEACHER)[ids[:, :3]]                          # [1, 3, 3]
  top = jax.lax.top_k(t_lp, 3)
  scores = {"teacher_logp": jnp.take_along_axis(t_lp, ids[:, 1:, None], -1)[..., 0],
            "teacher_topk_logp": top[0], "teacher_ids": top[1]}
  for guided_targets, n_full in ((False, 1), (True, 2)):
    s = onpolicy.OPDSettings(full_weight=1.0, divergence="rkl", guided_targets=guided_targets)
    _, m = onpolicy.loss_and_metrics(student, batch, scores, s=s)
    assert int(m["sampled/tokens"]) == 1 and int(m["full/tokens"]) == n_full
  p = np.exp(np.asarray(student[0]))
  rkl = [float(np.sum(p[i] * (np.log(p[i]) - TEACHER[ids[0, i]]))) for i in (0, 2)]
  assert float(m["full/loss"]) == pytest.approx(np.mean(rkl), rel=1e-6)


def test_guided_targets_without_the_full_term_is_refused():
  from sad_jax.common.errors import DataError

  with pytest.raises(DataError, match="full_weight"):
    onpolicy.check(onpolicy.OPDSettings(guided_targets=True, full_weight=0.0))
  assert onpolicy.check(onpolicy.OPDSettings(guided_targets=True, full_weight=1.0))
