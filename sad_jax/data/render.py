"""Rendering: a trajectory → one string with a character span of a known kind everywhere.

Two templates:
  * `react`: the project's ReAct text. Each segment's span includes its marker and
    trailing newline ("Thought: …\\n", "Action: …\\n"), so the student learns to write
    the markers and to end an action with a newline (where the agent loop stops).
  * a jinja chat template (as in a model's tokenizer_config.json). Consecutive
    reason/action/answer segments form one assistant message whose content is the
    ReAct form of those segments; observations are user (or tool) messages.

Rules for template markup in the chat case (documented, tested):
  * An assistant turn is the text between render(messages[:i], add_generation_prompt)
    and render(messages[:i+1]); markup inside it after the content (the end-of-turn
    token) gets the kind of the turn's last segment, so the student learns to stop.
  * Other markup (role headers, the generation prompt, BOS) gets the kind of the
    message it introduces when that message is context (system/task/observation), else
    the kind of what precedes it. So no markup outside an assistant turn is supervised.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import hashlib
import json
import re
from typing import Any

import numpy as np

from sad_jax.common.errors import DataError
from sad_jax.common.types import SEGMENT_KINDS, SUPERVISED_KINDS, SpanKind
from sad_jax.data.schema import Segment, Trajectory

_KIND = {name: SpanKind.from_name(name) for name in SEGMENT_KINDS}


@dataclasses.dataclass(frozen=True)
class Rendered:
  """`text` covered by contiguous spans: span j is [starts[j], starts[j+1]) of kinds[j]."""

  text: str
  starts: np.ndarray    # int32[n_spans], starts[0] == 0, increasing
  kinds: np.ndarray     # int8[n_spans] SpanKind
  segment: np.ndarray   # int32[n_spans] index into trajectory.segments, -1 between them
  markup: np.ndarray    # bool[n_spans] written by a chat template (special tokens allowed)

  def span_of_char(self, pos: np.ndarray) -> np.ndarray:
    return np.searchsorted(self.starts, pos, side="right") - 1

  def span_end(self, j: int) -> int:
    return int(self.starts[j + 1]) if j + 1 < len(self.starts) else len(self.text)


Span = tuple[int, int, SpanKind, int, bool]  # (start, end, kind, segment, markup)


def _build(text: str, spans: list[Span], *, gap_is_markup: bool) -> Rendered:
  """Spans sorted and disjoint → a contiguous Rendered.

  A gap gets the kind of the next span when that span is context, else of the
  previous span (see the module docstring).
  """
  out: list[tuple[int, int, int, bool]] = []
  pos = 0
  for s, e, kind, seg, markup in spans:
    if s < pos:
      raise AssertionError(f"overlapping spans at {s}")
    if s > pos:
      if kind not in SUPERVISED_KINDS or not out:
        gap_kind = kind if kind not in SUPERVISED_KINDS else SpanKind.SYSTEM
      else:
        gap_kind = SpanKind(out[-1][1])
      out.append((pos, gap_kind, -1, gap_is_markup))
    if e > s:
      out.append((s, kind, seg, markup))
    pos = e
  if pos < len(text):
    out.append((pos, out[-1][1] if out else SpanKind.SYSTEM, -1, gap_is_markup))
  return Rendered(text, np.array([o[0] for o in out], np.int32),
                  np.array([o[1] for o in out], np.int8),
                  np.array([o[2] for o in out], np.int32),
                  np.array([o[3] for o in out], bool))


# ----------------------------------------------------------------------------- ReAct

def _react_piece(seg: Segment, *, action_format: str, first_task: bool) -> str:
  k, t = seg.kind, seg.text
  if k == "system":
    return f"{t}\n\n"
  if k == "task":
    return f"Question: {t}\n" if first_task else f"User: {t}\n"
  if k == "reason":
    return f"Thought: {t}\n"
  if k == "action":
    if action_format == "code":
      return f"Code:\n```py\n{t}\n```<end_code>\n"
    return f"Action: {t}\n"
  if k == "observation":
    return f"Observation: {t}\n" if t else "Observation:\n"
  if k == "answer":
    return f"Final Answer: {t}\n"
  raise DataError(f"unknown segment kind {k!r}", field="kind")


def render_react(traj: Trajectory) -> Rendered:
  pieces, spans, pos, seen_task = [], [], 0, False
  for i, seg in enumerate(traj.segments):
    piece = _react_piece(seg, action_format=traj.action_format,
                         first_task=seg.kind == "task" and not seen_task)
    seen_task |= seg.kind == "task"
    pieces.append(piece)
    spans.append((pos, pos + len(piece), _KIND[seg.kind], i, False))
    pos += len(piece)
  return _build("".join(pieces), spans, gap_is_markup=False)


# ----------------------------------------------------------------------------- chat


def _assistant_content(segs: list[tuple[int, Segment]], action_format: str
                       ) -> tuple[str, list[tuple[int, int, SpanKind, int]]]:
  """The ReAct form of one assistant turn, with spans relative to its start."""
  parts, spans, pos = [], [], 0
  for n, (i, seg) in enumerate(segs):
    piece = _react_piece(seg, action_format=action_format, first_task=False)
    if n == len(segs) - 1:
      piece = piece[:-1]  # the template ends the turn, not a newline
    parts.append(piece)
    spans.append((pos, pos + len(piece), _KIND[seg.kind], i, False))
    pos += len(piece)
  return "".join(parts), spans


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
  """A jinja chat template and the special-token strings it refers to."""

  source: str
  bos_token: str | None = None
  eos_token: str | None = None
  observation_role: str = "user"    # "user" (prefixed "Observation: ") or "tool"
  date: str = "2026-01-01"          # fixed, so that templates that print a date are deterministic

  @property
  def fingerprint(self) -> str:
    h = hashlib.sha256()
    for part in (self.source, self.bos_token, self.eos_token, self.observation_role, self.date):
      h.update(str(part).encode() + b"\0")
    return h.hexdigest()

  def messages(self, traj: Trajectory) -> tuple[list[dict], list[list]]:
    """Chat messages and, per message, the spans of its content relative to it."""
    msgs: list[dict] = []
    spans: list[list] = []
    group: list[tuple[int, Segment]] = []

    def flush():
      if group:
        content, sp = _assistant_content(group, traj.action_format)
        msgs.append({"role": "assistant", "content": content})
        spans.append(sp)
        group.clear()

    for i, seg in enumerate(traj.segments):
      kind = _KIND[seg.kind]
      if kind in SUPERVISED_KINDS:
        group.append((i, seg))
        continue
      flush()
      if seg.kind == "system":
        role, text = "system", seg.text
      elif seg.kind == "task":
        role, text = "user", seg.text
      elif self.observation_role == "tool":
        role, text = "tool", seg.text
      else:
        role, text = "user", f"Observation: {seg.text}" if seg.text else "Observation:"
      if role == "user" and msgs and msgs[-1]["role"] == "user":
        # Merge consecutive user messages: many templates require alternation.
        prev = msgs[-1]["content"]
        msgs[-1]["content"] = prev + "\n" + text
        spans[-1].append((len(prev) + 1, len(prev) + 1 + len(text), kind, i, False))
        continue
      msgs.append({"role": role, "content": text})
      spans.append([(0, len(text), kind, i, False)])
    flush()
    return msgs, spans

  def render_messages(self, msgs: list[dict], *, add_generation_prompt: bool) -> str:
    try:
      return _compiled(self.source).render(
          messages=msgs, add_generation_prompt=add_generation_prompt,
          bos_token=self.bos_token or "", eos_token=self.eos_token or "",
          strftime_now=lambda fmt: datetime.date.fromisoformat(self.date).strftime(fmt))
    except DataError:
      raise
    except Exception as e:  # jinja errors and the template's own raise_exception
      raise DataError(f"chat template failed to render: {e}", field="chat_template") from None

  def render(self, traj: Trajectory) -> Rendered:
    """Renders, locating every content by rendering with sentinels in its place.

    Contents are never searched for in the output (a short content can occur inside
    markup); instead the markup around sentinels is taken as is and the real render
    must equal markup + contents, else the template changes content (an error).
    """
    msgs, content_spans = self.messages(traj)
    full = self.render_messages(msgs, add_generation_prompt=False)
    marked = [{**m, "content": _sentinel(i)} for i, m in enumerate(msgs)]
    skeleton = self.render_messages(marked, add_generation_prompt=False)
    pieces = _SENTINEL_RE.split(skeleton)  # markup, index, markup, index, …, markup
    order = [int(x) for x in pieces[1::2]]
    if order != list(range(len(msgs))):
      raise DataError(f"chat template does not render each message once, in order "
                      f"(saw messages {order})", field="chat_template")
    text, starts = [], []
    for j, markup in enumerate(pieces[0::2]):
      text.append(markup)
      if j < len(msgs):
        starts.append(sum(map(len, text)))
        text.append(msgs[j]["content"])
    if "".join(text) != full:
      raise DataError("chat template does not render message contents verbatim (it "
                      "changes or reorders them)", field="chat_template")
    # shift[i]: how much longer the real text is than the skeleton after content i
    shift = np.cumsum([len(m["content"]) - len(_sentinel(i)) for i, m in enumerate(msgs)])
    spans: list[Span] = []
    for i, (m, sp) in enumerate(zip(msgs, content_spans)):
      at = starts[i]
      if m["role"] != "assistant":
        spans += [(at + s, at + e, kind, seg, False) for s, e, kind, seg, _ in sp]
        continue
      prompt = self.render_messages(marked[:i], add_generation_prompt=True)
      upto = self.render_messages(marked[: i + 1], add_generation_prompt=False)
      if not (upto.startswith(prompt) and skeleton.startswith(upto)):
        raise DataError(f"chat template is not prefix-stable at message {i}: the assistant "
                        "turn cannot be delimited", field="chat_template")
      turn_start = len(prompt) + (int(shift[i - 1]) if i else 0)
      turn_end = len(upto) + int(shift[i])
      # Markup the template writes inside the turn belongs to the model's output: before
      # the content (e.g. an empty <think></think>) to the first segment, after it (the
      # end-of-turn token) to the last, so the student learns to stop.
      first, last = sp[0], sp[-1]
      if turn_start < at:
        spans.append((turn_start, at, first[2], first[3], True))
      spans += [(at + s, at + e, kind, seg, False) for s, e, kind, seg, _ in sp]
      if at + last[1] < turn_end:
        spans.append((at + last[1], turn_end, last[2], last[3], True))
    return _build(full, spans, gap_is_markup=True)


_SENTINEL_RE = re.compile("\ue000(\\d+)\ue001")


def _sentinel(i: int) -> str:
  # Private-use characters: no template writes them and no trim removes them.
  return f"\ue000{i}\ue001"


@functools.lru_cache(maxsize=16)
def _compiled(source: str):
  from jinja2.exceptions import TemplateError
  from jinja2.sandbox import ImmutableSandboxedEnvironment

  def raise_exception(message):
    raise DataError(f"chat template raised: {message}", field="chat_template")

  env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                      extensions=["jinja2.ext.loopcontrols"])
  env.globals["raise_exception"] = raise_exception
  env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False: json.dumps(
      x, indent=indent, ensure_ascii=ensure_ascii)
  try:
    return env.from_string(source)
  except TemplateError as e:
    raise DataError(f"chat template does not compile: {e}", field="chat_template") from None


# ----------------------------------------------------------------------------- entry


def render(traj: Trajectory, *, template: ChatTemplate | None = None) -> Rendered:
  """Renders with the ReAct template (template=None) or a chat template."""
  return render_react(traj) if template is None else template.render(traj)


def template_fingerprint(template: ChatTemplate | None) -> str:
  return "react-v1" if template is None else f"chat-{template.fingerprint}"


def as_dict(r: Rendered) -> dict[str, Any]:
  """Spans as readable (kind, text) pairs; for tests and debugging."""
  ends = list(r.starts[1:]) + [len(r.text)]
  return {"spans": [(SpanKind(k).name.lower(), r.text[s:e])
                    for s, e, k in zip(r.starts, ends, r.kinds)]}


def stop_ids(tokenizer, template: ChatTemplate | None) -> list[int]:
  """Where generation stops: EOS and, with a chat template, its end-of-turn token (the first
  token of the markup it writes after an assistant turn's content, e.g. <|im_end|>)."""
  stop = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
  if template is not None:
    probe = Trajectory(id="probe", segments=[Segment("task", "q"), Segment("reason", "r"),
                                             Segment("action", "a")])
    r = template.render(probe)
    after = np.flatnonzero((r.segment == 2) & r.markup)
    if len(after):
      j = int(after[-1])
      ids = tokenizer.encode(r.text[r.starts[j]: r.span_end(j)], parse_special=True).ids
      if len(ids) and int(ids[0]) in tokenizer.special_tokens.values():
        stop.append(int(ids[0]))
  return sorted(set(stop))
