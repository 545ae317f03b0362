"""The `sad-jax` command: real subprocesses, exit codes, errors that name the place,
and nothing half-written."""

import json
import os
import subprocess
import sys

import pytest

from sad_jax import cli
from sad_jax.data import schema
from tests import helpers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*args, cwd=REPO):
  return subprocess.run([sys.executable, "-m", "sad_jax.cli", *args], cwd=cwd,
                        capture_output=True, text=True, timeout=300)


def test_import_prepare_inspect_subprocess(tmp_path):
  src = helpers.write_jsonl(str(tmp_path / "chat.jsonl"), [
      {"messages": [{"role": "user", "content": f"Q{i}"},
                    {"role": "assistant", "content": f"Thought: t{i}\nAction: go[{i}]"},
                    {"role": "user", "content": "Observation: ok"},
                    {"role": "assistant", "content": "Thought: done\nAction: finish[x]"},
                    {"role": "user", "content": "Observation: Episode finished, reward = False"}]}
      for i in range(40)])
  out = tmp_path / "t.jsonl"
  r = run("import", "--format", "chat", src, str(out))
  assert r.returncode == 0, r.stderr
  assert "wrote 40 trajectories" in r.stdout and "reason=80" in r.stdout
  assert "success: False=40" in r.stdout
  r = run("tokenizer", "train", "--vocab-size", "400", str(out), str(tmp_path / "tok.model"))
  assert r.returncode == 0, r.stderr
  assert "round trip exact on 40/40" in r.stdout
  r = run("prepare", "--config", "configs/prepare_base.py", "--out", str(tmp_path / "ds"),
          f"--config.inputs=('{out}',)", f"--config.tokenizer.path={tmp_path / 'tok.model'}",
          "--quiet")
  assert r.returncode == 0, r.stderr
  assert "fingerprint" in r.stdout
  r = run("inspect", str(tmp_path / "ds"), "--index", "0")
  assert r.returncode == 0, r.stderr
  assert "[action]Action: go[" in r.stdout


@pytest.mark.parametrize("record, field", [
    ('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "Action: a"},'
     ' {"role": "assistant", "content": "Action: b"}]}', "messages[2].role"),
    ('{"messages": [{"role": "user", "content": "q"}, {"role": "wizard", "content": "x"}]}',
     "messages[1].role"),
    ('{"instruction": "q", "output": "Thought: t\\nAction: search[x\\n"}', "output"),
    ('{"instruction": "q", "output": "Thought:\\nAction: search[x]\\n"}', "output"),
    ('{"instruction": "q"}', "output"),
])
def test_bad_input_exit_code_and_place(tmp_path, capsys, record, field):
  good = '{"instruction": "q", "output": "Thought: t\\nAction: finish[x]\\n"}'
  path = tmp_path / "in.jsonl"
  path.write_text(good + "\n" + record + "\n")
  out = tmp_path / "out.jsonl"
  assert cli.main(["import", str(path), str(out)]) == 2
  err = capsys.readouterr().err
  assert f"{path}, record 2, field {field!r}" in err
  assert "Traceback" not in err
  assert not out.exists() and os.listdir(tmp_path) == ["in.jsonl"]
  # skip instead: counted and reported
  assert cli.main(["import", "--on-error", "skip", str(path), str(out)]) == 0
  captured = capsys.readouterr().out
  assert "skipped 1 records" in captured and "record 2" in captured
  assert len(schema.read_jsonl(out)) == 1


def test_malformed_and_undecodable_subprocess(tmp_path):
  path = tmp_path / "in.jsonl"
  path.write_bytes(b'{"instruction": "q", "output": "Thought: t\\nAction: a\\n"}\n{"text": "\xc3\x28"}\n')
  r = run("import", str(path), str(tmp_path / "o.jsonl"))
  assert r.returncode == 2
  assert f"{path}, record 2: undecodable bytes" in r.stderr and "Traceback" not in r.stderr
  path.write_text('{"instruction": "q", "output": "Thought: t\\nAction: a\\n"}\n{"text": \n')
  r = run("import", str(path), str(tmp_path / "o.jsonl"))
  assert r.returncode == 2 and "record 2: malformed JSON" in r.stderr
  assert not (tmp_path / "o.jsonl").exists()


def test_prepare_config_errors(tmp_path, capsys):
  assert cli.main(["prepare", "--config", "configs/prepare_base.py", "--out", str(tmp_path / "o"),
                   "--config.no_such_key=1"]) == 2
  assert "unknown config key 'no_such_key'" in capsys.readouterr().err
  assert cli.main(["prepare", "--config", "configs/prepare_base.py", "--out", str(tmp_path / "o"),
                   "--config.max_len=many"]) == 2
  assert "bad value for max_len" in capsys.readouterr().err
  assert cli.main(["prepare", "--config", "configs/nope.py"]) == 2
  assert "config file not found" in capsys.readouterr().err
  assert not (tmp_path / "o").exists()


