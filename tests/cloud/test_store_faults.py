"""Reads from gs:// as a user sets them up, and the store's faults as errors (issue 41,
points 2 and 4): the GCS emulator (conftest.py) behind a loopback proxy that answers
chosen requests with 403/404/503, a body cut short, or nothing (fault_proxy.py, a test-only
stand-in for a failing network). Every command here is a real `sad-jax` subprocess that is
given only STORAGE_EMULATOR_HOST, as a user would set it."""

import os
import subprocess
import sys
import time

import numpy as np
import pytest

from sad_jax.common import cloud, fileio
from sad_jax.data import inspect as inspect_lib
from sad_jax.data import prepare, schema
from sad_jax.trainer import pipeline
from tests import helpers
from tests.cloud.fault_proxy import FaultProxy

SHARD = r"trajectory_dataset-train\.array_record"
# long enough that a loaded CI machine's slow answer is not taken for a stall, short enough
# for the stall tests
IO_TIMEOUT = 3


@pytest.fixture(scope="module")
def dataset(gcs, spm_path, tmp_path_factory):
  """(local folder, the same dataset on gs://): 12 synthetic trajectories."""
  from tests.data.test_prepare import make_config

  local_dir = tmp_path_factory.mktemp("faults")
  src = str(local_dir / "t.jsonl")
  schema.write_jsonl(src, helpers.synthetic_trajectories(12, seed=5))
  config = make_config([src], tokenizer__path=spm_path, max_len=256, val_fraction=0.2)
  local = str(local_dir / "ds")
  prepare.prepare(config, local, progress=False)
  remote = f"{gcs}/faults-{time.monotonic_ns()}/ds"
  with fileio.atomic_dir(remote) as tmp:
    for name in os.listdir(local):
      if name != fileio.COMPLETE_MARKER:
        fileio.copyfile(os.path.join(local, name), os.path.join(tmp, name))
  return local, remote


@pytest.fixture
def proxy():
  with FaultProxy(os.environ["STORAGE_EMULATOR_HOST"]) as p:
    yield p


def _user_env(host: str, tmp_path, **extra) -> dict:
  """The environment a user has: one endpoint setting (no per-client ones), a fresh
  staging cache, and short I/O timeouts."""
  env = {k: v for k, v in os.environ.items() if k not in cloud.CLIENT_VARS}
  env.update(STORAGE_EMULATOR_HOST=host, SAD_JAX_CACHE=str(tmp_path / f"cache{time.time_ns()}"),
             SAD_JAX_IO_TIMEOUT=str(IO_TIMEOUT), **extra)
  return env


def _inspect(path: str, env: dict) -> subprocess.CompletedProcess:
  # the timeout guards the suite against a hang (the bug this file tests), not a speed
  return subprocess.run([sys.executable, "-m", "sad_jax.cli", "inspect", path, "--index", "3"],
                        env=env, capture_output=True, text=True, timeout=240)


def _body(text: str) -> str:
  return text.split("\n", 1)[1]  # all but the header line, which names the path


def test_inspect_on_gs_with_only_the_users_endpoint_setting(dataset, tmp_path):
  """Only STORAGE_EMULATOR_HOST set: ArrayRecord's reader used to go to the real GCS and
  retry for minutes; now every client takes that endpoint, and the answer is the local one."""
  local, remote = dataset
  r = _inspect(remote, _user_env(os.environ["STORAGE_EMULATOR_HOST"], tmp_path))
  assert r.returncode == 0, r.stderr[-3000:]
  assert _body(r.stdout) == _body(inspect_lib.inspect(local, index=3)) + "\n"


def test_a_remote_split_reads_as_the_local_one(dataset):
  """The gs:// split (staged metadata, records read where they are, in chunks for the full
  pass) against tfds's own data source on the local folder: every record, in order."""
  local, remote = dataset
  a, b = pipeline.open_split(local, "train"), pipeline.open_split(remote, "train")
  assert b.ids == a.ids and len(a) > 3
  np.testing.assert_array_equal(b.lengths, a.lengths)
  for f in a.stats:
    np.testing.assert_array_equal(b.stats[f], a.stats[f])
  whole = list(b.source)
  for i in range(len(a)):
    for key in ("ids", "kinds"):
      np.testing.assert_array_equal(np.asarray(b.example(i)[key]),
                                    np.asarray(a.example(i)[key]))
      np.testing.assert_array_equal(np.asarray(whole[i][key]), np.asarray(a.example(i)[key]))


