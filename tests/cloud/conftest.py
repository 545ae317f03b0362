"""A real GCS emulator (the gcp-storage-emulator package) on a free loopback port, started
once per session, with every client pointed at it through its own documented setting:

  gcsfs / google-cloud-storage   STORAGE_EMULATOR_HOST
  tensorstore (orbax arrays)     TENSORSTORE_GCS_HTTP_URL, and GOOGLE_AUTH_TOKEN_FOR_TESTING
                                 (a fixed bearer token: the emulator checks none, and without
                                 it tensorstore looks for real credentials)
  ArrayRecord (google-cloud-cpp) CLOUD_STORAGE_EMULATOR_ENDPOINT (anonymous credentials)

The emulator runs as gcs_emulator.py: gcp-storage-emulator's own server, with GCS's object
generations and generation preconditions added (orbax's tensorstore needs them). The
variables are set in os.environ, so the CLI subprocesses the tests start inherit them.
"""

import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

BUCKET = "sad-jax-test"


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="session")
def gcs(tmp_path_factory):
  """The emulator's bucket URL prefix, `gs://BUCKET` (a fresh in-memory store)."""
  import importlib.util

  for module, package in (("gcp_storage_emulator", "gcp-storage-emulator"), ("gcsfs", "gcsfs")):
    if importlib.util.find_spec(module) is None:  # not imported: gcsfs reads env at import
      pytest.skip(f"pip install {package}")
  port = _free_port()
  log = open(tmp_path_factory.mktemp("gcs") / "emulator.log", "wb")
  # a process of its own: a single-threaded HTTP server must not share the GIL with JAX
  # (gcs_emulator.py: the package's server with GCS's generation semantics added)
  proc = subprocess.Popen(
      [sys.executable, os.path.join(os.path.dirname(__file__), "gcs_emulator.py"), str(port),
       BUCKET], stdout=log, stderr=subprocess.STDOUT)
  url = f"http://127.0.0.1:{port}"
  deadline = time.monotonic() + 30
  while True:
    try:
      urllib.request.urlopen(url, timeout=1).read()
      break
    except OSError:
      if proc.poll() is not None or time.monotonic() > deadline:
        proc.kill()
        pytest.fail(f"the GCS emulator did not start (see {log.name})")
      time.sleep(0.05)
  env = {"STORAGE_EMULATOR_HOST": url, "CLOUD_STORAGE_EMULATOR_ENDPOINT": url,
         "TENSORSTORE_GCS_HTTP_URL": url, "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
         # the emulator has no storage-control API (gcsfs probes it per bucket otherwise)
         "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
         "NO_GCE_CHECK": "True",  # google-auth: no metadata-server probe for credentials
         "SAD_JAX_CACHE": str(tmp_path_factory.mktemp("staged"))}
  saved = {k: os.environ.get(k) for k in env}
  os.environ.update(env)
  try:
    yield f"gs://{BUCKET}"
  finally:
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
    proc.terminate()
    try:
      proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
      proc.kill()
    log.close()
