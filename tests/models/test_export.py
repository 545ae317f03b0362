"""`sad-jax export` (a run → an HF folder transformers serves) and evaluation in the template
the student was trained with (issue 22)."""

import json
import os
import shutil

import jax
import ml_dtypes
import numpy as np
import pytest

from sad_jax import cli
from sad_jax.agent import evaluate, react
from sad_jax.common.errors import DataError
from sad_jax.data import prepare, schema
from sad_jax.data.schema import Segment
from sad_jax.data.tokenizer import load_tokenizer
from sad_jax.models import checkpoint_io, export, hf
from sad_jax.models import transformer as T
from sad_jax.models.config import ModelConfig
from sad_jax.models.generate import generate
from tests import helpers
from tests.data.test_prepare import make_config

torch = pytest.importorskip("torch", reason="the `hf` extra (torch + transformers) is needed")
transformers = pytest.importorskip("transformers")


def make_run(root, tokenizer: str, *, template: str = "react", copy_files: bool = False) -> str:
  """A training run as `sad-jax train` leaves it: RUN/config.json naming the prepared
  dataset, RUN/final (orbax params + config.json) with a random peaked model. copy_files:
  final/ also holds the tokenizer and template record (as train copies them)."""
  os.makedirs(root, exist_ok=True)
  trajs = helpers.synthetic_trajectories(24, seed=7)
  schema.write_jsonl(os.path.join(root, "t.jsonl"), trajs)
  ds = os.path.join(root, "ds")
  prepare.prepare(make_config([os.path.join(root, "t.jsonl")], tokenizer__path=tokenizer,
                              template=template, max_len=512), ds, progress=False)
  _, tok, _ = prepare.load_prepared(ds)
  cfg = ModelConfig(model_type="llama", vocab_size=tok.vocab_size, hidden_size=32,
                    intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                    max_position_embeddings=1024)
  params = jax.tree.map(lambda a: a * 6, T.init_params(cfg, jax.random.PRNGKey(1)))
  final = os.path.join(root, "final")
  checkpoint_io.save_params(final, cfg, params)
  if copy_files:
    for name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "template.json"):
      if os.path.exists(os.path.join(ds, name)):
        shutil.copyfile(os.path.join(ds, name), os.path.join(final, name))
  helpers.write_json(os.path.join(root, "config.json"), {"dataset": ds, "objective.name": "sad"})
  return str(root)


@pytest.fixture(scope="module")
def spm_run(tmp_path_factory, spm_path):
  return make_run(str(tmp_path_factory.mktemp("spm_run")), spm_path)


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory, hf_dir):
  return make_run(str(tmp_path_factory.mktemp("chat_run")), hf_dir, template="tokenizer",
                  copy_files=True)


def training_texts(run: str, n: int = 4) -> list[str]:
  """Rendered training text: the dataset's examples decoded (without the BOS and EOS that
  prepare adds around the ReAct text)."""
  builder, tok, _ = prepare.load_prepared(os.path.join(run, "ds"))
  src = builder.as_data_source("train")
  drop = {tok.bos_id, tok.eos_id} if tok.kind == "sentencepiece" else set()
  return [tok.decode([i for i in np.asarray(src[j]["ids"]).tolist() if i not in drop])
          for j in range(n)]


def torch_model(folder):
  return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def greedy_torch(model, prompt, n):
  with torch.no_grad():
    out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False,
                         attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
  return out[0, len(prompt):].tolist()


def test_float32_export_matches_logits_generation_and_tokens(spm_run, spm_path, tmp_path):
  out = str(tmp_path / "out")
  summary = export.export(spm_run, out, dtype="float32")
  assert summary["files"] == ["model.safetensors"] and summary["template"] == "react-v1"
  assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
          "tokenizer_config.json", "template.json"} <= set(os.listdir(out))
  cfg, params = checkpoint_io.load_model(os.path.join(spm_run, "final"))
  model = torch_model(out)
  ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 17))
  with torch.no_grad():
    theirs = model(torch.tensor(ids)).logits.numpy()
  ours = np.asarray(hf.forward(cfg, params, ids))
  assert np.max(np.abs(ours - theirs)) / np.max(np.abs(ours)) <= 1e-4

  # The exported tokenizer gives load_tokenizer's ids on training text, in transformers
  # and through load_tokenizer itself (the tokenizer.json path).
  sp = load_tokenizer(spm_path)
  fast = transformers.AutoTokenizer.from_pretrained(out)
  ours_hf = load_tokenizer(out)
  texts = training_texts(spm_run)
  for text in texts:
    want = sp.encode(text).ids.tolist()
    assert fast(text, add_special_tokens=False)["input_ids"] == want
    assert ours_hf.encode(text).ids.tolist() == want
    assert fast.decode(want) == text
  assert fast(texts[0])["input_ids"][0] == sp.bos_id  # BOS as the ReAct prompt has it

  # Greedy generation, token for token, on prompts cut from training text.
  prompts = [[sp.bos_id, *sp.encode(t).ids.tolist()[:n]] for t, n in zip(texts, (9, 30, 55))]
  gen = generate(cfg, params, prompts, max_new_tokens=12, stop_token_ids=[sp.eos_id])
  for prompt, toks in zip(prompts, gen.tokens, strict=True):
    assert greedy_torch(model, prompt, 12) == toks


