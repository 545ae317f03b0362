"""GGUF import without the real model: dequantizers against blocks computed by hand, the
Q/K row order against llama.cpp's permutation written out by index, a tiny GGUF file read
back to the parameters it was written from, clear errors for what is not supported, and the
layer-subset student (issue 20)."""

import os

import jax
import numpy as np
import pytest

gguf_lib = pytest.importorskip("gguf", reason="the `hf` extra (gguf) is needed")

from sad_jax import cli  # noqa: E402
from sad_jax.common.errors import DataError  # noqa: E402
from sad_jax.models import checkpoint_io, gguf, hf  # noqa: E402
from sad_jax.models import transformer as T  # noqa: E402
from sad_jax.models.config import ModelConfig  # noqa: E402

Q = gguf_lib.GGMLQuantizationType


def f16_bytes(x: float) -> list[int]:
  return list(np.float16(x).tobytes())


def test_q8_0_block_by_hand():
  # one block: float16 scale d, then 32 int8 quants; x = d · q
  q = np.arange(-16, 16, dtype=np.int8)
  block = np.array(f16_bytes(0.25) + list(q.view(np.uint8)), np.uint8)[None]
  assert block.shape == (1, 34)
  want = [0.25 * v for v in range(-16, 16)]
  np.testing.assert_array_equal(gguf.dequantize(block, "Q8_0"), np.array([want], np.float32))


def test_q4_1_block_by_hand():
  # float16 scale d and minimum m, then 16 bytes: value j is the low nibble of byte j,
  # value 16 + j its high nibble; x = d · nibble + m
  d, m = 0.5, -1.5
  low, high = list(range(16)), [15 - j for j in range(16)]
  qs = [lo | (hi << 4) for lo, hi in zip(low, high)]
  block = np.array(f16_bytes(d) + f16_bytes(m) + qs, np.uint8)[None]
  assert block.shape == (1, 20)
  want = [d * n + m for n in low] + [d * n + m for n in high]
  np.testing.assert_array_equal(gguf.dequantize(block, "Q4_1"), np.array([want], np.float32))
  # two rows of two blocks each keep their row order
  rows = np.tile(block, (2, 2))
  assert gguf.dequantize(rows, "Q4_1").shape == (2, 64)


def test_q4_0_f16_bf16_by_hand():
  # Q4_0: float16 scale, nibbles as Q4_1, x = d · (nibble − 8)
  qs = [j | ((15 - j) << 4) for j in range(16)]
  block = np.array(f16_bytes(2.0) + qs, np.uint8)[None]
  want = [2.0 * (j - 8) for j in range(16)] + [2.0 * (15 - j - 8) for j in range(16)]
  np.testing.assert_array_equal(gguf.dequantize(block, "Q4_0"), np.array([want], np.float32))
  np.testing.assert_array_equal(gguf.dequantize(np.array([[1.5, -3.0]], np.float16), "F16"),
                                [[1.5, -3.0]])
  # bfloat16 is the top half of a float32: 1.5 = 0x3FC0, -2.0 = 0xC000 (little-endian bytes)
  np.testing.assert_array_equal(
      gguf.dequantize(np.array([[0xC0, 0x3F, 0x00, 0xC0]], np.uint8), "BF16"), [[1.5, -2.0]])
  with pytest.raises(DataError, match="unsupported tensor type Q5_K"):
    gguf.dequantize(np.zeros((1, 176), np.uint8), "Q5_K")


def llama_cpp_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
  """llama.cpp's Q/K row order, written out by index: within a head of size 2h, its rows
  2i and 2i+1 are HF's rows i and h + i."""
  hd = w.shape[0] // n_heads
  half = hd // 2
  out = np.empty_like(w)
  for head in range(n_heads):
    for i in range(half):
      out[head * hd + 2 * i] = w[head * hd + i]
      out[head * hd + 2 * i + 1] = w[head * hd + half + i]
  return out


