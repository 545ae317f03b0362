"""Atomic file writes: write under a temporary name in the same folder, then rename."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from typing import IO


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


def _fsync_dir(folder: str) -> None:
  """Make a rename durable: sync the folder that holds the entry."""
  try:
    fd = os.open(folder, os.O_RDONLY)
  except OSError:
    return
  try:
    os.fsync(fd)
  except OSError:
    pass
  finally:
    os.close(fd)


def _tmp_prefix(path: str) -> str:
  """`.NAME.HOST-PID.`: a temporary names its writer, so a rerun can tell a dead writer's
  leftovers (SIGKILL, power loss) from a live one's."""
  return f".{os.path.basename(path)}.{socket.gethostname()}-{os.getpid()}."


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def drop_stale_temporaries(path: str | os.PathLike) -> list[str]:
  """Removes temporaries for `path` whose writer on this host is dead; returns them."""
  path = os.fspath(path).rstrip("/")
  folder = os.path.dirname(os.path.abspath(path))
  pattern = re.compile(re.escape(f".{os.path.basename(path)}.{socket.gethostname()}-")
                       + r"(\d+)\..*\.tmp(\.old)?$")
  dropped = []
  try:
    names = os.listdir(folder)
  except OSError:
    return dropped
  for name in names:
    m = pattern.match(name)
    if m and not _pid_alive(int(m.group(1))):
      full = os.path.join(folder, name)
      if os.path.isdir(full):
        shutil.rmtree(full, ignore_errors=True)
      else:
        with contextlib.suppress(FileNotFoundError):
          os.unlink(full)
      dropped.append(full)
  return dropped


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w") -> Iterator[IO]:
  """Yields a file that becomes `path` only when the block ends without error."""
  path = os.fspath(path)
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  drop_stale_temporaries(path)
  fd, tmp = tempfile.mkstemp(prefix=_tmp_prefix(path), suffix=".tmp", dir=folder)
  try:
    encoding = None if "b" in mode else "utf-8"
    with os.fdopen(fd, mode, encoding=encoding) as f:
      yield f
      f.flush()
      os.fsync(f.fileno())
    # mkstemp creates 0600; give the file the mode an ordinary open() would have
    os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, path)
    _fsync_dir(folder)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.unlink(tmp)
    raise


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[str]:
  """Yields a temporary folder that replaces `path` only when the block succeeds."""
  path = os.fspath(path).rstrip("/")
  parent = os.path.dirname(os.path.abspath(path))
  os.makedirs(parent, exist_ok=True)
  drop_stale_temporaries(path)
  tmp = tempfile.mkdtemp(prefix=_tmp_prefix(path), suffix=".tmp", dir=parent)
  try:
    yield tmp
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp creates 0700
    if os.path.isdir(path):
      # Move the old folder aside first so that `path` is never half-replaced.
      old = tmp + ".old"
      os.replace(path, old)
      os.replace(tmp, path)
      shutil.rmtree(old, ignore_errors=True)
    else:
      os.replace(tmp, path)
    _fsync_dir(parent)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
