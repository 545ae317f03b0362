"""Agent tools: Python execution in a sandboxed process, and search/lookup over a local
document collection. Tool failures come back as observation text, never as exceptions.

What the Python sandbox is (see RELIABILITY.md):
- A separate process, in its own session (the whole process group is killed at the end),
  started with `python -I` (isolated mode: no user site, no PYTHON* variables) and a
  scrubbed environment (PATH, HOME=scratch, LANG only: the parent's variables are not
  there), in a fresh scratch directory as cwd.
- Kernel limits (setrlimit): CPU seconds, address space, size of any file written,
  open files, core dumps off; and a wall-clock timeout. Output is read up to a byte cap,
  then the process is killed.
- No network: when unprivileged user namespaces are available (`unshare -rn`), the process
  runs in a new network namespace with no interfaces but loopback down: a kernel
  boundary. Where they are not, a Python audit hook refuses socket creation instead.
- A Python audit hook, installed before the user's code runs and impossible to remove
  from Python, refuses: writing, renaming or deleting files outside the scratch directory,
  reading /proc (the parent's environment), fork/exec/subprocess (fork bombs), and ctypes
  (native calls around the hook).
What it is not: the audit hook is a Python-level guard, not a security boundary against
a determined attacker with a native-code escape (a C extension already importable, or
an interpreter bug). The resource limits and the network namespace are kernel-enforced.
Run untrusted model code on a disposable machine or in a container/VM as well.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence

_PRELUDE = r'''
import sys, os, resource
# kernel limits first, before any user code (set here, not in a preexec_fn: the parent
# is multi-threaded, where running Python between fork and exec can deadlock)
resource.setrlimit(resource.RLIMIT_CPU, ({cpu_s}, {cpu_s} + 1))
resource.setrlimit(resource.RLIMIT_AS, ({mem}, {mem}))
resource.setrlimit(resource.RLIMIT_FSIZE, ({fsize}, {fsize}))
resource.setrlimit(resource.RLIMIT_NOFILE, ({nofile}, {nofile}))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
_SCRATCH = os.path.realpath(os.getcwd())
_NO_NET = {no_net}
def _inside(p):
    try:
        p = os.path.realpath(os.fsdecode(p) if not isinstance(p, int) else "")
    except Exception:
        return False
    return p == _SCRATCH or p.startswith(_SCRATCH + os.sep)
def _hook(event, args):
    if event == "open":
        path, mode = args[0], args[1] or "r"
        if isinstance(path, int):
            return
        p = os.fsdecode(path)
        if os.path.realpath(p).startswith("/proc"):
            raise PermissionError("sandbox: /proc is not readable")
        if any(c in str(mode) for c in "wax+") and not _inside(p):
            raise PermissionError("sandbox: writing outside the scratch directory: " + p)
    elif event in ("os.remove", "os.rmdir", "os.mkdir", "os.chmod", "os.chown",
                   "os.truncate", "os.link", "os.symlink", "shutil.rmtree"):
        if args and not _inside(args[0]):
            raise PermissionError("sandbox: " + event + " outside the scratch directory")
    elif event in ("os.rename",):
        if not (_inside(args[0]) and _inside(args[1])):
            raise PermissionError("sandbox: rename outside the scratch directory")
    elif event in ("os.fork", "os.forkpty", "os.system", "os.exec", "os.posix_spawn",
                   "os.spawn", "subprocess.Popen", "os.kill", "os.killpg"):
        raise PermissionError("sandbox: " + event + " is not allowed")
    elif event.startswith("ctypes."):
        raise PermissionError("sandbox: ctypes is not allowed")
    elif _NO_NET and event in ("socket.__new__", "socket.connect", "socket.bind",
                               "socket.getaddrinfo"):
        raise PermissionError("sandbox: no network")
sys.addaudithook(_hook)
del _hook
__name__ = "__main__"
with open("main.py") as _f:
    _code = compile(_f.read(), "main.py", "exec")
del _f
try:
    exec(_code, {{"__name__": "__main__"}})
except BaseException as _e:
    if isinstance(_e, SystemExit) and _e.code in (None, 0):
        raise
    import traceback
    _frames = [f for f in traceback.extract_tb(_e.__traceback__) if f.filename == "main.py"]
    print("Traceback (most recent call last):", file=sys.stderr)
    print("".join(traceback.format_list(_frames)), end="", file=sys.stderr)
    print("".join(traceback.format_exception_only(type(_e), _e)), end="", file=sys.stderr)
    sys.stderr.flush()
    os._exit(1)
'''


@dataclasses.dataclass
class ToolResult:
  ok: bool
  output: str
  error: str = ""      # timeout | memory | cpu | output | exception | killed
  seconds: float = 0.0

  def observation(self) -> str:
    if self.ok:
      return self.output.rstrip() or "(no output)"
    return (self.output.rstrip() + "\n" if self.output.strip() else "") + f"[{self.error}]"


@dataclasses.dataclass(frozen=True)
class SandboxLimits:
  wall_s: float = 10.0
  cpu_s: int = 5
  memory_mb: int = 512
  output_bytes: int = 8192
  file_bytes: int = 1 << 20
  open_files: int = 64


def _net_namespace_available() -> bool:
  if shutil.which("unshare") is None:
    return False
  try:
    return subprocess.run(["unshare", "-rn", "true"], capture_output=True,
                          timeout=10).returncode == 0
  except (OSError, subprocess.TimeoutExpired):
    return False


_NETNS: bool | None = None


DEFAULT_LIMITS = SandboxLimits()


def run_python(code: str, *, limits: SandboxLimits = DEFAULT_LIMITS,
               scratch: str | None = None) -> ToolResult:
  """Runs `code` in the sandbox; returns its stdout+stderr (capped) or the reason it
  stopped. Never raises for anything the code does."""
  global _NETNS
  if _NETNS is None:
    _NETNS = _net_namespace_available()
  own = scratch is None
  scratch = scratch or tempfile.mkdtemp(prefix="sad_jax_sandbox_")
  try:
    with open(os.path.join(scratch, "main.py"), "w", encoding="utf-8") as f:
      f.write(code)
    with open(os.path.join(scratch, "_prelude.py"), "w", encoding="utf-8") as f:
      f.write(_PRELUDE.format(no_net=not _NETNS, cpu_s=int(limits.cpu_s),
                              mem=limits.memory_mb << 20, fsize=limits.file_bytes,
                              nofile=limits.open_files))
    cmd = [sys.executable, "-I", "-S", "_prelude.py"]
    if _NETNS:
      cmd = ["unshare", "-rn", *cmd]
    env = {"PATH": "/usr/bin:/bin", "HOME": scratch, "LANG": "C.UTF-8",
           "PYTHONDONTWRITEBYTECODE": "1"}


    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=scratch, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    out, error = _read_capped(proc, limits)
    seconds = time.perf_counter() - t0
    text = out.decode("utf-8", errors="replace")
    if error:
      return ToolResult(False, text, error, seconds)
    rc = proc.returncode
    if rc == 0:
      return ToolResult(True, text, "", seconds)
    if rc in (-signal.SIGXCPU, -signal.SIGKILL) and seconds >= limits.cpu_s * 0.8:
      return ToolResult(False, text, "cpu time limit", seconds)
    if "MemoryError" in text:
      return ToolResult(False, _last_lines(text), "memory limit", seconds)
    if "File too large" in text or rc == -signal.SIGXFSZ:
      return ToolResult(False, _last_lines(text), "file size limit", seconds)
    if "PermissionError: sandbox:" in text:
      return ToolResult(False, _last_lines(text), "sandbox violation", seconds)
    return ToolResult(False, _last_lines(text), "exception" if rc > 0 else f"killed by "
                      f"signal {-rc}", seconds)
  finally:
    if own:
      shutil.rmtree(scratch, ignore_errors=True)


def _read_capped(proc: subprocess.Popen, limits: SandboxLimits) -> tuple[bytes, str]:
  """Reads output until exit, the byte cap or the wall clock; kills the process group on
  the latter two."""
  import selectors

  sel = selectors.DefaultSelector()
  sel.register(proc.stdout, selectors.EVENT_READ)
  chunks, size, error = [], 0, ""
  deadline = time.monotonic() + limits.wall_s
  while True:
    left = deadline - time.monotonic()
    if left <= 0:
      error = "timeout"
      break
    if not sel.select(timeout=min(left, 0.5)):
      if proc.poll() is not None:
        break
      continue
    data = os.read(proc.stdout.fileno(), 65536)
    if not data:
      break
    chunks.append(data)
    size += len(data)
    if size > limits.output_bytes:
      error = "output limit"
      break
  if error:
    try:
      os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
      pass
  proc.wait()
  sel.close()
  proc.stdout.close()
  out = b"".join(chunks)[: limits.output_bytes]
  return out, error


def _last_lines(text: str, n: int = 6) -> str:
  return "\n".join(text.rstrip().splitlines()[-n:])


# ----------------------------------------------------------------------------- search


_WORD = re.compile(r"\w+", re.UNICODE)


def _tokens(text: str) -> list[str]:
  return [w.lower() for w in _WORD.findall(text)]


class DocSearch:
  """search[query] → the best document (BM25) and its first sentences;
  lookup[keyword] → the next sentence of that document containing the keyword (ReAct's
  Wikipedia tools, over a local collection of {title, text})."""

  def __init__(self, docs: Sequence[dict], *, k1: float = 1.2, b: float = 0.75,
               sentences: int = 3):
    self.docs = [{"title": d["title"], "text": d["text"]} for d in docs]
    self._tf = [Counter(_tokens(d["title"] + " " + d["text"])) for d in self.docs]
    self._len = [sum(tf.values()) for tf in self._tf]
    self._avg = sum(self._len) / max(1, len(self._len))
    df = Counter(w for tf in self._tf for w in tf)
    n = len(self.docs)
    self._idf = {w: math.log(1 + (n - c + 0.5) / (c + 0.5)) for w, c in df.items()}
    self.k1, self.b, self.sentences = k1, b, sentences
    self._current: int | None = None
    self._lookup: tuple[str, int] | None = None

  def scores(self, query: str) -> list[float]:
    q = _tokens(query)
    out = []
    for tf, length in zip(self._tf, self._len):
      s = 0.0
      for w in q:
        f = tf.get(w, 0)
        if f:
          s += self._idf[w] * f * (self.k1 + 1) / (
              f + self.k1 * (1 - self.b + self.b * length / self._avg))
      out.append(s)
    return out

  def search(self, query: str) -> str:
    scores = self.scores(query)
    exact = [i for i, d in enumerate(self.docs) if d["title"].lower() == query.strip().lower()]
    best = exact[0] if exact else max(range(len(scores)), key=scores.__getitem__, default=None)
    if best is None or (not exact and scores[best] <= 0):
      similar = sorted(range(len(scores)), key=scores.__getitem__, reverse=True)[:5]
      titles = [self.docs[i]["title"] for i in similar if scores[i] > 0]
      return f"Could not find [{query}]." + (f" Similar: {titles}." if titles else "")
    self._current, self._lookup = best, None
    return " ".join(_sentences(self.docs[best]["text"])[: self.sentences])

  def lookup(self, keyword: str) -> str:
    if self._current is None:
      return "No document is open: search first."
    key = keyword.strip().lower()
    start = self._lookup[1] + 1 if self._lookup and self._lookup[0] == key else 0
    sents = _sentences(self.docs[self._current]["text"])
    hits = [i for i, s in enumerate(sents) if key in s.lower()]
    later = [i for i in hits if i >= start]
    if not later:
      return "No more results."
    self._lookup = (key, later[0])
    return f"(Result {hits.index(later[0]) + 1} / {len(hits)}) {sents[later[0]]}"


def _sentences(text: str) -> list[str]:
  return [s.strip() for s in re.split(r"(?<=[.!?])\s+", text) if s.strip()]
