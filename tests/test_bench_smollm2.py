"""The scoring arithmetic of bench/smollm2_students.py (issue 20.4) on hand-computed cases:
action spans, ratio-of-sums metrics and their paired bootstrap over trajectories."""

import numpy as np
import pytest

from bench.smollm2_students import METRICS, action_spans, summarise
from sad_jax.common.types import SpanKind


def test_action_spans_are_the_contiguous_runs_of_action_labels():
  a, r, o = SpanKind.ACTION, SpanKind.REASON, SpanKind.OBSERVATION
  spans = action_spans(np.array([a, a, r, a, o, a, a]))
  assert [s.tolist() for s in spans] == [[0, 1], [3], [5, 6]]
  assert action_spans(np.array([r, o])) == []


def test_summarise_is_a_ratio_of_sums_with_a_paired_bootstrap_over_trajectories():
  # two trajectories with 2 and 4 reason tokens; A's KL sums 2 and 2 (per token 1 and 0.5),
  # B's 1 and 1. A resample holds both trajectories (half the replicates), or one twice:
  # A = 4/6 overall and 1.0 or 0.5 on the pure draws, so its interval is [0.5, 1.0];
  # A − B = (w0 + w1) / (2 w0 + 4 w1): 1/3 overall, 0.5 and 0.25 on the pure draws.
  counts = {"reason": np.array([2, 4]), "act": np.array([3, 1]), "spans": np.array([1, 1])}
  zeros = np.zeros(2)
  sums = {"counts": counts,
          "A": {"kl": np.array([2.0, 2.0]), "nll": zeros, "act_ok": np.array([3.0, 0.0]),
                "spans_ok": np.array([1.0, 0.0])},
          "B": {"kl": np.array([1.0, 1.0]), "nll": zeros, "act_ok": np.array([3.0, 0.0]),
                "spans_ok": np.array([1.0, 0.0])}}
  out = summarise(sums, [("A", "B")], reps=4000)
  kl = out["models"]["A"]["reason_kl"]
  assert kl["mean"] == pytest.approx(4 / 6) and (kl["lo"], kl["hi"]) == (0.5, 1.0)
  d = out["differences"]["A − B"]["reason_kl"]
  assert d["mean"] == pytest.approx(1 / 3)
  assert (d["lo"], d["hi"]) == (pytest.approx(0.25), pytest.approx(0.5))
  # identical action results: the paired difference is exactly 0 in every replicate
  for m in ("action_token_accuracy", "action_exact_match"):
    assert out["differences"]["A − B"][m] == {"mean": 0.0, "lo": 0.0, "hi": 0.0}
  assert out["models"]["A"]["action_token_accuracy"]["mean"] == pytest.approx(3 / 4)
  assert out["models"]["A"]["action_exact_match"]["mean"] == pytest.approx(1 / 2)
  assert set(out["models"]["A"]) == set(METRICS)
  assert out["counts"] == {"validation_trajectories": 2, "reason": 6, "act": 4, "spans": 2}


def test_several_seeds_put_the_seed_variance_in_the_interval():
  """One trajectory (the trajectory draw is always the same), model A trained with two
  seeds whose reason KL per token is 1.0 and 0.0, B with one seed at 0.25: A is 0.5, and its
  replicates redraw its two seeds (0, 0.5 or 1 with chances 1/4, 1/2, 1/4), so its
  interval is [0, 1] and A − B's is [−0.25, 0.75] around 0.25."""
  counts = {"reason": np.array([4]), "act": np.array([1]), "spans": np.array([1])}
  one = lambda kl: {"kl": np.array([kl]), "nll": np.zeros(1), "act_ok": np.ones(1),
                    "spans_ok": np.ones(1)}
  sums = {"counts": counts, "A": [one(4.0), one(0.0)], "B": one(1.0)}
  out = summarise(sums, [("A", "B")], reps=4000)
  a = out["models"]["A"]["reason_kl"]
  assert a == {"mean": pytest.approx(0.5), "lo": 0.0, "hi": 1.0}
  d = out["differences"]["A − B"]["reason_kl"]
  assert d["mean"] == pytest.approx(0.25)
  assert (d["lo"], d["hi"]) == (pytest.approx(-0.25), pytest.approx(0.75))
  b = out["models"]["B"]["reason_kl"]
  assert (b["lo"], b["hi"]) == (pytest.approx(0.25), pytest.approx(0.25))


def test_a_runs_tokens_per_s_is_its_median_train_window(tmp_path):
  """Five train windows, the first holding compilation (40 tok/s) and one slowed by other
  work (100): the median window, 300, not the mean 228; validation rows are not windows."""
  import json

  from bench.smollm2_students import steady_tokens_per_s, train_rows

  rows = [{"split": "train", "loss": 1.0, "tokens_per_s": t} for t in (40, 300, 100, 310, 390)]
  rows.append({"split": "validation", "loss": 2.0, "tokens_per_s": 5.0})
  (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  assert steady_tokens_per_s(train_rows(str(tmp_path))) == 300.0
