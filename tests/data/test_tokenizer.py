"""Tokenizers: exact round trip, character offsets, the sentencepiece and HF back ends."""

import io

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sad_jax.common.errors import DataError
from sad_jax.data.tokenizer import (
  SentencePieceTokenizer,
  byte_to_char,
  load_tokenizer,
  train_sentencepiece,
)
from tests import helpers

TRICKY = [
    "",
    "plain ascii",
    "  two  spaces\n\nnewlines\t\ttabs  \n",
    "東京の世界 數學",
    "emoji 😀🎉 and 👩‍👩‍👧 family",
    "combining e\u0301 vs é, a\u0308\u0301",
    "Observation: naïve café\nThought: ∑ Ω 100 3.14\n",
    "\n leading newline and trailing space ",
    "a\u2581b literal sentencepiece space \u2581\u2581",
]
# Multi-character pieces too (combining accents, ZWJ sequences): joined from a list.
TEXT = st.lists(st.sampled_from(list("ab xy\n\t.:[]") + ["é", "e\u0301", "東", "😀",
                                                        "👩\u200d👧", "Ω", "\u00a0", "\u2581"]),
                max_size=40).map("".join)


def check_offsets(tok, text, enc):
  """Offsets are monotone and tile the text; each token's piece is its slice."""
  assert len(enc.ids) == len(enc.starts) == len(enc.ends)
  assert np.all(enc.starts <= enc.ends)
  assert np.all(enc.starts[1:] >= enc.starts[:-1])
  covered = "".join(text[s:e] for s, e in zip(enc.starts, enc.ends))
  assert covered == text


@pytest.mark.parametrize("text", TRICKY)
def test_spm_round_trip_and_offsets(spm_tok, text):
  enc = spm_tok.encode(text)
  # sentencepiece writes spaces as U+2581, so a literal U+2581 decodes as a space: the
  # one character without an exact round trip (its offsets are still right)
  assert spm_tok.decode(enc.ids) == text.replace("\u2581", " ")
  check_offsets(spm_tok, text, enc)


@settings(max_examples=200, deadline=None)
@given(text=TEXT)
def test_spm_fast_offsets_equal_sentencepiece_spans(spm_tok, text):
  """Offsets from piece byte lengths equal sentencepiece's own byte spans, converted."""
  fast = spm_tok.encode(text)
  slow = spm_tok._encode_proto(text, [(0, text, None, False)]) if text else fast
  np.testing.assert_array_equal(fast.ids, slow.ids)
  np.testing.assert_array_equal(fast.starts, slow.starts)
  np.testing.assert_array_equal(fast.ends, slow.ends)
  assert spm_tok.decode(fast.ids) == text.replace("\u2581", " ")


@settings(max_examples=100, deadline=None)
@given(text=TEXT, cut=st.integers(0, 60))
def test_cuts_are_token_boundaries(spm_tok, hf_tok, text, cut):
  cut = min(cut, len(text))
  for tok in (spm_tok, hf_tok):
    enc = tok.encode_batch([text], cuts=[[cut]])[0]
    assert tok.decode(enc.ids) == (text.replace("\u2581", " ") if tok is spm_tok else text)
    check_offsets(tok, text, enc)
    assert not np.any((enc.starts < cut) & (enc.ends > cut))


def test_byte_to_char():
  text = "aé東😀"
  b2c = byte_to_char(text)
  # bytes: a=1, é=2, 東=3, 😀=4 → char index of each byte, then the end
  np.testing.assert_array_equal(b2c, [0, 1, 1, 2, 2, 2, 3, 3, 3, 3, 4])
  assert byte_to_char("ascii") is None


def test_byte_fallback_pieces_map_to_their_character(spm_tok):
  text = "x😀y"
  enc = spm_tok.encode(text)
  pieces = [spm_tok.piece(i) for i in enc.ids]
  # the emoji is rare in training data: it comes as 4 byte pieces, all starting at char 1
  byte_idx = [j for j, p in enumerate(pieces) if p.startswith("<0x")]
  if byte_idx:
    assert len(byte_idx) == 4
    assert all(enc.starts[j] == 1 for j in byte_idx)
    assert [enc.ends[j] for j in byte_idx] == [1, 1, 1, 2]


def test_llama2_style_model(tmp_path):
  """A model trained with Llama-2's settings (dummy prefix) loads and gives offsets."""
  import sentencepiece as spm

  buf = io.BytesIO()
  texts = [helpers._sentence(__import__("random").Random(i), 5, 30) for i in range(300)]
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(texts), model_writer=buf, vocab_size=600, model_type="bpe",
      normalization_rule_name="identity", add_dummy_prefix=True, byte_fallback=True,
      remove_extra_whitespaces=False, split_digits=True, minloglevel=2, hard_vocab_limit=False)
  path = tmp_path / "tokenizer.model"
  path.write_bytes(buf.getvalue())
  tok = load_tokenizer(tmp_path)  # a folder with tokenizer.model
  assert isinstance(tok, SentencePieceTokenizer) and not tok.chunk_safe
  assert tok.bos_token == "<s>" and tok.eos_token == "</s>"
  for text in ["the key is in the drawer", "go north 東京 😀"]:
    enc = tok.encode(text)
    assert tok.decode(enc.ids) == text
    check_offsets(tok, text, enc)


