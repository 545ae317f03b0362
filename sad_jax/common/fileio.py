"""The path layer: every read and write of the project's files, local or on an object store
(`gs://…`, through fsspec/gcsfs, the backend etils.epath, orbax and tfds use too).

Atomic writes. Locally: write under a temporary name in the same folder, then rename. An
object store has no rename, but one object appears only once its upload completes, so
`atomic_write` buffers locally and uploads on success; `atomic_dir` uploads every file,
then a completion marker (`_complete.json`, listing each file's size) LAST, and readers
of a remote folder require it (`require_complete`): a partial write is never taken as
complete. Libraries that read only local files (sentencepiece, tokenizers, safetensors)
get a staged local copy (`local_copy`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import posixpath
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from typing import IO, Any

COMPLETE_MARKER = "_complete.json"
_URL_RE = re.compile(r"^[a-z][a-z0-9+.-]*://", re.I)


# ----------------------------------------------------------------------------- remote paths


def is_remote(path: str | os.PathLike | None) -> bool:
  """`gs://…` (any `scheme://`): an object store path, not a local one."""
  return path is not None and bool(_URL_RE.match(os.fspath(path)))


def _fs(path: str):
  """The fsspec filesystem of a remote path. Listings are not cached: another process
  (a precompute worker, a resumed run) may have written since."""
  import fsspec

  protocol = os.fspath(path).split("://", 1)[0]
  try:
    return fsspec.filesystem(protocol, use_listings_cache=False)
  except ImportError as e:  # gcsfs (gs://) or s3fs (s3://) missing
    hint = ("pip install 'sad_jax[gcs]'" if protocol in ("gs", "gcs")
            else "install its fsspec backend")
    raise OSError(f"{protocol}:// paths need an fsspec backend ({hint}): {e}") from None


def join(path: str | os.PathLike, *parts: str) -> str:
  path = os.fspath(path)
  return posixpath.join(path, *parts) if is_remote(path) else os.path.join(path, *parts)


def dirname(path: str | os.PathLike) -> str:
  path = os.fspath(path)
  return posixpath.dirname(path.rstrip("/")) if is_remote(path) else os.path.dirname(path)


def abspath(path: str | os.PathLike) -> str:
  """os.path.abspath for a local path; a remote path as it is (minus a trailing /)."""
  path = os.fspath(path)
  return path.rstrip("/") if is_remote(path) else os.path.abspath(path)


def exists(path: str | os.PathLike) -> bool:
  path = os.fspath(path)
  return _fs(path).exists(path) if is_remote(path) else os.path.exists(path)


def isdir(path: str | os.PathLike) -> bool:
  path = os.fspath(path)
  return _fs(path).isdir(path) if is_remote(path) else os.path.isdir(path)


def isfile(path: str | os.PathLike) -> bool:
  path = os.fspath(path)
  return _fs(path).isfile(path) if is_remote(path) else os.path.isfile(path)


def getsize(path: str | os.PathLike) -> int:
  path = os.fspath(path)
  return int(_fs(path).size(path)) if is_remote(path) else os.path.getsize(path)


def listdir(path: str | os.PathLike) -> list[str]:
  """Names in a folder (FileNotFoundError when there is none)."""
  path = os.fspath(path)
  if not is_remote(path):
    return os.listdir(path)
  fs = _fs(path)
  names = [posixpath.basename(p.rstrip("/")) for p in fs.ls(path.rstrip("/"), detail=False)]
  if not names and not fs.exists(path):
    raise FileNotFoundError(path)
  return names


def glob(folder: str | os.PathLike, pattern: str) -> list[str]:
  """Paths in `folder` whose name matches the shell `pattern` (the folder is literal)."""
  import fnmatch

  folder = os.fspath(folder)
  try:
    names = listdir(folder)
  except OSError:
    return []
  return sorted(join(folder, n) for n in names if fnmatch.fnmatchcase(n, pattern))


def makedirs(path: str | os.PathLike) -> None:
  """A local folder with its parents; nothing on an object store (folders are prefixes)."""
  if not is_remote(path):
    os.makedirs(path, exist_ok=True)


def rmtree(path: str | os.PathLike) -> None:
  path = os.fspath(path)
  if not is_remote(path):
    shutil.rmtree(path, ignore_errors=True)
    return
  fs = _fs(path)
  with contextlib.suppress(FileNotFoundError):
    if fs.exists(path):
      fs.rm(path, recursive=True)


def remove(path: str | os.PathLike) -> None:
  path = os.fspath(path)
  with contextlib.suppress(FileNotFoundError):
    if is_remote(path):
      _fs(path).rm_file(path)
    else:
      os.unlink(path)


def open_file(path: str | os.PathLike, mode: str = "r") -> IO:
  """open() for reading (or a whole new file) on either side; a missing remote object
  raises FileNotFoundError like a missing local file."""
  path = os.fspath(path)
  encoding = None if "b" in mode else "utf-8"
  if not is_remote(path):
    return open(path, mode, encoding=encoding)
  f = _fs(path).open(path, mode.replace("t", "") if "b" in mode else mode.replace("t", "") + "b")
  if "b" in mode:
    return f
  import io

  return io.TextIOWrapper(f, encoding="utf-8")


def read_bytes(path: str | os.PathLike) -> bytes:
  with open_file(path, "rb") as f:
    return f.read()


def read_text(path: str | os.PathLike) -> str:
  return read_bytes(path).decode("utf-8")


def copyfile(src: str | os.PathLike, dst: str | os.PathLike) -> None:
  """One file, either side to either side (a remote destination appears whole)."""
  src, dst = os.fspath(src), os.fspath(dst)
  if is_remote(dst):
    local = local_copy(src) if is_remote(src) else src
    _fs(dst).put_file(local, dst)
  elif is_remote(src):
    _fs(src).get_file(src, dst)
  else:
    shutil.copyfile(src, dst)


def cache_dir() -> str:
  """Where remote files are staged for libraries that read only local files."""
  return os.environ.get("SAD_JAX_CACHE") or os.path.join(
      os.path.expanduser("~"), ".cache", "sad_jax", "staged")


_READ_ATTEMPTS = 5  # reads of an object that keeps changing under them, before giving up


def local_copy(path: str | os.PathLike) -> str:
  """A local path holding the file at `path`: `path` itself when local, else a copy in
  cache_dir() keyed by the object's URL and version (generation/etag and size), so a
  changed object is fetched again and an unchanged one only once. The copy is taken as
  that version only when the object's version is the same before and after the download
  and the bytes have its size (an object rewritten mid-read is read again)."""
  path = os.fspath(path)
  if not is_remote(path):
    return path
  fs = _fs(path)
  for _ in range(_READ_ATTEMPTS):
    info = fs.info(path)
    local = _staged_path(path, info)
    if os.path.exists(local):
      return local
    folder = os.path.dirname(local)
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_tmp_prefix(local), suffix=".tmp", dir=folder)
    os.close(fd)
    try:
      fs.get_file(path, tmp)
      if _read_whole(fs, path, info, os.path.getsize(tmp)):
        os.replace(tmp, local)
        return local
    finally:
      with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
  raise _changed_while_read(path)


def _version(info: dict) -> str:
  return "|".join(str(info.get(k, "")) for k in ("generation", "etag", "md5Hash", "size"))


def _read_whole(fs, path: str, before: dict, nbytes: int) -> bool:
  """Whether `nbytes` read after `before` (its fs.info) are that version of the object,
  whole: the size it named, and the same version still live after the read."""
  return nbytes == int(before.get("size") or 0) and _version(fs.info(path)) == _version(before)


def _changed_while_read(path: str) -> OSError:
  return OSError(f"{path}: the object changed while it was read, {_READ_ATTEMPTS} times "
                 "(another process is rewriting it)")


def _staged_path(path: str, info: dict) -> str:
  key = hashlib.sha256(f"{path}\0{_version(info)}".encode()).hexdigest()[:24]
  return os.path.join(cache_dir(), key, posixpath.basename(path))


# ----------------------------------------------------------------------------- conditional writes


def _gcsfs(fs) -> bool:
  """gcsfs (gs://): its requests can carry GCS's generation preconditions."""
  return hasattr(fs, "_call") and hasattr(fs, "_location") and "gs" in (
      fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


def read_versioned(path: str) -> tuple[bytes, int | None]:
  """An object's bytes and the generation they are (0: no object; None: a store without
  generations). The generation is read before and after, so the pair is consistent."""
  fs = _fs(path)
  for _ in range(_READ_ATTEMPTS):
    try:
      before = fs.info(path)
    except FileNotFoundError:
      return b"", 0 if _gcsfs(fs) else None
    data = fs.cat_file(path)
    if _read_whole(fs, path, before, len(data)):
      generation = before.get("generation")
      return data, int(generation) if generation is not None and _gcsfs(fs) else None
  raise _changed_while_read(path)


def put_if_generation(path: str, data: bytes, generation: int | None) -> int | None:
  """Writes the object `path` whole, only if its live generation is still `generation`
  (0: no object yet); returns the new generation.

  On gs:// the precondition travels with the upload, so the server refuses a write that
  would replace content this writer has not seen: a second writer of the same object, or a
  delayed duplicate of this writer's own earlier upload (a client retry whose first
  attempt reaches the server late would otherwise put older bytes back over newer ones).
  A refusal that finds this very content live (a retry of an upload that had landed) is
  taken as success. Stores without generations (`generation` None): a plain upload."""
  fs = _fs(path)
  if generation is None or not _gcsfs(fs):
    fs.pipe_file(path, data)
    return None
  import base64
  from urllib.parse import quote

  from fsspec.asyn import sync

  bucket, key, _ = fs.split_path(path)
  body = (b'--==0==\nContent-Type: application/json; charset=UTF-8\n\n'
          + json.dumps({"name": key}).encode()
          + b"\n--==0==\nContent-Type: application/octet-stream\n\n" + data
          + b"\n--==0==--")
  try:
    out = sync(fs.loop, fs._call, "POST", f"{fs._location}/upload/storage/v1/b/{quote(bucket)}/o",
               uploadType="multipart", ifGenerationMatch=str(generation), data=body,
               headers={"Content-Type": 'multipart/related; boundary="==0=="'}, json_out=True)
    return int(out["generation"])
  except FileExistsError:  # 412: the live generation is not `generation`
    live = fs.info(path)
    md5 = base64.b64encode(hashlib.md5(data).digest()).decode()
    if int(live.get("size") or 0) == len(data) and live.get("md5Hash") == md5:
      return int(live["generation"])
    raise OSError(f"{path}: another writer replaced this object (expected generation "
                  f"{generation}, found {live.get('generation')}); is a second run writing "
                  "the same folder?") from None


def _files_under(folder: str) -> dict[str, int]:
  """relative path → size of every file under a local folder (but the marker)."""
  out = {}
  for root, _, names in os.walk(folder):
    for n in names:
      full = os.path.join(root, n)
      rel = os.path.relpath(full, folder).replace(os.sep, "/")
      if rel != COMPLETE_MARKER:
        out[rel] = os.path.getsize(full)
  return dict(sorted(out.items()))


def write_marker(folder: str) -> None:
  """The completion marker of a local folder about to become complete: its files and sizes.
  It travels with the folder (a copy to a bucket carries it)."""
  with open(os.path.join(folder, COMPLETE_MARKER), "w", encoding="utf-8") as f:
    json.dump({"files": _files_under(folder)}, f, indent=1)


def require_complete(folder: str | os.PathLike, *, what: str) -> None:
  """On an object store, a folder is complete only when its marker is there and every file
  it lists is there with its size (files may land in any order: an upload, a copy).
  Local folders appear by rename and are complete when they exist."""
  from sad_jax.common.errors import DataError

  folder = os.fspath(folder).rstrip("/")
  if not is_remote(folder):
    return
  marker = join(folder, COMPLETE_MARKER)
  try:
    listed = json.loads(read_text(marker))["files"]
  except FileNotFoundError:
    raise DataError(f"incomplete {what}: no {COMPLETE_MARKER} (it is written last; an "
                    "interrupted write or copy leaves none: write it again)",
                    path=folder) from None
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise DataError(f"cannot read the completion marker: {e}", path=marker,
                    field="files") from None
  fs = _fs(folder)
  have = {posixpath.relpath(p["name"], fs._strip_protocol(folder)): int(p.get("size") or 0)
          for p in fs.find(folder, detail=True).values()}
  for rel, size in listed.items():
    if have.get(rel) != size:
      raise DataError(f"incomplete {what}: {rel} is "
                      + ("missing" if rel not in have else f"{have[rel]} bytes, not {size}"),
                      path=join(folder, rel), field="files")


def _upload_dir(local: str, remote: str) -> None:
  """Replaces the remote folder with a local one: marker gone first (the old folder reads as
  incomplete from then on), old objects removed, files uploaded, marker uploaded last."""
  fs = _fs(remote)
  remote = remote.rstrip("/")
  remove(join(remote, COMPLETE_MARKER))
  rmtree(remote)
  files = _files_under(local)
  for rel in files:
    fs.put_file(os.path.join(local, rel), join(remote, rel))
  fs.put_file(os.path.join(local, COMPLETE_MARKER), join(remote, COMPLETE_MARKER))


class AppendFile:
  """A file that grows by lines or records (metrics.jsonl, TensorBoard events). Locally an
  append-mode file flushed per write. An object cannot be appended to: the whole content is
  kept and the object rewritten at most every `interval` seconds and on close (each upload
  replaces it whole, so a reader sees an earlier complete version, never a torn one). Each
  upload is conditional on the generation this writer last wrote or read
  (`put_if_generation`): a second writer of the object fails loudly instead of silently
  replacing the first one's rows."""

  def __init__(self, path: str | os.PathLike, *, binary: bool = False, interval: float = 10.0):
    self.path = os.fspath(path)
    self._binary = binary
    self._interval = interval
    self._remote = is_remote(self.path)
    if self._remote:
      data, self._generation = read_versioned(self.path)  # a resumed run continues it
      self._data = bytearray(data)
      self._dirty = True
      self._last = 0.0
    else:
      makedirs(os.path.dirname(os.path.abspath(self.path)))
      self._f = open(self.path, "ab" if binary else "a",
                     encoding=None if binary else "utf-8")

  def write(self, data: bytes | str) -> None:
    if not self._remote:
      self._f.write(data)
      self._f.flush()
      return
    self._data += data if isinstance(data, bytes) else data.encode("utf-8")
    self._dirty = True
    if time.monotonic() - self._last >= self._interval:
      self.flush()

  def flush(self) -> None:
    if self._remote and self._dirty:
      self._generation = put_if_generation(self.path, bytes(self._data), self._generation)
      self._dirty, self._last = False, time.monotonic()

  def close(self) -> None:
    if self._remote:
      self.flush()
    else:
      self._f.close()


def json_dump(path: str | os.PathLike, value: Any, **kwargs) -> None:
  with atomic_write(path) as f:
    json.dump(value, f, **kwargs)


# ----------------------------------------------------------------------------- atomic writes


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
  if is_remote(path):
    # buffered here, uploaded in one piece only on success: the object appears whole or
    # not at all (an upload that fails midway leaves no object)
    with tempfile.TemporaryDirectory(prefix="sad_jax_upload_") as tmp_dir:
      local = os.path.join(tmp_dir, posixpath.basename(path))
      with open(local, mode, encoding=None if "b" in mode else "utf-8") as f:
        yield f
      _fs(path).put_file(local, path)
    return
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
  """Yields a temporary folder that replaces `path` only when the block succeeds. The
  folder gets a completion marker (`_complete.json`), written last."""
  path = os.fspath(path).rstrip("/")
  if is_remote(path):
    with tempfile.TemporaryDirectory(prefix="sad_jax_upload_") as tmp:
      yield tmp
      write_marker(tmp)
      _upload_dir(tmp, path)
    return
  parent = os.path.dirname(os.path.abspath(path))
  os.makedirs(parent, exist_ok=True)
  drop_stale_temporaries(path)
  tmp = tempfile.mkdtemp(prefix=_tmp_prefix(path), suffix=".tmp", dir=parent)
  try:
    yield tmp
    write_marker(tmp)
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
