"""Tokenizers behind one small interface, with per-token character offsets.

Two back ends:
  * sentencepiece `.model` files (ours, trained by `train_sentencepiece`, or a
    Llama-2 / Gemma style model). sentencepiece reports UTF-8 byte offsets; they are
    converted to character offsets here. With byte fallback, the bytes of one
    character come as several pieces: all but the last are zero-width at the
    character's start, so every piece maps to the character it belongs to.
  * Hugging Face `tokenizer.json` (the `tokenizers` library), optionally with the
    `tokenizer_config.json` beside it for the chat template and special tokens.

Offsets are half-open character ranges [start, end) into the encoded string.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import re
from collections.abc import Iterable, Sequence

import numpy as np

from sad_jax.common import fileio
from sad_jax.common.errors import DataError
from sad_jax.common.fileio import atomic_write


@dataclasses.dataclass(frozen=True)
class Encoding:
  ids: np.ndarray      # int32[n]
  starts: np.ndarray   # int32[n] character offset of each token's first character
  ends: np.ndarray     # int32[n]


def byte_to_char(text: str) -> np.ndarray | None:
  """int32[n_bytes + 1]: character index of each UTF-8 byte offset (None if ASCII)."""
  raw = text.encode("utf-8")
  if len(raw) == len(text):
    return None
  b = np.frombuffer(raw, np.uint8)
  is_start = (b & 0xC0) != 0x80
  out = np.zeros(len(b) + 1, np.int32)
  np.cumsum(is_start, out=out[1:])
  # out[k] = number of characters that start before byte k; for byte k inside a
  # character this is that character's index + 1, so snap back to its start.
  out[:-1] -= ~is_start
  return out


class _EncodeOne:
  """`encode` of one text, through the tokenizer's `encode_batch` (both kinds share it)."""

  def encode(self, text: str, *, parse_special: bool = False) -> Encoding:
    return self.encode_batch([text], special_regions=[[(0, len(text))]] if parse_special
                             else None)[0]


