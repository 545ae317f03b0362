"""Training on a sampled teacher store: refused with a tail rule or divergence that would
misuse p̂ = count/N, trained (fkl, tail=ignore) otherwise."""

import numpy as np
import pytest

from sad_jax.common.errors import DataError
from sad_jax.models import checkpoint_io
from sad_jax.teacher import precompute as pc
from sad_jax.trainer import metrics as metrics_lib
from sad_jax.trainer import train
from tests.train.conftest import train_config


@pytest.fixture(scope="module")
def sampled_store(train_data, tmp_path_factory):
  ds, _, teacher = train_data
  cfg, params = checkpoint_io.load_model(teacher)
  out = str(tmp_path_factory.mktemp("sampled_train") / "store")
  pc.precompute(dataset_dir=ds, cfg=cfg, params=params, teacher_name="tiny", out_dir=out,
                k=16, sampling="sampled", span_kinds=("reason", "action"), progress=False)
  return out


def test_sampled_store_is_refused_with_a_tail_bucket_or_rkl(train_data, sampled_store, tmp_path):
  where = f"{sampled_store}/manifest.json"
  for extra, field, text in (
      ([], "config.objective.tail", "set --config.objective.tail=ignore (not 'tail_bucket')"),
      (["--config.objective.tail=ignore", "--config.objective.divergence=rkl"],
       "config.objective.divergence", "only fkl is unbiased on sampled teacher tokens"),
      (["--config.objective.tail=ignore", "--config.teacher.k=8"], "config.teacher.k",
       "set --config.teacher.k=16 (not 8)")):
    config, _ = train_config(train_data, extra=[f"--config.teacher_store={sampled_store}",
                                                *extra])
    with pytest.raises(DataError, match="the teacher store is sampled") as e:
      train.train_and_evaluate(config, str(tmp_path / "refused"))
    assert e.value.field == field and e.value.path == where and text in str(e.value)


def test_two_steps_on_a_sampled_store(train_data, sampled_store, tmp_path):
  config, _ = train_config(train_data, extra=[
      f"--config.teacher_store={sampled_store}", "--config.objective.tail=ignore",
      "--config.train.steps=2", "--config.train.eval_every=0", "--config.train.log_every=1",
      "--config.train.checkpoint_every=2"])
  result = train.train_and_evaluate(config, str(tmp_path))
  assert result.status == "finished" and result.step == 2
  rows = [r for r in metrics_lib.read_jsonl(str(tmp_path)) if r["split"] == "train"
          and "loss" in r]
  assert rows and all(np.isfinite(r["reason/loss"]) and r["reason/loss"] >= 0 for r in rows)
