"""Segmentation: rendered text + token offsets → a span kind per token, labels, loss masks.

The straddle rule: a token takes the kind of the span that holds its first character.
(A zero-width byte-fallback piece sits at the start of the character it is part of.)

Loss convention: position t predicts token t+1, and is a loss position iff token t+1's
kind is supervised (reason, action, answer). So no observation, system, task or pad
token is ever a target.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from sad_jax.common.types import SUPERVISED_KINDS, SpanKind
from sad_jax.data.render import Rendered
from sad_jax.data.tokenizer import Encoding, Tokenizer

# Hard-boundary groups by kind: context 0, supervised 1, observation 2.
_GROUP = np.array([1 if k in SUPERVISED_KINDS else 2 if k == SpanKind.OBSERVATION else 0
                   for k in SpanKind], np.int8)
_IS_SUPERVISED = np.array([k in SUPERVISED_KINDS for k in SpanKind])


@dataclasses.dataclass(frozen=True)
class TokenSpans:
  ids: np.ndarray       # int32[n]
  kinds: np.ndarray     # int8[n] SpanKind per token
  segment: np.ndarray   # int32[n] trajectory segment index per token (-1: markup)


def token_kinds(rendered: Rendered, enc: Encoding, *, bos_id: int | None = None,
                eos_id: int | None = None) -> TokenSpans:
  """Kinds per token by the first-character rule. BOS is context; EOS takes the kind
  of the token before it (after a final action it teaches the student to stop)."""
  span = rendered.span_of_char(np.minimum(enc.starts, max(len(rendered.text) - 1, 0)))
  ids, kinds, seg = [enc.ids], [rendered.kinds[span]], [rendered.segment[span]]
  if bos_id is not None:
    first = kinds[0][0] if len(kinds[0]) else SpanKind.SYSTEM
    ids.insert(0, np.array([bos_id], np.int32))
    kinds.insert(0, np.array([SpanKind.SYSTEM if _IS_SUPERVISED[first] else first], np.int8))
    seg.insert(0, np.array([-1], np.int32))
  if eos_id is not None:
    last = kinds[-1][-1] if len(kinds[-1]) else SpanKind.SYSTEM
    ids.append(np.array([eos_id], np.int32))
    kinds.append(np.array([last], np.int8))
    seg.append(np.array([-1], np.int32))
  return TokenSpans(np.concatenate(ids).astype(np.int32), np.concatenate(kinds).astype(np.int8),
                    np.concatenate(seg).astype(np.int32))


def hard_boundaries(rendered: Rendered) -> np.ndarray:
  """Character positions no token may cross: where supervised text meets context and
  where observations start or end.

  That is how the agent loop builds the sequence at inference: generation starts at a
  token boundary after the prompt, and the environment's text is tokenized on its own.
  It also guarantees that every observation character lies in an observation token.
  """
  group = _GROUP[rendered.kinds]
  change = np.flatnonzero(group[1:] != group[:-1]) + 1
  return rendered.starts[change]


def markup_regions(rendered: Rendered) -> list[tuple[int, int]]:
  """Character ranges a chat template wrote: the only places special tokens may be."""
  return [(int(rendered.starts[j]), rendered.span_end(j))
          for j in np.flatnonzero(rendered.markup)]


def encode_rendered(tok: Tokenizer, rendered: list[Rendered], *,
                    parse_special: bool) -> list[Encoding]:
  """Encodes with no token across a hard boundary (unless the tokenizer adds a prefix
  per call: then the text is encoded whole and the first-character rule alone decides).
  With `parse_special`, special token strings become special ids only inside template
  markup, so a trajectory that contains "<|im_end|>" as text cannot inject one."""
  if not tok.chunk_safe:
    # A prefix added per piece would change the text at every cut: encode whole and,
    # for chat templates, parse special tokens everywhere (as such a tokenizer's own
    # slow implementation does).
    regions = [[(0, len(r.text))] for r in rendered] if parse_special else None
    return tok.encode_batch([r.text for r in rendered], special_regions=regions)
  cuts = [hard_boundaries(r) for r in rendered]
  regions = [markup_regions(r) for r in rendered] if parse_special else None
  return tok.encode_batch([r.text for r in rendered], cuts=cuts, special_regions=regions)


def is_supervised(kinds: np.ndarray) -> np.ndarray:
  return _IS_SUPERVISED[kinds]


def next_token_arrays(ids: np.ndarray, kinds: np.ndarray) -> dict[str, np.ndarray]:
  """Inputs, next-token labels, label kinds and the loss mask for one sequence."""
  label_kinds = kinds[1:]
  return {
      "inputs": ids[:-1],
      "labels": ids[1:],
      "label_kinds": label_kinds,
      "loss_mask": is_supervised(label_kinds),
  }


def step_boundaries(kinds: np.ndarray) -> np.ndarray:
  """Token indices where an agent step starts (a supervised run after context)."""
  sup = is_supervised(kinds)
  prev = np.concatenate([[False], sup[:-1]])
  return np.flatnonzero(sup & ~prev)


def truncate_at_step(kinds: np.ndarray, max_len: int) -> int | None:
  """Length to keep so that only whole steps remain, or None if not even one step fits.

  A cut at step boundary b keeps tokens [0, b): everything up to the context that
  follows the last kept step (its observation included).
  """
  n = len(kinds)
  if n <= max_len:
    return n
  cuts = step_boundaries(kinds)[1:]
  cuts = cuts[cuts <= max_len]
  return int(cuts[-1]) if len(cuts) else None
