"""Scoring models as agents in the environment and per span on the dev split."""

from __future__ import annotations

import dataclasses
import functools
import os

import numpy as np

from sad_jax.common.errors import DataError
from sad_jax.experiment.study.cells import DevData, _read, _say, _write, model_stamp


class Evaluator:
  """Plays models on a fold's games; one set of environments (a JVM each for TWX) serves
  every model. Results are cached per (model, split, games) next to `out`."""

  def __init__(self, c):
    self.c = c
    self.envs: list = []

  def close(self) -> None:
    for env in self.envs:
      env.close()
    self.envs = []

  def play(self, name: str, folder: str, split: str, games: int, out: str, *,
           transcripts: bool = False, rewrite: list[tuple[str, str]] | None = None) -> dict:
    """rewrite: (old, new) replacements in every observation (a counterfactual fold)."""
    from sad_jax.agent import evaluate, folds
    from sad_jax.agent.envs.registry import make_env

    stamp = model_stamp(folder)
    rules = [list(x) for x in rewrite or []]
    r = _read(out)
    if r and r.get("episodes") == games and r.get("model_mtime") == stamp and \
        r.get("split") == split and r.get("rewrite", []) == rules and \
        (not transcripts or os.path.exists(out + "l")):
      return r
    batch = min(self.c.eval.batch, games)
    self.envs.extend(make_env(self.c.env) for _ in range(batch - len(self.envs)))
    # the wrappers share the JVMs (and are not closed: that would close them)
    envs = [folds.RewrittenEnv(e, rewrite) for e in self.envs] if rewrite else self.envs
    policy = self.policy(folder)
    res = evaluate.evaluate(policy, env_spec=self.c.env, split=split, episodes=games,
                            max_steps=self.c.eval.max_steps, batch=batch, envs=envs,
                            transcripts=out + "l" if transcripts else None, progress=True)
    if rewrite and not sum(e.replaced for e in envs):
      raise DataError(f"no rule of {rules} matched an observation of the {split} fold",
                      field="eval.test_rewrite")
    r = {**dataclasses.asdict(res), "model_mtime": stamp, "rewrite": rules}
    _write(out, r)
    _say(f"  {name} [{split}]: {res.summary()}")
    return r

  def policy(self, folder: str):
    from sad_jax.agent import evaluate

    return evaluate.load_policy(folder, max_new_tokens=self.c.eval.max_new_tokens,
                                max_prompt_tokens=self.c.eval.max_prompt_tokens)


@functools.lru_cache(maxsize=8)
def _eval_fn(cfg, vocab: int):
  import jax

  from sad_jax.distill import objectives
  from sad_jax.distill.losses import LossSettings
  from sad_jax.trainer import step

  obj = objectives.Objective(name="sad", groups=objectives.groups_for("sad"),
                             settings=LossSettings(vocab_size=vocab, chunk_size=128))
  return jax.jit(functools.partial(step.eval_step, model_cfg=cfg, obj=obj))


def per_span_eval(folder: str, dataset: str, store: str, *, seq_len: int, k: int,
                  split: str = "validation") -> dict[str, float]:
  """Teacher-forced reason KL to the teacher and action accuracy on a prepared split, the
  same measurement for every model (the `sad` eval step with unit weights)."""
  import jax.numpy as jnp

  from sad_jax.models.checkpoint_io import load_model
  from sad_jax.trainer import pipeline, step

  cfg, params = load_model(folder)
  data = pipeline.open_split(dataset, split)
  teacher = pipeline.open_teacher(store, data, k=k)
  layout = pipeline.Layout(accum=1, rows=4, length=seq_len + 1, k=k)
  fn = _eval_fn(cfg, cfg.vocab_size)
  total = step.eval_totals(fn(params, jnp.zeros(2), batch, jnp.ones(2))
                           for batch, _ in pipeline.eval_batches(data, teacher, layout))
  n = np.maximum(total["count"], 1)
  return {"reason_kl": float(total["sum"][0] / n[0]),
          "action_accuracy": float(total["correct"][1] / n[1])}


def span_metrics(folder: str, c, dev: DevData, ev: Evaluator) -> dict[str, float]:
  """Per-span metrics on the teacher's dev-fold trajectories: teacher-forced reason KL and
  action accuracy, and the decision accuracy that the recorded thought cannot give away."""
  from sad_jax.agent import evaluate
  from sad_jax.data import schema

  out = per_span_eval(folder, dev.dataset, dev.store, seq_len=c.data.seq_len,
                      k=c.store_k, split="train")
  trajs = list(schema.read_jsonl(dev.jsonl))
  out.update(evaluate.decision_accuracy(ev.policy(folder), trajs, batch=c.eval.batch))
  return out
