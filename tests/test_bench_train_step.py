"""bench/train_step.py's span mixes and PyTorch peer variants (issue 23.3–4) at a tiny size:
mix shares counted from the packed data, the peer variants computing the same loss, and
one end-to-end run with both peers."""

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from bench import span_mixes
from bench.train_step import SHAPES, model_config
from sad_jax.common.types import SpanKind
from tests import helpers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
XS = SHAPES["XS"]


@pytest.fixture(scope="module")
def prepared(spm_path, tmp_path_factory) -> str:
  from sad_jax.configs import prepare_base
  from sad_jax.data import prepare, schema

  work = tmp_path_factory.mktemp("mix")
  data = str(work / "t.jsonl")
  schema.write_jsonl(data, helpers.synthetic_trajectories(24, seed=3))
  c = prepare_base.get_config()
  c.inputs, c.tokenizer.path, c.max_len, c.val_fraction = (data,), spm_path, XS["seq"] + 1, 0.0
  out = str(work / "ds")
  prepare.prepare(c, out, progress=False)
  return out


def test_mix_rows_and_shares_come_from_the_prepared_trajectories(prepared):
  from sad_jax.trainer import pipeline

  b, rows = span_mixes.packed(prepared, rows=XS["batch"], seq=XS["seq"], lookahead=8)
  split = pipeline.open_split(prepared, "train")
  by_id = {i: split.example(n) for n, i in enumerate(split.ids)}
  length = XS["seq"] + 1
  want = np.zeros((XS["batch"], length), np.int64)  # each row: its trajectories' kinds, then PAD
  for r, ids in enumerate(rows):
    assert ids, "a row holds at least one trajectory"
    kinds = np.concatenate([np.asarray(by_id[i]["kinds"]) for i in ids])[:length]
    want[r, :len(kinds)] = kinds
  np.testing.assert_array_equal(b["kinds"][0], want)
  b = span_mixes.with_teacher(b, vocab=XS["vocab"], k=4)
  assert (b["ids"][b["kinds"] == SpanKind.PAD] == 0).all()
  np.testing.assert_array_equal(b["teacher_mask"], b["kinds"] == SpanKind.REASON)
  sh = span_mixes.shares(b)
  n = want.size
  assert sh["reason"] == pytest.approx((want == SpanKind.REASON).sum() / n)
  assert sh["action"] == pytest.approx((want == SpanKind.ACTION).sum() / n)
  assert sh["observation"] == pytest.approx((want == SpanKind.OBSERVATION).sum() / n)
  assert sh["padding"] == pytest.approx((want == SpanKind.PAD).sum() / n)
  assert sum(sh[k] for k in span_mixes.SHARE_KINDS) == pytest.approx(1.0)
  labels = want[:, 1:]
  targets = np.isin(labels, (SpanKind.REASON, SpanKind.ACTION, SpanKind.ANSWER))
  assert sh["targets"] == pytest.approx(targets.mean())
  assert sh["trajectories_per_row"] == pytest.approx(sum(map(len, rows)) / len(rows))


def test_synthetic_mix_is_the_40_20_40_draw():
  sh = span_mixes.shares(span_mixes.synthetic_batch(dict(XS, seq=2047, batch=4), k=4))
  assert sh["reason"] == pytest.approx(0.4, abs=0.02)
  assert sh["action"] == pytest.approx(0.2, abs=0.02)
  assert sh["observation"] == pytest.approx(0.4, abs=0.02)
  assert sh["padding"] == sh["answer"] == sh["other"] == 0.0
  assert sh["trajectories_per_row"] == 2.0


def _torch_batch(prepared):
  from bench import peer_torch

  b, _ = span_mixes.packed(prepared, rows=XS["batch"], seq=XS["seq"], lookahead=8)
  # answer tokens count as actions (sad_jax's action group): give the batch some
  b["kinds"][0, 0, 5:9] = SpanKind.ANSWER
  return peer_torch.to_torch_batch(span_mixes.with_teacher(b, vocab=XS["vocab"], k=4))


def test_peer_losses_are_one_function_written_three_ways(prepared):
  torch = pytest.importorskip("torch")
  from bench import peer_torch

  batch = _torch_batch(prepared)
  torch.manual_seed(0)
  logits = torch.randn(*batch["inputs"].shape, XS["vocab"], requires_grad=True)
  out = {}
  for name, fn in peer_torch.LOSSES.items():
    logits.grad = None
    loss = fn(logits, batch, span_mixes.REASON_KINDS, span_mixes.ACTION_KINDS)
    loss.backward()
    out[name] = (float(loss.detach()), logits.grad.clone())
  ref, ref_grad = out["previous"]
  # the action term sees the answer tokens: dropping them changes the loss
  assert float(peer_torch.span_loss(logits, batch, span_mixes.REASON_KINDS,
                                    (int(SpanKind.ACTION),))) != pytest.approx(ref, rel=1e-4)
  for name, (loss, grad) in out.items():
    assert loss == pytest.approx(ref, rel=1e-5), name
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-7, msg=name)


def test_best_peer_steps_like_previous_at_the_same_model_inputs(prepared):
  """best = previous except the model inputs (no position ids, no KV cache): with the
  previous step given best's inputs, two steps (so AdamW's update too) agree."""
  pytest.importorskip("torch")
  from bench import peer_torch

  batch = _torch_batch(prepared)
  best = peer_torch.VARIANTS["best"]
  same = dataclasses.replace(peer_torch.VARIANTS["previous"], positions=best.positions,
                             use_cache=best.use_cache)
  losses = {}
  for name, v in (("best", best), ("same", same), ("previous", peer_torch.VARIANTS["previous"])):
    model, opt = peer_torch.build(XS, "float32", seed=0, variant=v)
    step = peer_torch.make_step(model, opt, span_mixes.REASON_KINDS, span_mixes.ACTION_KINDS, v)
    losses[name] = [step(batch), step(batch)]
  assert losses["best"] == pytest.approx(losses["same"], rel=1e-5)
  # the rotary positions (restarting per trajectory or 0…T−1) change the function a little
  assert losses["previous"][0] != losses["best"][0]
  assert losses["previous"][0] == pytest.approx(losses["best"][0], rel=1e-2)


