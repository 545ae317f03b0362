"""Importers: the trajectory formats people have → the schema in `schema.py`.

Formats (`sad-jax import --format`):
  react       ReAct text (`Thought: … / Action: tool[arg] / Observation: …`) in records
              `{instruction, input, output}` (FireAct alpaca), `{prompt, completion}` or
              `{text}`; a prompt header before the first `Thought:` is allowed.
  chat        `{messages: [{role, content}]}`, assistant content in ReAct text, later user
              messages are observations (FireAct chat).
  openai      OpenAI chat with `tool_calls` (JSON arguments) and `role: "tool"` replies.
  smolagents  CodeAgent memory as messages (`tool-call` / `tool-response` roles) or as
              the step dicts of `agent.memory.get_full_steps()`.
  sad         this project's own JSONL (`schema.write_jsonl`).
  evallog     a ReAct/FireAct evaluation run saved as ONE JSON object mapping question ids
              to `{traj, reward, em, gt, pred, …}`; `traj` is the prompt (few-shot examples
              included) followed by the episode, which starts at the last `Question:` line.
  auto        picks one of the above per record (an evallog per file).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Callable
from typing import Any

from sad_jax.common.errors import DataError, SkipReport
from sad_jax.data.schema import Segment, Trajectory, content_id, iter_records

FORMATS = ("react", "chat", "openai", "smolagents", "sad", "evallog", "auto")

# A ReAct marker at the start of a line, optionally numbered as in the ReAct paper.
_MARKER_RE = re.compile(r"^(Thought|Action|Observation|Final Answer)(?: \d+)?:[ \t]?(.*)$")
_MARKER_KIND = {"Thought": "reason", "Action": "action", "Observation": "observation",
                "Final Answer": "answer"}
_REWARD_RE = re.compile(r"reward\s*=\s*(True|False|[01](?:\.0+)?)\b")


# ----------------------------------------------------------------------------- ReAct


def parse_react(text: str, *, field: str) -> tuple[str, list[Segment]]:
  """Splits ReAct text into (header before the first marker, segments).

  A marker line starts a segment; the lines up to the next marker continue it, so
  thoughts and observations may span several lines.
  """
  header: list[str] = []
  parts: list[tuple[str, list[str], int]] = []  # (kind, lines, line number)
  for lineno, line in enumerate(text.split("\n"), start=1):
    m = _MARKER_RE.match(line)
    if m:
      parts.append((_MARKER_KIND[m.group(1)], [m.group(2)], lineno))
    elif parts:
      parts[-1][1].append(line)
    else:
      header.append(line)
  segments = []
  for kind, lines, lineno in parts:
    body = "\n".join(lines).strip()
    where = f"{field} line {lineno}"
    if not body and kind in ("reason", "action", "answer"):
      raise DataError(f"empty {kind} ({where})", field=field)
    if kind == "action" and "[" in body and not body.endswith("]"):
      raise DataError(f"action without its closing bracket: {body[:60]!r} ({where})",
                      field=field)
    segments.append(Segment(kind, body))
  return "\n".join(header).strip(), segments


_HEADER_PATTERNS = (
    # Alpaca prompt: ### Instruction: … [### Input: …] ### Response:
    re.compile(r"###\s*Instruction:\s*(?P<task>.*?)\s*(?:###\s*Input:\s*(?P<input>.*?)\s*)?"
               r"###\s*Response:\s*$", re.S),
    re.compile(r"\[INST\]\s*(?P<task>.*?)\s*\[/INST\]\s*$", re.S),
)
_QUESTION_RE = re.compile(r"(?:^|\n)(?:Question|Task|Goal):[ \t]*")


def task_from_header(header: str) -> str:
  """The task inside a prompt header (instruction/response wrappers removed). With
  `Question:` lines (a few-shot prompt), the last one is the task."""
  for pat in _HEADER_PATTERNS:
    m = pat.search(header)
    if m:
      task = m.group("task").strip()
      extra = (m.groupdict().get("input") or "").strip()
      return f"{task}\n{extra}" if extra else task
  marks = list(_QUESTION_RE.finditer(header))
  if marks:
    return header[marks[-1].end():].strip()
  return header.strip()


def _success_from(segments: list[Segment]) -> bool | None:
  obs = [s for s in segments if s.kind == "observation"]
  if obs:
    m = _REWARD_RE.search(obs[-1].text)
    if m:
      return m.group(1) in ("True", "1") or m.group(1).startswith("1")
  return None


def _finish(task: str, segments: list[Segment], *, source: str, meta: dict | None = None,
            record_id: Any = None, system: str = "", success: bool | None = None
            ) -> Trajectory:
  if not isinstance(task, str):
    raise DataError(f"task must be a string, got {type(task).__name__}", field="task")
  if not task.strip():
    raise DataError("empty task", field="task")
  head = ([Segment("system", system.strip())] if system.strip() else [])
  segs = head + [Segment("task", task.strip())] + segments
  traj = Trajectory(
      id=str(record_id) if record_id not in (None, "") else content_id(segs),
      segments=segs, source=source,
      success=_success_from(segments) if success is None else success, meta=dict(meta or {}))
  traj.validate()
  return traj


def import_react_record(rec: Any, *, source: str) -> Trajectory:
  if not isinstance(rec, dict):
    raise DataError(f"expected a JSON object, got {type(rec).__name__}")
  for key in ("output", "completion", "text"):
    if key in rec:
      body_field = key
      break
  else:
    raise DataError("missing field (one of 'output', 'completion', 'text')", field="output")
  body = rec[body_field]
  if not isinstance(body, str):
    raise DataError("must be a string", field=body_field)
  header, segments = parse_react(body, field=body_field)
  if not segments:
    raise DataError("no 'Thought:' / 'Action:' lines found", field=body_field)
  if "instruction" in rec:
    task = str(rec["instruction"])
    if rec.get("input"):
      task = f"{task.strip()}\n{str(rec['input']).strip()}"
    if header:  # the task is given apart: text before the first marker is a thought
      segments = [Segment("reason", header), *segments]
  elif "prompt" in rec:
    task = task_from_header(str(rec["prompt"]) + "\n" + header)
  else:
    task = task_from_header(header)
  return _finish(task, segments, source=source, record_id=rec.get("id"))


# ----------------------------------------------------------------------------- chat


def _text_content(content: Any, *, field: str) -> str:
  """Message content as text: a string or a list of {type: text, text} parts."""
  if content is None:
    return ""
  if isinstance(content, str):
    return content
  if isinstance(content, list):
    out = []
    for j, part in enumerate(content):
      is_text = isinstance(part, dict) and part.get("type") == "text"
      if is_text and isinstance(part.get("text"), str):
        out.append(part["text"])
      elif isinstance(part, dict) and part.get("type") in ("image", "image_url"):
        continue  # images are not part of a text trajectory
      else:
        raise DataError("unsupported content part", field=f"{field}[{j}]")
    return "".join(out)
  raise DataError(f"content must be a string or a list, got {type(content).__name__}", field=field)


def _messages(rec: Any) -> list[dict]:
  if not isinstance(rec, dict):
    raise DataError(f"expected a JSON object, got {type(rec).__name__}")
  if "messages" not in rec:
    raise DataError("missing field", field="messages")
  msgs = rec["messages"]
  if not isinstance(msgs, list) or not msgs:
    raise DataError("must be a non-empty list", field="messages")
  for i, m in enumerate(msgs):
    if not isinstance(m, dict):
      raise DataError("must be an object", field=f"messages[{i}]")
    if "role" not in m:
      raise DataError("missing field", field=f"messages[{i}].role")
    if not isinstance(m["role"], str):
      raise DataError(f"role must be a string, got {type(m['role']).__name__}",
                      field=f"messages[{i}].role")
  return msgs


_OBS_PREFIX_RE = re.compile(r"^\s*Observation(?: \d+)?:[ \t]*\n?")


def _assistant_segments(text: str, *, field: str, last: bool) -> list[Segment]:
  """Assistant text in ReAct form → reason/action; plain text → a final answer."""
  header, segs = parse_react(text, field=field)
  if header and segs:
    segs = [Segment("reason", header)] + segs  # an unmarked first thought
  if not segs:
    if not header:
      raise DataError("empty assistant message", field=field)
    if not last:
      raise DataError("assistant message has no 'Action:' and is not the last message",
                      field=field)
    return [Segment("answer", header)]
  if any(s.kind == "observation" for s in segs):
    raise DataError("assistant message contains an 'Observation:'", field=field)
  return segs


def import_chat_record(rec: Any, *, source: str) -> Trajectory:
  msgs = _messages(rec)
  system, task, segments = "", None, []
  prev = None
  for i, m in enumerate(msgs):
    role, field = m["role"], f"messages[{i}].content"
    text = _text_content(m.get("content"), field=field)
    if role == "system":
      if i != 0:
        raise DataError("system message after the start", field=f"messages[{i}].role")
      system = text
    elif role == "user":
      if prev == "user":
        raise DataError("roles do not alternate: two user messages in a row",
                        field=f"messages[{i}].role")
      if task is None:
        task = text
      else:
        segments.append(Segment("observation", _OBS_PREFIX_RE.sub("", text, count=1).strip()))
    elif role == "assistant":
      if prev != "user":
        raise DataError(f"roles do not alternate: assistant after {prev or 'nothing'}",
                        field=f"messages[{i}].role")
      segments += _assistant_segments(text, field=field, last=i == len(msgs) - 1)
    else:
      raise DataError(f"unknown role {role!r}; expected system, user or assistant",
                      field=f"messages[{i}].role")
    prev = role if role != "system" else prev
  if task is None:
    raise DataError("no user message with the task", field="messages")
  return _finish(task, segments, source=source, system=system, record_id=rec.get("id"))


# ----------------------------------------------------------------------------- OpenAI


def _tool_call_action(call: Any, *, field: str) -> tuple[str, str]:
  """An OpenAI tool call → (call id, canonical JSON action text)."""
  if not isinstance(call, dict) or not isinstance(call.get("function"), dict):
    raise DataError("tool call must have a 'function' object", field=field)
  fn = call["function"]
  name = fn.get("name")
  if not isinstance(name, str) or not name:
    raise DataError("missing tool name", field=f"{field}.function.name")
  args = fn.get("arguments", "{}")
  if isinstance(args, str):
    try:
      args = json.loads(args) if args.strip() else {}
    except json.JSONDecodeError as e:
      raise DataError(f"malformed JSON arguments: {e.msg}",
                      field=f"{field}.function.arguments") from None
  return str(call.get("id", "")), json.dumps({"name": name, "arguments": args},
                                             ensure_ascii=False, sort_keys=True)


def import_openai_record(rec: Any, *, source: str) -> Trajectory:
  msgs = _messages(rec)
  system, task, segments = "", None, []
  pending: list[str] = []  # tool-call ids still waiting for their response
  prev = None
  for i, m in enumerate(msgs):
    role, field = m["role"], f"messages[{i}]"
    text = _text_content(m.get("content"), field=f"{field}.content")
    if role in ("system", "developer"):
      if task is not None:
        raise DataError("system message after the task", field=f"{field}.role")
      system = text
      continue
    if role == "user":
      if pending:
        raise DataError(f"user message while tool calls {pending} have no response",
                        field=f"{field}.role")
      if task is None:
        task = text
      else:
        if prev == "user":
          raise DataError("roles do not alternate: two user messages in a row",
                          field=f"{field}.role")
        segments.append(Segment("observation", text.strip()))
    elif role == "assistant":
      if prev not in ("user", "tool"):
        raise DataError(f"roles do not alternate: assistant after {prev or 'nothing'}",
                        field=f"{field}.role")
      calls = m.get("tool_calls") or []
      if not isinstance(calls, list):
        raise DataError("must be a list", field=f"{field}.tool_calls")
      if text.strip():
        if calls:
          header, segs = parse_react(text, field=f"{field}.content")
          if any(sg.kind == "observation" for sg in segs):
            raise DataError("assistant message contains an 'Observation:'",
                            field=f"{field}.content")
          segments += ([Segment("reason", header)] if header else []) + segs
        else:
          segments += _assistant_segments(text, field=f"{field}.content",
                                          last=i == len(msgs) - 1)
      elif not calls:
        raise DataError("assistant message with neither content nor tool_calls",
                        field=f"{field}.content")
      for j, call in enumerate(calls):
        call_id, action = _tool_call_action(call, field=f"{field}.tool_calls[{j}]")
        segments.append(Segment("action", action))
        pending.append(call_id)
    elif role == "tool":
      call_id = str(m.get("tool_call_id", ""))
      if not pending:
        raise DataError("tool message without a preceding tool call", field=f"{field}.role")
      if call_id not in pending:
        raise DataError(f"tool_call_id {call_id!r} matches no pending call {pending}",
                        field=f"{field}.tool_call_id")
      pending.remove(call_id)
      segments.append(Segment("observation", text.strip()))
    else:
      raise DataError(f"unknown role {role!r}; expected system, user, assistant or tool",
                      field=f"{field}.role")
    prev = role
  if task is None:
    raise DataError("no user message with the task", field="messages")
  return _finish(task, segments, source=source, system=system,
                 meta={"action_format": "json"}, record_id=rec.get("id"))


# ----------------------------------------------------------------------------- smolagents

_CODE_RES = (
    re.compile(r"(?:^|\n)Code:\s*\n?```(?:py|python)?[ \t]*\n(?P<code>.*?)\n?```(?:\s*<end_code>)?",
               re.S),
    re.compile(r"<code>\s*\n?(?P<code>.*?)\n?</code>", re.S),
    re.compile(r"```(?:py|python)?[ \t]*\n(?P<code>.*?)\n?```(?:\s*<end_code>)?", re.S),
)
_THOUGHT_PREFIX_RE = re.compile(r"^\s*Thoughts?:\s*")
_TOOL_RESPONSE_RE = re.compile(r"^\s*(?:Call id: [^\n]*\n)?(?:Observation:[ \t]*\n?)?", re.S)
_NEW_TASK_RE = re.compile(r"^\s*New task:\s*\n?")


def _code_step(text: str, *, field: str) -> list[Segment]:
  """A CodeAgent output → [reason?, action(code)]; no code block → a planning reason."""
  for pat in _CODE_RES:
    m = pat.search(text)
    if m:
      code = m.group("code").strip("\n")
      if not code.strip():
        raise DataError("empty code block", field=field)
      thought = _THOUGHT_PREFIX_RE.sub("", text[: m.start()], count=1).strip()
      return ([Segment("reason", thought)] if thought else []) + [Segment("action", code)]
  if not text.strip():
    raise DataError("empty assistant message", field=field)
  return [Segment("reason", _THOUGHT_PREFIX_RE.sub("", text, count=1).strip())]


def _smol_from_messages(msgs: list[dict]) -> tuple[str, str | None, list[Segment]]:
  system, task, segments = "", None, []
  for i, m in enumerate(msgs):
    role, field = m["role"], f"messages[{i}].content"
    text = _text_content(m.get("content"), field=field)
    if role == "system":
      system = text
    elif role == "user":
      body = _NEW_TASK_RE.sub("", text, count=1).strip()
      if task is None:
        task = body
      elif body:
        segments.append(Segment("task", body))  # e.g. "Now proceed and carry out this plan."
    elif role == "assistant":
      segments += _code_step(text, field=field)
    elif role == "tool-call":
      continue  # repeats the code already taken from the assistant message
    elif role in ("tool-response", "tool_response"):
      segments.append(Segment("observation", _TOOL_RESPONSE_RE.sub("", text, count=1).strip()))
    else:
      raise DataError(f"unknown role {role!r}; expected system, user, assistant, tool-call "
                      "or tool-response", field=f"messages[{i}].role")
  return system, task, segments


def _smol_from_steps(rec: dict) -> tuple[str, str | None, list[Segment]]:
  steps = rec["steps"]
  if not isinstance(steps, list):
    raise DataError("must be a list", field="steps")
  system, task, segments = str(rec.get("system_prompt") or ""), rec.get("task"), []
  for i, st in enumerate(steps):
    field = f"steps[{i}]"
    if not isinstance(st, dict):
      raise DataError("must be an object", field=field)
    if "task" in st and "model_output" not in st:
      task = task or str(st["task"])
    elif "plan" in st:
      segments.append(Segment("reason", str(st["plan"]).strip()))
    elif "model_output" in st:
      out = st["model_output"]
      out = _text_content(out, field=f"{field}.model_output")
      if out.strip():
        segments += _code_step(out, field=f"{field}.model_output")
      elif st.get("code_action"):
        segments.append(Segment("action", str(st["code_action"]).strip()))
      if st.get("observations") is not None:
        segments.append(Segment("observation", str(st["observations"]).strip()))
      if st.get("error"):
        err = st["error"]
        msg = err.get("message", err) if isinstance(err, dict) else err
        segments.append(Segment("observation", f"Error: {msg}".strip()))
    elif "system_prompt" in st:
      system = str(st["system_prompt"])
    elif "output" in st:
      continue  # FinalAnswerStep: the answer is already the last code action's output
    else:
      raise DataError("unknown step (expected task, plan, model_output or system_prompt)",
                      field=field)
  return system, task, segments


def import_smolagents_record(rec: Any, *, source: str) -> Trajectory:
  if isinstance(rec, dict) and "steps" in rec:
    system, task, segments = _smol_from_steps(rec)
  else:
    system, task, segments = _smol_from_messages(_messages(rec))
  if task is None:
    raise DataError("no task (a user message or a task step)",
                    field="steps" if isinstance(rec, dict) and "steps" in rec else "messages")
  return _finish(task, segments, source=source, system=system,
                 meta={"action_format": "code"},
                 record_id=rec.get("id") if isinstance(rec, dict) else None)


# ----------------------------------------------------------------------------- evaluation logs

_LAST_QUESTION_RE = re.compile(r"^Question(?: \d+)?:", re.M)
_EVAL_SCORES = ("reward", "em")  # the first one present decides success
_EVAL_META = ("reward", "em", "f1", "gt", "pred", "answer", "gt_answer")


def _eval_success(rec: dict) -> bool | None:
  """Success from the run's own score: full reward (or exact match) is a success."""
  for key in _EVAL_SCORES:
    if key in rec and rec[key] is not None:
      value = rec[key]
      if not isinstance(value, bool | int | float):
        raise DataError(f"must be a number or a boolean, got {type(value).__name__}", field=key)
      return float(value) >= 1.0
  return None