def test_configure_clients_gives_every_client_the_users_endpoint(monkeypatch):
  for var in cloud.CLIENT_VARS:
    monkeypatch.delenv(var, raising=False)
  monkeypatch.setenv("STORAGE_EMULATOR_HOST", "127.0.0.1:9")
  monkeypatch.setenv("TENSORSTORE_GCS_HTTP_URL", "http://elsewhere:1")  # its own: kept
  monkeypatch.setenv("SAD_JAX_IO_TIMEOUT", "2.5")
  import fsspec.config

  monkeypatch.setattr(fsspec.config, "conf", {"gcs": {"project": "mine"}})
  cloud.configure_clients()
  assert os.environ["CLOUD_STORAGE_EMULATOR_ENDPOINT"] == "http://127.0.0.1:9"
  assert os.environ["TENSORSTORE_GCS_HTTP_URL"] == "http://elsewhere:1"
  assert os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] == "false"
  # the request bounds: tensorstore's curl (whole seconds) and every gcsfs instance's
  assert os.environ["TENSORSTORE_CURL_CONNECT_TIMEOUT_SECONDS"] == "3"
  assert os.environ["TENSORSTORE_CURL_LOW_SPEED_TIME_SECONDS"] == "3"
  assert os.environ["TENSORSTORE_CURL_LOW_SPEED_LIMIT_BYTES"] == "1"
  for protocol in ("gs", "gcs"):
    timeout = fsspec.config.conf[protocol]["requests_timeout"]
    assert (timeout.sock_connect, timeout.sock_read, timeout.total) == (2.5, 2.5, None)
  assert fsspec.config.conf["gcs"]["project"] == "mine"  # the user's own kept


def test_bounded_names_the_operation_past_its_deadline(monkeypatch):
  monkeypatch.setenv("SAD_JAX_IO_TIMEOUT", "0.02")
  with pytest.raises(cloud.StoreError, match=r"gs://b/x: read record 3 failed: no result "
                                             r"within 0\.1 s") as e:
    cloud.bounded(lambda: time.sleep(5), op="read record 3", path="gs://b/x")
  assert (e.value.op, e.value.path) == ("read record 3", "gs://b/x")
  with pytest.raises(KeyError):  # an error of the call itself comes back as it is
    cloud.bounded(lambda: {}["k"], op="read", path="gs://b/x")
  assert cloud.bounded(lambda: 7, op="read", path="gs://b/x") == 7


@pytest.mark.parametrize("fault, match, op", [
    (403, r"dataset_info\.json", "check existence"),     # gcsfs: refused
    (404, SHARD, "open split 'train'"),                  # ArrayRecord's C++ reader: gone
    (403, SHARD, "open split 'train'"),
])
def test_a_refused_request_is_an_error_naming_path_and_operation(dataset, proxy, tmp_path,
                                                                 fault, match, op):
  _, remote = dataset
  proxy.add(fault, match, times=None)
  r = _inspect(remote, _user_env(proxy.url, tmp_path))
  assert r.returncode == 2, (r.stdout, r.stderr[-3000:])
  last = r.stderr.strip().splitlines()[-1]
  assert last.startswith("sad-jax: error: gs://") and f"{op} failed" in last, last
  name = "dataset_info.json" if "dataset_info" in match else \
      "trajectory_dataset-train.array_record-00000-of-00001"
  assert f"{remote}/{name}" in last and str(fault) in last, last
  assert "Traceback" not in r.stderr
  assert not any("retrying" in x and str(fault) in x for x in r.stderr.splitlines())