def test_previous_peer_attends_across_trajectories_because_of_the_kv_cache(prepared):
  """transformers builds a per-trajectory mask from restarting position ids only without a
  cache; `use_cache` defaults to True even in training, so the previous peer attends over
  the whole row (the peer_torch docstring's claim; a transformers upgrade may change it)."""
  torch = pytest.importorskip("torch")
  from bench import peer_torch

  batch = _torch_batch(prepared)
  seg = torch.from_numpy(np.asarray(span_mixes.packed(
      prepared, rows=XS["batch"], seq=XS["seq"], lookahead=8)[0]["segment_ids"][0][:, :-1]))
  row = int(torch.nonzero((seg == 2).any(-1))[0])
  second = seg[row] == 2
  changed = dict(batch, inputs=batch["inputs"].clone())
  changed["inputs"][row, 0] = (changed["inputs"][row, 0] + 1) % XS["vocab"]
  model, _ = peer_torch.build(XS, "float32")
  previous = peer_torch.VARIANTS["previous"]
  packed = dataclasses.replace(previous, use_cache=False)
  with torch.no_grad():
    for v, crosses in ((previous, True), (packed, False), (peer_torch.VARIANTS["best"], True)):
      a = model(**peer_torch.model_inputs(batch, v)).logits[row, second]
      b = model(**peer_torch.model_inputs(changed, v)).logits[row, second]
      assert (not torch.allclose(a, b)) == crosses, v


def test_executed_flops_count_the_head_and_the_causal_triangle():
  from bench import peer_torch
  from sad_jax.trainer import metrics

  s = dict(XS)
  model = metrics.model_flops_per_token(model_config(s), s["seq"])
  ex = peer_torch.executed_flops_per_token(s)
  dh = s["d"] // s["heads"]
  # same weights; attention: 14 per key over (T+1)/2 keys instead of 12 over T
  att_model = 12 * s["layers"] * s["seq"] * s["heads"] * dh
  att_ex = 14 * s["layers"] * s["heads"] * dh * (s["seq"] + 1) / 2
  assert ex - att_ex == pytest.approx(model - att_model)


def test_sad_jax_executed_flops_count_the_head_over_the_run_chunks_only():
  from bench import train_step

  s = dict(XS)
  b = train_step.host_batch(s)
  kinds = np.full_like(b["kinds"], int(SpanKind.OBSERVATION))
  kinds[0, 0, 1:41] = int(SpanKind.ACTION)   # the fullest row: 40 targets (inputs 0..39)
  kinds[0, 1, 1:11] = int(SpanKind.ACTION)
  b = {**b, "kinds": kinds, "segment_ids": np.ones_like(b["segment_ids"])}
  full = train_step.executed_flops_per_token(s, b, compact_head=False, chunk=16)
  compact = train_step.executed_flops_per_token(s, b, compact_head=True, chunk=16)
  # 40 targets → 3 chunks of 16 = 48 of the 256 positions run the head
  head = 6.0 * s["d"] * s["vocab"]
  assert full - compact == pytest.approx(head * (1 - 48 / s["seq"]))


@pytest.mark.slow
@pytest.mark.fireact
def test_train_step_reports_a_real_mix_and_the_best_peer(tmp_path):
  pytest.importorskip("torch")
  out = tmp_path / "r.json"
  env = dict(os.environ, SAD_JAX_CACHE=str(tmp_path / "cache"))
  p = subprocess.run([sys.executable, "bench/train_step.py", "--shapes", "XS", "--mix",
                      "fireact", "--peer", "--peer-variants", "best", "--repeats", "1",
                      "--steps", "1", "--threads", "1", "--profile", "1",
                      "--json", str(out)], cwd=REPO, env=env, capture_output=True, text=True,
                     timeout=900)
  assert p.returncode == 0, p.stdout + p.stderr[-3000:]
  r = json.loads(out.read_text())
  assert [(x["shape"], x["mix"]) for x in r["results"]] == [("XS", "fireact")]
  (fire,) = r["results"]
  # FireAct's layout, not the synthetic draw: prompt tokens and padding at a row's end
  assert fire["shares"]["other"] > 0 and fire["shares"]["padding"] > 0
  for x in r["results"]:
    assert set(x["peers"]) == set(x["ratios"]) == {"best"}
    assert x["jax"]["executed_flops_per_token"] > 0
    assert x["peers"]["best"]["loss_rel_diff_to_previous_formula"] < 1e-5
    assert x["ratios"]["best"]["speedup_best"] == pytest.approx(
        x["jax"]["tokens_per_s_best"] / x["peers"]["best"]["tokens_per_s_best"])
    for f in (x["jax"], x["peers"]["best"]):  # every kind of work found in both traces
      prof = f["profile"]
      *work, between = prof["kinds_s"].values()
      assert all(sec > 0 for sec in work) and between >= 0, prof
      assert sum(prof["kinds_s"].values()) - prof["overlap_s"] == pytest.approx(
          prof["wall_s"])
  rendered = _render(r)
  assert "FireAct" in rendered and "peer best" in rendered
  assert "Where the time goes" in rendered and "seconds per traced step by kind" in rendered


def _render(result: dict) -> str:
  sys.path.insert(0, os.path.join(REPO, "bench"))
  import report_sections

  return report_sections.render_train(result)