def import_evallog_record(rec: Any, *, source: str, record_id: str) -> Trajectory:
  """One value of an evaluation-log object; `record_id` is its key."""
  if not isinstance(rec, dict):
    raise DataError(f"expected a JSON object, got {type(rec).__name__}")
  if "traj" not in rec:
    raise DataError("missing field", field="traj")
  text = rec["traj"]
  if not isinstance(text, str):
    raise DataError(f"must be a string, got {type(text).__name__}", field="traj")
  # The few-shot examples before the episode have markers of their own: skip to the last
  # question, which is the one this episode answers.
  questions = list(_LAST_QUESTION_RE.finditer(text))
  start = questions[-1].start() if questions else 0
  header, segments = parse_react(text[start:], field="traj")
  if not segments:
    raise DataError("no 'Thought:' / 'Action:' lines after the last 'Question:'", field="traj")
  meta = {k: rec[k] for k in _EVAL_META
          if k in rec and isinstance(rec[k], str | int | float | bool | None)}
  return _finish(task_from_header(header), segments, source=source, meta=meta,
                 record_id=record_id, success=_eval_success(rec))


def is_evallog(doc: Any) -> bool:
  """An object of records keyed by id, not a record itself: no key of a record format,
  and some value is an object (a bad value among them is then that record's error)."""
  return (isinstance(doc, dict) and bool(doc) and not doc.keys() & _RECORD_KEYS
          and any(isinstance(v, dict) for v in doc.values()))


