"""`sad-jax prepare`: trajectories → a tokenized, segmented TFDS/ArrayRecord dataset.

Output folder (written under a temporary name, renamed when complete):
  dataset_info.json, features.json, metadata.json   TFDS metadata (fingerprint inside)
  trajectory_dataset-{train,validation}.array_record-*   one record per trajectory
  tokenizer.model | tokenizer.json (+ tokenizer_config.json)   the tokenizer used
  prepare_report.json                               counts, drops, skips, fingerprint
  template.json                                     the template, in full (eval, export)
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import os
import re
import shutil
import types
from typing import Any

import numpy as np

from sad_jax.common import fileio
from sad_jax.common.errors import DataError, SkipReport
from sad_jax.common.fileio import atomic_dir
from sad_jax.common.types import SpanKind
from sad_jax.data import importers, render, segment, tfds_builder
from sad_jax.data.schema import Trajectory
from sad_jax.data.tokenizer import (
  HFTokenizer,
  SentencePieceTokenizer,
  Tokenizer,
  load_tokenizer,
  train_sentencepiece,
)

LENGTH_POLICIES = ("truncate", "drop")
# Actions that end the episode rather than call a tool (ReAct, CodeAgent, JSON tool call).
_TERMINAL_ACTION_RE = re.compile(
    r'^\s*(finish\[|final_answer\(|\{"arguments": .*"name": "final_answer")', re.I)


def split_of(example_id: str, val_fraction: float) -> str:
  """Deterministic split by a hash of the id (stable across runs, machines and order)."""
  h = int.from_bytes(hashlib.sha256(example_id.encode()).digest()[:8], "big")
  return "validation" if (h % 1_000_000) < val_fraction * 1_000_000 else "train"


def resolve_template(config, tok: Tokenizer) -> render.ChatTemplate | None:
  """config.template: 'react', 'tokenizer' (its chat template), or a file path."""
  name = config.template
  if name == "react":
    return None
  if name == "tokenizer":
    if not tok.chat_template:
      raise DataError("template='tokenizer' but the tokenizer has no chat_template",
                      path=tok.path, field="chat_template")
    source = tok.chat_template
  else:
    try:
      text = fileio.read_text(name)
    except OSError as e:
      raise DataError(f"cannot read chat template: {e.strerror or e}", path=name) from None
    if name.endswith(".json"):  # a tokenizer_config.json
      try:
        source = json.loads(text)["chat_template"]
      except (ValueError, KeyError, TypeError):
        raise DataError("no chat_template in this file", path=name,
                        field="chat_template") from None
    else:
      source = text
  if isinstance(source, list):  # newer configs: [{name, template}, …]
    source = next((t["template"] for t in source if t.get("name") == "default"),
                  source[0]["template"])
  return render.ChatTemplate(source=source, bos_token=tok.bos_token, eos_token=tok.eos_token,
                             observation_role=config.observation_role)


def features(traj: Trajectory, spans: segment.TokenSpans) -> dict[str, int]:
  """Complexity features of the (possibly truncated) example."""
  per_kind = np.bincount(spans.kinds, minlength=len(SpanKind))
  last = int(spans.segment.max(initial=-1))  # truncation keeps a prefix of segments
  actions = [s for s in traj.segments[: last + 1] if s.kind in ("action", "answer")]
  return {
      "steps": len(actions),
      "tool_calls": sum(s.kind == "action" and not _TERMINAL_ACTION_RE.match(s.text)
                        for s in actions),
      "tokens": len(spans.kinds),
      "observation_tokens": int(per_kind[SpanKind.OBSERVATION]),
      "reason_tokens": int(per_kind[SpanKind.REASON]),
      "action_tokens": int(per_kind[SpanKind.ACTION] + per_kind[SpanKind.ANSWER]),
  }


@dataclasses.dataclass
class Report:
  fingerprint: str = ""
  imported: int = 0
  written: dict[str, int] = dataclasses.field(default_factory=dict)
  truncated: int = 0
  dropped: list[str] = dataclasses.field(default_factory=list)
  skipped: int = 0
  skip_reasons: list[str] = dataclasses.field(default_factory=list)
  segments: dict[str, int] = dataclasses.field(default_factory=dict)
  tokens: dict[str, int] = dataclasses.field(default_factory=dict)
  max_len: int = 0

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  def summary(self) -> str:
    lines = [
        f"imported {self.imported} trajectories; written "
        + ", ".join(f"{k}={v}" for k, v in self.written.items()),
        "segments: " + ", ".join(f"{k}={v}" for k, v in self.segments.items()),
        "tokens: " + ", ".join(f"{k}={v}" for k, v in self.tokens.items()),
        f"over max_len={self.max_len}: truncated at a step boundary {self.truncated}, "
        f"dropped {len(self.dropped)}" + (f" (e.g. {', '.join(self.dropped[:3])})"
                                          if self.dropped else ""),
        f"skipped {self.skipped} bad records",
        *[f"  - {r}" for r in self.skip_reasons],
        f"fingerprint {self.fingerprint}",
    ]
    return "\n".join(lines)


def dataset_fingerprint(*, tok: Tokenizer, template: render.ChatTemplate | None,
                        options: dict[str, Any], examples: list[dict]) -> str:
  """Hash of what training and the teacher store depend on: the tokenizer, the template,
  the options and every example's id, tokens and span kinds (not its source name)."""
  h = hashlib.sha256()
  h.update(f"tokenizer={tok.fingerprint}\n".encode())
  h.update(f"template={render.template_fingerprint(template)}\n".encode())
  h.update(json.dumps(options, sort_keys=True).encode() + b"\n")
  for ex in sorted(examples, key=lambda e: e["id"]):
    h.update(ex["id"].encode() + b"\0")
    h.update(ex["ids"].astype("<i4").tobytes())
    h.update(ex["kinds"].astype("i1").tobytes())
  return h.hexdigest()


