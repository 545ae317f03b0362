"""Span mixes for bench/train_step.py (issue 23.4): the span kinds, trajectory lengths and
row layout of a training batch, taken from a prepared dataset and packed by the trainer's
own packing (`pipeline.TrainIterator`: its first batch at seed 0).

  synthetic  random kinds per token, 40% reason / 20% action / 40% observation, two
             trajectories per row (the figures before issue 23)
  demo       the demo's expert trajectories: TextWorld-Express coin oracle episodes made by
             `study.stages.stage_expert` with configs/study_coin.py:demo's settings, prepared by
             `study.stages._prepare` as the demo prepares them (its sentencepiece tokenizer, vocab
             600 with multi-word pieces, max_len = seq + 1) and packed as the demo packs
             (`pack_lookahead` 1). The demo's students learn from the teacher's own
             episodes, which imitate these; making those needs a trained teacher.
  fireact    FireAct's HotpotQA ReAct trajectories (../shared/data/fireact) prepared with
             configs/prepare_fireact.py (ReAct template, its sentencepiece tokenizer of
             vocab 2000) at max_len = seq + 1, packed with the trainer's default
             lookahead (8).
A longer trajectory is truncated at a step boundary by prepare (length_policy truncate).
Token ids are drawn at random in the model's vocabulary (the step's speed does not depend
on them); kinds, segment ids, positions and the padding at a row's end are the data's.
Teacher records: random top-k at every position, `teacher_mask` = the reason tokens.
Prepared datasets are cached under $SAD_JAX_CACHE/bench_mixes (default ~/.cache/sad_jax).
"""

from __future__ import annotations

import os

import numpy as np

from sad_jax.common.types import SpanKind
from sad_jax.distill import curriculum
from sad_jax.trainer import pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIREACT = os.path.join(ROOT, "..", "shared", "data", "fireact")
MIXES = ("synthetic", "demo", "fireact")
SHARE_KINDS = {"reason": (SpanKind.REASON,), "action": (SpanKind.ACTION,),
               "answer": (SpanKind.ANSWER,), "observation": (SpanKind.OBSERVATION,),
               "other": (SpanKind.SYSTEM, SpanKind.TASK), "padding": (SpanKind.PAD,)}
# the kinds of the `sad` objective's two loss groups (sad_jax.distill.losses.REASON / ACTION)
REASON_KINDS = (int(SpanKind.REASON),)
ACTION_KINDS = (int(SpanKind.ACTION), int(SpanKind.ANSWER))


def cache_dir() -> str:
  from sad_jax.models import gguf

  return os.path.join(gguf.cache_dir(), "bench_mixes")


def demo_dataset(seq: int, work: str, *, episodes: int | None = None) -> str:
  """The demo's expert trajectories prepared for rows of seq + 1 tokens (cached in `work`).
  `episodes`: fewer than the demo's 800 (tests)."""
  import contextlib
  import io
  import sys

  if ROOT not in sys.path:
    sys.path.insert(0, ROOT)  # configs/
  from sad_jax.configs import study_coin
  from sad_jax.experiment.study import stages

  c = study_coin.get_config("demo")
  c.data.seq_len = seq
  if episodes is not None:
    c.expert.episodes = episodes
  with contextlib.redirect_stderr(io.StringIO()):  # the stages' progress bars
    expert = stages.stage_expert(work, c)
    return stages._prepare(work, f"expert_{c.expert.episodes}_len{seq + 1}", expert, c)


def fireact_dataset(seq: int, work: str) -> str:
  """FireAct prepared by configs/prepare_fireact.py, max_len seq + 1 (cached in `work`)."""
  import sys

  if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
  from sad_jax.configs import prepare_fireact
  from sad_jax.data import prepare

  out = os.path.join(work, f"fireact_len{seq + 1}")
  if os.path.exists(os.path.join(out, "prepare_report.json")):  # prepare writes atomically
    return out
  c = prepare_fireact.get_config()
  c.inputs = (os.path.join(FIREACT, "hotpotqa_react_alpaca.json"),)
  c.max_len, c.val_fraction = seq + 1, 0.0
  prepare.prepare(c, out, progress=False)
  return out


def dataset(mix: str, seq: int, work: str | None = None) -> str:
  work = work or cache_dir()
  if mix == "demo":
    return demo_dataset(seq, os.path.join(work, "demo"))
  if mix == "fireact":
    return fireact_dataset(seq, work)
  raise ValueError(f"mix {mix!r} is not taken from a dataset; choose from {MIXES[1:]}")


