"""`inspect`: spans shown with markers or colours, token counts per kind."""

import re

import numpy as np

from sad_jax.data import inspect, prepare, schema
from tests import helpers
from tests.data.test_prepare import make_config


def test_inspect_prepared_and_jsonl(tmp_path, spm_path):
  trajs = helpers.synthetic_trajectories(10, seed=9)
  schema.write_jsonl(tmp_path / "t.jsonl", trajs)
  prepare.prepare(make_config([str(tmp_path / "t.jsonl")], tokenizer__path=spm_path,
                              val_fraction=0.0), str(tmp_path / "ds"), progress=False)
  out = inspect.inspect(str(tmp_path / "ds"), index=3)
  builder, tok, _ = prepare.load_prepared(str(tmp_path / "ds"))
  ex = builder.as_data_source("train")[3]
  # markers wrap runs of one kind; without them the text is the decoded tokens
  body = out.split("\n", 2)[2].rsplit("\n", 1)[0]
  markers = r"\[/?(system|task|reason|action|observation|answer|pad)\]"
  assert re.sub(markers, "", body) == tok.decode(ex["ids"])
  assert "[observation]Observation: " in body and "[reason]Thought: " in body
  counts = dict(re.findall(r"(\w+)=(\d+)", out.splitlines()[-1]))
  assert int(counts["observation"]) == int(np.sum(ex["kinds"] == 5))
  assert int(counts["total"]) == len(ex["ids"])
  assert int(counts["positions"]) == int(np.isin(ex["kinds"][1:], [3, 4, 6]).sum())
  coloured = inspect.inspect(str(tmp_path / "ds"), index=3, colour=True)
  assert "\x1b[33mThought: " in coloured and "[reason]" not in coloured

  out = inspect.inspect(str(tmp_path / "t.jsonl"), index=2, tokenizer=spm_path)
  assert f"id={trajs[2].id}" in out and "loss positions=" in out
