"""Two real JAX processes (4 CPU devices each, gloo collectives, jax.distributed) train a
few steps; their losses equal one process with 8 devices."""

import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from sad_jax.common import sharding
from sad_jax.models import checkpoint_io
from sad_jax.trainer import metrics as metrics_lib
from sad_jax.trainer import train
from tests.train.conftest import REPO, train_config


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.early
def test_two_processes_equal_one(train_data, tmp_path):
  """(2,2,2) over two processes of 4 devices: 8-row micro-batches split over the batch
  axes (data × fsdp = 4), so process 0 holds rows 0–3 and process 1 rows 4–7 and each
  packs only those. Metrics of both processes and the final parameters equal one process
  with 8 devices."""
  extra = ["--config.mesh.shape=(2,2,2)", "--config.train.steps=4", "--config.train.log_every=1",
           "--config.train.eval_every=2", "--config.data.batch_size=16", "--config.data.accum=2"]
  config, overrides = train_config(train_data, extra=extra)
  one = train.train_and_evaluate(config, str(tmp_path / "one"))
  assert one.step == 4

  port = free_port()
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
         "JAX_PLATFORMS": "cpu"}
  work = str(tmp_path / "two")
  procs = [subprocess.Popen(
      [sys.executable, "-m", "sad_jax.cli", "train", "--config", "configs/train_sad.py:runlocal",
       "--workdir", work, "--coordinator", f"localhost:{port}", "--num-processes", "2",
       "--process-id", str(i), *overrides], cwd=REPO, env=env, stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True) for i in range(2)]
  outs = [p.communicate(timeout=400)[0] for p in procs]
  for i, (p, out) in enumerate(zip(procs, outs)):
    assert p.returncode == 0, out[-3000:]
    # each process packs only its half of every micro-batch
    lo, hi = 4 * i, 4 * i + 4
    assert f"process {i} of 2: packs rows [{lo}, {hi}) of each 8-row micro-batch" in out, out
    # and ends with the one-process run's validation metrics (printed to 4 decimals)
    final = next(line for line in out.splitlines() if line.startswith("finished at step 4"))
    got = dict(kv.rsplit(" ", 1) for kv in final.split("validation: ")[1].split(", "))
    want = {k: v for k, v in one.validation.items() if "tokens" not in k}
    assert got.keys() == want.keys()
    for k, v in want.items():
      assert abs(float(got[k]) - v) <= 2e-4, (i, k, got[k], v)

  a = metrics_lib.read_jsonl(str(tmp_path / "one"))
  b = metrics_lib.read_jsonl(work)
  keys = ("loss", "reason/loss", "action/loss", "grad_norm", "curriculum/loss",
          "reason/tokens", "action/accuracy")
  pick = lambda rows, split: [[r[k] for k in keys if k in r] for r in rows
                              if r["split"] == split and "loss" in r]
  assert len(pick(a, "train")) == 4 and len(pick(a, "validation")) == 2
  for split in ("train", "validation"):
    np.testing.assert_allclose(pick(b, split), pick(a, split), rtol=1e-5)
  # the final parameters (each process saved its shards) equal the one-process run's; a
  # two-process export restores onto a mesh (orbax needs target shardings for it)
  mesh = sharding.make_mesh((2, 2, 2))
  _, p_one = checkpoint_io.load_model(str(tmp_path / "one" / "final"), mesh=mesh)
  _, p_two = checkpoint_io.load_model(os.path.join(work, "final"), mesh=mesh)
  for x, y in zip(jax.tree.leaves(p_two), jax.tree.leaves(p_one), strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=3e-5)
  # both processes wrote their data-iterator state into the checkpoint
  names = sorted(n for n in os.listdir(os.path.join(work, "checkpoints", "4", "data"))
                 if n.startswith("process_"))
  assert names == ["process_0-of-2.json", "process_1-of-2.json"]
