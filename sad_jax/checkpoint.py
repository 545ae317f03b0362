"""Training checkpoints: an orbax CheckpointManager with one composite item per step.

  state   TrainState (params, optimizer state, step, RNG, span weights), sharded arrays
  data    the data iterator's state, one JSON file per process (grain's orbax handler)
  meta    curriculum stage, data-iterator counters, config and dataset fingerprints

Saves are asynchronous (the device→host copy happens before `save` returns, so the next
step may donate the state's buffers). Retention keeps the latest `keep` steps and the
`keep_best` best by a validation metric. A step folder is visible only once complete
(orbax writes to a temporary name and renames), so a kill during a save leaves the
previous step as the latest.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from sad_jax.errors import DataError

ITEMS = ("state", "data", "meta")


class Checkpoints:
  def __init__(self, directory: str, *, keep: int = 2, keep_best: int = 1,
               best_metric: str = "validation/loss", best_mode: str = "min",
               use_async: bool = True):
    import grain

    if best_mode not in ("min", "max"):
      raise DataError("best_mode must be 'min' or 'max'", field="config.checkpoint.best_mode")
    self.best_metric = best_metric
    keepers = [policies.LatestN(n=keep)]
    if keep_best:
      keepers.append(policies.BestN(
          # BestN keeps the *last* n after sorting: min mode sorts descending
          get_metric_fn=lambda m: m[best_metric], reverse=best_mode == "min", n=keep_best,
          keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policies.AnyPreservationPolicy(keepers),
        enable_async_checkpointing=use_async, create=True)
    self.manager = ocp.CheckpointManager(
        os.path.abspath(directory), options=options, item_names=ITEMS,
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "data": grain.checkpoint.CheckpointHandler(),
                       "meta": ocp.JsonCheckpointHandler()})

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def best_step(self) -> int | None:
    return self.manager.best_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, *, state, data_iter, meta: dict[str, Any],
           metrics: dict[str, float] | None = None) -> bool:
    import grain

    args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                              data=grain.checkpoint.CheckpointSave(data_iter),
                              meta=ocp.args.JsonSave(meta))
    metrics = {k: float(v) for k, v in (metrics or {}).items()} or None
    if metrics is not None and self.best_metric not in metrics:
      metrics = None
    return self.manager.save(step, args=args, metrics=metrics, force=True)

  def restore(self, step: int, *, abstract_state, data_iter) -> tuple[Any, dict]:
    """(state, meta) at `step`; the data iterator is set to its saved state in place."""
    import grain

    args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                              data=grain.checkpoint.CheckpointRestore(data_iter),
                              meta=ocp.args.JsonRestore())
    try:
      out = self.manager.restore(step, args=args)
    except (ValueError, KeyError, FileNotFoundError) as e:
      raise DataError(f"cannot restore checkpoint step {step}: {e}",
                      path=str(self.manager.directory / str(step))) from None
    return out["state"], out["meta"]

  def read_meta(self, step: int) -> dict:
    return self.manager.restore(step, args=ocp.args.Composite(
        meta=ocp.args.JsonRestore()))["meta"]

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def abstract_with_shardings(tree, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree,
                      shardings)
