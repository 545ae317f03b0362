"""`sad-jax plan` (sad_jax/trainer/plan.py): the per-device memory estimate against XLA's compiled
memory analysis of the same train step, and the pod config's plan."""

import math
import os
import re

import jax
import pytest

from sad_jax.common import configlib
from sad_jax.trainer import plan, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--config.model.hf_config.hidden_size=64", "--config.model.hf_config.intermediate_size=192",
         "--config.model.hf_config.num_attention_heads=4",
         "--config.model.hf_config.num_key_value_heads=2",
         "--config.model.hf_config.num_hidden_layers=2", "--config.model.hf_config.vocab_size=4096",
         "--config.data.seq_len=256", "--config.data.batch_size=8", "--config.teacher.k=16",
         "--config.objective.chunk_size=128", "--config.mesh.shape=(2,2,2)"]


@pytest.mark.slow
def test_plan_matches_the_compiled_step_on_a_mesh():
  """The pod's policy (block remat, scanned layers) at a small size on a (2,2,2) mesh of
  CPU devices: parameters + optimizer state + batch are the compiled step's argument
  bytes exactly (but for the loss weights); the total (with gradients and activations estimated) is within
  0.75–1.5× XLA's arguments + temporaries (measured here: 1.42× at this size; 1.13–1.29×
  at d_model 128, 4 layers, seq 512; remat none 0.81–0.95×)."""
  config = configlib.load(f"{REPO}/sad_jax/configs/train_sad.py",
                          [*SMALL, "--config.model.remat=block",
                           "--config.model.scan_layers=true"])
  p = plan.plan(config, devices=8)
  mem = train.lower_abstract(config, devices=8, platform="cpu").compile(
      device_assignment=tuple(jax.devices())).memory_analysis()
  assert mem.argument_size_in_bytes - p.state == 2 * 4  # + the stage's 2 loss weights
  compiled = mem.argument_size_in_bytes + mem.temp_size_in_bytes
  assert 0.75 <= p.total / compiled <= 1.5, (p.table(), compiled)


DTYPE_BYTES = {"f32": 4, "i32": 4, "ui32": 4, "bf16": 2, "f16": 2, "i8": 1, "ui8": 1, "i1": 1,
               "i64": 8, "ui64": 8, "f64": 8}


def lowered_argument_bytes(text: str, mesh: dict[str, int]) -> int:
  """Per-device bytes of a lowered step's arguments, read from its StableHLO text: each
  argument's global shape and sdy dimension shardings (a dimension split over axes holds
  ceil(size / their product) per device)."""
  main = text[text.index("func.func public @main("):]
  main = main[:main.index(") -> (")]
  args = re.findall(r"%arg\d+: tensor<([^>]*)> \{sdy\.sharding = #sdy\.sharding<@mesh, "
                    r"\[(.*?)\]>", main)
  assert len(args) == main.count("%arg") and args
  total = 0
  for shape, spec in args:
    *dims, dtype = shape.split("x")
    dim_axes = re.findall(r"\{([^}]*)\}", spec)
    assert len(dim_axes) == len(dims), (shape, spec)
    per_device = math.prod(
        math.ceil(int(d) / math.prod(mesh[a.strip(' "')] for a in axes.split(",") if a.strip()))
        for d, axes in zip(dims, dim_axes, strict=True))
    total += per_device * DTYPE_BYTES[dtype]
  return total


def test_pod_plan_fits_a_chip():
  """The pod config on 256 chips: 0.5B parameters over fsdp 16 × tensor 2 (about 1/32 of
  them per chip, float32), AdamW's two moments, and well under a v5p chip's 95 GiB. Its
  resident part is the train step lowered on the 256-device AbstractMesh's argument bytes,
  read from the StableHLO shardings (not from the NamedShardings the plan sums)."""
  config = configlib.load(f"{REPO}/sad_jax/configs/pod_qwen7b_to_qwen0p5b.py")
  p = plan.plan(config, devices=256)
  lowered = train.lower_abstract(config, devices=256, platform="tpu")
  assert lowered_argument_bytes(lowered.as_text(), p.mesh) == p.state
  assert p.mesh == {"data": 8, "fsdp": 16, "tensor": 2}
  n_params = 494_032_768  # Qwen2.5-0.5B, tied embeddings
  assert abs(p.params - 4 * n_params / 32) / p.params < 0.02
  assert p.optimizer == pytest.approx(2 * p.params, rel=0.01)
  assert p.teacher_batch == 2 * 1 * 4097 * 64 * (4 + 4) + 2 * 1 * 4097  # A × rows × T × k
  assert p.total < 8 * 2**30
  assert "total" in p.table()


def test_pod_plan_with_lora_against_full_fine_tuning():
  """The pod config with LoRA r 64 / α 128 on a bfloat16 base: the frozen base is half the
  float32 parameters, adapters and their moments a few percent of them; the resident bytes
  are the lowered step's argument bytes (the base is an argument), as for full fine-tuning."""
  lora = ["--config.model.lora.rank=64", "--config.model.lora.alpha=128",
          "--config.model.lora.base_dtype=bfloat16"]
  full = plan.plan(configlib.load(f"{REPO}/sad_jax/configs/pod_qwen7b_to_qwen0p5b.py"),
                   devices=256)
  config = configlib.load(f"{REPO}/sad_jax/configs/pod_qwen7b_to_qwen0p5b.py", lora)
  p = plan.plan(config, devices=256)
  lowered = train.lower_abstract(config, devices=256, platform="tpu")
  assert lowered_argument_bytes(lowered.as_text(), p.mesh) == p.state
  # the norms stay float32; every weight matrix is bfloat16
  assert p.frozen == pytest.approx(full.params / 2, rel=0.01)
  # 24 layers × r · (fan-in + fan-out) summed over q, k, v, o, gate, up, down
  d, f, kv = 896, 4864, 128
  n_adapters = 24 * 64 * ((d + d) + 2 * (d + kv) + (d + d) + 2 * (d + f) + (f + d))
  # each adapter over fsdp 16, and B of q/k/v/gate/up (and A of o/down) over tensor 2 too
  assert 4 * n_adapters / 32 < p.params < 4 * n_adapters / 16
  assert p.optimizer == pytest.approx(2 * p.params, rel=0.05)
  assert p.state < full.state / 3 and p.total < full.total
  assert "frozen base (LoRA)" in p.table()
