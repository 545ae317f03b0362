"""Paired bootstrap statistics against hand-computed cases and the verdict lines on
constructed results."""

import numpy as np
import pytest

from sad_jax.experiment import stats


def test_two_games_one_seed_gives_the_enumerated_bootstrap_distribution():
  """Games (0, 1), one seed: a resample of two games has mean 0, ½ or 1 with probabilities
  ¼, ½, ¼ (hand-enumerated), so the 95% interval is [0, 1]."""
  draws = stats.replicates({"a": np.array([[0.0, 1.0]])}, reps=40_000, seed=3)["a"]
  for value, prob in ((0.0, 0.25), (0.5, 0.5), (1.0, 0.25)):
    assert np.mean(np.isclose(draws, value)) == pytest.approx(prob, abs=0.01)
  est = stats.success({"a": np.array([[0.0, 1.0]])}, reps=40_000)["a"]
  assert (est.mean, est.lo, est.hi) == (0.5, 0.0, 1.0)


def test_seeds_are_resampled_too():
  """Two seeds that each won or lost every game: only the seed draw moves the mean
  (0, ½, 1 with ¼, ½, ¼), however many games there are."""
  won = np.array([[1.0] * 10, [0.0] * 10])
  draws = stats.replicates({"a": won}, reps=40_000, seed=1)["a"]
  for value, prob in ((0.0, 0.25), (0.5, 0.5), (1.0, 0.25)):
    assert np.mean(np.isclose(draws, value)) == pytest.approx(prob, abs=0.01)


def test_bootstrap_variance_matches_the_plug_in_binomial_variance():
  """One seed, G games with p won: the bootstrap mean's variance is p(1−p)/G."""
  won = np.array([[1.0] * 30 + [0.0] * 70])
  draws = stats.replicates({"a": won}, reps=40_000, seed=0)["a"]
  assert np.var(draws) == pytest.approx(0.3 * 0.7 / 100, rel=0.05)


def test_shared_games_make_the_difference_paired():
  """Two models that win exactly the same games: every replicate draws the same games for
  both, so the difference is 0 in each (an unpaired bootstrap would give about ±20
  points here); a model that wins every game against one that wins none is +1 exactly."""
  a = np.array([[1.0, 1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 0.0]] * 3)
  d = stats.paired_differences({"a": a, "b": a.copy()}, [("a", "b")])[("a", "b")]
  assert (d.mean, d.lo, d.hi) == (0.0, 0.0, 0.0)
  ones, zeros = np.ones((2, 8)), np.zeros((3, 8))
  d = stats.paired_differences({"a": ones, "b": zeros}, [("a", "b"), ("b", "a")])
  assert (d[("a", "b")].lo, d[("a", "b")].hi) == (1.0, 1.0)
  assert (d[("b", "a")].lo, d[("b", "a")].hi) == (-1.0, -1.0)


def test_paired_interval_is_narrower_than_the_unpaired_one():
  """Correlated models (b wins a's games but 5 of them): the paired interval is close to
  the 5-game gap, while resampling each model's games separately is far wider."""
  rng = np.random.default_rng(0)
  a = (rng.random((3, 100)) < 0.6).astype(float)
  a[:] = a[0]  # the same outcome for every seed: all variance is in the games
  b = a.copy()
  b[:, np.flatnonzero(a[0])[:5]] = 0.0
  d = stats.paired_differences({"a": a, "b": b}, [("a", "b")], reps=20_000)[("a", "b")]
  assert d.mean == pytest.approx(0.05)
  assert d.lo > 0  # always ≥ 0: b never wins a game that a lost
  ra = stats.replicates({"a": a}, reps=20_000, seed=1)["a"]
  rb = stats.replicates({"b": b}, reps=20_000, seed=2)["b"]
  lo, hi = np.percentile(ra - rb, [2.5, 97.5])
  assert lo < 0 < hi and (hi - lo) > 3 * (d.hi - d.lo)


def test_verdicts_follow_the_interval_only():
  e = stats.Estimate
  assert stats.verdict("sad", "sft", e(0.10, 0.02, 0.18)) == "sad ahead"
  assert stats.verdict("sad", "sft", e(-0.10, -0.18, -0.02)) == "sft ahead"
  assert stats.verdict("sad", "sft", e(0.10, -0.01, 0.21)) == "no significant difference"
  assert stats.verdict("sad", "sft", e(0.0, 0.0, 0.0)) == "no significant difference"
  assert e(0.5, 0.25, 0.75).pct() == "50.0% [25.0, 75.0]"
  assert e(-0.05, -0.1, 0.0).points() == "-5.0 [-10.0, +0.0]"


def test_models_must_play_the_same_number_of_games():
  with pytest.raises(ValueError, match="different numbers of games"):
    stats.replicates({"a": np.ones((1, 4)), "b": np.ones((1, 5))})


def test_a_tie_in_every_low_replicate_is_exactly_zero_not_rounding_noise():
  """a (2 identical seeds) wins games 0–37 of 39, b (1 seed) the same but game 37. A
  replicate's difference is (draws of game 37)/39 ≥ 0 and is 0 whenever game 37 is not
  drawn, (38/39)^39 ≈ 36% of replicates: the lower bound is 0 and the verdict none.
  Means computed as sums of game and seed weights once made such ties +1.1e-16 (every seed
  below), which read as "a ahead"."""
  a = np.zeros((2, 39))
  a[:, :38] = 1.0
  b = a[:1].copy()
  b[0, 37] = 0.0
  for seed in range(6):
    d = stats.paired_differences({"a": a, "b": b}, [("a", "b")], reps=4000,
                                 seed=seed)[("a", "b")]
    assert d.lo == 0.0 and d.hi > 0.0, seed
    assert stats.verdict("a", "b", d) == "no significant difference"