def tokenize_trajectories(trajectories: list[Trajectory], *, tok: Tokenizer,
                          template: render.ChatTemplate | None, add_bos: bool, add_eos: bool,
                          skips: SkipReport | None = None, batch_size: int = 256,
                          progress=None):
  """Yields (trajectory, TokenSpans) in input order.

  With a chat template, BOS/EOS come from the template (as the model's own
  apply_chat_template writes them), so add_bos/add_eos apply to the ReAct template only.
  A trajectory the template cannot render is an error naming it (or a counted skip).
  """
  skips = skips or SkipReport()
  bos = tok.bos_id if add_bos and template is None else None
  eos = tok.eos_id if add_eos and template is None else None
  for lo in range(0, len(trajectories), batch_size):
    chunk, rendered = [], []
    for t in trajectories[lo: lo + batch_size]:
      try:
        rendered.append(render.render(t, template=template))
        chunk.append(t)
      except DataError as e:
        skips.handle(DataError(f"trajectory {t.id}: {e.message}", path=t.source or None,
                               field=e.field))
    encs = segment.encode_rendered(tok, rendered, parse_special=template is not None)
    for t, r, e in zip(chunk, rendered, encs):
      yield t, segment.token_kinds(r, e, bos_id=bos, eos_id=eos)
    if progress is not None:
      progress.update(len(trajectories[lo: lo + batch_size]))


