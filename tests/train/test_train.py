"""The real trainer on CPU: steps, metrics files, exact resume after SIGKILL, SIGTERM,
divergence, bad configs."""

import glob
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from sad_jax.common.errors import DataError
from sad_jax.common.types import SpanKind
from sad_jax.models import checkpoint_io
from sad_jax.trainer import metrics as metrics_lib
from sad_jax.trainer import pipeline, train
from sad_jax.trainer import setup as train_setup
from tests.train.conftest import REPO, train_config


def final_params(workdir):
  _, params = checkpoint_io.load_model(os.path.join(workdir, "final"))
  return jax.tree.map(np.asarray, params)


def assert_bit_identical(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb)
  for x, y in zip(la, lb):
    assert x.dtype == y.dtype and x.shape == y.shape
    assert np.array_equal(x.view(np.uint32), y.view(np.uint32))


def cli(args, **kw):
  return subprocess.Popen([sys.executable, "-m", "sad_jax.cli", "train", *args], cwd=REPO,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def test_trainer_runs_writes_metrics_and_tensorboard(train_data, tmp_path):
  config, _ = train_config(train_data)
  result = train.train_and_evaluate(config, str(tmp_path))
  assert result.status == "finished" and result.step == 6
  assert result.checkpoint_steps == [3, 6]
  rows = metrics_lib.read_jsonl(str(tmp_path))
  train_rows = [r for r in rows if r["split"] == "train" and "loss" in r]
  val_rows = [r for r in rows if r["split"] == "validation"]
  assert [r["step"] for r in train_rows] == [2, 4, 6]
  assert [r["step"] for r in val_rows] == [3, 6]
  for r in train_rows:
    for key in ("reason/loss", "action/loss", "reason/accuracy", "action/accuracy",
                "reason/tokens", "action/tokens", "reason/weight", "grad_norm", "lr",
                "tokens_per_s", "curriculum/loss"):
      assert np.isfinite(r[key]), key
    # the total is w·(group means) + γ·curriculum term
    assert r["loss"] == pytest.approx(r["reason/loss"] + r["action/loss"]
                                      + 0.1 * r["curriculum/loss"], rel=1e-5)
  # stage transition logged at step 3
  assert any(r.get("stage") == 1 and r["step"] == 3 for r in rows if "loss" not in r)
  # lr: warm-up of 10 steps that trains at step 0, lr(i) = 3e-3 · (i + 1) / 10; a row of
  # logged step s reports the lr of step i = s − 1, so 3e-3 · s / 10
  assert train_rows[0]["lr"] == pytest.approx(3e-3 * train_rows[0]["step"] / 10, rel=1e-5)
  # TensorBoard's own reader accepts our event files (CRCs checked) and sees the same values
  from tensorboard.backend.event_processing import event_accumulator

  ea = event_accumulator.EventAccumulator(glob.glob(str(tmp_path / "tb" / "train" / "*"))[0])
  ea.Reload()
  assert [(s.step, s.value) for s in ea.Scalars("reason/loss")] == [
      (r["step"], pytest.approx(r["reason/loss"], rel=1e-6)) for r in train_rows]
  assert os.path.isdir(tmp_path / "final" / "params")
  # the tokenizer and the template record travel with the model (eval, export)
  assert {"tokenizer.model", "template.json"} <= set(os.listdir(tmp_path / "final"))
  # rerun with the same workdir: nothing left to do; it restores the last checkpoint and
  # writes final/ again, bit-identical to the uninterrupted run's
  uninterrupted = final_params(str(tmp_path))
  again = train.train_and_evaluate(config, str(tmp_path))
  assert again.step == 6
  assert_bit_identical(final_params(str(tmp_path)), uninterrupted)


def _wait_for(p, out: list[str], until, deadline: float) -> bool:
  """Reads `p`'s lines into `out` until `until(line)` is true (True) or `p` exits (False)."""
  while time.time() < deadline:
    line = p.stdout.readline()
    if not line:
      return False
    out.append(line)
    if until(line):
      return True
  raise AssertionError("timed out:\n" + "".join(out))


def _kill_during_checkpoint_write(p, work: str, deadline: float) -> bool:
  """SIGKILLs `p` while an orbax checkpoint folder is still a temporary (not committed)."""
  ckpts = os.path.join(work, "checkpoints")
  while time.time() < deadline and p.poll() is None:
    try:
      names = os.listdir(ckpts)
    except FileNotFoundError:
      names = []
    if any("tmp" in n for n in names):
      p.send_signal(signal.SIGKILL)
      return True
    time.sleep(0.001)
  return False


@pytest.mark.slow
@pytest.mark.early
def test_sigkill_at_five_random_points_then_resume_is_bit_identical(train_data, tmp_path):
  """Five SIGKILLs at random points (a random step plus a random delay, and at least one
  while an async checkpoint is being written), one SIGTERM, then a run to the end: the final
  parameters are bit-identical to an uninterrupted run."""
  total = 16
  extra = ["--config.train.checkpoint_every=2", f"--config.train.steps={total}",
           "--config.train.log_every=1", "--config.checkpoint.use_async=true"]
  config, overrides = train_config(train_data, extra=extra)
  clean = train.train_and_evaluate(config, str(tmp_path / "clean"))
  assert clean.step == total

  rng = np.random.default_rng()
  seed = int(rng.integers(1 << 31))
  rng = np.random.default_rng(seed)
  # five kill steps, increasing so that the run makes progress; one of them (at random) is
  # "the first checkpoint write in flight after this step" instead of "this step + delay"
  at_steps = sorted(int(x) for x in rng.choice(np.arange(1, total - 1), 5, replace=False))
  write_kill = int(rng.integers(5))
  print(f"kill points (seed {seed}):")
  work = str(tmp_path / "killed")
  args = ["--config", "configs/train_sad.py:runlocal", "--workdir", work, *overrides]
  committed: list[int] = []
  for i, at in enumerate(at_steps):
    p = cli(args)
    out: list[str] = []
    deadline = time.time() + 240
    reached = _wait_for(p, out, lambda line, at=at: line.startswith(f"step {at}/"), deadline)
    assert reached, "".join(out)
    if i == write_kill:
      assert _kill_during_checkpoint_write(p, work, deadline), "".join(out)
      where = f"during the first async checkpoint write after step {at}"
    else:
      delay = float(rng.uniform(0, 0.2))
      time.sleep(delay)
      p.send_signal(signal.SIGKILL)
      where = f"{1000 * delay:.0f} ms after step {at}"
    p.wait()
    assert p.returncode == -signal.SIGKILL
    committed = sorted(int(s) for s in os.listdir(os.path.join(work, "checkpoints"))
                       if s.isdigit())
    print(f"  SIGKILL {where}; committed checkpoints {committed}")

  # SIGTERM (preemption) on a resumed run: it saves the step it is at and exits 0
  p = cli(args)
  out = []
  assert _wait_for(p, out, lambda line: line.startswith("step "), time.time() + 240)
  p.send_signal(signal.SIGTERM)
  rest = p.communicate(timeout=240)[0]
  text = "".join(out) + rest
  assert p.returncode == 0, text
  assert ("resumed from step" in text) == bool(committed), text
  assert "SIGTERM: saved step" in text
  assert "preempted at step" in text

  p = cli(args)
  text = p.communicate(timeout=240)[0]
  assert p.returncode == 0, text
  assert f"finished at step {total}" in text
  assert not [n for n in os.listdir(os.path.join(work, "checkpoints")) if "tmp" in n]
  assert_bit_identical(final_params(work), final_params(str(tmp_path / "clean")))


def test_divergence_stops_with_a_diagnostic_and_keeps_the_good_checkpoint(train_data, tmp_path):
  # lr 1e30 (no clipping): parameters overflow after the first update, the loss is inf
  config, _ = train_config(train_data, extra=["--config.optim.lr=1e30",
                                              "--config.optim.clip_norm=0.0",
                                              "--config.optim.warmup_steps=0",
                                              "--config.train.checkpoint_every=1"])
  with pytest.raises(train.TrainingDiverged) as e:
    train.train_and_evaluate(config, str(tmp_path))
  report = json.loads((tmp_path / "nan_report.process0.json").read_text())
  assert report["step"] >= 1 and report["examples"]
  assert f"step {report['step']}" in str(e.value)
  assert not (tmp_path / "final").exists()
  # the checkpoints on disk hold finite parameters only
  from sad_jax.trainer import checkpoint as C

  ck = C.Checkpoints(str(tmp_path / "checkpoints"))
  assert ck.latest_step() == report["step"]
  ck.close()


def test_resume_refuses_a_changed_experiment(train_data, tmp_path):
  config, _ = train_config(train_data, extra=["--config.train.steps=3"])
  train.train_and_evaluate(config, str(tmp_path))
  changed, _ = train_config(train_data, extra=["--config.train.steps=3",
                                               "--config.optim.lr=0.1"])
  with pytest.raises(DataError, match="optim.lr"):
    train.train_and_evaluate(changed, str(tmp_path))


def test_a_checkpoint_older_than_a_setting_resumes_at_its_old_behaviour():
  # written before data.pack_lookahead existed: its rows were packed in order (lookahead 1)
  meta = {"config": {"data.seq_len": 64}, "fingerprints": {}}
  train._check_resumable(meta, {"data.seq_len": 64, "data.pack_lookahead": 1}, {}, "ckpt")
  with pytest.raises(DataError, match="data.pack_lookahead"):
    train._check_resumable(meta, {"data.seq_len": 64, "data.pack_lookahead": 8}, {}, "ckpt")
  # written before the compact head: it computed the head at every position
  train._check_resumable(meta, {"data.seq_len": 64, "objective.compact_head": False}, {},
                         "ckpt")
  with pytest.raises(DataError, match="objective.compact_head"):
    train._check_resumable(meta, {"data.seq_len": 64, "objective.compact_head": True}, {},
                           "ckpt")


def test_cli_errors_name_the_field(train_data, tmp_path):
  p = cli(["--config", "configs/train_sad.py", "--workdir", str(tmp_path),
           "--config.no_such=1"])
  out = p.communicate(timeout=120)[0]
  assert p.returncode == 2 and "no_such" in out and "Traceback" not in out
  ds, _, _ = train_data
  p = cli(["--config", "configs/train_sad.py", "--workdir", str(tmp_path),
           f"--config.dataset={ds}"])
  out = p.communicate(timeout=120)[0]
  assert p.returncode == 2 and "config.teacher_store" in out and "Traceback" not in out


@pytest.mark.fireact
@pytest.mark.slow
def test_fireact_demo_size_sad_with_a_teacher_store(tmp_path):
  """The demo-size `sad` config on the prepared FireAct data with a precomputed store."""
  from sad_jax.common import configlib
  from sad_jax.configs import prepare_fireact
  from sad_jax.data import prepare
  from sad_jax.models import transformer as T
  from sad_jax.models.config import ModelConfig
  from sad_jax.teacher import precompute as pc

  cfgp = prepare_fireact.get_config()
  cfgp.inputs = tuple(os.path.join(REPO, p) for p in cfgp.inputs)
  cfgp.max_len = 512
  ds = str(tmp_path / "ds")
  prepare.prepare(cfgp, ds, progress=False)
  _, tok, _ = prepare.load_prepared(ds)
  tcfg = ModelConfig(model_type="llama", vocab_size=tok.vocab_size, hidden_size=64,
                     intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                     head_dim=16)
  tparams = jax.tree.map(lambda a: a * 10, T.init_params(tcfg, jax.random.PRNGKey(0)))
  pc.precompute(dataset_dir=ds, cfg=tcfg, params=tparams, teacher_name="tiny",
                out_dir=str(tmp_path / "store"), k=16, progress=False, batch_size=16)
  config = configlib.load(os.path.join(REPO, "sad_jax", "configs", "train_sad.py"), [
      f"--config.dataset={ds}", f"--config.teacher_store={tmp_path / 'store'}",
      "--config.train.steps=4", "--config.train.eval_batches=2", "--config.metrics.mfu=false"])
  result = train.train_and_evaluate(config, str(tmp_path / "run"))
  assert result.status == "finished" and result.step == 4
  rows = [r for r in metrics_lib.read_jsonl(str(tmp_path / "run")) if "reason/loss" in r]
  assert rows and all(r["reason/tokens"] > 0 and r["action/tokens"] > 0 for r in rows)
  # sequential packing of 100–500-token trajectories into 513-token rows: ~75% tokens
  assert max(r.get("packing", 0) for r in rows) > 0.6


def test_pretrained_student_online_teacher_bf16_and_keep_best(train_data, tmp_path):
  """Student initialised from an HF folder holding the teacher itself, the teacher run
  online inside the step, bf16 compute: the first reason KL is ~0 (student = teacher). With
  keep=1 and keep_best=1 the latest and the best-validation checkpoints remain."""
  from sad_jax.models import hf

  _, _, teacher_dir = train_data
  tcfg, tparams = checkpoint_io.load_model(teacher_dir)
  hf.save(tcfg, tparams, str(tmp_path / "hf_student"))
  config, _ = train_config(train_data, extra=[
      "--config.model.init=pretrained", f"--config.model.path={tmp_path / 'hf_student'}",
      f"--config.teacher.online={teacher_dir}", "--config.teacher_store=",
      "--config.teacher.online_kinds=('reason', 'action')", "--config.model.dtype=bfloat16",
      "--config.checkpoint.keep=1", "--config.checkpoint.keep_best=1",
      "--config.train.eval_every=1", "--config.train.log_every=1",
      "--config.train.checkpoint_every=1", "--config.metrics.mfu=true",
      "--config.optim.lr=0.05", "--config.optim.warmup_steps=0"])
  result = train.train_and_evaluate(config, str(tmp_path / "run"))
  rows = metrics_lib.read_jsonl(str(tmp_path / "run"))
  first = next(r for r in rows if r["split"] == "train" and "reason/loss" in r)
  assert first["step"] == 1 and 0 <= first["reason/loss"] < 0.05
  assert 0 < first["mfu"] < 1
  val = {r["step"]: r["loss"] for r in rows if r["split"] == "validation"}
  best = min(val, key=val.get)
  assert sorted(result.checkpoint_steps) == sorted({best, 6})


def test_weight_decay_skips_norms_biases_and_span_weights():
  from sad_jax.trainer import step as step_lib

  tree = {"model": {"embed": np.zeros((4, 2)), "layers_0": {
      "attn": {"q": np.zeros((2, 1, 2)), "q_bias": np.zeros((1, 2))},
      "input_norm": {"scale": np.zeros(2)}}}, "span": np.zeros(2)}
  mask = step_lib.decay_mask(tree)
  assert mask == {"model": {"embed": True, "layers_0": {"attn": {"q": True, "q_bias": False},
                                                        "input_norm": {"scale": False}}},
                  "span": False}


def test_bad_objective_config_is_a_clear_error(train_data, tmp_path):
  config, _ = train_config(train_data, "sft", extra=["--config.objective.pcgrad=true"])
  with pytest.raises(DataError, match="pcgrad needs two loss groups") as e:
    train.train_and_evaluate(config, str(tmp_path))
  assert e.value.field == "config.objective"
  config, _ = train_config(train_data, extra=["--config.objective.divergence=kl"])
  with pytest.raises(DataError, match="divergence must be one of"):
    train.train_and_evaluate(config, str(tmp_path))


def _can_mount_tmpfs() -> bool:
  try:
    r = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"],
                       capture_output=True, timeout=30)
  except (OSError, subprocess.TimeoutExpired):
    return False
  return r.returncode == 0


