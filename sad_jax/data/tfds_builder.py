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
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from sad_jax.common import fileio
from sad_jax.common.errors import DataError

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


def load_builder(path: str | os.PathLike):
  """The read-only builder of a prepared dataset folder, with a clear error if it is not one."""
  path = fileio.abspath(path) if fileio.is_remote(path) else os.fspath(path)
  info_path = fileio.join(path, "dataset_info.json")
  if not fileio.exists(info_path):
    raise DataError("not a prepared dataset (no dataset_info.json)", path=path)
  fileio.require_complete(path, what="prepared dataset")
  try:
    builder = tfds.builder_from_directory(path)
  except Exception as e:  # tfds raises assorted errors on damaged metadata
    raise DataError(f"cannot read prepared dataset metadata: {e}", path=info_path) from None
  meta = dict(builder.info.metadata or {})
  if meta.get("format_version") != FORMAT_VERSION:
    raise DataError(f"format_version {meta.get('format_version')!r} is not {FORMAT_VERSION}",
                    path=fileio.join(path, "metadata.json"), field="format_version")
  return builder


class DataSource:
  """`builder.as_data_source(split)`, where a damaged file (truncated, flipped bytes,
  missing) raises DataError naming the file and record (1-based), not array_record's or
  TFDS's own exceptions."""

  def __init__(self, builder, split: str):
    self.split = split
    self.dir = os.fspath(builder.data_dir)
    if not self._files():
      raise DataError(f"the record file of split {split!r} is missing",
                      path=fileio.join(self.dir, f"*-{split}.array_record-*"))
    try:
      self._src = builder.as_data_source(split)
      self._n = len(self._src)
    except Exception as e:  # array_record raises RuntimeError when it opens a damaged file
      raise DataError(f"cannot open split {split!r}: {e}", path=self.where()) from None

  def _files(self) -> list[str]:
    return fileio.glob(self.dir, f"*-{self.split}.array_record-*")

  def where(self) -> str:
    """The split's record file (or their pattern when there are several)."""
    files = self._files()
    return files[0] if len(files) == 1 else fileio.join(
        self.dir, f"*-{self.split}.array_record-*")

  def __len__(self) -> int:
    return self._n

  def __getitem__(self, i: int) -> dict:
    if not 0 <= i < self._n:
      raise IndexError(i)
    try:
      return self._src[i]
    except Exception as e:  # RuntimeError (bad hash), ValueError (a record cut short), …
      raise DataError(f"damaged record (split {self.split!r}, index {i}): {e}",
                      path=self.where(), record=i + 1) from None

  def __iter__(self) -> Iterator[dict]:
    for i in range(self._n):
      yield self[i]


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
  return json.loads(fileio.read_text(fileio.join(path, "metadata.json")))