class SentencePieceTokenizer(_EncodeOne):
  """A sentencepiece model; `special_tokens` are split out of the text before encoding."""

  kind = "sentencepiece"

  def __init__(self, model_proto: bytes, *, path: str = "<bytes>"):
    import sentencepiece as spm

    self.path = path
    self._proto = model_proto
    self.sp = spm.SentencePieceProcessor()
    try:
      self.sp.LoadFromSerializedProto(model_proto)
    except RuntimeError as e:
      raise DataError(f"not a sentencepiece model: {e}", path=path) from None
    self.vocab_size = int(self.sp.GetPieceSize())
    self.bos_id = _opt_id(self.sp.bos_id())
    self.eos_id = _opt_id(self.sp.eos_id())
    self.pad_id = _opt_id(self.sp.pad_id())
    # Control and user-defined pieces (e.g. <start_of_turn>) that chat templates write.
    from sentencepiece import sentencepiece_model_pb2

    model = sentencepiece_model_pb2.ModelProto()
    model.ParseFromString(model_proto)
    special_types = (model.SentencePiece.CONTROL, model.SentencePiece.USER_DEFINED)
    self.special_tokens = {p.piece: i for i, p in enumerate(model.pieces)
                           if p.type in special_types and p.piece.strip()}
    # Fast offsets: with identity normalisation and no dummy prefix the pieces' bytes
    # concatenate to the input, so offsets are a cumulative sum of piece byte lengths.
    norm = model.normalizer_spec
    # Encoding pieces of a text separately and concatenating equals encoding a text
    # whose token boundaries fall there, unless a dummy prefix is added per call.
    self.chunk_safe = not norm.add_dummy_prefix
    self._special_re = re.compile("(" + "|".join(
        re.escape(t) for t in sorted(self.special_tokens, key=len, reverse=True)) + ")")
    self._piece_bytes = None
    if (norm.name == "identity" and not norm.add_dummy_prefix
        and not norm.remove_extra_whitespaces
        and not model.trainer_spec.treat_whitespace_as_suffix):
      self._piece_bytes = np.array(
          [1 if p.type == p.BYTE else
           0 if p.type in (p.CONTROL, p.UNKNOWN) else
           len(p.piece.replace("\u2581", " ").encode("utf-8")) for p in model.pieces], np.int32)
    self.bos_token = self.sp.IdToPiece(self.bos_id) if self.bos_id is not None else None
    self.eos_token = self.sp.IdToPiece(self.eos_id) if self.eos_id is not None else None
    self.chat_template: str | None = None
    self.fingerprint = hashlib.sha256(model_proto).hexdigest()

  @classmethod
  def from_file(cls, path: str | os.PathLike) -> SentencePieceTokenizer:
    path = os.fspath(path)
    try:
      blob = fileio.read_bytes(path)  # bytes in: a gs:// model needs no local copy
    except OSError as e:
      raise DataError(f"cannot read tokenizer: {e.strerror or e}", path=path) from None
    return cls(blob, path=path)

  def encode_batch(self, texts: Sequence[str], *, cuts: Cuts = None,
                   special_regions: Regions = None) -> list[Encoding]:
    """Encodes texts. No token crosses a position in `cuts[i]`; special token strings
    map to their ids only inside `special_regions[i]` (template markup), never in
    content. (sentencepiece always matches its user-defined pieces, wherever they are.)"""
    chunked = [_chunks(t, None if cuts is None else cuts[i],
                       None if special_regions is None else special_regions[i],
                       self._special_re, self.special_tokens) for i, t in enumerate(texts)]
    plain = [c for ch in chunked for (_, c, sid, _) in ch if sid is None]
    if self._piece_bytes is None:
      return [self._encode_proto(t, ch) for t, ch in zip(texts, chunked)]
    plain_ids = iter(self.sp.encode(plain) if plain else [])
    unk = self.sp.unk_id()
    out = []
    for text, ch in zip(texts, chunked):
      ids_parts, len_parts = [], []
      for _, chunk, sid, _ in ch:
        if sid is None:
          ids = np.asarray(next(plain_ids), np.int32)
          ids_parts.append(ids)
          len_parts.append(self._piece_bytes[ids])
        else:
          ids_parts.append(np.array([sid], np.int32))
          len_parts.append(np.array([len(chunk.encode("utf-8"))], np.int32))
      ids = np.concatenate(ids_parts) if ids_parts else np.zeros(0, np.int32)
      lengths = np.concatenate(len_parts) if len_parts else np.zeros(0, np.int32)
      ends = np.cumsum(lengths, dtype=np.int32)
      # An unknown piece, or a literal "▁" in the text (1 byte in the table, 3 in the
      # text), breaks the byte arithmetic: take sentencepiece's own spans then.
      if (ids == unk).any() or (len(ends) and ends[-1] != len(text.encode("utf-8"))):
        out.append(self._encode_proto(text, ch))
        continue
      starts = ends - lengths
      b2c = byte_to_char(text)
      if b2c is not None:
        starts, ends = b2c[starts], b2c[ends]
      out.append(Encoding(ids, starts, ends))
    return out

  def _encode_proto(self, text: str, chunks: list[Chunk]) -> Encoding:
    """Offsets from sentencepiece's own (byte) spans: works for any normaliser."""
    del text
    ids, starts, ends = [], [], []
    for at, chunk, sid, _ in chunks:
      if sid is not None:
        ids.append(sid)
        starts.append(at)
        ends.append(at + len(chunk))
        continue
      proto = self.sp.encode(chunk, out_type="proto")
      b2c = byte_to_char(chunk)
      for p in proto.pieces:
        b, e = (p.begin, p.end) if b2c is None else (b2c[p.begin], b2c[p.end])
        ids.append(p.id)
        starts.append(at + b)
        ends.append(at + e)
    return Encoding(np.array(ids, np.int32), np.array(starts, np.int32),
                    np.array(ends, np.int32))

  def decode(self, ids: Iterable[int]) -> str:
    # Decode runs of ordinary pieces with sentencepiece (byte pieces must be joined
    # before decoding) and write control pieces out as their text.
    out, run = [], []
    for i in ids:
      i = int(i)
      if self.sp.IsControl(i):
        if run:
          out.append(self.sp.decode(run))
          run = []
        out.append(self.sp.IdToPiece(i))
      else:
        run.append(i)
    if run:
      out.append(self.sp.decode(run))
    return "".join(out)

  def piece(self, i: int) -> str:
    return self.sp.IdToPiece(int(i))

  def save(self, path: str | os.PathLike) -> None:
    with atomic_write(path, "wb") as f:
      f.write(self._proto)


  def to_hf_json(self) -> str:
    """An HF `tokenizer.json` that encodes as this model does (same ids), for models with
    an exact round trip (identity normalisation, no dummy prefix, whitespace kept, byte
    fallback: `train_sentencepiece`'s). BPE gets merges rebuilt from the pieces: every
    split of a piece into two pieces merges, ranked by the piece's score (sentencepiece
    merges the adjacent pair whose union scores highest, leftmost first, as `tokenizers`
    does by rank). Control and user-defined pieces are added tokens, matched first."""
    from sentencepiece import sentencepiece_model_pb2
    from tokenizers import AddedToken, Regex, decoders, models, normalizers, processors
    from tokenizers import Tokenizer as HFTok

    m = sentencepiece_model_pb2.ModelProto()
    m.ParseFromString(self._proto)
    norm, trainer = m.normalizer_spec, m.trainer_spec
    exact = (norm.name == "identity" and not norm.add_dummy_prefix
             and not norm.remove_extra_whitespaces and trainer.byte_fallback
             and not trainer.treat_whitespace_as_suffix)
    if not exact:
      raise DataError("only sentencepiece models with identity normalisation, no dummy "
                      "prefix, whitespace kept and byte fallback convert exactly",
                      path=self.path, field="normalizer_spec")
    P = m.SentencePiece
    pieces = list(m.pieces)
    unk = next((i for i, p in enumerate(pieces) if p.type == P.UNKNOWN), None)
    if trainer.model_type == trainer.BPE:
      vocab = {p.piece: i for i, p in enumerate(pieces)}
      merges = []
      for i, p in enumerate(pieces):
        if p.type != P.NORMAL or len(p.piece) < 2:
          continue
        for k in range(1, len(p.piece)):
          left, right = p.piece[:k], p.piece[k:]
          if left in vocab and right in vocab:
            merges.append((-p.score, i, vocab[left], (left, right)))
      merges.sort()
      model = models.BPE(vocab=vocab, merges=[m_[3] for m_ in merges],
                         unk_token=pieces[unk].piece if unk is not None else None,
                         fuse_unk=True, byte_fallback=True)
    else:
      # A unigram model converts too, but `tokenizers` cannot keep Viterbi off its control
      # and byte pieces, so text that spells "<s>" would get another id: not exact.
      raise DataError("only BPE sentencepiece models convert exactly", path=self.path,
                      field="model_type")
    hf = HFTok(model)
    # sentencepiece writes a space as U+2581 before segmenting; nothing else changes.
    hf.normalizer = normalizers.Replace(Regex(" "), "\u2581")
    hf.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                    decoders.Fuse()])
    hf.add_tokens([AddedToken(p.piece, special=False, normalized=False)
                   for p in pieces if p.type == P.USER_DEFINED])
    hf.add_special_tokens([AddedToken(p.piece, special=True, normalized=False)
                           for p in pieces if p.type in (P.CONTROL, P.UNKNOWN)])
    if self.bos_token is not None:
      hf.post_processor = processors.TemplateProcessing(
          single=f"{self.bos_token} $A", pair=f"{self.bos_token} $A $B",
          special_tokens=[(self.bos_token, self.bos_id)])
    return hf.to_str()

  def hf_config(self) -> dict:
    """The tokenizer_config.json entries that go with `to_hf_json`."""
    pad = self.sp.IdToPiece(self.pad_id) if self.pad_id is not None else None
    unk = self.sp.unk_id()
    return {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": self.bos_token,
            "eos_token": self.eos_token, "pad_token": pad,
            "unk_token": self.sp.IdToPiece(unk) if unk >= 0 else None,
            "clean_up_tokenization_spaces": False}


