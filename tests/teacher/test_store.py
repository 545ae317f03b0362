"""Teacher store: precompute → verify → read, kill/rerun byte equality, import, corruption."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sad_jax.common.errors import DataError
from sad_jax.common.types import SpanKind
from sad_jax.data import prepare, schema
from sad_jax.models import transformer as T
from sad_jax.models.config import ModelConfig
from sad_jax.models.generate import length_bucket
from sad_jax.teacher import precompute as pc
from sad_jax.teacher import store as S
from sad_jax.teacher import verify as V
from tests import helpers
from tests.data.test_prepare import make_config


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, spm_path):
  root = tmp_path_factory.mktemp("teacher")
  schema.write_jsonl(root / "t.jsonl", helpers.synthetic_trajectories(40, seed=11))
  out = str(root / "ds")
  prepare.prepare(make_config([str(root / "t.jsonl")], tokenizer__path=spm_path, max_len=256),
                  out, progress=False)
  return out


@pytest.fixture(scope="module")
def teacher(dataset):
  _, tok, _ = prepare.load_prepared(dataset)
  cfg = ModelConfig(model_type="llama", vocab_size=tok.vocab_size, hidden_size=32,
                    intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8)
  params = T.init_params(cfg, jax.random.PRNGKey(0))
  params = jax.tree.map(lambda a: a * 20, params)  # peaked distributions, not uniform
  return cfg, params


def run(dataset, teacher, out, **kw):
  cfg, params = teacher
  kw = {"k": 8, "shard_size": 12, "batch_size": 4, "progress": False, **kw}
  return pc.precompute(dataset_dir=dataset, cfg=cfg, params=params, teacher_name="tiny",
                       out_dir=str(out), **kw)


def digests(folder):
  return {n: S.file_sha256(os.path.join(folder, n)) for n in sorted(os.listdir(folder))
          if n.endswith(".arrayrecord") or n == "manifest.json"}


def test_precompute_verify_read(dataset, teacher, tmp_path):
  m = run(dataset, teacher, tmp_path / "st")
  assert m.k == 8 and m.span_kinds == ["reason"]
  report = V.verify(str(tmp_path / "st"), dataset, cfg=teacher[0], params=teacher[1])
  assert report["examples"] == 40 and report["spot_max_rel_error"] < 1e-3
  # every record equals a direct top-k of the teacher at the reason targets
  builder, _, _ = prepare.load_prepared(dataset)
  st = S.TeacherStore(tmp_path / "st")
  ex = builder.as_data_source("train")[0]
  ident = ex["id"].decode()
  rec = st.get(ident)
  ids, kinds = np.asarray(ex["ids"]), np.asarray(ex["kinds"])
  want_pos = np.flatnonzero(kinds[1:] == SpanKind.REASON)
  np.testing.assert_array_equal(rec.positions, want_pos)
  z = np.asarray(T.Transformer(teacher[0]).apply({"params": teacher[1]}, ids[None]))[0]
  logp = z - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True)) - z.max(
      -1, keepdims=True)
  top = np.argsort(-logp[want_pos], axis=-1)[:, :8]
  np.testing.assert_allclose(rec.logp, np.take_along_axis(logp[want_pos], top, -1), rtol=2e-3,
                             atol=1e-3)
  # gather into a packed [B, T, k] batch: two trajectories in one row
  other = builder.as_data_source("train")[1]["id"].decode()
  n0 = len(ids)
  batch = S.gather(st, [[(ident, 0), (other, n0)], [(other, 0)]], length=n0 + 300)
  assert batch["ids_btk"].shape == (2, n0 + 300, 8)
  np.testing.assert_array_equal(np.flatnonzero(batch["mask_bt"][0][:n0]), want_pos)
  np.testing.assert_array_equal(batch["logp_btk"][0, want_pos], rec.logp)
  rec1 = st.get(other)
  np.testing.assert_array_equal(batch["ids_btk"][0, rec1.positions + n0], rec1.ids)
  np.testing.assert_array_equal(batch["ids_btk"][1, rec1.positions], rec1.ids)


def test_kill_and_rerun_is_byte_identical(dataset, teacher, tmp_path):
  run(dataset, teacher, tmp_path / "whole")
  # "killed" after 2 shards, and a half-written shard left behind
  m = run(dataset, teacher, tmp_path / "resumed", stop_after_shards=2)
  assert not (tmp_path / "resumed" / "manifest.json").exists() and len(m.shards) == 2
  (tmp_path / "resumed" / "train-00002.arrayrecord.tmp").write_bytes(b"partial")
  with pytest.raises(DataError, match="no manifest"):
    S.TeacherStore(tmp_path / "resumed")
  run(dataset, teacher, tmp_path / "resumed")
  assert digests(tmp_path / "resumed") == digests(tmp_path / "whole")
  # a shard whose marker disagrees with the file is recomputed, not trusted
  shard = tmp_path / "resumed" / "train-00000.arrayrecord"
  shard.write_bytes(shard.read_bytes()[:-5])
  os.remove(tmp_path / "resumed" / "manifest.json")
  run(dataset, teacher, tmp_path / "resumed")
  assert digests(tmp_path / "resumed") == digests(tmp_path / "whole")
  with pytest.raises(DataError, match="other settings"):
    run(dataset, teacher, tmp_path / "resumed", k=4)


@pytest.mark.parametrize("dtype, tol", [("float16", 2e-2), ("bfloat16", 0.1), ("int8", 0.15)])
def test_logp_encodings(dtype, tol):
  rng = np.random.default_rng(0)
  logp = np.sort(np.log(rng.dirichlet(np.ones(16), 5)), -1)[:, ::-1].astype(np.float32)
  rec = S.TopK("x", np.arange(5, dtype=np.int32), rng.integers(0, 70000, (5, 16)), logp)
  blob = S.encode_record(rec, vocab_size=70000, logp_dtype=dtype)
  back = S.decode_record(blob)
  np.testing.assert_array_equal(back.ids, rec.ids)  # uint32 for a vocabulary > 65,536
  np.testing.assert_allclose(back.logp, logp, atol=tol * np.abs(logp).max(), rtol=tol)
  small = S.encode_record(S.TopK("x", rec.positions, rec.ids % 1000, logp), vocab_size=1000,
                          logp_dtype=dtype)
  assert len(small) < len(blob)  # uint16 ids
  with pytest.raises(DataError, match="truncated or corrupt"):
    S.decode_record(blob[:-7])


def test_corruption_and_mismatch_are_caught(dataset, teacher, tmp_path):
  run(dataset, teacher, tmp_path / "st")
  bad = tmp_path / "flip"
  shutil.copytree(tmp_path / "st", bad)
  shard = bad / "train-00001.arrayrecord"
  data = bytearray(shard.read_bytes())
  data[len(data) // 2] ^= 0xFF
  shard.write_bytes(bytes(data))
  with pytest.raises(DataError, match="checksum mismatch") as e:
    V.verify(str(bad), dataset)
  assert e.value.path.endswith("train-00001.arrayrecord")
  wrong = tmp_path / "fp"
  shutil.copytree(tmp_path / "st", wrong)
  man = json.loads((wrong / "manifest.json").read_text())
  man["dataset_fingerprint"] = "0" * 64
  (wrong / "manifest.json").write_text(json.dumps(man))
  with pytest.raises(DataError, match="dataset fingerprint"):
    V.verify(str(wrong), dataset)
  man["dataset_fingerprint"], man["k"] = json.loads(
      (tmp_path / "st" / "manifest.json").read_text())["dataset_fingerprint"], 4
  (wrong / "manifest.json").write_text(json.dumps(man))
  with pytest.raises(DataError, match="k is 8, manifest says 4"):
    V.verify(str(wrong), dataset)


def test_import_server_prompt_logprobs(dataset, teacher, tmp_path):
  """A vLLM-style prompt_logprobs file (made here from the teacher itself) imports to
  the same records as precompute."""
  cfg, params = teacher
  run(dataset, teacher, tmp_path / "ref")
  builder, _, _ = prepare.load_prepared(dataset)
  lines = []
  for split in builder.info.splits:
    for ex in builder.as_data_source(split):
      ids = np.asarray(ex["ids"])
      # padded at the end to a length bucket (causal: the real positions are unchanged),
      # so the teacher compiles once per bucket, not once per example length
      padded = np.pad(ids, (0, length_bucket(len(ids)) - len(ids)))[None]
      top_ids, top_lp = pc.teacher_topk(params, jnp.asarray(padded), cfg=cfg, k=10,
                                        temperature=1.0)
      entries = [None] + [{str(int(i)): {"logprob": float(v), "rank": r + 1}
                           for r, (i, v) in enumerate(zip(top_ids[0, t], top_lp[0, t]))}
                          for t in range(len(ids) - 1)]
      lines.append({"id": ex["id"].decode(), "prompt_token_ids": ids.tolist(),
                    "prompt_logprobs": entries})
  src = helpers.write_jsonl(str(tmp_path / "lp.jsonl"), lines)
  from sad_jax import cli

  # through the command, as a user runs it
  assert cli.main(["teacher", "import", src, "--dataset", dataset, "--out",
                   str(tmp_path / "imp"), "--k", "8", "--teacher-name", "server",
                   "--teacher-vocab-size", str(cfg.vocab_size + 128)]) == 0
  report = V.verify(str(tmp_path / "imp"), dataset)
  assert report["examples"] == 40
  a, b = S.TeacherStore(tmp_path / "imp"), S.TeacherStore(tmp_path / "ref")
  for ident in b.ids():
    ra, rb = a.get(ident), b.get(ident)
    np.testing.assert_array_equal(ra.positions, rb.positions)
    # the teacher's logits are O(100) here (scaled weights): f32 sums in another order
    # differ by ~1e-4 of that, then float16 rounding
    scale = np.abs(ra.logp).max() if ra.logp.size else 1.0
    np.testing.assert_allclose(ra.logp, rb.logp, rtol=3e-3, atol=2e-4 * scale + 1e-3)
  # a server that tokenized differently is refused, naming the record and position
  lines[1]["prompt_token_ids"][3] += 1
  helpers.write_jsonl(src, lines)
  with pytest.raises(DataError, match="differ from the dataset's at position 3") as e:
    V.import_prompt_logprobs(src, dataset_dir=dataset, out_dir=str(tmp_path / "imp2"), k=8,
                             teacher_name="server", teacher_vocab_size=cfg.vocab_size)
  assert e.value.record == 2


def test_cli_precompute_and_verify(dataset, teacher, tmp_path, capsys):
  from sad_jax import cli
  from sad_jax.models import checkpoint_io

  checkpoint_io.save_params(tmp_path / "teacher", *teacher)
  out = tmp_path / "store"
  assert cli.main(["teacher", "precompute", "--quiet", f"--config.dataset={dataset}",
                   f"--config.teacher={tmp_path / 'teacher'}", f"--config.out={out}",
                   "--config.k=8", "--config.shard_size=16"]) == 0
  builder, _, _ = prepare.load_prepared(dataset)
  shards = sum(-(-builder.info.splits[s].num_examples // 16) for s in builder.info.splits)
  assert f"40 trajectories in {shards} shards" in capsys.readouterr().out
  assert cli.main(["teacher", "verify", str(out), dataset, "--teacher",
                   str(tmp_path / "teacher")]) == 0
  text = capsys.readouterr().out
  assert "ok: 40 examples" in text and "spot recompute of 3 examples: max abs error" in text
  (out / "train-00000.arrayrecord").write_bytes(b"garbage")
  assert cli.main(["teacher", "verify", str(out), dataset]) == 2
  err = capsys.readouterr().err
  assert "train-00000.arrayrecord" in err and "checksum mismatch" in err
  assert cli.main(["teacher", "precompute", "--quiet", f"--config.dataset={dataset}"]) == 2
  assert "config.teacher" in capsys.readouterr().err


def test_grain_join_streams_records(dataset, teacher, tmp_path):
  import grain

  run(dataset, teacher, tmp_path / "st")
  builder, _, _ = prepare.load_prepared(dataset)
  ds = grain.MapDataset.source(builder.as_data_source("train")).map(
      S.JoinTeacher(tmp_path / "st"))
  st = S.TeacherStore(tmp_path / "st")
  n = 0
  for ex in ds.to_iter_dataset():
    rec = st.get(ex["id"].decode())
    np.testing.assert_array_equal(ex["teacher_positions"], rec.positions)
    np.testing.assert_array_equal(ex["teacher_ids"], rec.ids)
    n += 1
  assert n == builder.info.splits["train"].num_examples


def test_two_hosts_split_the_shards(dataset, teacher, tmp_path):
  run(dataset, teacher, tmp_path / "one")
  first = run(dataset, teacher, tmp_path / "two", process_index=0, process_count=2)
  assert not (tmp_path / "two" / "manifest.json").exists()  # host 1 still has shards to do
  assert len(first.shards) == len({m["name"] for m in first.shards})
  run(dataset, teacher, tmp_path / "two", process_index=1, process_count=2)
  assert digests(tmp_path / "two") == digests(tmp_path / "one")
  # a store that one of two hosts left half done is completed by a one-process rerun
  run(dataset, teacher, tmp_path / "half", process_index=1, process_count=2)
  assert not (tmp_path / "half" / "manifest.json").exists()
  run(dataset, teacher, tmp_path / "half")
  assert digests(tmp_path / "half") == digests(tmp_path / "one")


@pytest.mark.slow
@pytest.mark.early
def test_two_processes_under_jax_distributed_equal_one(dataset, teacher, tmp_path, capsys):
  """Two real processes (jax.distributed on a loopback port, 4 CPU devices and a (2,1,2)
  mesh each) write a store byte-identical to one process on the same mesh, each
  computing only its own shards (7 shards: a count that 2 does not divide), and
  `teacher verify` accepts it."""
  import subprocess
  import sys

  from sad_jax import cli
  from sad_jax.models import checkpoint_io
  from tests.train.test_multihost import free_port

  checkpoint_io.save_params(tmp_path / "teacher", *teacher)
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
         "JAX_PLATFORMS": "cpu"}
  cmd = [sys.executable, "-m", "sad_jax.cli", "teacher", "precompute", "--quiet",
         f"--config.dataset={dataset}", f"--config.teacher={tmp_path / 'teacher'}",
         "--config.k=8", "--config.shard_size=6", "--config.batch_size=4",
         "--config.mesh=(2,1,2)"]
  port = free_port()
  runs = {"one": [f"--config.out={tmp_path / 'one'}"]}
  for i in range(2):
    runs[f"two/{i}"] = [f"--config.out={tmp_path / 'two'}", "--coordinator",
                        f"localhost:{port}", "--num-processes", "2", "--process-id", str(i)]
  procs = {name: subprocess.Popen([*cmd, *extra], cwd=root, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True)
           for name, extra in runs.items()}
  outs = {name: p.communicate(timeout=400)[0] for name, p in procs.items()}
  for name, p in procs.items():
    assert p.returncode == 0, (name, outs[name][-3000:])

  # the same files with the same bytes (manifest and settings included)
  files = lambda d: {n: (d / n).read_bytes() for n in sorted(os.listdir(d))}
  one, two = files(tmp_path / "one"), files(tmp_path / "two")
  builder, _, _ = prepare.load_prepared(dataset)
  shards = [S.shard_name(sp, i) for sp in builder.info.splits
            for i in range(-(-builder.info.splits[sp].num_examples // 6))]
  assert len(shards) == 7 and set(shards) < set(one)
  assert two.keys() == one.keys() and two == one
  # process i computed shards i, i+2, …, and only those
  for i in range(2):
    mine = shards[i::2]
    line = f"process {i} of 2: computed {len(mine)} of its {len(mine)} shards ({', '.join(mine)})"
    assert line in outs[f"two/{i}"], outs[f"two/{i}"][-2000:]
  assert "store " in outs["two/0"] and "40 trajectories in 7 shards" in outs["two/1"]
  capsys.readouterr()
  assert cli.main(["teacher", "verify", str(tmp_path / "two"), dataset, "--teacher",
                   str(tmp_path / "teacher")]) == 0
  assert "ok: 40 examples" in capsys.readouterr().out


@pytest.mark.parametrize("extra, message", [
    (["--coordinator", "localhost:1", "--num-processes", "2", "--process-id", "2"],
     "process_id 2 is not below num_processes 2"),
    (["--coordinator", "localhost:1", "--num-processes", "0", "--process-id", "0"],
     "needs num_processes and process_id"),
    (["--coordinator", "localhost:1", "--num-processes", "2"],
     "needs num_processes and process_id"),
    (["--config.mesh=(3,1,1)"], "needs 3 devices, there are 8 (the mesh is per process: "
     "process 0 of 1 has 8 devices)"),
    (["--config.mesh=(-1,3,1)"], "does not divide 8 devices (the mesh is per process"),
])
def test_precompute_bad_process_or_mesh_is_a_clear_error(dataset, tmp_path, capsys, extra,
                                                         message):
  """Caught before jax.distributed starts (a bad id would wait for the coordinator) or a
  teacher is loaded; the teacher folder need not exist."""
  from sad_jax import cli

  args = ["teacher", "precompute", "--quiet", f"--config.dataset={dataset}",
          f"--config.teacher={tmp_path / 'absent'}", f"--config.out={tmp_path / 'st'}", *extra]
  assert cli.main(args) == 2
  assert message in capsys.readouterr().err
  assert not (tmp_path / "st").exists()


def test_precompute_process_index_out_of_range(dataset, teacher, tmp_path):
  with pytest.raises(DataError, match=r"process_index 2 is not in \[0, 2\)"):
    run(dataset, teacher, tmp_path / "st", process_index=2, process_count=2)


KILL_SCRIPT = """
import os, sys, jax
sys.path.insert(0, {root!r})
from sad_jax.models import checkpoint_io
from sad_jax.teacher import precompute
cfg, params = checkpoint_io.load_model({teacher!r})
precompute.precompute(dataset_dir={dataset!r}, cfg=cfg, params=params, teacher_name="tiny",
                      out_dir={out!r}, k=8, shard_size=4, batch_size=4, progress=False)
