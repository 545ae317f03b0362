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
from collections.abc import Mapping

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