@pytest.mark.slow
def test_disk_full_while_checkpointing_keeps_the_previous_checkpoint(train_data, tmp_path):
  """The workdir is a 64 MB tmpfs (in a user + mount namespace). After the step-2 checkpoint
  commits, a filler takes the rest of the space: the next save fails with a clear error and
  a non-zero exit, the step-2 checkpoint stays intact, and a resume from it (with space
  again) ends bit-identical to an uninterrupted run."""
  if not _can_mount_tmpfs():
    pytest.skip("needs unprivileged user + mount namespaces (unshare -rm) to mount a tmpfs")
  total = 8
  extra = ["--config.train.checkpoint_every=2", f"--config.train.steps={total}",
           "--config.checkpoint.use_async=true"]
  config, overrides = train_config(train_data, extra=extra)
  clean = train.train_and_evaluate(config, str(tmp_path / "clean"))
  assert clean.step == total

  mnt, copy = tmp_path / "mnt", tmp_path / "copy"
  mnt.mkdir()
  cmd = " ".join(["exec", sys.executable, "-m", "sad_jax.cli", "train", "--config",
                  "configs/train_sad.py:runlocal", "--workdir", f"{mnt}/work",
                  *[f"'{o}'" for o in overrides]])
  script = f"""
set -u
mount -t tmpfs -o size=64m tmpfs {mnt}
{cmd} > {tmp_path}/out.txt 2>&1 &
pid=$!
for i in $(seq 2400); do
  [ -e {mnt}/work/checkpoints/2/commit_success.txt ] && break
  kill -0 $pid 2>/dev/null || break
  sleep 0.05
done
dd if=/dev/zero of={mnt}/filler bs=1M count=100 2>/dev/null
wait $pid
echo "exit $?" >> {tmp_path}/out.txt
rm -f {mnt}/filler
cp -a {mnt}/work {copy}
"""
  subprocess.run(["unshare", "-rm", "bash", "-c", script], cwd=REPO, timeout=300, check=True)
  out = (tmp_path / "out.txt").read_text()
  print(out)
  code = int(out.rsplit("exit ", 1)[1])
  assert code == 2, out
  last = out.strip().splitlines()[-2]  # before our "exit N"
  assert last.startswith("sad-jax: error: ") and "checkpoint, step 2, is intact" in last, out
  # the first write to fail may be the checkpoint's or the metrics'; either way it says so
  assert "no space for checkpoint step" in last or "disk full" in last, out
  # orbax's background threads may log their failed writes first (one line each); nothing
  # of a traceback comes from the main thread
  assert "Traceback" not in out.split("sad-jax: error: ")[-1], out
  steps = sorted(int(s) for s in os.listdir(copy / "checkpoints") if s.isdigit())
  assert steps and steps[0] == 2, steps
  # resume from what survived, with space again: the same final parameters
  resumed = train.train_and_evaluate(config, str(copy))
  assert resumed.step == total
  assert_bit_identical(final_params(str(copy)), final_params(str(tmp_path / "clean")))


