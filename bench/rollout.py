"""Agent rollouts in one run: the rollout engine (KV cache kept across turns) against
today's `evaluate` loop (each turn prefills the whole history again) and against
transformers' `generate` driving that same loop, on the same games.

  python bench/rollout.py --model RUN/cells/sad_s0_n200/final [--episodes 64] [--slots 16]
                          [--repeats 2] [--no-hf] [--json OUT.json]
  python bench/rollout.py --episodes 8 --slots 4 --repeats 1     (a random student of the
                                                                  demo's shape: a smoke run)

Environment: TextWorld-Express coin, 4 rooms (the demo's), dev-fold games, at most 8 turns
of at most 48 tokens each, greedy (temperature 0: the three paths make the same choices up
to rounding and to the prompt's tokenisation, which the engine does as `prepare` does). The
engine runs at batch `--slots`; `evaluate` at batch `--slots` with a refill per slot; the
transformers peer is `evaluate` with a policy whose turns call `LlamaForCausalLM.generate`
(SDPA, its dynamic KV cache, left-padded prompts, a stopping criterion at the action's
newline) on the same weights. One environment set serves every path. Times are best of
--repeats after one warm-up pass (the JAX compiles); the paths run one after the other.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sad_jax.agent import evaluate, react, rollout
from sad_jax.agent.envs.registry import make_env
from sad_jax.common import fileio
from sad_jax.configs import study_coin
from sad_jax.models import hf
from sad_jax.models import transformer as T
from sad_jax.models.config import from_hf_dict

ENV = study_coin.ENV.format(rooms=4)
MAX_STEPS, MAX_NEW = 8, 48


def _random_student(tok):
  cfg = from_hf_dict({"model_type": "llama", **study_coin.STUDENT,
                      "vocab_size": tok.vocab_size, "max_position_embeddings": 4096},
                     where="bench")
  return cfg, T.init_params(cfg, jax.random.PRNGKey(0))


@dataclasses.dataclass
class HFPolicy(react.Policy):
  """`react.Policy` whose turns come from transformers' generate (greedy)."""

  model: object = None

  def turns(self, trajs, *, samples=1, temperature=None, seed=0, min_batch=1):
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    tok = self.tokenizer
    prompts = [self.prompt(t) for t in trajs]
    width = max(len(p) for p in prompts)
    ids = torch.zeros((len(prompts), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
      ids[i, width - len(p):] = torch.tensor(p)
      mask[i, width - len(p):] = 1

    class ActionLine(StoppingCriteria):
      def __call__(self, input_ids, scores, **kw):
        return torch.tensor([rollout.turn_end(row[width:].tolist(), tok, set(
            self_stop)) is not None for row in input_ids], dtype=torch.bool)

    self_stop = self.stop_ids()
    t0 = time.perf_counter()
    with torch.inference_mode():
      out = self.model.generate(ids, attention_mask=mask, do_sample=False,
                                max_new_tokens=self.max_new_tokens, pad_token_id=0,
                                stopping_criteria=StoppingCriteriaList([ActionLine()]))
    self.generate_seconds += time.perf_counter() - t0
    result = []
    for row in out[:, width:].tolist():
      n = rollout.turn_end(row, tok, set(self_stop)) or len(row)
      toks = [t for t in row[:n] if t not in self_stop]
      self.generated_tokens += len(toks)
      text = tok.decode(toks)
      thought, action = react.parse_turn(text)
      result.append([react.Turn(thought, action, text, len(toks))])
    return result


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--model", default=None, help="a student folder (default: random init)")
  parser.add_argument("--tokenizer", default=None)
  parser.add_argument("--episodes", type=int, default=64)
  parser.add_argument("--slots", type=int, default=16)
  parser.add_argument("--repeats", type=int, default=2)
  parser.add_argument("--no-hf", action="store_true")
  parser.add_argument("--json", default=None)
  args = parser.parse_args()
  from sad_jax.data.tokenizer import load_tokenizer

  if args.model:
    policy = evaluate.load_policy(args.model, tokenizer=args.tokenizer, max_new_tokens=MAX_NEW,
                                  max_prompt_tokens=4096)
    cfg, params, tok = policy.cfg, policy.params, policy.tokenizer
  else:
    if not args.tokenizer:
      parser.error("--tokenizer is needed with a random student")
    tok = load_tokenizer(args.tokenizer)
    cfg, params = _random_student(tok)
    policy = react.Policy(cfg=cfg, params=params, tokenizer=tok, max_new_tokens=MAX_NEW,
                          max_prompt_tokens=4096)
  envs = [make_env(ENV) for _ in range(args.slots)]
  tasks = envs[0].tasks("dev")[:args.episodes]
  settings = rollout.RolloutSettings(max_new_tokens=MAX_NEW, max_steps=MAX_STEPS,
                                     max_len=1024, temperature=0.0)

  def engine():
    eps, stats = rollout.play(cfg, params, tok, envs, [rollout.Job(t) for t in tasks],
                              settings=settings, seed=0, stop_ids=policy.stop_ids())
    return [e.won for e in eps], stats.generated_tokens

  def loop(p):
    def run():
      p.generated_tokens = 0
      r = evaluate.evaluate(p, env_spec=ENV, split="dev", episodes=args.episodes,
                            max_steps=MAX_STEPS, batch=args.slots, progress=False, envs=envs)
      return [g["won"] for g in r.games], p.generated_tokens
    return run

  paths = {"engine": engine, "evaluate": loop(policy)}
  tmp = tempfile.TemporaryDirectory()
  torch_version = None
  if not args.no_hf:
    import torch
    from transformers import LlamaForCausalLM

    torch.set_num_threads(os.cpu_count() or 1)
    torch_version = torch.__version__
    hf.save(cfg, params, os.path.join(tmp.name, "hf"))
    model = LlamaForCausalLM.from_pretrained(os.path.join(tmp.name, "hf"),
                                             torch_dtype=torch.float32,
                                             attn_implementation="sdpa").eval()
    paths["transformers"] = loop(HFPolicy(cfg=cfg, params=None, tokenizer=tok,
                                          max_new_tokens=MAX_NEW, max_prompt_tokens=4096,
                                          model=model))
  try:
    first = {name: fn() for name, fn in paths.items()}   # warm-up (compiles)
    times = {name: [] for name in paths}
    tokens = {name: first[name][1] for name in paths}
    for _ in range(args.repeats):
      for name, fn in paths.items():
        t0 = time.perf_counter()
        fn()
        times[name].append(time.perf_counter() - t0)
  finally:
    for env in envs:
      env.close()
    tmp.cleanup()
  eps_s = {k: args.episodes / min(v) for k, v in times.items()}
  tok_s = {k: tokens[k] / min(v) for k, v in times.items()}
  wins = {k: int(sum(first[k][0])) for k in paths}
  same = {k: float(np.mean(np.array(first[k][0]) == np.array(first["engine"][0])))
          for k in paths if k != "engine"}
  ratio = eps_s["engine"] / eps_s["evaluate"]
  line = (f"rollouts: {args.episodes} dev games of {ENV.split('?')[0]} (4 rooms), {args.slots} "
          f"slots, greedy, CPU: engine {eps_s['engine']:.2f} ep/s, {tok_s['engine']:.0f} tok/s; "
          f"evaluate loop {eps_s['evaluate']:.2f} ep/s ({ratio:.2f}x)")
  if "transformers" in paths:
    line += (f"; transformers loop {eps_s['transformers']:.2f} ep/s "
             f"({eps_s['engine'] / eps_s['transformers']:.2f}x)")
  print(line + f"; wins {wins}, same outcome as the engine's per game {same}", flush=True)
  if args.json:
    fileio.json_dump(args.json, {
        "args": vars(args), "device": str(jax.devices()[0].device_kind), "torch": torch_version,
        "episodes_per_s": eps_s, "tokens_per_s": tok_s, "seconds": times, "tokens": tokens,
        "wins": wins, "same_outcome": same,
        "ratio_vs_evaluate": eps_s["engine"] / eps_s["evaluate"],
        "ratio_vs_transformers": (eps_s["engine"] / eps_s["transformers"]
                                  if "transformers" in paths else None)}, indent=1)


if __name__ == "__main__":
  main()
