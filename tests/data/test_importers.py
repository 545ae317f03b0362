"""Importers on real FireAct data and on hand-written records of every supported format."""

import collections
import json

import pytest

from sad_jax.common.errors import DataError, SkipReport
from sad_jax.data import importers, render
from sad_jax.data.schema import Segment
from tests import helpers


def kinds(traj):
  return [s.kind for s in traj.segments]


@pytest.mark.fireact
def test_fireact_both_formats_import_alike(fireact_dir):
  alpaca = importers.import_file(fireact_dir / "hotpotqa_react_alpaca.json", fmt="react")
  chat = importers.import_file(fireact_dir / "hotpotqa_react_chat.jsonl", fmt="chat")
  assert len(alpaca) == len(chat) == 500
  for a, c in zip(alpaca, chat):
    assert a.segments == c.segments
    assert a.id == c.id
    assert a.success is True
  counts = collections.Counter(s.kind for t in alpaca for s in t.segments)
  assert counts == {"task": 500, "reason": 1385, "action": 1385, "observation": 1385}
  # auto picks the right importer for each file
  auto = importers.import_file(fireact_dir / "hotpotqa_react_chat.jsonl", fmt="auto")
  assert [t.segments for t in auto] == [t.segments for t in chat]


@pytest.mark.fireact
def test_fireact_text_is_preserved(fireact_dir):
  """The rendered ReAct body equals the source text, line for line (up to trailing
  whitespace, which the importer strips)."""
  records = json.loads((fireact_dir / "hotpotqa_react_alpaca.json").read_text())
  trajs = importers.import_file(fireact_dir / "hotpotqa_react_alpaca.json")
  for rec, traj in zip(records, trajs):
    text = render.render_react(traj).text
    body = text[len(f"Question: {traj.task}\n"):]
    strip = lambda s: [line.rstrip() for line in s.split("\n")]
    assert strip(body) == strip(rec["output"])


def test_react_with_prompt_headers_and_multiline():
  body = ("Thought 1: I should look.\nStill thinking\n\nAction 1: search[a b]\n"
          "Observation 1: line one\nline two\n  indented\nThought 2: done\nAction 2: finish[x]\n")
  cases = {
      "### Instruction:\nWhere is x?\n\n### Response:\n": "Where is x?",
      "### Instruction:\nFind it\n\n### Input:\nthe key\n\n### Response:\n": "Find it\nthe key",
      "[INST] What now? [/INST]\n": "What now?",
      "You are an agent.\nQuestion: Which one?\n": "Which one?",
  }
  for header, task in cases.items():
    traj = importers.import_react_record({"text": header + body}, source="t")
    assert traj.task == task
    assert kinds(traj)[1:] == ["reason", "action", "observation", "reason", "action"]
    assert traj.segments[1].text == "I should look.\nStill thinking"
    assert traj.segments[3].text == "line one\nline two\n  indented"
  pc = importers.import_react_record({"prompt": "Question: Q?", "completion": body}, source="t")
  assert pc.task == "Q?"


@pytest.mark.parametrize("body, message", [
    ("Thought: \nAction: search[x]\n", "empty reason"),
    ("Thought: t\nAction: \n", "empty action"),
    ("Thought: t\nAction: search[x\nObservation: o\n", "closing bracket"),
    ("no markers here", "no 'Thought:'"),
])
def test_react_bad_records(tmp_path, body, message):
  path = helpers.write_jsonl(str(tmp_path / "bad.jsonl"),
                             [{"instruction": "q", "output": "Thought: a\nAction: finish[b]\n"},
                              {"instruction": "q", "output": body}])
  with pytest.raises(DataError) as e:
    importers.import_file(path, fmt="react")
  assert e.value.record == 2 and e.value.path == path and e.value.field == "output"
  assert message in str(e.value)
  # the skip policy counts instead
  skips = SkipReport(on_error="skip")
  assert len(importers.import_file(path, fmt="react", skips=skips)) == 1
  assert skips.count == 1 and message in skips.reasons[0]


