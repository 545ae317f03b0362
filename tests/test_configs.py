"""Every config in sad_jax/configs/ builds (with each documented argument) and locks."""

import glob
import os

import pytest

from sad_jax.common import configlib
from sad_jax.common.errors import DataError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(p for p in glob.glob(os.path.join(REPO, "sad_jax", "configs", "*.py"))
                 if not p.endswith("__init__.py"))
ARGS = {"prepare_fireact.py": ["", "alpaca", "chat"],
        **{f"train_{o}.py": ["", "runlocal"] for o in ("sad", "token_kd", "sft")},
        "distill_smollm2.py": ["", "sad", "token_kd", "sft"]}
# Training configs and the device count their mesh is meant for (−1 resolves against it).
TRAIN = {"train_sad.py": 8, "train_token_kd.py": 8, "train_sft.py": 8,
         "train_base.py": 8, "distill_smollm2.py": 8, "pod_qwen7b_to_qwen0p5b.py": 256}


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_config_builds(path):
  for arg in ARGS.get(os.path.basename(path), [""]):
    config = configlib.load(f"{path}:{arg}" if arg else path)
    assert config.is_locked
    with pytest.raises(AttributeError):
      config.no_such_field = 1


def test_overrides_are_typed():
  config = configlib.load(os.path.join(REPO, "sad_jax", "configs", "prepare_base.py"),
                          ["--config.max_len=64", "--config.add_bos=false",
                           "--config.val_fraction=0", "--config.inputs=('a', 'b')",
                           "--config.tokenizer.vocab_size=100"])
  assert config.max_len == 64 and config.add_bos is False and config.val_fraction == 0.0
  assert config.inputs == ("a", "b") and config.tokenizer.vocab_size == 100


def test_every_training_config_is_listed():
  names = {os.path.basename(p) for p in CONFIGS}
  trainers = {n for n in names
              if "objective" in configlib.load(os.path.join(REPO, "sad_jax", "configs", n))}
  assert trainers == set(TRAIN)


@pytest.mark.parametrize("name", sorted(TRAIN))
def test_train_step_lowers_abstractly(name):
  """The train step of each training config lowers on an abstract mesh of its intended
  size (the pod example: 256 TPU chips), parameters and batch sharded by its rules."""
  from sad_jax.trainer import train

  config = configlib.load(os.path.join(REPO, "sad_jax", "configs", name))
  lowered = train.lower_abstract(config, devices=TRAIN[name],
                                 platform="tpu" if TRAIN[name] > 8 else "cpu", vocab=2000)
  text = lowered.as_text()
  assert "sdy.sharding" in text
  if name.startswith("pod"):
    # 256 partitions; the 152k×896 embedding over (tensor, fsdp); batch rows over data×fsdp
    assert "mhlo.num_partitions = 256" in text
    assert ('tensor<151936x896xf32> {sdy.sharding = #sdy.sharding<@mesh, [{"tensor"}, '
            '{"fsdp"}]>') in text
    assert 'tensor<2x128x4097xi32> {sdy.sharding = #sdy.sharding<@mesh, [{}, {"data", "fsdp"}, {}]>' in text
    # scanned layers: q of all 24 layers stacked, the layer axis whole, embed over fsdp and
    # the 14 heads (even over tensor 2) split
    assert ('tensor<24x896x14x64xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}, {"fsdp"}, '
            '{"tensor"}, {}]>') in text
    # model.attention=splash: the Mosaic kernels (forward, fused backward) lower for TPU,
    # per device under shard_map (run on TPU: not checked here)
    assert 'kernel_name = "splash_mha_fwd_segmented_residuals"' in text
    assert 'kernel_name = "splash_mha_dkv_segmented_no_residuals"' in text
    assert "sdy.manual_computation" in text


def test_a_packaged_config_by_name_from_any_folder(tmp_path, monkeypatch):
  """`--config` takes a path or a packaged name (`train_sad`, `train_sad.py`, or the docs'
  `configs/train_sad.py` where no such file is), from a folder outside the repository."""
  monkeypatch.chdir(tmp_path)
  want = configlib.load(os.path.join(REPO, "sad_jax", "configs", "train_sad.py") + ":runlocal")
  for spec in ("train_sad:runlocal", "train_sad.py:runlocal", "configs/train_sad.py:runlocal"):
    assert configlib.load(spec).to_dict() == want.to_dict(), spec
  # a file of the user's own wins over the packaged config of the same name
  (tmp_path / "configs").mkdir()
  (tmp_path / "configs" / "train_sad.py").write_text(
      "import ml_collections\n\ndef get_config(arg=None):\n"
      "  return ml_collections.ConfigDict({'mine': 1})\n")
  assert configlib.load("configs/train_sad.py").to_dict() == {"mine": 1}
  with pytest.raises(DataError, match=r"config file not found \(a path, or a packaged config: "
                                      r"distill_smollm2, .*train_sft"):
    configlib.load("configs/no_such.py")
  with pytest.raises(DataError, match="config file not found"):
    configlib.load("elsewhere/train_sad.py")  # only a configs/ folder or a bare name