def test_bfloat16_export_loads(spm_run, tmp_path):
  out = str(tmp_path / "bf16")
  assert cli.main(["export", spm_run, out, "--dtype", "bfloat16"]) == 0
  with open(os.path.join(out, "config.json")) as f:
    assert json.load(f)["torch_dtype"] == "bfloat16"
  model = transformers.AutoModelForCausalLM.from_pretrained(out)
  assert next(model.parameters()).dtype == torch.bfloat16
  cfg, params = checkpoint_io.load_model(os.path.join(spm_run, "final"))
  ids = np.arange(1, 20)[None]
  with torch.no_grad():
    theirs = model.float()(torch.tensor(ids)).logits.numpy()
  # the same weights rounded to bfloat16 (round to nearest even, as ml_dtypes and torch do),
  # computed in float32 on both sides
  rounded = jax.tree.map(lambda a: np.asarray(a).astype(ml_dtypes.bfloat16).astype(np.float32),
                         params)
  ours = np.asarray(hf.forward(cfg, rounded, ids))
  assert np.max(np.abs(ours - theirs)) / np.max(np.abs(ours)) <= 1e-4
  # and the rounding is real: the float32 weights give other logits
  assert np.max(np.abs(np.asarray(hf.forward(cfg, params, ids)) - theirs)) > 1e-3


def test_forced_sharding_writes_an_index_transformers_loads(spm_run, tmp_path):
  out = str(tmp_path / "sharded")
  summary = export.export(os.path.join(spm_run, "final"), out, dtype="float32",
                          max_shard_bytes=40_000)
  assert len(summary["files"]) > 2 and "model.safetensors" not in os.listdir(out)
  with open(os.path.join(out, "model.safetensors.index.json")) as f:
    index = json.load(f)
  assert sorted(set(index["weight_map"].values())) == summary["files"]
  cfg, params = checkpoint_io.load_model(os.path.join(spm_run, "final"))
  ids = np.arange(3, 15)[None]
  with torch.no_grad():
    theirs = torch_model(out)(torch.tensor(ids)).logits.numpy()
  ours = np.asarray(hf.forward(cfg, params, ids))
  assert np.max(np.abs(ours - theirs)) / np.max(np.abs(ours)) <= 1e-4
  cfg2, _ = hf.load(out)  # and our own loader reads the shards back
  assert cfg2.num_layers == cfg.num_layers


def test_chat_export_carries_its_template_and_end_of_turn(chat_run, hf_dir, tmp_path):
  out = str(tmp_path / "chat")
  summary = export.export(chat_run, out, dtype="float32")
  assert summary["template"].startswith("chat-")
  fast = transformers.AutoTokenizer.from_pretrained(out)
  assert fast.chat_template == helpers.CHATML
  ref = load_tokenizer(hf_dir)
  for text in training_texts(chat_run):
    want = ref.encode(text, parse_special=True).ids.tolist()
    assert fast(text, add_special_tokens=False)["input_ids"] == want
    assert load_tokenizer(out).encode(text, parse_special=True).ids.tolist() == want
  im_end = ref.special_tokens["<|im_end|>"]
  with open(os.path.join(out, "generation_config.json")) as f:
    assert im_end in np.atleast_1d(json.load(f)["eos_token_id"]).tolist()
  # transformers' own rendering of a conversation with the generation prompt is the
  # prompt sad-jax eval gives the student.
  policy = evaluate.load_policy(out)
  traj = helpers.synthetic_trajectories(1, seed=3)[0]
  history = schema.Trajectory(id="h", segments=list(traj.segments[:4]))
  msgs, _ = policy.template.messages(history)
  theirs = fast.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
  theirs = theirs["input_ids"] if isinstance(theirs, dict) or hasattr(theirs, "keys") else theirs
  assert list(theirs) == policy.prompt(history)


def test_bad_sources_are_refused_by_name(spm_run, tmp_path, capsys):
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(DataError) as e:
    export.export(empty, tmp_path / "o")
  assert e.value.path == str(empty / "config.json")
  no_weights = tmp_path / "no_weights"
  no_weights.mkdir()
  shutil.copyfile(os.path.join(spm_run, "final", "config.json"), no_weights / "config.json")
  with pytest.raises(DataError) as e:
    export.export(no_weights, tmp_path / "o")
  assert e.value.path == str(no_weights) and e.value.field == "params"
  assert cli.main(["export", str(tmp_path / "missing"), str(tmp_path / "o")]) == 2
  assert "missing" in capsys.readouterr().err
  with pytest.raises(DataError) as e:
    export.export(spm_run, tmp_path / "o", dtype="float16")
  assert e.value.field == "dtype"
  assert not os.path.exists(tmp_path / "o")


# ----------------------------------------------------------------------------- eval


