"""The `sad-jax` command line. Each subcommand is a thin wrapper over a library function.

Errors in the input (SadJaxError) print one line naming the place and exit with 2;
nothing is left half-written.
"""

from __future__ import annotations

import argparse
import collections
import errno
import os
import sys

from sad_jax.common import fileio
from sad_jax.common.errors import DiskFull, SadJaxError, SkipReport


def _cmd_import(args) -> int:
  from sad_jax.data import importers, schema

  skips = SkipReport(on_error=args.on_error)
  trajs = importers.import_files(args.inputs, fmt=args.format, skips=skips)
  n = schema.write_jsonl(args.output, trajs)
  counts = collections.Counter(s.kind for t in trajs for s in t.segments)
  print(f"wrote {n} trajectories to {args.output}")
  print("segments: " + ", ".join(f"{k}={v}" for k, v in sorted(counts.items())))
  success = collections.Counter(str(t.success) for t in trajs)
  print("success: " + ", ".join(f"{k}={v}" for k, v in sorted(success.items())))
  print(skips.summary())
  return 0


def _cmd_tokenizer_train(args) -> int:
  from sad_jax.data import importers, render
  from sad_jax.data.tokenizer import train_sentencepiece

  skips = SkipReport(on_error=args.on_error)
  trajs = importers.import_files(args.inputs, fmt=args.format, skips=skips)
  texts = [render.render_react(t).text for t in trajs]
  tok = train_sentencepiece(texts, vocab_size=args.vocab_size, out_path=args.output,
                            model_type=args.model_type, split_by_whitespace=not args.multiword,
                            max_piece_length=args.max_piece_length)
  bad = sum(tok.decode(tok.encode(t).ids) != t for t in texts)
  print(f"wrote {args.output}: vocab {tok.vocab_size}, trained on {len(texts)} trajectories; "
        f"round trip exact on {len(texts) - bad}/{len(texts)}")
  print(skips.summary())
  return 0 if bad == 0 else 1


def _cmd_prepare(args, overrides) -> int:
  from sad_jax.common import configlib
  from sad_jax.data import prepare

  extra = list(overrides)
  if args.on_error:
    extra.append(f"--config.on_error={args.on_error}")
  config = configlib.load(args.config, extra)
  out = args.out or os.path.join("runs", "prepared",
                                 os.path.splitext(os.path.basename(args.config.split(":")[0]))[0])
  report = prepare.prepare(config, out, progress=not args.quiet)
  print(report.summary())
  print(f"dataset: {out}")
  return 0


def _cmd_inspect(args) -> int:
  from sad_jax.data import inspect

  colour = args.color == "always" or (args.color == "auto" and sys.stdout.isatty())
  print(inspect.inspect(args.path, index=args.index, split=args.split, fmt=args.format,
                        tokenizer=args.tokenizer, colour=colour))
  return 0


def _add_distributed_flags(parser: argparse.ArgumentParser) -> None:
  """Multi-host flags of train, opd and teacher precompute (sharding.init_distributed)."""
  parser.add_argument("--coordinator", default=None, help="multi-host: host:port, or 'auto'")
  parser.add_argument("--num-processes", dest="num_processes", type=int, default=None)
  parser.add_argument("--process-id", dest="process_id", type=int, default=None)


def _distributed_overrides(args) -> list[str]:
  """The multi-host flags as config.distributed overrides (a flag beats the config)."""
  return [f"--config.distributed.{key}={getattr(args, key)}"
          for key in ("coordinator", "num_processes", "process_id")
          if getattr(args, key) is not None]