def test_chat_roles():
  good = {"messages": [{"role": "system", "content": "be brief"},
                       {"role": "user", "content": "Q"},
                       {"role": "assistant", "content": "Thought: t\nAction: go[n]"},
                       {"role": "user", "content": "Observation: you see a door"},
                       {"role": "assistant", "content": "The door."}]}
  traj = importers.import_chat_record(good, source="t")
  assert kinds(traj) == ["system", "task", "reason", "action", "observation", "answer"]
  assert traj.segments[4].text == "you see a door"

  def bad(msgs):
    with pytest.raises(DataError) as e:
      importers.import_chat_record({"messages": msgs}, source="t")
    return e.value

  e = bad([{"role": "user", "content": "Q"}, {"role": "assistant", "content": "Action: a"},
           {"role": "assistant", "content": "Action: b"}])
  assert e.field == "messages[2].role" and "alternate" in str(e)
  e = bad([{"role": "user", "content": "Q"}, {"role": "robot", "content": "x"}])
  assert e.field == "messages[1].role" and "unknown role" in str(e)
  e = bad([{"role": "user", "content": "Q"}, {"content": "x"}])
  assert e.field == "messages[1].role" and "missing" in str(e)
  e = bad([{"role": "user", "content": "Q"}, {"role": "assistant", "content": "  "}])
  assert e.field == "messages[1].content"


def openai_record():
  return {"messages": [
      {"role": "system", "content": "You call tools."},
      {"role": "user", "content": "Weather in Paris and Rome?"},
      {"role": "assistant", "content": "I need both cities.", "tool_calls": [
          {"id": "c1", "type": "function",
           "function": {"name": "weather", "arguments": "{\"city\": \"Paris\"}"}},
          {"id": "c2", "type": "function",
           "function": {"name": "weather", "arguments": "{\"city\": \"Rome\"}"}}]},
      {"role": "tool", "tool_call_id": "c2", "content": "Rome: 20C"},
      {"role": "tool", "tool_call_id": "c1", "content": "Paris: 15C"},
      {"role": "assistant", "content": "Paris 15C, Rome 20C."}]}


def test_openai_tool_calls():
  traj = importers.import_openai_record(openai_record(), source="t")
  assert kinds(traj) == ["system", "task", "reason", "action", "action", "observation",
                         "observation", "answer"]
  assert json.loads(traj.segments[3].text) == {"name": "weather", "arguments": {"city": "Paris"}}
  assert traj.action_format == "json"
  assert importers.detect_format(openai_record()) == "openai"


@pytest.mark.parametrize("mutate, field", [
    (lambda r: r["messages"][2]["tool_calls"][0]["function"].update(arguments="{bad"),
     "messages[2].tool_calls[0].function.arguments"),
    (lambda r: r["messages"][3].update(tool_call_id="zzz"), "messages[3].tool_call_id"),
    (lambda r: r["messages"].insert(3, {"role": "user", "content": "hi"}), "messages[3].role"),
    (lambda r: r["messages"][2]["tool_calls"][1].pop("function"), "messages[2].tool_calls[1]"),
])
def test_openai_bad(mutate, field):
  rec = openai_record()
  mutate(rec)
  with pytest.raises(DataError) as e:
    importers.import_openai_record(rec, source="t")
  assert e.value.field == field


SMOL_ASSISTANT = ("Thought: I will compute it with Python.\nCode:\n```py\nx = 6 * 7\n"
                  "print(x)\n```<end_code>")


