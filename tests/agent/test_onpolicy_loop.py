"""`sad-jax opd`: the real round loop (rollouts in TextWorld-Express, the teacher scoring
online, updates, checkpoints), killed with SIGKILL mid-round and resumed."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from sad_jax.agent import onpolicy
from sad_jax.common import configlib, sharding
from sad_jax.data import schema
from sad_jax.data.schema import Segment, Trajectory
from sad_jax.models import checkpoint_io
from sad_jax.models import transformer as T
from sad_jax.models.config import ModelConfig
from tests import helpers

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENV = "twx:coin?numLocations=2&numDistractorItems=0&includeDoors=0"


def _model(folder, spm_path, *, hidden, seed):
  cfg = ModelConfig(model_type="llama", vocab_size=640, hidden_size=hidden,
                    intermediate_size=2 * hidden, num_layers=1, num_heads=2, num_kv_heads=1,
                    head_dim=hidden // 2, max_position_embeddings=4096)
  checkpoint_io.save_params(folder, cfg, T.init_params(cfg, jax.random.PRNGKey(seed)))
  shutil.copyfile(spm_path, os.path.join(folder, "tokenizer.model"))
  return folder


@pytest.fixture(scope="module")
def setup(tmp_path_factory, spm_path):
  root = tmp_path_factory.mktemp("opd")
  student = _model(str(root / "student"), spm_path, hidden=32, seed=0)
  teacher = _model(str(root / "teacher"), spm_path, hidden=48, seed=1)
  # the teacher's stored episodes: off-policy rows (λ) and a prefix for task 0 (depth)
  trajs = helpers.synthetic_trajectories(6, seed=0)
  # (runlocal plays 4 episodes a round: a depth stage needs 4 tasks with an episode)
  trajs += [Trajectory(id=f"t{task}", segments=[
      Segment("task", "find the coin"), Segment("observation", "a room"),
      Segment("reason", "look first"), Segment("action", "look around"),
      Segment("observation", "still a room"), Segment("reason", "go"),
      Segment("action", "move east"), Segment("observation", "done")],
      success=True, meta={"task": task}) for task in range(4)]
  data = str(root / "teacher.jsonl")
  schema.write_jsonl(data, trajs)
  overrides = [f"--config.student={student}", f"--config.teacher={teacher}",
               f"--config.teacher_data={data}", f"--config.env={ENV}",
               "--config.mix.teacher_share=0.5", "--config.loss.full_weight=0.5",
               "--config.rounds=3", "--config.depth=((0, 1), (2, 0))",
               "--config.guide.prob=0.6", "--config.guide.decay_rounds=2"]
  return overrides


def _config(overrides):
  return configlib.load(os.path.join(REPO, "sad_jax", "configs", "train_opd.py:runlocal"),
                        overrides)


def _final(folder):
  return checkpoint_io.load_model(os.path.join(folder, "final"))[1]


def test_depth_stages_and_prefixes():
  assert [onpolicy.depth_at(((0, 3), (4, 1), (8, 0)), r) for r in (0, 3, 4, 9)] == [3, 3, 1, 0]
  traj = Trajectory(id="x", segments=[Segment("task", "t"), Segment("reason", "a"),
                                      Segment("action", "b"), Segment("observation", "o"),
                                      Segment("reason", "c"), Segment("action", "d")])
  assert onpolicy._prefix(traj, 5) == [("a", "b")]   # the last turn stays the student's
  assert onpolicy._prefix(traj, 0) == [] and onpolicy._prefix(None, 2) == []


def test_guide_probability_decays_linearly_to_zero():
  guide = configlib.load(os.path.join(REPO, "sad_jax", "configs", "train_opd.py"), [
      "--config.guide.prob=0.5", "--config.guide.decay_rounds=4"]).guide
  assert [onpolicy.guide_at(guide, r) for r in (0, 1, 2, 4, 9)] == [0.5, 0.375, 0.25, 0, 0]
  guide.decay_rounds = 0
  assert onpolicy.guide_at(guide, 9) == 0.5


@pytest.mark.slow
@pytest.mark.early
def test_rounds_run_and_a_sigkill_mid_round_resumes_bit_identical(setup, tmp_path):
  clean = str(tmp_path / "clean")
  out = onpolicy.train_onpolicy(_config(setup), clean, progress=False)
  rows = [json.loads(x) for x in open(os.path.join(clean, "rounds.jsonl"))]
  assert [r["round"] for r in rows] == [-1, 0, 1, 2]
  assert [r["depth"] for r in rows[1:]] == [1, 1, 0]
  # teacher intervention: 0.6, 0.3, then none; its turns are not the student's tokens
  assert [r["guide_prob"] for r in rows[1:]] == [0.6, 0.3, 0.0]
  assert rows[1]["guided_turns"] > 0 and rows[3]["guided_turns"] == 0
  spent = out["spent"]
  assert spent["train_steps"] == 6 and spent["generated_tokens"] > 0
  assert spent["guided_tokens"] > 0
  assert spent["teacher_tokens"] > spent["generated_tokens"]
  for r in rows[1:]:
    assert np.isfinite(r["loss"]) and r["sampled/tokens"] > 0 and r["full/tokens"] > 0
    assert "dev_success" in r and len(r["rkl_per_turn"]) == 2
  start = checkpoint_io.load_model(setup[0].split("=", 1)[1])[1]
  moved = max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
              for a, b in zip(jax.tree.leaves(start), jax.tree.leaves(_final(clean))))
  assert moved > 0

  killed = str(tmp_path / "killed")
  args = [sys.executable, "-m", "sad_jax.cli", "opd", "--config",
          "sad_jax/configs/train_opd.py:runlocal", "--workdir", killed, *setup]
  p = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       text=True)
  lines, deadline = [], time.time() + 300
  while time.time() < deadline:
    line = p.stdout.readline()
    assert line, "".join(lines)
    lines.append(line)
    if line.startswith("round 2/3"):
      break
  time.sleep(float(np.random.default_rng().uniform(0.0, 1.0)))   # somewhere in round 3
  p.send_signal(signal.SIGKILL)
  p.wait()
  assert p.returncode == -signal.SIGKILL
  p = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert p.returncode == 0, p.stdout + p.stderr
  # the kill may land before round 2's checkpoint committed (it is saved after its line)
  assert re.search(r"resumed from round [123]\n", p.stdout), p.stdout
  for a, b in zip(jax.tree.leaves(_final(clean)), jax.tree.leaves(_final(killed))):
    assert np.array_equal(np.asarray(a).view(np.uint32), np.asarray(b).view(np.uint32))
  again = [json.loads(x) for x in open(os.path.join(killed, "rounds.jsonl"))]
  assert [r["round"] for r in again] == [-1, 0, 1, 2]
  assert [r["loss"] for r in again[1:]] == [r["loss"] for r in rows[1:]]


@pytest.mark.slow
@pytest.mark.early
def test_two_processes_equal_one(setup, tmp_path):
  """Two real JAX processes (4 CPU devices each, gloo) on a (2,2,2) mesh: each plays its
  half of every round's episodes on its own devices, the rows are gathered, and the
  update and the teacher's scoring run on the global mesh (rows over data × fsdp, so each
  process holds half of every batch). The rounds and the final parameters equal one
  process with 8 devices."""
  from tests.train.test_multihost import free_port

  extra = ["--config.mesh.shape=(2,2,2)", "--config.batch=4", "--config.mix.teacher_share=0.5",
           "--config.rounds=2"]
  one = str(tmp_path / "one")
  onpolicy.train_onpolicy(_config([*setup, *extra]), one, progress=False)
  port, two = free_port(), str(tmp_path / "two")
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
         "JAX_PLATFORMS": "cpu"}
  procs = [subprocess.Popen(
      [sys.executable, "-m", "sad_jax.cli", "opd", "--config",
       "sad_jax/configs/train_opd.py:runlocal", "--workdir", two, "--coordinator",
       f"localhost:{port}", "--num-processes", "2", "--process-id", str(i), *setup, *extra],
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      for i in range(2)]
  outs = [p.communicate(timeout=400)[0] for p in procs]
  for p in procs:
    assert p.returncode == 0, "\n=====\n".join(o[-2500:] for o in outs)
  assert "finished 2 rounds" in outs[0]
  a = [json.loads(x) for x in open(os.path.join(one, "rounds.jsonl"))]
  b = [json.loads(x) for x in open(os.path.join(two, "rounds.jsonl"))]
  assert [r["round"] for r in b] == [r["round"] for r in a] == [-1, 0, 1]
  for x, y in zip(a[1:], b[1:]):
    assert x["train_success"] == y["train_success"]
    assert x["spent"]["generated_tokens"] == y["spent"]["generated_tokens"]
    for k in ("loss", "sampled/loss", "full/loss", "rkl", "grad_norm"):
      np.testing.assert_allclose(y[k], x[k], rtol=1e-4, err_msg=k)
  # a model saved by two processes restores onto a mesh (orbax needs target shardings)
  mesh = sharding.make_mesh((2, 2, 2))
  load = lambda w: checkpoint_io.load_model(os.path.join(w, "final"), mesh=mesh)[1]
  for x, y in zip(jax.tree.leaves(load(one)), jax.tree.leaves(load(two)), strict=True):
    np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_lora_rounds_train_adapters_only_and_resume_on_the_same_base(setup, tmp_path):
  """`lora.rank=4` (int8 base): the rounds train adapters on the frozen student. final/ is
  base + (α/r)·A@B (untargeted leaves bit-identical to the student), final/adapters holds
  them, and a resume from round 1 ends bit-identical; another base is refused. Norms stay
