"""Sampled teacher stores (sampling="sampled"): N draws per position kept as distinct ids
with log(count/N); unbiased p̂, padding that weighs nothing, the q − p̂ gradient, and
stores that are the same bytes however they are batched or split over processes."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sad_jax.common.errors import DataError
from sad_jax.data import prepare, schema
from sad_jax.distill import losses
from sad_jax.models import transformer as T
from sad_jax.models.config import ModelConfig
from sad_jax.teacher import precompute as pc
from sad_jax.teacher import store as S
from sad_jax.teacher import verify as V
from tests import helpers
from tests.data.test_prepare import make_config
from tests.teacher.test_store import digests

DRAWS = 16


@pytest.fixture(scope="module")
def small(tmp_path_factory, spm_path):
  """(dataset, (cfg, params), sampled store): 12 trajectories, a peaked random teacher."""
  root = tmp_path_factory.mktemp("sampled")
  schema.write_jsonl(root / "t.jsonl", helpers.synthetic_trajectories(12, seed=5))
  ds = str(root / "ds")
  prepare.prepare(make_config([str(root / "t.jsonl")], tokenizer__path=spm_path, max_len=256),
                  ds, progress=False)
  _, tok, _ = prepare.load_prepared(ds)
  cfg = ModelConfig(model_type="llama", vocab_size=tok.vocab_size, hidden_size=32,
                    intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8)
  params = jax.tree.map(lambda a: a * 20, T.init_params(cfg, jax.random.PRNGKey(0)))
  store = str(root / "st")
  run(ds, (cfg, params), store)
  return ds, (cfg, params), store


def run(dataset, teacher, out, **kw):
  cfg, params = teacher
  kw = {"k": DRAWS, "sampling": "sampled", "seed": 3, "temperature": 1.5, "shard_size": 5,
        "batch_size": 4, "progress": False, **kw}
  return pc.precompute(dataset_dir=dataset, cfg=cfg, params=params, teacher_name="tiny",
                       out_dir=str(out), **kw)


def test_records_hold_counts_of_n_draws_and_verify(small):
  dataset, teacher, sampled_store = small
  m = S.Manifest.read(sampled_store)
  assert (m.sampled, m.k, m.seed, m.format_version) == (True, DRAWS, 3, 2)
  st = S.TeacherStore(sampled_store)
  vocab = m.vocab_size
  n_pos = 0
  for ident in st.ids():
    rec = st.get(ident)
    counts = np.exp(rec.logp.astype(np.float64)) * DRAWS
    live = rec.logp > S.PAD_LOGP / 2
    np.testing.assert_allclose(counts[live], np.round(counts[live]), atol=1e-4)
    np.testing.assert_allclose(counts.sum(-1), DRAWS, atol=1e-4)  # padding: exactly 0
    assert (rec.ids >= 0).all() and (rec.ids < vocab).all()
    assert (rec.ids[~live] == 0).all() and (rec.logp[~live] == S.PAD_LOGP).all()
    for row, keep in zip(rec.ids, live, strict=True):  # live ids distinct, listed first
      assert len(set(row[keep])) == keep.sum() and keep[: keep.sum()].all()
    n_pos += len(rec.positions)
  assert n_pos > 100 and (~live).any()  # some padding was exercised
  report = V.verify(sampled_store, dataset, cfg=teacher[0], params=teacher[1], spot=1)
  assert report["examples"] == 12 and report["spot_max_rel_error"] < 0.02
  # ragged records: the bytes follow the distinct ids, not the N slots of a top-k record
  blob = st._reader(0).read([0])[0]
  rec = S.decode_record(blob)
  as_topk = S.encode_record(rec, vocab_size=vocab, logp_dtype="float16")
  distinct = int((rec.logp > S.PAD_LOGP / 2).sum())
  assert len(blob) < len(as_topk) and len(blob) - len(as_topk) == (
      3 * distinct + len(rec.positions) - 4 * DRAWS * len(rec.positions))


def test_manifest_format_and_old_manifests_read_as_topk(small, tmp_path):
  d = json.load(open(os.path.join(small[2], "manifest.json")))
  assert d["sampling"] == "sampled" and d["format_version"] == 2 and d["seed"] == 3
  # a format-1 manifest (no sampling field) reads as a top-k store, and writes back unchanged
  old = {key: v for key, v in d.items() if key not in ("sampling", "seed")}
  for name, body in (("old", {**old, "format_version": 1}),
                     ("bad", {**d, "format_version": 1})):
    os.makedirs(tmp_path / name)
    (tmp_path / name / "manifest.json").write_text(json.dumps(body))
  m = S.Manifest.read(str(tmp_path / "old"))
  assert m.sampling == "topk" and not m.sampled
  assert json.loads(m.to_json()) == {**old, "format_version": 1}
  # a sampled store claiming format 1 (what an older writer would never produce) is refused
  with pytest.raises(DataError, match="a sampled store has format_version 2") as e:
    S.Manifest.read(str(tmp_path / "bad"))
  assert e.value.field == "format_version"


def test_draws_are_unbiased():
  """Mean p̂ over many keyed positions equals softmax(z/τ) within 5 standard errors
  (float64 reference), and a zero-probability id is never drawn."""
  z = np.array([2.0, 0.5, 0.0, -1.0, 1.2, -3.0, -1e30])
  n_pos, tau = 2400, 1.7

  @jax.jit
  def sample(seed, hashes, positions):
    keys = pc.position_keys(seed, hashes, positions).reshape(-1)
    logits = jnp.broadcast_to(jnp.asarray(z, jnp.float32), (n_pos, len(z)))
    return pc.draw(logits, keys, draws=DRAWS, temperature=tau)

  draws = np.asarray(sample(jnp.uint32(7), jnp.asarray([11, 12, 13], jnp.uint32),
                            jnp.arange(n_pos, dtype=jnp.int32).reshape(3, -1)))
  ids, counts = pc.draws_to_slots(draws)
  p_hat = np.zeros((n_pos, len(z)))
  np.put_along_axis(p_hat, ids, 0.0, -1)
  np.add.at(p_hat, (np.arange(n_pos)[:, None], ids), counts / DRAWS)  # padding adds 0
  zt = z.astype(np.float64) / tau
  p = np.exp(zt - zt.max()) / np.exp(zt - zt.max()).sum()
  se = np.sqrt(p * (1 - p) / (DRAWS * n_pos))
  assert p[-1] == 0 and p_hat[:, -1].max() == 0
  assert (np.abs(p_hat.mean(0) - p)[:-1] < 5 * se[:-1]).all(), (p_hat.mean(0), p, se)
  np.testing.assert_allclose(p_hat.sum(-1), 1.0)


def _phat_dense(ids, counts, vocab):
  dense = np.zeros((*ids.shape[:-1], vocab))
  idx = np.indices(ids.shape[:-1])
  np.add.at(dense, (*[i[..., None] for i in idx], ids), counts / DRAWS)
  return dense


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_loss_and_gradient_are_kl_and_q_minus_p_hat(tau):
  """fkl with tail=ignore on a sampled record = Σ p̂ (log p̂ − log q^τ)·τ², and its
  gradient w.r.t. the student logits is τ (q^τ − p̂), in float64 by hand; padding slots
  change neither (the same record cut to its live slots gives the same loss and gradient)."""
  rng = np.random.default_rng(0)
  vocab, n = 40, 12
  draws = rng.choice(vocab, size=(n, DRAWS), p=rng.dirichlet(np.full(vocab, 0.3)))
  ids, counts = pc.draws_to_slots(draws)
  logp = S.sampled_logp(counts, DRAWS)
  assert (counts == 0).any()
  z = rng.normal(size=(n, vocab)) * 3

  def loss(z_, ids_, logp_):
    q_log = jax.nn.log_softmax(z_ / tau, axis=-1)
    return tau ** 2 * losses.divergence_per_token(q_log, ids_, logp_, kind="fkl",
                                                  tail="ignore").sum()

  value_and_grad = jax.jit(jax.value_and_grad(loss))  # eager ops would compile one by one
  value, grad = value_and_grad(jnp.asarray(z, jnp.float32), jnp.asarray(ids), jnp.asarray(logp))
  p_hat = _phat_dense(ids, counts, vocab)
  zt = z / tau
  log_q = zt - zt.max(-1, keepdims=True)
  log_q -= np.log(np.exp(log_q).sum(-1, keepdims=True))
  with np.errstate(divide="ignore", invalid="ignore"):
    kl = np.where(p_hat > 0, p_hat * (np.log(p_hat) - log_q), 0.0).sum()
  np.testing.assert_allclose(float(value), tau ** 2 * kl, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(grad), tau * (np.exp(log_q) - p_hat), atol=2e-6)
  # padding: whatever id a padding slot names, loss and gradient stay bit for bit the same,
  # and a row cut to its live slots gives the same loss
  moved = np.where(counts > 0, ids, rng.integers(0, vocab, size=ids.shape))
  v_moved, g_moved = value_and_grad(jnp.asarray(z, jnp.float32), jnp.asarray(moved),
                                    jnp.asarray(logp))
  assert float(v_moved) == float(value)
  np.testing.assert_array_equal(np.asarray(g_moved), np.asarray(grad))
  live = counts[0] > 0
  v_live = loss(jnp.asarray(z[:1], jnp.float32), jnp.asarray(ids[:1, live]),
                jnp.asarray(logp[:1, live]))
  v_all = loss(jnp.asarray(z[:1], jnp.float32), jnp.asarray(ids[:1]), jnp.asarray(logp[:1]))
  assert float(v_all) == pytest.approx(float(v_live), rel=1e-6, abs=1e-7)


def test_same_bytes_across_runs_batch_sizes_and_process_splits(small, tmp_path):
  dataset, teacher, store = small
  run(dataset, teacher, tmp_path / "b3", batch_size=3)
  for i in range(2):  # two hand-split processes into one folder
    run(dataset, teacher, tmp_path / "split", process_index=i, process_count=2)
  want = {n: d for n, d in digests(store).items() if n != "manifest.json"}
  assert len(want) == 3
  for other in ("b3", "split"):
    got = digests(str(tmp_path / other))
    assert {n: d for n, d in got.items() if n != "manifest.json"} == want, other
  assert digests(str(tmp_path / "split"))["manifest.json"] == digests(store)["manifest.json"]
  # the keys are (seed, example, position) alone: another seed or example draws otherwise
  keys = pc.position_keys(jnp.uint32(3), jnp.asarray([5, 6], jnp.uint32),
                          jnp.asarray([[0, 1], [0, 1]], jnp.int32))
  other = pc.position_keys(jnp.uint32(4), jnp.asarray([5], jnp.uint32),
                           jnp.asarray([[0, 1]], jnp.int32))
  data = np.asarray(jax.random.key_data(jnp.concatenate([keys.reshape(-1), other[0]])))
  assert len({tuple(x) for x in data}) == 6


def test_bad_sampling_is_refused(small, tmp_path):
  with pytest.raises(DataError, match="sampling must be one of") as e:
    run(small[0], small[1], tmp_path / "x", sampling="nucleus")
  assert e.value.field == "sampling"
