"""The sections of BENCHMARKS.md: one render per benchmark script's JSON (bench/report.py
runs the scripts and assembles the file), and the formatting they share."""

from __future__ import annotations

import textwrap

WIDTH = 92


# ---------------------------------------------------------------- formatting helpers

def table(header: list[str], rows: list[list], align: str) -> str:
  """A markdown table; `align` has one 'l' or 'r' per column."""
  sep = ["---:" if a == "r" else "---" for a in align]
  return "\n".join("| " + " | ".join(str(c) for c in r) + " |" for r in [header, sep, *rows])


def num(x: float | None, nd: int = 0) -> str:
  return "" if x is None else f"{x:,.{nd}f}"


def plural(n: int, word: str, words: str | None = None) -> str:
  return f"{n} {word if n == 1 else words or word + 's'}"


def device(r: dict) -> str:
  return "CPU" if r["device"] == "cpu" else r["device"]


def mark(ok: bool) -> str:
  return "✓" if ok else "✗"


def para(text: str) -> str:
  return textwrap.fill(" ".join(text.split()), WIDTH, break_long_words=False,
                       break_on_hyphens=False)


def bullets(items: list[str]) -> str:
  return "\n".join(textwrap.fill(" ".join(t.split()), WIDTH, initial_indent="- ",
                                 subsequent_indent="  ", break_long_words=False,
                                 break_on_hyphens=False) for t in items)


# ---------------------------------------------------------------- one render per section

def render_prepare(r: dict) -> str:
  tgt = r["target_traj_per_s"]
  by = {s["stage"]: s for s in r["stages"]}
  names = {"import": "import only", "prepare": "import + prepare",
           "prepare_copies": f"import + prepare, {plural(r['args']['copies'], 'copy', 'copies')}"}
  rows = [[names[s["stage"]], num(s["trajectories"]), num(s["best_traj_per_s"]),
           num(s["median_traj_per_s"]), num(s["best_tokens_per_s"]),
           f"{s['ratio_to_target_best']:.2f} {mark(s['ratio_to_target_best'] >= 1)}"]
          for s in r["stages"]]
  one, many, imp = by["prepare"], by["prepare_copies"], by["import"]
  intro = para(f"""One process, Python {r['python']}. Data: the FireAct alpaca file
      ({r['file_trajectories']} trajectories), an existing sentencepiece tokenizer (vocab
      {r['tokenizer_vocab']}), the ReAct template, `max_len` {r['max_len']}. `prepare` is all
      of `sad-jax prepare` except CLI start-up: import, render, tokenize (chunked at hard span
      boundaries), segment, features, and the TFDS/ArrayRecord write. Best and median are over
      {plural(r['args']['repeats'], 'interleaved repeat')}.""")
  notes = bullets([
      f"""Against the target of ≥ {num(tgt)} trajectories/s, this run is at best
      {one['ratio_to_target_best']:.2f}× on the {num(one['trajectories'])}-trajectory file and
      {many['ratio_to_target_best']:.2f}× on {num(many['trajectories'])} trajectories (median
      {one['median_traj_per_s'] / tgt:.2f}× and {many['median_traj_per_s'] / tgt:.2f}×).""",
      f"""This machine's speed drifts a lot between runs (20–35% is common), so read the best
      and the median together. In this run the median import rate was
      {100 * (1 - imp['median_traj_per_s'] / imp['best_traj_per_s']):.0f}% below the best.""",
      """TFDS sets up fixed work per dataset (1,000 shuffle-bucket paths per split, even with
      shuffling disabled), which a 500-record file does not amortise: compare the rates of the
      single file and of its copies.""",
      f"""Training the tokenizer is a one-off {r['tokenizer_train_s']:.1f} s for this file.""",
      """Where the time goes (cProfile): sentencepiece encoding is the largest share, then TFDS
      example serialisation and rendering + segmentation, then JSON parsing + validation.
      Serialisation took more than twice its present share before ids/kinds were stored as
      raw bytes and the eight per-trajectory numbers as one `stats` vector.""",
  ])
  header = ["stage", "trajectories", "best traj/s", "median traj/s", "tokens/s (best)",
            f"best / target ({num(tgt)})"]
  return "\n\n".join([intro, table(header, rows, "lrrrrr"), notes])