def _cmd_teacher_precompute(args, overrides) -> int:
  import jax
  import jax.numpy as jnp

  from sad_jax.common import configlib, sharding
  from sad_jax.common.errors import DataError
  from sad_jax.models.checkpoint_io import load_model
  from sad_jax.teacher import precompute

  c = configlib.load(args.config, [*overrides, *_distributed_overrides(args)])
  for key in ("dataset", "teacher", "out"):
    if not c[key]:
      raise DataError(f"required (set --config.{key}=…)", field=f"config.{key}")
  sharding.init_distributed(coordinator=c.distributed.coordinator,
                            num_processes=c.distributed.num_processes,
                            process_id=c.distributed.process_id)
  mesh = None
  if tuple(c.mesh) != (1, 1, 1):
    # one mesh per process over its own devices: each process computes whole shards
    try:
      shape = sharding.mesh_shape(c.mesh, jax.local_device_count())
    except ValueError as e:
      raise DataError(f"{e} (the mesh is per process: process {jax.process_index()} of "
                      f"{jax.process_count()} has {jax.local_device_count()} devices)",
                      field="config.mesh") from None
    mesh = sharding.make_mesh(shape, devices=jax.local_devices())
  cfg, params = load_model(c.teacher, mesh=mesh)
  try:
    m = precompute.precompute(
        dataset_dir=c.dataset, cfg=cfg, params=params,
        teacher_name=c.teacher_name or os.path.basename(os.path.normpath(c.teacher)),
        out_dir=c.out, k=c.k, temperature=c.temperature, span_kinds=tuple(c.span_kinds),
        shard_size=c.shard_size, batch_size=c.batch_size, logp_dtype=c.logp_dtype, mesh=mesh,
        progress=not args.quiet, dtype=jnp.dtype(c.compute_dtype),
        sampling=c.get("sampling", "topk"), seed=c.get("seed", 0))
  except DataError as e:
    if e.field in ("vocab_size", "k"):  # the teacher's vocabulary: name the teacher
      raise e.located(path=c.teacher) from None
    raise
  n = sum(len(s["ids"]) for s in m.shards)
  size = sum(s["bytes"] for s in m.shards)
  print(f"store {c.out}: {n} trajectories in {len(m.shards)} shards, {size / 2**20:.1f} MiB, "
        f"{'draws' if m.sampled else 'k'}={m.k}, τ={m.temperature}, "
        f"kinds={','.join(m.span_kinds)}")
  return 0


def _cmd_teacher_verify(args) -> int:
  from sad_jax.models.checkpoint_io import load_model
  from sad_jax.teacher import verify

  cfg = params = None
  if args.teacher:
    cfg, params = load_model(args.teacher)
  r = verify.verify(args.store, args.dataset, cfg=cfg, params=params, spot=args.spot)
  print(f"ok: {r['examples']} examples, {r['tokens']} target tokens, {r['shards']} shards "
        f"(checksums match), max top-k mass {r['max_topk_mass']:.4f}")
  if r["spot_max_abs_error"] is not None:
    print(f"spot recompute of {args.spot} examples: max abs error {r['spot_max_abs_error']:.3g}"
          f" (relative {r['spot_max_rel_error']:.3g})")
  return 0


def _cmd_teacher_import(args) -> int:
  from sad_jax.teacher import verify

  m = verify.import_prompt_logprobs(
      args.input, dataset_dir=args.dataset, out_dir=args.out, k=args.k,
      teacher_name=args.teacher_name, teacher_vocab_size=args.teacher_vocab_size,
      span_kinds=tuple(args.span_kinds.split(",")))
  print(f"store {args.out}: {sum(len(s['ids']) for s in m.shards)} trajectories, k={m.k}")
  return 0


def _cmd_train(args, overrides) -> int:
  from sad_jax.common import configlib
  from sad_jax.trainer import train as train_lib

  config = configlib.load(args.config, [*overrides, *_distributed_overrides(args)])
  try:
    result = train_lib.train_and_evaluate(config, args.workdir)
  except train_lib.TrainingDiverged as e:
    print(f"sad-jax: training stopped: {e}", file=sys.stderr)
    return 3
  except OSError as e:
    if e.errno != errno.ENOSPC:
      raise
    from sad_jax.trainer.checkpoint import latest_complete

    step = latest_complete(fileio.join(args.workdir, "checkpoints"))
    intact = ("no checkpoint was complete yet" if step is None else
              f"the last complete checkpoint, step {step}, is intact")
    raise DiskFull(f"{e.filename or args.workdir}: disk full (No space left on device); "
                   f"{intact}. Free space and rerun to resume.") from None
  val = ", ".join(f"{k} {v:.4f}" for k, v in result.validation.items() if "tokens" not in k)
  print(f"{result.status} at step {result.step}; checkpoints {result.checkpoint_steps}"
        + (f"; validation: {val}" if val else ""))
  return 0