def test_smolagents_messages_and_steps():
  rec = {"messages": [
      {"role": "system", "content": [{"type": "text", "text": "You are a CodeAgent."}]},
      {"role": "user", "content": [{"type": "text", "text": "New task:\nWhat is 6*7?"}]},
      {"role": "assistant", "content": [{"type": "text", "text": "## Facts survey\nNone.\n## Plan\n1. compute"}]},
      {"role": "user", "content": [{"type": "text", "text": "Now proceed and carry out this plan."}]},
      {"role": "assistant", "content": [{"type": "text", "text": SMOL_ASSISTANT}]},
      {"role": "tool-call", "content": [{"type": "text", "text": "Calling tools:\n[{'id': 'call_1'}]"}]},
      {"role": "tool-response", "content": [{"type": "text", "text": "Call id: call_1\nObservation:\nExecution logs:\n42\nLast output from code snippet:\nNone"}]},
      {"role": "assistant", "content": "Thought: Done.\n<code>\nfinal_answer(42)\n</code>"},
  ]}
  traj = importers.import_smolagents_record(rec, source="t")
  assert kinds(traj) == ["system", "task", "reason", "task", "reason", "action", "observation",
                         "reason", "action"]
  assert traj.task == "What is 6*7?"
  assert traj.segments[5].text == "x = 6 * 7\nprint(x)"
  assert traj.segments[6].text.startswith("Execution logs:\n42")
  assert traj.segments[8].text == "final_answer(42)"
  assert traj.action_format == "code"
  assert importers.detect_format(rec) == "smolagents"

  steps = {"steps": [
      {"task": "What is 6*7?", "task_images": None},
      {"plan": "1. compute", "model_input_messages": []},
      {"step_number": 1, "model_output": SMOL_ASSISTANT, "observations": "Execution logs:\n42",
       "error": None, "code_action": "x = 6 * 7\nprint(x)"},
      {"step_number": 2, "model_output": "Thought: oops\nCode:\n```py\n1/0\n```<end_code>",
       "observations": None, "error": {"type": "AgentExecutionError", "message": "division by zero"}},
  ]}
  traj = importers.import_smolagents_record(steps, source="t")
  assert kinds(traj) == ["task", "reason", "reason", "action", "observation", "reason", "action",
                         "observation"]
  assert traj.segments[-1].text == "Error: division by zero"
  # rendering a code action gives back the CodeAgent form
  assert "Code:\n```py\nx = 6 * 7\nprint(x)\n```<end_code>\n" in render.render_react(traj).text


def test_smolagents_bad():
  with pytest.raises(DataError) as e:
    importers.import_smolagents_record({"messages": [
        {"role": "user", "content": "New task:\nq"},
        {"role": "assistant", "content": "Thought: t\nCode:\n```py\n\n```<end_code>"}]},
        source="t")
  assert e.value.field == "messages[1].content" and "empty code" in str(e.value)


def test_ids_stable_and_unique(tmp_path):
  rec = {"instruction": "q", "output": "Thought: a\nAction: finish[b]\n"}
  path = helpers.write_jsonl(str(tmp_path / "dup.jsonl"), [rec, rec])
  a, b = importers.import_file(path)
  assert a.segments == b.segments and b.id == a.id + "-1"
  assert b.meta["duplicate_of"] == a.id
  assert importers.import_file(path)[0].id == a.id
  # given ids that collide with a renamed repeat: the repeat skips to a free suffix
  recs = [{**rec, "id": "a"}, {**rec, "id": "a"}, {**rec, "id": "a-1"}]
  path = helpers.write_jsonl(str(tmp_path / "ids.jsonl"), recs)
  ids = [t.id for t in importers.import_file(path)]
  assert len(set(ids)) == 3 and ids[:2] == ["a", "a-1"]


def test_few_shot_header_takes_the_last_question():
  text = ("Solve like the examples.\nQuestion: ex1\nThought: a\nAction: finish[b]\n"
          "Question: REAL Q\n")
  traj = importers.import_react_record({"prompt": text, "completion": "Thought: t\nAction: x\n"},
                                       source="t")
  assert traj.task == "REAL Q"