def test_teacher_draws_are_resampled_and_weighed_equally():
  """Two teachers: every student of teacher 0 won every game, every student of teacher 1
  none. Only the teacher draw moves the mean: 0, ½, 1 with ¼, ½, ¼ (hand-enumerated), and
  teacher 0's five seeds do not outweigh teacher 1's two (the point is ½, not 5/7)."""
  won = {"a": [np.ones((5, 12)), np.zeros((2, 12))]}
  draws = stats.nested_replicates(won, reps=40_000, seed=2)["a"]
  for value, prob in ((0.0, 0.25), (0.5, 0.5), (1.0, 0.25)):
    assert np.mean(np.isclose(draws, value)) == pytest.approx(prob, abs=0.01)
  est = stats.nested_success(won, reps=40_000)["a"]
  assert (est.mean, est.lo, est.hi) == (0.5, 0.0, 1.0)


def test_one_teacher_reduces_to_games_and_seeds():
  """With one teacher the nested bootstrap is the two-way one: the same enumerated
  distribution for two seeds that won or lost everything, and the binomial variance for one
  seed (another draw of the random numbers, so compared in distribution)."""
  draws = stats.nested_replicates({"a": [np.array([[1.0] * 10, [0.0] * 10])]}, reps=40_000,
                                  seed=1)["a"]
  for value, prob in ((0.0, 0.25), (0.5, 0.5), (1.0, 0.25)):
    assert np.mean(np.isclose(draws, value)) == pytest.approx(prob, abs=0.01)
  one = [np.array([[1.0] * 30 + [0.0] * 70])]
  assert np.var(stats.nested_replicates({"a": one}, reps=40_000)["a"]) == pytest.approx(
      0.3 * 0.7 / 100, rel=0.05)


def test_teacher_draws_pair_the_models_and_a_tie_is_exactly_zero():
  """Two models that win the same games under each teacher (teachers differ, seed counts
  differ): every replicate draws the same games and teachers for both, so A − B is 0 in
  every replicate, exactly; a teacher row (one draw of [1, games] per teacher) pairs too."""
  rng = np.random.default_rng(0)
  per_teacher = [rng.integers(0, 2, size=(1, 40)).astype(float) for _ in range(3)]
  a = [np.repeat(w, n, axis=0) for w, n in zip(per_teacher, (5, 3, 2))]
  b = [np.repeat(w, n, axis=0) for w, n in zip(per_teacher, (2, 3, 3))]
  d = stats.nested_differences({"a": a, "b": b, "teacher": per_teacher},
                               [("a", "b"), ("a", "teacher")])
  for pair in (("a", "b"), ("a", "teacher")):
    assert (d[pair].mean, d[pair].lo, d[pair].hi) == (0.0, 0.0, 0.0)
  with pytest.raises(ValueError, match="teacher draws"):
    stats.nested_replicates({"a": a, "b": b[:2]})
  with pytest.raises(ValueError, match="numbers of games"):
    stats.nested_replicates({"a": a, "b": [np.zeros((1, 39))] * 3})


def test_teacher_variation_widens_the_interval_that_one_teacher_hides():
  """Three teachers whose students reach 20%, 50% and 80% on 200 games: one teacher's
  games-and-seeds interval is about ±9 points; over the draws the interval spans most of
  20–80, as a second teacher draw could land anywhere there."""
  levels = (0.2, 0.5, 0.8)
  won = [np.array([[1.0] * int(200 * p) + [0.0] * (200 - int(200 * p))] * 3) for p in levels]
  one = stats.success({"a": won[1]})["a"]
  pooled = stats.nested_success({"a": won})["a"]
  assert one.hi - one.lo < 0.2
  assert pooled.mean == pytest.approx(0.5)
  assert pooled.lo < 0.3 and pooled.hi > 0.7


def test_a_new_draw_lies_in_the_range_of_n_draws_with_probability_n_minus_1_over_n_plus_1():
  assert stats.draw_coverage(2) == pytest.approx(1 / 3)
  assert stats.draw_coverage(8) == pytest.approx(7 / 9)
  # checked against simulation: 9 draws of a continuous variable, the 9th against the 8
  x = np.random.default_rng(0).normal(size=(200_000, 9))
  inside = (x[:, 8] >= x[:, :8].min(1)) & (x[:, 8] <= x[:, :8].max(1))
  assert inside.mean() == pytest.approx(7 / 9, abs=0.005)
  with pytest.raises(ValueError, match="at least two draws"):
    stats.draw_coverage(1)


def test_best_of_k_keeps_the_best_on_dev_of_every_subset_by_hand():
  # the 6-room teacher draws' dev wins (2, 40, 18) with made-up test figures
  dev, test = [2, 40, 18], [0.06, 0.62, 0.30]
  np.testing.assert_allclose(stats.best_of_k(dev, test, 1), [0.06, 0.62, 0.30])
  # {0,1} → 1, {0,2} → 2, {1,2} → 1
  np.testing.assert_allclose(stats.best_of_k(dev, test, 2), [0.62, 0.30, 0.62])
  np.testing.assert_allclose(stats.best_of_k(dev, test, 3), [0.62])
  # a tie on dev keeps the lower seed (the first), as stats.best_draw does
  np.testing.assert_allclose(stats.best_of_k([5, 5], [0.1, 0.9], 2), [0.1])
  with pytest.raises(ValueError, match="between 1 and 3"):
    stats.best_of_k(dev, test, 4)