def _store_with_kinds(train_data, folder, kinds):
  """A copy of the shared store whose manifest claims only `kinds` (the check reads it)."""
  import shutil

  shutil.copytree(train_data[1], folder)
  man = json.loads((folder / "manifest.json").read_text())
  man["span_kinds"] = list(kinds)
  (folder / "manifest.json").write_text(json.dumps(man))
  return str(folder)


def test_an_objective_needs_a_store_of_its_span_kinds(train_data, tmp_path):
  """token_kd distils every generated token: a reason-only store is refused, naming the
  objective's kinds and the store's, instead of training reason-only KD."""
  store = _store_with_kinds(train_data, tmp_path / "store", ["reason"])
  config, _ = train_config(train_data, "token_kd", extra=[f"--config.teacher_store={store}"])
  with pytest.raises(DataError) as e:
    train.train_and_evaluate(config, str(tmp_path / "run"))
  assert e.value.field == "span_kinds" and e.value.path == f"{store}/manifest.json"
  assert ("objective 'token_kd' learns reason, action, answer tokens from the teacher but the "
          "teacher store covers only reason: action tokens would have no teacher") in str(e.value)
  # sad distils reasons only: the same store is enough; mixing teacher KD into the actions
  # (action_teacher_weight) needs action top-k again
  split = pipeline.open_split(train_data[0], "train")
  assert split.kind_tokens[SpanKind.ACTION] > 0 and split.kind_tokens[SpanKind.ANSWER] == 0
  sad, _ = train_config(train_data, "sad")
  train_setup.check_teacher_kinds(train_setup.objective_for(sad, None), ["reason"], split, what="the store",
                            field="span_kinds")
  sad.objective.action_teacher_weight = 0.5
  with pytest.raises(DataError, match="learns reason, action, answer tokens") as e:
    train_setup.check_teacher_kinds(train_setup.objective_for(sad, None), ["reason"], split,
                              what="the store", field="span_kinds")
  assert "only reason: action tokens" in str(e.value)  # no answer tokens in this data
  # the online teacher's kinds are checked the same way
  config, _ = train_config(train_data, "token_kd", extra=[
      f"--config.teacher.online={train_data[2]}", "--config.teacher_store="])
  with pytest.raises(DataError, match="the online teacher covers only reason") as e:
    train.train_and_evaluate(config, str(tmp_path / "online"))
  assert e.value.field == "config.teacher.online_kinds"


