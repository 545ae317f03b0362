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
from collections.abc import Iterator
from typing import IO, Any

from sad_jax.common import cloud

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
  cloud.configure_clients()
  try:
    return fsspec.filesystem(protocol, use_listings_cache=False, **cloud.fs_options(protocol))
  except ImportError as e:  # gcsfs (gs://) or s3fs (s3://) missing
    hint = ("pip install 'sad_jax[gcs]'" if protocol in ("gs", "gcs")
            else "install its fsspec backend")
    raise OSError(f"{protocol}:// paths need an fsspec backend ({hint}): {e}") from None


def _remote(op: str):
  """On a remote path, a store failure in the function becomes cloud.StoreError naming
  `op` and the path (missing objects stay FileNotFoundError)."""
  import functools

  def wrap(fn):
    @functools.wraps(fn)
    def call(path, *args, **kwargs):
      if not is_remote(path):
        return fn(path, *args, **kwargs)
      with cloud.remote_op(op, os.fspath(path)):
        return fn(path, *args, **kwargs)
    return call
  return wrap


def join(path: str | os.PathLike, *parts: str) -> str:
  path = os.fspath(path)
  return posixpath.join(path, *parts) if is_remote(path) else os.path.join(path, *parts)


def dirname(path: str | os.PathLike) -> str:
  path = os.fspath(path)
  return posixpath.dirname(path.rstrip("/")) if is_remote(path) else os.path.dirname(path)


def abspath(path: str | os.PathLike) -> str:
  """os.path.abspath for a local path; a remote path as it is (minus a trailing /), with
  the store's clients configured: this is where a path is handed to orbax or ArrayRecord,
  whose clients read their settings before fileio's first request would set them."""
  path = os.fspath(path)
  if not is_remote(path):
    return os.path.abspath(path)
  cloud.configure_clients()
  return path.rstrip("/")


def _kind(path: str) -> str | None:
  """"file", "directory" or None (nothing there). fsspec's isdir/isfile answer False on
  any error, so a refused or failed request would read as "no such folder"."""
  try:
    return _fs(path).info(path)["type"]
  except FileNotFoundError:
    return None


@_remote("check existence")
def exists(path: str | os.PathLike) -> bool:
  path = os.fspath(path)
  return _fs(path).exists(path) if is_remote(path) else os.path.exists(path)


@_remote("check for a folder")
def isdir(path: str | os.PathLike) -> bool:
  path = os.fspath(path)
  return _kind(path) == "directory" if is_remote(path) else os.path.isdir(path)


@_remote("check for a file")
def isfile(path: str | os.PathLike) -> bool:
  path = os.fspath(path)
  return _kind(path) == "file" if is_remote(path) else os.path.isfile(path)


@_remote("read the size")
def getsize(path: str | os.PathLike) -> int:
  path = os.fspath(path)
  return int(_fs(path).size(path)) if is_remote(path) else os.path.getsize(path)


@_remote("list")
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
  except (FileNotFoundError, NotADirectoryError):  # a store failure is not "no files"
    return []
  return sorted(join(folder, n) for n in names if fnmatch.fnmatchcase(n, pattern))


def makedirs(path: str | os.PathLike) -> None:
  """A local folder with its parents; nothing on an object store (folders are prefixes)."""
  if not is_remote(path):
    os.makedirs(path, exist_ok=True)


@_remote("delete")
def rmtree(path: str | os.PathLike) -> None:
  path = os.fspath(path)
  if not is_remote(path):
    shutil.rmtree(path, ignore_errors=True)
    return
  fs = _fs(path)
  with contextlib.suppress(FileNotFoundError):
    if fs.exists(path):
      fs.rm(path, recursive=True)


@_remote("delete")
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


@_remote("read")
def read_bytes(path: str | os.PathLike) -> bytes:
  if is_remote(path):  # one request (open() would ask for the object's info first)
    return _fs(os.fspath(path)).cat_file(os.fspath(path))
  with open_file(path, "rb") as f:
    return f.read()


@_remote("read")
def read_text(path: str | os.PathLike) -> str:
  return read_bytes(path).decode("utf-8")


def copyfile(src: str | os.PathLike, dst: str | os.PathLike) -> None:
  """One file, either side to either side (a remote destination appears whole)."""
  src, dst = os.fspath(src), os.fspath(dst)
  if is_remote(dst):
    local = local_copy(src) if is_remote(src) else src
    with cloud.remote_op("upload", dst):
      _fs(dst).put_file(local, dst)
  elif is_remote(src):
    with cloud.remote_op("download", src):
      _fs(src).get_file(src, dst)
  else:
    shutil.copyfile(src, dst)


def cache_dir() -> str:
  """Where remote files are staged for libraries that read only local files."""
  return os.environ.get("SAD_JAX_CACHE") or os.path.join(
      os.path.expanduser("~"), ".cache", "sad_jax", "staged")


_READ_ATTEMPTS = 5  # reads of an object that keeps changing under them, before giving up


@_remote("download")
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


@_remote("check completeness")
def require_complete(folder: str | os.PathLike, *, what: str) -> dict[str, dict] | None:
  """On an object store, a folder is complete only when its marker is there and every file
  it lists is there with its size (files may land in any order: an upload, a copy).
  Local folders appear by rename and are complete when they exist. Returns the remote
  folder's listing (relative path → the object's info), None for a local folder."""
  from sad_jax.common.errors import DataError

  folder = os.fspath(folder).rstrip("/")
  if not is_remote(folder):
    return None
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
  listing = _listing(folder)
  have = {rel: int(info.get("size") or 0) for rel, info in listing.items()}
  for rel, size in listed.items():
    if have.get(rel) != size:
      raise DataError(f"incomplete {what}: {rel} is "
                      + ("missing" if rel not in have else f"{have[rel]} bytes, not {size}"),
                      path=join(folder, rel), field="files")
  return listing


def _listing(folder: str) -> dict[str, dict]:
  """relative path → info of every object under a remote folder (one listing request per
  thousand objects)."""
  fs = _fs(folder)
  root = fs._strip_protocol(folder)
  return {posixpath.relpath(p["name"], root): p for p in fs.find(folder, detail=True).values()}


def _upload_dir(local: str, remote: str) -> None:
  """Replaces the remote folder with a local one: marker gone first (the old folder reads as
  incomplete from then on), old objects removed, files uploaded, marker uploaded last."""
  fs = _fs(remote)
  remote = remote.rstrip("/")
  remove(join(remote, COMPLETE_MARKER))
  rmtree(remote)
  files = _files_under(local)
  for rel in [*files, COMPLETE_MARKER]:
    with cloud.remote_op("upload", join(remote, rel)):
      fs.put_file(os.path.join(local, rel), join(remote, rel))


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
      with cloud.remote_op("upload", path):
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
      with cloud.remote_op("upload a folder", path):
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