def test_text_before_the_first_marker_is_a_thought():
  traj = importers.import_react_record(
      {"instruction": "q", "output": "Let me think.\nAction: finish[b]\n"}, source="t")
  assert [s.kind for s in traj.segments] == ["task", "reason", "action"]
  assert traj.segments[1].text == "Let me think."


def test_records_of_the_wrong_type_name_the_record(tmp_path):
  path = helpers.write_jsonl(str(tmp_path / "t.jsonl"), [
      {"messages": [{"role": ["user"], "content": "q"}]},
      {"steps": [], "task": 5},
      {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": 7}]},
  ])
  skips = SkipReport(on_error="skip")
  assert importers.import_file(path, skips=skips) == []
  assert skips.count == 3
  assert "record 1, field 'messages[0].role': role must be a string" in skips.reasons[0]
  assert "record 2, field 'task': task must be a string" in skips.reasons[1]
  assert "record 3" in skips.reasons[2]


def test_unreadable_files(tmp_path):
  p = tmp_path / "bytes.jsonl"
  p.write_bytes(b'{"instruction": "q", "output": "Thought: a\\nAction: b\\n"}\n{"text": "\xff\xfe"}\n')
  with pytest.raises(DataError) as e:
    importers.import_file(p)
  assert e.value.record == 2 and "undecodable" in str(e.value)
  p = tmp_path / "broken.jsonl"
  p.write_text('{"instruction": "q", "output": "Thought: a\\nAction: b\\n"}\n{"text": \n')
  with pytest.raises(DataError) as e:
    importers.import_file(p)
  assert e.value.record == 2 and "malformed JSON" in str(e.value)
  p = tmp_path / "arr.json"
  p.write_text('[{"instruction": "q",\n "output" 3},\n {"instruction": "q"}]\n')
  with pytest.raises(DataError) as e:
    importers.import_file(p)
  assert "line 2" in str(e.value)
  with pytest.raises(DataError) as e:
    importers.import_file(helpers.write_json(str(tmp_path / "x.json"), [{"foo": 1}]))
  assert e.value.record == 1 and "cannot tell the format" in str(e.value)


def test_render_react_reimports_to_same_segments():
  for traj in helpers.synthetic_trajectories(50, seed=3, multiline=True):
    text = render.render_react(traj).text
    again = importers.import_react_record({"text": text}, source="x")
    assert again.segments == traj.segments
    assert again.segments[0] == Segment("task", traj.task)


EVAL_PROMPT = ("Solve a question answering task with interleaving Thought, Action, Observation "
               "steps.\n(1) Search[entity], which searches the entity.\n(2) Finish[answer]\n"
               "Here are some examples.\nQuestion: Who wrote X?\nThought 1: I search X.\n"
               "Action 1: Search[X]\nObservation 1: X was written by Y.\nThought 2: Y.\n"
               "Action 2: Finish[Y]\n\n")


def eval_traj(question: str, answer: str, reward: int) -> str:
  return (f"{EVAL_PROMPT}Question: {question}\nThought 1: I need to search {question}.\n"
          f"Action 1: Search[{question}]\nObservation 1: Something about it.\n"
          f"Thought 2: The answer is {answer}.\nAction 2: Finish[{answer}]\n"
          f"Observation 2: Episode finished, reward = {reward}\n")


def eval_log() -> dict:
  return {
      "1042": {"traj": eval_traj("Where is A?", "Paris", 1), "reward": 1, "em": 1, "f1": 1.0,
               "gt": "Paris", "pred": "Paris", "n_calls": 2},
      "7": {"traj": eval_traj("Who is B?", "Bob", 0), "reward": 0.0, "em": False,
            "gt": "Alice", "pred": "Bob"},
      # no reward: exact match decides
      "q-3": {"traj": eval_traj("What is C?", "c", 1), "em": True},
  }


@pytest.mark.parametrize("indent", [2, None])
def test_evaluation_log_object(tmp_path, indent):
  """A ReAct/FireAct evaluation run saved as one JSON object (pretty-printed or on one
  line): ids from the keys, success from reward/em, the few-shot examples dropped."""
  path = helpers.write_json(str(tmp_path / "run.json"), eval_log(), indent=indent)
  for fmt in ("auto", "evallog"):
    trajs = importers.import_file(path, fmt=fmt)
    assert [t.id for t in trajs] == ["1042", "7", "q-3"]
    assert [t.success for t in trajs] == [True, False, True]
    assert [t.task for t in trajs] == ["Where is A?", "Who is B?", "What is C?"]
    assert kinds(trajs[0]) == ["task"] + ["reason", "action", "observation"] * 2
    assert trajs[0].segments[5].text == "Finish[Paris]"
    assert trajs[1].meta == {"reward": 0.0, "em": False, "gt": "Alice", "pred": "Bob"}
  # the same file as JSONL lines (one record per line) still reads line by line
  jsonl = helpers.write_jsonl(str(tmp_path / "run.jsonl"),
                              [{"instruction": "q", "output": "Thought: a\nAction: finish[b]\n"}] * 2)
  assert len(importers.import_file(jsonl)) == 2


def test_pretty_printed_json_is_not_read_as_jsonl(tmp_path):
  """Detection parses: a pretty-printed single record or array is a JSON document, a
  one-record JSONL is one record, and a broken pretty-printed file names its line."""
  rec = {"instruction": "q", "output": "Thought: a\nAction: finish[b]\n"}
  one = helpers.write_json(str(tmp_path / "one.json"), rec, indent=2)
  assert [t.task for t in importers.import_file(one)] == ["q"]
  arr = helpers.write_json(str(tmp_path / "arr.json"), [rec, {**rec, "instruction": "r"}], indent=2)
  assert [t.task for t in importers.import_file(arr)] == ["q", "r"]
  line = helpers.write_jsonl(str(tmp_path / "line.jsonl"), [rec])
  assert [t.task for t in importers.import_file(line)] == ["q"]
  broken = tmp_path / "broken.json"
  text = json.dumps(eval_log(), indent=2).replace('"reward": 0.0', '"reward" 0.0')
  broken.write_text(text)
  lineno = text.split("\n").index('    "reward" 0.0,') + 1
  with pytest.raises(DataError) as e:
    importers.import_file(broken)
  assert e.value.path == str(broken) and e.value.record is None
  assert f"malformed JSON at line {lineno}: Expecting ':' delimiter" in str(e.value)


@pytest.mark.parametrize("mutate, field, message", [
    (lambda log: log["7"].pop("traj"), "traj", "missing field"),
    (lambda log: log["7"].update(traj=["Thought: a"]), "traj", "must be a string"),
    (lambda log: log["7"].update(reward="1"), "reward", "must be a number or a boolean"),
    (lambda log: log["7"].update(traj="Question: Q\nno markers"), "traj", "no 'Thought:'"),
    (lambda log: log.update({"7": None}), None, "expected a JSON object, got NoneType"),
])
def test_evaluation_log_bad_records(tmp_path, mutate, field, message):
  log = eval_log()
  mutate(log)
  path = helpers.write_json(str(tmp_path / "run.json"), log, indent=2)
  with pytest.raises(DataError) as e:
    importers.import_file(path)
  assert (e.value.path, e.value.record, e.value.field) == (path, 2, field)
  assert message in str(e.value) and "(id '7')" in str(e.value)
  skips = SkipReport(on_error="skip")
  assert [t.id for t in importers.import_file(path, skips=skips)] == ["1042", "q-3"]
  with pytest.raises(DataError, match="one JSON object mapping ids"):
    importers.import_file(helpers.write_jsonl(str(tmp_path / "l.jsonl"), [log, log]),
                          fmt="evallog")