def render_loss(r: dict) -> str:
  m, t, p = r["memory"], r["time"], r["pcgrad"]
  reps = r["args"]["repeats"]
  shape = lambda x: f"B={x['B']}, T={x['T']}, V={x['V']}, d={x['d']}"
  rows = [
      ["peak temporary memory (XLA memory analysis)", shape(m), f"{num(m['naive_mib'])} MiB",
       f"{num(m['chunked_mib'])} MiB", f"{m['ratio']:.3f}",
       f"≤ {m['target_ratio']:.2f} {mark(m['ratio'] <= m['target_ratio'])}"],
      [f"step time, best of {reps}", shape(t), f"{t['best_s']['naive']:.2f} s",
       f"{t['best_s']['chunked']:.2f} s", f"{t['ratio_best']:.3f}",
       f"≤ {t['target_ratio']:.2f} {mark(t['ratio_best'] <= t['target_ratio'])}"],
      [f"step time, median of {reps}", "same", f"{t['median_s']['naive']:.2f} s",
       f"{t['median_s']['chunked']:.2f} s", f"{t['ratio_median']:.3f}", ""],
  ]
  header = ["measure", "shape", "naive (full logits)",
            f"chunked (fused, chunk {r['args']['chunk']})", "ratio", "target"]
  intro = para(f"""JAX on {device(r)}, {r['dtype']}. value_and_grad of the `sad` objective
      (fkl + tail bucket on reason targets, CE on action targets, k = {m['k']} teacher top-k)
      with respect to the hidden states and the LM head.""")
  notes = []
  if t["B"] != m["B"]:
    notes.append(f"""Step time is measured at B={t['B']} rather than {m['B']}: a naive step
        at B={m['B']} is too slow on these CPU machines to repeat; memory is analysed at the
        full B={m['B']} (compile only).""")
  notes += [
      f"""The chunked loss computes each chunk's logits once and its gradient in the same pass
      (no remat recomputation), which is why it can be faster as well as smaller. Relative
      difference to the naive loss: {t['rel_loss_diff']:.0e} (loss),
      {t['rel_grad_diff']:.0e} (gradients).""",
      f"""PCGrad cost ({shape(p)}, a one-layer trunk): {p['best_s']['plain']:.2f} s plain,
      {p['best_s']['pcgrad']:.2f} s with projection ({p['ratio_best']:.2f}×): the head loss
      runs once per group and the trunk backward twice. In a deep model the ratio tends to 2×
      (two backward passes).""",
  ]
  return "\n\n".join([intro, table(header, rows, "llrrrl"), bullets(notes)])


def render_decode(r: dict) -> str:
  a, m = r["args"], r["model"]
  if "rows" not in r:  # a cache written before issue 23: one batch, no transformers peer
    r = {**r, "rows": [{"batch": a["batch"], "tokens_per_s_best": r["tokens_per_s_best"],
                        "tokens_per_s_median": r["tokens_per_s_median"],
                        "agreement_with_kv_cache": {"no_cache": float(r["identical"])}}]}
  peer = any("transformers" in x["tokens_per_s_best"] for x in r["rows"])
  intro = para(f"""JAX on {device(r)}, {r['dtype']}. Llama-style model at training shape S (vocab
      {m['vocab']}, d_model {m['d']}, {m['layers']} layers, {m['heads']} heads / {m['kv']} kv
      heads, ffn {m['ffn']}), {a['prompt']}-token prompts, {a['new']} new tokens, greedy.
      {"The peer is transformers' `generate` on the same weights (LlamaForCausalLM, SDPA, "
       "torch " + str(r.get("torch")) + "), run after the JAX paths in the same process."
       if peer else ""}""")
  rows = []
  for x in r["rows"]:
    best, med = x["tokens_per_s_best"], x["tokens_per_s_median"]
    cells = [str(x["batch"]), f"{num(best['kv_cache'])} ({num(med['kv_cache'])})",
             f"{num(best['no_cache'])} ({num(med['no_cache'])})",
             f"{best['kv_cache'] / best['no_cache']:.1f}×"]
    if peer:
      cells += [f"{num(best['transformers'])} ({num(med['transformers'])})",
                f"{best['kv_cache'] / best['transformers']:.2f}×"]
    rows.append(cells)
  header = ["batch", "KV cache (`sad_jax.models.generate`), tok/s best (median)",
            "no-cache loop", "cache / no-cache"]
  if peer:
    header += ["transformers `generate`", "sad_jax / transformers"]
  agree = "; ".join(f"B={x['batch']}: " + ", ".join(
      f"{k} {100 * v:.0f}%" for k, v in x["agreement_with_kv_cache"].items())
      for x in r["rows"])
  notes = para(f"""No throughput target is stated for decode beyond reporting the ratio to
      transformers. Greedy tokens equal to the KV-cache path's: {agree} (float32 paths that
      agree to rounding can still part where two logits tie to within it). The greedy path
      skips the vocabulary sort through a traced switch (one compiled step serves every
      sampling setting).""")
  return "\n\n".join([intro, table(header, rows, "r" * len(header)), notes])


