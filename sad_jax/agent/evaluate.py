"""`sad-jax eval`: run a checkpoint as a ReAct agent on held-out tasks and score it.

Reports the success rate with a 95% Wilson interval, mean steps, the invalid-action rate
(turns that did not parse, or named an action the environment does not offer), mean
reasoning length in tokens, and generation tokens/s. Each episode's transcript is a
trajectory in the project's schema (JSONL, viewable with `sad-jax inspect`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from sad_jax.agent import react
from sad_jax.agent.envs.base import act, start_episode
from sad_jax.agent.envs.math_env import MathEnv
from sad_jax.agent.envs.math_env import parse_action as math_action
from sad_jax.agent.envs.registry import make_env
from sad_jax.agent.tools import SandboxLimits, run_python
from sad_jax.common import fileio
from sad_jax.common.errors import DataError
from sad_jax.data import schema
from sad_jax.data.schema import Segment, Trajectory


def wilson(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
  """95% Wilson score interval of a binomial proportion."""
  if n == 0:
    return 0.0, 1.0
  p = successes / n
  denom = 1 + z * z / n
  centre = (p + z * z / (2 * n)) / denom
  half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
  return max(0.0, centre - half), min(1.0, centre + half)


@dataclasses.dataclass
class EvalResult:
  env: str
  split: str
  episodes: int
  successes: int
  success_rate: float
  ci95: tuple[float, float]
  mean_steps: float
  invalid_action_rate: float
  mean_reason_tokens: float
  tokens_per_s: float
  sag: int
  # one {task, won, steps} per game, in the fold's order: paired comparisons need them
  games: list = dataclasses.field(default_factory=list)

  def summary(self) -> str:
    lo, hi = self.ci95
    return (f"{self.env} [{self.split}] {self.episodes} episodes: success "
            f"{100 * self.success_rate:.1f}% (95% CI {100 * lo:.1f}–{100 * hi:.1f}), "
            f"mean steps {self.mean_steps:.1f}, invalid actions "
            f"{100 * self.invalid_action_rate:.1f}%, reasoning {self.mean_reason_tokens:.1f} "
            f"tokens, {self.tokens_per_s:.0f} tokens/s" + (f", SAG n={self.sag}" if self.sag
                                                           else ""))


def invalid_action(env, action: str) -> bool:
  """An action the environment does not offer, or (math) an answer that does not parse:
  the invalid-action count of `evaluate` and of the rollout engine."""
  valid = env.valid_actions()
  return (valid is not None and action not in valid) or (
      isinstance(env, MathEnv) and math_action(action) is None)


def evaluate(policy: react.Policy, *, env_spec: str, split: str = "test", episodes: int = 20,
             start: int = 0, max_steps: int = 30, batch: int = 8, sag: int = 0,
             sag_temperature: float = 0.7, seed: int = 0, transcripts: str | None = None,
             progress: bool = True, env_kwargs: dict[str, Any] | None = None,
             envs: list | None = None) -> EvalResult:
  """Runs `episodes` tasks of the fold, `batch` environments in lockstep.

  envs: environments of `env_spec` to reuse (the caller's; left open). Evaluating several
  models on one set saves the start-up: a TextWorld-Express environment is a JVM of its own,
  and starting 16 takes longer than a small model's whole evaluation.
  """
  from tqdm.auto import tqdm

  if episodes < 1 or batch < 1:
    raise DataError(f"episodes ({episodes}) and batch ({batch}) must be at least 1",
                    field="episodes" if episodes < 1 else "batch")
  owned = envs is None
  if owned:
    envs = [make_env(env_spec, **(env_kwargs or {})) for _ in range(min(batch, episodes))]
  else:
    envs = list(envs)[:min(batch, episodes)]
  tasks = envs[0].tasks(split)[start: start + episodes]
  done_trajs: list[Trajectory] = []
  turns = invalid = reason_tokens = 0
  runner = (lambda code: run_python(code, limits=SandboxLimits(wall_s=5, cpu_s=3))) \
      if env_spec.startswith("math:") else None
  bar = tqdm(total=len(tasks), desc=f"eval {env_spec}", unit="ep", disable=not progress,
             leave=False)
  # Each environment is a slot: when its episode ends, the next task of the fold starts
  # there, so one long episode does not hold a whole group of finished ones (lockstep
  # groups ran every turn of the slowest episode for all of them).
  queue = list(enumerate(tasks))
  slots: list[dict | None] = [None] * len(envs)
  finished: dict[int, Trajectory] = {}
  samples = max(1, sag)

  def begin(i: int) -> None:
    if not queue:
      slots[i] = None
      return
    order, task = queue.pop(0)
    segs, _, _ = start_episode(envs[i], task=task)
    traj = Trajectory(id=f"{env_spec}#{task}", segments=segs, source=f"eval:{env_spec}",
                      success=None, meta={"env": env_spec, "task": int(task), "split": split})
    slots[i] = {"order": order, "traj": traj, "steps": 0, "won": False}

  def finish(i: int) -> None:
    slot = slots[i]
    slot["traj"].success = slot["won"]
    slot["traj"].meta["steps"] = slot["steps"]
    finished[slot["order"]] = slot["traj"]
    bar.update(1)
    begin(i)

  try:
    for i in range(len(envs)):
      begin(i)
    turn_index = 0
    while any(slots):
      active = [i for i, slot in enumerate(slots) if slot is not None]
      cands = policy.turns([slots[i]["traj"] for i in active], samples=samples,
                           temperature=sag_temperature if sag else None,
                           seed=seed * 100_003 + turn_index,
                           # one batch size for the whole run: each new size would compile
                           # prefill and decode again, which costs more than padded rows
                           min_batch=len(envs) * samples)
      turn_index += 1
      for i, options in zip(active, cands):
        turn, _ = react.choose(options, code_runner=runner) if sag else (options[0], {})
        env, slot = envs[i], slots[i]
        traj = slot["traj"]
        turns += 1
        reason_tokens += len(policy.tokenizer.encode(turn.thought).ids) if turn.thought else 0
        traj.segments.append(Segment("reason", turn.thought or "(none)"))
        done = False
        if turn.action is None:
          invalid += 1
          traj.segments.append(Segment("action", turn.raw.strip() or "(nothing)"))
          traj.segments.append(Segment("observation", react.INVALID))
        else:
          invalid += invalid_action(env, turn.action)
          r = act(env, traj.segments, turn.action)
          done, slot["won"] = r.done, r.won
        slot["steps"] += 1
        if done or slot["steps"] >= max_steps:
          finish(i)
    done_trajs = [finished[k] for k in sorted(finished)]
  finally:
    bar.close()
    for env in envs if owned else ():
      env.close()
  if transcripts:
    fileio.makedirs(fileio.dirname(fileio.abspath(transcripts)))
    schema.write_jsonl(transcripts, done_trajs)
  n = len(done_trajs)
  wins = sum(bool(t.success) for t in done_trajs)
  return EvalResult(
      env=env_spec, split=split, episodes=n, successes=wins, success_rate=wins / max(1, n),
      ci95=wilson(wins, n), mean_steps=sum(t.meta["steps"] for t in done_trajs) / max(1, n),
      invalid_action_rate=invalid / max(1, turns),
      mean_reason_tokens=reason_tokens / max(1, turns),
      tokens_per_s=policy.generated_tokens / max(policy.generate_seconds, 1e-9), sag=sag,
      games=[{"task": t.meta["task"], "won": bool(t.success), "steps": t.meta["steps"]}
             for t in done_trajs])


def _norm(action: str | None) -> str:
  return " ".join((action or "").lower().split())


def decision_accuracy(policy: react.Policy, trajectories: list[Trajectory], *,
                      batch: int = 32) -> dict[str, float]:
  """The decision, measured where the thought cannot give it away: at every step of the
  given trajectories (e.g. the teacher's on dev-fold games), the policy writes its OWN
  thought and action after the recorded history, and its action is compared with the
  recorded one. Teacher-forced action accuracy is near 1 for any model once the recorded
  thought (which ends by naming the action) is in the context; this is not.

  Returns {"decision_accuracy", "decision_valid" (the share that parsed), "decisions"}.
  """
  prefixes, wanted = [], []
  for traj in trajectories:
    segs = traj.segments
    for i, seg in enumerate(segs):
      if seg.kind == "reason" and i + 1 < len(segs) and segs[i + 1].kind == "action":
        prefixes.append(dataclasses.replace(traj, segments=list(segs[:i])))
        wanted.append(_norm(segs[i + 1].text))
  right = parsed = 0
  for lo in range(0, len(prefixes), batch):
    outs = policy.turns(prefixes[lo: lo + batch], min_batch=batch)
    for options, want in zip(outs, wanted[lo: lo + batch]):
      turn = options[0]
      parsed += turn.action is not None
      right += turn.action is not None and _norm(turn.action) == want
  n = max(len(wanted), 1)
  return {"decision_accuracy": right / n, "decision_valid": parsed / n,
          "decisions": len(wanted)}


def load_policy(checkpoint: str, *, tokenizer: str | None = None, **kw) -> react.Policy:
  """A model folder (a training run, its `final/` of orbax params + config.json, or an HF
  folder), its tokenizer (in the folder or the run's dataset, or given) and the template
  it was trained with (recorded in the folder or the run's dataset; else ReAct)."""
  from sad_jax.data.tokenizer import load_tokenizer
  from sad_jax.models.checkpoint_io import load_model, resolve_source

  source = resolve_source(checkpoint)
  cfg, params = load_model(source.model_dir)
  tok_path = tokenizer or source.tokenizer_path()
  if tok_path is None:
    raise DataError("no tokenizer in the checkpoint folder: pass --tokenizer (a prepared "
                    "dataset's tokenizer.model / tokenizer.json)", path=checkpoint)
  tok = load_tokenizer(tok_path)
  if tok.vocab_size > cfg.vocab_size:
    raise DataError(f"tokenizer has {tok.vocab_size} tokens, the model {cfg.vocab_size}",
                    path=tok_path, field="vocab_size")
  kw.setdefault("template", source.template(tok))
  return react.Policy(cfg=cfg, params=params, tokenizer=tok, **kw)
