"""Every config in configs/ builds (with each documented argument) and locks."""

import glob
import os

import pytest

from sad_jax import configlib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(p for p in glob.glob(os.path.join(REPO, "configs", "*.py"))
                 if not p.endswith("__init__.py"))
ARGS = {"prepare_fireact.py": ["", "alpaca", "chat"]}


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_config_builds(path):
  for arg in ARGS.get(os.path.basename(path), [""]):
    config = configlib.load(f"{path}:{arg}" if arg else path)
    assert config.is_locked
    with pytest.raises(AttributeError):
      config.no_such_field = 1


def test_overrides_are_typed():
  config = configlib.load(os.path.join(REPO, "configs", "prepare_base.py"),
                          ["--config.max_len=64", "--config.add_bos=false",
                           "--config.val_fraction=0", "--config.inputs=('a', 'b')",
                           "--config.tokenizer.vocab_size=100"])
  assert config.max_len == 64 and config.add_bos is False and config.val_fraction == 0.0
  assert config.inputs == ("a", "b") and config.tokenizer.vocab_size == 100