def render_store(r: dict) -> str:
  te, v = r["teacher"], r["vocab_size"]
  intro = para(f"""JAX on {device(r)}, {r['dtype']}. The FireAct data was prepared (vocab {v},
      {r['trajectories']} trajectories). The teacher was a Llama-style model (d={te['d']},
      {te['layers']} layers) trained here with SFT for {te['sft_steps']} steps (final loss
      {te['final_loss']:.2f}). The stand-in student was the same model's
      step-{te['student_step']} checkpoint. KL is measured on the reason tokens of the
      validation split.""")
  sizes, errs = r["bytes_per_token"], r["kl_rel_error"]
  rows = [[k, num(sizes[k]["float16"]), num(sizes[k]["bfloat16"]), num(sizes[k]["int8"]),
           f"{100 * errs[k]['tail_bucket']:.1f}%", f"{100 * errs[k]['ignore']:.1f}%"]
          for k in sorted(sizes, key=int)]
  kl = table(["k", "bytes / reason token, float16", "bfloat16", "int8",
              "top-k KL rel. error, tail_bucket", "ignore"], rows, "rrrrrr")
  gains = [errs[k]["ignore"] / errs[k]["tail_bucket"] for k in errs
           if errs[k]["tail_bucket"] > 0]
  gain = (f"In this run the `ignore` rule's KL error is {min(gains):.1f}–{max(gains):.1f}× the "
          "tail bucket's across k." if gains else "")
  kl_note = para(f"""(A dense float16 row would be {num(2 * v)} bytes at this vocabulary, and
      {2 * 151936 / 1000:.0f} KB at Qwen's 151,936. The shard files are ArrayRecord-compressed,
      so a format's bytes depend on how well it compresses, not only on its width.) {gain}
      This teacher is small and its distributions are flat, so the errors are larger than a
      sharp LLM teacher would give.""")
  tgt = r["precompute_target"]
  rows = [[f"precompute vs pure forward, {p['teacher'].replace(' x', ' ×')} teacher",
           f"{p['precompute_traj_s']:.1f} vs {p['forward_traj_s']:.1f} traj/s = "
           f"{p['ratio']:.2f}", f"≥ {tgt:.2f} {mark(p['ratio'] >= tgt)}"]
          for p in r["precompute"]]
  rd, tr = r["reader"], r["train"]
  rows.append([f"reader (random access + gather [{rd['batch']}, {rd['length']}, {rd['k']}]) "
               f"vs a shape-S training step ({tr['batch']}×{tr['length']})",
               f"{num(rd['traj_s'])} vs {tr['traj_s']:.1f} traj/s = "
               f"{num(r['reader_vs_train'])}×",
               f"≥ {r['reader_target']:.0f}× {mark(r['reader_vs_train'] >= r['reader_target'])}"])
  thr = table(["throughput", "result", "target"], rows, "lll")
  notes = bullets([
      """Precompute runs the LM head and top-k only at the target positions, not over the whole
      sequence.""",
      """What remains is per-trajectory host work: dataset reads, record encoding and
      compression. It is a fixed cost per token, so it weighs less against larger teachers:
      compare the precompute rows. Since issue 23 the host encodes a batch's records while
      the teacher computes the next batch (dispatch before encode), so that work overlaps
      the forward instead of following it.""",
      """Both paths pad each batch to the same length buckets and run the same attention, so
      the ratio isolates the store's own work.""",
  ])
  return "\n\n".join([intro, kl, kl_note, thr, notes])


MIX_NAMES = {"synthetic": "synthetic 40/20/40", "demo": "demo (coin expert)",
             "fireact": "FireAct"}
PEER_NAMES = {"previous": "peer previous", "best": "peer best", "compiled": "peer compiled"}


def train_rows(r: dict) -> list[dict]:
  """Each result as {shape, mix, config, shares, jax, peers, ratios}; a cache written before
  issue 23 has the synthetic mix and one peer, the previous one."""
  out = []
  for x in r["results"]:
    if "peers" in x:
      out.append(x)
      continue
    peers, ratios = {}, {}
    if "torch" in x:
      peers["previous"] = x["torch"]
      ratios["previous"] = {k: x[k] for k in ("speedup_best", "speedup_median", "memory_ratio")}
    out.append({**x, "mix": "synthetic", "shares": None, "peers": peers, "ratios": ratios})
  return out


def strongest(x: dict) -> str | None:
  """The peer the targets are checked against: the fastest variant timed in this run."""
  return max(x["peers"], key=lambda v: x["peers"][v]["tokens_per_s_best"], default=None)


