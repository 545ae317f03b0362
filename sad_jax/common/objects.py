"""Object-store specifics above the path layer (fileio): reads that know an object's
version, writes conditional on it, objects that grow by rewrites, and staged copies of a
folder's small files (docs/design.md, "Writers and their commit points")."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import posixpath
import shutil
import tempfile
import time

from sad_jax.common import cloud
from sad_jax.common.fileio import (
    _READ_ATTEMPTS,
    _changed_while_read,
    _fs,
    _read_whole,
    _remote,
    _tmp_prefix,
    _version,
    cache_dir,
    is_remote,
    join,
    makedirs,
)


def _gcsfs(fs) -> bool:
  """gcsfs (gs://): its requests can carry GCS's generation preconditions."""
  return hasattr(fs, "_call") and hasattr(fs, "_location") and "gs" in (
      fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


@_remote("read")
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


@_remote("write")
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


def _is_listed_version(fs, path: str, info: dict, data: bytes) -> bool:
  """Whether `data` are the object version `info` describes: its MD5 (GCS lists one for
  every object; no request), else its size and the version still live (one request)."""
  if info.get("md5Hash"):
    import base64

    md5 = base64.b64encode(hashlib.md5(data).digest()).decode()
    return len(data) == int(info.get("size") or 0) and md5 == info["md5Hash"]
  return _read_whole(fs, path, info, len(data))


@_remote("download a folder's files")
def stage_files(folder: str, listing: dict[str, dict], names: list[str]) -> str:
  """A local folder holding `names` (relative paths) of the remote `folder`, whose
  `listing` (require_complete's) gives their versions: in cache_dir() keyed by the folder
  and those versions, so an unchanged set is fetched once. Each file is taken only if its
  version after the download is the one listed (a file rewritten meanwhile fails loudly);
  one request per file, where reading each through the store's client costs several."""
  folder = folder.rstrip("/")
  names = sorted(names)
  key = hashlib.sha256("\0".join([folder, *(f"{n}\0{_version(listing[n])}" for n in names)])
                       .encode()).hexdigest()[:24]
  local = os.path.join(cache_dir(), key, posixpath.basename(folder))
  if os.path.isdir(local):
    return local
  os.makedirs(os.path.dirname(local), exist_ok=True)
  fs = _fs(folder)
  tmp = tempfile.mkdtemp(prefix=_tmp_prefix(local), suffix=".tmp", dir=os.path.dirname(local))
  try:
    for rel in names:
      dst = os.path.join(tmp, *rel.split("/"))
      os.makedirs(os.path.dirname(dst), exist_ok=True)
      remote = join(folder, rel)
      with cloud.remote_op("download", remote):
        data = fs.cat_file(remote)
      if not _is_listed_version(fs, remote, listing[rel], data):
        raise OSError(f"{remote}: the object changed while it was staged (another process "
                      "is rewriting the folder)")
      with open(dst, "wb") as f:
        f.write(data)
    with contextlib.suppress(OSError):  # another process staged the same set first
      os.replace(tmp, local)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return local


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