def _opt_id(i: int) -> int | None:
  return None if i is None or i < 0 else int(i)


Cuts = Sequence[Sequence[int]] | None
Regions = Sequence[Sequence[tuple[int, int]]] | None
Chunk = tuple[int, str, int | None, bool]  # (char offset, text, special id, specials parsed)


def _chunks(text: str, cuts: Sequence[int] | None, regions: Sequence[tuple[int, int]] | None,
            special_re: re.Pattern | None, specials: dict[str, int]) -> list[Chunk]:
  """Pieces of `text` split at the cuts and at region edges; inside a region, special
  token strings are pieces of their own with their id."""
  regions = list(regions or ())
  edges = [e for r in regions for e in r]
  bounds = sorted({0, len(text), *(int(c) for c in [*(() if cuts is None else cuts), *edges]
                                    if 0 < c < len(text))})
  out: list[Chunk] = []
  for a, b in zip(bounds[:-1], bounds[1:]):
    piece = text[a:b]
    parse = any(lo <= a and b <= hi for lo, hi in regions)
    if not parse or special_re is None or not specials:
      out.append((a, piece, None, parse))
      continue
    pos = a
    for part in special_re.split(piece):
      if part:
        out.append((pos, part, specials.get(part), True))
        pos += len(part)
  return out


