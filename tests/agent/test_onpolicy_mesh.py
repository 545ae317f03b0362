"""On-policy distillation on the CPU mesh: the update, the teacher's scoring and the
rollouts, each against one device, on several mesh shapes, with the arrays' specs
asserted (the known trap: a sharded gradient can be wrong where the forward is right)."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from sad_jax.agent import onpolicy as loop
from sad_jax.agent import rollout
from sad_jax.agent.envs.registry import make_env
from sad_jax.common import sharding
from sad_jax.common.types import SpanKind
from sad_jax.data.tokenizer import load_tokenizer
from sad_jax.distill import onpolicy
from sad_jax.models import incremental
from sad_jax.models import transformer as T
from sad_jax.models.config import ModelConfig
from sad_jax.trainer import step as step_lib
from sad_jax.trainer.train import state_shardings

MESHES = [(2, 2, 2), (1, 2, 4), (4, 1, 2), (8, 1, 1)]
ENV = "twx:coin?numLocations=2&numDistractorItems=0&includeDoors=0"
VOCAB = 640
B, L = 8, 48


def _cfg(hidden=64, heads=4, kv=2):
  return ModelConfig(model_type="llama", vocab_size=VOCAB, hidden_size=hidden,
                     intermediate_size=2 * hidden, num_layers=2, num_heads=heads,
                     num_kv_heads=kv, head_dim=hidden // heads, max_position_embeddings=4096)


def _rows(seed=0):
  """[B, L] episode rows: context, then reason/action turns the student wrote, with an
  observation between them, and a behaviour log-prob per student token."""
  r = np.random.default_rng(seed)
  kinds = np.full((B, L), SpanKind.OBSERVATION, np.int32)
  kinds[:, :6] = SpanKind.TASK
  for t0 in range(8, L - 8, 12):
    kinds[:, t0:t0 + 5] = SpanKind.REASON
    kinds[:, t0 + 5:t0 + 8] = SpanKind.ACTION
  mine = np.isin(kinds, [SpanKind.REASON, SpanKind.ACTION])
  seg = np.ones((B, L), np.int32)
  seg[1, 40:] = 0   # a shorter row
  return {"ids": r.integers(0, VOCAB, (B, L)).astype(np.int32), "kinds": kinds,
          "positions": np.tile(np.arange(L, dtype=np.int32), (B, 1)), "segment_ids": seg,
          "logp": np.where(mine, -r.uniform(0.5, 6.0, (B, L)), 0.0).astype(np.float32),
          "mine": mine & (seg > 0), "turn": np.where(mine, 0, -1).astype(np.int32),
          "invalid": np.zeros((B, L), bool), "won_b": r.random(B) < 0.5,
          "offpolicy_b": np.arange(B) >= 6}


def _spec_of(x):
  return x.sharding.spec


def _is(x, spec) -> bool:
  """x is laid out as `spec` on its mesh (trailing replicated dims may be left out)."""
  return x.sharding.is_equivalent_to(NamedSharding(x.sharding.mesh, spec), x.ndim)


@pytest.fixture(scope="module")
def models():
  cfg, t_cfg = _cfg(), _cfg(hidden=96, heads=4, kv=2)
  return (cfg, T.init_params(cfg, jax.random.PRNGKey(0)),
          t_cfg, T.init_params(t_cfg, jax.random.PRNGKey(1)))


def _scores_one_device(models, rows):
  _, _, t_cfg, t_params = models
  return jax.device_get(jax.jit(lambda p, b: onpolicy.score(
      p, b, cfg=t_cfg, vocab=VOCAB, k=8))(t_params, rows))


@pytest.mark.parametrize("shape", MESHES[:2])
def test_teacher_scoring_on_the_mesh_equals_one_device(models, shape):
  _, _, t_cfg, t_params = models
  rows = _rows()
  want = _scores_one_device(models, rows)
  mesh = sharding.make_mesh(shape)
  rules = sharding.DEFAULT_RULES
  placed_t = loop.place(t_params, sharding.tree_shardings(
      t_params, T.param_axes(t_params), mesh, rules))
  fsdp = "fsdp" if mesh.shape["fsdp"] > 1 else None
  assert _spec_of(placed_t["layers_0"]["attn"]["q"]) == P(fsdp, "tensor", None)
  assert _spec_of(placed_t["embed"]) == P("tensor", fsdp)
  placed = loop.place(rows, loop.row_shardings(rows, mesh, rules))
  assert _spec_of(placed["ids"]) == P(("data", "fsdp"), None)
  with sharding.use_mesh(mesh, rules):
    got = jax.jit(lambda p, b: onpolicy.score(p, b, cfg=t_cfg, vocab=VOCAB, k=8))(
        placed_t, placed)
  assert len(got["teacher_logp"].sharding.device_set) == 8
  got = jax.device_get(got)
  np.testing.assert_allclose(got["teacher_logp"], want["teacher_logp"], atol=2e-5, rtol=1e-5)
  np.testing.assert_allclose(got["teacher_topk_logp"], want["teacher_topk_logp"], atol=2e-5,
                             rtol=1e-5)


def _update(models, rows, scores, s, mesh=None):
  """Two optimizer steps of opd_step; the state (placed on `mesh` if given)."""
  cfg, params = models[0], models[1]
  tx = step_lib.make_optimizer(ml_collections.ConfigDict(dict(
      lr=1e-2, warmup_steps=0, final_fraction=1.0, b1=0.9, b2=0.98, eps=1e-8,
      weight_decay=0.0, clip_norm=1.0)), 2)
  state = step_lib.init_state(params, jnp.zeros((1,), jnp.float32), tx, 0)
  fn = functools.partial(loop.opd_step, cfg=cfg, vocab=VOCAB, tx=tx, s=s)
  if mesh is None:
    step = jax.jit(fn)
    out = []
    for _ in range(2):
      state, m = step(state, rows, scores)
      out.append(jax.device_get(m))
    return state, out, None
  rules = sharding.DEFAULT_RULES
  sh = state_shardings(state, mesh, rules, tx)
  state = loop.place(state, sh)
  step = jax.jit(fn, out_shardings=(sh, None))
  b = loop.place(rows, loop.row_shardings(rows, mesh, rules))
  sc = loop.place(scores, loop.row_shardings(scores, mesh, rules))
  out = []
  with sharding.use_mesh(mesh, rules):
    for _ in range(2):
      state, m = step(state, b, sc)
      out.append(jax.device_get(m))
  return state, out, (sh, b, sc)


@pytest.mark.slow
@pytest.mark.parametrize("shape", MESHES)
def test_update_on_the_mesh_equals_one_device(models, shape):
  """Both loss terms, SAD's per-span split and off-policy rows: the metrics (the gradient
  norm among them) and the parameters after two Adam steps match one device."""
  rows = _rows()
  scores = _scores_one_device(models, rows)
  s = onpolicy.OPDSettings(sampled_weight=1.0, full_weight=0.5, per_span=True,
                           reason_weight=0.7, action_weight=1.3, discount=0.5)
  ref_state, ref_m, _ = _update(models, rows, scores, s)
  mesh = sharding.make_mesh(shape)
  state, m, (sh, b, sc) = _update(models, rows, scores, s, mesh=mesh)
  # the arrays really are sharded as the rules say
  assert _spec_of(b["ids"]) == P(("data", "fsdp"), None)
  assert _spec_of(sc["teacher_topk_logp"]) == P(("data", "fsdp"), None, None)
  for leaf, want in zip(jax.tree.leaves(state.params), jax.tree.leaves(sh.params),
                        strict=True):
    assert leaf.sharding.spec == want.spec
  fsdp, tensor = mesh.shape["fsdp"] > 1, mesh.shape["tensor"] > 1
  assert _spec_of(state.params["layers_1"]["mlp"]["up"]) == P("fsdp" if fsdp else None,
                                                             "tensor" if tensor else None)
  assert any(leaf.addressable_shards[0].data.shape != leaf.shape
             for leaf in jax.tree.leaves(state.params)) == (mesh.shape["data"] < 8)
  for a, r in zip(m, ref_m):
    for k in ("loss", "sampled/loss", "full/loss", "grad_norm", "rkl", "ratio"):
      np.testing.assert_allclose(a[k], r[k], rtol=2e-5, atol=1e-6, err_msg=k)
  assert ref_m[0]["grad_norm"] > 1e-3 and ref_m[1]["full/loss"] < ref_m[0]["full/loss"]
  # Adam divides by √v: where a gradient is ~0 its float noise is amplified, so the
  # parameters are compared at 1% of one step (lr 1e-2), the gradient itself tightly below
  for x, y in zip(jax.tree.leaves(state.params), jax.tree.leaves(ref_state.params),
                  strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-4)
  ref_g = _grads(models, rows, scores, s)
  got_g = _grads(models, rows, scores, s, mesh=mesh, shardings=(sh.params, b, sc))
  for x, y, want in zip(jax.tree.leaves(got_g), jax.tree.leaves(ref_g),
                        jax.tree.leaves(sh.params), strict=True):
    assert x.sharding.spec == want.spec
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4,
                               atol=1e-4 * float(np.abs(np.asarray(y)).max()))


def _grads(models, rows, scores, s, *, mesh=None, shardings=None):
  """∇ of the on-policy loss at the initial parameters."""
  cfg, params = models[0], models[1]

  def loss(p, batch, sc):
    lp = onpolicy.log_probs(cfg, p, onpolicy.targets(batch), vocab=VOCAB)
    return onpolicy.loss_and_metrics(lp, batch, sc, s=s)[0]

  if mesh is None:
    return jax.jit(jax.grad(loss))(params, rows, scores)
  param_sh, b, sc = shardings
  with sharding.use_mesh(mesh, sharding.DEFAULT_RULES):
    return jax.jit(jax.grad(loss), out_shardings=param_sh)(loop.place(params, param_sh), b, sc)


def test_a_sharded_cache_stays_sharded(models):
  cfg, params = models[0], models[1]
  mesh = sharding.make_mesh((2, 2, 2))
  rules = sharding.DEFAULT_RULES
  cache = T.init_cache(cfg, 4, 256)
  cache = jax.device_put(cache, incremental.cache_shardings(cache, mesh, rules))
  p = jax.device_put(params, sharding.tree_shardings(params, T.param_axes(params), mesh, rules))
  ids = np.arange(4 * 16, dtype=np.int32).reshape(4, 16) % VOCAB
  pos = np.tile(np.arange(16, dtype=np.int32), (4, 1))
  keys = np.zeros((4, 2), np.uint32)
  out, tok, _ = incremental.extend(p, cache, ids, pos, np.ones_like(ids), np.int32(0),
                                   np.ones((4, 256), np.int32), keys, jnp.float32(1.0),
                                   cfg=cfg, vocab=VOCAB, view=256, dtype=jnp.float32,
                                   layout=(mesh, rules))
  assert _is(out[0]["k"], P(("data", "fsdp"), None, "tensor", None))
  assert _is(out[0]["seg"], P(("data", "fsdp"), None))
  out, toks, _ = incremental.decode(p, out, tok, pos[:, -1] + 1, np.int32(16), keys,
                                    jnp.float32(1.0), cfg=cfg, vocab=VOCAB, steps=4, view=256,
                                    dtype=jnp.float32, layout=(mesh, rules))
  assert _is(out[1]["v"], P(("data", "fsdp"), None, "tensor", None))
  assert toks.shape == (4, 4)


@pytest.mark.slow
def test_rollouts_on_the_mesh_and_on_other_slots_play_the_same_episodes(models, spm_path):
  """At temperature 1, an episode's tokens depend on its key and history only: 4 slots on
  a (2,2,2) mesh, 3 slots on one device and 2 slots with the jobs split in two calls
  (two processes' shares) play the same episodes, with the same log-probs."""
  cfg, params = models[0], models[1]
  tok = load_tokenizer(spm_path)
  envs = [make_env(ENV) for _ in range(4)]
  settings = rollout.RolloutSettings(max_new_tokens=12, max_steps=3, max_len=512, chunk=4)
  mesh = sharding.make_mesh((2, 2, 2))
  try:
    tasks = envs[0].tasks("train")[:6]
    jobs = [rollout.Job(t, key_id=i) for i, t in enumerate(tasks)]
    kw = dict(settings=settings, seed=5, stop_ids=[tok.eos_id])
    a, _ = rollout.play(cfg, params, tok, envs, jobs, layout=(mesh, sharding.DEFAULT_RULES),
                        **kw)
    b, _ = rollout.play(cfg, params, tok, envs[:3], jobs, **kw)
    c = (rollout.play(cfg, params, tok, envs[:2], jobs[:3], **kw)[0]
         + rollout.play(cfg, params, tok, envs[:2], jobs[3:], **kw)[0])
  finally:
    for env in envs:
      env.close()
  assert sum(len(e.ids) for e in a) > sum(len(e.ids) for e in a[:1]) > 0
  assert len({tuple(e.ids) for e in a}) > 1      # the keys differ per episode
  for other in (b, c):
    assert [e.ids for e in other] == [e.ids for e in a]
    for x, y in zip(other, a):
      np.testing.assert_allclose(x.logp, y.logp, atol=1e-5)