"""


def test_sigkill_mid_precompute_then_rerun_is_byte_identical(dataset, teacher, tmp_path):
  """A real kill -9 of a precompute process after its first shards, then a rerun."""
  import signal
  import subprocess
  import sys
  import time

  from sad_jax.models import checkpoint_io

  checkpoint_io.save_params(tmp_path / "teacher", *teacher)
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  script = KILL_SCRIPT.format(root=root, teacher=str(tmp_path / "teacher"), dataset=dataset,
                              out=str(tmp_path / "killed"))
  proc = subprocess.Popen([sys.executable, "-c", script])
  deadline = time.time() + 240
  while time.time() < deadline and proc.poll() is None:
    if len(list((tmp_path / "killed").glob("*.done.json"))) >= 2:
      break
    time.sleep(0.05)
  assert proc.poll() is None, "precompute finished before it could be killed"
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()
  done = len(list((tmp_path / "killed").glob("*.done.json")))
  assert not (tmp_path / "killed" / "manifest.json").exists() and done >= 2
  print(f"killed after {done} complete shards")
  cfg, params = checkpoint_io.load_model(tmp_path / "teacher")
  kw = dict(k=8, shard_size=4, batch_size=4, progress=False)
  pc.precompute(dataset_dir=dataset, cfg=cfg, params=params, teacher_name="tiny",
                out_dir=str(tmp_path / "killed"), **kw)
  pc.precompute(dataset_dir=dataset, cfg=cfg, params=params, teacher_name="tiny",
                out_dir=str(tmp_path / "clean"), **kw)
  assert digests(tmp_path / "killed") == digests(tmp_path / "clean")
  assert not list((tmp_path / "killed").glob("*.tmp"))


@pytest.mark.fireact
def test_fireact_precompute_verify_read(tmp_path):
  """End to end on the prepared FireAct data with a small teacher."""
  from sad_jax.configs import prepare_fireact

  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  cfgp = prepare_fireact.get_config()
  cfgp.inputs = tuple(os.path.join(root, p) for p in cfgp.inputs)
  ds = str(tmp_path / "ds")
  prepare.prepare(cfgp, ds, progress=False)
  _, tok, _ = prepare.load_prepared(ds)
  cfg = ModelConfig(model_type="qwen2", vocab_size=tok.vocab_size, hidden_size=32,
                    intermediate_size=64, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=8,
                    qkv_bias=True, tie_embeddings=True)
  params = T.init_params(cfg, jax.random.PRNGKey(3))
  m = pc.precompute(dataset_dir=ds, cfg=cfg, params=params, teacher_name="tiny", out_dir=str(
      tmp_path / "st"), k=16, span_kinds=("reason", "action"), progress=False, batch_size=16)
  report = V.verify(str(tmp_path / "st"), ds, cfg=cfg, params=params)
  assert report["examples"] == 500 and m.span_kinds == ["reason", "action"]
  st = S.TeacherStore(tmp_path / "st")
  batch = S.gather(st, [[(i, 0)] for i in st.ids()[:4]], length=1024)
  assert batch["mask_bt"].sum() == sum(len(st.get(i).positions) for i in st.ids()[:4])


def test_precompute_on_a_mesh_equals_one_device(dataset, teacher, tmp_path):
  """The teacher runs sharded (data, fsdp, tensor) = (2, 2, 2); the store is the same."""
  from sad_jax.common import sharding

  run(dataset, teacher, tmp_path / "one", batch_size=8)
  run(dataset, teacher, tmp_path / "mesh", batch_size=8, mesh=sharding.make_mesh((2, 2, 2)))
  a, b = S.TeacherStore(tmp_path / "one"), S.TeacherStore(tmp_path / "mesh")
  assert sorted(a.ids()) == sorted(b.ids())
  for ident in a.ids():
    ra, rb = a.get(ident), b.get(ident)
    np.testing.assert_array_equal(ra.positions, rb.positions)
    # the teacher's logits are O(100) here (scaled weights): f32 sums in another order
    # differ by ~1e-4 of that, then float16 rounding
    scale = np.abs(ra.logp).max() if ra.logp.size else 1.0
    tol = 2e-4 * scale + 1e-3
    np.testing.assert_allclose(ra.logp, rb.logp, rtol=3e-3, atol=tol)
    assert_same_topk_ids(ra, rb, tol=tol + 3e-3 * scale)


def assert_same_topk_ids(ra, rb, *, tol):
  """The same top-k ids in the same order, except where two log-probs within `tol` of
  each other (a near-tie under another summation order) trade places or the k-th place."""
  for n, j in np.argwhere(ra.ids != rb.ids):
    row_a, row_b = ra.ids[n], rb.ids[n]
    tied = np.abs(ra.logp[n] - ra.logp[n, j]) <= tol  # the places a tie may move it to
    ok = (ra.ids[n, j] in row_b[tied] or
          (ra.ids[n, j] not in row_b and abs(ra.logp[n, j] - ra.logp[n, -1]) <= tol))
    assert ok and set(row_a[~tied]) <= set(row_b), (
        f"{ra.id} position {ra.positions[n]}: top-k ids {row_a} vs {row_b}")