def test_train_exact_round_trip_on_corpus(tmp_path):
  texts = [t for t in TRICKY if t and "\u2581" not in t] * 20
  tok = train_sentencepiece(texts, vocab_size=400, out_path=str(tmp_path / "m.model"))
  assert all(tok.decode(tok.encode(t).ids) == t for t in texts)
  again = load_tokenizer(tmp_path / "m.model")
  assert again.fingerprint == tok.fingerprint


def test_multiword_pieces_halve_templated_text_and_respect_cuts(tmp_path):
  """split_by_whitespace=False: pieces hold phrases of templated text (game rooms), the round
  trip stays exact, and a cut (a span edge) still splits a phrase."""
  rng = np.random.default_rng(0)
  things = ["stove", "counter", "shelf", "sofa", "coin", "fridge", "oven", "bed"]
  rooms = ["kitchen", "pantry", "corridor", "bedroom", "living room"]
  texts = []
  for _ in range(200):
    room = " ".join(f"In one part of the room you see a {t}." for t in rng.choice(things, 4))
    texts.append(f"You are in the {rng.choice(rooms)}. {room}\nTo the North you see the "
                 f"{rng.choice(rooms)}. Thought: move north.\n")
  words = sum(len(t.split()) for t in texts)
  one = train_sentencepiece(texts, vocab_size=500, out_path=str(tmp_path / "w.model"))
  multi = train_sentencepiece(texts, vocab_size=500, out_path=str(tmp_path / "m.model"),
                              split_by_whitespace=False, max_piece_length=64)
  n_one = sum(len(one.encode(t).ids) for t in texts)
  n_multi = sum(len(multi.encode(t).ids) for t in texts)
  assert n_one >= words  # whitespace-split pieces: at least a token a word
  assert n_multi < 0.5 * n_one, (n_multi, n_one)
  assert any("\u2581" in multi.piece(i)[1:] for i in range(multi.vocab_size))
  for t in texts[:20]:
    enc = multi.encode(t)
    assert multi.decode(enc.ids) == t
    check_offsets(multi, t, enc)
    cut = t.index(" you see")  # inside the most frequent phrase
    enc = multi.encode_batch([t], cuts=[[cut]])[0]
    assert multi.decode(enc.ids) == t
    assert not np.any((enc.starts < cut) & (enc.ends > cut))


def test_hf_tokenizer(hf_tok):
  assert hf_tok.kind == "hf" and hf_tok.chunk_safe
  assert hf_tok.eos_token == "<|im_end|>" and hf_tok.eos_id is not None
  for text in TRICKY:
    enc = hf_tok.encode(text)
    assert hf_tok.decode(enc.ids) == text
    check_offsets(hf_tok, text, enc)
  text = "<|im_start|>user\nhi<|im_end|>"
  enc = hf_tok.encode(text, parse_special=True)
  assert enc.ids[0] == hf_tok.special_tokens["<|im_start|>"]
  assert enc.ids[-1] == hf_tok.eos_id
  check_offsets(hf_tok, text, enc)
  plain = hf_tok.encode(text)  # special strings in content stay text
  assert not set(hf_tok.special_tokens.values()) & set(plain.ids.tolist())
  assert hf_tok.decode(plain.ids) == text


def test_spm_special_tokens(spm_tok):
  text = "<s>Thought: a</s>b"
  plain = spm_tok.encode(text)
  special = spm_tok.encode(text, parse_special=True)
  assert spm_tok.bos_id not in plain.ids
  assert special.ids[0] == spm_tok.bos_id and spm_tok.eos_id in special.ids
  assert spm_tok.decode(special.ids) == text
  check_offsets(spm_tok, text, special)


def test_bad_tokenizer_files(tmp_path):
  (tmp_path / "junk.model").write_bytes(b"not a model")
  with pytest.raises(DataError, match="not a sentencepiece model"):
    load_tokenizer(tmp_path / "junk.model")
  (tmp_path / "tokenizer.json").write_text("{\"nope\": 1}")
  with pytest.raises(DataError, match="not a tokenizer.json"):
    load_tokenizer(tmp_path / "tokenizer.json")
  with pytest.raises(DataError, match="not found"):
    load_tokenizer(tmp_path / "missing.model")
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(DataError, match="neither"):
    load_tokenizer(empty)
