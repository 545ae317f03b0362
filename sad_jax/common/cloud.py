"""The object-store clients, set up once and bounded (docs/design.md, "Object stores").

Three clients read and write `gs://`: gcsfs (fsspec; most of fileio), google-cloud-cpp
(inside ArrayRecord: datasets and teacher shards) and tensorstore (inside orbax:
checkpoints). Each has its own endpoint setting, so a user who points one of them at an
emulator or a private endpoint (`STORAGE_EMULATOR_HOST`, the setting gcsfs and
google-cloud-storage read) would leave ArrayRecord talking to storage.googleapis.com: with
no route there, its reader retries for many minutes (`inspect` on gs:// looked hung).
`configure_clients` gives the others the same endpoint unless they have their own.

Bounds. `SAD_JAX_IO_TIMEOUT` (seconds, default 60) is how long one request may wait for a
connection or for its next bytes; gcsfs retries a failed or stalled request (5xx, 429, a
connection error, a timeout) up to 6 attempts with backoff, and each retry is logged on
stderr. ArrayRecord's C++ reads on a remote path run under a deadline of
`DEADLINE_FACTOR` × that timeout (`bounded`); tensorstore's curl cuts a request that
sends nothing for that timeout and retries it (its own policy). A failure becomes a
`StoreError` that names the operation and the path, and the CLI exits non-zero with it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from sad_jax.common.errors import SadJaxError

T = TypeVar("T")
DEADLINE_FACTOR = 5
_ENDPOINT_VARS = ("CLOUD_STORAGE_EMULATOR_ENDPOINT",  # google-cloud-cpp (ArrayRecord)
                  "TENSORSTORE_GCS_HTTP_URL")         # tensorstore (orbax)
# every variable configure_clients reads or sets (a clean environment drops them all)
CLIENT_VARS = ("STORAGE_EMULATOR_HOST", *_ENDPOINT_VARS, "GOOGLE_AUTH_TOKEN_FOR_TESTING",
               "NO_GCE_CHECK", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT",
               "TENSORSTORE_CURL_CONNECT_TIMEOUT_SECONDS",
               "TENSORSTORE_CURL_LOW_SPEED_TIME_SECONDS", "TENSORSTORE_CURL_LOW_SPEED_LIMIT_BYTES")


class StoreError(SadJaxError, OSError):
  """An object-store operation that failed after its bounded retries (or timed out)."""

  def __init__(self, op: str, path: str, reason: str):
    self.op, self.path, self.reason = op, path, reason
    super().__init__(f"{path}: {op} failed: {reason}")

  def __str__(self) -> str:
    return f"{self.path}: {self.op} failed: {self.reason}"


def io_timeout() -> float:
  """Seconds one request may wait for a connection or for its next bytes."""
  raw = os.environ.get("SAD_JAX_IO_TIMEOUT", "60")
  try:
    value = float(raw)
  except ValueError:
    raise SadJaxError(f"SAD_JAX_IO_TIMEOUT={raw!r} is not a number of seconds") from None
  if value <= 0:
    raise SadJaxError(f"SAD_JAX_IO_TIMEOUT={raw!r} must be positive")
  return value


def configure_clients() -> None:
  """One endpoint for every client (see the module docstring); a client's own setting is
  kept. With an emulator (`STORAGE_EMULATOR_HOST`) also: tensorstore's fixed test token
  (the emulator checks none, and without it tensorstore looks for real credentials), no
  GCE metadata probe, and no gcsfs storage-control probe (an emulator has no such API)."""
  # tensorstore's curl: a connection that does not open, or a transfer that sends nothing
  # for the timeout, is cut, and tensorstore retries it (its own policy: up to 32
  # attempts, backoff to 32 s); without these a stalled answer holds orbax forever
  seconds = str(math.ceil(io_timeout()))
  for var, value in (("TENSORSTORE_CURL_CONNECT_TIMEOUT_SECONDS", seconds),
                     ("TENSORSTORE_CURL_LOW_SPEED_TIME_SECONDS", seconds),
                     ("TENSORSTORE_CURL_LOW_SPEED_LIMIT_BYTES", "1")):
    os.environ.setdefault(var, value)
  _bound_every_gcsfs()
  host = os.environ.get("STORAGE_EMULATOR_HOST")
  if host:
    url = host if "://" in host else f"http://{host}"
    for var in _ENDPOINT_VARS:
      os.environ.setdefault(var, url)
    os.environ.setdefault("GOOGLE_AUTH_TOKEN_FOR_TESTING", "emulator")
    os.environ.setdefault("NO_GCE_CHECK", "True")
    os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
  _log_retries()


def _bound_every_gcsfs() -> None:
  """fileio passes fs_options to its own gcsfs; orbax reads a checkpoint's metadata through
  etils.epath, whose gcsfs has none (a stalled answer held a restore forever). fsspec's
  config gives every gcsfs instance the same bounds; a user's own setting is kept."""
  import importlib.util

  if importlib.util.find_spec("gcsfs") is None:
    return
  import fsspec.config

  for protocol in ("gs", "gcs"):
    options = fsspec.config.conf.setdefault(protocol, {})
    for key, value in fs_options(protocol).items():
      options.setdefault(key, value)


