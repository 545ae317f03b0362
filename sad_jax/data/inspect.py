"""`sad-jax inspect`: one trajectory with its span kinds visible, and token counts per kind.

Colours on a terminal; `[kind]…[/kind]` markers otherwise (or with --color never).
"""

from __future__ import annotations

import collections

import numpy as np

from sad_jax.common import fileio
from sad_jax.common.errors import DataError
from sad_jax.common.types import SUPERVISED_KINDS, SpanKind
from sad_jax.data import importers, prepare, render, segment, tfds_builder
from sad_jax.data.tokenizer import load_tokenizer

COLOURS = {
    SpanKind.PAD: "2", SpanKind.SYSTEM: "90", SpanKind.TASK: "36", SpanKind.REASON: "33",
    SpanKind.ACTION: "32", SpanKind.OBSERVATION: "34", SpanKind.ANSWER: "35",
}


def runs(kinds: np.ndarray) -> list[tuple[int, int, int]]:
  """Maximal runs (start, end, kind) of equal kinds."""
  if len(kinds) == 0:
    return []
  cut = np.flatnonzero(kinds[1:] != kinds[:-1]) + 1
  starts = np.concatenate([[0], cut])
  ends = np.concatenate([cut, [len(kinds)]])
  return [(int(s), int(e), int(kinds[s])) for s, e in zip(starts, ends)]


def paint(pieces: list[tuple[str, int]], *, colour: bool) -> str:
  out = []
  for text, kind in pieces:
    k = SpanKind(kind)
    if colour:
      out.append(f"\x1b[{COLOURS[k]}m{text}\x1b[0m")
    else:
      out.append(f"[{k.name.lower()}]{text}[/{k.name.lower()}]")
  return "".join(out)


def legend(*, colour: bool) -> str:
  names = [k for k in SpanKind if k != SpanKind.PAD]
  return "kinds: " + " ".join(paint([(k.name.lower(), k)], colour=colour) if colour
                              else k.name.lower() for k in names) + \
      "   (supervised: " + ", ".join(k.name.lower() for k in sorted(SUPERVISED_KINDS)) + ")"


def counts_line(kinds: np.ndarray) -> str:
  c = collections.Counter(SpanKind(int(k)).name.lower() for k in kinds)
  sup = int(segment.is_supervised(kinds[1:]).sum()) if len(kinds) else 0
  return ("tokens: " + ", ".join(f"{k}={v}" for k, v in sorted(c.items()))
          + f", total={len(kinds)}, loss positions={sup}")


def inspect_prepared(path: str, *, index: int, split: str, colour: bool) -> str:
  builder, tok, _ = prepare.load_prepared(path)
  if split not in builder.info.splits:
    raise DataError(f"no split {split!r}; have {', '.join(builder.info.splits)}", path=path)
  src = tfds_builder.DataSource(builder, split)
  if not 0 <= index < len(src):
    raise DataError(f"index {index} out of range (split {split!r} has {len(src)})", path=path)
  ex = src[index]
  ids, kinds = np.asarray(ex["ids"]), np.asarray(ex["kinds"])
  pieces = [(tok.decode(ids[s:e]), k) for s, e, k in runs(kinds)]
  stats = tfds_builder.named_stats(ex)
  source = ex["source"].decode() if isinstance(ex["source"], bytes) else ex["source"]
  header = (f"{path} [{split}] #{index}  id={tfds_builder.example_id(ex)}  source={source}  "
            + " ".join(f"{k}={stats[k]}" for k in ("steps", "tool_calls", "success",
                                                   "truncated")))
  return "\n".join([header, legend(colour=colour), paint(pieces, colour=colour),
                    counts_line(kinds)])


def inspect_jsonl(path: str, *, index: int, fmt: str, tokenizer: str | None,
                  colour: bool) -> str:
  trajs = importers.import_file(path, fmt=fmt)
  if not 0 <= index < len(trajs):
    raise DataError(f"index {index} out of range ({len(trajs)} trajectories)", path=path)
  traj = trajs[index]
  rendered = render.render_react(traj)
  ends = list(rendered.starts[1:]) + [len(rendered.text)]
  pieces = [(rendered.text[s:e], int(k)) for s, e, k in zip(rendered.starts, ends,
                                                             rendered.kinds)]
  header = (f"{path} #{index}  id={traj.id}  source={traj.source}  success={traj.success}  "
            f"segments={len(traj.segments)}")
  lines = [header, legend(colour=colour), paint(pieces, colour=colour)]
  if tokenizer:
    # the same tokenization as `prepare` with the default ReAct template
    tok = load_tokenizer(tokenizer)
    enc = segment.encode_rendered(tok, [rendered], parse_special=False)[0]
    spans = segment.token_kinds(rendered, enc, bos_id=tok.bos_id, eos_id=tok.eos_id)
    lines.append(counts_line(spans.kinds))
  else:
    c = collections.Counter(s.kind for s in traj.segments)
    lines.append("segments: " + ", ".join(f"{k}={v}" for k, v in sorted(c.items()))
                 + "  (pass --tokenizer for token counts)")
  return "\n".join(lines)


def inspect(path: str, *, index: int = 0, split: str = "train", fmt: str = "auto",
            tokenizer: str | None = None, colour: bool = False) -> str:
  if fileio.isdir(path):
    return inspect_prepared(path, index=index, split=split, colour=colour)
  if not fileio.exists(path):
    raise DataError("no such file or dataset folder", path=path)
  return inspect_jsonl(path, index=index, fmt=fmt, tokenizer=tokenizer, colour=colour)
