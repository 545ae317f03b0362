"""`sad-jax eval`: run a checkpoint as a ReAct agent on held-out tasks and score it.

Reports the success rate with a 95% Wilson interval, mean steps, the invalid-action rate
(turns that did not parse, or named an action the environment does not offer), mean
reasoning length in tokens, and generation tokens/s. Each episode's transcript is a
trajectory in the project's schema (JSONL, viewable with `sad-jax inspect`).
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

from sad_jax.agent import react
from sad_jax.agent.env import act, make_env
from sad_jax.agent.math_env import parse_action as math_action
from sad_jax.agent.tools import SandboxLimits, run_python
from sad_jax.data import schema
from sad_jax.data.schema import Segment, Trajectory
from sad_jax.errors import DataError


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

  def summary(self) -> str:
    lo, hi = self.ci95
    return (f"{self.env} [{self.split}] {self.episodes} episodes: success "
            f"{100 * self.success_rate:.1f}% (95% CI {100 * lo:.1f}–{100 * hi:.1f}), "
            f"mean steps {self.mean_steps:.1f}, invalid actions "
            f"{100 * self.invalid_action_rate:.1f}%, reasoning {self.mean_reason_tokens:.1f} "
            f"tokens, {self.tokens_per_s:.0f} tokens/s" + (f", SAG n={self.sag}" if self.sag
                                                           else ""))


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
  try:
    for lo in range(0, len(tasks), len(envs)):
      group = tasks[lo: lo + len(envs)]
      trajs, live, steps, won = [], [], [], []
      for env, task in zip(envs, group):
        obs, info = env.reset(task=task)
        segs = [Segment("task", info["goal"])]
        if obs and obs != info["goal"]:
          segs.append(Segment("observation", obs))
        trajs.append(Trajectory(id=f"{env_spec}#{task}", segments=segs,
                                source=f"eval:{env_spec}", success=None,
                                meta={"env": env_spec, "task": int(task), "split": split}))
        live.append(True)
        steps.append(0)
        won.append(False)
      for turn_index in range(max_steps):
        active = [i for i, a in enumerate(live) if a]
        if not active:
          break
        samples = max(1, sag)
        cands = policy.turns([trajs[i] for i in active], samples=samples,
                             temperature=sag_temperature if sag else None,
                             seed=seed * 100_003 + lo * 131 + turn_index,
                             # one batch size for the whole run: each new size would compile
                             # prefill and decode again, which costs more than padded rows
                             min_batch=len(envs) * samples)
        for i, options in zip(active, cands):
          turn, _ = react.choose(options, code_runner=runner) if sag else (options[0], {})
          env, traj = envs[i], trajs[i]
          turns += 1
          reason_tokens += len(policy.tokenizer.encode(turn.thought).ids) if turn.thought else 0
          traj.segments.append(Segment("reason", turn.thought or "(none)"))
          if turn.action is None:
            invalid += 1
            traj.segments.append(Segment("action", turn.raw.strip() or "(nothing)"))
            traj.segments.append(Segment("observation", react.INVALID))
          else:
            valid = env.valid_actions()
            if (valid is not None and turn.action not in valid) or (
                env_spec.startswith("math:") and math_action(turn.action) is None):
              invalid += 1
            r = act(env, traj.segments, turn.action)
            if r.done:
              live[i], won[i] = False, r.won
          steps[i] += 1
      for i, traj in enumerate(trajs):
        traj.success = won[i]
        traj.meta["steps"] = steps[i]
        done_trajs.append(traj)
      bar.update(len(group))
  finally:
    bar.close()
    for env in envs if owned else ():
      env.close()
  if transcripts:
    os.makedirs(os.path.dirname(os.path.abspath(transcripts)), exist_ok=True)
    schema.write_jsonl(transcripts, done_trajs)
  n = len(done_trajs)
  wins = sum(bool(t.success) for t in done_trajs)
  return EvalResult(
      env=env_spec, split=split, episodes=n, successes=wins, success_rate=wins / max(1, n),
      ci95=wilson(wins, n), mean_steps=sum(t.meta["steps"] for t in done_trajs) / max(1, n),
      invalid_action_rate=invalid / max(1, turns),
      mean_reason_tokens=reason_tokens / max(1, turns),
      tokens_per_s=policy.generated_tokens / max(policy.generate_seconds, 1e-9), sag=sag)


def load_policy(checkpoint: str, *, tokenizer: str | None = None, **kw) -> react.Policy:
  """A model folder (orbax params + config.json, e.g. a training run's `final/`, or an HF
  folder) and its tokenizer (in the folder, or given)."""
  from sad_jax.data.tokenizer import load_tokenizer
  from sad_jax.models.checkpoint_io import load_model

  cfg, params = load_model(checkpoint)
  tok_path = tokenizer or next(
      (os.path.join(checkpoint, n) for n in ("tokenizer.model", "tokenizer.json")
       if os.path.exists(os.path.join(checkpoint, n))), None)
  if tok_path is None:
    raise DataError("no tokenizer in the checkpoint folder: pass --tokenizer (a prepared "
                    "dataset's tokenizer.model / tokenizer.json)", path=checkpoint)
  tok = load_tokenizer(tok_path)
  if tok.vocab_size > cfg.vocab_size:
    raise DataError(f"tokenizer has {tok.vocab_size} tokens, the model {cfg.vocab_size}",
                    path=tok_path, field="vocab_size")
  return react.Policy(cfg=cfg, params=params, tokenizer=tok, **kw)