class _RetryLines(logging.Filter):
  """gcsfs logs its retries at debug level: those, and its warnings, reach stderr."""

  def filter(self, record: logging.LogRecord) -> bool:
    message = record.getMessage()
    return record.levelno >= logging.WARNING or "retrying after" in message or \
        "out of retries" in message


class _OneLine(logging.Formatter):
  """The message alone: the error that ends the retries is reported once, by the CLI."""

  def format(self, record: logging.LogRecord) -> str:
    return f"sad-jax: object store: {record.getMessage()}"


# google-cloud-cpp's words for a request it gave up on (ArrayRecord's reader raises them
# as RuntimeError, the same type as a damaged file)
_CPP_STORE_ERROR = re.compile(r"Permanent error|Retry policy exhausted|Retry loop")


def cpp_store_error(e: BaseException, *, op: str, path: str) -> StoreError | None:
  """A StoreError for a C++ client's store failure, None for anything else (a damaged
  file stays the caller's DataError)."""
  text = str(e)
  return StoreError(op, path, text.splitlines()[0]) if _CPP_STORE_ERROR.search(text) else None


def _log_retries() -> None:
  log = logging.getLogger("gcsfs")
  if any(isinstance(f, _RetryLines) for h in log.handlers for f in h.filters):
    return
  handler = logging.StreamHandler(sys.stderr)
  handler.addFilter(_RetryLines())
  handler.setFormatter(_OneLine())
  log.addHandler(handler)
  log.setLevel(logging.DEBUG)
  log.propagate = False


def fs_options(protocol: str) -> dict[str, Any]:
  """fsspec.filesystem options that bound each request (gcsfs: aiohttp's connect and
  read timeouts; no total, so a long download that keeps moving is not cut)."""
  if protocol not in ("gs", "gcs"):
    return {}
  import aiohttp

  t = io_timeout()
  return {"requests_timeout": aiohttp.ClientTimeout(total=None, sock_connect=t, sock_read=t)}


def _store_errors() -> tuple[type[BaseException], ...]:
  import asyncio

  errors: list[type[BaseException]] = [OSError, RuntimeError, asyncio.TimeoutError]
  with contextlib.suppress(ImportError):
    import aiohttp

    errors.append(aiohttp.ClientError)
  with contextlib.suppress(ImportError):
    from gcsfs.retry import HttpError

    errors.append(HttpError)
  with contextlib.suppress(ImportError):
    import google.auth.exceptions

    errors.append(google.auth.exceptions.GoogleAuthError)
  return tuple(errors)


def _reason(e: BaseException) -> str:
  lines = [x.strip() for x in str(e).strip().splitlines() if x.strip()]
  if lines and lines[0].startswith("Forbidden:"):  # gcsfs: "Forbidden: <url>\n<message>"
    lines = ["HTTP 403 (permission denied)", *lines[1:]]
  text = "; ".join(lines)
  code = getattr(e, "code", None) or getattr(e, "status", None)
  name = type(e).__name__
  if code and str(code) not in text:
    text = f"{text} (HTTP {code})" if text else f"HTTP {code}"
  return f"{name}: {text}" if text else name


@contextlib.contextmanager
def remote_op(op: str, path: str) -> Iterator[None]:
  """Turns a store failure inside the block into a StoreError naming `op` and `path`.
  A missing object stays FileNotFoundError and a failed precondition FileExistsError
  (callers act on those), and errors of ours pass through."""
  try:
    yield
  except (FileNotFoundError, FileExistsError, SadJaxError):
    raise
  except _store_errors() as e:
    raise StoreError(op, path, _reason(e)) from e


_abandoned: list[threading.Thread] = []


def exit_now_if_stuck(code: int) -> None:
  """Ends the process with `code` at once if a bounded call was abandoned: its thread is
  still inside the C++ client, and the interpreter's normal shutdown would wait on it."""
  if any(t.is_alive() for t in _abandoned):
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def bounded(fn: Callable[[], T], *, op: str, path: str) -> T:
  """fn() under a deadline of DEADLINE_FACTOR × io_timeout(): for a client whose own
  retries cannot be bounded from here (ArrayRecord's C++ reader). fn runs on a daemon
  thread (the reader releases the GIL); past the deadline it is abandoned and StoreError
  raised (the CLI then exits at once: exit_now_if_stuck)."""
  deadline = DEADLINE_FACTOR * io_timeout()
  out: list = []

  def run() -> None:
    try:
      out.append((True, fn()))
    except BaseException as e:  # re-raised on the caller's thread
      out.append((False, e))

  worker = threading.Thread(target=run, name=f"sad-jax {op}", daemon=True)
  worker.start()
  worker.join(deadline)
  if worker.is_alive():
    _abandoned.append(worker)
    raise StoreError(op, path, f"no result within {deadline:g} s ({DEADLINE_FACTOR} × "
                     "SAD_JAX_IO_TIMEOUT): the store is unreachable, stalled or failing "
                     "(its client retries)")
  ok, value = out[0]
  if not ok:
    raise value
  return value