def _cmd_opd(args, overrides) -> int:
  from sad_jax.agent import onpolicy
  from sad_jax.common import configlib

  config = configlib.load(args.config, [*overrides, *_distributed_overrides(args)])
  out = onpolicy.train_onpolicy(config, args.workdir)
  spent = ", ".join(f"{k} {v:.0f}" for k, v in out["spent"].items())
  print(f"finished {out['rounds']} rounds; model {out['final']}; spent: {spent}")
  return 0


def _cmd_plan(args, overrides) -> int:
  from sad_jax.common import configlib
  from sad_jax.trainer import plan as plan_lib

  config = configlib.load(args.config, overrides)
  p = plan_lib.plan(config, devices=args.devices, vocab=args.vocab)
  print(p.table())
  if int(config.model.lora.get("rank", 0)):  # what the same run costs without adapters
    config.model.lora.rank = 0
    full = plan_lib.plan(config, devices=args.devices, vocab=args.vocab)
    print(f"  full fine-tuning instead: {full.total / plan_lib.GiB:.3f} GiB total, resident "
          f"{full.state / plan_lib.GiB:.3f} GiB (LoRA: {p.total / full.total:.2f}× the total)")
  return 0


def _cmd_generate(args) -> int:
  from sad_jax.data import schema

  if args.teacher == "oracle":
    from sad_jax.agent import oracle

    trajs = oracle.generate(args.env, split=args.split, episodes=args.episodes,
                            seed=args.seed, start=args.start)
  else:
    from sad_jax.agent import llm

    client = llm.Client(args.endpoint, model=args.model, api_key=os.environ.get(
        "OPENAI_API_KEY", ""))
    trajs = llm.generate(client, args.env, split=args.split, episodes=args.episodes,
                         start=args.start, first_thought=not args.no_first_thought,
                         keep_failed=args.keep_failed, max_steps=args.max_steps)
  won = [0]

  def counted(items):
    for t in items:
      won[0] += bool(t.success)
      yield t

  n = schema.write_jsonl(args.output, counted(trajs))
  print(f"wrote {n} trajectories to {args.output} ({won[0]} successful)")
  return 0


def _cmd_eval(args) -> int:
  from sad_jax.agent import evaluate, folds
  from sad_jax.agent.envs.registry import make_env
  from sad_jax.common.errors import DataError

  rules = [folds.parse_rewrite(r) for r in args.rewrite or []]
  policy = evaluate.load_policy(args.checkpoint, tokenizer=args.tokenizer,
                                max_new_tokens=args.max_new_tokens)
  envs = None
  if rules:  # a counterfactual fold: the same games, their observations rewritten
    envs = [folds.RewrittenEnv(make_env(args.env), rules)
            for _ in range(max(1, min(args.batch, args.episodes)))]
  try:
    result = evaluate.evaluate(policy, env_spec=args.env, split=args.split,
                               episodes=args.episodes, start=args.start,
                               max_steps=args.max_steps, batch=args.batch, sag=args.sag,
                               seed=args.seed, transcripts=args.transcripts,
                               progress=not args.quiet, envs=envs)
  finally:
    for e in envs or []:
      e.close()
  print(result.summary())
  if rules:
    changed = sum(e.replaced for e in envs)
    print(f"observations rewritten: {changed}")
    if not changed:  # the run measured the unchanged fold: not what was asked
      raise DataError("no rule matched any observation the agent read (a typo?)",
                      field="rewrite")
  if args.transcripts:
    print(f"transcripts: {args.transcripts} (sad-jax inspect {args.transcripts} --index 0)")
  if args.json:
    import dataclasses

    fileio.json_dump(args.json, dataclasses.asdict(result), indent=1)
  return 0


