"""Training a cell once: a finished run whose inputs are unchanged is kept, anything else
is (re)trained."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import time

from sad_jax.experiment.study.cells import STORE_TEACHER, _read, _say, _write


def trained(run: str, steps: int) -> bool:
  """A finished run: final params exist and metrics reached `steps`."""
  from sad_jax.trainer import metrics

  if not os.path.isdir(os.path.join(run, "final", "params")):
    return False
  try:
    rows = metrics.read_jsonl(run)
  except OSError:
    return False
  return any(r.get("step") == steps and r.get("split") == "train" and "loss" in r for r in rows)


def inputs_of(dataset: str, store: str = "") -> dict:
  """What a run learns from, beyond its config (which names the dataset and store only by
  path): the prepared data's fingerprint and the store's manifest and teacher. A run whose
  inputs changed under the same paths (another teacher, its episodes) is trained again."""
  from sad_jax.data import prepare
  from sad_jax.teacher.store import file_sha256

  out = {"dataset": prepare.load_prepared(dataset)[2]["fingerprint"]}
  if store:
    out["store"] = file_sha256(os.path.join(store, "manifest.json"))
    out["teacher"] = (_read(os.path.join(store, STORE_TEACHER)) or {}).get("model_mtime")
  return out


def train(name: str, run: str, config, steps: int, *, inputs: dict | None = None) -> bool:
  """Trains unless the same config already finished on the same `inputs` (`inputs_of`; a
  run from before they were recorded is taken as is); True if it trained."""
  from sad_jax.trainer import train as train_lib

  inputs_path = os.path.join(run, "study_inputs.json")
  before = _read(inputs_path)
  if inputs is not None and before is not None and before != inputs:
    changed = sorted(k for k in set(before) | set(inputs) if before.get(k) != inputs.get(k))
    _say(f"  {name}: its inputs changed since it was trained ({', '.join(changed)}); "
         "training again")
    shutil.rmtree(run)
  cfg = _read(os.path.join(run, "config.json"))
  new = train_lib.config_dict(config)
  # the attention kernel computes the same attention (to float rounding, like another
  # CPU): a cell trained with another one is the same plan, not hours to retrain
  kernel = (cfg or {}).get("model.attention", new.get("model.attention"))
  if cfg is not None and kernel != new.get("model.attention"):
    cfg = {**cfg, "model.attention": new.get("model.attention")}
  same = None if cfg is None else cfg == new
  # A finished run whose config lacks only keys added to the code since (with whatever
  # value they now have) is the same plan: the code ran without them. Otherwise every new
  # config field would retrain a study's hours of finished cells.
  added = sorted(set(new) - set(cfg or {}))
  older = bool(cfg and added and all(new.get(k) == v for k, v in cfg.items()))
  if (same or older) and trained(run, steps):
    since = f"; config keys added since: {', '.join(added)}" if older else ""
    if kernel != new.get("model.attention"):
      since += f"; trained with attention {kernel!r}"
    _say(f"  {name}: already trained ({run}, checked{since})")
    return False
  if same is False:  # another plan's run: its checkpoints would refuse to resume
    _say(f"  {name}: the plan changed since {run} was trained; training again")
    shutil.rmtree(run)
  t0 = time.perf_counter()
  with contextlib.redirect_stdout(io.StringIO()):  # step lines go to metrics.jsonl
    result = train_lib.train_and_evaluate(config, run)
  if result.status != "finished":  # a signal stopped it: later stages need its export
    raise SystemExit(f"sad-jax study: {name} stopped at step {result.step} of {steps} "
                     f"({result.status}); its checkpoint is in {run}; run the same command "
                     "again to resume")
  if inputs is not None:
    _write(inputs_path, inputs)
  _say(f"  {name}: {steps} steps in {time.perf_counter() - t0:.0f} s, validation loss "
       f"{result.validation.get('loss', float('nan')):.3f}")
  return True
