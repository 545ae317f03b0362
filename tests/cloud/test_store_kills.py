"""Writers killed mid-write on the GCS emulator (issue 41, point 3): `prepare`, `teacher
precompute` and `export` to gs://, each SIGKILLed at one of its writes (the proxy kills the
process when that request arrives, so the request never reaches the store), then run again.
After every kill, the output is not taken as complete; after the rerun, every object is
byte-identical to a clean run's. The writers and their commit points are listed in
docs/design.md ("Object stores")."""

import os
import random
import signal
import subprocess
import sys
import time

import pytest

from sad_jax.common import fileio
from sad_jax.common.errors import DataError
from sad_jax.data import schema
from sad_jax.models import checkpoint_io
from sad_jax.models.config import ModelConfig
from sad_jax.teacher import store as store_lib
from tests import helpers
from tests.cloud.fault_proxy import FaultProxy
from tests.cloud.test_store_faults import _user_env
from tests.train.conftest import REPO

WRITES = "POST|PUT|DELETE|PATCH"
pytestmark = pytest.mark.slow


def _objects(folder: str) -> dict[str, bytes]:
  """relative path → bytes of every object under a remote folder."""
  fs = fileio._fs(folder)
  return {rel: fs.cat_file(fileio.join(folder, rel)) for rel in sorted(fileio._listing(folder))}