ATTENTION_NOTE = {
    "flash": (": each 256-query block loops over 256-key blocks from the earliest segment "
              "start among its queries, with an online softmax; the backward recomputes "
              "QK^T, 10·Dh FLOPs per key against 8·Dh with the probabilities kept"),
    "reference": ": each 256-query block over keys [0, its end)"}


def render_train(r: dict) -> str:
  rows_in = train_rows(r)
  intro = para(f"""{r['dtype']}, {r['threads']} threads per framework, each framework (and each
      peer variant) in its own worker process pinned to the same cores, all on the same packed
      batch. This is the trainer's own jitted `train_step` (forward, `sad` span losses with
      k=16 teacher top-k and the curriculum term, backward, clipping, AdamW), with the state
      donated, side by side with a PyTorch peer (`bench/peer_torch.py`: transformers'
      `LlamaForCausalLM` with SDPA attention, the same span losses in plain PyTorch,
      `torch.optim.AdamW`) in variants: `previous`, the step as first written, `best`, the
      fastest honest eager variant found (issue 23.3), and `compiled` where timed (its
      forward + loss under `torch.compile`). Span mixes
      (`bench/span_mixes.py`): synthetic (random kinds, 40% reason, 20% action, 40%
      observation, two trajectories per row), the demo's coin expert trajectories and
      FireAct's, prepared by the project's own code and packed by the trainer's packing.
      Tokens/s count every position of the rows (padding included, the same for every
      framework); best and median of {plural(r['repeats'], 'timed repeat')} of
      {plural(r['steps'], 'step')}. MFU counts model FLOPs (6 × matmul parameters +
      12·L·T·H·Dh attention per token) against the best n×n×n matmul each framework reached
      in its own worker. Executed FLOPs per token: an analytic count of the matmuls each step
      runs: for sad_jax the head over the chunks its compact loop runs and the key blocks its
      attention visits (`model.attention={r.get('attention', 'reference')}`{ATTENTION_NOTE.get(
      r.get('attention', 'reference'), '')}), for the peer the head at every position and
      causal attention over the whole row (XLA's cost analysis counts a loop body once, so
      it cannot give this).
      Peak memory (RSS) is the highest resident set size sampled every 2 ms during the
      timed steps, less the resident size before the model was built.""")
  mix_rows = []
  for x in rows_in:
    sh = x.get("shares")
    if not sh:
      continue
    mix_rows.append([MIX_NAMES.get(x["mix"], x["mix"]), x["shape"],
                     *(f"{100 * sh[k]:.1f}%" for k in ("reason", "action", "answer",
                                                        "observation", "other", "padding")),
                     f"{100 * sh['targets']:.1f}%", f"{sh['trajectories_per_row']:.1f}",
                     num(sh["mean_trajectory_tokens"])])
  mix_table = table(["mix", "shape", "reason", "action", "answer", "observation",
                     "other (system, task)", "padding", "loss targets", "trajectories / row",
                     "tokens / trajectory"], mix_rows, "llrrrrrrrrr") if mix_rows else ""
  rows = []
  for x in rows_in:
    c = x["config"]
    desc = (f"{x['shape']}: V {c['vocab']}, d {c['d']}, {c['layers']} layers, "
            f"{c['heads']}/{c['kv']} heads, ffn {c['ffn']}, seq {c['seq']}, batch "
            f"{c['batch']}; {MIX_NAMES.get(x['mix'], x['mix'])}")
    full = ([("sad_jax, head at every position", x["jax_full_head"], None)]
            if "jax_full_head" in x else [])
    entries = [("sad_jax", x["jax"], None)] + full + [
        (PEER_NAMES.get(v, f"peer {v}"), p, x["ratios"].get(v)) for v, p in x["peers"].items()]
    for label, f, ratio in entries:
      ex = f.get("executed_flops_per_token")
      frac = f.get("executed_fraction_best")
      jax_fw = label.startswith("sad_jax")
      xla = (f"{num(f['peak_memory_mib'])} MiB ({num(f['temp_memory_mib'])})" if jax_fw
             else "—")
      first = (f"{f['compile_s']:.1f} s" if jax_fw else
               f"{f['first_step_s']:.1f} s" if "first_step_s" in f else "—")
      rows.append([desc if jax_fw else "", label,
                   f"{num(f['tokens_per_s_best'])} ({num(f['tokens_per_s_median'])})",
                   "" if ratio is None else f"{ratio['speedup_best']:.2f}×",
                   f"{100 * f['mfu_best']:.1f}% ({100 * f['mfu_median']:.1f}%)",
                   "" if not ex else f"{ex / 1e6:.1f}",
                   "" if frac is None else f"{100 * frac:.1f}%",
                   f"{num(f['matmul_peak_gflops'])} GFLOP/s", f"{num(f['peak_rss_mib'])} MiB",
                   xla, first])
  main = table(["shape; mix", "framework", "tokens/s best (median)", "sad_jax ÷ this",
                "MFU best (median)", "executed MFLOP / token", "executed / peak",
                "own matmul peak", "peak memory (RSS)", "XLA analysis (temporaries)",
                "compile / first step"], rows, "llrrrrrrrrr")
  missing = "not measured in this run"
  checks = []
  for x in rows_in:
    v = strongest(x)
    tgt = 1.0 if x["mix"] == "synthetic" else 1.3
    where = f"{x['shape']}, {MIX_NAMES.get(x['mix'], x['mix'])}"
    if v is None:
      checks.append([where, "tokens/s, sad_jax ÷ peer", "not measured (run without --peer)",
                     f"≥ {tgt:.1f}×"])
      continue
    q = x["ratios"][v]
    checks.append([where, f"tokens/s, sad_jax ÷ peer {v}, best (median)",
                   f"{q['speedup_best']:.2f}× ({q['speedup_median']:.2f}×)",
                   f"≥ {tgt:.1f}× {mark(q['speedup_best'] >= tgt)}"])
    checks.append([where, f"peak memory (RSS), sad_jax ÷ peer {v}",
                   f"{q['memory_ratio']:.2f}×", f"≤ 1.0× {mark(q['memory_ratio'] <= 1.0)}"])
  m = next((x["jax"] for x in rows_in if x["shape"] == "M"), None)
  checks.append(["M", "MFU of sad_jax vs JAX's own matmul peak, best (median)",
                 f"{100 * m['mfu_best']:.1f}% ({100 * m['mfu_median']:.1f}%)" if m else missing,
                 f"≥ 50% {mark(m['mfu_best'] >= 0.5)}" if m else "≥ 50%"])
  ratios = table(["shape, mix", "measure", "result", "target"], checks, "llll")
  peer_gain = [f"{v} {g:.2f}× at {x['shape']} {x['mix']}" for x in rows_in
               for v, g in x.get("peer_vs_previous", {}).items()]
  head_gain = [f"{x['compact_head_speedup']:.2f}× at {x['shape']} {x['mix']}"
               for x in rows_in if "compact_head_speedup" in x]
  notes = bullets([
      """Targets (issue 23): sad_jax at ≥ 1.3× the strengthened peer's tokens/s at S and M on
      the real span mixes (demo, FireAct) and ≥ 1.0× on the synthetic mix, with peak memory
      no higher than the peer's. Each is checked against the fastest peer variant timed in
      the run.""",
      ("""sad_jax's step with the compact head (`objective.compact_head`, the default: the
       LM head and its loss only over the chunks that hold loss targets) against the same
       step with the head at every position, tokens/s (best) in this run: """
       + ", ".join(head_gain) + "." if head_gain else
       """This run did not time the head at every position (`--full-head`)."""),
      ("""The strengthened peer against the previous one, tokens/s (best) in this run: """
       + ", ".join(peer_gain) + "." if peer_gain else
       """This run did not time both peer variants."""),
      """What `best` changes, from interleaved A/B timings (2026-12-02, CPU seconds at one
      thread on this machine while other jobs ran: ±10% noise; bench/peer_torch.py has the
      figures): fused AdamW, the optimizer step 3.3× faster at S (torch's CPU default is a
      per-tensor loop); the teacher's ids and the label gathered at once and the
      log-softmax only over the rows with a loss target, the loss's forward + backward
      0.4–0.7× as long on the real mixes and at S (0.9× on the synthetic mix at M); input ids
      only and no KV cache, within the noise. Together about 5% of the step at one thread;
      foreach AdamW and clipping were no faster. `torch.compile` of the forward + loss took
      about 3 min to compile at S on the loaded machine and ran within the noise of `best`
      (about 5% faster): it is the `compiled` variant (`--peer-variants
      previous,best,compiled`), not timed by default.""",
      """Every peer variant computes the full [B, T, V] logits; each worker checks its
      first loss against the previous loss formula at its own model inputs.""",
      """The peers attend causally over the whole packed row (sad_jax attends block-diagonally
      per trajectory, which is not more work for the peer) and have no curriculum term; the
      previous peer's restarting position ids change only its rotary positions (the KV cache
      that transformers builds by default in training turns its per-trajectory mask off).""",
      """XLA's compiled memory analysis of the JAX step (arguments + outputs + temporaries,
      less donated aliases) is a deterministic figure; RSS is what the frameworks are compared
      on. The fused head loss keeps the [B, T, V] logits out of sad_jax's memory.""",
      """Run-to-run spread on these machines reaches 20–35%: the frameworks are compared within
      one run, alternating per shape and mix.""",
  ] + peer_gap_notes(rows_in))
  return "\n\n".join(p for p in [intro, mix_table, main, ratios, notes,
                                  render_kinds(rows_in, r)] if p)