def prepare(config, out_dir: str, *, progress: bool = True) -> Report:
  """Runs the whole preparation; the output folder appears only when complete."""
  from tqdm.auto import tqdm

  if config.length_policy not in LENGTH_POLICIES:
    raise DataError(f"length_policy must be one of {LENGTH_POLICIES}",
                    field="config.length_policy")
  if not 0.0 <= config.val_fraction < 1.0:
    raise DataError("val_fraction must be in [0, 1)", field="config.val_fraction")
  if config.on_error not in ("raise", "skip"):
    raise DataError("on_error must be raise or skip", field="config.on_error")
  if not config.inputs or not all(config.inputs):
    raise DataError("required: the trajectory files (--config.inputs='(\"a.jsonl\",)')",
                    field="config.inputs")
  if not config.tokenizer.path and config.tokenizer.model_type not in ("bpe", "unigram"):
    raise DataError("model_type must be bpe or unigram", field="config.tokenizer.model_type")
  skips = SkipReport(on_error=config.on_error)
  trajectories: list[Trajectory] = []
  origin: dict[str, str] = {}  # id → the input it came from, to name both of a duplicate
  for path in config.inputs:
    for t in importers.import_file(path, fmt=config.format, skips=skips):
      if t.id in origin:
        raise DataError(f"duplicate trajectory ids across inputs: {t.id!r} is also in "
                        f"{origin[t.id]}", path=path, field="id")
      origin[t.id] = path
      trajectories.append(t)
  if not trajectories:
    raise DataError("no trajectories to prepare", field="config.inputs",
                    path=config.inputs[0] if len(config.inputs) == 1 else None)

  report = Report(imported=len(trajectories), skipped=skips.count,
                  skip_reasons=list(skips.reasons), max_len=config.max_len)
  report.segments = dict(sorted(collections.Counter(
      s.kind for t in trajectories for s in t.segments).items()))

  with atomic_dir(out_dir) as tmp:
    cfg_tok = config.tokenizer
    if not cfg_tok.path:
      # Train into the output itself: the tokenizer ships with the dataset.
      try:
        tok = train_sentencepiece([render.render_react(t).text for t in trajectories],
                                  vocab_size=cfg_tok.vocab_size, model_type=cfg_tok.model_type,
                                  split_by_whitespace=cfg_tok.get("split_by_whitespace", True),
                                  max_piece_length=cfg_tok.get("max_piece_length", 16),
                                  out_path=os.path.join(tmp, "tokenizer.model"))
      except DataError as e:  # it names our temporary folder: name the setting instead
        raise DataError(e.message, field="config.tokenizer.vocab_size") from None
    else:
      tok = load_tokenizer(cfg_tok.path)
      _copy_tokenizer(tok, tmp)
    template = resolve_template(config, tok)
    options = {"add_bos": config.add_bos, "add_eos": config.add_eos, "max_len": config.max_len,
               "length_policy": config.length_policy, "val_fraction": config.val_fraction}
    splits: dict[str, list[dict]] = {"train": [], "validation": []}
    token_counts = np.zeros(len(SpanKind), np.int64)
    bar = tqdm(total=len(trajectories), desc="tokenize", unit="traj", disable=not progress,
               leave=False)
    for traj, spans in tokenize_trajectories(trajectories, tok=tok, template=template,
                                             add_bos=config.add_bos, add_eos=config.add_eos,
                                             skips=skips, progress=bar):
      truncated = 0
      if len(spans.ids) > config.max_len:
        keep = (segment.truncate_at_step(spans.kinds, config.max_len)
                if config.length_policy == "truncate" else None)
        if keep is None:
          report.dropped.append(traj.id)
          continue
        spans = segment.TokenSpans(spans.ids[:keep], spans.kinds[:keep], spans.segment[:keep])
        truncated = 1
        report.truncated += 1
      stats = {**features(traj, spans), "truncated": truncated,
               "success": -1 if traj.success is None else int(traj.success)}
      ex = {"id": traj.id, "source": traj.source, "ids": spans.ids, "kinds": spans.kinds,
            "stats": np.array([stats[k] for k in tfds_builder.STATS_FIELDS], np.int32)}
      token_counts += np.bincount(spans.kinds, minlength=len(SpanKind))
      split_key = traj.meta.get("duplicate_of", traj.id)  # copies stay together
      splits[split_of(split_key, config.val_fraction)].append(ex)
    bar.close()
    report.skipped, report.skip_reasons = skips.count, list(skips.reasons)
    splits = {k: v for k, v in splits.items() if v}
    if not splits:
      raise DataError("every trajectory was dropped or skipped: nothing to write",
                      field="config.inputs")
    report.fingerprint = dataset_fingerprint(tok=tok, template=template, options=options,
                                             examples=[e for v in splits.values() for e in v])
    report.written = {k: len(v) for k, v in splits.items()}
    report.tokens = {SpanKind(k).name.lower(): int(n) for k, n in enumerate(token_counts) if n}

    metadata = {"format_version": tfds_builder.FORMAT_VERSION,
                "fingerprint": report.fingerprint,
                "tokenizer_fingerprint": tok.fingerprint, "tokenizer_kind": tok.kind,
                "template": render.template_fingerprint(template),
                "vocab_size": tok.vocab_size, **options}
    build_dir = os.path.join(tmp, "_tfds")
    ds_dir = tfds_builder.build(data_dir=build_dir, splits=splits, metadata=metadata,
                                description="sad_jax prepared trajectories")
    for name in os.listdir(ds_dir):
      os.replace(os.path.join(ds_dir, name), os.path.join(tmp, name))
    shutil.rmtree(build_dir)
    fileio.json_dump(os.path.join(tmp, "prepare_report.json"), report.to_dict(), indent=1)
    write_template(os.path.join(tmp, TEMPLATE_FILE), template)
  return report


TEMPLATE_FILE = "template.json"


def write_template(path: str | os.PathLike, template: render.ChatTemplate | None) -> None:
  """The template a dataset was rendered with, in full: evaluation and export render
  prompts with it (the metadata holds only its fingerprint)."""
  record: dict = {"template": render.template_fingerprint(template)}
  if template is not None:
    record.update(dataclasses.asdict(template))
  fileio.json_dump(path, record, indent=1)


