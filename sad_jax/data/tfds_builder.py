"""The TFDS builder behind a prepared dataset: ArrayRecord files, one record per trajectory.

Prepared datasets are read with `tfds.builder_from_directory(path).as_data_source(split)`
(random access, no TensorFlow), wrapped in `DataSource` for located errors, and fed to
grain. `load_prepared` does both checks and the reading; callers never touch TFDS paths
themselves.
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from sad_jax.common import cloud, fileio, objects
from sad_jax.common.errors import DataError, SadJaxError

FORMAT_VERSION = 1
# Per-trajectory numbers, stored as one int32 vector `stats` (one feature instead of
# eight: TFDS's per-feature encoding cost dominated prepare's time). Order is frozen.
STATS_FIELDS = ("steps", "tool_calls", "tokens", "observation_tokens", "reason_tokens",
                "action_tokens", "success", "truncated")


def _features():
  T = tfds.features
  return T.FeaturesDict({
      "id": T.Text(),
      "source": T.Text(),
      # Raw little-endian bytes, not int64 lists: 4–8× smaller and faster both ways.
      "ids": T.Tensor(shape=(None,), dtype=np.int32, encoding=T.Encoding.BYTES),
      "kinds": T.Tensor(shape=(None,), dtype=np.int8, encoding=T.Encoding.BYTES),
      "stats": T.Tensor(shape=(len(STATS_FIELDS),), dtype=np.int32),
  })


def example_id(example: dict) -> str:
  """A record's id as str (TFDS returns Text features as bytes)."""
  ident = example["id"]
  return ident.decode() if isinstance(ident, bytes) else str(ident)


def named_stats(example: dict) -> dict[str, int]:
  """{steps, tool_calls, tokens, observation_tokens, …, success (-1 unknown), truncated}."""
  return dict(zip(STATS_FIELDS, (int(x) for x in example["stats"]), strict=True))


class TrajectoryDataset(tfds.core.GeneratorBasedBuilder):
  """Writes the examples it is given; metadata carries the dataset fingerprint."""

  VERSION = tfds.core.Version("1.0.0")

  def __init__(self, *, splits: dict[str, list[dict]], metadata: dict[str, Any],
               description: str, **kwargs):
    self._splits = splits
    self._metadata = metadata
    self._description = description
    super().__init__(**kwargs)

  def _info(self):
    # Records keep the input order (within a split), so `inspect --index i` and the
    # input file agree; training shuffles with grain anyway.
    return tfds.core.DatasetInfo(builder=self, description=self._description,
                                 features=_features(), disable_shuffling=True,
                                 metadata=tfds.core.MetadataDict(self._metadata))

  # TFDS prints download/prepare banners that mean nothing for local data.
  def _log_download_bytes(self):
    pass

  def _log_download_done(self):
    pass

  def _split_generators(self, dl_manager):
    del dl_manager
    return {name: self._generate_examples(name) for name in self._splits}

  def _generate_examples(self, split: str = "train") -> Iterable[tuple[str, dict]]:
    for ex in self._splits[split]:
      yield ex["id"], ex


def build(*, data_dir: str, splits: dict[str, list[dict]], metadata: dict[str, Any],
          description: str) -> str:
  """Writes `splits` (name → examples) under data_dir; returns the dataset folder."""
  tfds.disable_progress_bar()
  builder = TrajectoryDataset(splits=splits, metadata=metadata, description=description,
                              data_dir=data_dir, file_format="array_record")
  download_config = tfds.download.DownloadConfig(try_download_gcs=False)
  with _deterministic_records():
    builder.download_and_prepare(download_config=download_config)
  return str(builder.data_dir)


@contextlib.contextmanager
def _deterministic_records() -> Iterator[None]:
  """TFDS serializes tf.Example with the proto map in the process's hash order, so the
  same examples gave different bytes in another process (a rerun after a kill was not
  byte-identical). Serialize with sorted map keys while we build."""
  from tensorflow_datasets.core import example_serializer

  cls = example_serializer.ExampleSerializer
  original = cls.serialize_example

  def serialize_example(self, example):
    return self.get_tf_example(example).SerializeToString(deterministic=True)

  cls.serialize_example = serialize_example
  try:
    yield
  finally:
    cls.serialize_example = original


RECORDS = ".array_record-"  # in the name of every record file (shard) of a split
_RECORDS_ATTR = "_sad_jax_records_dir"


def records_dir(builder) -> str:
  """The folder a loaded builder's record files are in (a remote dataset's builder reads
  its metadata from a staged local copy)."""
  return getattr(builder, _RECORDS_ATTR, None) or os.fspath(builder.data_dir)


def metadata_dir(builder) -> str:
  """The local folder holding a loaded builder's small files (tokenizer, reports)."""
  return os.fspath(builder.data_dir)