def render_kinds(rows: list[dict], r: dict) -> str:
  """The --profile tables: where each framework's step time goes, by kind of work, and
  what the measured profile says about the ratio (issue 23.5)."""
  from bench import step_kinds

  out = []
  for x in rows:
    t = step_kinds.kinds_rows(x)
    if not t:
      continue
    out.append(f"**{x['shape']}, {MIX_NAMES.get(x['mix'], x['mix'])}**\n\n"
               + table(t[0], t[1:], "l" + "r" * (len(t[0]) - 1)))
    gap = kinds_gap_note(x)
    if gap:
      out.append(para(gap))
  if not out:
    return ""
  out.append(para("""Memory: the RSS column is the step's resident set less the process's
      size before the model was built; the XLA column is the compiled step's arguments,
      outputs and temporaries less donated aliases. Where XLA copies a donated input, its
      buffer assignment shows it (`XLA_FLAGS=--xla_dump_to=DIR`, the step's
      buffer-assignment.txt): until 2026-12-02 the step's skip rule for a non-finite step,
      `where(ok, new, old)` over the state, made XLA copy the vocabulary-sized embedding,
      head and the head's Adam moments; the update now runs under `lax.cond(ok, …)`."""))
  head = para(f"""Where the time goes (`--profile {r.get('profile', '')}`, bench/step_kinds.py):
      after the timing, each worker traced more steps, and the table gives the traced step
      with the least wall time. sad_jax: every XLA op of the step, by its HLO name stack and
      whether it is a matmul; the peer: torch.profiler's own time of each op, the optimizer
      phase marked. "between ops" is the wall time no op accounts for (Python, dispatch,
      thread hand-offs). GFLOP/s: the executed FLOPs of the kind (the analytic count above)
      over its time. A traced step runs somewhat slower than an untraced one.""")
  return "\n\n".join([head, *out])