def packed(dataset_dir: str, *, rows: int, seq: int, lookahead: int,
           seed: int = 0) -> tuple[dict, list[list[str]]]:
  """The trainer's first batch of `rows` rows of seq + 1 tokens from the train split (ids,
  kinds, segment_ids, positions, weight: [1, rows, seq + 1]), packed by TrainIterator with
  one curriculum stage over one bucket, and the ids of the trajectories in each row."""
  split = pipeline.open_split(dataset_dir, "train")
  n = len(split)
  stage = curriculum.Stage(name="all", steps=1, bucket_weights=(1.0,), loss_weights=(1.0, 1.0),
                           temperature=1.0)
  it = pipeline.TrainIterator(
      split=split, teacher=None, layout=pipeline.Layout(accum=1, rows=rows, length=seq + 1, k=0),
      stages=(stage,), bucket_n=np.zeros(n, np.int32), weight_n=np.ones(n, np.float32),
      seed=seed, prefetch=0, pack_lookahead=lookahead)
  batch, ids = next(it)
  it.close()
  return batch, ids


def with_teacher(b: dict, *, vocab: int, k: int, seed: int = 0) -> dict:
  """Random token ids at the real tokens and random teacher top-k records; teacher_mask =
  the reason tokens."""
  rng = np.random.default_rng(seed)
  shape = b["ids"].shape
  real = b["kinds"] != SpanKind.PAD
  b["ids"][:] = np.where(real, rng.integers(0, vocab, shape), 0)
  b["teacher_ids"] = rng.integers(0, vocab, shape + (k,)).astype(np.int32)
  b["teacher_logp"] = np.log(rng.dirichlet(np.ones(k), size=shape) * 0.9).astype(np.float32)
  b["teacher_mask"] = b["kinds"] == SpanKind.REASON
  return b


def host_batch(mix: str, s: dict, *, k: int, seed: int = 0, work: str | None = None) -> dict:
  """A packed [1, B, T+1] batch of shape `s` whose layout comes from `mix`."""
  if mix == "synthetic":
    return synthetic_batch(s, k=k, seed=seed)
  lookahead = {"demo": 1, "fireact": 8}[mix]
  b, _ = packed(dataset(mix, s["seq"], work), rows=s["batch"], seq=s["seq"],
                lookahead=lookahead)
  return with_teacher(b, vocab=s["vocab"], k=k, seed=seed)


def synthetic_batch(s: dict, *, k: int, seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  layout = pipeline.Layout(accum=1, rows=s["batch"], length=s["seq"] + 1, k=k)
  b = pipeline.empty_batch(layout, teacher=True)
  shape = b["ids"].shape
  b["ids"][:] = rng.integers(0, s["vocab"], shape)
  b["kinds"][:] = rng.choice([SpanKind.REASON, SpanKind.ACTION, SpanKind.OBSERVATION],
                             size=shape, p=[0.4, 0.2, 0.4])
  # two trajectories per row
  half = shape[-1] // 2
  b["segment_ids"][..., :half], b["segment_ids"][..., half:] = 1, 2
  b["positions"][..., :half] = np.arange(half)
  b["positions"][..., half:] = np.arange(shape[-1] - half)
  b["weight"][:] = 1.0
  b["teacher_ids"][:] = rng.integers(0, s["vocab"], shape + (k,))
  b["teacher_logp"][:] = np.log(rng.dirichlet(np.ones(k), size=shape) * 0.9)
  b["teacher_mask"][:] = b["kinds"] == SpanKind.REASON
  return b


def shares(b: dict) -> dict:
  """What a batch holds: each kind's share of its tokens, the share of the T predicted
  positions per row that carry a loss target (reason with a teacher record, action, answer),
  trajectories per row and their mean length."""
  kinds = np.asarray(b["kinds"])
  out = {name: float(np.isin(kinds, ks).mean()) for name, ks in SHARE_KINDS.items()}
  labels = kinds[..., 1:]
  target = (np.isin(labels, REASON_KINDS) & np.asarray(b["teacher_mask"])[..., 1:]) | np.isin(
      labels, ACTION_KINDS)
  out["targets"] = float(target.mean())
  seg = np.asarray(b["segment_ids"])
  n_traj = sum(len(np.unique(r[r > 0])) for r in seg.reshape(-1, seg.shape[-1]))
  out["trajectories_per_row"] = n_traj / (seg.size // seg.shape[-1])
  out["mean_trajectory_tokens"] = float((seg > 0).sum() / max(n_traj, 1))
  return out
