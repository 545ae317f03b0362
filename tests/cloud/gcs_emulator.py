"""gcp-storage-emulator's own server, with the object-generation semantics of real GCS that
it lacks and that tensorstore (orbax's array store) relies on. Added here:

  generations    every write of an object (simple, multipart and resumable uploads, XML
                 PUT, copy, rewrite, compose) gets a new, strictly increasing generation,
                 assigned when the object is written (a resumable upload: when it
                 finishes, not when it starts), in the returned resource ("generation",
                 a string) and as `x-goog-generation` on reads of the object (media and
                 metadata). The package stamps the resource when it is built, so a
                 resumable upload's generation is older than later writes it overwrites,
                 and a media read via the JSON API route carried no header at all:
                 tensorstore then reads generation 0 and refuses its next conditional
                 request ("Malformed StorageGeneration", first seen on OCDBT's
                 manifest.ocdbt).
  preconditions  `ifGenerationMatch` (0: the object must not exist) and
                 `ifGenerationNotMatch`, as query parameters (JSON API) or
                 `x-goog-if-generation-match` (XML API): on writes (checked when the
                 object is written; a resumable upload keeps its session's conditions)
                 and deletes a failed one is 412; on reads, 412 for `ifGenerationMatch`
                 and 304 for `ifGenerationNotMatch`. The package ignored them, so two
                 writers of an OCDBT manifest both "won" and a cached read never
                 revalidated.

Two speed-ups that change no answer: the in-memory store no longer rewrites its .meta file
(a JSON dump of every object, read back only by a persistent store's next start) on each
write, which made every write cost O(objects); and the listen backlog is raised so a burst
of tensorstore's parallel connections queues instead of being refused and retried.

One request runs at a time (the package's HTTPServer is single-threaded), so a
precondition check and the write it guards are atomic. Usage: python gcs_emulator.py PORT
BUCKET
"""

from __future__ import annotations

import functools
import http.server
import sys
import time
from http import HTTPStatus

from gcp_storage_emulator import server
from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects
from gcp_storage_emulator.storage import Storage


class _PreconditionFailed(Exception):
  pass


_last_generation = 0
# the conditions of the request being handled, and of each open resumable upload session
_current: dict[str, int] = {}
_sessions: dict[str, dict[str, int]] = {}


def _next_generation() -> int:
  # microseconds, as GCS's own generations look, but never equal to or below the last one
  global _last_generation
  _last_generation = max(_last_generation + 1, time.time_ns() // 1000)
  return _last_generation


def _conditions(request) -> dict[str, int]:
  out = {}
  for key, header in (("ifGenerationMatch", "x-goog-if-generation-match"),
                      ("ifGenerationNotMatch", None)):
    value = request.query.get(key, [None])[0]
    if value is None and header:
      value = request.get_header(header)
    if value is not None:
      out[key] = int(value)
  return out


def _generation(storage, bucket: str, name: str) -> int:
  """The live generation of bucket/name, 0 if there is no such object."""
  try:
    return int(storage.get_file_obj(bucket, name)["generation"])
  except NotFound:
    return 0


def _holds(conditions: dict[str, int], generation: int) -> tuple[bool, bool]:
  """(ifGenerationMatch holds, ifGenerationNotMatch holds)."""
  match = conditions.get("ifGenerationMatch")
  not_match = conditions.get("ifGenerationNotMatch")
  return (match is None or match == generation,
          not_match is None or not_match != generation)


_create_file = Storage.create_file
_create_resumable_upload = Storage.create_resumable_upload


def create_file(self, bucket_name, file_name, content, file_obj, file_id=None):
  conditions = _sessions.pop(file_id, {}) if file_id else _current
  if not all(_holds(conditions, _generation(self, bucket_name, file_name))):
    raise _PreconditionFailed(f"{bucket_name}/{file_name}: {conditions}")
  generation = _next_generation()
  # the resource is the response body too (handlers send file_obj after this call)
  file_obj["generation"] = str(generation)
  file_obj["metageneration"] = "1"
  file_obj["id"] = f"{bucket_name}/{file_name}/{generation}"
  if file_obj.get("mediaLink"):
    file_obj["mediaLink"] = file_obj["mediaLink"].split("?")[0] + (
        f"?generation={generation}&alt=media")
  return _create_file(self, bucket_name, file_name, content, file_obj, file_id)


def create_resumable_upload(self, bucket_name, file_name, file_obj):
  file_id = _create_resumable_upload(self, bucket_name, file_name, file_obj)
  _sessions[file_id] = dict(_current)
  return file_id


def _wrap(handler):
  @functools.wraps(handler)
  def handle(request, response, storage, *args, **kwargs):
    global _current
    _current = _conditions(request)
    params = request.params or {}
    name = params.get("object_id")
    try:
      # reads, deletes and metadata patches of one object: the object as it is now
      if name and request.method in ("GET", "DELETE", "PATCH") and "dest_object_id" not in params:
        try:
          obj = storage.get_file_obj(params["bucket_name"], name)
        except NotFound:
          obj = None
        if obj is not None:
          generation = int(obj["generation"])
          match, not_match = _holds(_current, generation)
          if request.method == "GET":
            response["x-goog-generation"] = str(generation)
            response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))
            if match and not not_match:
              response.status = HTTPStatus.NOT_MODIFIED
              return None
          if not (match and not_match):
            raise _PreconditionFailed(f"{params['bucket_name']}/{name}: {_current}")
      return handler(request, response, storage, *args, **kwargs)
    except _PreconditionFailed as e:
      response.status = HTTPStatus.PRECONDITION_FAILED
      response.json({"error": {"code": 412, "message": f"Precondition Failed: {e}",
                               "errors": [{"reason": "conditionNotMet", "message": str(e)}]}})
      return None
    finally:
      _current = {}

  return handle


def install() -> None:
  Storage.create_file = create_file
  Storage.create_resumable_upload = create_resumable_upload
  Storage._write_config_to_file = lambda self: None
  http.server.HTTPServer.request_queue_size = 256
  wrapped: dict = {}
  for _, methods in server.HANDLERS:
    for method, handler in list(methods.items()):
      methods[method] = wrapped.setdefault(handler, _wrap(handler))
  # the router's fallback for uploads posted without the /upload prefix
  objects.insert = wrapped.setdefault(objects.insert, _wrap(objects.insert))


if __name__ == "__main__":
  install()
  port, bucket = int(sys.argv[1]), sys.argv[2]
  server.create_server("127.0.0.1", port, in_memory=True, default_bucket=bucket).run()
