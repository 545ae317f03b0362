"""The `sad-jax` command line. Each subcommand is a thin wrapper over a library function.

Errors in the input (SadJaxError) print one line naming the place and exit with 2;
nothing is left half-written.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys

from sad_jax.errors import SadJaxError, SkipReport


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
                            model_type=args.model_type)
  bad = sum(tok.decode(tok.encode(t).ids) != t for t in texts)
  print(f"wrote {args.output}: vocab {tok.vocab_size}, trained on {len(texts)} trajectories; "
        f"round trip exact on {len(texts) - bad}/{len(texts)}")
  print(skips.summary())
  return 0 if bad == 0 else 1


def _cmd_prepare(args, overrides) -> int:
  from sad_jax import configlib
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


def build_parser() -> argparse.ArgumentParser:
  from sad_jax.data.importers import FORMATS

  p = argparse.ArgumentParser(prog="sad-jax", description="Structured agent distillation.")
  sub = p.add_subparsers(dest="command", required=True)

  imp = sub.add_parser("import", help="trajectories in any supported format → schema JSONL")
  imp.add_argument("--format", choices=FORMATS, default="auto")
  imp.add_argument("--on-error", choices=("raise", "skip"), default="raise")
  imp.add_argument("inputs", nargs="+", metavar="IN")
  imp.add_argument("output", metavar="OUT.jsonl")
  imp.set_defaults(func=_cmd_import)

  tok = sub.add_parser("tokenizer", help="tokenizer tools")
  tok_sub = tok.add_subparsers(dest="tokenizer_command", required=True)
  tr = tok_sub.add_parser("train", help="train a sentencepiece model with an exact round trip")
  tr.add_argument("--vocab-size", type=int, required=True)
  tr.add_argument("--model-type", choices=("bpe", "unigram"), default="bpe")
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
  return p


def main(argv: list[str] | None = None) -> int:
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
    return 2
  except KeyboardInterrupt:
    print("sad-jax: interrupted", file=sys.stderr)
    return 130


if __name__ == "__main__":
  sys.exit(main())