def test_transient_faults_are_retried_and_logged(dataset, proxy, tmp_path):
  """Two 503s, a body cut short and a stalled answer, each on a different read, then the
  store answers: the command succeeds with the local answer and says it retried."""
  local, remote = dataset
  proxy.add(503, r"tokenizer\.model.*alt=media", times=2)
  proxy.add("truncate", r"metadata\.json.*alt=media", times=1)
  proxy.add("stall", r"features\.json.*alt=media", times=1)
  r = _inspect(remote, _user_env(proxy.url, tmp_path))
  assert r.returncode == 0, r.stderr[-3000:]
  assert _body(r.stdout) == _body(inspect_lib.inspect(local, index=3)) + "\n"
  retries = [x for x in r.stderr.splitlines() if "retrying after" in x]
  assert len(retries) >= 4, r.stderr[-3000:]  # ours; a slow answer elsewhere may add one
  assert all(x.startswith("sad-jax: object store: ") for x in retries)
  assert sum("503" in x for x in retries) == 2
  assert sum("payload is not completed" in x for x in retries) == 1
  for match in (r"tokenizer\.model.*alt=media", r"metadata\.json.*alt=media",
                r"features\.json.*alt=media"):
    assert proxy.requests(match, None) == 1  # the last try got through, once


@pytest.mark.slow
def test_a_store_that_keeps_failing_gives_up_after_bounded_retries(dataset, proxy, tmp_path):
  _, remote = dataset
  proxy.add(503, r"template\.json.*alt=media", times=None)
  r = _inspect(remote, _user_env(proxy.url, tmp_path))
  assert r.returncode == 2
  last = r.stderr.strip().splitlines()[-1]
  assert f"{remote}/template.json" in last and "503" in last, last
  assert proxy.requests(r"template\.json.*alt=media", 503) == 6  # gcsfs's six attempts
  assert sum("retrying after" in x and "503" in x for x in r.stderr.splitlines()) == 5


def test_a_stalled_record_read_times_out_naming_the_shard(dataset, proxy, tmp_path):
  """ArrayRecord's C++ client retries on its own for many minutes: its reads run under
  a deadline of DEADLINE_FACTOR × SAD_JAX_IO_TIMEOUT."""
  _, remote = dataset
  proxy.add("stall", SHARD, times=None)
  r = _inspect(remote, _user_env(proxy.url, tmp_path))
  assert r.returncode == 2, r.stderr[-3000:]
  last = r.stderr.strip().splitlines()[-1]
  assert last == (f"sad-jax: error: {remote}/trajectory_dataset-train.array_record-00000-of-"
                  f"00001: open split 'train' failed: no result within "
                  f"{cloud.DEADLINE_FACTOR * IO_TIMEOUT} s "
                  f"({cloud.DEADLINE_FACTOR} × SAD_JAX_IO_TIMEOUT): the store is "
                  "unreachable, stalled or failing (its client retries)"), last


def test_a_refused_check_is_not_taken_for_a_missing_folder(dataset, proxy, monkeypatch):
  """fsspec's isdir answers False on any error: a 403 would read as "no such dataset"."""
  _, remote = dataset
  monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy.url)
  monkeypatch.setenv("SAD_JAX_IO_TIMEOUT", "1")
  import gcsfs

  gcsfs.GCSFileSystem.clear_instance_cache()  # an instance keeps the endpoint it started on
  try:
    proxy.add(403, r"/ds$", times=None)
    proxy.add(403, r"prefix=.*ds/", times=None)
    with pytest.raises(cloud.StoreError, match="check for a folder failed") as e:
      fileio.isdir(remote)
    assert e.value.path == remote
  finally:
    gcsfs.GCSFileSystem.clear_instance_cache()


