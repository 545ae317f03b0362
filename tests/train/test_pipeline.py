"""The training input pipeline: packing, teacher alignment, determinism, process split,
checkpointable state, curriculum sampling, evaluation coverage."""

import numpy as np
import pytest

from sad_jax.common.errors import DataError
from sad_jax.distill import curriculum
from sad_jax.teacher import store as S
from sad_jax.trainer import pipeline

STAGES = (curriculum.Stage("easy", 3, (1.0, 0.0, 0.0), (1.0, 1.0), 1.0),
          curriculum.Stage("all", 5, (1.0, 1.0, 1.0), (1.0, 1.0), 1.0))


@pytest.fixture(scope="module")
def opened(train_data):
  ds, store_dir, _ = train_data
  split = pipeline.open_split(ds, "train")
  store = pipeline.open_teacher(store_dir, split, k=8)
  return split, store


def make_iter(opened, *, accum=1, rows=4, length=129, process_index=0, process_count=1,
              seed=0, prefetch=0, pack_lookahead=8):
  split, store = opened
  score = curriculum.scores(split.stats, {"steps": 1.0, "tokens": 1 / 512})
  edges = curriculum.bucket_edges(score, 3)
  layout = pipeline.Layout.for_process(accum=accum, rows=rows, length=length, k=8,
                                       process_index=process_index,
                                       process_count=process_count)
  return pipeline.TrainIterator(split=split, teacher=store, layout=layout, stages=STAGES,
                                bucket_n=curriculum.bucket_of(score, edges),
                                weight_n=curriculum.example_weights(score), seed=seed,
                                prefetch=prefetch, pack_lookahead=pack_lookahead)


def test_rows_pack_whole_trajectories_with_aligned_teacher(opened):
  split, store = opened
  it = make_iter(opened)
  index = {i: n for n, i in enumerate(split.ids)}
  for _ in range(4):
    batch, rows = next(it)
    assert batch["ids"].shape == (1, 4, 129) and batch["teacher_ids"].shape == (1, 4, 129, 8)
    for r, row in enumerate(rows):
      seg = batch["segment_ids"][0, r]
      offsets, offset = [], 0
      for s, ident in enumerate(row, start=1):
        ex = split.example(index[ident])
        n = min(len(ex["ids"]), 129 - offset)
        assert (seg[offset: offset + n] == s).all()
        np.testing.assert_array_equal(batch["ids"][0, r, offset: offset + n], ex["ids"][:n])
        np.testing.assert_array_equal(batch["kinds"][0, r, offset: offset + n], ex["kinds"][:n])
        np.testing.assert_array_equal(batch["positions"][0, r, offset: offset + n], np.arange(n))
        offsets.append((ident, offset))
        offset += n
      assert (seg[offset:] == 0).all()
      # the store's own gather is the reference for teacher alignment
      ref = S.gather(store, [offsets], length=129, k=8)
      np.testing.assert_array_equal(batch["teacher_mask"][0, r], ref["mask_bt"][0])
      np.testing.assert_array_equal(batch["teacher_ids"][0, r], ref["ids_btk"][0])
      np.testing.assert_array_equal(batch["teacher_logp"][0, r], ref["logp_btk"][0])
    # a row is closed only when the next trajectory would not fit
    assert (batch["segment_ids"] > 0).mean() > 0.5


def reference_rows(lengths, *, length, lookahead, rows):
  """First fit with lookahead, written over a list of pending stream positions."""
  pending, nxt, out = [], 0, []
  for _ in range(rows):
    used, row, misses, k = 0, [], 0, 0
    while misses < lookahead and used < length:
      if k == len(pending):
        pending.append(nxt)
        nxt += 1
      n = lengths(pending[k])
      if used == 0 or used + n <= length:
        row.append(pending.pop(k))
        used += min(n, length - used)
      else:
        misses += 1
        k += 1
    out.append(row)
  return out