def kinds_gap_note(x: dict) -> str:
  """The ratio of the two steps decomposed by kind of work, from the profile's numbers."""
  from bench import step_kinds

  v = strongest(x)
  j = x["jax"]
  if v is None or "profile" not in j or "profile" not in x["peers"][v]:
    return ""
  t = x["peers"][v]
  jk, tk = j["profile"]["kinds_s"], t["profile"]["kinds_s"]
  mm = step_kinds.KINDS[0]
  tokens = j["tokens_per_step"]
  rate = {n: f["executed_flops_parts"]["matmuls"] * tokens / k[mm] / 1e9
          for n, f, k in (("j", j, jk), ("t", t, tk)) if k[mm] > 0}
  diffs = sorted(((tk[k] - jk[k], k) for k in step_kinds.KINDS), reverse=True)
  saved = ", ".join(f"{k} {d:+.2f} s" for d, k in diffs)
  flops = (j["executed_flops_parts"]["matmuls"] / t["executed_flops_parts"]["matmuls"])
  text = (f"""Peer {v} − sad_jax, seconds per traced step by kind: {saved} (wall
      {t['profile']['wall_s']:.2f} vs {j['profile']['wall_s']:.2f} s). sad_jax's matmuls
      execute {flops:.2f}× the peer's FLOPs (the compact head)""")
  if len(rate) == 2:
    text += (f""" at {rate['j']:.0f} GFLOP/s against the peer's {rate['t']:.0f} (XLA's
        matmul peak in this run {j['matmul_peak_gflops']:.0f}, torch's
        {t['matmul_peak_gflops']:.0f} GFLOP/s)""")
  core = j["profile"].get("attention_core_matmuls_s")
  if core is not None:
    text += (f""". Of sad_jax's attention core, {core:.2f} s went to its matmuls and
        {jk[step_kinds.KINDS[1]] - core:.2f} s to the softmax, masking and layout around
        them (the peer's SDPA kernel does both in one fused loop)""")
  if "reference_attention_peak_memory_mib" in j:
    a, b = j["peak_memory_mib"], j["reference_attention_peak_memory_mib"]
    text += (f""". XLA's memory analysis of sad_jax's step: {a:.0f} MiB as run (flash
        attention: a log-sum-exp per query kept for the backward), {b:.0f} MiB with
        `model.attention=reference` (the [T, S] probabilities kept), compiled in the
        same worker""")
  return text + "."


