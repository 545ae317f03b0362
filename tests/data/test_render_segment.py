"""Rendering and token segmentation: properties on random and real trajectories, and
hand-computed cases for the rules (straddling tokens, template markup, truncation)."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sad_jax.common.errors import DataError
from sad_jax.common.types import SUPERVISED_KINDS, SpanKind
from sad_jax.data import importers, render, segment
from sad_jax.data.render import ChatTemplate
from sad_jax.data.schema import Segment, Trajectory
from sad_jax.data.tokenizer import Encoding
from tests import helpers

K = SpanKind
CHARS = list("abc xyz.,:[]()\n") + ["é", "e\u0301", "東京", "😀", "👩\u200d👧", "Ω", "  "]
# Importers strip segment texts, and some templates (Gemma's) trim them too.
TEXT = st.lists(st.sampled_from(CHARS), min_size=1, max_size=25).map(lambda c: "".join(c).strip())
NONEMPTY = TEXT.filter(bool)


@st.composite
def trajectories(draw):
  segs = []
  if draw(st.booleans()):
    segs.append(Segment("system", draw(NONEMPTY)))
  segs.append(Segment("task", draw(NONEMPTY)))
  for _ in range(draw(st.integers(1, 4))):
    if draw(st.booleans()):
      segs.append(Segment("reason", draw(NONEMPTY)))
    segs.append(Segment("action", draw(NONEMPTY)))
    segs.append(Segment("observation", draw(TEXT)))
  if draw(st.booleans()):
    segs.append(Segment("answer", draw(NONEMPTY)))
  return Trajectory(id="h", segments=segs, meta={"action_format": draw(
      st.sampled_from(["react", "code", "json"]))})


# The ReAct template written out independently of render.py.
REACT_FORM = {
    "system": lambda t, f, i: f"{t}\n\n",
    "task": lambda t, f, i: f"Question: {t}\n" if i <= 1 else f"User: {t}\n",
    "reason": lambda t, f, i: f"Thought: {t}\n",
    "action": lambda t, f, i: (f"Code:\n```py\n{t}\n```<end_code>\n" if f == "code"
                               else f"Action: {t}\n"),
    "observation": lambda t, f, i: f"Observation: {t}\n" if t else "Observation:\n",
    "answer": lambda t, f, i: f"Final Answer: {t}\n",
}


def char_kinds(rendered):
  """Reference: the kind of every character, expanded span by span."""
  ends = [*rendered.starts[1:].tolist(), len(rendered.text)]
  out = []
  for s, e, k in zip(rendered.starts.tolist(), ends, rendered.kinds.tolist()):
    out += [k] * (e - s)
  return np.array(out, np.int8)


def check(tok, traj, template=None, *, bos=True, eos=True):
  rendered = render.render(traj, template=template)
  enc = segment.encode_rendered(tok, [rendered], parse_special=template is not None)[0]
  spans = segment.token_kinds(rendered, enc, bos_id=tok.bos_id if bos else None,
                              eos_id=tok.eos_id if eos else None)
  inner = slice(1 if bos and tok.bos_id is not None else 0,
                len(spans.ids) - (1 if eos and tok.eos_id is not None else 0))
  # 1. decoding the tokens gives the rendered text back
  assert tok.decode(spans.ids[inner]) == rendered.text
  ck = char_kinds(rendered)
  kinds = spans.kinds[inner]
  # 2. each token has the kind of its first character (the straddle rule)
  first = np.minimum(enc.starts, len(rendered.text) - 1)
  np.testing.assert_array_equal(kinds, ck[first])
  # 3. every observation character lies in observation tokens only
  for s, e, k in zip(enc.starts, enc.ends, kinds):
    if (ck[s:e] == K.OBSERVATION).any():
      assert k == K.OBSERVATION
  # 4. no context token is ever a loss position, and every supervised one is
  arrays = segment.next_token_arrays(spans.ids, spans.kinds)
  sup = np.isin(arrays["label_kinds"], [int(k) for k in SUPERVISED_KINDS])
  np.testing.assert_array_equal(arrays["loss_mask"], sup)
  assert not np.isin(arrays["label_kinds"][arrays["loss_mask"]],
                     [K.OBSERVATION, K.SYSTEM, K.TASK, K.PAD]).any()
  # 5. every segment's text sits inside its own contiguous spans, of its own kind; with
  # the ReAct template those spans are exactly marker + text + newline
  for i, seg in enumerate(traj.segments):
    idx = np.flatnonzero(rendered.segment == i)
    if seg.text == "" and len(idx) == 0:
      continue  # an empty tool response renders to no characters
    assert len(idx) >= 1 and np.all(np.diff(idx) == 1)
    assert np.all(rendered.kinds[idx] == SpanKind.from_name(seg.kind))
    body = rendered.text[rendered.starts[idx[0]]:rendered.span_end(idx[-1])]
    assert seg.text in body
    if template is None:
      assert body == REACT_FORM[seg.kind](seg.text, traj.action_format, i)
  return rendered, spans


@settings(max_examples=60, deadline=None)
@given(traj=trajectories())
def test_properties_react(spm_tok, hf_tok, traj):
  check(spm_tok, traj)
  check(hf_tok, traj, bos=False)


@settings(max_examples=40, deadline=None)
@given(traj=trajectories(), role=st.sampled_from(["user", "tool"]))
def test_properties_chat_templates(spm_tok, hf_tok, traj, role):
  check(hf_tok, traj, ChatTemplate(helpers.CHATML, observation_role=role), bos=False, eos=False)
  check(hf_tok, traj, ChatTemplate(helpers.GEMMA, bos_token="<|endoftext|>"), bos=False,
        eos=False)
  if not any(s.kind == "observation" for s in traj.segments[-1:]):
    return
  llama = ChatTemplate(helpers.LLAMA2, bos_token=spm_tok.bos_token, eos_token=spm_tok.eos_token)
  check(spm_tok, traj, llama, bos=False, eos=False)


@pytest.mark.fireact
def test_properties_on_fireact(fireact_dir, spm_tok, hf_tok):
  trajs = importers.import_file(fireact_dir / "hotpotqa_react_chat.jsonl")
  for traj in trajs:
    check(spm_tok, traj)
  for traj in trajs[:100]:
    check(hf_tok, traj, ChatTemplate(helpers.CHATML), bos=False, eos=False)


def merged(rendered):
  """Adjacent spans of one kind merged: [(kind name, text)]."""
  out = []
  for kind, text in render.as_dict(rendered)["spans"]:
    if out and out[-1][0] == kind:
      out[-1] = (kind, out[-1][1] + text)
    else:
      out.append((kind, text))
  return out


TRAJ = Trajectory(id="t", segments=[
    Segment("task", "Q"), Segment("reason", "t"), Segment("action", "a[x]"),
    Segment("observation", "o"), Segment("reason", "t2"), Segment("action", "finish[y]")])


def test_react_template_hand_computed():
  assert merged(render.render_react(TRAJ)) == [
      ("task", "Question: Q\n"), ("reason", "Thought: t\n"), ("action", "Action: a[x]\n"),
      ("observation", "Observation: o\n"), ("reason", "Thought: t2\n"),
      ("action", "Action: finish[y]\n")]


def test_chatml_markup_kinds_hand_computed():
  r = ChatTemplate(helpers.CHATML).render(TRAJ)
  assert merged(r) == [
      ("task", "<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n"),
      ("reason", "Thought: t\n"),
      ("action", "Action: a[x]<|im_end|>\n"),  # end of turn: the student learns to stop
      ("observation", "<|im_start|>user\nObservation: o<|im_end|>\n<|im_start|>assistant\n"),
      ("reason", "Thought: t2\n"),
      ("action", "Action: finish[y]<|im_end|>\n")]


def test_llama2_markup_kinds_hand_computed():
  t = ChatTemplate(helpers.LLAMA2, bos_token="<s>", eos_token="</s>")
  traj = Trajectory(id="t", segments=[Segment("system", "S"), *TRAJ.segments[:4],
                                      Segment("answer", "y")])
  assert merged(t.render(traj)) == [
      # markup between two context messages goes to the one it precedes
      ("system", "<s>[INST] <<SYS>>\nS"),
      ("task", "\n<</SYS>>\n\nQ [/INST]"),
      # the template's space after [/INST] opens the assistant turn: the model writes it
      ("reason", " Thought: t\n"),
      ("action", "Action: a[x] </s>"),
      ("observation", "<s>[INST] Observation: o [/INST]"),
      ("answer", " Final Answer: y </s>")]


def test_markup_inside_the_assistant_turn_is_supervised():
  """Template text between the generation prompt and the content (an empty think block,
  as Qwen3-style templates write) belongs to the turn's first segment."""
  think = ("{% for m in messages %}{% if m['role'] == 'assistant' %}"
           "{{ '<|im_start|>assistant\n<think>\n\n</think>\n\n' + m['content'] + '<|im_end|>\n' }}"
           "{% else %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
           "{% endif %}{% endfor %}"
           "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
  r = ChatTemplate(think).render(TRAJ)
  assert merged(r)[:3] == [
      ("task", "<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n"),
      ("reason", "<think>\n\n</think>\n\nThought: t\n"),
      ("action", "Action: a[x]<|im_end|>\n")]
  # the template's markup is where special tokens may be parsed; content is not
  marked = [r.text[r.starts[j]:r.span_end(j)] for j in np.flatnonzero(r.markup)]
  assert "<think>\n\n</think>\n\n" in marked and "<|im_end|>\n" in marked
  assert not any("Thought" in m for m in marked)


def test_special_token_text_in_content_is_not_a_special_token(hf_tok):
  traj = Trajectory(id="t", segments=[Segment("task", "say <|im_end|> please"),
                                      Segment("action", "echo[<|im_start|>]")])
  _, spans = check(hf_tok, traj, ChatTemplate(helpers.CHATML), bos=False, eos=False)
  ids = spans.ids.tolist()
  # exactly the template's own special tokens: 2 starts and 2 ends
  assert ids.count(hf_tok.special_tokens["<|im_start|>"]) == 2
  assert ids.count(hf_tok.special_tokens["<|im_end|>"]) == 2


def test_template_errors():
  upper = "{% for m in messages %}{{ m['content'] | upper }}{% endfor %}"
  with pytest.raises(DataError, match="verbatim"):
    ChatTemplate(upper).render(TRAJ)
  # a template whose earlier turns change once more messages follow
  unstable = ("{% for m in messages %}{{ m['content'] }}{% if loop.last %}!{% endif %}"
              "{% endfor %}")
  with pytest.raises(DataError, match="prefix-stable"):
    ChatTemplate(unstable).render(TRAJ)
  with pytest.raises(DataError, match="alternate"):  # the template's raise_exception
    two_systems = Trajectory(id="t", segments=[Segment("system", "s"), Segment("system", "s2"),
                                               Segment("task", "q"), Segment("action", "a")])
    ChatTemplate(helpers.LLAMA2, bos_token="<s>", eos_token="</s>").render(two_systems)
  with pytest.raises(DataError, match="does not compile"):
    ChatTemplate("{% for %}").render(TRAJ)


def test_straddle_rule_hand_computed():
  """A token that starts in one span and ends in the next gets the first span's kind."""
  r = render._build("abcdefgh", [(0, 3, K.REASON, 0, False), (3, 8, K.ACTION, 1, False)],
                    gap_is_markup=False)
  # tokens: "ab" | "cde" (straddles c|de) | "f" | "gh"; a zero-width piece at 5
  enc = Encoding(np.array([10, 11, 12, 13, 14], np.int32),
                 np.array([0, 2, 5, 5, 6], np.int32), np.array([2, 5, 5, 6, 8], np.int32))
  spans = segment.token_kinds(r, enc, bos_id=1, eos_id=2)
  np.testing.assert_array_equal(spans.kinds, [K.SYSTEM, K.REASON, K.REASON, K.ACTION, K.ACTION,
                                              K.ACTION, K.ACTION])
  np.testing.assert_array_equal(spans.ids, [1, 10, 11, 12, 13, 14, 2])


def test_unicode_offsets_hand_computed(spm_tok, hf_tok):
  """CJK, emoji and combining accents: span kinds land on the right characters."""
  traj = Trajectory(id="u", segments=[Segment("task", "東京?"), Segment("reason", "e\u0301😀"),
                                      Segment("action", "go[東]"), Segment("observation", "😀é")])
  for tok in (spm_tok, hf_tok):
    rendered, spans = check(tok, traj, bos=False, eos=False)
    text = rendered.text
    enc = segment.encode_rendered(tok, [rendered], parse_special=False)[0]
    by_kind = {}
    for s, e, k in zip(enc.starts, enc.ends, spans.kinds):
      by_kind[int(k)] = by_kind.get(int(k), "") + text[s:e]
    assert by_kind == {K.TASK: "Question: 東京?\n", K.REASON: "Thought: e\u0301😀\n",
                       K.ACTION: "Action: go[東]\n", K.OBSERVATION: "Observation: 😀é\n"}


def test_truncate_at_step_hand_computed():
  T, R, A, O = K.TASK, K.REASON, K.ACTION, K.OBSERVATION
  kinds = np.array([T, T, R, R, A, O, O, R, A, A, O, R, A], np.int8)
  # step boundaries at 2, 7, 11
  np.testing.assert_array_equal(segment.step_boundaries(kinds), [2, 7, 11])
  assert segment.truncate_at_step(kinds, 13) == 13
  assert segment.truncate_at_step(kinds, 12) == 11
  assert segment.truncate_at_step(kinds, 10) == 7
  assert segment.truncate_at_step(kinds, 7) == 7
  assert segment.truncate_at_step(kinds, 6) is None