def test_unpermute_inverts_llama_cpp_row_order():
  w = np.random.default_rng(0).normal(size=(3 * 8, 5))
  np.testing.assert_array_equal(gguf.unpermute(llama_cpp_rows(w, 3), 3), w)
  np.testing.assert_array_equal(gguf.permute(w, 3), llama_cpp_rows(w, 3))


TINY = ModelConfig(model_type="llama", vocab_size=300, hidden_size=32, intermediate_size=64,
                   num_layers=3, num_heads=4, num_kv_heads=2, head_dim=8, rms_norm_eps=1e-5,
                   rope_theta=10000.0, max_position_embeddings=256, tie_embeddings=True)


def write_tiny_gguf(path, cfg: ModelConfig, params, *, arch: str = "llama",
                    extra_tensor: tuple | None = None) -> dict:
  """A GGUF file as llama.cpp's converter writes a Llama: metadata, Q/K rows permuted, F32
  weights except the norms (layer 0's in F16, layer 1's in BF16, exactly representable)."""
  tensors = hf._to_hf(cfg, params)
  w = gguf_lib.GGUFWriter(str(path), arch)
  w.add_block_count(cfg.num_layers)
  w.add_context_length(cfg.max_position_embeddings)
  w.add_embedding_length(cfg.hidden_size)
  w.add_feed_forward_length(cfg.intermediate_size)
  w.add_head_count(cfg.num_heads)
  w.add_head_count_kv(cfg.num_kv_heads)
  w.add_rope_freq_base(cfg.rope_theta)
  w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
  w.add_rope_dimension_count(cfg.head_dim)
  w.add_vocab_size(cfg.vocab_size)
  names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
  layer = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
           "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
           "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
           "mlp.down_proj": "ffn_down"}
  stored = {}
  for name, a in tensors.items():
    if name in names:
      g = names[name]
    else:
      i, rest = name[len("model.layers."):].split(".", 1)
      g = f"blk.{i}.{layer[rest[:-len('.weight')]]}.weight"
    a = np.asarray(a, np.float32)
    if g.endswith("attn_q.weight"):
      a = llama_cpp_rows(a, cfg.num_heads)
    elif g.endswith("attn_k.weight"):
      a = llama_cpp_rows(a, cfg.num_kv_heads)
    if g == "blk.0.attn_norm.weight":
      w.add_tensor(g, a.astype(np.float16))
    elif g == "blk.1.attn_norm.weight":
      bits = (a.view(np.uint32) >> 16).astype(np.uint16)  # values are bfloat16-exact
      w.add_tensor(g, bits, raw_dtype=Q.BF16)
    else:
      w.add_tensor(g, a)
    stored[g] = a
  if extra_tensor is not None:
    name, data, qtype = extra_tensor
    w.add_tensor(name, data, raw_dtype=qtype)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return stored


def tiny_params(cfg: ModelConfig):
  import ml_dtypes

  params = T.init_params(cfg, jax.random.PRNGKey(3))
  # norms varied (not all ones) and exactly representable in float16 and bfloat16
  for i in range(cfg.num_layers):
    s = np.asarray(params[f"layers_{i}"]["input_norm"]["scale"])
    s = s + np.linspace(-0.5, 0.5, s.shape[0], dtype=np.float32)
    params[f"layers_{i}"]["input_norm"]["scale"] = np.asarray(
        s.astype(ml_dtypes.bfloat16).astype(np.float16), np.float32)
  return params


def test_tiny_gguf_reads_back_to_the_parameters_it_was_written_from(tmp_path):
  params = tiny_params(TINY)
  path = tmp_path / "tiny.gguf"
  write_tiny_gguf(path, TINY, params)
  cfg, back = gguf.load(path)
  assert cfg.replace(bos_token_id=None, eos_token_id=None, pad_token_id=None) == TINY
  jax.tree.map(np.testing.assert_array_equal, back, jax.tree.map(np.asarray, params))
  ids = np.arange(1, 20)[None]
  np.testing.assert_array_equal(hf.forward(cfg, back, ids), hf.forward(TINY, params, ids))