class HFTokenizer(_EncodeOne):
  """A Hugging Face `tokenizer.json`, with `tokenizer_config.json` when it is beside it."""

  kind = "hf"

  def __init__(self, tokenizer_json: str, *, config: dict | None = None, path: str = "<str>"):
    from tokenizers import Tokenizer

    self.path = path
    self._json = tokenizer_json
    try:
      self.tok = Tokenizer.from_str(tokenizer_json)
    except Exception as e:  # the library raises plain Exceptions
      raise DataError(f"not a tokenizer.json: {e}", path=path) from None
    config = config or {}
    self.vocab_size = int(self.tok.get_vocab_size(with_added_tokens=True))
    self.chat_template = config.get("chat_template")
    self.bos_token = _token_text(config.get("bos_token"))
    self.eos_token = _token_text(config.get("eos_token"))
    self.bos_id = self.tok.token_to_id(self.bos_token) if self.bos_token else None
    self.eos_id = self.tok.token_to_id(self.eos_token) if self.eos_token else None
    pad = _token_text(config.get("pad_token"))
    self.pad_id = self.tok.token_to_id(pad) if pad else None
    self.special_tokens = {t.content: self.tok.token_to_id(t.content)
                           for t in self.tok.get_added_tokens_decoder().values() if t.special}
    # A prefix space or metaspace added per call would put spaces at chunk joints.
    probe = self.tok.encode_batch(["Ab", "c\nd"], add_special_tokens=False)
    self.chunk_safe = self.tok.decode(probe[0].ids + probe[1].ids) == "Abc\nd"
    self.fingerprint = hashlib.sha256(
        tokenizer_json.encode() + json.dumps(config, sort_keys=True, default=str).encode()
    ).hexdigest()

  @classmethod
  def from_path(cls, path: str | os.PathLike) -> HFTokenizer:
    path = os.fspath(path)
    is_dir = fileio.isdir(path)
    folder = path if is_dir else fileio.dirname(path)
    tj = fileio.join(path, "tokenizer.json") if is_dir else path
    try:
      text = fileio.read_text(tj)
    except (OSError, UnicodeDecodeError) as e:
      raise DataError(f"cannot read tokenizer: {e}", path=tj) from None
    config = None
    cfg_path = fileio.join(folder, "tokenizer_config.json")
    if fileio.exists(cfg_path):
      try:
        config = json.loads(fileio.read_text(cfg_path))
      except (OSError, ValueError) as e:
        raise DataError(f"cannot read tokenizer config: {e}", path=cfg_path) from None
    return cls(text, config=config, path=tj)

  def encode_batch(self, texts: Sequence[str], *, cuts: Cuts = None,
                   special_regions: Regions = None) -> list[Encoding]:
    """As SentencePieceTokenizer.encode_batch."""
    chunked = [_chunks(t, None if cuts is None else cuts[i],
                       None if special_regions is None else special_regions[i], None, {})
               for i, t in enumerate(texts)]
    flat = [c for ch in chunked for c in ch]
    encs: list = [None] * len(flat)
    for parse in (False, True):
      idx = [j for j, c in enumerate(flat) if c[3] == parse]
      if not idx:
        continue
      # encode_special_tokens=True means "special token strings are plain text"
      self.tok.encode_special_tokens = not parse
      for j, e in zip(idx, self.tok.encode_batch([flat[j][1] for j in idx],
                                                 add_special_tokens=False)):
        encs[j] = e
    self.tok.encode_special_tokens = False
    out, j = [], 0
    for ch in chunked:
      ids, starts, ends = [], [], []
      for at, chunk, _, _ in ch:
        e = encs[j]
        j += 1
        off = np.asarray(e.offsets, np.int32).reshape(-1, 2)
        s_, e_ = off[:, 0].copy(), off[:, 1].copy()
        if len(s_):
          # Make the offsets tile the chunk: byte-level pieces that split a character
          # each report the whole character (end each token where the next starts, so
          # all but the last are zero-width, as with sentencepiece), and tokenizers that
          # trim offsets leave whitespace out (give it to the token that follows).
          np.minimum(e_[:-1], s_[1:], out=e_[:-1])
          s_[1:] = e_[:-1]
          s_[0], e_[-1] = 0, len(chunk)
        ids.append(np.asarray(e.ids, np.int32))
        starts.append(s_ + at)
        ends.append(e_ + at)
      cat = lambda xs: np.concatenate(xs).astype(np.int32) if xs else np.zeros(0, np.int32)
      out.append(Encoding(cat(ids), cat(starts), cat(ends)))
    return out

  def decode(self, ids: Iterable[int]) -> str:
    return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)

  def piece(self, i: int) -> str:
    return self.tok.id_to_token(int(i)) or ""

  def save(self, path: str | os.PathLike) -> None:
    with atomic_write(path) as f:
      f.write(self._json)


