"""Two real JAX processes (4 CPU devices each, gloo collectives, jax.distributed) train a
few steps; their losses equal one process with 8 devices."""

import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from sad_jax import metrics as metrics_lib
from sad_jax import train
from tests.train.conftest import REPO, train_config


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("mesh", ["(2,2,2)"])
def test_two_processes_equal_one(train_data, tmp_path, mesh):
  extra = [f"--config.mesh.shape={mesh}", "--config.train.steps=4", "--config.train.log_every=1",
           "--config.train.eval_every=2", "--config.data.accum=2"]
  config, overrides = train_config(train_data, extra=extra)
  one = train.train_and_evaluate(config, str(tmp_path / "one"))

  port = free_port()
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
         "JAX_PLATFORMS": "cpu"}
  work = str(tmp_path / "two")
  procs = [subprocess.Popen(
      [sys.executable, "-m", "sad_jax.cli", "train", "--config", "configs/train_sad.py:runlocal",
       "--workdir", work, "--coordinator", f"localhost:{port}", "--num-processes", "2",
       "--process-id", str(i), *overrides], cwd=REPO, env=env, stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True) for i in range(2)]
  outs = [p.communicate(timeout=300)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-3000:]
  assert "finished at step 4" in outs[0]

  a = metrics_lib.read_jsonl(str(tmp_path / "one"))
  b = metrics_lib.read_jsonl(work)
  keys = ("loss", "reason/loss", "action/loss", "grad_norm", "curriculum/loss",
          "reason/tokens", "action/accuracy")
  pick = lambda rows, split: [[r[k] for k in keys if k in r] for r in rows
                              if r["split"] == split and "loss" in r]
  assert len(pick(a, "train")) == 4 and len(pick(a, "validation")) == 2
  for split in ("train", "validation"):
    np.testing.assert_allclose(pick(b, split), pick(a, split), rtol=1e-5)
  assert one.step == 4
  # both processes wrote their data-iterator state into the checkpoint
  names = sorted(n for n in os.listdir(os.path.join(work, "checkpoints", "4", "data"))
                 if n.startswith("process_"))
  assert names == ["process_0-of-2.json", "process_1-of-2.json"]