def _cmd_export(args) -> int:
  from sad_jax.models import export

  if args.adapters:
    out = export.export_adapters(args.source, args.out_dir, dtype=args.dtype)
    print(f"exported LoRA adapters (r {out['rank']}, alpha {out['alpha']:g}, "
          f"{out['params']:,} parameters on {', '.join(out['modules'])}) as PEFT to "
          f"{out['out_dir']}; base: {out['base']}")
    return 0
  kw = {} if args.max_shard_bytes is None else {"max_shard_bytes": args.max_shard_bytes}
  out = export.export(args.source, args.out_dir, dtype=args.dtype, tokenizer=args.tokenizer,
                      **kw)
  print(f"exported {out['params']:,} parameters ({out['dtype']}, template {out['template']}) "
        f"to {out['out_dir']}: {', '.join(out['files'])}")
  return 0


def _cmd_convert_gguf(args) -> int:
  from sad_jax.models import gguf

  out = gguf.convert(args.input, args.out_dir, dtype=args.dtype)
  print(f"converted {out['params']:,} parameters ({out['dtype']}, template {out['template']}) "
        f"to {out['out_dir']}: {', '.join(out['files'])}")
  return 0


def _cmd_demo(args) -> int:
  from sad_jax.experiment import demo

  return demo.main_args(args)


def _print_and_save(text: str, out: str | None) -> int:
  """A study-level report: printed, and written to `out` (atomically) when given."""
  print(text)
  if out:
    with fileio.atomic_write(out) as f:
      f.write(text)
  return 0


def _cmd_compare_runs(args) -> int:
  from sad_jax.experiment.study import replication

  return _print_and_save(
      replication.compare_runs(args.earlier, args.this, reference=args.reference), args.out)


def _cmd_pool_runs(args) -> int:
  from sad_jax.experiment.study import pooling

  return _print_and_save(
      pooling.pool_runs(args.runs, reference=args.reference, split=args.split), args.out)


def _cmd_study(args, overrides) -> int:
  from sad_jax.experiment.study import runner

  return runner.main_args(args, overrides)


class _HelpFormatter(argparse.HelpFormatter):
  """argparse measures subcommand names one indent level shallower than it prints them, so
  the longest name (compare-runs) would push its help onto a second line."""

  def __init__(self, prog: str):
    super().__init__(prog, max_help_position=30, width=90)

  def add_argument(self, action) -> None:
    super().add_argument(action)
    if isinstance(action, argparse._SubParsersAction):
      self._action_max_length += self._indent_increment


