"""The study's shared vocabulary, at the bottom of the package: a cell, the inputs every
cell learns from, the workdir's JSON records, stage lines, and the invocation log."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from typing import Any

from sad_jax.common import fileio

_START = [time.perf_counter()]  # set by run(): stage lines say when they began


def _say(text: str) -> None:
  if text.startswith("["):  # a stage or a cell: its start time shows where the time went
    text = f"{text}  (at {(time.perf_counter() - _START[0]) / 60:.1f} min)"
  print(text, flush=True)


@dataclasses.dataclass(frozen=True)
class Cell:
  arm: str
  objective: str
  seed: int
  steps: int
  overrides: tuple[str, ...] = ()
  curriculum: bool = False
  start: str = ""   # objective opd: the cell whose final model the rounds start from

  @property
  def name(self) -> str:
    return f"{self.arm}_s{self.seed}_n{self.steps}"


@dataclasses.dataclass(frozen=True)
class DevData:
  """The dev fold's prepared data, the teacher's store on it, and its episodes (JSONL)."""
  dataset: str
  store: str
  jsonl: str


@dataclasses.dataclass(frozen=True)
class Inputs:
  """What every cell of a run learns from: the students' prepared data and the teacher's
  store on it, the dev fold's, the teacher's model and its train-fold episodes (on-policy
  cells: λ rows, depth prefixes, guided turns), and the students' tokenizer."""
  dataset: str
  store: str
  dev: DevData
  teacher: str
  teacher_jsonl: str
  tokenizer: str


def _read(path: str) -> dict | None:
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def model_stamp(folder: str) -> float:
  """Which export of a model folder this is: a result or store made from it records this."""
  return os.path.getmtime(os.path.join(folder, "config.json"))


def _write(path: str, obj: Any) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fileio.json_dump(path, obj, indent=1)


STORE_TEACHER = "study_teacher.json"


def invocations(work: str) -> list[dict]:
  """The study's earlier invocations in `work` (each appends a line when it ends)."""
  path = os.path.join(work, "invocations.jsonl")
  if not os.path.exists(path):
    return []
  out = []
  with open(path) as f:
    for line in f:
      with contextlib.suppress(json.JSONDecodeError):  # a line cut short by a crash
        out.append(json.loads(line))
  return out


def output_dir(work: str, replicating: bool) -> str:
  """Where the report goes: a replication writes beside the study it may share a workdir
  with (reusing its trained cells), not over it."""
  return os.path.join(work, "replication") if replicating else work
