"""Curriculum: a complexity score per trajectory, buckets by score, and the stage table.

Every function here is pure: the active stage is a function of the step, bucket edges
are a function of the training set, an example's curriculum weight is a function of its
score. Nothing about the curriculum needs to be checkpointed beyond the step (the stage
index is saved too, only to check that a resumed run uses the same table).

Score (a linear formula over the prepared `stats` fields, weights in the config):
  score = Σ_f weight_f · stats_f      e.g. steps + 0.5·tool_calls + tokens/512
Buckets are quantiles of the training set's scores (bucket 0 = simplest). The weight of
an example in the curriculum term of the objective is its score's quantile rank in
(0, 1]: harder trajectories count more.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np

from sad_jax.common.errors import DataError
from sad_jax.data.tfds_builder import STATS_FIELDS


@dataclasses.dataclass(frozen=True)
class Stage:
  name: str
  steps: int                          # length; the last stage runs to the end of training
  bucket_weights: tuple[float, ...]   # sampling weight of each complexity bucket
  loss_weights: tuple[float, ...]     # fixed weight per objective group (reason, action)
  temperature: float                  # τ of the divergence in this stage


def stages_from_config(config, *, n_buckets: int, n_groups: int) -> tuple[Stage, ...]:
  """Validated stages from `config.curriculum.stages` (a tuple of dicts/ConfigDicts)."""
  out = []
  for i, s in enumerate(config.curriculum.stages):
    where = f"config.curriculum.stages[{i}]"
    try:
      stage = Stage(name=str(s["name"]), steps=int(s["steps"]),
                    bucket_weights=tuple(float(w) for w in s["bucket_weights"]),
                    loss_weights=tuple(float(w) for w in s["loss_weights"]),
                    temperature=float(s["temperature"]))
    except (KeyError, TypeError, ValueError) as e:
      raise DataError(f"bad stage: {e} (each stage needs name, steps, bucket_weights, "
                      "loss_weights, temperature)", field=where) from None
    if len(stage.bucket_weights) != n_buckets or min(stage.bucket_weights) < 0 \
        or sum(stage.bucket_weights) <= 0:
      raise DataError(f"bucket_weights needs {n_buckets} non-negative weights, not all zero; "
                      f"got {stage.bucket_weights}", field=where + ".bucket_weights")
    if len(stage.loss_weights) != n_groups:
      raise DataError(f"loss_weights needs one weight per objective group ({n_groups}); got "
                      f"{stage.loss_weights}", field=where + ".loss_weights")
    if stage.steps < 1 or stage.temperature <= 0:
      raise DataError("steps must be >= 1 and temperature > 0", field=where)
    out.append(stage)
  if not out:
    raise DataError("at least one curriculum stage is needed", field="config.curriculum.stages")
  return tuple(out)


def stage_at(stages: Sequence[Stage], step: int) -> int:
  """Index of the stage active at `step` (0-based). The last stage never ends."""
  end = 0
  for i, s in enumerate(stages[:-1]):
    end += s.steps
    if step < end:
      return i
  return len(stages) - 1


def stage_start(stages: Sequence[Stage], index: int) -> int:
  return sum(s.steps for s in stages[:index])


def scores(stats: Mapping[str, np.ndarray], weights: Mapping[str, float]) -> np.ndarray:
  """Complexity score of every example: Σ_f weight_f · stats_f (float64)."""
  unknown = sorted(set(weights) - set(STATS_FIELDS))
  if unknown:
    raise DataError(f"unknown complexity features {unknown}; known: {list(STATS_FIELDS)}",
                    field="config.curriculum.score")
  n = len(next(iter(stats.values())))
  out = np.zeros(n, np.float64)
  for name, w in weights.items():
    out += float(w) * np.asarray(stats[name], np.float64)
  return out


def bucket_edges(score_n: np.ndarray, n_buckets: int) -> np.ndarray:
  """Inner quantile edges (n_buckets − 1 of them) of the scores."""
  if n_buckets < 1:
    raise DataError("n_buckets must be >= 1", field="config.curriculum.n_buckets")
  return np.quantile(score_n, np.arange(1, n_buckets) / n_buckets) if n_buckets > 1 \
      else np.zeros(0)


def bucket_of(score_n: np.ndarray, edges: np.ndarray) -> np.ndarray:
  """Bucket index per example: how many edges lie strictly below its score (a score equal
  to an edge stays in the lower bucket)."""
  return np.searchsorted(edges, score_n, side="left").astype(np.int32)


def example_weights(score_n: np.ndarray) -> np.ndarray:
  """Quantile rank in (0, 1] (ties share the highest rank): the curriculum-term weight."""
  if len(score_n) == 0:
    return np.zeros(0, np.float32)
  order = np.sort(score_n)
  rank = np.searchsorted(order, score_n, side="right")
  return (rank / len(score_n)).astype(np.float32)