def _run(cmd: list[str], env: dict, proxy: FaultProxy, *, kill_at: int | None = None,
         kill_match: str = ".") -> int:
  """Runs a CLI command through the proxy; with kill_at, SIGKILLs it when its write
  number kill_at (0-based) among those matching `kill_match` arrives. Returns the exit
  status; the proxy's log is the run's."""
  proxy.clear()
  holder: list[subprocess.Popen] = []
  if kill_at is not None:
    proxy.add(lambda: holder[0].send_signal(signal.SIGKILL), kill_match, method=WRITES,
              times=1, after=kill_at)
  p = subprocess.Popen([sys.executable, "-m", "sad_jax.cli", *cmd], env=env,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  holder.append(p)
  try:
    out = p.communicate(timeout=300)[0]
  except subprocess.TimeoutExpired:
    p.kill()
    raise AssertionError(f"hung (kill_at={kill_at}):\n{p.communicate()[0][-4000:]}") from None
  if kill_at is None:
    assert p.returncode == 0, out[-3000:]
  return p.returncode


def _writes(proxy: FaultProxy) -> int:
  return sum(1 for method, _, _ in proxy.log if method in WRITES.split("|"))


def _kills(cmd_for, root: str, env: dict, proxy: FaultProxy, *, check_partial,
           points: int, seed: int) -> tuple[int, list[int]]:
  """A clean run, then runs killed at `points` write numbers drawn from the clean run's
  writes (always the first and the last), each followed by a rerun that must give the
  clean run's bytes."""
  clean = f"{root}/clean"
  _run(cmd_for(clean), env, proxy)
  total = _writes(proxy)
  want = _objects(clean)
  rng = random.Random(seed)
  chosen = sorted({0, total - 1, *rng.sample(range(total), min(points, total))})
  for n in chosen:
    out = f"{root}/k{n}"
    assert _run(cmd_for(out), env, proxy, kill_at=n) == -signal.SIGKILL, n
    check_partial(out, n)
    _run(cmd_for(out), env, proxy)
    got = _objects(out)
    assert got.keys() == want.keys(), (n, sorted(set(got) ^ set(want)))
    for rel in want:
      assert got[rel] == want[rel], (n, rel)
  return total, chosen


@pytest.fixture
def proxy():
  with FaultProxy(os.environ["STORAGE_EMULATOR_HOST"]) as p:
    yield p


def _prepare_cmd(src: str, spm_path: str):
  return lambda out: ["prepare", "--config",
                      os.path.join(REPO, "sad_jax", "configs", "prepare_base.py"), "--out", out,
                      f"--config.inputs=('{src}',)", f"--config.tokenizer.path={spm_path}",
                      "--config.max_len=256", "--config.val_fraction=0.2", "--quiet"]


def test_prepare_killed_at_its_writes(gcs, proxy, spm_path, tmp_path):
  src = str(tmp_path / "t.jsonl")
  schema.write_jsonl(src, helpers.synthetic_trajectories(10, seed=4))
  root = f"{gcs}/kill-prepare-{time.monotonic_ns()}"
  env = _user_env(proxy.url, tmp_path)

  def partial(out, n):
    with pytest.raises(DataError, match="incomplete prepared dataset"):
      fileio.require_complete(out, what="prepared dataset")

  cmd = _prepare_cmd(src, spm_path)
  total, chosen = _kills(cmd, root, env, proxy, check_partial=partial, points=99, seed=0)
  assert len(chosen) == total >= 5  # every write of prepare is a kill point


def test_export_killed_at_its_writes(gcs, proxy, spm_path, tmp_path):
  model = _tiny_model(str(tmp_path / "model"), vocab_size=640, seed=0)
  root = f"{gcs}/kill-export-{time.monotonic_ns()}"
  env = _user_env(proxy.url, tmp_path)

  def partial(out, n):
    with pytest.raises(DataError, match="incomplete"):
      fileio.require_complete(out, what="exported model")

  def cmd(out):
    return ["export", model, out, "--dtype", "float32", "--tokenizer", spm_path,
            "--max-shard-bytes", "20000"]

  total, chosen = _kills(cmd, root, env, proxy, check_partial=partial, points=4, seed=1)
  assert total >= 4 and len(chosen) >= 3


def _tiny_model(folder: str, *, vocab_size: int, seed: int) -> str:
  """A one-layer random model folder (the tokenizer's vocabulary, or padded past it)."""
  from tests.cloud.test_gcs import _random_params

  cfg = ModelConfig(model_type="llama", vocab_size=vocab_size, hidden_size=32,
                    intermediate_size=64, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=8)
  checkpoint_io.save_params(folder, cfg, _random_params(cfg, seed=seed, scale=0.2))
  return folder


def test_precompute_killed_at_its_writes(gcs, proxy, spm_path, tmp_path):
  """A killed precompute leaves no manifest (the store's commit point): the store is
  refused; the rerun keeps the shards whose markers landed, redoes the rest, and writes
  the clean run's bytes."""
  src = str(tmp_path / "t.jsonl")
  schema.write_jsonl(src, helpers.synthetic_trajectories(12, seed=6))
  root = f"{gcs}/kill-precompute-{time.monotonic_ns()}"
  env = _user_env(proxy.url, tmp_path)
  ds = f"{root}/ds"
  _run(_prepare_cmd(src, spm_path)(ds), env, proxy)
  teacher = _tiny_model(str(tmp_path / "teacher"), vocab_size=600, seed=1)

  def cmd(out):
    return ["teacher", "precompute", "--config",
            os.path.join(REPO, "sad_jax", "configs", "teacher_precompute.py"),
            f"--config.dataset={ds}", f"--config.teacher={teacher}", f"--config.out={out}",
            "--config.k=8", "--config.shard_size=3", "--config.teacher_name=tiny",
            "--config.span_kinds=('reason','action')"]

  def partial(out, n):
    with pytest.raises(DataError, match="manifest"):
      store_lib.TeacherStore(out)

  total, chosen = _kills(cmd, f"{root}/stores", env, proxy, check_partial=partial,
                         points=3, seed=2)
  assert total >= 4 and len(chosen) >= 3


def test_training_killed_at_its_writes(gcs, proxy, spm_path, tmp_path):
  """`sad-jax train` with its workdir on gs://, SIGKILLed at one of its writes (orbax's
  checkpoint objects through tensorstore, metrics.jsonl and TensorBoard flushes, final/),
  then run again: it resumes from the last committed checkpoint and ends with the clean
  run's parameters, bit for bit, and the clean run's logged losses at every step (the
  rows also hold wall times, so the file itself cannot be byte-identical)."""
  import jax
  import numpy as np

  from sad_jax.data import prepare
  from sad_jax.trainer import metrics as metrics_lib
  from tests.cloud.test_gcs import _params
  from tests.data.test_prepare import make_config
  from tests.train.conftest import TINY

  src = str(tmp_path / "t.jsonl")
  schema.write_jsonl(src, helpers.synthetic_trajectories(24, seed=8))
  ds = str(tmp_path / "ds")
  prepare.prepare(make_config([src], tokenizer__path=spm_path, max_len=256, val_fraction=0.2),
                  ds, progress=False)
  student = _tiny_model(str(tmp_path / "student"), vocab_size=600, seed=3)
  root = f"{gcs}/kill-train-{time.monotonic_ns()}"
  env = _user_env(proxy.url, tmp_path)

  def cmd(workdir):
    return ["train", "--config",
            os.path.join(REPO, "sad_jax", "configs", "train_sft.py") + ":runlocal",
            "--workdir", workdir, f"--config.dataset={ds}", *TINY,
            "--config.model.init=pretrained", f"--config.model.path={student}",
            "--config.train.steps=4", "--config.train.checkpoint_every=2",
            "--config.train.log_every=1", "--config.train.eval_every=2",
            "--config.train.eval_batches=1"]

  def losses(run):
    return {r["step"]: r["loss"] for r in metrics_lib.read_jsonl(run)
            if r["split"] == "train" and "loss" in r}

  clean = f"{root}/clean"
  _run(cmd(clean), env, proxy)
  total = _writes(proxy)
  want_params, want_losses = _params(f"{clean}/final"), losses(clean)
  assert sorted(want_losses) == [1, 2, 3, 4]
  # How many objects orbax and the timed metrics flushes write varies from run to run:
  # numbered kill points come from the first 3/4 of the clean run's writes, and the
  # commit point of final/ (its config.json, written after the params) is named
  rng = random.Random(3)
  points = [(n, ".") for n in sorted({0, *rng.sample(range(total * 3 // 4), 3)})]
  for n, match in [*points, (0, r"(?s)final/config\.json")]:
    run = f"{root}/k{n}{'f' if match != '.' else ''}"
    assert _run(cmd(run), env, proxy, kill_at=n, kill_match=match) == -signal.SIGKILL, n
    if not fileio.exists(f"{run}/final/config.json"):  # final/'s commit point
      with pytest.raises((DataError, FileNotFoundError, OSError)):
        checkpoint_io.load_model(f"{run}/final")
    _run(cmd(run), env, proxy)
    for a, b in zip(jax.tree.leaves(want_params), jax.tree.leaves(_params(f"{run}/final")),
                    strict=True):
      assert np.array_equal(np.asarray(a).view(np.uint32), np.asarray(b).view(np.uint32)), n
    assert losses(run) == want_losses, n