def test_unsupported_tensor_type_and_architecture_are_named(tmp_path, capsys):
  params = tiny_params(TINY)
  path = tmp_path / "q5k.gguf"
  write_tiny_gguf(path, TINY, params,
                  extra_tensor=("blk.0.extra.weight", np.zeros((2, 176), np.uint8), Q.Q5_K))
  with pytest.raises(DataError, match="blk.0.extra.weight.*Q5_K") as e:
    gguf.load(path)
  assert e.value.field == "blk.0.extra.weight"
  # a known tensor in a type we do not dequantize: the error names the tensor and its type
  f = gguf.GGUFFile(path)
  f.tensors["blk.0.attn_q.weight"] = f.tensors.pop("blk.0.extra.weight")
  with pytest.raises(DataError, match="unsupported tensor type Q5_K") as e:
    f.array("blk.0.attn_q.weight")
  assert e.value.field == "blk.0.attn_q.weight"

  gpt2 = tmp_path / "gpt2.gguf"
  write_tiny_gguf(gpt2, TINY, params, arch="gpt2")
  assert cli.main(["convert", "gguf", str(gpt2), str(tmp_path / "out")]) == 2
  err = capsys.readouterr().err
  assert "unsupported architecture 'gpt2'" in err and "general.architecture" in err
  assert not os.path.exists(tmp_path / "out")
  assert cli.main(["convert", "gguf", str(tmp_path / "missing.gguf"), str(tmp_path / "o")]) == 2


def test_layer_subset_student_takes_the_chosen_layers(tmp_path):
  cfg = TINY.replace(num_layers=5)
  params = T.init_params(cfg, jax.random.PRNGKey(5))
  sub_cfg, sub = checkpoint_io.select_layers(cfg, params, checkpoint_io.parse_layers(
      "teacher_layers:0,2,4"))
  assert sub_cfg.num_layers == 3
  for j, i in enumerate((0, 2, 4)):
    jax.tree.map(np.testing.assert_array_equal, sub[f"layers_{j}"], params[f"layers_{i}"])
  for key in ("embed", "final_norm"):
    jax.tree.map(np.testing.assert_array_equal, sub[key], params[key])
  ids = np.arange(2, 30)[None]
  full_cfg, full = checkpoint_io.select_layers(cfg, params, range(5))
  np.testing.assert_array_equal(hf.forward(full_cfg, full, ids), hf.forward(cfg, params, ids))
  # a proper subset is a different model
  assert not np.allclose(hf.forward(sub_cfg, sub, ids), hf.forward(cfg, params, ids))
  # from a folder (HF: only the chosen layers' tensors are read; orbax params)
  hf.save(cfg, params, tmp_path / "hf")
  checkpoint_io.save_params(tmp_path / "orbax", cfg, params)
  for folder in ("hf", "orbax"):
    got_cfg, got = checkpoint_io.load_layers(tmp_path / folder, (0, 2, 4))
    assert got_cfg == sub_cfg
    jax.tree.map(np.testing.assert_array_equal, got, jax.tree.map(np.asarray, sub))
  with pytest.raises(DataError, match="not distinct layers") as e:
    checkpoint_io.load_layers(tmp_path / "hf", (1, 7))
  assert e.value.path == str(tmp_path / "hf")
  for bad in ("teacher_layers:", "teacher_layers:2,1", "teacher_layers:a", "layers:1"):
    with pytest.raises(DataError, match="increasing layer indices"):
      checkpoint_io.parse_layers(bad)
  with pytest.raises(DataError, match="not distinct layers of a 5-layer model"):
    checkpoint_io.select_layers(cfg, params, (0, 5))
