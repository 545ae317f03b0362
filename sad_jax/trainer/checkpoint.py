"""Training checkpoints: an orbax CheckpointManager with one composite item per step.

  state   TrainState (params, optimizer state, step, RNG, span weights), sharded arrays
  data    the data iterator's state, one JSON file per process (grain's orbax handler)
  meta    curriculum stage, data-iterator counters, config and dataset fingerprints

Saves are asynchronous (the device→host copy happens before `save` returns, so the next
step may donate the state's buffers). Retention keeps the latest `keep` steps and the
`keep_best` best by a validation metric. A step folder is visible only once complete
(orbax writes to a temporary name and renames), so a kill during a save leaves the
previous step as the latest.

Disk full: before a save, the free space is compared with the size of the latest complete
step, and a save that cannot fit is refused (DiskFull) before anything is written. A save
that still runs out of space (another writer took it) fails with the same error; the
previous step stays intact either way.

On gs:// orbax has no rename either: a step is complete once its commit_success.txt is
written (orbax writes it last and lists only such steps), and the disk-space check is
skipped (a bucket has no free-space figure).
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from sad_jax.common import fileio
from sad_jax.common.errors import DataError, DiskFull

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
        fileio.abspath(directory), options=options, item_names=ITEMS,
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
    self._check_space(step)
    try:
      return self.manager.save(step, args=args, metrics=metrics, force=True)
    except Exception as e:
      raise self._disk_full(step, e) or e from None

  def _intact(self) -> str:
    latest = self.latest_step()
    return ("no earlier checkpoint exists" if latest is None else
            f"the last complete checkpoint, step {latest}, is intact")

  def _check_space(self, step: int) -> None:
    latest = self.latest_step()
    if latest is None or fileio.is_remote(str(self.manager.directory)):
      return
    need = _folder_bytes(os.path.join(self.manager.directory, str(latest)))
    free = shutil.disk_usage(self.manager.directory).free
    if free < need:
      raise DiskFull(f"{self.manager.directory}: no space for checkpoint step {step} (about "
                     f"{need / 2**20:.1f} MiB needed, {free / 2**20:.1f} MiB free); "
                     f"{self._intact()}. Free space and rerun to resume from it.")

  def _disk_full(self, step: int | None, e: BaseException) -> DiskFull | None:
    """A DiskFull for an out-of-space failure (OSError or a tensorstore message), else None."""
    text = str(e)
    if not ((isinstance(e, OSError) and e.errno == errno.ENOSPC)
            or "No space left on device" in text or "os_error_code='28'" in text):
      return None
    # saves are asynchronous: the failure may be the previous save's, surfacing now
    what = "a checkpoint" if step is None else f"checkpoint step {step} or the one before it"
    return DiskFull(f"{self.manager.directory}: disk full while writing {what} (No space "
                    f"left on device); {self._intact()}. Free space and rerun to resume.")

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
    try:
      self.manager.wait_until_finished()
    except Exception as e:
      raise self._disk_full(None, e) or e from None

  def close(self) -> None:
    self.wait()
    self.manager.close()


def latest_complete(directory: str) -> int | None:
  """The highest committed step under `directory` (orbax renames a step's folder to its
  number only once complete; on gs:// it writes the step's commit_success.txt last),
  without opening a manager."""
  try:
    steps = [int(n) for n in fileio.listdir(directory) if n.isdigit()]
  except OSError:
    return None
  if fileio.is_remote(directory):
    steps = [s for s in steps
             if fileio.exists(fileio.join(directory, str(s), "commit_success.txt"))]
  return max(steps, default=None)


def _folder_bytes(folder: str) -> int:
  total = 0
  for root, _, names in os.walk(folder):
    for n in names:
      try:
        total += os.path.getsize(os.path.join(root, n))
      except OSError:
        pass
  return total


def abstract_with_shardings(tree, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree,
                      shardings)


class _OneLineDiskFull(logging.Filter):
  """orbax and asyncio log every failed write of an out-of-space save with a traceback (one
  per array); the DiskFull error says it once, so keep one short line per write (absl) and
  drop asyncio's never-retrieved reports of the same failure."""

  def filter(self, record: logging.LogRecord) -> bool:
    text = record.getMessage()
    if record.exc_info and record.exc_info[1] is not None:
      text += f"\n{record.exc_info[1]}"
    if "No space left on device" not in text and "RESOURCE_EXHAUSTED" not in text:
      return True
    if record.name == "asyncio":
      return False
    record.msg, record.args = text.splitlines()[0][:200] + " …", None
    record.exc_info = record.exc_text = None
    return True


for _name in ("absl", "asyncio"):
  logging.getLogger(_name).addFilter(_OneLineDiskFull())