@pytest.mark.slow
def test_token_kd_through_the_trainer_distils_every_generated_token(train_data, tmp_path,
                                                                     monkeypatch):
  """token_kd's one group holds every reason, action and answer target of a step, counted
  here in NumPy from the batches the trainer drew."""
  drawn = []
  next_batch = pipeline.TrainIterator.__next__

  def record(self):
    out = next_batch(self)
    drawn.append(out[0])
    return out

  monkeypatch.setattr(pipeline.TrainIterator, "__next__", record)
  config, _ = train_config(train_data, "token_kd", extra=[
      "--config.train.steps=2", "--config.train.log_every=1", "--config.train.eval_every=0",
      "--config.train.eval_batches=1", "--config.train.checkpoint_every=100",
      "--config.train.export=false"])
  assert train.train_and_evaluate(config, str(tmp_path)).step == 2
  rows = [r for r in metrics_lib.read_jsonl(str(tmp_path)) if r["split"] == "train" and "loss" in r]
  assert [r["step"] for r in rows] == [1, 2]
  generated = [int(SpanKind.REASON), int(SpanKind.ACTION), int(SpanKind.ANSWER)]
  for row, batch in zip(rows, drawn):
    seg, kinds = batch["segment_ids"], batch["kinds"]
    target = (seg[..., 1:] == seg[..., :-1]) & (seg[..., 1:] > 0)  # within one trajectory
    want = {k: int(np.sum(target & (kinds[..., 1:] == k))) for k in generated}
    assert want[SpanKind.REASON] > 0 and want[SpanKind.ACTION] > 0, want
    assert row["kd/tokens"] == sum(want.values())
    assert np.isfinite(row["kd/loss"]) and row["kd/loss"] > 0


