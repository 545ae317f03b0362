"""`prepare`: a real TFDS/ArrayRecord dataset, read back with tfds and grain."""

import hashlib
import json
import os

import grain
import numpy as np
import pytest

from configs import prepare_base, prepare_fireact
from sad_jax.data import importers, prepare, render, schema, segment, tfds_builder
from sad_jax.errors import DataError
from sad_jax.types import SpanKind
from tests import helpers


def make_config(inputs, **kw):
  config = prepare_base.get_config()
  config.inputs = tuple(inputs)
  config.tokenizer.vocab_size = 600
  for k, v in kw.items():
    node = config
    *parents, leaf = k.split("__")
    for p in parents:
      node = node[p]
    node[leaf] = v
  return config


@pytest.fixture(scope="module")
def synthetic_jsonl(tmp_path_factory):
  path = tmp_path_factory.mktemp("syn") / "syn.jsonl"
  schema.write_jsonl(path, helpers.synthetic_trajectories(120, seed=5, system=True,
                                                          multiline=True))
  return str(path)


def file_digests(folder):
  return {n: hashlib.sha256(open(os.path.join(folder, n), "rb").read()).hexdigest()
          for n in sorted(os.listdir(folder)) if "array_record" in n or n.endswith(".model")}


def test_prepare_reads_back_and_is_deterministic(tmp_path, synthetic_jsonl):
  config = make_config([synthetic_jsonl])
  r1 = prepare.prepare(config, str(tmp_path / "a"), progress=False)
  r2 = prepare.prepare(config, str(tmp_path / "b"), progress=False)
  assert r1.fingerprint == r2.fingerprint
  assert file_digests(tmp_path / "a") == file_digests(tmp_path / "b")
  assert sum(r1.written.values()) == 120

  builder, tok, meta = prepare.load_prepared(str(tmp_path / "a"))
  assert meta["fingerprint"] == r1.fingerprint and meta["vocab_size"] == tok.vocab_size
  trajs = {t.id: t for t in schema.read_jsonl(synthetic_jsonl)}
  seen = set()
  for split in ("train", "validation"):
    source = builder.as_data_source(split)
    ds = grain.MapDataset.source(source)  # grain reads the same records
    for i in range(len(source)):
      ex = ds[i]
      tid = ex["id"].decode()
      seen.add(tid)
      assert prepare.split_of(tid, config.val_fraction) == split
      traj = trajs[tid]
      # tokens and kinds equal an independent re-tokenization of the trajectory
      rendered = render.render_react(traj)
      enc = segment.encode_rendered(tok, [rendered], parse_special=False)[0]
      want = segment.token_kinds(rendered, enc, bos_id=tok.bos_id, eos_id=tok.eos_id)
      np.testing.assert_array_equal(ex["ids"], want.ids)
      np.testing.assert_array_equal(ex["kinds"], want.kinds)
      stats = tfds_builder.named_stats(ex)
      assert stats["steps"] == traj.count("action")
      assert stats["tool_calls"] == traj.count("action") - 1  # all but finish[…]
      assert stats["tokens"] == len(want.ids)
      assert stats["observation_tokens"] == int(np.sum(want.kinds == SpanKind.OBSERVATION))
      assert stats["reason_tokens"] == int(np.sum(want.kinds == SpanKind.REASON))
      assert stats["success"] == 1 and stats["truncated"] == 0
  assert seen == set(trajs)
  report = json.loads((tmp_path / "a" / "prepare_report.json").read_text())
  assert report["fingerprint"] == r1.fingerprint


def test_fingerprint_changes_with_content_tokenizer_and_template(tmp_path, synthetic_jsonl,
                                                                 spm_path, hf_dir):
  base = prepare.prepare(make_config([synthetic_jsonl], tokenizer__path=spm_path),
                         str(tmp_path / "a"), progress=False).fingerprint
  trajs = schema.read_jsonl(synthetic_jsonl)
  trajs[0].segments[-2] = schema.Segment("action", "finish[other]")
  schema.write_jsonl(tmp_path / "edited.jsonl", trajs)
  edited = prepare.prepare(make_config([str(tmp_path / "edited.jsonl")], tokenizer__path=spm_path),
                           str(tmp_path / "b"), progress=False).fingerprint
  other_tok = prepare.prepare(make_config([synthetic_jsonl], tokenizer__path=hf_dir),
                              str(tmp_path / "c"), progress=False).fingerprint
  chat = prepare.prepare(make_config([synthetic_jsonl], tokenizer__path=hf_dir,
                                     template="tokenizer"),
                         str(tmp_path / "d"), progress=False).fingerprint
  assert len({base, edited, other_tok, chat}) == 4
  # an HF tokenizer travels with its config
  assert sorted(n for n in os.listdir(tmp_path / "d") if n.startswith("tokenizer")) == [
      "tokenizer.json", "tokenizer_config.json"]
  _, tok, _ = prepare.load_prepared(str(tmp_path / "d"))
  assert tok.chat_template == helpers.CHATML


