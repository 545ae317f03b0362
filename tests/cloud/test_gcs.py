"""Cloud paths (gs://) end to end, against a real local GCS emulator (conftest.py): the path
layer's atomic-completion promise on an object store, the generation semantics orbax needs,
then prepare → teacher precompute → train (SIGTERM, resume, bit-identical to an
uninterrupted run) → metrics/TensorBoard → export → inspect/eval, every path a gs:// one,
and bad gs:// input as located errors."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from sad_jax import cli
from sad_jax.common import configlib, fileio, objects
from sad_jax.common.errors import DataError
from sad_jax.data import inspect as inspect_lib
from sad_jax.data import prepare, schema
from sad_jax.models import checkpoint_io
from sad_jax.models import transformer as T
from sad_jax.models.config import ModelConfig
from sad_jax.teacher import precompute as pc
from sad_jax.teacher import store as store_lib
from sad_jax.trainer import metrics as metrics_lib
from sad_jax.trainer import pipeline
from sad_jax.trainer import train as train_lib
from sad_jax.trainer.checkpoint import latest_complete
from tests import helpers
from tests.train.conftest import REPO, TINY


def _fresh(gcs: str, name: str) -> str:
  """A prefix of its own per test (the emulator lives for the whole session)."""
  return f"{gcs}/{name}-{time.monotonic_ns()}"


def test_atomic_write_on_gcs_appears_whole_or_not_at_all(gcs):
  root = _fresh(gcs, "aw")
  with fileio.atomic_write(f"{root}/a.json") as f:
    json.dump({"x": 1}, f)
  assert json.loads(fileio.read_text(f"{root}/a.json")) == {"x": 1}
  with pytest.raises(RuntimeError), fileio.atomic_write(f"{root}/b.json") as f:
    f.write("half")
    raise RuntimeError("writer dies mid-write")
  assert not fileio.exists(f"{root}/b.json")
  # a failed rewrite keeps the old object
  with pytest.raises(RuntimeError), fileio.atomic_write(f"{root}/a.json") as f:
    f.write("{")
    raise RuntimeError
  assert json.loads(fileio.read_text(f"{root}/a.json")) == {"x": 1}
  assert not fileio.is_remote("runs/x") and fileio.abspath(f"{root}/") == root


def test_atomic_dir_on_gcs_is_complete_only_with_its_marker(gcs, tmp_path):
  folder = _fresh(gcs, "ad") + "/ds"
  with fileio.atomic_dir(folder) as tmp:
    for name, data in (("a.bin", b"1234"), ("sub/b.txt", b"hello")):
      os.makedirs(os.path.dirname(os.path.join(tmp, name)), exist_ok=True)
      with open(os.path.join(tmp, name), "wb") as f:
        f.write(data)
  fileio.require_complete(folder, what="test folder")
  assert sorted(fileio.listdir(folder)) == ["_complete.json", "a.bin", "sub"]
  # a failure inside the block uploads nothing
  other = _fresh(gcs, "ad") + "/never"
  with pytest.raises(RuntimeError), fileio.atomic_dir(other) as tmp:
    open(os.path.join(tmp, "x"), "w").close()
    raise RuntimeError
  assert not fileio.exists(other)
  # files land in any order (an upload, a copy): a listed file missing or short, or no
  # marker at all, is an incomplete folder, named
  fileio.remove(f"{folder}/sub/b.txt")
  with pytest.raises(DataError, match=r"incomplete test folder: sub/b.txt is missing") as e:
    fileio.require_complete(folder, what="test folder")
  assert e.value.path == f"{folder}/sub/b.txt"
  fileio.copyfile(str(_write(tmp_path / "b.txt", b"hell")), f"{folder}/sub/b.txt")
  with pytest.raises(DataError, match="4 bytes, not 5"):
    fileio.require_complete(folder, what="test folder")
  fileio.remove(f"{folder}/_complete.json")
  with pytest.raises(DataError, match="no _complete.json") as e:
    fileio.require_complete(folder, what="test folder")
  assert e.value.path == folder


def _write(path, data: bytes):
  path.write_bytes(data)
  return path


def test_append_file_and_local_copy_on_gcs(gcs, tmp_path):
  root = _fresh(gcs, "af")
  f = objects.AppendFile(f"{root}/m.jsonl", interval=3600)
  f.write("a\n")
  f.flush()
  f.write("b\n")  # within the interval: not uploaded yet, the last complete version stays
  assert fileio.read_text(f"{root}/m.jsonl") == "a\n"
  f.close()
  assert fileio.read_text(f"{root}/m.jsonl") == "a\nb\n"
  g = objects.AppendFile(f"{root}/m.jsonl")  # a resumed run continues the object
  g.write("c\n")
  g.close()
  assert fileio.read_text(f"{root}/m.jsonl") == "a\nb\nc\n"
  # staged copies: one per object version
  first = fileio.local_copy(f"{root}/m.jsonl")
  assert fileio.local_copy(f"{root}/m.jsonl") == first and open(first).read() == "a\nb\nc\n"
  with fileio.atomic_write(f"{root}/m.jsonl") as h:
    h.write("new\n")
  second = fileio.local_copy(f"{root}/m.jsonl")
  assert second != first and open(second).read() == "new\n"


def _record_uploads(monkeypatch, fs) -> list:
  """Every upload request gcsfs sends from now on, as (args, kwargs), for a replay."""
  sent, call = [], fs._call

  async def recording(method, path, *args, **kwargs):
    if method == "POST" and "/upload/" in path:
      sent.append(((method, path, *args), dict(kwargs)))
    return await call(method, path, *args, **kwargs)

  monkeypatch.setattr(fs, "_call", recording)
  return sent


def test_a_delayed_duplicate_upload_cannot_put_older_rows_back(gcs, monkeypatch):
  """The CI race (TensorBoard steps [1..5] where metrics.jsonl had [1..6]), forced: a client
  retry whose first attempt reaches the single-threaded server late replays an older
  upload after a newer one. Each upload is conditional on the generation it replaces, so
  the server refuses the late one and the newer rows stay."""
  from fsspec.asyn import sync

  root = _fresh(gcs, "dup")
  fs = fileio._fs(root)
  sent = _record_uploads(monkeypatch, fs)
  f = objects.AppendFile(f"{root}/tb/events", binary=True, interval=3600)
  f.write(b"step 1\n")
  f.flush()
  f.write(b"step 2\n")
  f.close()
  assert len(sent) == 2
  (args, kwargs), _ = sent
  with pytest.raises(FileExistsError):  # the server's 412
    sync(fs.loop, fs._call, *args, **kwargs)
  assert fileio.read_bytes(f"{root}/tb/events") == b"step 1\nstep 2\n"


def test_a_retry_of_an_upload_that_landed_is_taken_as_success(gcs):
  root = _fresh(gcs, "retry")
  path = f"{root}/m.jsonl"
  first = objects.put_if_generation(path, b"a\n", 0)
  # the same upload again, as a retry would send it: refused (412), but the live object is
  # this content, so it is this writer's own
  assert objects.put_if_generation(path, b"a\n", 0) == first
  with pytest.raises(OSError, match="another writer replaced"):
    objects.put_if_generation(path, b"b\n", 0)


def test_two_writers_of_one_object_fail_loudly_not_silently(gcs):
  root = _fresh(gcs, "two")
  a = objects.AppendFile(f"{root}/metrics.jsonl", interval=3600)
  b = objects.AppendFile(f"{root}/metrics.jsonl", interval=3600)
  a.write("a\n")
  a.close()
  with pytest.raises(OSError, match=r"metrics.jsonl: another writer replaced"):
    b.write("b\n")  # its first write uploads at once
    b.close()
  assert fileio.read_text(f"{root}/metrics.jsonl") == "a\n"


def test_two_event_writers_in_one_second_and_process_keep_both(gcs, monkeypatch):
  """Event file names were second + host + pid: two writers in the same second and process
  (or a restarted container with the same pid) shared one object, and the last to close
  dropped the other's steps."""
  from tensorboard.backend.event_processing import event_accumulator

  monkeypatch.setattr(metrics_lib.time, "time", lambda: 1_700_000_000.0)
  logdir = f"{_fresh(gcs, 'ev')}/tb/train"
  first, second = metrics_lib.EventWriter(logdir), metrics_lib.EventWriter(logdir)
  assert first.path != second.path
  first.scalars(1, {"loss": 1.0})
  second.scalars(2, {"loss": 2.0})
  second.close()
  first.close()
  steps = []
  for path in fileio.glob(logdir, "events.out.tfevents.*"):
    ea = event_accumulator.EventAccumulator(fileio.local_copy(path))
    ea.Reload()
    steps += [s.step for s in ea.Scalars("loss")]
  assert sorted(steps) == [1, 2]


