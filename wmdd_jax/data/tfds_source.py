"""``tfds:<name>``: TensorFlow Datasets, read by index with ``tfds.data_source`` (no TensorFlow).

A dataset prepared in the older TFRecord format has no random access; it is then streamed with
``tf.data`` (``reader='tf'``, needs TensorFlow), and shuffling happens within a window.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import numpy as np

from wmdd_jax.data.source import Source, SourceKind, known_normalization, register_source
from wmdd_jax.errors import ConfigError, DataError, DatasetNotFoundError, WMDDError

_PROBED_SPLITS = ("train", "validation", "test")
_READERS = ("auto", "data_source", "tf")


def _default_data_dir() -> str:
  return os.environ.get("TFDS_DATA_DIR") or os.path.join("~", "tensorflow_datasets")


class TfdsSource(Source):
  """One TFDS dataset; see :func:`wmdd_jax.data.open_dataset` for the options."""

  def __init__(
      self,
      spec: str,
      name: str,
      *,
      data_dir: str | None = None,
      download: bool = False,
      reader: str = "auto",
      image_key: str | None = None,
      label_key: str | None = None,
      shuffle_buffer: int = 10_000,
  ):
    super().__init__(spec)
    import tensorflow_datasets as tfds

    if reader not in _READERS:
      raise ConfigError(f"reader={reader!r} is unknown; use one of {list(_READERS)}.")
    self._tfds = tfds
    self._name = name
    self._data_dir = os.path.expanduser(data_dir) if data_dir is not None else None
    self._download = bool(download)
    self.shuffle_buffer = int(shuffle_buffer)
    try:
      self._builder = tfds.builder(name, data_dir=self._data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
      raise DatasetNotFoundError(
          f"TFDS has no dataset named {name!r} (from {spec!r}); check the spelling against "
          "tfds.list_builders(), or read local files with folder:, idx: or npz:."
      ) from e
    except Exception as e:  # TFDS raises many kinds for bad configs/versions.
      raise DatasetNotFoundError(
          f"cannot open TFDS builder {name!r} (from {spec!r}): {e}; check the name, config "
          "and version."
      ) from e

    info = self._builder.info
    features = info.features
    keys = info.supervised_keys if isinstance(info.supervised_keys, tuple) else None
    image_feature = tfds.features.Image
    label_feature = tfds.features.ClassLabel
    if image_key is None:
      if keys and isinstance(features[keys[0]], image_feature):
        image_key = keys[0]
      else:
        image_key = next((k for k, f in features.items() if isinstance(f, image_feature)), None)
    if label_key is None:
      if keys and isinstance(features[keys[1]], label_feature):
        label_key = keys[1]
      else:
        label_key = next((k for k, f in features.items() if isinstance(f, label_feature)), None)
    wanted = ((image_key, "image", image_feature), (label_key, "label", label_feature))
    for key, kind, cls in wanted:
      if key is None or key not in features or not isinstance(features[key], cls):
        raise ConfigError(
            f"TFDS dataset {name!r} has no {cls.__name__} feature {key!r}; its features are "
            f"{list(features)}: pass {kind}_key= naming one."
        )
    self._image_key, self._label_key = image_key, label_key
    self._class_names = list(features[label_key].names)
    shape = features[image_key].shape
    self._shape = (shape[0], shape[1], int(shape[2] if shape[2] is not None else 3))

    self._sources: dict[str, Any] = {}
    self._batched_reads = True
    self._reader = "data_source" if reader == "auto" else reader
    split_names = list(info.splits.keys())
    if self._reader == "tf" and not split_names:
      self._not_prepared(None)
    if split_names:
      if self._reader == "data_source":
        self._open(split_names[0], auto=reader == "auto")
    else:
      # Nothing on disk describes the splits (e.g. under tfds.testing.mock_data): probe.
      for split in _PROBED_SPLITS:
        try:
          self._open(split, auto=reader == "auto")
        except DatasetNotFoundError:
          if split == _PROBED_SPLITS[0]:
            raise
          continue
        split_names.append(split)
    self.random_access = self._reader == "data_source"
    self._splits = tuple(sorted(split_names, key=lambda s: (s != "train", s)))

  def __getstate__(self) -> dict[str, Any]:
    # Pickled by name (for grain's worker processes): the module, the builder and the open
    # data sources are made again where it is unpickled, from the name and data_dir.
    state = dict(self.__dict__)
    state.update(_tfds=None, _builder=None, _sources={})
    return state

  def __setstate__(self, state: dict[str, Any]) -> None:
    import tensorflow_datasets as tfds  # noqa: PLC0415

    self.__dict__.update(state)
    self._tfds = tfds
    self._builder = tfds.builder(self._name, data_dir=self._data_dir)

  def _not_prepared(self, cause: Exception | None) -> None:
    where = self._data_dir or _default_data_dir()
    # Without download, TFDS's own error only misleads (it talks about file formats).
    detail = "" if cause is None or not self._download else (
        f"; downloading it failed ({type(cause).__name__}: {cause})"
    )
    raise DatasetNotFoundError(
        f"TFDS dataset {self._name!r} is not prepared in data_dir={where!r}{detail}. Fix: on a "
        "machine with internet run open_dataset(spec, download=True, data_dir=DIR) or `tfds "
        f"build {self._name} --data_dir=DIR --file_format=array_record`, then copy DIR here and "
        "pass data_dir=DIR (or set TFDS_DATA_DIR)."
    ) from cause

  def _open(self, split: str, *, auto: bool) -> Any:
    """The data source for ``split``; may switch the reader to 'tf' (TFRecord files)."""
    if split in self._sources:
      return self._sources[split]
    if self._reader == "tf":
      return None
    tfds = self._tfds
    try:
      source = tfds.data_source(
          self._name, split=split, data_dir=self._data_dir, download=self._download
      )
    except DatasetNotFoundError:
      raise
    except Exception as e:
      prepared = self._builder.is_prepared()
      if not prepared:
        self._not_prepared(e)
      if isinstance(e, NotImplementedError) and auto:
        # Prepared as TFRecord: no random access; stream it with tf.data instead.
        self._reader = "tf"
        return None
      raise DataError(
          f"cannot read split {split!r} of TFDS dataset {self._name!r}: {e}; if it was prepared "
          "as TFRecord pass reader='tf' (needs tensorflow), or re-prepare it with "
          "file_format='array_record'."
      ) from e
    self._sources[split] = source
    return source

  @property
  def splits(self) -> tuple[str, ...]:
    return self._splits

  @property
  def class_names(self) -> list[str]:
    return self._class_names

  @property
  def native_shape(self) -> tuple[int | None, int | None, int]:
    return self._shape

  def default_normalization(self) -> str | None:
    return known_normalization(self._name.split("/")[0].split(":")[0])

  def describe(self, split: str, index: int) -> str:
    return f"record {index} of split {split!r} of TFDS dataset {self._name!r}"

  def _damaged(self, split: str, what: str, cause: Exception) -> DataError:
    """The error for a prepared split whose files fail to read (corrupt, truncated, missing)."""
    where = self._data_dir or _default_data_dir()
    return DataError(
        f"cannot read {what} of split {split!r} of TFDS dataset {self._name!r} in "
        f"data_dir={where!r}: {type(cause).__name__}: {cause}; its prepared files are damaged or "
        f"incomplete: delete {self._name.split(':')[0]!r} under data_dir and prepare it again "
        f"(`tfds build {self._name} --data_dir=DIR --file_format=array_record`, or "
        "open_dataset(spec, download=True, data_dir=DIR) on a machine with internet)."
    )

  def _tf_dataset(self, split: str, skip_images: bool) -> Any:
    tfds = self._tfds
    decoders = {self._image_key: tfds.decode.SkipDecoding()} if skip_images else None
    # One file at a time, in order, so the label scan and the image stream agree on indices.
    read_config = tfds.ReadConfig(interleave_cycle_length=1)
    try:
      return self._builder.as_dataset(
          split=split, shuffle_files=False, decoders=decoders, read_config=read_config
      )
    except ImportError as e:
      raise DataError(
          f"TFDS dataset {self._name!r} is stored as TFRecord, which needs tensorflow to read; "
          "install tensorflow-cpu, or re-prepare it with file_format='array_record'."
      ) from e

  def labels(self, split: str) -> np.ndarray:
    try:
      return self._read_labels(split)
    except WMDDError:
      raise
    except Exception as e:  # The record readers raise many kinds on damaged files.
      raise self._damaged(split, "the labels", e) from e

  def _read_labels(self, split: str) -> np.ndarray:
    tfds = self._tfds
    key = self._label_key
    if self._reader == "tf":
      ds = self._tf_dataset(split, skip_images=True).map(lambda ex: ex[key]).batch(4096)
      chunks = list(tfds.as_numpy(ds))
      return np.concatenate(chunks) if chunks else np.zeros(0, np.int64)
    self._open(split, auto=False)  # Raises the helpful errors if the split cannot be read.
    # A second data source that skips image decoding: labels only, fast.
    light = tfds.data_source(
        self._name,
        split=split,
        data_dir=self._data_dir,
        download=False,
        decoders={self._image_key: tfds.decode.SkipDecoding()},
    )
    labels = np.empty(len(light), np.int64)
    step = 4096
    for start in range(0, len(light), step):
      keys = list(range(start, min(start + step, len(light))))
      labels[start : start + len(keys)] = [int(r[key]) for r in self._get(light, keys)]
    return labels

  def _get(self, source: Any, keys: list[int]) -> list[dict[str, Any]]:
    if self._batched_reads:
      try:
        return list(source.__getitems__(keys))
      except TypeError:
        # tfds.testing.mock_data's stand-in has no working batched read; go one by one.
        self._batched_reads = False
    return [source[k] for k in keys]

  def read(self, split: str, indices: np.ndarray, fit: Any = None) -> list[np.ndarray]:
    del fit  # The dataset resizes after reading.
    source = self._open(split, auto=False)
    keys = [int(i) for i in indices]
    try:
      records = self._get(source, keys)
      return [np.asarray(r[self._image_key], np.uint8) for r in records]
    except WMDDError:
      raise
    except Exception as e:  # The record readers raise many kinds on damaged files.
      shown = ", ".join(str(k) for k in keys[:4]) + (", ..." if len(keys) > 4 else "")
      raise self._damaged(split, f"records {shown}", e) from e

  def stream(self, split: str) -> Iterator[np.ndarray]:
    ds = self._tf_dataset(split, skip_images=False)
    index = 0
    try:
      for example in self._tfds.as_numpy(ds):
        yield np.asarray(example[self._image_key], np.uint8)
        index += 1
    except WMDDError:
      raise
    except Exception as e:  # tf.data raises DataLossError and others on damaged files.
      raise self._damaged(split, f"record {index}", e) from e


register_source(
    SourceKind(
        prefix="tfds",
        form="tfds:<name>[/<config>][:<version>]",
        options=("data_dir", "download", "reader", "image_key", "label_key", "shuffle_buffer"),
        open=lambda spec, arg, seed, **own: TfdsSource(spec, arg, **own),
    )
)