def render_compile(r: dict) -> str:
  s = r["shape"]
  intro = para(f"""JAX on {device(r)}, float32, remat {r['remat']}, one device. The trainer's
      train step (forward, span losses with k=16 teacher top-k, backward, AdamW) of a
      Llama-style student at a small width (vocab {s['vocab']}, d_model {s['d']}, {s['heads']}
      heads / {s['kv']} kv, ffn {s['ffn']}, seq {s['seq']}, batch {s['batch']}), its layers
      unrolled (a Python loop) or scanned (`model.scan_layers`: stacked params, one `nn.scan`
      body). Lower = trace + lower to StableHLO; compile = XLA; best of {r['repeats']} cold
      compiles, the layouts alternating. Step = best of {r['step_repeats']} runs; temp =
      XLA's temporary buffers of the compiled step.""")
  rows = []
  for row in r["rows"]:
    u, c = row["unrolled"], row["scanned"]
    rows.append([row["layers"], f"{u['total_s']:.1f}", f"{c['total_s']:.1f}",
                 f"{row['ratio_total']:.2f}", num(u["hlo_chars"]), num(c["hlo_chars"]),
                 f"{u['temp_mib']:.0f} / {c['temp_mib']:.0f}",
                 f"{u['step_s']:.2f} / {c['step_s']:.2f}", mark(row["same_loss"])])
  header = ["layers", "unrolled lower+compile s", "scanned s", "scanned / unrolled",
            "unrolled HLO chars", "scanned HLO chars", "temp MiB (unrolled / scanned)",
            "step s (unrolled / scanned)", "same loss"]
  g = r["growth"]
  first, last = r["rows"][0], r["rows"][-1]
  faster = [row["layers"] for row in r["rows"] if row["ratio_total"] < 1]
  notes = bullets([
      f"""From {first['layers']} to {last['layers']} layers the unrolled step's lower+compile
      time grows {g['unrolled']:.1f}× and the scanned step's {g['scanned']:.1f}×: the scanned
      program holds one layer body whatever the depth (its HLO text stays
      {num(last['scanned']['hlo_chars'])} characters; the unrolled one's grows
      {last['unrolled']['hlo_chars'] / first['unrolled']['hlo_chars']:.1f}×).""",
      (f"""The scanned step compiles faster from {faster[0]} layers on in this run; below that
      the fixed part (embedding, chunked span losses, optimizer) dominates and the scan's
      own overhead shows.""" if faster else
       """The scanned step did not compile faster at any depth measured here."""),
      f"""At {last['layers']} layers the scanned step's temporaries are
      {last['scanned']['temp_mib'] / last['unrolled']['temp_mib']:.2f}× the unrolled one's
      and its step time {last['ratio_step']:.2f}× (not profiled; the likely cause is the
      per-layer residuals the scan saves in stacked buffers). The machine also ran other
      jobs: read the ratios, measured side by side, rather than the absolute seconds.""",
      """A ✓ under "same loss": the scanned step's first loss equals the unrolled one's (same
      initial parameters, stacked); tests/models/test_scan.py checks logits and gradients.""",
  ])
  return "\n\n".join([intro, table(header, rows, "rrrrrrrrl"), notes])


