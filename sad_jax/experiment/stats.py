"""Paired statistics for agent success: every model plays the same games, with several
training seeds per model.

A model's success is the mean over seeds and games of a 0/1 outcome matrix
`won_sg[seed, game]`. Games are shared by every model and seeds are drawn per model, so
the bootstrap resamples both: one draw of the games per replicate, the same for every
model (that is what pairs them), and one draw of each model's seeds. Pooling seeds × games
as independent episodes (a Wilson interval over 3 × 16 = 48 "trials") is too narrow when
the seeds replay the same 16 games; this two-way bootstrap is not.

A verdict is written only from an interval: "A ahead" needs the 95% interval of A − B above
zero, "B ahead" below it; otherwise "no significant difference".
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class Estimate:
  mean: float
  lo: float
  hi: float

  def pct(self, digits: int = 1) -> str:
    return (f"{100 * self.mean:.{digits}f}% [{100 * self.lo:.{digits}f}, "
            f"{100 * self.hi:.{digits}f}]")

  def points(self, digits: int = 1) -> str:
    return (f"{100 * self.mean:+.{digits}f} [{100 * self.lo:+.{digits}f}, "
            f"{100 * self.hi:+.{digits}f}]")


def _counts(idx_rn: np.ndarray, n: int) -> np.ndarray:
  """How often each of n items was drawn in each replicate: [R, n]."""
  reps = idx_rn.shape[0]
  out = np.zeros((reps, n))
  np.add.at(out, (np.repeat(np.arange(reps), idx_rn.shape[1]), idx_rn.ravel()), 1.0)
  return out


def replicates(won: Mapping[str, np.ndarray], *, reps: int = 10_000,
               seed: int = 0) -> dict[str, np.ndarray]:
  """Bootstrap replicates of each model's mean success.

  won: model → [seeds, games] outcomes (0/1 or any score); every model's games are the
  same games in the same order. Returns model → [reps] means.
  """
  if not won:
    return {}
  games = {np.asarray(v).shape[1] for v in won.values()}
  if len(games) != 1:
    raise ValueError(f"models played different numbers of games: {sorted(games)}")
  (n_games,) = games
  rng = np.random.default_rng(seed)
  # Sums of integer draw counts, divided once: for 0/1 outcomes every sum is exact, so two
  # models tied in a replicate differ by exactly 0 (sums of 1/n weights differed by ±1e-16,
  # and an interval's bound of +1e-16 reads as a win).
  game_c = _counts(rng.integers(0, n_games, size=(reps, n_games)), n_games)
  out = {}
  for name in sorted(won):  # a fixed order: the same draws for the same inputs
    w = np.asarray(won[name], np.float64)
    n_seeds = w.shape[0]
    seed_c = _counts(rng.integers(0, n_seeds, size=(reps, n_seeds)), n_seeds)
    per_seed = game_c @ w.T  # [R, S]: each seed's wins over the drawn games
    out[name] = np.sum(per_seed * seed_c, axis=1) / (n_games * n_seeds)
  return out


def interval(point: float, draws: np.ndarray) -> Estimate:
  lo, hi = np.percentile(draws, [2.5, 97.5])
  return Estimate(float(point), float(lo), float(hi))


def success(won: Mapping[str, np.ndarray], *, reps: int = 10_000,
            seed: int = 0) -> dict[str, Estimate]:
  """Each model's mean success with its 95% bootstrap interval (games and seeds)."""
  draws = replicates(won, reps=reps, seed=seed)
  return {k: interval(float(np.mean(won[k])), draws[k]) for k in draws}


def paired_differences(won: Mapping[str, np.ndarray], pairs: list[tuple[str, str]], *,
                       reps: int = 10_000, seed: int = 0) -> dict[tuple[str, str], Estimate]:
  """A − B for each (A, B) with its 95% interval, paired over the shared games."""
  draws = replicates(won, reps=reps, seed=seed)
  return {(a, b): interval(float(np.mean(won[a]) - np.mean(won[b])), draws[a] - draws[b])
          for a, b in pairs}


def verdict(a: str, b: str, diff: Estimate) -> str:
  """The only rankings the interval allows."""
  if diff.lo > 0:
    return f"{a} ahead"
  if diff.hi < 0:
    return f"{b} ahead"
  return "no significant difference"


# ----------------------------------------------------------------------------- teacher draws