# ----------------------------------------------------------------------------- dispatch


def import_sad_record(rec: Any, *, source: str) -> Trajectory:
  del source
  return Trajectory.from_dict(rec)


def detect_format(rec: Any) -> str:
  """Names the importer for one record; raises DataError when none fits."""
  if isinstance(rec, dict):
    if "segments" in rec:
      return "sad"
    if "steps" in rec:
      return "smolagents"
    msgs = rec.get("messages")
    if isinstance(msgs, list):
      roles = {m.get("role") for m in msgs
               if isinstance(m, dict) and isinstance(m.get("role"), str)}
      if roles & {"tool-call", "tool-response"}:
        return "smolagents"
      if "tool" in roles or any(isinstance(m, dict) and m.get("tool_calls") for m in msgs):
        return "openai"
      return "chat"
    if rec.keys() & {"output", "completion", "text", "instruction", "prompt"}:
      return "react"
  raise DataError("cannot tell the format of this record (expected 'segments', 'messages', "
                  "'steps', or ReAct 'output'/'completion'/'text')")


_RECORD_KEYS = frozenset({"segments", "steps", "messages", "output", "completion", "text",
                          "instruction", "prompt", "traj"})

IMPORTERS: dict[str, Callable[..., Trajectory]] = {
    "react": import_react_record,
    "chat": import_chat_record,
    "openai": import_openai_record,
    "smolagents": import_smolagents_record,
    "sad": import_sad_record,
}


