"""Test data made here: synthetic trajectories, chat templates, a trained HF tokenizer."""

from __future__ import annotations

import json
import os
import random
import zlib

from sad_jax.data.schema import Segment, Trajectory

WORDS = ("the key is in the drawer open door take apple go north kitchen recipe "
         "naïve café 東京 世界 數學 😀 🎉 e\u0301 ñ Ω ∑ fünf 100 3.14 search[x] look").split()


def seed_of(*parts) -> int:
  """A test case's seed from its parameters, the same in every process: `hash()` of a
  str is salted per process (PYTHONHASHSEED), so it would draw other data each run."""
  return zlib.crc32(repr(parts).encode("utf-8"))


CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# Llama-2 style: system folded into the first user turn, strict alternation, BOS/EOS text.
LLAMA2 = (
    "{% if messages[0]['role'] == 'system' %}"
    "{% set sys = '<<SYS>>\\n' + messages[0]['content'] + '\\n<</SYS>>\\n\\n' %}"
    "{% set messages = messages[1:] %}{% else %}{% set sys = '' %}{% endif %}"
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if message['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' + (sys if loop.first else '') + message['content'] + ' [/INST]' }}"
    "{% else %}{{ ' ' + message['content'] + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)
# Gemma style: model role, <start_of_turn>/<end_of_turn>.
GEMMA = (
    "{{ bos_token }}{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else 'user' %}"
    "{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)


def _sentence(rng: random.Random, n_min: int = 1, n_max: int = 12) -> str:
  return " ".join(rng.choice(WORDS) for _ in range(rng.randint(n_min, n_max)))


def synthetic_trajectory(rng: random.Random, idx: int, *, system: bool = False,
                         multiline: bool = False) -> Trajectory:
  segs = [Segment("system", _sentence(rng))] if system else []
  segs.append(Segment("task", _sentence(rng, 3)))
  for _ in range(rng.randint(1, 4)):
    thought = _sentence(rng)
    if multiline and rng.random() < 0.5:
      thought += "\n" + _sentence(rng)
    segs.append(Segment("reason", thought))
    segs.append(Segment("action", f"{rng.choice(['search', 'lookup', 'go'])}[{_sentence(rng, 1, 3)}]"))
    obs = _sentence(rng, 0, 20)
    if multiline and rng.random() < 0.5:
      obs += "\n  " + _sentence(rng)
    segs.append(Segment("observation", obs))
  segs.append(Segment("reason", _sentence(rng)))
  segs.append(Segment("action", f"finish[{_sentence(rng, 1, 2)}]"))
  segs.append(Segment("observation", "Episode finished, reward = True"))
  return Trajectory(id=f"syn-{idx}", segments=segs, source="synthetic", success=True)


def synthetic_trajectories(n: int, *, seed: int = 0, **kw) -> list[Trajectory]:
  rng = random.Random(seed)
  return [synthetic_trajectory(rng, i, **kw) for i in range(n)]


def write_json(path: str, obj, *, indent: int | None = None) -> str:
  with open(path, "w", encoding="utf-8") as f:
    json.dump(obj, f, ensure_ascii=False, indent=indent)
  return path


def write_jsonl(path: str, records) -> str:
  with open(path, "w", encoding="utf-8") as f:
    for r in records:
      f.write((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n")
  return path


def train_hf_tokenizer(folder: str, *, chat_template: str = CHATML) -> None:
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

  from sad_jax.data import render

  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
  trainer = trainers.BpeTrainer(vocab_size=800, special_tokens=specials,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)
  texts = [render.render_react(t).text for t in synthetic_trajectories(200, seed=1)]
  tok.train_from_iterator(texts, trainer)
  tok.save(os.path.join(folder, "tokenizer.json"))
  write_json(os.path.join(folder, "tokenizer_config.json"), {
      "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
      "chat_template": chat_template})
