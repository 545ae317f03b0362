"""Runs gcp-storage-emulator with the one thing tensorstore (orbax's array store) needs that
it lacks: media downloads carry no `x-goog-generation` header and ignore generation
preconditions, while real GCS sends the header and answers `ifGenerationNotMatch` with 304
and a failed `ifGenerationMatch` with 412. tensorstore reads the generation from that header
(without it: "Malformed StorageGeneration" on the first OCDBT manifest read), so the
download route is wrapped to behave as GCS documents. Usage: python gcs_emulator.py PORT BUCKET
"""

import sys
from http import HTTPStatus

from gcp_storage_emulator import server
from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects

_download = objects.download


def download(request, response, storage, *args, **kwargs):
  try:
    obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
  except NotFound:
    return _download(request, response, storage, *args, **kwargs)
  generation = str(obj["generation"])
  match = request.query.get("ifGenerationMatch", [None])[0]
  not_match = request.query.get("ifGenerationNotMatch", [None])[0]
  response["x-goog-generation"] = generation
  response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))
  if match is not None and match != generation:
    response.status = HTTPStatus.PRECONDITION_FAILED
    return None
  if not_match is not None and not_match == generation:
    response.status = HTTPStatus.NOT_MODIFIED
    return None
  return _download(request, response, storage, *args, **kwargs)


for _, methods in server.HANDLERS:
  for method, handler in list(methods.items()):
    if handler is _download:
      methods[method] = download

if __name__ == "__main__":
  port, bucket = int(sys.argv[1]), sys.argv[2]
  server.create_server("127.0.0.1", port, in_memory=True, default_bucket=bucket).run()
