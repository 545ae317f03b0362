"""Docs that cannot rot: every shell block README.md and docs/ tell a user to run is run
by a test, or marked as not run (`<!-- illustrative: why -->`, or `<!-- run by …: … -->`
naming what runs it) on the line before its fence.

README's "Distil your own agent" blocks run here, as written, in order, in a fresh folder
beside a `../shared` that holds FireAct (the sizes in the README are already small)."""

import glob
import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(REPO), "shared")
DOCS = [os.path.join(REPO, "README.md"), *sorted(glob.glob(os.path.join(REPO, "docs", "*.md")))]
WORKED = "## Distil your own agent"


def shell_blocks(path: str) -> list[tuple[int, str, str, str]]:
  """(line, section, marker, text) of each ```bash block: the `##` section it is in and the
  HTML comment on the line before its fence ('' if none)."""
  lines = open(path, encoding="utf-8").read().splitlines()
  out, section, i = [], "", 0
  while i < len(lines):
    line = lines[i]
    if line.startswith("## "):
      section = line
    if line.strip() == "```bash":
      indent = line[:len(line) - len(line.lstrip())]
      prev = lines[i - 1].strip() if i else ""
      marker = prev if prev.startswith("<!--") else ""
      j = i + 1
      while lines[j].strip() != "```":
        j += 1
      body = "\n".join(x[len(indent):] if x.startswith(indent) else x for x in lines[i + 1:j])
      out.append((i + 1, section, marker, body))
      i = j
    i += 1
  return out


def test_every_shell_block_is_run_or_marked():
  unmarked = []
  for path in DOCS:
    for line, section, marker, _ in shell_blocks(path):
      rel = os.path.relpath(path, REPO)
      if rel == "README.md" and section == WORKED:
        assert not marker, f"{rel}:{line}: worked-example blocks run here; no marker"
        continue
      if not re.match(r"<!-- (illustrative|run by [^:]+): .+ -->$", marker):
        unmarked.append(f"{rel}:{line}")
  assert not unmarked, ("shell blocks neither run by a test nor marked illustrative: "
                        + ", ".join(unmarked))


def test_the_readme_test_command_is_what_ci_runs():
  ci = open(os.path.join(REPO, ".ci", "run"), encoding="utf-8").read().splitlines()[-1]
  blocks = {b[3].strip() for b in shell_blocks(os.path.join(REPO, "README.md"))
            if "run by CI" in b[2]}
  assert blocks == {ci.strip()}
  assert [b[3] for b in shell_blocks(os.path.join(REPO, "docs", "testing.md"))
          if "run by CI" in b[2]] == [ci.strip()]


def test_readme_is_for_users():
  text = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
  assert len(text.splitlines()) <= 300
  heads = [h for h in re.findall(r"^## (.+)$", text, re.M)]
  assert heads[:3] == ["Install", "The two commands", "Distil your own agent"], heads
  for link in re.findall(r"\]\(([^)#]+)\)", text):  # every relative link resolves
    assert link.startswith("http") or os.path.exists(os.path.join(REPO, link)), link


@pytest.mark.slow
@pytest.mark.early
@pytest.mark.fireact
@pytest.mark.real_model
def test_distil_your_own_agent_runs_as_written(tmp_path):
  if not os.path.isdir(os.path.join(SHARED, "data", "fireact")):
    pytest.skip(f"needs FireAct in {SHARED}/data/fireact (../shared is absent)")
  from sad_jax.common.errors import DataError
  from sad_jax.models import gguf

  try:
    gguf.fetch_smollm2()
  except DataError as e:  # as the real-model tests do
    pytest.skip(f"SmolLM2 GGUF not available: {e}")
  work = tmp_path / "work"
  work.mkdir()
  os.symlink(SHARED, tmp_path / "shared")  # the README's ../shared, beside the work folder
  blocks = [b for b in shell_blocks(os.path.join(REPO, "README.md")) if b[1] == WORKED]
  assert len(blocks) >= 7
  env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
  env.pop("XLA_FLAGS", None)  # a user's machine: its own devices, not the suite's 8
  for line, _, _, body in blocks:
    p = subprocess.run(["bash", "-euo", "pipefail", "-c", body], cwd=work, env=env,
                       capture_output=True, text=True, timeout=1500)
    assert p.returncode == 0, f"README.md:{line}\n{body}\n{p.stdout[-2000:]}{p.stderr[-3000:]}"
  import json

  assert os.path.exists(work / "runs/mine/store/manifest.json")
  assert json.loads((work / "runs/mine/eval.json").read_text())["episodes"] == 2
  assert os.path.exists(work / "runs/mine/hf/config.json")