def import_file(path: str | os.PathLike, *, fmt: str = "auto",
                skips: SkipReport | None = None) -> list[Trajectory]:
  """Reads every record of `path` in format `fmt`; errors name file, record and field."""
  if fmt not in FORMATS:
    raise DataError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
  skips = skips or SkipReport()
  path = os.fspath(path)
  source = os.path.basename(path)
  out: list[Trajectory] = []
  seen: set[str] = set()
  records = list(iter_records(path))
  if fmt == "evallog" or (fmt == "auto" and len(records) == 1 and is_evallog(records[0][1])):
    records = _evallog_records(records, path)
  for recno, rec in records:
    try:
      if isinstance(rec, DataError):
        raise rec
      f = "evallog" if isinstance(rec, _Keyed) else detect_format(rec) if fmt == "auto" else fmt
      try:
        if isinstance(rec, _Keyed):
          try:
            traj = import_evallog_record(rec.value, source=source, record_id=rec.key)
          except DataError as e:  # name the id too: the record number is a position
            raise DataError(f"{e.message} (id {rec.key!r})", field=e.field) from None
        else:
          traj = IMPORTERS[f](rec, source=source)
      except (TypeError, AttributeError, KeyError, ValueError) as e:
        # A value of an unexpected type deep in a record: still name the record.
        raise DataError(f"malformed {f} record ({type(e).__name__}: {e})") from None
    except DataError as e:
      skips.handle(e.located(path=path, record=recno))
      continue
    _dedupe_id(traj, seen)
    out.append(traj)
  return out


