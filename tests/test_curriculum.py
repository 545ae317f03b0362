"""Curriculum functions against hand-computed cases."""

import numpy as np
import pytest

from sad_jax.common.errors import DataError
from sad_jax.distill import curriculum


def test_stage_at_is_a_pure_function_of_step():
  stages = [curriculum.Stage(n, s, (1.0,), (1.0,), 1.0) for n, s in (("a", 3), ("b", 2),
                                                                      ("c", 1))]
  assert [curriculum.stage_at(stages, t) for t in range(9)] == [0, 0, 0, 1, 1, 2, 2, 2, 2]
  assert [curriculum.stage_start(stages, i) for i in range(3)] == [0, 3, 5]


def test_scores_buckets_and_weights():
  stats = {"steps": np.array([1, 2, 3, 4, 5, 6]), "tokens": np.array([512, 0, 0, 0, 0, 1024])}
  score = curriculum.scores(stats, {"steps": 1.0, "tokens": 1 / 512})
  np.testing.assert_allclose(score, [2, 2, 3, 4, 5, 8])
  edges = curriculum.bucket_edges(score, 3)
  # linear-interpolation quantiles of [2, 2, 3, 4, 5, 8] at 1/3 and 2/3 (positions 5/3, 10/3)
  np.testing.assert_allclose(edges, [2 + 2 / 3, 4 + 1 / 3])
  assert curriculum.bucket_of(score, edges).tolist() == [0, 0, 1, 1, 2, 2]
  # quantile rank, ties share the higher rank
  np.testing.assert_allclose(curriculum.example_weights(score), [2 / 6, 2 / 6, 3 / 6, 4 / 6,
                                                                 5 / 6, 1.0])
  with pytest.raises(DataError, match="unknown complexity features"):
    curriculum.scores(stats, {"difficulty": 1.0})


def test_stage_validation_names_the_field():
  import ml_collections

  c = ml_collections.ConfigDict()
  c.curriculum = ml_collections.ConfigDict()
  c.curriculum.stages = (dict(name="a", steps=5, bucket_weights=(1.0, 0.0),
                              loss_weights=(1.0, 1.0), temperature=1.0),)
  assert curriculum.stages_from_config(c, n_buckets=2, n_groups=2)[0].steps == 5
  with pytest.raises(DataError, match=r"stages\[0\].bucket_weights"):
    curriculum.stages_from_config(c, n_buckets=3, n_groups=2)
  with pytest.raises(DataError, match=r"stages\[0\].loss_weights"):
    curriculum.stages_from_config(c, n_buckets=2, n_groups=1)
  c.curriculum.stages = (dict(name="a", steps=5),)
  with pytest.raises(DataError, match="needs name, steps"):
    curriculum.stages_from_config(c, n_buckets=2, n_groups=2)