def _training_prefix(run: str, traj_id: str) -> tuple[np.ndarray, np.ndarray]:
  builder, _, _ = prepare.load_prepared(os.path.join(run, "ds"))
  for split in ("train", "validation"):
    try:
      src = builder.as_data_source(split)
    except Exception:  # a split prepare did not write
      continue
    for i in range(len(src)):
      ex = src[i]
      if (ex["id"].decode() if isinstance(ex["id"], bytes) else ex["id"]) == traj_id:
        return np.asarray(ex["ids"]), np.asarray(ex["kinds"])
  raise AssertionError(traj_id)


@pytest.mark.parametrize("run_name", ["spm_run", "chat_run"])
def test_eval_prompts_in_the_training_template(run_name, request):
  """The policy's prompt for a history is the training sequence up to the next step."""
  from sad_jax.data.segment import step_boundaries

  run = request.getfixturevalue(run_name)
  policy = evaluate.load_policy(run)  # RUN: its final/, tokenizer and template
  assert (policy.template is None) == (run_name == "spm_run")
  traj = helpers.synthetic_trajectories(24, seed=7)[5]
  ids, kinds = _training_prefix(run, traj.id)
  steps = step_boundaries(kinds)
  # the history before the second step: task (+ observation), reason, action, observation
  second = next(i for i, s in enumerate(traj.segments) if s.kind == "reason"
                and any(x.kind == "reason" for x in traj.segments[:i]))
  history = schema.Trajectory(id=traj.id, segments=list(traj.segments[:second]))
  assert policy.prompt(history) == ids[:steps[1]].tolist()
  if run_name == "chat_run":
    assert policy.tokenizer.decode(policy.prompt(history)).endswith("<|im_start|>assistant\n")


def test_eval_of_a_chat_student_stops_at_end_of_turn(chat_run, monkeypatch):
  policy = evaluate.load_policy(os.path.join(chat_run, "final"), max_new_tokens=4)
  im_end = policy.tokenizer.special_tokens["<|im_end|>"]
  assert im_end in policy.stop_ids()
  seen = {}
  real = react.gen.generate

  def spy(*a, **kw):
    seen.update(kw)
    return real(*a, **kw)

  monkeypatch.setattr(react.gen, "generate", spy)
  traj = schema.Trajectory(id="t", segments=[Segment("task", "find the coin")])
  [[turn]] = policy.turns([traj])
  assert im_end in seen["stop_token_ids"] and turn.tokens <= 4


def test_a_dataset_without_a_template_record_is_matched_by_fingerprint(chat_run, tmp_path):
  ds = str(tmp_path / "ds")
  shutil.copytree(os.path.join(chat_run, "ds"), ds)
  with open(os.path.join(ds, "template.json")) as f:
    recorded = json.load(f)
  os.remove(os.path.join(ds, "template.json"))
  tok = load_tokenizer(ds)
  assert prepare.load_template(ds, tok).source == recorded["source"]
  bare = load_tokenizer(ds)
  bare.chat_template = "{{ messages }}"  # another template: not recoverable, said so
  with pytest.raises(DataError) as e:
    prepare.load_template(ds, bare)
  assert e.value.field == "template"


def test_a_sharded_model_exports_the_same_bytes(spm_run, tmp_path):
  """Parameters split over (2, 2, 2) devices are gathered one at a time into the same file."""
  from sad_jax.common import sharding

  mesh = sharding.make_mesh((2, 2, 2))
  a = export.export(spm_run, tmp_path / "a", dtype="bfloat16")
  b = export.export(spm_run, tmp_path / "b", dtype="bfloat16", mesh=mesh)
  _, params = checkpoint_io.load_model(os.path.join(spm_run, "final"), mesh=mesh)
  assert len(params["layers_0"]["mlp"]["up"].sharding.device_set) > 1  # really sharded
  assert b["files"] == a["files"]
  for name in a["files"]:
    assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_sad_jax_eval_of_a_chat_student_prompts_in_its_chat_template(chat_run, tmp_path,
                                                                     monkeypatch):
  """The command end to end on a math game: every prompt ends with the generation prompt."""
  prompts, stops = [], []
  real = react.gen.generate

  def spy(cfg, params, batch, **kw):
    prompts.extend(batch)
    stops.append(list(kw["stop_token_ids"]))
    return real(cfg, params, batch, **kw)

  monkeypatch.setattr(react.gen, "generate", spy)
  out = tmp_path / "t.jsonl"
  assert cli.main(["eval", "--checkpoint", chat_run, "--env", "math:basic_arithmetic",
                   "--episodes", "1", "--batch", "1", "--max-steps", "2",
                   "--max-new-tokens", "4", "--quiet", "--transcripts", str(out)]) == 0
  tok = load_tokenizer(os.path.join(chat_run, "final"))
  assert prompts and all(tok.decode(p).endswith("<|im_end|>\n<|im_start|>assistant\n")
                         for p in prompts)
  assert all(tok.special_tokens["<|im_end|>"] in s for s in stops)
  assert len(schema.read_jsonl(out)) == 1