@pytest.mark.parametrize("lookahead", [1, 3, 8])
def test_lookahead_packing_matches_a_reference_and_fills_more(opened, lookahead):
  split, _ = opened
  it = make_iter(opened, rows=3, length=129, pack_lookahead=lookahead)
  got = [next(it)[1] for _ in range(3)]  # stage 0 ("easy") only
  stream = it.stream(0)
  for lane in range(3):
    def length_at(j, lane=lane):
      return int(split.lengths[int(stream[lane + 3 * j])])

    ref = reference_rows(length_at, length=129, lookahead=lookahead, rows=3)
    want = [[split.ids[int(stream[lane + 3 * j])] for j in row] for row in ref]
    assert [rows[lane] for rows in got] == want
  fill = {}
  for la in (1, 8):
    it = make_iter(opened, rows=4, length=257, pack_lookahead=la)
    fill[la] = np.mean([(next(it)[0]["segment_ids"] > 0).mean() for _ in range(3)])
  assert fill[8] > fill[1], fill


def test_deterministic_for_a_seed_and_prefetch_changes_nothing(opened):
  a = [next(make_iter(opened, seed=1))[1] for _ in range(1)]
  it1, it2 = make_iter(opened, seed=1), make_iter(opened, seed=1, prefetch=2)
  it3 = make_iter(opened, seed=2)
  rows1 = [next(it1)[1] for _ in range(6)]
  rows2 = [next(it2)[1] for _ in range(6)]
  rows3 = [next(it3)[1] for _ in range(6)]
  it2.close()
  assert rows1 == rows2 and rows1[0] == a[0]
  assert rows1 != rows3


def test_two_processes_see_the_one_process_batch(opened):
  one = make_iter(opened, accum=2, rows=4)
  halves = [make_iter(opened, accum=2, rows=4, process_index=p, process_count=2)
            for p in range(2)]
  for _ in range(5):  # crosses the stage boundary at step 3
    full, _ = next(one)
    parts = [next(h)[0] for h in halves]
    for name in full:
      np.testing.assert_array_equal(full[name], np.concatenate([p[name] for p in parts], 1))
  with pytest.raises(DataError, match="process count"):
    pipeline.Layout.for_process(accum=1, rows=3, length=16, k=0, process_index=0,
                                process_count=2)


def test_state_resumes_exactly_across_a_stage_change(opened):
  it = make_iter(opened, prefetch=2)
  for _ in range(2):
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(4)]
  it.close()
  fresh = make_iter(opened, prefetch=2)
  fresh.set_state(state)
  fresh.start_prefetch()
  got = [next(fresh) for _ in range(4)]
  fresh.close()
  assert fresh.stage == 1
  for (b1, r1), (b2, r2) in zip(expected, got):
    assert r1 == r2
    for name in b1:
      np.testing.assert_array_equal(b1[name], b2[name])
  other = make_iter(opened, rows=2)
  with pytest.raises(DataError, match="lanes"):
    other.set_state(state)


def test_stage_samples_only_its_buckets(opened):
  split, _ = opened
  score = curriculum.scores(split.stats, {"steps": 1.0, "tokens": 1 / 512})
  bucket = curriculum.bucket_of(score, curriculum.bucket_edges(score, 3))
  index = {i: n for n, i in enumerate(split.ids)}
  it = make_iter(opened)
  seen_stage0, seen_stage1 = set(), set()
  for step in range(8):
    _, rows = next(it)
    ids = {index[i] for row in rows for i in row}
    (seen_stage0 if step < 3 else seen_stage1).update(bucket[i] for i in ids)
  assert seen_stage0 == {0}
  assert seen_stage1 > {0}


def test_eval_plan_covers_each_example_once(train_data):
  ds, _, _ = train_data
  val = pipeline.open_split(ds, "validation")
  layout = pipeline.Layout(accum=1, rows=4, length=129, k=0)
  seen = [i for plan in pipeline.eval_plan(val, layout) for lane in plan for i in lane]
  assert sorted(seen) == list(range(len(val)))
  batches = list(pipeline.eval_batches(val, None, layout))
  assert sum(len(r) for _, rows in batches for r in rows) == len(val)


def test_store_for_another_dataset_is_refused(opened, train_data, tmp_path):
  split, _ = opened
  _, store_dir, _ = train_data
  import json
  import shutil

  shutil.copytree(store_dir, tmp_path / "st")
  m = json.loads((tmp_path / "st" / "manifest.json").read_text())
  m["dataset_fingerprint"] = "0" * 64
  (tmp_path / "st" / "manifest.json").write_text(json.dumps(m))
  with pytest.raises(DataError, match="recompute") as e:
    pipeline.open_teacher(str(tmp_path / "st"), split, k=8)
  assert "manifest.json" in str(e.value)
  with pytest.raises(DataError, match="k=64"):
    pipeline.open_teacher(store_dir, split, k=64)