def build_parser() -> argparse.ArgumentParser:
  from sad_jax.data.importers import FORMATS

  p = argparse.ArgumentParser(
      prog="sad-jax", description="Structured agent distillation.",
      formatter_class=_HelpFormatter)
  sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND",
                       title="commands, in pipeline order")

  imp = sub.add_parser("import", help="trajectories in any supported format → schema JSONL")
  imp.add_argument("--format", choices=FORMATS, default="auto")
  imp.add_argument("--on-error", choices=("raise", "skip"), default="raise")
  imp.add_argument("inputs", nargs="+", metavar="IN")
  imp.add_argument("output", metavar="OUT.jsonl")
  imp.set_defaults(func=_cmd_import)
  gen = sub.add_parser("generate", help="teacher trajectories in an environment (oracle or LLM)")
  gen.add_argument("--env", required=True, help="twx:GAME | textworld:CHALLENGE | math:DATASET")
  gen.add_argument("--split", default="train", choices=("train", "dev", "test"))
  gen.add_argument("--episodes", type=int, default=100)
  gen.add_argument("--start", type=int, default=0, help="first task index in the fold")
  gen.add_argument("--teacher", default="oracle", choices=("oracle", "llm"))
  gen.add_argument("--endpoint", default="http://localhost:8000/v1")
  gen.add_argument("--model", default="")
  gen.add_argument("--no-first-thought", action="store_true",
                   help="llm: do not seed the first thought from the teacher's own CoT")
  gen.add_argument("--keep-failed", action="store_true", help="llm: keep failed episodes")
  gen.add_argument("--max-steps", type=int, default=30)
  gen.add_argument("--seed", type=int, default=0)
  gen.add_argument("--output", "-o", required=True, metavar="OUT.jsonl")
  gen.set_defaults(func=_cmd_generate)
  tok = sub.add_parser("tokenizer", help="tokenizer tools")
  tok_sub = tok.add_subparsers(dest="tokenizer_command", required=True)
  tr = tok_sub.add_parser("train", help="train a sentencepiece model with an exact round trip")
  tr.add_argument("--vocab-size", type=int, required=True)
  tr.add_argument("--model-type", choices=("bpe", "unigram"), default="bpe")
  tr.add_argument("--multiword", action="store_true",
                  help="pieces may span words (phrases of templated text: fewer tokens)")
  tr.add_argument("--max-piece-length", type=int, default=16, help="characters")
  tr.add_argument("--format", choices=FORMATS, default="auto")
  tr.add_argument("--on-error", choices=("raise", "skip"), default="raise")
  tr.add_argument("inputs", nargs="+", metavar="IN")
  tr.add_argument("output", metavar="OUT.model")
  tr.set_defaults(func=_cmd_tokenizer_train)
  pre = sub.add_parser("prepare", help="trajectories → tokenized TFDS/ArrayRecord dataset",
                       epilog="Override config fields with --config.a.b=value.")
  pre.add_argument("--config", required=True, help="configs/X.py[:arg]")
  pre.add_argument("--out", default=None, help="output folder (default runs/prepared/NAME)")
  pre.add_argument("--on-error", choices=("raise", "skip"), default=None)
  pre.add_argument("--quiet", action="store_true", help="no progress bar")
  pre.set_defaults(func=_cmd_prepare, takes_overrides=True)
  ins = sub.add_parser("inspect", help="show one trajectory's spans and token counts")
  ins.add_argument("path", metavar="DATASET_OR_JSONL")
  ins.add_argument("--index", type=int, default=0)
  ins.add_argument("--split", default="train")
  ins.add_argument("--format", choices=FORMATS, default="auto")
  ins.add_argument("--tokenizer", default=None, help="for token counts of a JSONL file")
  ins.add_argument("--color", choices=("auto", "always", "never"), default="auto")
  ins.set_defaults(func=_cmd_inspect)
  conv = sub.add_parser("convert", help="another format's model → a Hugging Face folder")
  conv_sub = conv.add_subparsers(dest="convert_command", required=True)
  cg = conv_sub.add_parser("gguf", help="a llama.cpp GGUF file (llama; F32/F16/BF16/Q8_0/"
                           "Q4_0/Q4_1) → config, safetensors, tokenizer and chat template")
  cg.add_argument("input", metavar="IN.gguf")
  cg.add_argument("out_dir", metavar="OUT_DIR")
  cg.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                  help="of the written weights (the dequantized values are float32)")
  cg.set_defaults(func=_cmd_convert_gguf)
  tea = sub.add_parser("teacher", help="teacher top-k store: precompute, verify, import")
  tea_sub = tea.add_subparsers(dest="teacher_command", required=True)
  tp = tea_sub.add_parser("precompute", help="run the teacher once, keep top-k (resumable)",
                          epilog="Override config fields with --config.a.b=value.")
  tp.add_argument("--config", default="configs/teacher_precompute.py")
  tp.add_argument("--quiet", action="store_true")
  _add_distributed_flags(tp)
  tp.set_defaults(func=_cmd_teacher_precompute, takes_overrides=True)
  tv = tea_sub.add_parser("verify", help="fingerprints, coverage, checksums, spot recompute")
  tv.add_argument("store")
  tv.add_argument("dataset")
  tv.add_argument("--teacher", default=None, help="recompute a few examples with it")
  tv.add_argument("--spot", type=int, default=3)
  tv.set_defaults(func=_cmd_teacher_verify)
  ti = tea_sub.add_parser("import", help="a store from server prompt log-probs (vLLM)")
  ti.add_argument("input", metavar="LOGPROBS.jsonl")
  ti.add_argument("--dataset", required=True)
  ti.add_argument("--out", required=True)
  ti.add_argument("--k", type=int, required=True)
  ti.add_argument("--teacher-name", required=True)
  ti.add_argument("--teacher-vocab-size", type=int, required=True)
  ti.add_argument("--span-kinds", default="reason")
  ti.set_defaults(func=_cmd_teacher_import)
  pln = sub.add_parser("plan", help="per-device memory of a config on N devices, from shapes",
                       epilog="Override config fields with --config.a.b=value.")
  pln.add_argument("--config", required=True, help="configs/X.py[:arg]")
  pln.add_argument("--devices", type=int, required=True, help="devices of the mesh (all hosts)")
  pln.add_argument("--vocab", type=int, default=None,
                   help="vocabulary when model.hf_config.vocab_size is 0 (default 32000)")
  pln.set_defaults(func=_cmd_plan, takes_overrides=True)
  trn = sub.add_parser("train", help="span-level distillation (or a baseline) on a mesh",
                       epilog="Override config fields with --config.a.b=value. Rerunning with "
                       "the same workdir resumes from its latest checkpoint.")
  trn.add_argument("--config", required=True, help="configs/X.py[:arg]")
  trn.add_argument("--workdir", required=True)
  _add_distributed_flags(trn)
  trn.set_defaults(func=_cmd_train, takes_overrides=True)
  opd = sub.add_parser("opd", help="on-policy distillation: the student plays, the teacher "
                       "scores its tokens", epilog="Override config fields with "
                       "--config.a.b=value. Rerunning with the same workdir resumes from its "
                       "last complete round.")
  opd.add_argument("--config", required=True, help="configs/train_opd.py[:arg]")
  opd.add_argument("--workdir", required=True)
  _add_distributed_flags(opd)
  opd.set_defaults(func=_cmd_opd, takes_overrides=True)
  ev = sub.add_parser("eval", help="run a checkpoint as a ReAct agent; success rate and more")
  ev.add_argument("--checkpoint", required=True,
                  help="a training run, its final/, or an HF folder; prompts use the template "
                  "it was trained with (recorded in the folder or the run's dataset)")
  ev.add_argument("--tokenizer", default=None, help="if the folder has none")
  ev.add_argument("--env", required=True)
  ev.add_argument("--split", default="test", choices=("train", "dev", "test"))
  ev.add_argument("--episodes", type=int, default=20)
  ev.add_argument("--start", type=int, default=0)
  ev.add_argument("--max-steps", type=int, default=30)
  ev.add_argument("--max-new-tokens", type=int, default=96)
  ev.add_argument("--batch", type=int, default=8,
                  help="environments played at once (a finished game's slot takes the next)")
  ev.add_argument("--sag", type=int, default=0, help="self-consistent action generation: N")
  ev.add_argument("--seed", type=int, default=0)
  ev.add_argument("--transcripts", default=None, metavar="OUT.jsonl")
  ev.add_argument("--json", default=None, metavar="RESULT.json")
  ev.add_argument("--rewrite", action="append", metavar="OLD=>NEW",
                  help="replace OLD by NEW in every observation the agent reads (repeatable): "
                  "a counterfactual fold, e.g. a test-only sentence put back as train has it")
  ev.add_argument("--quiet", action="store_true")
  ev.set_defaults(func=_cmd_eval)
  exp = sub.add_parser("export", help="a trained model as a Hugging Face folder, for serving")
  exp.add_argument("source", metavar="RUN_OR_CHECKPOINT",
                   help="a training run (its final/), a final/ folder, or an HF folder")
  exp.add_argument("out_dir", metavar="OUT_DIR")
  exp.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
  exp.add_argument("--tokenizer", default=None, help="if neither the folder nor the run's "
                   "dataset has one")
  exp.add_argument("--max-shard-bytes", type=int, default=None,
                   help="split the weights into files of at most this size (default 2 GiB)")
  exp.add_argument("--adapters", action="store_true",
                   help="a LoRA run: its adapters as a PEFT folder, not the merged model")
  exp.set_defaults(func=_cmd_export)
  dem = sub.add_parser("demo", help="the whole method on TextWorld-Express, with a report")
  dem.add_argument("--quick", action="store_true", help="one seed, fewer steps (≈3 min)")
  dem.add_argument("--workdir", default="runs/demo")
  dem.set_defaults(func=_cmd_demo)
  stu = sub.add_parser("study", help="the comparison as a grid of cells, decided on paired stats",
                       description="Extra --config.a.b=v arguments override the study config.")
  stu.add_argument("--config", required=True, metavar="configs/study_X.py[:arg]")
  stu.add_argument("--workdir", default=None, help="default: runs/study/NAME")
  stu.add_argument("--replicate", default=None, metavar="DIR_OR_RESULTS",
                   help="an earlier run's folder or results.jsonl[.gz] (e.g. another CPU's): "
                   "train and test the arms it tested at its budgets and seeds, and report "
                   "this run against its intervals")
  stu.add_argument("--arms", default=None, metavar="A,B,…",
                   help="run only these arms (the reference among them)")
  stu.add_argument("--seeds", type=int, default=None, metavar="N",
                   help="train only each arm's first N seeds")
  stu.add_argument("--teachers", action="store_true",
                   help="train only the teacher draws (teacher.draws seeds from teacher.seed), "
                   "score each on dev and test, and write teacher_draws.md: how far the "
                   "teacher varies between draws; no students")
  stu.set_defaults(func=_cmd_study, takes_overrides=True)
  cmp = sub.add_parser("compare-runs", help="two runs of one study: THIS in EARLIER's intervals")
  cmp.add_argument("earlier", metavar="EARLIER", help="a study folder or its results.jsonl[.gz]")
  cmp.add_argument("this", metavar="THIS")
  cmp.add_argument("--reference", default="sad")
  cmp.add_argument("--out", default=None, help="also write the markdown here")
  cmp.set_defaults(func=_cmd_compare_runs)
  pool = sub.add_parser("pool-runs", help="runs with different teacher draws, pooled")
  pool.add_argument("runs", nargs="+", metavar="RUN",
                    help="study folders or their results.jsonl[.gz]")
  pool.add_argument("--reference", default="sad")
  pool.add_argument("--split", default="test", choices=("test", "test_rewritten"),
                    help="test_rewritten: the counterfactual fold (eval.test_rewrite)")
  pool.add_argument("--out", default=None, help="also write the markdown here")
  pool.set_defaults(func=_cmd_pool_runs)
  return p


def main(argv: list[str] | None = None) -> int:
  from sad_jax.common import cloud

  cloud.configure_clients()  # before any library makes a store client
  parser = build_parser()
  args, rest = parser.parse_known_args(argv)
  try:
    if getattr(args, "takes_overrides", False):
      return args.func(args, rest)
    if rest:
      parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return args.func(args)
  except SadJaxError as e:
    print(f"sad-jax: error: {e}", file=sys.stderr)
    cloud.exit_now_if_stuck(2)
    return 2
  except KeyboardInterrupt:
    print("sad-jax: interrupted", file=sys.stderr)
    return 130


if __name__ == "__main__":
  sys.exit(main())