def render_real_store(r: dict) -> str:
  n_tok = sum(r["tokens"].values())
  intro = para(f"""JAX on {device(r)}, float32. Teacher: {r['teacher']}, 30 layers, vocab
      49,152. {r['args']['trajectories']} FireAct trajectories ({num(n_tok)} tokens) in its
      chat template and tokenizer; `teacher.precompute` wrote its top-{r['k']} float16 store
      over their {num(r['reason_targets'])} reason tokens in {r['precompute_s']:.0f} s
      ({n_tok / r['precompute_s']:.0f} tokens/s); the store's files take
      {num(r['store_bytes_per_token'])} bytes per reason token. Errors are measured on
      {num(r['reason_tokens_measured'])} reason tokens against a student that is not the
      teacher: the depth-pruned student (layers {', '.join(map(str, r['student_layers']))},
      as `model.init=teacher_layers:…` builds it, before any training), whose exact KL to
      the teacher is {r['exact_kl_per_token']:.2f} nats per token.""")
  rows = []
  for name, e in r["errors"].items():
    rows.append([name, num(e["bytes_per_token"]), f"{100 * e['kl_rel_error']:+.1f}%",
                 f"{e['grad_token_rel_error_median']:.3f}", f"{e['grad_head_rel_error']:.3f}"])
  errors = table(["stored per token", "bytes / reason token (records)", "KL rel. error",
                  "grad. rel. error per token (median)", "summed head grad. rel. error"],
                 rows, "lrrrr")
  sizes = r["bytes_per_token"]
  dtypes = table(["k", "float16", "bfloat16", "int8"],
                 [[k, *(num(sizes[k][d]) for d in ("float16", "bfloat16", "int8"))]
                  for k in sorted(sizes, key=int)], "rrrr")
  notes = bullets([
      """The gradient is the KL's gradient with respect to the student's logits, computed
      through the training loss's own `divergence_per_token`; the exact one is q − p over the
      full vocabulary (float64). "Summed head grad." is Σ_t g_t h_tᵀ over every measured
      token, the gradient that reaches the tied embedding: a bias adds up there, noise
      averages out.""",
      """`sampled N`: N draws from the teacher's full distribution per token, stored as
      (id, count) pairs (bytes: distinct ids × 3 + 4); p̂ = counts/N is unbiased, so its
      KL estimate and gradient are unbiased; top-k's are not (tail_bucket spreads the
      teacher's tail mass over the student's own tail; ignore renormalises the teacher over
      its top-k).""",
      """Bytes in the first table are the store's record encoding (ids as uint16 at this
      vocabulary, float16 log-probs) before the shard files' compression; the second table
      gives them by log-prob dtype.""",
      sampled_note(r["errors"]),
      """The sampled store is now a precompute option (`--config.sampling=sampled`,
      `--config.k=N`; train with `objective.tail=ignore`, `divergence=fkl`); its records take
      one byte per token more than counted here (the number of distinct ids).""",
      """Caveats: the pruned, undistilled student is far from the teacher (the KL above), where
      the tail that top-k drops weighs most; a distilled student's figures would be smaller
      for both. The machine ran other jobs during this run: the precompute rate is a lower
      bound.""",
  ])
  return "\n\n".join([intro, errors, dtypes, notes])


def sampled_note(errors: dict) -> str:
  """Per sampled N: the cheapest top-k (tail_bucket) whose summed-gradient error is as low."""
  out = []
  for name, e in errors.items():
    if not name.startswith("sampled"):
      continue
    rivals = [(x["bytes_per_token"], n) for n, x in errors.items() if "tail_bucket" in n
              and x["grad_head_rel_error"] <= e["grad_head_rel_error"]]
    what = (f"top-k needs {min(rivals)[1].split()[0]} ({num(min(rivals)[0])} bytes)" if rivals
            else "no top-k up to 128 reaches it")
    out.append(f"{name} ({num(e['bytes_per_token'])} bytes): "
               f"{e['grad_head_rel_error']:.3f}, {what}")
  return (f"""Summed head-gradient error at equal or lower error in this run: {'; '.join(out)}.
      Per token the sampled gradient is noisier (its median error is higher), but the noise
      averages out over tokens and top-k's bias does not.""")


RENDER = {"prepare_throughput": render_prepare, "loss_memory": render_loss,
          "decode": render_decode, "teacher_store": render_store, "train_step": render_train,
          "compile_time": render_compile, "real_teacher_store": render_real_store}



def peer_gap_notes(rows: list[dict]) -> list[str]:
  """Where the tokens/s gap to the peer comes from, in this run's numbers (synthetic mix)."""
  out = []
  for x in rows:
    v = strongest(x)
    if x["mix"] != "synthetic" or v is None:
      continue
    j, t = x["jax"], x["peers"][v]
    peak_ratio = t["matmul_peak_gflops"] / j["matmul_peak_gflops"]
    out.append(f"""{x['shape']}: the peer's matmul peak (MKL) is {peak_ratio:.2f}× XLA's CPU
        matmul peak in this run; the two steps reach {100 * j['mfu_best']:.0f}% and
        {100 * t['mfu_best']:.0f}% (peer {v}) of their own peak. At equal matmul speed sad_jax
        would be at {x['ratios'][v]['speedup_best'] * peak_ratio:.2f}× the peer.""")
  if out:
    out.append("""Fixed in issue 10 (profiled by timing the step's parts separately): the
        weight gradients of [B, T, D] activations contracted two dimensions, which XLA's CPU
        dot ran at half speed, so the MLP, the attention projections and the head loss now
        use [B·T, D] GEMMs; and causal attention skips key blocks above the diagonal
        (blockwise, exact). Against the issue-6 figures (S 1,433 and M 200 tokens/s on the
        same machine), the step is about 1.7× faster at S and 1.9× at M.""")
  return out