def test_a_refused_upload_names_the_object_and_leaves_no_complete_folder(gcs, proxy, spm_path,
                                                                         tmp_path):
  """`prepare --out gs://…` whose upload of one file is refused: exit 2 naming that object
  and the operation, and the folder never has its completion marker (readers refuse it)."""
  from sad_jax.common.errors import DataError
  from tests.train.conftest import REPO

  src = str(tmp_path / "t.jsonl")
  schema.write_jsonl(src, helpers.synthetic_trajectories(8, seed=2))
  out = f"{gcs}/refused-{time.monotonic_ns()}/ds"
  proxy.add(403, r"(?s)uploadType=multipart .*/ds/features\.json", method="POST", times=None)
  r = subprocess.run(
      [sys.executable, "-m", "sad_jax.cli", "prepare", "--config",
       os.path.join(REPO, "sad_jax", "configs", "prepare_base.py"), "--out", out,
       f"--config.inputs=('{src}',)", f"--config.tokenizer.path={spm_path}",
       "--config.max_len=256", "--config.val_fraction=0.2", "--quiet"],
      env=_user_env(proxy.url, tmp_path), capture_output=True, text=True, timeout=240)
  assert r.returncode == 2, (r.stdout, r.stderr[-3000:])
  last = r.stderr.strip().splitlines()[-1]
  assert last.startswith(f"sad-jax: error: {out}/features.json: upload failed: OSError: HTTP 403 "
                         "(permission denied)"), last
  assert proxy.requests("features", 403) >= 1
  with pytest.raises(DataError, match="incomplete prepared dataset"):
    fileio.require_complete(out, what="prepared dataset")


@pytest.mark.fireact
def test_the_cloud_reads_bench_reports_each_ratio(gcs, tmp_path):
  """bench/cloud_reads.py (BENCHMARKS.md) runs and reports a gs:// / local ratio for each
  of its reads (its own emulator; no figure is asserted)."""
  import json

  from tests.train.conftest import REPO

  out = tmp_path / "r.json"
  env = {k: v for k, v in os.environ.items() if k not in cloud.CLIENT_VARS}
  p = subprocess.run([sys.executable, "bench/cloud_reads.py", "--repeats", "1", "--json",
                      str(out)], cwd=REPO, env=env, capture_output=True, text=True,
                     timeout=600)
  assert p.returncode == 0, p.stdout + p.stderr[-3000:]
  r = json.loads(out.read_text())["results"]
  assert set(r) == {"inspect", "eval_reads", "first_batch"}
  for x in r.values():
    assert x["local_s"] > 0 and x["gs_s"] > 0 and x["ratio"] == x["gs_s"] / x["local_s"]
  assert "gs / local" in p.stdout



_RESTORE = """
import sys
import numpy as np
from sad_jax.models import checkpoint_io
tree = checkpoint_io.restore_params(sys.argv[1])
print(sum(float(np.asarray(v).sum()) for v in tree.values()))
"""
GCSFS_READ = r"^/download/.*_CHECKPOINT_METADATA\?alt=media"  # orbax's metadata (etils.epath)
TENSORSTORE_READ = r"params/d/.*alt=media.*tensorstore="           # the arrays (OCDBT)


def test_a_stalled_checkpoint_read_is_cut_and_retried(gcs, proxy, tmp_path):
  """orbax reads a checkpoint with two clients that by default wait on a stalled answer
  forever: gcsfs (through etils.epath, not fileio's instance) and tensorstore's curl. With
  SAD_JAX_IO_TIMEOUT both cut a request that sends nothing for that long and retry it."""
  import orbax.checkpoint as ocp

  folder = f"{gcs}/stall-{time.monotonic_ns()}/params"
  tree = {f"w{i}": np.full((4, 3), i + 1, np.float32) for i in range(3)}
  ck = ocp.StandardCheckpointer()
  ck.save(folder, tree)
  ck.wait_until_finished()
  proxy.add("stall", GCSFS_READ, method="GET", times=1)
  proxy.add("stall", TENSORSTORE_READ, method="GET", times=1)
  # a hang (the proxy holds a stall 600 s) fails at this timeout
  p = subprocess.run([sys.executable, "-c", _RESTORE, folder], env=_user_env(proxy.url, tmp_path),
                     capture_output=True, text=True, timeout=180)
  assert p.returncode == 0, p.stderr[-3000:]
  assert float(p.stdout) == sum(float(v.sum()) for v in tree.values())
  for read in (GCSFS_READ, TENSORSTORE_READ):  # each stalled once, then answered
    assert proxy.requests(read, "stall") == 1 and proxy.requests(read, None) >= 1, read