def test_length_policies_are_counted(tmp_path, synthetic_jsonl, spm_path):
  lengths = {}
  for policy in ("truncate", "drop"):
    config = make_config([synthetic_jsonl], tokenizer__path=spm_path, max_len=120,
                         length_policy=policy)
    report = prepare.prepare(config, str(tmp_path / policy), progress=False)
    builder, _, _ = prepare.load_prepared(str(tmp_path / policy))
    n_written = sum(report.written.values())
    assert n_written + len(report.dropped) == 120
    for split in builder.info.splits:
      for ex in builder.as_data_source(split):
        assert len(ex["ids"]) <= 120
        if tfds_builder.named_stats(ex)["truncated"]:
          # truncated rows end right before a step: the last kept token is context
          assert not segment.is_supervised(ex["kinds"][-1:]).any()
          assert segment.is_supervised(ex["kinds"]).any()
    lengths[policy] = (n_written, report.truncated, len(report.dropped))
  assert lengths["truncate"][1] > 0 and lengths["drop"][1] == 0
  assert lengths["drop"][2] == lengths["truncate"][1] + lengths["truncate"][2]


def test_failure_leaves_nothing(tmp_path, synthetic_jsonl, monkeypatch):
  out = tmp_path / "out"

  def boom(**kw):
    raise RuntimeError("disk on fire")

  monkeypatch.setattr(prepare.tfds_builder, "build", boom)
  with pytest.raises(RuntimeError):
    prepare.prepare(make_config([synthetic_jsonl]), str(out), progress=False)
  assert not out.exists()
  assert os.listdir(tmp_path) == []  # no temporary folder left either


def test_bad_config_and_inputs(tmp_path, synthetic_jsonl):
  with pytest.raises(DataError, match="length_policy"):
    prepare.prepare(make_config([synthetic_jsonl], length_policy="chop"), str(tmp_path / "x"))
  with pytest.raises(DataError, match="duplicate trajectory ids"):
    prepare.prepare(make_config([synthetic_jsonl, synthetic_jsonl]), str(tmp_path / "x"))
  with pytest.raises(DataError, match="no chat_template"):
    prepare.prepare(make_config([synthetic_jsonl], template="tokenizer"), str(tmp_path / "x"))
  with pytest.raises(DataError, match="not a prepared dataset"):
    prepare.load_prepared(str(tmp_path))
  assert not (tmp_path / "x").exists()


@pytest.mark.fireact
def test_fireact_alpaca_and_chat_prepare_identically(tmp_path):
  """Both FireAct files give the same dataset: same tokenizer, tokens and fingerprint."""
  reports = {}
  for arg in ("alpaca", "chat"):
    config = prepare_fireact.get_config(arg)
    config.inputs = tuple(os.path.join(os.path.dirname(__file__), "..", "..", p)
                          for p in config.inputs)
    reports[arg] = prepare.prepare(config, str(tmp_path / arg), progress=False)
  a, c = reports["alpaca"], reports["chat"]
  assert a.fingerprint == c.fingerprint
  assert sum(a.written.values()) == 500 and a.skipped == 0 and not a.dropped
  assert a.tokens == c.tokens
  ba, _, _ = prepare.load_prepared(str(tmp_path / "alpaca"))
  bc, _, _ = prepare.load_prepared(str(tmp_path / "chat"))
  for split in ("train", "validation"):
    for x, y in zip(ba.as_data_source(split), bc.as_data_source(split)):
      assert x["id"] == y["id"]
      np.testing.assert_array_equal(x["ids"], y["ids"])


def test_import_then_prepare_via_schema_jsonl(tmp_path, spm_path):
  """Every importer's output goes through prepare (the `sad` JSONL format)."""
  from tests.data.test_importers import SMOL_ASSISTANT, openai_record

  trajs = [importers.import_openai_record(openai_record(), source="o"),
           importers.import_smolagents_record({"messages": [
               {"role": "user", "content": "New task:\nq"},
               {"role": "assistant", "content": SMOL_ASSISTANT},
               {"role": "tool-response", "content": "Observation:\n42"}]}, source="s")]
  schema.write_jsonl(tmp_path / "mixed.jsonl", trajs)
  report = prepare.prepare(make_config([str(tmp_path / "mixed.jsonl")], tokenizer__path=spm_path,
                                       val_fraction=0.0), str(tmp_path / "out"), progress=False)
  assert report.written == {"train": 2}
  builder, _, _ = prepare.load_prepared(str(tmp_path / "out"))
  by_id = {ex["id"].decode(): tfds_builder.named_stats(ex)
           for ex in builder.as_data_source("train")}
  assert by_id[trajs[0].id]["tool_calls"] == 2 and by_id[trajs[0].id]["steps"] == 3
  assert by_id[trajs[1].id]["steps"] == 1 and by_id[trajs[1].id]["success"] == -1