def test_local_copy_reads_again_when_the_object_changes_mid_read(gcs, monkeypatch):
  root = _fresh(gcs, "mid")
  path = f"{root}/tok.model"
  fs = fileio._fs(path)
  fs.pipe_file(path, b"old")
  get_file, changed = fs.get_file, []

  def get_then_rewrite(rpath, lpath, **kw):
    get_file(rpath, lpath, **kw)
    if not changed:  # a writer replaces the object right after the first download
      changed.append(True)
      fs.pipe_file(rpath, b"newer")

  monkeypatch.setattr(fs, "get_file", get_then_rewrite)
  local = fileio.local_copy(path)
  assert open(local, "rb").read() == b"newer"
  assert len(fileio.glob(os.path.dirname(local), "*")) == 1  # no copy kept under old key


def test_emulator_keeps_generations_and_preconditions(gcs):
  """What tensorstore relies on (gcs_emulator.py adds it): a new generation per write,
  `ifGenerationMatch` (0: must not exist) answered 412, `ifGenerationNotMatch` on a read
  answered 304, a resumable upload's conditions checked when it finishes, and a conditional
  delete."""
  import urllib.error
  import urllib.request

  base, bucket = os.environ["STORAGE_EMULATOR_HOST"], gcs.removeprefix("gs://")
  name = _fresh("", "gen").lstrip("/")

  def call(method, path, data=None, headers=None):
    r = urllib.request.Request(base + path, data=data, method=method, headers=headers or {})
    try:
      with urllib.request.urlopen(r) as resp:
        return resp.status, resp.headers, resp.read()
    except urllib.error.HTTPError as e:
      return e.code, e.headers, e.read()

  upload = f"/upload/storage/v1/b/{bucket}/o?uploadType=media&name={name}"
  status, _, body = call("POST", upload + "&ifGenerationMatch=0", b"one")
  first = json.loads(body)["generation"]
  assert status == 200 and int(first) > 0
  assert call("POST", upload + "&ifGenerationMatch=0", b"two")[0] == 412
  status, _, body = call("POST", upload + f"&ifGenerationMatch={first}", b"two")
  second = json.loads(body)["generation"]
  assert status == 200 and int(second) > int(first)
  obj = f"/storage/v1/b/{bucket}/o/{name}"
  status, headers, body = call("GET", obj + "?alt=media")
  assert (status, headers["x-goog-generation"], body) == (200, second, b"two")
  assert call("GET", obj + f"?alt=media&ifGenerationNotMatch={second}")[0] == 304
  assert call("GET", obj + f"?alt=json&ifGenerationMatch={first}")[0] == 412
  # a resumable upload that must create the object loses to a write made meanwhile
  status, headers, _ = call("POST", f"/upload/storage/v1/b/{bucket}/o?uploadType=resumable"
                            f"&name={name}-r&ifGenerationMatch=0", b"{}",
                            {"Content-Type": "application/json"})
  session = headers["Location"].removeprefix(base)
  call("POST", f"/upload/storage/v1/b/{bucket}/o?uploadType=media&name={name}-r", b"other")
  assert call("PUT", session, b"abc", {"Content-Range": "bytes 0-2/3"})[0] == 412
  assert call("DELETE", obj + f"?ifGenerationMatch={first}")[0] == 412
  assert call("DELETE", obj + f"?ifGenerationMatch={second}")[0] in (200, 204)


