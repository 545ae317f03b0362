"""Test set-up: 8 emulated CPU devices for every test, set once before JAX is imported."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One XLA compilation cache per test session, shared with the subprocesses the tests start
# (the kill/resume and multi-host tests compile the same train step several times).
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  import atexit
  import shutil
  import tempfile

  _cache = tempfile.mkdtemp(prefix="sad_jax_xla_cache_")
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import pathlib

import pytest

from tests import helpers

REPO = pathlib.Path(__file__).resolve().parent.parent
FIREACT = REPO.parent / "shared" / "data" / "fireact"


def pytest_collection_modifyitems(config, items):
  del config
  # A stable sort (every xdist worker collects the same order). Only the `early` tests move:
  # sorting every slow test first once put the SmolLM2 tests (~11 GB) beside other heavy
  # in-process tests, and a worker was OOM-killed.
  items.sort(key=lambda item: "early" not in item.keywords)
  if FIREACT.is_dir():
    return
  skip = pytest.mark.skip(reason=f"FireAct data not found at {FIREACT} (../shared is absent)")
  for item in items:
    if "fireact" in item.keywords:
      item.add_marker(skip)


@pytest.fixture(scope="session")
def fireact_dir() -> pathlib.Path:
  return FIREACT


@pytest.fixture(scope="session")
def spm_path(tmp_path_factory) -> str:
  """A sentencepiece model trained here on generated, multilingual trajectories."""
  from sad_jax.data import render
  from sad_jax.data.tokenizer import train_sentencepiece

  texts = [render.render_react(t).text for t in helpers.synthetic_trajectories(300, seed=0)]
  path = str(tmp_path_factory.mktemp("spm") / "tok.model")
  train_sentencepiece(texts, vocab_size=600, out_path=path)
  return path


@pytest.fixture(scope="session")
def spm_tok(spm_path):
  from sad_jax.data.tokenizer import load_tokenizer

  return load_tokenizer(spm_path)


@pytest.fixture(scope="session")
def hf_dir(tmp_path_factory) -> str:
  """A byte-level BPE tokenizer.json (+ tokenizer_config.json with a ChatML template)."""
  folder = tmp_path_factory.mktemp("hf_tok")
  helpers.train_hf_tokenizer(str(folder))
  return str(folder)


@pytest.fixture(scope="session")
def hf_tok(hf_dir):
  from sad_jax.data.tokenizer import load_tokenizer

  return load_tokenizer(hf_dir)