def test_tokenizer_train_too_small_vocab(tmp_path, capsys):
  path = helpers.write_jsonl(str(tmp_path / "t.jsonl"),
                             [t.to_dict() for t in helpers.synthetic_trajectories(5)])
  assert cli.main(["tokenizer", "train", "--vocab-size", "50", path,
                   str(tmp_path / "m.model")]) == 2
  assert "sentencepiece training failed" in capsys.readouterr().err
  assert not (tmp_path / "m.model").exists()


def test_inspect_errors(tmp_path, capsys):
  assert cli.main(["inspect", str(tmp_path / "missing.jsonl")]) == 2
  assert "no such file" in capsys.readouterr().err
  path = helpers.write_jsonl(str(tmp_path / "t.jsonl"),
                             [t.to_dict() for t in helpers.synthetic_trajectories(2)])
  assert cli.main(["inspect", path, "--index", "5"]) == 2
  assert "index 5 out of range" in capsys.readouterr().err
  json.loads(open(path).readline())


@pytest.mark.slow
def test_sigkill_mid_prepare_then_rerun_is_byte_identical(tmp_path):
  """SIGKILL at a random moment of `sad-jax prepare`: no output folder appears (its
  temporary is not taken for it), and the rerun writes exactly the clean run's bytes."""
  import hashlib
  import random
  import signal
  import time

  src = str(tmp_path / "t.jsonl")
  schema.write_jsonl(src, helpers.synthetic_trajectories(3000, seed=3, multiline=True))

  def cmd(out):
    return [sys.executable, "-m", "sad_jax.cli", "prepare", "--config",
            "configs/prepare_base.py", "--out", out, f"--config.inputs=('{src}',)",
            "--config.tokenizer.vocab_size=600"]

  def digests(folder):
    out = {}
    for root, _, names in os.walk(folder):
      for n in names:
        path = os.path.join(root, n)
        out[os.path.relpath(path, folder)] = hashlib.sha256(open(path, "rb").read()).hexdigest()
    return out

  def start(name):
    """Starts a prepare; returns it once its temporary output folder exists (work begun)."""
    p = subprocess.Popen(cmd(str(tmp_path / name)), cwd=REPO, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
    while not [n for n in os.listdir(tmp_path) if n.startswith(f".{name}.")]:
      assert p.poll() is None, p.stderr.read()
      time.sleep(0.005)
    return p, time.time()

  p, t0 = start("clean")
  assert p.wait(timeout=300) == 0, p.stderr.read()
  took = time.time() - t0
  work = str(tmp_path / "killed")
  delay = random.uniform(0, took)
  p, _ = start("killed")
  time.sleep(delay)
  p.send_signal(signal.SIGKILL)
  p.wait()
  print(f"SIGKILL {delay:.2f} s into the {took:.2f} s of writing (rc {p.returncode})")
  leftovers = [n for n in os.listdir(tmp_path) if n.startswith(".killed.")]
  if p.returncode == -signal.SIGKILL:
    if os.path.exists(work):
      # the kill came after the rename, the commit point (the process was still exiting):
      # then the folder is the whole output, never a part of it
      assert digests(work) == digests(str(tmp_path / "clean")), "a killed prepare left a part"
    else:
      assert cli.main(["inspect", work, "--index", "0"]) != 0  # nothing there to load
  r = subprocess.run(cmd(work), cwd=REPO, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr
  assert digests(work) == digests(str(tmp_path / "clean"))
  # the dead writer's temporary folder is gone after the rerun
  assert not [n for n in os.listdir(tmp_path) if n.startswith(".killed.")], leftovers


def test_help_lists_the_commands_in_pipeline_order_one_line_each(capsys):
  """`sad-jax --help` (it once crashed: a bare % in a help string)."""
  with pytest.raises(SystemExit) as e:
    cli.main(["--help"])
  assert e.value.code == 0
  text = capsys.readouterr().out
  listed = text.split("commands, in pipeline order:", 1)[1].splitlines()[2:]
  names = [line.split()[0] for line in listed if line.strip()]
  assert names == ["import", "generate", "tokenizer", "prepare", "inspect", "convert",
                   "teacher", "plan", "train", "opd", "eval", "export", "demo", "study",
                   "compare-runs", "pool-runs"]
  assert all(len(line.split(None, 1)) == 2 for line in listed if line.strip())  # one line each
  for name in names:  # every subcommand's own help renders too
    with pytest.raises(SystemExit) as e:
      cli.main([name, "--help"])
    assert e.value.code == 0
