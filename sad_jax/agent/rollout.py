"""Batched multi-turn rollouts with a persistent KV cache: the student plays episodes and
every token it wrote is recorded with its span kind and its sampling log-prob.

The sequence trained on is the sequence sampled. The prompt (task, first observation, an
optional teacher prefix) is rendered and tokenised as `prepare` does (ReAct template,
hard boundaries, BOS); the student's tokens are kept as drawn; each observation is
tokenised on its own as "Observation: …\\n" (what `prepare`'s hard boundaries give), and
those exact ids are fed to the model and recorded. Nothing is re-rendered afterwards.

A turn ends at the first newline after "Action:", at a stop token, when the text reaches
"Observation:", or after `max_new_tokens`. Tokens before "Action:" are reason, from it on
action. The episode ends when the environment is done, after `max_steps` turns, or when
its tokens reach `max_len` (truncated: the training row holds `max_len` tokens).

Slots: B rows share one cache of `cache_len` slots and one write index. A turn appends
each row's pending tokens (its kept reply's last token, the observation, or a whole new
prompt) as one left-padded block (`incremental.extend`), then decodes in chunks of
`chunk` tokens until every row's turn has ended; slots a row wrote past its turn's end
are invalidated. When the index would run past the cache, every row's history is written
again from slot 0 (compaction). See docs/design.md, "On-policy distillation".

Guided turns (`teacher=`, `guide_prob`): each turn of an episode is the teacher's with
probability p, drawn from (seed, episode key, turn). The teacher has its own cache and
write index (a lane); a lane appends what it has not yet seen of a row's history when it
next plays that row, so the student's cache takes the teacher's reply in with the next
observation. A guided turn's tokens are the episode's context, not the student's targets.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sad_jax.agent.envs.base import act, start_episode
from sad_jax.agent.evaluate import invalid_action
from sad_jax.agent.react import INVALID, parse_turn
from sad_jax.common import sharding
from sad_jax.common.errors import DataError
from sad_jax.common.types import SpanKind
from sad_jax.data import render, segment
from sad_jax.data.schema import Segment, Trajectory
from sad_jax.models import incremental
from sad_jax.models.generate import bucket, length_bucket
from sad_jax.models.transformer import init_cache, param_axes

VIEW_STEP = 256   # calls read the cache's first slots in multiples of this


@dataclasses.dataclass(frozen=True)
class RolloutSettings:
  max_new_tokens: int = 48     # per turn
  max_steps: int = 8           # turns per episode
  max_len: int = 512           # tokens per episode (the training row's length)
  temperature: float = 1.0     # 1: the logged log-probs are the policy's own
  chunk: int = 16              # decode steps per device call
  cache_len: int | None = None  # None: room for two max_len histories and a reply
  guide_prob: float = 0.0      # the chance that the teacher plays a turn (play's teacher=)
  guide_temperature: float = 0.0  # the teacher's turns: 0 = greedy, its best turn


@dataclasses.dataclass
class Job:
  """One episode to play: a task, and an optional teacher prefix (its first turns, as
  (thought, action) pairs, replayed in the environment before the student plays)."""

  task: int
  prefix: Sequence[tuple[str, str]] = ()
  key_id: int = -1      # its draws' key: fold_in(seed, key_id); −1: its index in the jobs


@dataclasses.dataclass
class Episode:
  task: int
  ids: list[int]
  kinds: list[int]
  logp: list[float]        # sampling log-prob of each token (0 where not the student's)
  mine: list[bool]         # written by the student (an on-policy target)
  turn: list[int]          # the turn index per token (-1: the prompt and the prefix)
  won: bool = False
  steps: int = 0           # turns played after the prefix (the student's and guided ones)
  invalid: int = 0         # turns that did not parse or named an action not offered
  truncated: bool = False
  prefix_turns: int = 0
  actions: list[str | None] = dataclasses.field(default_factory=list)
  turn_invalid: list[bool] = dataclasses.field(default_factory=list)
  guided: list[bool] = dataclasses.field(default_factory=list)   # the teacher's turn
  observations: list[str] = dataclasses.field(default_factory=list)

  def by_teacher(self) -> list[bool]:
    """Per token: the teacher wrote it, in a guided turn (a reply token not the student's;
    prompt, prefix and observations have turn −1)."""
    return [t >= 0 and not m for t, m in zip(self.turn, self.mine)]

  def add(self, ids, kinds, *, logp=None, mine=False, turn=-1) -> None:
    self.ids += [int(i) for i in ids]
    self.kinds += [int(k) for k in kinds]
    self.logp += [float(x) for x in logp] if logp is not None else [0.0] * len(ids)
    self.mine += [bool(mine)] * len(ids)
    self.turn += [turn] * len(ids)


@dataclasses.dataclass
class RolloutStats:
  episodes: int = 0
  generated_tokens: int = 0     # the student's kept tokens
  guided_tokens: int = 0        # the teacher's, in guided turns
  decoded_tokens: int = 0       # slots decoded (kept or not), all rows
  seconds: float = 0.0
  extend_calls: int = 0
  decode_calls: int = 0
  compactions: int = 0


def encode_segments(tokenizer, segments: list[Segment], *, bos: bool) -> tuple[np.ndarray,
                                                                                np.ndarray]:
  """(ids, kinds) of segments rendered and tokenised as `prepare` does (ReAct)."""
  r = render.render_react(Trajectory(id="rollout", segments=list(segments)))
  enc = segment.encode_rendered(tokenizer, [r], parse_special=False)[0]
  spans = segment.token_kinds(r, enc, bos_id=tokenizer.bos_id if bos else None)
  return spans.ids, spans.kinds


def _ended(tokens: Sequence[int], n: int, tokenizer, stop_ids: set[int]) -> bool:
  if any(t in stop_ids for t in tokens[:n]):
    return True
  text = tokenizer.decode(list(tokens[:n]))
  a = text.find("Action:")
  return (a >= 0 and "\n" in text[a:]) or "Observation:" in text


def turn_end(tokens: Sequence[int], tokenizer, stop_ids: set[int], *,
             known: int = 0) -> int | None:
  """How many of `tokens` (a reply so far) the turn keeps, or None if it goes on. The
  end is monotone in the length, so it is found by bisection (the first `known` tokens
  are known not to end it)."""
  if not tokens or not _ended(tokens, len(tokens), tokenizer, stop_ids):
    return None
  lo, hi = known, len(tokens)   # not ended at lo, ended at hi
  while hi - lo > 1:
    mid = (lo + hi) // 2
    if _ended(tokens, mid, tokenizer, stop_ids):
      hi = mid
    else:
      lo = mid
  return hi


def reply_kinds(tokens: Sequence[int], tokenizer) -> list[int]:
  """Reason before the token where "Action:" starts, action from it on (the first token
  whose text starts at or after it; the last token if "Action:" starts inside it)."""
  text = tokenizer.decode(list(tokens))
  a = text.find("Action:")
  n = len(tokens)
  if a < 0:
    return [SpanKind.REASON] * n
  lo, hi = 0, n                 # the first k whose start offset is ≥ a lies in (lo, hi]
  while hi - lo > 1:
    mid = (lo + hi) // 2
    if len(tokenizer.decode(list(tokens[:mid]))) >= a:
      hi = mid
    else:
      lo = mid
  first = hi if a > 0 else 0
  if first >= n:
    first = n - 1
  return [SpanKind.REASON] * first + [SpanKind.ACTION] * (n - first)


def _begin(env, job: Job, tokenizer) -> tuple[Episode, bool]:
  """Resets `env`, replays the teacher prefix, and returns (episode with its prompt, done)."""
  segs, _, _ = start_episode(env, task=job.task)
  done, won, played = False, False, 0
  for thought, action in job.prefix:
    if done:
      break
    segs.append(Segment("reason", thought))
    r = act(env, segs, action)
    done, won, played = r.done, r.won, played + 1
  ids, kinds = encode_segments(tokenizer, segs, bos=tokenizer.bos_id is not None)
  ep = Episode(task=job.task, ids=[], kinds=[], logp=[], mine=[], turn=[], won=won,
               prefix_turns=played)
  ep.add(ids, kinds)
  return ep, done


@dataclasses.dataclass
class _Lane:
  """One model's KV cache over the B slots: its write index, the slots that are live,
  and how many of each row's tokens it holds. The student's lane plays every turn the
  teacher does not; the teacher's lane (guided turns) catches up on a row's history only
  when it plays one of its turns."""

  cfg: object
  params: object
  cache: list
  valid: np.ndarray            # [B, cache_len]
  keys: np.ndarray             # [B, 2] raw row keys
  cached: list[int]            # tokens of each row's episode in this cache
  temperature: float
  index: int = 0

  def reset_row(self, i: int) -> None:
    self.valid[i] = 0
    self.cached[i] = 0


def _lane(cfg, params, b: int, cache_len: int, temperature: float, dtype, layout) -> _Lane:
  cache = init_cache(cfg, b, cache_len, dtype)
  if layout is not None:
    mesh, rules = layout
    params = jax.device_put(params, sharding.tree_shardings(
        params, param_axes(params), mesh, rules))
    cache = jax.device_put(cache, incremental.cache_shardings(cache, mesh, rules))
  return _Lane(cfg, params, cache, np.zeros((b, cache_len), np.int32),
               np.zeros((b, 2), np.uint32), [0] * b, temperature)


def _reply(lane: _Lane, eps: list, playing: list[bool], *, s: RolloutSettings, budget: int,
           tokenizer, stops: set[int], vocab: int, dtype, layout, stats: RolloutStats
           ) -> tuple[list, list]:
  """The playing rows' replies in `lane`: their pending tokens appended as one
  left-padded block, then decoded in chunks until every playing row's turn has ended.
  Keeps each reply's slots, invalidates those past it. Returns (replies, logps), None for
  rows not playing."""
  b, cache_len = len(eps), lane.valid.shape[1]

  def view(upto: int) -> int:   # the slots a call reads: the live ones, rounded up
    return min(cache_len, -(-upto // VIEW_STEP) * VIEW_STEP)

  def pending() -> list[int]:
    return [len(eps[i].ids) - lane.cached[i] if playing[i] else 0 for i in range(b)]

  todo = pending()
  width = bucket(max(todo))
  if lane.index + width + budget > cache_len:   # compaction: write histories from slot 0
    lane.valid[:] = 0
    lane.cached = [0] * b
    lane.index, stats.compactions = 0, stats.compactions + 1
    todo = pending()
    width = bucket(max(todo))
    if width + budget > cache_len:
      raise DataError(f"cache_len {cache_len} cannot hold a {max(todo)}-token history "
                      f"and a {s.max_new_tokens}-token reply", field="cache_len")
  ids = np.zeros((b, width), np.int32)
  pos = np.zeros((b, width), np.int32)
  seg = np.zeros((b, width), np.int32)
  for i in range(b):
    if todo[i]:
      lo, n = lane.cached[i], todo[i]
      ids[i, width - n:] = eps[i].ids[lo:]
      pos[i, width - n:] = np.arange(lo, lo + n)
      seg[i, width - n:] = 1
      lane.cached[i] = lo + n
  temp = jnp.float32(lane.temperature)
  lane.cache, tok, logp = incremental.extend(
      lane.params, lane.cache, ids, pos, seg, np.int32(lane.index), lane.valid, lane.keys,
      temp, cfg=lane.cfg, vocab=vocab, view=view(lane.index + width), dtype=dtype,
      layout=layout)
  lane.valid[:, lane.index:lane.index + width] = seg
  lane.index += width
  stats.extend_calls += 1
  replies = [[int(t)] if playing[i] else None for i, t in enumerate(np.asarray(tok))]
  logps = [[float(x)] if playing[i] else None for i, x in enumerate(np.asarray(logp))]
  kept = [turn_end(replies[i], tokenizer, stops) if playing[i] else None for i in range(b)]
  # ---- decode until every playing row's turn has ended
  d_start, written = lane.index, 0
  position = np.asarray([len(e.ids) if e is not None else 0 for e in eps], np.int32)
  last = np.asarray(tok)
  while written < budget and any(playing[i] and kept[i] is None for i in range(b)):
    lane.cache, toks, lps = incremental.decode(
        lane.params, lane.cache, last, position + written, np.int32(lane.index), lane.keys,
        temp, cfg=lane.cfg, vocab=vocab, steps=s.chunk, view=view(lane.index + s.chunk),
        dtype=dtype, layout=layout)
    toks, lps = np.asarray(toks), np.asarray(lps)
    lane.index, written = lane.index + s.chunk, written + s.chunk
    stats.decode_calls += 1
    stats.decoded_tokens += b * s.chunk
    last = toks[:, -1]
    for i in range(b):
      if not playing[i] or kept[i] is not None:
        continue
      known = len(replies[i])
      replies[i] += toks[i].tolist()
      logps[i] += lps[i].tolist()
      kept[i] = turn_end(replies[i][:s.max_new_tokens], tokenizer, stops,
                         known=min(known, s.max_new_tokens))
  # ---- keep each reply's slots (token k sits at slot d_start + k once fed back)
  for i in range(b):
    if not playing[i]:
      continue
    n = kept[i] or min(len(replies[i]), s.max_new_tokens)
    replies[i], logps[i] = replies[i][:n], logps[i][:n]
    in_cache = min(n, written)
    lane.valid[i, d_start: d_start + in_cache] = 1
    lane.valid[i, d_start + in_cache: d_start + written] = 0
    lane.cached[i] = len(eps[i].ids) + in_cache
  return replies, logps


def guided(seed: int, key_id: int, turn: int, prob: float) -> bool:
  """Whether the teacher plays this turn: a draw of (seed, episode key, turn), so it does
  not depend on the slot, the other rows or the process."""
  return prob > 0 and np.random.default_rng([seed, key_id, turn, 0x6D1D]).random() < prob


def play(cfg, params, tokenizer, envs: list, jobs: Sequence[Job], *,
         settings: RolloutSettings, seed: int, stop_ids: Sequence[int] = (),
         dtype=jnp.float32, progress=None, layout=None,
         teacher=None) -> tuple[list[Episode], RolloutStats]:
  """Plays every job on `len(envs)` slots; episodes come back in the jobs' order. An
  episode's draws are a function of `seed` and its job (its task, prefix and key id), not
  of timing, of the slot it played in, or of the other jobs.

  layout: (mesh, rules) to play on a device mesh: the parameters by their logical axes,
  the slots over the batch axes (data, fsdp) and the KV heads over tensor.
  teacher: (cfg, params) of the model that plays the guided turns: each turn is the
  teacher's with probability `settings.guide_prob` (drawn per episode and turn, see
  `guided`), written at `settings.guide_temperature` into its own cache; its tokens are
  context for the student (not `mine`, log-prob 0)."""
  s = settings
  b = len(envs)
  budget = -(-max(s.max_new_tokens - 1, 1) // s.chunk) * s.chunk
  vocab = int(tokenizer.vocab_size)
  models = [("student", cfg)] + ([("teacher", teacher[0])] if teacher is not None else [])
  for name, c in models:
    if vocab > c.vocab_size:
      raise DataError(f"tokenizer has {vocab} tokens, the {name} {c.vocab_size}",
                      field="vocab_size")
  if s.guide_prob > 0 and teacher is None:
    raise DataError("guide_prob > 0 needs the teacher that plays the guided turns",
                    field="guide_prob")
  stops = set(int(t) for t in stop_ids)
  stats = RolloutStats()
  t0 = time.perf_counter()
  queue = list(enumerate(jobs))
  rows: list[dict | None] = [None] * b
  out: dict[int, Episode] = {}
  cache_len = s.cache_len or length_bucket(2 * s.max_len) + budget
  student = _lane(cfg, params, b, cache_len, s.temperature, dtype, layout)
  guide = (_lane(*teacher, b, cache_len, s.guide_temperature, dtype, layout)
           if teacher is not None and s.guide_prob > 0 else None)
  lanes = [student] + ([guide] if guide is not None else [])
  base_key = jax.random.PRNGKey(seed)

  def finish(i: int) -> None:
    row = rows[i]
    out[row["order"]] = row["ep"]
    stats.episodes += 1
    if progress is not None:
      progress(1)
    rows[i] = None
    for lane in lanes:
      lane.reset_row(i)

  def start(i: int) -> None:
    while queue:
      order, job = queue.pop(0)
      ep, done = _begin(envs[i], job, tokenizer)
      key_id = job.key_id if job.key_id >= 0 else order
      rows[i] = {"order": order, "ep": ep, "key_id": key_id}
      key = jax.random.fold_in(base_key, key_id)
      student.keys[i] = np.asarray(key, np.uint32)
      for lane in lanes:
        lane.reset_row(i)
      if guide is not None:   # the teacher's draws: a key of their own
        guide.keys[i] = np.asarray(jax.random.fold_in(key, 0x6D1D), np.uint32)
      if not done and len(ep.ids) < s.max_len - 1:
        return
      ep.truncated = not done
      finish(i)

  for i in range(b):
    start(i)
  while any(rows):
    eps = [None if r is None else r["ep"] for r in rows]
    by_teacher = [r is not None and guided(seed, r["key_id"], r["ep"].steps, s.guide_prob)
                  for r in rows]
    replies: list = [None] * b
    logps: list = [None] * b
    for lane, flag in ((student, False), (guide, True)):
      playing = [r is not None and by_teacher[i] == flag for i, r in enumerate(rows)]
      if lane is None or not any(playing):
        continue
      got, lps = _reply(lane, eps, playing, s=s, budget=budget, tokenizer=tokenizer,
                        stops=stops, vocab=vocab, dtype=dtype, layout=layout, stats=stats)
      for i in range(b):
        if playing[i]:
          replies[i], logps[i] = got[i], lps[i]
    # ---- record each reply, step the environments
    for i, r in enumerate(rows):
      if r is None:
        continue
      reply, ep, mine = replies[i], r["ep"], not by_teacher[i]
      ep.add(reply, reply_kinds(reply, tokenizer), logp=logps[i] if mine else None,
             mine=mine, turn=ep.steps)
      if mine:
        stats.generated_tokens += len(reply)
      else:
        stats.guided_tokens += len(reply)
      ep.guided.append(not mine)
      text = tokenizer.decode([t for t in reply if t not in stops])
      _, action = parse_turn(text)
      ep.actions.append(action)
      done, bad = False, action is None
      if action is None:
        obs = INVALID
      else:
        bad = invalid_action(envs[i], action)
        result = act(envs[i], [], action)
        obs, done, ep.won = result.observation, result.done, result.won
      ep.invalid += bad
      ep.turn_invalid.append(bool(bad))
      ep.steps += 1
      ep.observations.append(obs)
      o_ids, o_kinds = encode_segments(tokenizer, [Segment("observation", obs)], bos=False)
      ep.add(o_ids, o_kinds)
      if done or ep.steps >= s.max_steps or len(ep.ids) >= s.max_len - 1:
        ep.truncated = not done and ep.steps < s.max_steps
        finish(i)
        start(i)
  stats.seconds = time.perf_counter() - t0
  return [out[k] for k in sorted(out)], stats


def to_arrays(episodes: Sequence[Episode], seq_len: int) -> dict[str, np.ndarray]:
  """[N, seq_len] training rows, one episode each (cut at seq_len, padded with 0):
  ids, kinds, positions, segment_ids, logp (the behaviour log-prob of token t), mine,
  turn, invalid (the token's turn was invalid), guided (the teacher wrote it, in a guided
  turn); per row won_b and offpolicy_b (False)."""
  n = len(episodes)
  out = {"ids": np.zeros((n, seq_len), np.int32), "kinds": np.zeros((n, seq_len), np.int32),
         "positions": np.zeros((n, seq_len), np.int32),
         "segment_ids": np.zeros((n, seq_len), np.int32),
         "logp": np.zeros((n, seq_len), np.float32), "mine": np.zeros((n, seq_len), bool),
         "turn": np.full((n, seq_len), -1, np.int32),
         "invalid": np.zeros((n, seq_len), bool), "guided": np.zeros((n, seq_len), bool),
         "won_b": np.asarray([e.won for e in episodes], bool),
         "offpolicy_b": np.zeros((n,), bool)}
  for r, ep in enumerate(episodes):
    m = min(len(ep.ids), seq_len)
    out["ids"][r, :m] = ep.ids[:m]
    out["kinds"][r, :m] = ep.kinds[:m]
    out["positions"][r, :m] = np.arange(m)
    out["segment_ids"][r, :m] = 1
    out["logp"][r, :m] = ep.logp[:m]
    out["mine"][r, :m] = ep.mine[:m]
    out["turn"][r, :m] = ep.turn[:m]
    bad = np.asarray(ep.turn_invalid + [False], bool)   # index −1: context
    out["invalid"][r, :m] = bad[np.asarray(ep.turn[:m])]
    out["guided"][r, :m] = ep.by_teacher()[:m]
  return out
