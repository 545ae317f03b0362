"""A corpus of bad inputs, each run through the real `sad-jax` entry point in-process.

Every case must exit non-zero with one `sad-jax: error:` line that names the place (file,
record, field or tensor), print no traceback, let no exception escape, and leave no partial
output (nor a temporary beside it). Inputs are the hand-written files under tests/data/bad/
(listed in its README.md) or damaged copies of good artifacts built once per module here.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Callable

import numpy as np
import pytest

from sad_jax import cli
from sad_jax.common.errors import DataError
from sad_jax.common.types import SpanKind
from sad_jax.data import prepare, schema
from sad_jax.teacher import precompute as pc
from sad_jax.teacher import store as store_lib
from sad_jax.teacher import verify as verify_lib
from tests import helpers
from tests.data.test_prepare import make_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BAD = os.path.join(REPO, "tests", "data", "bad")
TRAIN_AR = "trajectory_dataset-train.array_record-00000-of-00001"
SHARD = "all-00000.arrayrecord"  # the first shard of a `teacher import` store
K = 4


@dataclasses.dataclass(frozen=True)
class Case:
  """argv and expect are templates: {bad} {repo} {tmp} and the artifact names ({ds},
  {store}, {hf}, {small_hf}, {tok}, {hf_tok}, {logprobs})."""

  id: str
  argv: tuple[str, ...]
  expect: tuple[str, ...]                      # substrings of stderr
  build: Callable[[dict, str], None] | None = None  # makes the damaged input under {tmp}
  output: str | None = None                    # must not exist after the command


# ----------------------------------------------------------------------------- damage


def copy_of(name: str, *mutations: Callable[[str], None]) -> Callable[[dict, str], None]:
  """A build step: copies the good artifact `name` to {tmp}/{name}, then damages it."""
  def build(arts: dict, tmp: str) -> None:
    dst = os.path.join(tmp, name)
    shutil.copytree(arts[name], dst)
    for m in mutations:
      m(dst)
  return build


def remove(rel: str):
  return lambda d: os.remove(os.path.join(d, rel))


def write(rel: str, data: str | bytes):
  def go(d):
    with open(os.path.join(d, rel), "wb") as f:
      f.write(data.encode() if isinstance(data, str) else data)
  return go


def truncate(rel: str, keep: float):
  """Keeps the first `keep` fraction of the file (a download or copy cut short)."""
  def go(d):
    path = os.path.join(d, rel)
    data = open(path, "rb").read()
    open(path, "wb").write(data[: int(len(data) * keep)])
  return go


def flip(rel: str, offset: int):
  def go(d):
    path = os.path.join(d, rel)
    data = bytearray(open(path, "rb").read())
    data[offset] ^= 0x01
    open(path, "wb").write(bytes(data))
  return go


def edit_json(rel: str, change: Callable[[object], object]):
  def go(d):
    path = os.path.join(d, rel)
    with open(path, encoding="utf-8") as f:
      obj = json.load(f)
    new = change(obj)  # a replacement, or None after a change in place
    obj = obj if new is None else new
    with open(path, "w", encoding="utf-8") as f:
      json.dump(obj, f)
  return go


def updated(**kw):
  return lambda obj: {**obj, **kw}


def drop_shard_ids(manifest: dict) -> None:
  del manifest["shards"][0]["ids"]


def rewrite_store_records(change: Callable[[store_lib.TopK], None]):
  """Rewrites every record of the store's first shard through `change`, with a consistent
  checksum and marker: only the values are bad, not the file."""
  def go(d):
    st = store_lib.TeacherStore(d)
    m, shard = st.manifest, st.manifest.shards[0]
    recs = [st.get(i) for i in shard["ids"]]
    st.close()
    for rec in recs:
      change(rec)
    os.remove(os.path.join(d, shard["name"]))
    marker = store_lib.write_shard(d, shard["name"], [
        store_lib.encode_record(r, vocab_size=m.vocab_size, logp_dtype=m.logp_dtype)
        for r in recs], shard["ids"])
    edit_json("manifest.json", lambda man: man["shards"][0].update(
        bytes=marker["bytes"], sha256=marker["sha256"]))(d)
  return go


def nan_logp(rec: store_lib.TopK) -> None:
  if rec.logp.size:
    rec.logp[0, 0] = np.nan


def swap_tokenizer(arts: dict, tmp: str) -> None:
  """The dataset with another sentencepiece model in place of its own."""
  with open(arts["tok_small"], "rb") as f:
    copy_of("ds", write("tokenizer.model", f.read()))(arts, tmp)


def server_tokens_differ(arts: dict, tmp: str) -> None:
  """The good prompt log-probs with one token id changed on line 2 (another tokenizer)."""
  lines = [json.loads(x) for x in open(arts["logprobs"], encoding="utf-8")]
  lines[1]["prompt_token_ids"][3] += 1
  helpers.write_jsonl(os.path.join(tmp, "lp.jsonl"), lines)


def safetensors_edit(change: Callable[[dict], None]):
  """Rewrites model.safetensors with `change` applied to its tensors (name → array)."""
  from sad_jax.models import safetensors_io

  def go(d):
    path = os.path.join(d, "model.safetensors")
    tensors = {k: np.array(v) for k, v in safetensors_io.read(path).items()}
    change(tensors)
    os.remove(path)
    safetensors_io.write(path, tensors)
  return go


def safetensors_header(change: Callable[[dict], None]):
  """Rewrites the JSON header of model.safetensors (the tensor bytes unchanged)."""
  import struct

  def go(d):
    path = os.path.join(d, "model.safetensors")
    raw = open(path, "rb").read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8: 8 + n])
    change(header)
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    open(path, "wb").write(struct.pack("<Q", len(blob)) + blob + raw[8 + n:])
  return go


def narrower(name: str):
  def change(t):
    t[name] = t[name][:, :-1]
  return change


def without(name: str):
  return lambda t: t.pop(name)


def with_copy(name: str, source: str):
  def change(t):
    t[name] = t[source]
  return change


# ----------------------------------------------------------------------------- cases

PREPARE = ("prepare", "--config", "{repo}/sad_jax/configs/prepare_base.py", "--out", "{tmp}/out",
           "--quiet")
PREPARE_WITH_TOK = PREPARE + ("--config.tokenizer.path={tok}",)


def prepare_inputs(*names: str) -> str:
  return "--config.inputs=(" + "".join(f"'{{bad}}/trajectories/{n}', " for n in names) + ")"


def traj(name: str) -> str:
  return "{bad}/trajectories/" + name


IMPORT_OUT = "{tmp}/out.jsonl"

TRAJECTORIES = [
    Case("malformed_json", ("import", traj("malformed_json.jsonl"), IMPORT_OUT),
         ("{bad}/trajectories/malformed_json.jsonl, record 2: malformed JSON",), output=IMPORT_OUT),
    Case("undecodable_utf8", ("import", traj("undecodable_utf8.jsonl"), IMPORT_OUT),
         ("undecodable_utf8.jsonl, record 2: undecodable bytes at byte 20",), output=IMPORT_OUT),
    Case("lone_surrogate", ("inspect", traj("lone_surrogate.jsonl"), "--index", "1"),
         ("lone_surrogate.jsonl, record 2: a \\uD800–\\uDFFF escape", "lone surrogate")),
    Case("not_an_object", ("import", traj("not_an_object.jsonl"), IMPORT_OUT),
         ("not_an_object.jsonl, record 2: cannot tell the format",), output=IMPORT_OUT),
    Case("truncated_json_array", ("import", traj("truncated_array.json"), IMPORT_OUT),
         ("truncated_array.json: malformed JSON at line 4",), output=IMPORT_OUT),
    Case("missing_input_file", ("import", traj("no_such_file.jsonl"), IMPORT_OUT),
         ("{bad}/trajectories/no_such_file.jsonl: cannot read: No such file",),
         output=IMPORT_OUT),
    Case("empty_input_file", PREPARE_WITH_TOK + (prepare_inputs("empty.jsonl"),),
         ("{bad}/trajectories/empty.jsonl, field 'config.inputs': no trajectories to prepare",),
         output="{tmp}/out"),
    Case("segments_not_a_list", ("import", traj("sad_segments_not_list.jsonl"), IMPORT_OUT),
         ("sad_segments_not_list.jsonl, record 2, field 'segments': must be a list",),
         output=IMPORT_OUT),
    Case("text_not_a_string", ("import", traj("sad_text_not_string.jsonl"), IMPORT_OUT),
         ("sad_text_not_string.jsonl, record 2, field 'segments[1].text'",), output=IMPORT_OUT),
    Case("unknown_segment_kind", PREPARE_WITH_TOK + (prepare_inputs("sad_unknown_kind.jsonl"),),
         ("sad_unknown_kind.jsonl, record 2, field 'segments[1].kind': unknown segment kind "
          "'spell'",), output="{tmp}/out"),
    Case("empty_segments", ("import", traj("sad_empty_segments.jsonl"), IMPORT_OUT),
         ("sad_empty_segments.jsonl, record 2, field 'segments': trajectory has no segments",),
         output=IMPORT_OUT),
    Case("missing_id", ("inspect", traj("sad_missing_id.jsonl"), "--index", "1"),
         ("sad_missing_id.jsonl, record 2, field 'id': missing field",)),
    Case("success_not_bool", ("import", traj("sad_bad_success.jsonl"), IMPORT_OUT),
         ("sad_bad_success.jsonl, record 2, field 'success'",), output=IMPORT_OUT),
    Case("unknown_action_format", ("import", traj("sad_bad_action_format.jsonl"), IMPORT_OUT),
         ("sad_bad_action_format.jsonl, record 2, field 'meta.action_format'",),
         output=IMPORT_OUT),
    Case("no_action", ("import", "--format", "sad", traj("sad_no_action.jsonl"), IMPORT_OUT),
         ("sad_no_action.jsonl, record 2, field 'segments': trajectory has no action",),
         output=IMPORT_OUT),
    Case("chat_unknown_role", PREPARE_WITH_TOK + (prepare_inputs("chat_unknown_role.jsonl"),),
         ("chat_unknown_role.jsonl, record 2, field 'messages[1].role': unknown role 'wizard'",),
         output="{tmp}/out"),
    Case("chat_roles_not_alternating",
         ("import", "--format", "chat", traj("chat_roles_not_alternating.jsonl"), IMPORT_OUT),
         ("chat_roles_not_alternating.jsonl, record 1, field 'messages[2].role'",),
         output=IMPORT_OUT),
    Case("chat_content_not_text", ("import", traj("chat_content_not_text.jsonl"), IMPORT_OUT),
         ("chat_content_not_text.jsonl, record 1, field 'messages[1].content[0]'",),
         output=IMPORT_OUT),
    Case("react_unterminated_action",
         ("import", "--format", "react", traj("react_unterminated_action.jsonl"), IMPORT_OUT),
         ("react_unterminated_action.jsonl, record 3, field 'output'", "closing bracket",
          "output line 2"), output=IMPORT_OUT),
    Case("react_no_markers", ("inspect", traj("react_no_markers.jsonl"), "--index", "0"),
         ("react_no_markers.jsonl, record 2, field 'output': no 'Thought:'",)),
    Case("smolagents_no_task", ("import", traj("smolagents_no_task.jsonl"), IMPORT_OUT),
         ("smolagents_no_task.jsonl, record 1, field 'steps': no task",), output=IMPORT_OUT),
    Case("smolagents_unknown_step",
         ("import", "--format", "smolagents", traj("smolagents_unknown_step.jsonl"), IMPORT_OUT),
         ("smolagents_unknown_step.jsonl, record 1, field 'steps[2]': unknown step",),
         output=IMPORT_OUT),
    Case("smolagents_empty_code", ("import", traj("smolagents_empty_code.jsonl"), IMPORT_OUT),
         ("smolagents_empty_code.jsonl, record 1, field 'steps[1].model_output': empty code",),
         output=IMPORT_OUT),
    Case("openai_bad_arguments", ("import", traj("openai_bad_arguments.jsonl"), IMPORT_OUT),
         ("openai_bad_arguments.jsonl, record 1, field "
          "'messages[1].tool_calls[0].function.arguments': malformed JSON arguments",),
         output=IMPORT_OUT),
    Case("openai_unmatched_tool_reply",
         ("import", traj("openai_unmatched_tool_reply.jsonl"), IMPORT_OUT),
         ("openai_unmatched_tool_reply.jsonl, record 1, field 'messages[2].tool_call_id'",),
         output=IMPORT_OUT),
    Case("duplicate_ids_across_inputs",
         PREPARE_WITH_TOK + (prepare_inputs("duplicate_id_a.jsonl", "duplicate_id_b.jsonl"),),
         ("{bad}/trajectories/duplicate_id_b.jsonl, field 'id': duplicate trajectory ids across "
          "inputs: 'same' is also in {bad}/trajectories/duplicate_id_a.jsonl",),
         output="{tmp}/out"),
]

CONFIG_FILE = "{bad}/config_files/"
CONFIGS = [
    Case("syntax_error", ("prepare", "--config", CONFIG_FILE + "syntax_error.py"),
         (CONFIG_FILE + "syntax_error.py: syntax error at line 7",)),
    Case("get_config_raises", ("prepare", "--config", CONFIG_FILE + "raises.py"),
         (CONFIG_FILE + "raises.py, field 'get_config': get_config(None): line 10: KeyError: "
          "'medium'",)),
    Case("import_error", ("prepare", "--config", CONFIG_FILE + "import_error.py"),
         (CONFIG_FILE + "import_error.py: line 4: ModuleNotFoundError",)),
    Case("returns_dict", ("prepare", "--config", CONFIG_FILE + "returns_dict.py"),
         (CONFIG_FILE + "returns_dict.py, field 'get_config': get_config returned dict",)),
    Case("no_get_config", ("prepare", "--config", CONFIG_FILE + "no_get_config.py"),
         (CONFIG_FILE + "no_get_config.py: config file has no get_config",)),
    Case("config_not_found", ("prepare", "--config", CONFIG_FILE + "missing.py"),
         (CONFIG_FILE + "missing.py: config file not found",)),
    Case("arg_not_accepted", ("prepare", "--config", "{repo}/sad_jax/configs/prepare_base.py:fast"),
         ("{repo}/sad_jax/configs/prepare_base.py, field 'get_config': get_config('fast'): line 11: "
          "this config takes no argument",)),
    Case("arg_unknown", ("train", "--config", "{repo}/sad_jax/configs/train_sad.py:fast", "--workdir",
                         "{tmp}/work"),
         ("{repo}/sad_jax/configs/train_sad.py, field 'get_config'", "unknown argument 'fast'"),
         output="{tmp}/work"),
    Case("unknown_key", PREPARE + ("--config.nope=1",),
         ("field 'nope': unknown config key 'nope'",), output="{tmp}/out"),
    Case("unknown_nested_key", PREPARE + ("--config.tokenizer.size=1",),
         ("field 'tokenizer.size': unknown config key",
          "known here: max_piece_length, model_type, path, split_by_whitespace"),
         output="{tmp}/out"),
    Case("wrong_type", PREPARE + ("--config.max_len=many",),
         ("field 'max_len': bad value for max_len: expected int, got 'many'",),
         output="{tmp}/out"),
    Case("not_a_boolean", PREPARE + ("--config.add_bos=maybe",),
         ("field 'add_bos'", "expected a boolean"), output="{tmp}/out"),
    Case("override_without_value", PREPARE + ("--config.max_len",),
         ("override '--config.max_len' has no '='",), output="{tmp}/out"),
    Case("missing_required_inputs", PREPARE, ("field 'config.inputs': required",),
         output="{tmp}/out"),
    Case("missing_required_teacher",
         ("teacher", "precompute", "--config", "{repo}/sad_jax/configs/teacher_precompute.py",
          "--config.dataset={ds}", "--config.out={tmp}/out", "--quiet"),
         ("field 'config.teacher': required",), output="{tmp}/out"),
    Case("bad_enum_value", PREPARE + (prepare_inputs("sad_no_action.jsonl"),
                                      "--config.on_error=ignore"),
         ("field 'config.on_error': on_error must be raise or skip",), output="{tmp}/out"),
    Case("bad_tokenizer_model_type", PREPARE + (prepare_inputs("duplicate_id_a.jsonl"),
                                                "--config.tokenizer.model_type=wordpiece"),
         ("field 'config.tokenizer.model_type'",), output="{tmp}/out"),
    Case("eval_zero_episodes",
         ("eval", "--checkpoint", "{hf}", "--tokenizer", "{tok}", "--env", "twx:coin",
          "--episodes", "0", "--quiet", "--json", "{tmp}/result.json"),
         ("field 'episodes'", "must be at least 1"), output="{tmp}/result.json"),
    Case("eval_rewrite_not_a_rule",
         ("eval", "--checkpoint", "{hf}", "--tokenizer", "{tok}", "--env", "twx:coin",
          "--rewrite", "dining table", "--quiet", "--json", "{tmp}/result.json"),
         ("field 'rewrite'", "is not OLD=>NEW"), output="{tmp}/result.json"),
    Case("eval_rewrite_never_matches",
         ("eval", "--checkpoint", "{hf}", "--tokenizer", "{tok}", "--env", "twx:coin",
          "--episodes", "1", "--max-steps", "1", "--max-new-tokens", "4",
          "--rewrite", "a unicorn=>a horse", "--quiet", "--json", "{tmp}/result.json"),
         ("field 'rewrite'", "no rule matched"), output="{tmp}/result.json"),
]

TOKENIZERS = [
    Case("sentencepiece_random_bytes",
         PREPARE + (prepare_inputs("duplicate_id_a.jsonl"),
                    "--config.tokenizer.path={bad}/tokenizer_files/random_bytes.model"),
         ("{bad}/tokenizer_files/random_bytes.model: not a sentencepiece model",),
         output="{tmp}/out"),
    Case("sentencepiece_empty",
         ("inspect", traj("duplicate_id_a.jsonl"), "--tokenizer",
          "{bad}/tokenizer_files/empty.model"),
         ("{bad}/tokenizer_files/empty.model: not a sentencepiece model",)),
    Case("sentencepiece_truncated",
         ("inspect", traj("duplicate_id_a.jsonl"), "--tokenizer",
          "{tmp}/tok_dir/tokenizer.model"),
         ("{tmp}/tok_dir/tokenizer.model: not a sentencepiece model",),
         build=copy_of("tok_dir", truncate("tokenizer.model", 0.5))),
    Case("tokenizer_json_not_json",
         PREPARE + (prepare_inputs("duplicate_id_a.jsonl"),
                    "--config.tokenizer.path={bad}/tokenizer_files/broken_json"),
         ("{bad}/tokenizer_files/broken_json/tokenizer.json: not a tokenizer.json",),
         output="{tmp}/out"),
    Case("tokenizer_json_no_model",
         ("inspect", traj("duplicate_id_a.jsonl"), "--tokenizer",
          "{bad}/tokenizer_files/not_a_tokenizer/tokenizer.json"),
         ("not_a_tokenizer/tokenizer.json: not a tokenizer.json",)),
    Case("tokenizer_config_not_json",
         PREPARE + (prepare_inputs("duplicate_id_a.jsonl"), "--config.tokenizer.path={tmp}/hf_tok"),
         ("{tmp}/hf_tok/tokenizer_config.json: cannot read tokenizer config",),
         build=copy_of("hf_tok", write("tokenizer_config.json", '{"chat_template": "{{ x }}",')),
         output="{tmp}/out"),
    Case("folder_without_tokenizer",
         PREPARE + (prepare_inputs("duplicate_id_a.jsonl"),
                    "--config.tokenizer.path={bad}/tokenizer_files/no_tokenizer"),
         ("{bad}/tokenizer_files/no_tokenizer: folder has neither tokenizer.json nor tokenizer.model",),
         output="{tmp}/out"),
    Case("tokenizer_not_found",
         ("inspect", traj("duplicate_id_a.jsonl"), "--tokenizer", "{tmp}/nowhere.model"),
         ("{tmp}/nowhere.model: tokenizer not found",)),
    Case("vocabulary_too_small_to_train",
         PREPARE + (prepare_inputs("duplicate_id_a.jsonl"), "--config.tokenizer.vocab_size=8"),
         ("field 'config.tokenizer.vocab_size': sentencepiece training failed",
          "Vocabulary size is smaller than required_chars"), output="{tmp}/out"),
    Case("vocabulary_larger_than_model",
         ("eval", "--checkpoint", "{small_hf}", "--tokenizer", "{tok}", "--env", "twx:coin",
          "--quiet", "--json", "{tmp}/result.json"),
         ("{tok}, field 'vocab_size': tokenizer has", "the model 64"),
         output="{tmp}/result.json"),
    Case("no_chat_template",
         PREPARE_WITH_TOK + (prepare_inputs("duplicate_id_a.jsonl"), "--config.template=tokenizer"),
         ("{tok}, field 'chat_template'",), output="{tmp}/out"),
]

DS_COPY = "{tmp}/ds"
DATASETS = [
    Case("missing_dataset_info", ("inspect", DS_COPY),
         (DS_COPY + ": not a prepared dataset (no dataset_info.json)",),
         build=copy_of("ds", remove("dataset_info.json"))),
    Case("dataset_info_not_json", ("inspect", DS_COPY),
         (DS_COPY + "/dataset_info.json: cannot read prepared dataset metadata",),
         build=copy_of("ds", write("dataset_info.json", "{\n"))),
    Case("truncated_array_record", ("inspect", DS_COPY, "--index", "2"),
         (f"{DS_COPY}/{TRAIN_AR}, record 3: damaged record (split 'train', index 2)",),
         build=copy_of("ds", truncate(TRAIN_AR, 0.5))),
    Case("empty_array_record", ("teacher", "verify", "{store}", DS_COPY),
         (f"{DS_COPY}/{TRAIN_AR}, record 1: damaged record", "at least 64KB"),
         build=copy_of("ds", write(TRAIN_AR, b""))),
    Case("flipped_byte_array_record", ("teacher", "verify", "{store}", DS_COPY),
         (f"{DS_COPY}/{TRAIN_AR}, record 1: damaged record", "hash mismatch"),
         build=copy_of("ds", flip(TRAIN_AR, 150))),
    Case("missing_array_record",
         ("train", "--config", "{repo}/sad_jax/configs/train_sft.py", "--workdir", "{tmp}/work",
          f"--config.dataset={DS_COPY}"),
         (DS_COPY + "/*-train.array_record-*: the record file of split 'train' is missing",),
         build=copy_of("ds", remove(TRAIN_AR)), output="{tmp}/work"),
    Case("truncated_array_record_training",
         ("train", "--config", "{repo}/sad_jax/configs/train_sft.py", "--workdir", "{tmp}/work",
          f"--config.dataset={DS_COPY}"),
         (f"{DS_COPY}/{TRAIN_AR}, record 1: damaged record",),
         build=copy_of("ds", truncate(TRAIN_AR, 0.3)), output="{tmp}/work"),
    Case("fingerprint_edited", ("inspect", DS_COPY),
         (DS_COPY + "/metadata.json, field 'fingerprint'", "edited after prepare"),
         build=copy_of("ds", edit_json("metadata.json", updated(fingerprint="0" * 64)))),
    Case("format_version_edited", ("inspect", DS_COPY),
         (DS_COPY + "/metadata.json, field 'format_version': format_version 9 is not 1",),
         build=copy_of("ds", edit_json("metadata.json", updated(format_version=9)))),
    Case("tokenizer_replaced", ("inspect", DS_COPY),
         (DS_COPY + "/tokenizer.model, field 'tokenizer_fingerprint'",),
         build=swap_tokenizer),
    Case("tokenizer_missing", ("inspect", DS_COPY),
         (DS_COPY + ": prepared dataset has no tokenizer file",),
         build=copy_of("ds", remove("tokenizer.model"))),
    Case("no_such_split", ("inspect", "{ds}", "--split", "test"),
         ("{ds}: no split 'test'; have train, validation",)),
]

ST_COPY = "{tmp}/store"
VERIFY = ("teacher", "verify", ST_COPY, "{ds}")
TRAIN_SAD = ("train", "--config", "{repo}/sad_jax/configs/train_sad.py", "--workdir", "{tmp}/work",
             "--config.dataset={ds}")
IMPORT = ("teacher", "import", "--dataset", "{ds}", "--out", "{tmp}/imported", "--k", str(K),
          "--teacher-name", "t", "--teacher-vocab-size", "1000")
STORES = [
    Case("truncated_shard", VERIFY, (f"{ST_COPY}/{SHARD}, field 'sha256': checksum mismatch",),
         build=copy_of("store", truncate(SHARD, 0.6))),
    Case("flipped_byte_shard", VERIFY, (f"{ST_COPY}/{SHARD}, field 'sha256': checksum mismatch",),
         build=copy_of("store", flip(SHARD, 300))),
    Case("missing_shard", VERIFY, (f"{ST_COPY}/{SHARD}: shard is missing",),
         build=copy_of("store", remove(SHARD))),
    Case("wrong_dataset_fingerprint", VERIFY,
         (ST_COPY + "/manifest.json, field 'dataset_fingerprint'",),
         build=copy_of("store", edit_json("manifest.json", updated(dataset_fingerprint="0" * 64)))),
    Case("wrong_k", VERIFY, (f"{ST_COPY}/{SHARD}, record 1, field 'k'", "k is 4, manifest says 8"),
         build=copy_of("store", edit_json("manifest.json", updated(k=8)))),
    Case("nan_logprobs", VERIFY,
         (f"{ST_COPY}/{SHARD}, record 1, field 'logp'", "non-finite log-prob"),
         build=copy_of("store", rewrite_store_records(nan_logp))),
    Case("vocab_mismatch", VERIFY,
         (ST_COPY + "/manifest.json, field 'vocab_size'", "is not the dataset tokenizer's"),
         build=copy_of("store", edit_json("manifest.json", updated(vocab_size=32000)))),
    Case("teacher_vocab_smaller", VERIFY,
         (ST_COPY + "/manifest.json, field 'teacher_vocab_size'", "vocabularies differ"),
         build=copy_of("store", edit_json("manifest.json", updated(teacher_vocab_size=100)))),
    Case("manifest_not_json", VERIFY, (ST_COPY + "/manifest.json: cannot read the manifest",),
         build=copy_of("store", truncate("manifest.json", 0.5))),
    Case("manifest_not_object", VERIFY,
         (ST_COPY + "/manifest.json: manifest must be a JSON object, got list",),
         build=copy_of("store", edit_json("manifest.json", lambda m: [m]))),
    Case("manifest_unknown_span_kind", VERIFY,
         (ST_COPY + "/manifest.json, field 'span_kinds': unknown span kind 'thought'",),
         build=copy_of("store", edit_json("manifest.json", updated(span_kinds=["thought"])))),
    Case("manifest_shard_without_ids", VERIFY,
         (ST_COPY + "/manifest.json, field 'shards[0].ids'",),
         build=copy_of("store", edit_json("manifest.json", drop_shard_ids))),
    Case("no_manifest", VERIFY, (ST_COPY + ": not a teacher store (no manifest.json",),
         build=copy_of("store", remove("manifest.json"))),
    Case("training_k_above_store", TRAIN_SAD + ("--config.teacher_store={store}",
                                                "--config.teacher.k=16"),
         ("{store}/manifest.json, field 'k': training asks for k=16 but the store holds k=4",),
         output="{tmp}/work"),
    Case("training_store_of_another_dataset", TRAIN_SAD + (f"--config.teacher_store={ST_COPY}",),
         (ST_COPY + "/manifest.json, field 'dataset_fingerprint'", "recompute it"),
         build=copy_of("store", edit_json("manifest.json", updated(dataset_fingerprint="0" * 64))),
         output="{tmp}/work"),
    Case("import_malformed_line", IMPORT + ("{bad}/teacher_files/logprobs_malformed.jsonl",),
         ("{bad}/teacher_files/logprobs_malformed.jsonl, record 1: malformed JSON",),
         output="{tmp}/imported"),
    Case("import_unknown_id", IMPORT + ("{bad}/teacher_files/logprobs_unknown_id.jsonl",),
         ("logprobs_unknown_id.jsonl, record 1, field 'id': id 'not-in-the-dataset'",),
         output="{tmp}/imported"),
    Case("import_tokens_differ", IMPORT + ("{tmp}/lp.jsonl",),
         ("{tmp}/lp.jsonl, record 2, field 'prompt_token_ids'", "at position 3"),
         build=server_tokens_differ, output="{tmp}/imported"),
    Case("import_teacher_vocab_smaller",
         IMPORT[:-1] + ("10", "{logprobs}"),
         ("field 'teacher_vocab_size': teacher vocabulary 10 is smaller",),
         output="{tmp}/imported"),
    Case("precompute_teacher_vocab_smaller",
         ("teacher", "precompute", "--config", "{repo}/sad_jax/configs/teacher_precompute.py",
          "--config.dataset={ds}", "--config.teacher={small_hf}", "--config.out={tmp}/out",
          "--quiet"),
         ("{small_hf}, field 'vocab_size': teacher vocabulary 64 is smaller",),
         output="{tmp}/out"),
]

HF_COPY = "{tmp}/hf"
# `eval` loads the model (and checks its tokenizer) before it starts any environment.
EVAL = ("eval", "--tokenizer", "{tok}", "--env", "twx:coin", "--quiet", "--json",
        "{tmp}/result.json", "--checkpoint")
UP = "model.layers.0.mlp.up_proj.weight"
K_PROJ = "model.layers.0.self_attn.k_proj.weight"
CKPT = "{bad}/checkpoint_dirs/"
CHECKPOINTS = [
    Case("config_missing", EVAL + (HF_COPY,),
         (HF_COPY + "/config.json: cannot read model config: No such file",),
         build=copy_of("hf", remove("config.json")), output="{tmp}/result.json"),
    Case("config_not_json", EVAL + (CKPT + "config_not_json",),
         (CKPT + "config_not_json/config.json: malformed JSON",), output="{tmp}/result.json"),
    Case("config_not_object", EVAL + (CKPT + "config_not_object",),
         (CKPT + "config_not_object/config.json: expected a JSON object, got list",),
         output="{tmp}/result.json"),
    Case("unsupported_model_type", EVAL + (CKPT + "unsupported_model_type",),
         (CKPT + "unsupported_model_type/config.json, field 'model_type': unsupported "
          "model_type 'gpt2'",), output="{tmp}/result.json"),
    Case("mixture_of_experts", EVAL + (CKPT + "mixture_of_experts",),
         (CKPT + "mixture_of_experts/config.json, field 'num_local_experts'",),
         output="{tmp}/result.json"),
    Case("config_missing_vocab_size", EVAL + (CKPT + "config_missing_vocab_size",),
         (CKPT + "config_missing_vocab_size/config.json, field 'vocab_size': missing field",),
         output="{tmp}/result.json"),
    Case("config_size_not_int", EVAL + (CKPT + "config_size_not_int",),
         (CKPT + "config_size_not_int/config.json, field 'hidden_size': expected an integer",),
         output="{tmp}/result.json"),
    Case("safetensors_truncated", EVAL + (HF_COPY,),
         (HF_COPY + "/model.safetensors, field '", "truncated file?"),
         build=copy_of("hf", truncate("model.safetensors", 0.7)), output="{tmp}/result.json"),
    Case("safetensors_header_cut", EVAL + (HF_COPY,),
         (HF_COPY + "/model.safetensors: truncated safetensors file (no header)",),
         build=copy_of("hf", write("model.safetensors", b"\x10\x00\x00")),
         output="{tmp}/result.json"),
    Case("safetensors_header_not_json", EVAL + (HF_COPY,),
         (HF_COPY + "/model.safetensors: malformed safetensors header",),
         build=copy_of("hf", write("model.safetensors", b"\x08\x00\x00\x00\x00\x00\x00\x00{oops!}}")),
         output="{tmp}/result.json"),
    Case("safetensors_entry_malformed", EVAL + (HF_COPY,),
         (HF_COPY + "/model.safetensors, field 'model.norm.weight': malformed entry",),
         build=copy_of("hf", safetensors_header(
             lambda h: h["model.norm.weight"].update(shape="16"))),
         output="{tmp}/result.json"),
    Case("safetensors_unsupported_dtype", EVAL + (HF_COPY,),
         (HF_COPY + "/model.safetensors, field 'model.norm.weight': unsupported dtype 'C64'",),
         build=copy_of("hf", safetensors_header(
             lambda h: h["model.norm.weight"].update(dtype="C64"))),
         output="{tmp}/result.json"),
    Case("tensor_wrong_shape", EVAL + (HF_COPY,),
         (HF_COPY + f"/model.safetensors, field '{UP}': shape (32, 15) does not match the "
          "config's (32, 16)",),
         build=copy_of("hf", safetensors_edit(narrower(UP))), output="{tmp}/result.json"),
    Case("tensor_missing", EVAL + (HF_COPY,),
         (HF_COPY + f", field '{K_PROJ}': missing 1 tensor(s)",),
         build=copy_of("hf", safetensors_edit(without(K_PROJ))), output="{tmp}/result.json"),
    Case("tensor_unexpected", EVAL + (HF_COPY,),
         (HF_COPY + "/model.safetensors, field 'model.layers.3.mlp.up_proj.weight': unexpected "
          "tensor for a llama model of 1 layers",),
         build=copy_of("hf", safetensors_edit(with_copy("model.layers.3.mlp.up_proj.weight", UP))),
         output="{tmp}/result.json"),
    Case("no_weights", EVAL + (HF_COPY,),
         (HF_COPY + ": no model.safetensors or model.safetensors.index.json",),
         build=copy_of("hf", remove("model.safetensors")), output="{tmp}/result.json"),
    Case("shard_index_malformed", EVAL + (HF_COPY,),
         (HF_COPY + "/model.safetensors.index.json, field 'weight_map'",),
         build=copy_of("hf", write("model.safetensors.index.json", '{"weight_map": ["a"]}')),
         output="{tmp}/result.json"),
    Case("shard_index_names_missing_file", EVAL + (HF_COPY,),
         (HF_COPY + "/model-00001-of-00002.safetensors: cannot read: No such file",),
         build=copy_of("hf", write("model.safetensors.index.json", json.dumps(
             {"weight_map": {UP: "model-00001-of-00002.safetensors"}}))),
         output="{tmp}/result.json"),
    Case("teacher_for_verify_unsupported", ("teacher", "verify", "{store}", "{ds}", "--teacher",
                                            CKPT + "unsupported_model_type"),
         (CKPT + "unsupported_model_type/config.json, field 'model_type'",)),
]

FAMILIES = {"trajectories": TRAJECTORIES, "configs": CONFIGS, "tokenizers": TOKENIZERS,
            "datasets": DATASETS, "stores": STORES, "checkpoints": CHECKPOINTS}
CASES = [pytest.param(c, id=f"{family}/{c.id}") for family, cases in FAMILIES.items()
         for c in cases]


# ----------------------------------------------------------------------------- artifacts


def fake_prompt_logprobs(dataset: str, path: str) -> None:
  """Server-style prompt log-probs for every example (normalised, K per reason target)."""
  builder, tok, _ = prepare.load_prepared(dataset)
  lps = np.log([0.5, 0.2, 0.1, 0.05])
  lines = []
  for split in builder.info.splits:
    for ex in builder.as_data_source(split):
      ids = np.asarray(ex["ids"])
      entries: list = [None] * len(ids)
      for t in pc.target_positions(np.asarray(ex["kinds"]), [int(SpanKind.REASON)]):
        entries[t + 1] = {str((int(ids[t + 1]) + j) % tok.vocab_size): float(lp)
                          for j, lp in enumerate(lps)}
      lines.append({"id": ex["id"].decode(), "prompt_token_ids": ids.tolist(),
                    "prompt_logprobs": entries})
  helpers.write_jsonl(path, lines)


def tiny_llama(vocab: int, seed: int = 0):
  import jax

  from sad_jax.models import transformer as T
  from sad_jax.models.config import ModelConfig

  cfg = ModelConfig(model_type="llama", vocab_size=vocab, hidden_size=16, intermediate_size=32,
                    num_layers=1, num_heads=2, num_kv_heads=1, head_dim=8)
  return cfg, T.init_params(cfg, jax.random.PRNGKey(seed))


@pytest.fixture(scope="module")
def arts(tmp_path_factory, spm_path, hf_dir) -> dict[str, str]:
  """The good artifacts the cases damage copies of: a prepared dataset, a teacher store for
  it (imported from made-up server log-probs: no teacher compile), HF checkpoints."""
  from sad_jax.data.tokenizer import train_sentencepiece
  from sad_jax.models import hf

  root = tmp_path_factory.mktemp("good")
  schema.write_jsonl(root / "t.jsonl", helpers.synthetic_trajectories(12, seed=11))
  ds = str(root / "ds")
  prepare.prepare(make_config([str(root / "t.jsonl")], tokenizer__path=spm_path, max_len=256),
                  ds, progress=False)
  tok = prepare.load_prepared(ds)[1]
  logprobs = str(root / "lp.jsonl")
  fake_prompt_logprobs(ds, logprobs)
  store = str(root / "store")
  verify_lib.import_prompt_logprobs(logprobs, dataset_dir=ds, out_dir=store, k=K,
                                    teacher_name="fake", teacher_vocab_size=1000)
  hf.save(*tiny_llama(tok.vocab_size), str(root / "hf"))
  hf.save(*tiny_llama(64), str(root / "small_hf"))
  os.makedirs(root / "tok")
  shutil.copyfile(spm_path, root / "tok" / "tokenizer.model")
  # another tokenizer (trained on other text) to swap into a dataset
  train_sentencepiece(["a different tokenizer"] * 20, vocab_size=290,
                      out_path=str(root / "tok_small.model"))
  return {"ds": ds, "store": store, "hf": str(root / "hf"), "small_hf": str(root / "small_hf"),
          "tok": spm_path, "tok_dir": str(root / "tok"), "tok_small": str(root / "tok_small.model"),
          "hf_tok": hf_dir, "logprobs": logprobs}


def test_good_artifacts_are_accepted(arts, capsys):
  """The inputs the cases damage are good: the same commands succeed on them."""
  from sad_jax.models.checkpoint_io import load_model

  assert cli.main(["inspect", arts["ds"], "--index", "2"]) == 0
  assert cli.main(["teacher", "verify", arts["store"], arts["ds"]]) == 0
  assert "ok: 12 examples" in capsys.readouterr().out
  cfg, _ = load_model(arts["hf"])
  assert cfg.vocab_size == prepare.load_prepared(arts["ds"])[1].vocab_size
  assert cli.main(["inspect", f"{BAD}/trajectories/duplicate_id_a.jsonl", "--tokenizer",
                   arts["hf_tok"]]) == 0


# ----------------------------------------------------------------------------- the test


def _leftovers(folder: str) -> list[str]:
  return [os.path.join(root, n) for root, dirs, files in os.walk(folder)
          for n in dirs + files if n.endswith(".tmp") or ".tmp." in n]


@pytest.mark.parametrize("case", CASES)
def test_bad_input(case: Case, arts, tmp_path, capsys):
  tmp = str(tmp_path)
  ctx = {**arts, "bad": BAD, "repo": REPO, "tmp": tmp}
  if case.build is not None:
    case.build(arts, tmp)
  inputs_before = set(_leftovers(tmp))
  argv = [a.format(**ctx) for a in case.argv]
  rc = cli.main(argv)  # an escaping exception fails the test with its traceback
  out, err = capsys.readouterr()
  print(f"{case.id}: {err.strip()}")
  assert rc != 0, f"accepted: {argv}\n{out}"
  assert err.startswith("sad-jax: error: "), err
  for want in case.expect:
    assert want.format(**ctx) in err, f"{want.format(**ctx)!r} not in {err!r}"
  assert "Traceback" not in out + err
  if case.output is not None:
    output = case.output.format(**ctx)
    assert not os.path.exists(output), f"partial output {output}"
    base = os.path.basename(output)
    beside = [n for n in os.listdir(os.path.dirname(output)) if n.startswith(f".{base}.")]
    assert not beside, f"temporaries left beside {output}: {beside}"
  assert set(_leftovers(tmp)) == inputs_before


def test_training_reader_refuses_what_verify_refuses(arts, tmp_path):
  """The store reader behind training checks each record as verify does (k, ids, finite
  log-probs), so a bad store stops training with a located error, not a NaN loss."""
  copy_of("store", rewrite_store_records(nan_logp))(arts, str(tmp_path))
  st = store_lib.TeacherStore(tmp_path / "store")
  first = st.manifest.shards[0]["ids"][0]
  with pytest.raises(DataError, match="non-finite log-prob") as e:
    st.get(first)
  assert e.value.path.endswith(SHARD) and e.value.record == 1 and e.value.field == "logp"


def test_corpus_is_listed():
  """Every file under tests/data/bad/ is used by a case and every case is in its README."""
  text = " ".join(" ".join(c.values[0].argv) for c in CASES)
  readme = open(os.path.join(BAD, "README.md"), encoding="utf-8").read()
  for root, _, files in os.walk(BAD):
    for n in files:
      rel = os.path.relpath(os.path.join(root, n), BAD)
      if rel == "README.md":
        continue
      used = os.path.dirname(rel) if rel.count("/") == 2 else rel  # a folder input
      assert "{bad}/" + used in text, f"{rel} is used by no case"
  for c in CASES:
    assert f"`{c.values[0].id}`" in readme, f"{c.id} missing from tests/data/bad/README.md"
  assert len(CASES) >= 30