def load_builder(path: str | os.PathLike):
  """The read-only builder of a prepared dataset folder, with a clear error if it is not one."""
  path = fileio.abspath(path) if fileio.is_remote(path) else os.fspath(path)
  info_path = fileio.join(path, "dataset_info.json")
  if not fileio.exists(info_path):
    raise DataError("not a prepared dataset (no dataset_info.json)", path=path)
  listing = fileio.require_complete(path, what="prepared dataset")
  # On an object store, tfds would read its metadata files with several requests each; the
  # small files are staged locally in one request each and the records read where they are
  meta_dir = path if listing is None else objects.stage_files(
      path, listing, [n for n in listing if RECORDS not in n])
  try:
    builder = tfds.builder_from_directory(meta_dir)
  except Exception as e:  # tfds raises assorted errors on damaged metadata
    raise DataError(f"cannot read prepared dataset metadata: {e}", path=info_path) from None
  setattr(builder, _RECORDS_ATTR, path)
  meta = dict(builder.info.metadata or {})
  if meta.get("format_version") != FORMAT_VERSION:
    raise DataError(f"format_version {meta.get('format_version')!r} is not {FORMAT_VERSION}",
                    path=fileio.join(path, "metadata.json"), field="format_version")
  return builder


class _Records:
  """What `builder.as_data_source(split)` is (ArrayRecord's data source over the split's
  files in shard order, each record decoded by the builder's features), for files in
  another folder than the builder's metadata."""

  def __init__(self, files: list[str], features):
    from array_record.python import array_record_data_source

    self._src = array_record_data_source.ArrayRecordDataSource(sorted(files))
    self._features = features

  def __len__(self) -> int:
    return len(self._src)

  def __getitem__(self, i: int) -> dict:
    return self._features.deserialize_example_np(self._src[i])


class DataSource:
  """`builder.as_data_source(split)`, where a damaged file (truncated, flipped bytes,
  missing) raises DataError naming the file and record (1-based), not array_record's or
  TFDS's own exceptions."""

  def __init__(self, builder, split: str):
    self.split = split
    self.dir = records_dir(builder)
    self._features = builder.info.features
    files = self._files()
    if not files:
      raise DataError(f"the record file of split {split!r} is missing",
                      path=fileio.join(self.dir, f"*-{split}.array_record-*"))
    self._shards = sorted(files)  # listed once: the full pass reads them in this order
    self._path = files[0] if len(files) == 1 else fileio.join(
        self.dir, f"*-{split}.array_record-*")
    def open_source():
      if self.dir == os.fspath(builder.data_dir):
        src = builder.as_data_source(split)
      else:  # records elsewhere than the metadata: the same reader and decoding as tfds's
        src = _Records(files, builder.info.features)
      return src, len(src)

    try:
      self._src, self._n = self._bounded(open_source, f"open split {split!r}")
    except SadJaxError:
      raise
    except Exception as e:  # array_record raises RuntimeError when it opens a damaged file
      store = cloud.cpp_store_error(e, op=f"open split {split!r}", path=self.where())
      if store is not None:
        raise store from None
      raise DataError(f"cannot open split {split!r}: {e}", path=self.where()) from None

  def _bounded(self, fn, op: str):
    """On an object store, ArrayRecord's reads run under cloud.bounded's deadline."""
    if not fileio.is_remote(self.dir):
      return fn()
    return cloud.bounded(fn, op=op, path=self.where())

  def _files(self) -> list[str]:
    return fileio.glob(self.dir, f"*-{self.split}.array_record-*")

  def where(self) -> str:
    """The split's record file (or their pattern when there are several)."""
    return self._path

  def __len__(self) -> int:
    return self._n

  def __getitem__(self, i: int) -> dict:
    if not 0 <= i < self._n:
      raise IndexError(i)
    try:
      return self._bounded(lambda: self._src[i], f"read record {i + 1}")
    except SadJaxError:
      raise
    except Exception as e:  # RuntimeError (bad hash), ValueError (a record cut short), …
      store = cloud.cpp_store_error(e, op=f"read record {i + 1}", path=self.where())
      if store is not None:
        raise store from None
      raise DataError(f"damaged record (split {self.split!r}, index {i}): {e}",
                      path=self.where(), record=i + 1) from None

  def __iter__(self) -> Iterator[dict]:
    """Every record in order. On an object store, each shard is read in chunks through a
    read-ahead buffer: a record at a time would cost one request each (0.4 s against
    0.007 s for 455 records on the emulator)."""
    if not fileio.is_remote(self.dir):
      for i in range(self._n):
        yield self[i]
      return
    i = 0
    for path in self._shards:
      try:
        for chunk in self._shard_chunks(path):
          for blob in chunk:
            yield self._features.deserialize_example_np(blob)
            i += 1
      except SadJaxError:
        raise
      except Exception:  # a damaged shard: the record-by-record reads name the record
        for j in range(i, self._n):
          yield self[j]
        return

  def _shard_chunks(self, path: str, size: int = 256) -> Iterator[list[bytes]]:
    from array_record.python import array_record_module

    reader = self._bounded(lambda: array_record_module.ArrayRecordReader(
        path, f"readahead_buffer_size:{16 << 20}"), f"open {posixpath.basename(path)}")
    n = reader.num_records()
    for start in range(0, n, size):
      rows = list(range(start, min(n, start + size)))
      yield self._bounded(lambda rows=rows: reader.read(rows),
                          f"read records {start + 1}–{rows[-1] + 1}")


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
  return json.loads(fileio.read_text(fileio.join(path, "metadata.json")))
