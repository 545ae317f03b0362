"""The wheel: built from the repository and installed non-editable into a fresh venv, it runs
`sad-jax demo --quick` from a folder outside the checkout. The configs travel inside the
package, and nothing edits sys.path to find the repository."""

import glob
import os
import site
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
@pytest.mark.early
def test_a_wheel_in_a_fresh_venv_runs_the_demo(tmp_path):
  dist = tmp_path / "dist"
  subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                  "--no-build-isolation", "-w", str(dist), REPO], check=True)
  (wheel,) = glob.glob(str(dist / "sad_jax-*.whl"))
  venv = tmp_path / "venv"
  subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
  subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "--no-deps", "--no-index", wheel],
                 check=True)
  # the dependencies from this environment's site-packages, by a .pth line: the folder is
  # appended after the venv's own, and .pth files inside it (this checkout's editable
  # install) are not read, so sad_jax can only come from the wheel
  (purelib,) = glob.glob(str(venv / "lib" / "python3*" / "site-packages"))
  with open(os.path.join(purelib, "outer_deps.pth"), "w") as f:
    f.write("\n".join(site.getsitepackages()) + "\n")
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "PYTHONPATH")}
  where = subprocess.run([str(venv / "bin" / "python"), "-c",
                          "import sad_jax, sad_jax.configs; print(sad_jax.__file__)"],
                         cwd=tmp_path, env=env, check=True, capture_output=True, text=True)
  assert where.stdout.strip().startswith(purelib), where.stdout
  run = subprocess.run([str(venv / "bin" / "sad-jax"), "demo", "--quick", "--workdir",
                        str(tmp_path / "runs")], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=1200)
  assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
  report = (tmp_path / "runs" / "quick" / "report.md").read_text()
  assert "| teacher" in report and "sad" in report