the student's bits; the embedding is held in bfloat16 beside the int8 weights."""
  import jax.numpy as jnp

  from sad_jax.common.errors import DataError
  from sad_jax.models import lora

  extra = ["--config.lora.rank=4", "--config.lora.alpha=8", "--config.lora.base_dtype=int8",
           "--config.optim.lr=0.02", "--config.rounds=2"]  # 2 rounds: the suite's time
  work = str(tmp_path / "lora")
  onpolicy.train_onpolicy(_config([*setup, *extra]), work, progress=False)
  student_dir = setup[0].split("=", 1)[1]
  start = checkpoint_io.load_model(student_dir)[1]
  final = _final(work)
  spec, ad, info = lora.load_adapters(os.path.join(work, "final", "adapters"))
  assert spec.base_dtype == "int8" and info["base"]["path"] == student_dir
  want = lora.merge(lora.prepare_base(start, spec), ad, spec)
  assert any(np.abs(np.asarray(b)).max() > 0 for b in jax.tree.leaves(ad))
  for (path, a), b, s in zip(jax.tree_util.tree_flatten_with_path(final)[0],
                             jax.tree.leaves(want), jax.tree.leaves(start)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
    name = path[-1].key
    if name == "scale":  # norms: neither targets nor cast, the student's own bits
      assert np.array_equal(np.asarray(a), np.asarray(s)), jax.tree_util.keystr(path)
    if name == "embed":  # untargeted, held in bfloat16 beside the int8 weights
      assert np.array_equal(np.asarray(a), np.asarray(s).astype(jnp.bfloat16).astype(
          np.float32))

  # the checkpoint of round 1, resumed: the same adapters at the end
  resumed = str(tmp_path / "resumed")
  shutil.copytree(work, resumed)
  assert os.path.isdir(os.path.join(resumed, "checkpoints", "1"))
  shutil.rmtree(os.path.join(resumed, "checkpoints", "2"))
  shutil.rmtree(os.path.join(resumed, "final"))
  onpolicy.train_onpolicy(_config([*setup, *extra]), resumed, progress=False)
  for a, b in zip(jax.tree.leaves(final), jax.tree.leaves(_final(resumed)), strict=True):
    assert np.array_equal(np.asarray(a).view(np.uint32), np.asarray(b).view(np.uint32))
  other = str(tmp_path / "other")
  shutil.copytree(student_dir, other)
  shutil.rmtree(os.path.join(resumed, "checkpoints", "2"))
  with pytest.raises(DataError, match="LoRA base") as e:
    onpolicy.train_onpolicy(_config([*setup, *extra, f"--config.student={other}"]), resumed,
                            progress=False)
  assert e.value.field == "lora_base"
