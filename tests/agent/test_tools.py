"""The Python sandbox contains what model-written code may do, and reports it as an
observation; the document search ranks by BM25 (checked against a hand computation)."""

import math
import os

import pytest

from sad_jax.agent import tools
from sad_jax.agent.tools import DocSearch, SandboxLimits, run_python

LIMITS = SandboxLimits(wall_s=5, cpu_s=2, memory_mb=256, output_bytes=4096,
                       file_bytes=1 << 20)

ESCAPES = {
    "infinite loop": ("while True: pass", "cpu time limit"),
    "sleep forever": ("import time; time.sleep(1000)", "timeout"),
    "allocate 10 GB": ("x = bytearray(10 * 1024**3)", "memory limit"),
    "fork bomb": ("import os\nwhile True: os.fork()", "sandbox violation"),
    "subprocess": ("import subprocess; subprocess.run(['sh', '-c', 'echo hi'])",
                   "sandbox violation"),
    "write outside scratch": ("open('/tmp/sad_jax_escape_test', 'w').write('x')",
                              "sandbox violation"),
    "delete outside scratch": ("import os; os.remove('/etc/hostname')", "sandbox violation"),
    "parent environment via /proc": (
        "import os; print(open(f'/proc/{os.getppid()}/environ').read())", "sandbox violation"),
    "ctypes around the hook": ("import ctypes; ctypes.CDLL(None).system(b'true')",
                               "sandbox violation"),
    "huge output": ("print('x' * 10**7)", "output limit"),
    "huge file": ("open('big.bin', 'wb').write(b'0' * (10 << 20))", "file size limit"),
    "exception": ("1 / 0", "exception"),
}


@pytest.mark.parametrize("name", sorted(ESCAPES))
def test_escape_is_contained_and_reported(name):
  code, error = ESCAPES[name]
  result = run_python(code, limits=LIMITS)
  assert not result.ok and result.error == error, result
  obs = result.observation()
  assert f"[{error}]" in obs and len(obs) <= LIMITS.output_bytes + 100
  assert result.seconds < LIMITS.wall_s + 3
  assert not os.path.exists("/tmp/sad_jax_escape_test")


def test_network_is_unreachable():
  result = run_python("import socket\ns = socket.socket()\ns.settimeout(2)\n"
                      "s.connect(('1.1.1.1', 80))\nprint('connected')", limits=LIMITS)
  assert not result.ok and "connected" not in result.output
  # either the kernel (no interface in the namespace) or the audit hook refused it
  assert "unreachable" in result.output or "no network" in result.output


def test_environment_is_scrubbed_and_scratch_is_usable(monkeypatch):
  monkeypatch.setenv("SAD_JAX_SECRET", "hunter2")
  result = run_python("import os\nopen('notes.txt', 'w').write('kept')\n"
                      "print(sorted(os.environ), open('notes.txt').read(), os.getcwd())",
                      limits=LIMITS)
  assert result.ok, result
  assert "SAD_JAX_SECRET" not in result.output and "hunter2" not in result.output
  assert "kept" in result.output and "sad_jax_sandbox_" in result.output


def test_network_namespace_is_used_where_available():
  # on this kind of machine unprivileged user namespaces exist: the kernel boundary is on
  assert tools._net_namespace_available() == (os.system("unshare -rn true 2>/dev/null") == 0)


def test_bm25_search_and_lookup():
  docs = [{"title": "Paris", "text": "Paris is the capital of France. It has the Louvre. "
                                     "The Louvre is a museum."},
          {"title": "Lyon", "text": "Lyon is a city in France. It is known for food."},
          {"title": "Berlin", "text": "Berlin is the capital of Germany."}]
  s = DocSearch(docs)
  # hand computation of BM25(q="capital germany", Berlin); k1=1.2, b=0.75
  # document lengths (title + text tokens): 16, 12, 7
  n, avg = 3, (16 + 12 + 7) / 3
  idf = lambda df: math.log(1 + (n - df + 0.5) / (df + 0.5))
  tf_part = lambda f, dl: f * 2.2 / (f + 1.2 * (0.25 + 0.75 * dl / avg))
  expected = idf(2) * tf_part(1, 7) + idf(1) * tf_part(1, 7)  # capital: df 2; germany: df 1
  assert s.scores("capital germany")[2] == pytest.approx(expected, rel=1e-12)
  assert s.search("capital of Germany") == "Berlin is the capital of Germany."
  assert s.search("Paris").startswith("Paris is the capital of France.")
  assert s.lookup("louvre") == "(Result 1 / 2) It has the Louvre."
  assert s.lookup("louvre") == "(Result 2 / 2) The Louvre is a museum."
  assert s.lookup("louvre") == "No more results."
  assert s.search("zebra").startswith("Could not find")
