"""The rollout engine: the recorded log-probs are the model's, on the recorded sequence."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sad_jax.agent import rollout
from sad_jax.agent.envs.registry import make_env
from sad_jax.common.types import SpanKind
from sad_jax.data.schema import Segment
from sad_jax.data.tokenizer import load_tokenizer
from sad_jax.models import incremental
from sad_jax.models import transformer as T
from sad_jax.models.config import ModelConfig

ENV = "twx:coin?numLocations=2&numDistractorItems=0&includeDoors=0"


@pytest.fixture(scope="module")
def model():
  cfg = ModelConfig(model_type="llama", vocab_size=640, hidden_size=32, intermediate_size=64,
                    num_layers=2, num_heads=2, num_kv_heads=1, head_dim=16,
                    max_position_embeddings=4096)
  return cfg, T.init_params(cfg, jax.random.PRNGKey(0))


def _fresh_logp(cfg, params, arr, vocab):
  logits = T.Transformer(cfg).apply({"params": params}, jnp.asarray(arr["ids"][:, :-1]),
                                    positions_bt=jnp.asarray(arr["positions"][:, :-1]),
                                    segment_ids_bt=jnp.asarray(arr["segment_ids"][:, :-1]))
  lp = jax.nn.log_softmax(logits[..., :vocab].astype(jnp.float32), -1)
  return np.take_along_axis(np.asarray(lp), arr["ids"][:, 1:, None], -1)[..., 0]


def test_recorded_logps_equal_a_fresh_forward_across_turns_and_compactions(model, spm_path):
  cfg, params = model
  tok = load_tokenizer(spm_path)
  envs = [make_env(ENV) for _ in range(3)]
  try:
    tasks = envs[0].tasks("train")[:5]
    # a small cache: the histories are written again from slot 0 several times
    settings = rollout.RolloutSettings(max_new_tokens=12, max_steps=4, max_len=1024,
                                       chunk=4, cache_len=1100)
    before = dict(incremental.TRACES)
    eps, stats = rollout.play(cfg, params, tok, envs, [rollout.Job(t) for t in tasks],
                              settings=settings, seed=3, stop_ids=[tok.eos_id])
    again, _ = rollout.play(cfg, params, tok, envs, [rollout.Job(t) for t in tasks],
                            settings=settings, seed=3, stop_ids=[tok.eos_id])
  finally:
    for env in envs:
      env.close()
  assert [e.task for e in eps] == list(tasks) and stats.episodes == 5
  assert stats.compactions >= 1 and stats.extend_calls >= 6 and all(e.steps >= 1 for e in eps)
  assert [e.ids for e in again] == [e.ids for e in eps]   # a function of the seed
  # one decode shape; extend compiles once per block width
  assert incremental.TRACES["decode"] - before["decode"] == 1
  arr = rollout.to_arrays(eps, 1024)
  fresh = _fresh_logp(cfg, params, arr, tok.vocab_size)
  mine = arr["mine"][:, 1:]
  assert mine.sum() == stats.generated_tokens > 0
  np.testing.assert_allclose(fresh[mine], arr["logp"][:, 1:][mine], atol=1e-5)
  # the student's tokens are reason or action; everything else is context
  kinds = arr["kinds"]
  assert set(np.unique(kinds[arr["mine"]])) <= {SpanKind.REASON, SpanKind.ACTION}
  assert not np.isin(kinds[~arr["mine"] & (arr["segment_ids"] > 0)],
                     [SpanKind.REASON, SpanKind.ACTION]).any()


def test_observations_are_tokenised_alone_and_the_prompt_as_prepare_does(model, spm_path):
  cfg, params = model
  tok = load_tokenizer(spm_path)
  env = make_env(ENV)
  try:
    task = env.tasks("train")[0]
    eps, _ = rollout.play(cfg, params, tok, [env], [rollout.Job(task, prefix=[
        ("look around first", "look around")])],
        settings=rollout.RolloutSettings(max_new_tokens=8, max_steps=1, max_len=1024),
        seed=0, stop_ids=[tok.eos_id])
    from sad_jax.agent.envs.base import act, start_episode
    segs, _, _ = start_episode(env, task=task)
    segs.append(Segment("reason", "look around first"))
    act(env, segs, "look around")
  finally:
    env.close()
  ep = eps[0]
  assert ep.prefix_turns == 1 and ep.steps == 1
  prompt, kinds = rollout.encode_segments(tok, segs, bos=True)
  n = len(prompt)
  assert ep.ids[:n] == prompt.tolist() and ep.kinds[:n] == kinds.tolist()
  assert not any(ep.mine[:n])               # the teacher's prefix is context
  reply = [i for i, m in enumerate(ep.mine) if m]
  tail = ep.ids[reply[-1] + 1:]             # the observation after the student's turn
  want, _ = rollout.encode_segments(tok, [Segment("observation", ep.observations[0])],
                                    bos=False)
  assert tail == want.tolist()


def test_turn_end_and_reply_kinds(spm_path):
  tok = load_tokenizer(spm_path)
  ids = tok.encode("Thought: go\nAction: move east\nObservation: x").ids.tolist()
  n = rollout.turn_end(ids, tok, set())
  assert tok.decode(ids[:n]) == "Thought: go\nAction: move east\n"
  kinds = rollout.reply_kinds(ids[:n], tok)
  assert kinds[0] == SpanKind.REASON and kinds[-1] == SpanKind.ACTION
  first_action = next(i for i, k in enumerate(kinds) if k == SpanKind.ACTION)
  assert tok.decode(ids[:first_action]) == "Thought: go\n"
  assert rollout.turn_end(ids[:3], tok, set()) is None
  assert rollout.turn_end(ids[:3], tok, {ids[1]}) == 2


@pytest.fixture(scope="module")
def teacher():
  """A different model (its own depth and width) with a vocabulary padded past the
  tokenizer's, as a larger teacher's often is."""
  cfg = ModelConfig(model_type="llama", vocab_size=704, hidden_size=48, intermediate_size=96,
                    num_layers=3, num_heads=4, num_kv_heads=2, head_dim=12,
                    max_position_embeddings=4096)
  return cfg, T.init_params(cfg, jax.random.PRNGKey(7))


def _play(student, teacher, tok, jobs, slots, **settings):
  envs = [make_env(ENV) for _ in range(slots)]
  try:
    return rollout.play(*student, tok, envs, jobs, seed=5, stop_ids=[tok.eos_id],
                        teacher=teacher, settings=rollout.RolloutSettings(**settings))
  finally:
    for env in envs:
      env.close()


def test_guided_turns_at_probability_one_are_the_teacher_playing_alone(model, teacher,
                                                                        spm_path):
  tok = load_tokenizer(spm_path)
  kw = dict(max_new_tokens=10, max_steps=3, max_len=1024, chunk=4)
  jobs = [rollout.Job(t) for t in range(3)]
  alone, _ = _play(teacher, None, tok, jobs, 2, temperature=0.0, **kw)
  guided, stats = _play(model, teacher, tok, jobs, 2, guide_prob=1.0, **kw)
  assert [e.ids for e in guided] == [e.ids for e in alone]
  assert all(e.guided == [True] * e.steps and not any(e.mine) for e in guided)
  assert stats.generated_tokens == 0 and stats.guided_tokens > 0
  # none of it is the student's: no targets, no behaviour log-probs
  arr = rollout.to_arrays(guided, 1024)
  assert not arr["mine"].any() and not arr["logp"].any()


def test_guided_turns_mixed_in_keep_both_caches_true(model, teacher, spm_path):
  """Half the turns the teacher's (greedy): the student's recorded log-probs equal a fresh
  student forward of the final sequence, and every guided token is the teacher's argmax
  there, through compactions of both caches; the mix is the same on 3 slots as on 2."""
  tok = load_tokenizer(spm_path)
  kw = dict(max_new_tokens=10, max_steps=5, max_len=1024, chunk=4, cache_len=1100,
            guide_prob=0.5)
  jobs = [rollout.Job(t) for t in range(5)]
  eps, stats = _play(model, teacher, tok, jobs, 3, **kw)
  again, _ = _play(model, teacher, tok, jobs, 2, **kw)
  assert [e.ids for e in again] == [e.ids for e in eps]
  assert stats.compactions >= 1
  turns = [(e, t) for j, e in enumerate(eps) for t in range(e.steps)]
  assert all(e.guided[t] == rollout.guided(5, j, t, 0.5) for j, e in enumerate(eps)
             for t in range(e.steps))
  assert 0 < sum(e.guided[t] for e, t in turns) < len(turns)
  arr = rollout.to_arrays(eps, 1024)
  mine = arr["mine"][:, 1:]
  assert mine.sum() == stats.generated_tokens > 0
  fresh = _fresh_logp(*model, arr, tok.vocab_size)
  np.testing.assert_allclose(fresh[mine], arr["logp"][:, 1:][mine], atol=1e-5)
  # the guided tokens: the teacher's greedy choice given everything before them
  t_cfg, t_params = teacher
  logits = np.asarray(T.Transformer(t_cfg).apply(
      {"params": t_params}, jnp.asarray(arr["ids"][:, :-1]),
      positions_bt=jnp.asarray(arr["positions"][:, :-1]),
      segment_ids_bt=jnp.asarray(arr["segment_ids"][:, :-1])))[..., :tok.vocab_size]
  turn = arr["turn"][:, 1:]
  guided_tok = np.zeros_like(mine)
  for r, e in enumerate(eps):
    guided_tok[r] = (turn[r] >= 0) & np.asarray(e.guided + [False])[turn[r]]
  guided_tok &= arr["kinds"][:, 1:] != SpanKind.OBSERVATION
  assert guided_tok.sum() == stats.guided_tokens > 0
  np.testing.assert_array_equal(arr["guided"][:, 1:], guided_tok)
  top2 = np.sort(logits, -1)[..., -2:]
  clear = guided_tok & (top2[..., 1] - top2[..., 0] > 1e-4)   # not a near tie
  assert clear.sum() > 0.9 * guided_tok.sum()
  np.testing.assert_array_equal(logits.argmax(-1)[clear], arr["ids"][:, 1:][clear])
