"""`prepare`: a real TFDS/ArrayRecord dataset, read back with tfds and grain."""

import hashlib
import json
import os

import grain
import numpy as np
import pytest

from sad_jax.common.errors import DataError
from sad_jax.common.types import SpanKind
from sad_jax.configs import prepare_base, prepare_fireact
from sad_jax.data import importers, prepare, render, schema, segment, tfds_builder
from tests import helpers
from tests.data.test_render_segment import REACT_FORM

K = SpanKind


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
      # Independent check: BOS + tokens + EOS; the decoded runs of one kind are exactly
      # the trajectory's segments in ReAct form, in order.
      ids, kinds = np.asarray(ex["ids"]), np.asarray(ex["kinds"])
      assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
      cut = np.flatnonzero(kinds[2:-1] != kinds[1:-2]) + 2
      runs = [(int(kinds[a]), tok.decode(ids[a:b]))
              for a, b in zip([1, *cut], [*cut, len(ids) - 1], strict=True)]
      want = [(int(SpanKind.from_name(sg.kind)), REACT_FORM[sg.kind](sg.text, "react", i))
              for i, sg in enumerate(traj.segments)]
      assert runs == want
      want_ids = segment.token_kinds(
          render.render_react(traj),
          segment.encode_rendered(tok, [render.render_react(traj)], parse_special=False)[0],
          bos_id=tok.bos_id, eos_id=tok.eos_id)
      np.testing.assert_array_equal(ex["ids"], want_ids.ids)
      stats = tfds_builder.named_stats(ex)
      assert stats["steps"] == traj.count("action")
      assert stats["tool_calls"] == traj.count("action") - 1  # all but finish[…]
      assert stats["tokens"] == len(ids)
      assert stats["observation_tokens"] == int(np.sum(kinds == SpanKind.OBSERVATION))
      assert stats["reason_tokens"] == int(np.sum(kinds == SpanKind.REASON))
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
  full_cfg = make_config([synthetic_jsonl], tokenizer__path=spm_path, max_len=10**6)
  prepare.prepare(full_cfg, str(tmp_path / "full"), progress=False)
  full_builder, _, _ = prepare.load_prepared(str(tmp_path / "full"))
  full = {ex["id"]: (np.asarray(ex["ids"]), np.asarray(ex["kinds"]))
          for split in full_builder.info.splits for ex in full_builder.as_data_source(split)}
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
        whole, whole_kinds = full[ex["id"]]
        if tfds_builder.named_stats(ex)["truncated"]:
          # a prefix of the full tokens, cut right before the latest step start that fits
          # (a step start: a supervised token after context), keeping at least one step
          n = len(ex["ids"])
          np.testing.assert_array_equal(ex["ids"], whole[:n])
          sup = np.isin(whole_kinds, [K.REASON, K.ACTION, K.ANSWER])
          starts = [t for t in range(1, len(sup)) if sup[t] and not sup[t - 1]]
          assert n == max(t for t in starts[1:] if t <= 120)
        else:
          np.testing.assert_array_equal(ex["ids"], whole)
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
    for x, y in zip(ba.as_data_source(split), bc.as_data_source(split), strict=True):
      assert x["id"] == y["id"]
      np.testing.assert_array_equal(x["ids"], y["ids"])
      np.testing.assert_array_equal(x["kinds"], y["kinds"])


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


def test_chat_template_writes_its_own_bos_and_eos(tmp_path, synthetic_jsonl, hf_dir):
  """add_bos/add_eos do not double what the template already writes."""
  cfg = make_config([synthetic_jsonl], tokenizer__path=hf_dir, template="tokenizer",
                    val_fraction=0.0)
  prepare.prepare(cfg, str(tmp_path / "d"), progress=False)
  builder, tok, _ = prepare.load_prepared(str(tmp_path / "d"))
  end = tok.special_tokens["<|im_end|>"]
  start = tok.special_tokens["<|im_start|>"]
  for ex in builder.as_data_source("train"):
    ids = np.asarray(ex["ids"]).tolist()
    assert ids[0] == start and ids.count(start) == ids.count(end)
    assert tok.decode(ids).endswith("<|im_end|>\n")


def test_a_template_failure_names_the_trajectory(tmp_path, synthetic_jsonl, spm_path):
  tmpl = tmp_path / "strict.jinja"
  tmpl.write_text(helpers.LLAMA2)
  trajs = schema.read_jsonl(synthetic_jsonl)  # they have a system segment: fine for LLAMA2
  bad = trajs[3]
  bad.segments.insert(1, schema.Segment("system", "a second system prompt"))
  schema.write_jsonl(tmp_path / "in.jsonl", trajs)
  cfg = make_config([str(tmp_path / "in.jsonl")], tokenizer__path=spm_path, template=str(tmpl))
  with pytest.raises(DataError, match=f"trajectory {bad.id}: chat template raised"):
    prepare.prepare(cfg, str(tmp_path / "out"), progress=False)
  assert not (tmp_path / "out").exists()
  cfg.on_error = "skip"
  report = prepare.prepare(cfg, str(tmp_path / "out"), progress=False)
  assert report.skipped == 1 and bad.id in report.skip_reasons[0]
  assert sum(report.written.values()) == len(trajs) - 1