# saves a ~100-array tree at step 1, starts an async save of step 2 and SIGKILLs itself as
# soon as step 2's first objects are in the bucket (before orbax's commit_success.txt)
_KILLED_SAVER = """
import os, signal, sys, time
import numpy as np
import orbax.checkpoint as ocp
from sad_jax.common import fileio
directory = sys.argv[1]
tree = {f"a{i}": np.arange(i + 3, dtype=np.float32) * i for i in range(100)}
mgr = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(create=True))
mgr.save(1, args=ocp.args.StandardSave(tree))
mgr.wait_until_finished()
mgr.save(2, args=ocp.args.StandardSave({k: v + 2 for k, v in tree.items()}))
while not fileio.exists(directory + "/2"):
  time.sleep(0.05)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_orbax_on_gcs_many_arrays_and_a_kill_during_a_save(gcs):
  """orbax/tensorstore (OCDBT) on its own: a process saving a ~100-array tree is SIGKILLed
  while its second save is being written; the partial step is not listed, the first
  restores, and the step saves again over the partial one."""
  import orbax.checkpoint as ocp

  directory = _fresh(gcs, "orbax")
  p = subprocess.run([sys.executable, "-c", _KILLED_SAVER, directory], capture_output=True,
                     text=True, timeout=240)
  assert p.returncode == -signal.SIGKILL, p.stdout + p.stderr
  assert not fileio.exists(f"{directory}/2/commit_success.txt")  # killed mid-save
  tree = {f"a{i}": np.arange(i + 3, dtype=np.float32) * i for i in range(100)}
  mgr = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(create=True))
  assert mgr.all_steps() == [1] and latest_complete(directory) == 1
  out = mgr.restore(1, args=ocp.args.StandardRestore(tree))
  for k, v in tree.items():
    assert np.array_equal(out[k], v), k
  mgr.save(2, args=ocp.args.StandardSave({k: v + 2 for k, v in tree.items()}))
  mgr.wait_until_finished()
  assert mgr.all_steps() == [1, 2]
  out = mgr.restore(2, args=ocp.args.StandardRestore(tree))
  for k, v in tree.items():
    assert np.array_equal(out[k], v + 2), k
  mgr.close()


def test_a_missing_gcs_backend_says_which_extra_to_install(monkeypatch):
  import fsspec

  def missing(*args, **kwargs):
    raise ImportError("Install gcsfs to access Google Storage")

  monkeypatch.setattr(fsspec, "filesystem", missing)
  with pytest.raises(OSError, match=r"pip install 'sad_jax\[gcs\]'"):
    fileio.exists("gs://bucket/x")


def _random_params(cfg: ModelConfig, *, seed: int, scale: float):
  """Parameters of `cfg`'s shapes drawn with numpy: norm scales 1, weights N(0, scale²).
  T.init_params would compile a threefry draw per array (~20 s of CPU for this tiny model),
  which this test does not need."""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(lambda: T.init_params(cfg, jax.random.PRNGKey(0)))
  return jax.tree.map(lambda s: np.ones(s.shape, s.dtype) if len(s.shape) == 1
                      else rng.normal(0.0, scale, s.shape).astype(s.dtype), shapes)


def _params(folder: str):
  _, params = checkpoint_io.load_model(folder)
  return jax.tree.map(np.asarray, params)


@pytest.mark.slow
@pytest.mark.early
def test_prepare_teacher_train_resume_export_eval_all_on_gcs(gcs, tmp_path, spm_path,
                                                             monkeypatch, capsys):
  """Every path a gs:// one: prepare (CLI) → teacher precompute (interrupted, resumed) →
  train (a `sad-jax train` process stopped by SIGTERM after a checkpoint, resumed:
  bit-identical to an uninterrupted run) → metrics/TensorBoard → export → eval (CLI)."""
  root = _fresh(gcs, "e2e")
  inputs, tok, ds, store = (f"{root}/in/t.jsonl", f"{root}/in/tok.model", f"{root}/ds",
                            f"{root}/store")
  schema.write_jsonl(inputs, helpers.synthetic_trajectories(24, seed=11))
  fileio.copyfile(spm_path, tok)
  # the CLI in this process (its main is what the console script runs; a subprocess only
  # where a signal is needed): nothing local may be named after a gs:// argument
  monkeypatch.chdir(tmp_path)

  assert cli.main(["prepare", "--config", os.path.join(REPO, "sad_jax", "configs", "prepare_base.py"),
                   "--out", ds, f"--config.inputs=('{inputs}',)",
                   f"--config.tokenizer.path={tok}", "--config.max_len=256",
                   "--config.val_fraction=0.2", "--quiet"]) == 0
  assert f"dataset: {ds}" in capsys.readouterr().out
  fileio.require_complete(ds, what="prepared dataset")
  _, dtok, _ = prepare.load_prepared(ds)
  assert dtok.path == f"{ds}/tokenizer.model"  # read in place (bytes), errors name gs://
  assert "syn-" in inspect_lib.inspect(ds, index=0)

  # teacher precompute: interrupted after one shard, the store is not taken as complete
  cfg = ModelConfig(model_type="llama", vocab_size=dtok.vocab_size, hidden_size=32,
                    intermediate_size=64, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=8)
  kw = dict(dataset_dir=ds, cfg=cfg, params=_random_params(cfg, seed=0, scale=0.2),
            teacher_name="tiny", out_dir=store, k=16,
            span_kinds=("reason", "action"), progress=False, shard_size=8)
  pc.precompute(**kw, stop_after_shards=1)
  assert len(fileio.glob(store, "*.done.json")) == 1
  with pytest.raises(DataError, match="no manifest.json"):
    store_lib.TeacherStore(store)
  manifest = pc.precompute(**kw)  # resumes: the marked shard is kept, the rest computed
  assert len(manifest.shards) == len(fileio.glob(store, "*.done.json")) >= 3
  pipeline.open_teacher(store, pipeline.open_split(ds, "train"), k=16)

  # train: an uninterrupted run (in process), and a CLI run stopped by SIGTERM once it has
  # written a checkpoint, then resumed (orbax arrays through tensorstore's GCS driver). The
  # student starts from a model folder in the bucket (a scratch init compiles its random
  # initialiser, ~20 s of this test's CPU time)
  student = f"{root}/student"
  checkpoint_io.save_params(student, cfg, _random_params(cfg, seed=1, scale=0.02))
  total = 6
  overrides = [f"--config.dataset={ds}", f"--config.teacher_store={store}", *TINY,
               "--config.model.init=pretrained", f"--config.model.path={student}",
               f"--config.train.steps={total}", "--config.train.checkpoint_every=2",
               "--config.train.log_every=1", "--config.train.eval_every=3",
               "--config.train.eval_batches=1", "--config.checkpoint.use_async=true"]
  config_arg = os.path.join(REPO, "sad_jax", "configs", "train_sad.py") + ":runlocal"
  config = configlib.load(config_arg, overrides)
  clean, killed = f"{root}/runs/clean", f"{root}/runs/killed"
  result = train_lib.train_and_evaluate(config, clean)
  assert result.status == "finished" and result.step == total

  p = subprocess.Popen([sys.executable, "-m", "sad_jax.cli", "train", "--config", config_arg,
                        "--workdir", killed, *overrides], cwd=tmp_path, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True)
  out = []
  deadline = time.time() + 240
  while time.time() < deadline:
    line = p.stdout.readline()
    assert line, "".join(out)
    out.append(line)
    if line.startswith("step 3/"):  # after the step-2 checkpoint
      break
  p.send_signal(signal.SIGTERM)
  text = "".join(out) + p.communicate(timeout=240)[0]
  assert p.returncode == 0 and "SIGTERM: saved step" in text, text
  stopped = latest_complete(f"{killed}/checkpoints")
  assert stopped is not None and 3 <= stopped < total, text
  resumed = train_lib.train_and_evaluate(config, killed)
  assert resumed.step == total
  final = _params(f"{clean}/final")
  for a, b in zip(jax.tree.leaves(final), jax.tree.leaves(_params(f"{killed}/final")),
                  strict=True):
    assert np.array_equal(a.view(np.uint32), b.view(np.uint32))

  # metrics.jsonl and TensorBoard events in the bucket (TensorBoard's reader, CRCs checked)
  rows = metrics_lib.read_jsonl(clean)
  train_rows = [r for r in rows if r["split"] == "train" and "loss" in r]
  assert [r["step"] for r in train_rows] == list(range(1, total + 1))
  killed_rows = [r for r in metrics_lib.read_jsonl(killed) if r["split"] == "train"
                 and "loss" in r]
  # every step logged (those between the checkpoint and the SIGTERM twice), same values
  assert {r["step"]: r["loss"] for r in killed_rows} == {r["step"]: r["loss"]
                                                          for r in train_rows}
  from tensorboard.backend.event_processing import event_accumulator

  events = fileio.glob(f"{clean}/tb/train", "events.out.tfevents.*")
  ea = event_accumulator.EventAccumulator(fileio.local_copy(events[0]))
  ea.Reload()
  assert [s.step for s in ea.Scalars("reason/loss")] == [r["step"] for r in train_rows]

  # export (CLI) to an HF folder in the bucket; it reads back (safetensors staged) as the
  # same model
  hf_dir = f"{root}/hf"
  capsys.readouterr()
  assert cli.main(["export", clean, hf_dir, "--dtype", "float32"]) == 0
  assert f"to {hf_dir}" in capsys.readouterr().out
  fileio.require_complete(hf_dir, what="exported model")
  _, hf_params = checkpoint_io.load_model(hf_dir)
  assert np.array_equal(np.asarray(hf_params["embed"])[:dtok.vocab_size],
                        final["embed"][:dtok.vocab_size])

  # eval (CLI): the exported model, its tokenizer and template from the bucket; transcripts
  # and the result back into it
  transcripts, result_json = f"{root}/eval/transcripts.jsonl", f"{root}/eval/result.json"
  assert cli.main(["eval", "--checkpoint", hf_dir, "--env", "math:basic_arithmetic",
                   "--episodes", "2", "--max-steps", "1", "--max-new-tokens", "4",
                   "--batch", "2", "--transcripts", transcripts, "--json", result_json,
                   "--quiet"]) == 0
  assert json.loads(fileio.read_text(result_json))["episodes"] == 2
  assert len(schema.read_jsonl(transcripts)) == 2
  assert os.listdir(tmp_path) == []


def test_bad_gcs_inputs_are_located_errors(gcs, spm_path, capsys):
  root = _fresh(gcs, "bad")
  # a missing dataset, through the CLI: exit 2, the gs:// path named
  assert cli.main(["inspect", f"{root}/nothing"]) == 2
  err = capsys.readouterr().err
  assert f"{root}/nothing" in err and "no such file" in err, err
  with pytest.raises(DataError, match="not a prepared dataset") as e:
    pipeline.open_split(f"{root}/nothing", "train")
  assert e.value.path == f"{root}/nothing"
  # a bad input record: file, record and field named
  bad = f"{root}/in/bad.jsonl"
  with fileio.atomic_write(bad) as f:
    f.write('{"id": "a", "segments": [{"kind": "task", "text": "x"}]}\n')
  with pytest.raises(DataError, match="no action or answer") as e:
    prepare.prepare(_config([bad], spm_path), f"{root}/ds-bad", progress=False)
  assert (e.value.path, e.value.record, e.value.field) == (bad, 1, "segments")
  assert not fileio.exists(f"{root}/ds-bad")
  # a dataset whose upload stopped before its marker: refused, named
  ds = f"{root}/ds"
  src = f"{root}/in/t.jsonl"
  schema.write_jsonl(src, helpers.synthetic_trajectories(6, seed=3))
  prepare.prepare(_config([src], spm_path), ds, progress=False)
  fileio.remove(f"{ds}/_complete.json")
  with pytest.raises(DataError, match="incomplete prepared dataset") as e:
    prepare.load_prepared(ds)
  assert e.value.path == ds
  # a damaged shard in a gs:// teacher store: file, record and field named
  store = f"{root}/store"
  blob = store_lib.encode_record(
      store_lib.TopK("x", np.array([0], np.int32), np.array([[9999]], np.int32),
                     np.array([[-0.1]], np.float32)), vocab_size=600, logp_dtype="float16")
  store_lib.write_shard(store, store_lib.shard_name("train", 0), [blob], ["x"])
  m = store_lib.Manifest(teacher="t", k=1, temperature=1.0, vocab_size=600,
                         teacher_vocab_size=600, tokenizer_fingerprint="f",
                         dataset_fingerprint="d", span_kinds=["reason"],
                         shards=[store_lib.read_marker(store, store_lib.shard_name("train", 0))])
  with fileio.atomic_write(f"{store}/manifest.json") as f:
    f.write(m.to_json())
  with pytest.raises(DataError) as e:
    store_lib.TeacherStore(store).get("x")
  assert (e.value.path, e.value.record, e.value.field) == (
      f"{store}/train-00000.arrayrecord", 1, "ids")


def _config(inputs, spm_path):
  from tests.data.test_prepare import make_config

  return make_config(inputs, tokenizer__path=spm_path, max_len=256, val_fraction=0.2)