@dataclasses.dataclass(frozen=True)
class _Keyed:
  key: str
  value: Any


def _evallog_records(records: list[tuple[int, Any]], path: str) -> list[tuple[int, Any]]:
  """The one object of an evaluation log → (1-based position, keyed value) records."""
  if len(records) != 1 or not isinstance(records[0][1], dict | DataError):
    raise DataError("an evaluation log is one JSON object mapping ids to records", path=path)
  doc = records[0][1]
  if isinstance(doc, DataError):
    raise doc.located(path=path)
  return [(i, _Keyed(key, value)) for i, (key, value) in enumerate(doc.items(), start=1)]


def _dedupe_id(traj: Trajectory, seen: set[str]) -> None:
  """Identical episodes share a content id: number the repeats (until the id is free)
  and remember the original, so that every copy lands in the same split."""
  if traj.id in seen:
    base, n = traj.id, 1
    while f"{base}-{n}" in seen:
      n += 1
    traj.id = f"{base}-{n}"
    traj.meta["duplicate_of"] = base
  seen.add(traj.id)


def import_files(paths: list[str], *, fmt: str = "auto",
                 skips: SkipReport | None = None) -> list[Trajectory]:
  skips = skips or SkipReport()
  out: list[Trajectory] = []
  for p in paths:
    out += import_file(p, fmt=fmt, skips=skips)
  return out
