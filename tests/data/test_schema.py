"""The trajectory schema: JSONL round trip, validation errors that name the place."""

import pytest

from sad_jax.common.errors import DataError, SkipReport
from sad_jax.common.fileio import atomic_write
from sad_jax.data import schema
from sad_jax.data.schema import Segment, Trajectory
from tests import helpers


def test_jsonl_round_trip(tmp_path):
  trajs = helpers.synthetic_trajectories(20, seed=2, system=True, multiline=True)
  trajs[0].meta = {"action_format": "code", "env": "x"}
  trajs[1].success = None
  assert schema.write_jsonl(tmp_path / "t.jsonl", trajs) == 20
  back = schema.read_jsonl(tmp_path / "t.jsonl")
  assert [t.to_dict() for t in back] == [t.to_dict() for t in trajs]


@pytest.mark.parametrize("mutate, field, message", [
    (lambda d: d.pop("id"), "id", "missing"),
    (lambda d: d["segments"][1].update(kind="thinking"), "segments[1].kind", "unknown segment kind"),
    (lambda d: d["segments"][2].update(text="  "), "segments[2].text", "empty action"),
    (lambda d: d["segments"][1].pop("text"), "segments[1].text", "missing"),
    (lambda d: d.update(success="yes"), "success", "true, false or null"),
    (lambda d: d.update(segments=[{"kind": "task", "text": "q"}]), "segments", "no action"),
    (lambda d: d.update(meta={"action_format": "yaml"}), "meta.action_format", "unknown action_format"),
])
def test_validation_names_line_and_field(tmp_path, mutate, field, message):
  good = helpers.synthetic_trajectories(2, seed=0)
  bad = good[1].to_dict()
  mutate(bad)
  path = helpers.write_jsonl(str(tmp_path / "t.jsonl"), [good[0].to_dict(), bad])
  with pytest.raises(DataError) as e:
    schema.read_jsonl(path)
  assert (e.value.path, e.value.record, e.value.field) == (path, 2, field)
  assert message in str(e.value)
  assert str(e.value).startswith(f"{path}, record 2, field {field!r}: ")
  skips = SkipReport(on_error="skip")
  assert len(schema.read_jsonl(path, skips=skips)) == 1 and skips.count == 1


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
  target = tmp_path / "out.jsonl"
  with pytest.raises(RuntimeError):
    with atomic_write(target) as f:
      f.write("partial")
      raise RuntimeError("killed")
  assert list(tmp_path.iterdir()) == []
  target.write_text("old")
  with pytest.raises(RuntimeError):
    with atomic_write(target) as f:
      f.write("new")
      raise RuntimeError("killed")
  assert target.read_text() == "old"


def test_atomic_outputs_get_ordinary_permissions(tmp_path):
  import os

  from sad_jax.common.fileio import atomic_dir
  old = os.umask(0o022)
  try:
    with atomic_write(tmp_path / "f.txt") as f:
      f.write("x")
    with atomic_dir(tmp_path / "d") as d:
      open(os.path.join(d, "inner"), "w").close()
  finally:
    os.umask(old)
  assert (tmp_path / "f.txt").stat().st_mode & 0o777 == 0o644
  assert (tmp_path / "d").stat().st_mode & 0o777 == 0o755


def test_task_and_counts():
  t = Trajectory(id="x", segments=[Segment("task", "q"), Segment("action", "a"),
                                   Segment("action", "b")])
  assert t.task == "q" and t.count("action") == 2 and t.action_format == "react"