def load_template(folder: str | os.PathLike, tok: Tokenizer | None = None
                  ) -> render.ChatTemplate | None:
  """The template of a prepared dataset or a model folder that carries its record
  (`template.json`); None means the ReAct template. A dataset prepared before the record
  existed is matched by fingerprint against the ReAct template or its tokenizer's own chat
  template; another template cannot be recovered (an error naming the dataset)."""
  folder = os.fspath(folder)
  path = fileio.join(folder, TEMPLATE_FILE)
  if fileio.exists(path):
    try:
      record = json.loads(fileio.read_text(path))
      want = record.pop("template")
      template = None if want == "react-v1" else render.ChatTemplate(**record)
    except (OSError, ValueError, KeyError, TypeError) as e:
      raise DataError(f"cannot read the template record: {e}", path=path,
                      field="template") from None
    if render.template_fingerprint(template) != want:
      raise DataError(f"the template does not match its fingerprint {want[:17]}…", path=path,
                      field="template")
    return template
  meta_path = fileio.join(folder, "metadata.json")
  try:
    want = json.loads(fileio.read_text(meta_path))["template"]
  except (OSError, ValueError, KeyError, TypeError):
    raise DataError(f"no {TEMPLATE_FILE} and no template in metadata.json: not a prepared "
                    "dataset or model folder", path=folder, field="template") from None
  if want == "react-v1":
    return None
  if tok is not None and tok.chat_template:
    for role in ("user", "tool"):
      cand = resolve_template(types.SimpleNamespace(template="tokenizer", observation_role=role),
                              tok)
      if render.template_fingerprint(cand) == want:
        return cand
  raise DataError(f"the dataset was rendered with chat template {want[:17]}…, which is not "
                  f"its tokenizer's; prepare it again to record it in {TEMPLATE_FILE}",
                  path=meta_path, field="template")


def _copy_tokenizer(tok: Tokenizer, folder: str) -> None:
  if isinstance(tok, SentencePieceTokenizer):
    tok.save(os.path.join(folder, "tokenizer.model"))
  elif isinstance(tok, HFTokenizer):
    tok.save(os.path.join(folder, "tokenizer.json"))
    cfg = fileio.join(fileio.dirname(tok.path), "tokenizer_config.json")
    if fileio.exists(cfg):
      fileio.copyfile(cfg, os.path.join(folder, "tokenizer_config.json"))


def load_prepared(path: str | os.PathLike):
  """(builder, tokenizer, metadata) of a prepared dataset; checks the tokenizer fingerprint."""
  builder = tfds_builder.load_builder(path)
  meta = dict(builder.info.metadata)
  local = tfds_builder.metadata_dir(builder)  # `path`, or its staged small files
  _check_report(path, meta, local=local)
  name = next((n for n in ("tokenizer.model", "tokenizer.json")
               if fileio.exists(fileio.join(local, n))), None)
  if name is None:
    raise DataError("prepared dataset has no tokenizer file", path=path)
  tok = load_tokenizer(fileio.join(local, name))
  if local != os.fspath(path) and hasattr(tok, "path"):
    tok.path = fileio.join(path, name)  # read from the staged copy; named as the user's
  if tok.fingerprint != meta.get("tokenizer_fingerprint"):
    raise DataError("tokenizer does not match the dataset's tokenizer_fingerprint",
                    path=fileio.join(path, name), field="tokenizer_fingerprint")
  return builder, tok, meta


def _check_report(path: str | os.PathLike, meta: dict, *, local: str | None = None) -> None:
  """metadata.json's fingerprint must be the one prepare reported: training and the teacher
  store trust it, so an edited one would pair a dataset with the wrong store. `local`: a
  staged copy of the dataset's small files to read (errors name `path`)."""
  report_path = fileio.join(path, "prepare_report.json")
  read_path = fileio.join(local or path, "prepare_report.json")
  if not fileio.exists(read_path):
    return
  try:
    reported = json.loads(fileio.read_text(read_path)).get("fingerprint")
  except (OSError, ValueError, AttributeError) as e:
    raise DataError(f"cannot read the prepare report: {e}", path=report_path) from None
  if reported != meta.get("fingerprint"):
    raise DataError(f"fingerprint {str(meta.get('fingerprint'))[:12]}… differs from the "
                    f"{str(reported)[:12]}… that prepare reported: the dataset was edited "
                    "after prepare; prepare it again", path=fileio.join(path, "metadata.json"),
                    field="fingerprint")