def _token_text(tok) -> str | None:
  if isinstance(tok, dict):  # AddedToken serialised as a dict
    return tok.get("content")
  return tok


Tokenizer = SentencePieceTokenizer | HFTokenizer


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
  """A `.model` file → sentencepiece; a `tokenizer.json` or a folder holding one → HF."""
  path = os.fspath(path)
  if not fileio.exists(path):
    raise DataError("tokenizer not found", path=path)
  if fileio.isdir(path):
    if fileio.exists(fileio.join(path, "tokenizer.json")):
      return HFTokenizer.from_path(path)
    if fileio.exists(fileio.join(path, "tokenizer.model")):
      tok = SentencePieceTokenizer.from_file(fileio.join(path, "tokenizer.model"))
      cfg = fileio.join(path, "tokenizer_config.json")
      if fileio.exists(cfg):
        tok.chat_template = json.loads(fileio.read_text(cfg)).get("chat_template")
      return tok
    raise DataError("folder has neither tokenizer.json nor tokenizer.model", path=path)
  if path.endswith(".json"):
    return HFTokenizer.from_path(path)
  return SentencePieceTokenizer.from_file(path)


def train_sentencepiece(texts: Iterable[str], *, vocab_size: int, out_path: str | os.PathLike,
                        model_type: str = "bpe", split_by_whitespace: bool = True,
                        max_piece_length: int = 16,
                        user_defined_symbols: Sequence[str] = ()) -> SentencePieceTokenizer:
  """Trains a model with an exact round trip and writes it atomically.

  Identity normalisation, no dummy prefix and no whitespace folding keep every
  character; newline is a piece of its own; byte fallback covers unseen characters.
  The one exception is U+2581 (sentencepiece's own space mark), which decodes as a space.

  split_by_whitespace=False lets a piece span words ("▁you▁see▁the"): on templated text
  (game observations, tool output) a small vocabulary then holds whole phrases, and a
  trajectory takes about half the tokens. Spans still cut tokens at their edges.
  """
  import sentencepiece as spm

  buf = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=buf, vocab_size=vocab_size,
        model_type=model_type, normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=False, byte_fallback=True,
        split_digits=True, allow_whitespace_only_pieces=True, character_coverage=0.9995,
        max_sentence_length=1 << 20, user_defined_symbols=["\n", *user_defined_symbols],
        split_by_whitespace=split_by_whitespace, max_sentencepiece_length=max_piece_length,
        pad_id=0, unk_id=1, bos_id=2, eos_id=3, hard_vocab_limit=False,
        num_threads=os.cpu_count() or 1, minloglevel=2)
  except (RuntimeError, ValueError) as e:  # ValueError: an option it does not know
    raise DataError(f"sentencepiece training failed: {e}", path=out_path) from None
  tok = SentencePieceTokenizer(buf.getvalue(), path=os.fspath(out_path))
  tok.save(out_path)
  return tok