@pytest.mark.slow
@pytest.mark.early
def test_kill_sigint_sigterm_resume_on_a_222_mesh_is_bit_identical(train_data, tmp_path):
  """On (2,2,2) (parameters and Adam moments split over fsdp and tensor, 4-row batches over
  data × fsdp): a SIGKILL after step 3 leaves exactly the step-2 checkpoint (synchronous
  saves every 2 steps); the resumed run stops on SIGINT, the next on SIGTERM, each saving
  the step it is at; the last run's final parameters are bit-identical to an
  uninterrupted run's."""
  # room after each signal: a step line is printed once its metrics come back, and by then
  # the next step may already be dispatched (at 8 steps, a loaded machine once reached the
  # last step before the SIGTERM was handled)
  total = 16
  extra = ["--config.mesh.shape=(2,2,2)", f"--config.train.steps={total}",
           "--config.train.checkpoint_every=2", "--config.train.eval_every=0",
           "--config.train.log_every=1", "--config.checkpoint.use_async=false"]
  config, overrides = train_config(train_data, extra=extra)
  assert train.train_and_evaluate(config, str(tmp_path / "clean")).step == total
  work = str(tmp_path / "killed")
  args = ["--config", "configs/train_sad.py:runlocal", "--workdir", work, *overrides]
  ckpts = os.path.join(work, "checkpoints")
  committed = lambda: sorted(int(s) for s in os.listdir(ckpts) if s.isdigit())

  p, out = cli(args), []
  assert _wait_for(p, out, lambda line: line.startswith("step 3/"), time.time() + 300), out
  p.send_signal(signal.SIGKILL)
  p.wait()
  assert p.returncode == -signal.SIGKILL and committed() == [2], ("".join(out), committed())
  # what that checkpoint holds really is split: orbax's record of each array's sharding
  import base64

  with open(os.path.join(ckpts, "2", "state", "_sharding")) as f:
    specs = {base64.b64decode(k).decode(): json.loads(v)["partition_spec"]
             for k, v in json.load(f).items()}
  for name in ("params", "opt_state.1.0.mu.model", "opt_state.1.0.nu.model"):
    assert specs[f"{name}.embed"] == ["tensor", "fsdp"], specs
    assert specs[f"{name}.layers_0.attn.q"] == ["fsdp", "tensor", None], specs

  saved = 2
  for sig, after in ((signal.SIGINT, 5), (signal.SIGTERM, None)):
    p, out = cli(args), []
    after = after or saved + 1
    assert _wait_for(p, out, lambda line, a=after: line.startswith(f"step {a}/"),
                     time.time() + 300), "".join(out)
    p.send_signal(sig)
    text = "".join(out) + p.communicate(timeout=300)[0]
    assert p.returncode == 0, text
    assert f"resumed from step {saved}" in text, text
    now = int(text.split(f"{sig.name}: saved step ")[1].split(";")[0])
    assert after <= now < total and f"preempted at step {now}" in text, text
    assert committed()[-1] == now, committed()
    saved = now

  p = cli(args)
  text = p.communicate(timeout=300)[0]
  assert p.returncode == 0 and f"resumed from step {saved}" in text, text
  assert f"finished at step {total}" in text, text
  assert_bit_identical(final_params(work), final_params(str(tmp_path / "clean")))