def nested_replicates(won: Mapping[str, Sequence[np.ndarray]], *, reps: int = 10_000,
                      seed: int = 0) -> dict[str, np.ndarray]:
  """Bootstrap replicates over games, teachers and seeds.

  won: model → one [seeds, games] matrix per teacher draw, the teachers in the same order
  for every model (teacher t's students learned from teacher t). Each replicate draws the
  games once and the teachers once, both shared by every model (that pairs them), then each
  model's seeds within each teacher. A model's mean weighs every teacher equally (the mean
  of its teachers' seed means), so a run with more seeds does not outweigh another draw.
  """
  if not won:
    return {}
  teachers = {len(v) for v in won.values()}
  games = {np.asarray(w).shape[1] for v in won.values() for w in v}
  if len(teachers) != 1 or 0 in teachers:
    raise ValueError(f"models have different numbers of teacher draws: {sorted(teachers)}")
  if len(games) != 1:
    raise ValueError(f"models played different numbers of games: {sorted(games)}")
  (n_teachers,), (n_games,) = teachers, games
  # integer sums, scaled by the lcm of the seed counts and divided once: a tie is exactly 0
  scale = int(np.lcm.reduce([np.asarray(w).shape[0] for v in won.values() for w in v]))
  rng = np.random.default_rng(seed)
  game_c = _counts(rng.integers(0, n_games, size=(reps, n_games)), n_games)
  teacher_c = _counts(rng.integers(0, n_teachers, size=(reps, n_teachers)), n_teachers)
  out = {}
  for name in sorted(won):
    total = np.zeros(reps)
    for t, w in enumerate(won[name]):
      w = np.asarray(w, np.float64)
      n_seeds = w.shape[0]
      seed_c = _counts(rng.integers(0, n_seeds, size=(reps, n_seeds)), n_seeds)
      per_teacher = np.sum((game_c @ w.T) * seed_c, axis=1)  # [R]: wins over drawn seeds
      total += teacher_c[:, t] * per_teacher * (scale // n_seeds)
    out[name] = total / (n_games * n_teachers * scale)
  return out


def nested_mean(draws: Sequence[np.ndarray]) -> float:
  """The point estimate that `nested_replicates` resamples: the mean of teacher means."""
  return float(np.mean([np.mean(w) for w in draws]))


def nested_success(won: Mapping[str, Sequence[np.ndarray]], *, reps: int = 10_000,
                   seed: int = 0) -> dict[str, Estimate]:
  """Each model's success over teacher draws, with its 95% interval (games, teachers, seeds)."""
  draws = nested_replicates(won, reps=reps, seed=seed)
  return {k: interval(nested_mean(won[k]), draws[k]) for k in draws}


def nested_differences(won: Mapping[str, Sequence[np.ndarray]], pairs: list[tuple[str, str]],
                       *, reps: int = 10_000, seed: int = 0) -> dict[tuple[str, str], Estimate]:
  """A − B over teacher draws, paired over the shared games and teachers."""
  draws = nested_replicates(won, reps=reps, seed=seed)
  return {(a, b): interval(nested_mean(won[a]) - nested_mean(won[b]), draws[a] - draws[b])
          for a, b in pairs}


def draw_coverage(n: int) -> float:
  """P(a new draw lies within [min, max] of n exchangeable draws) = (n − 1)/(n + 1): the
  ranks of n + 1 draws are uniform, and the new one is extreme with probability 2/(n + 1)
  (with ties, at least this). No other assumption on the distribution."""
  if n < 2:
    raise ValueError(f"a range needs at least two draws, got {n}")
  return (n - 1) / (n + 1)


def best_draw(wins: dict[int, float]) -> int:
  """The teacher seed that won most dev games; the lower seed on a tie."""
  return max(wins, key=lambda s: (wins[s], -s))


def best_of_k(dev: Sequence[float], test: Sequence[float], k: int) -> np.ndarray:
  """The test score of the draw kept as the best on dev (the first on a tie), for every
  k-subset of the draws, in itertools order. Their mean estimates, without bias, the
  expected test score of `teacher.draws = k` (a U-statistic over the measured draws)."""
  import itertools

  if len(dev) != len(test):
    raise ValueError(f"{len(dev)} dev scores but {len(test)} test scores")
  if not 1 <= k <= len(dev):
    raise ValueError(f"k must be between 1 and {len(dev)}, got {k}")
  return np.array([test[best_draw({i: dev[i] for i in s})]
                   for s in itertools.combinations(range(len(dev)), k)], np.float64)
