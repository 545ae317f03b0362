"""A small prepared dataset with a teacher store, shared by the trainer tests."""

import os

import jax
import pytest

from sad_jax.common import configlib
from sad_jax.data import prepare, schema
from sad_jax.models import checkpoint_io
from sad_jax.models import transformer as T
from sad_jax.models.config import ModelConfig
from sad_jax.teacher import precompute as pc
from tests import helpers
from tests.data.test_prepare import make_config

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# A student small enough that a step compiles and runs in a second on 2 cores.
TINY = ["--config.model.hf_config.hidden_size=32", "--config.model.hf_config.intermediate_size=64",
        "--config.model.hf_config.num_attention_heads=4",
        "--config.model.hf_config.num_key_value_heads=2", "--config.data.seq_len=128",
        "--config.objective.chunk_size=64", "--config.metrics.mfu=false"]


@pytest.fixture(scope="session")
def train_data(tmp_path_factory, spm_path):
  """(dataset, store, teacher folder): 60 synthetic trajectories, a random peaked teacher."""
  root = tmp_path_factory.mktemp("train")
  schema.write_jsonl(root / "t.jsonl", helpers.synthetic_trajectories(60, seed=11))
  ds = str(root / "ds")
  prepare.prepare(make_config([str(root / "t.jsonl")], tokenizer__path=spm_path, max_len=256,
                              val_fraction=0.2), ds, progress=False)
  _, tok, _ = prepare.load_prepared(ds)
  cfg = ModelConfig(model_type="llama", vocab_size=tok.vocab_size, hidden_size=32,
                    intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8)
  params = jax.tree.map(lambda a: a * 10, T.init_params(cfg, jax.random.PRNGKey(0)))
  teacher = str(root / "teacher")
  checkpoint_io.save_params(teacher, cfg, params)
  store = str(root / "store")
  pc.precompute(dataset_dir=ds, cfg=cfg, params=params, teacher_name="tiny", out_dir=store,
                k=16, span_kinds=("reason", "action"), progress=False)
  return ds, store, teacher


def train_config(train_data, objective: str = "sad", extra=()):
  ds, store, _ = train_data
  overrides = [f"--config.dataset={ds}",
               f"--config.teacher_store={store if objective != 'sft' else ''}", *TINY, *extra]
  return configlib.load(os.path.join(REPO, "sad_jax", "configs", f"train_{objective}.py:runlocal"),
                        overrides), overrides