@pytest.mark.slow
def test_scanned_layers_train_like_unrolled_from_teacher_layers_and_export(train_data, tmp_path):
  """model.scan_layers=true through the trainer: a teacher_layers student (read per layer,
  stacked in the jitted init) trains as the unrolled one does, its final/ folder is per
  layer and exports; a resumption may not flip the layout."""
  from sad_jax.models import export, hf

  _, _, teacher_dir = train_data
  base = ["--config.model.init=teacher_layers:0,1", f"--config.model.path={teacher_dir}",
          "--config.train.steps=3", "--config.train.eval_every=3"]
  finals, losses = {}, {}
  for scan in (False, True):
    config, _ = train_config(train_data, extra=[*base, f"--config.model.scan_layers={scan}"])
    run_dir = str(tmp_path / f"scan_{scan}")
    assert train.train_and_evaluate(config, run_dir).status == "finished"
    losses[scan] = [r["loss"] for r in metrics_lib.read_jsonl(run_dir) if "loss" in r]
    cfg, finals[scan] = checkpoint_io.load_model(os.path.join(run_dir, "final"))
    assert "layers_1" in finals[scan] and "layers" not in finals[scan]
  # the losses before each update: the first two to rounding; the third follows two Adam
  # updates, which normalise each gradient entry by its own scale, so a tiny entry's
  # rounding moves its update by up to lr (relative loss differences of 8e-6 with the
  # reference attention and 2.3e-5 with flash here)
  np.testing.assert_allclose(losses[True][:2], losses[False][:2], rtol=1e-6)
  np.testing.assert_allclose(losses[True][2], losses[False][2], rtol=1e-4)
  # three Adam steps normalise each gradient entry by its own scale, so a tiny one's
  # rounding (scan and unrolled sum in different orders) moves its update: 6 of 19,200
  # entries differed by up to 4.7e-5 here (parameters ~0.1), the rest by < 3e-5
  for a, b in zip(jax.tree.leaves(finals[True]), jax.tree.leaves(finals[False]), strict=True):
    np.testing.assert_allclose(a, b, atol=1e-4)
  export.export(str(tmp_path / "scan_True"), str(tmp_path / "hf"), dtype="float32")
  ids = np.arange(3, 40)[None]
  hf_cfg, hf_params = hf.load(tmp_path / "hf")
  np.testing.assert_allclose(hf.forward(hf_cfg, hf_params, ids),
                             hf.forward(cfg, finals[True], ids), rtol=1e-5, atol=1e-5)
  config, _ = train_config(train_data, extra=[*base, "--config.model.scan_layers=true",
                                              "--config.train.steps=6"])
  with pytest.raises(DataError, match="model.scan_layers"):
    train.train_and_evaluate(config, str(tmp_path / "scan_False"))
