"""Orbax checkpoints of the pipeline's artefacts.

A teacher checkpoint is one Orbax directory with two items, written atomically (Orbax writes to a
temporary directory and renames it when complete):

  * ``variables``: ``{"params": ..., "batch_stats": ...}`` (StandardSave),
  * ``meta``: a JSON object (JsonSave) with ``format`` (added here) and the keys that
    :func:`teacher_meta` writes and validates: ``model``, ``model_options``, ``num_classes``,
    ``class_names``, ``image_shape`` (H, W, ch), ``mean``, ``std`` (the input normalisation the
    teacher expects, pixel scale [0, 1]) and ``dataset`` (the data spec), plus any extras
    (``test_top1``, ``config``, ``source``, ...). :func:`build_teacher` rebuilds the network from
    them: ``get_model(meta["model"], meta["num_classes"], **meta["model_options"])``.

A synthetic set (:class:`SyntheticSet`) is a directory with ``arrays`` (Orbax: images, labels,
weights) and ``meta.json`` (class names, normalisation, the config that made it), written to a
temporary sibling and renamed into place. :class:`RecoverCheckpointer` keeps the resumable
recover state per class chunk, :class:`TeacherCheckpointer` the resumable teacher training state
(every few epochs, refusing a checkpoint of another run). :func:`export_image_folder` /
:func:`import_image_folder` move sets to and from PNG ImageFolders that other tools (the official
PyTorch code) read.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from wmdd_jax.distributed import sharding
from wmdd_jax.errors import CheckpointError, ConfigError, ShapeError
from wmdd_jax.models import get_model

TEACHER_FORMAT = "wmdd_jax.teacher/1"
# What every teacher meta holds (teacher_meta writes them, build_teacher needs them).
TEACHER_META_KEYS = ("model", "model_options", "num_classes", "class_names", "image_shape",
                     "mean", "std", "dataset")
SYNSET_FORMAT = "wmdd_jax.synset/1"


def save_teacher(path: str | os.PathLike, variables: dict[str, Any], meta: dict[str, Any], *,
                 overwrite: bool = False) -> str:
  """Writes a teacher checkpoint directory.

  Args:
    path: the directory to create (made absolute; its parent is created if needed).
    variables: ``{"params": ..., "batch_stats": ...}`` (numpy or jax arrays).
    meta: JSON-serialisable description (see the module docstring).
    overwrite: replace an existing checkpoint at ``path``.

  Returns:
    The absolute path written.

  Raises:
    ConfigError: ``meta`` is not JSON-serialisable or ``variables`` lacks params.
    CheckpointError: ``path`` exists and ``overwrite`` is False, or the write failed.
  """
  path = os.path.abspath(os.fspath(path))
  if "params" not in variables:
    raise ConfigError("save_teacher needs variables with a 'params' entry "
                      "(pass the {'params', 'batch_stats'} dict that training returns).")
  meta = {**meta, "format": TEACHER_FORMAT}
  try:
    json.dumps(meta)
  except (TypeError, ValueError) as e:
    raise ConfigError(f"Teacher meta is not JSON-serialisable ({e}); convert configs with "
                      "ConfigDict.to_dict() and arrays with .tolist().") from e
  if os.path.exists(path) and not overwrite:
    raise CheckpointError(f"A file or checkpoint already exists at {path}; remove it, choose "
                          "another path, or pass overwrite=True.")
  # Host arrays: a checkpoint of device arrays records their sharding, which a run on another
  # topology (e.g. several processes) then cannot restore.
  tree = jax.device_get({"params": variables["params"],
                         "batch_stats": variables.get("batch_stats", {})})
  os.makedirs(os.path.dirname(path), exist_ok=True)
  try:
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckpt:
      ckpt.save(path, args=ocp.args.Composite(variables=ocp.args.StandardSave(tree),
                                              meta=ocp.args.JsonSave(meta)), force=overwrite)
  except Exception as e:
    raise CheckpointError(f"Could not write the teacher checkpoint {path}: {e}. Check free disk "
                          "space and permissions.") from e
  return path


def load_teacher(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
  """Reads a checkpoint written by :func:`save_teacher`.

  Args:
    path: the checkpoint directory.

  Returns:
    ``(variables, meta)``: variables ``{"params", "batch_stats"}`` as numpy arrays, and the meta
    dict.

  Raises:
    CheckpointError: missing, incomplete, corrupt or not a teacher checkpoint.
  """
  path = os.path.abspath(os.fspath(path))
  if not os.path.isdir(path):
    raise CheckpointError(f"No teacher checkpoint at {path}: the directory does not exist. Train "
                          "one with experiments/pretrain.py or fix the path.")
  try:
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckpt:
      restored = ckpt.restore(path, args=ocp.args.Composite(
          variables=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()))
    variables, meta = restored["variables"], restored["meta"]
  except Exception as e:
    cause = f"{type(e).__name__}: {str(e)[:300]}"
    raise CheckpointError(f"The teacher checkpoint {path} is incomplete or corrupt ({cause}). "
                          "Delete it and train the teacher again (experiments/pretrain.py).") from e
  if not isinstance(meta, dict) or meta.get("format") != TEACHER_FORMAT:
    found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
    raise CheckpointError(f"{path} is not a wmdd_jax teacher checkpoint (format {found!r}, "
                          f"expected {TEACHER_FORMAT!r}); point to a directory written by "
                          "save_teacher.")
  if not isinstance(variables, dict) or "params" not in variables:
    raise CheckpointError(f"The teacher checkpoint {path} holds no 'params'; it is corrupt. "
                          "Delete it and train the teacher again.")
  variables = jax.tree.map(np.asarray, {"params": variables["params"],
                                        "batch_stats": variables.get("batch_stats", {})})
  return variables, meta


def teacher_meta(*, model: str, model_options: Mapping[str, Any] | None, num_classes: int,
                 class_names: Sequence[str], image_shape: Sequence[int], mean: Sequence[float],
                 std: Sequence[float], dataset: str, **extra: Any) -> dict[str, Any]:
  """The one teacher meta format (what :func:`save_teacher` should be given), validated.

  Args:
    model: registered model name (``wmdd_jax.models.list_models``).
    model_options: its options (a dict or ConfigDict; None for none), e.g. {"stem": "tiny"}.
    num_classes: classifier width, >= 1.
    class_names: ``num_classes`` names, in label order.
    image_shape: (H, W, ch) of the teacher's input.
    mean, std: ``ch`` per-channel normalisation constants (pixel scale [0, 1]; std > 0).
    dataset: the data spec the teacher is for (e.g. "tfds:imagenet2012").
    **extra: more JSON-serialisable entries (test_top1, config, source, ...).

  Returns:
    A plain JSON-ready dict: the :data:`TEACHER_META_KEYS`, then ``extra``.

  Raises:
    ConfigError: an unknown model or option, or inconsistent values (the message names them).
  """
  options = model_options.to_dict() if hasattr(model_options, "to_dict") else dict(
      model_options or {})
  if not isinstance(num_classes, int | np.integer) or isinstance(num_classes, bool):
    raise ConfigError(f"teacher_meta: num_classes must be an int, got {num_classes!r}.")
  get_model(model, int(num_classes), **options)  # unknown model/options raise ConfigError here
  names = [str(n) for n in class_names]
  if len(names) != num_classes:
    raise ConfigError(f"teacher_meta: {len(names)} class names for {num_classes} classes; pass "
                      "one name per class (e.g. [str(i) for i in range(num_classes)]).")
  shape = [int(d) for d in image_shape]
  if len(shape) != 3 or min(shape) < 1:
    raise ConfigError(f"teacher_meta: image_shape must be (H, W, channels) of positive ints, got "
                      f"{tuple(image_shape)}.")
  mean = [float(m) for m in np.ravel(mean)]
  std = [float(s) for s in np.ravel(std)]
  if len(mean) != shape[2] or len(std) != shape[2]:
    raise ConfigError(f"teacher_meta: mean {mean} and std {std} need one value per channel "
                      f"({shape[2]}, from image_shape {shape}).")
  if min(std) <= 0:
    raise ConfigError(f"teacher_meta: std must be positive, got {std}.")
  if not isinstance(dataset, str) or not dataset:
    raise ConfigError(f"teacher_meta: dataset must be the data spec string (e.g. "
                      f"'tfds:imagenet2012'), got {dataset!r}.")
  return {"model": model, "model_options": options, "num_classes": int(num_classes),
          "class_names": names, "image_shape": shape, "mean": mean, "std": std,
          "dataset": dataset, **extra}


def build_teacher(path: str | os.PathLike) -> tuple[nn.Module, dict[str, Any], dict[str, Any]]:
  """Loads a teacher checkpoint and rebuilds its model from the meta alone.

  Args:
    path: a directory written by :func:`save_teacher` with a :func:`teacher_meta` meta.

  Returns:
    ``(model, variables, meta)``: ``get_model(meta["model"], meta["num_classes"],
    **meta["model_options"])``, its ``{"params", "batch_stats"}`` (numpy), and the meta.

  Raises:
    CheckpointError: unreadable checkpoint, a meta without the :data:`TEACHER_META_KEYS` (one
      written by an older wmdd_jax) or variables that do not fit the model the meta describes.
  """
  variables, meta = load_teacher(path)
  missing = [k for k in TEACHER_META_KEYS if k not in meta]
  if missing:
    raise CheckpointError(
        f"The teacher checkpoint {path} has an old or incomplete meta: it lacks {missing}, so "
        "the model cannot be rebuilt from it. Re-save it with a complete meta "
        "(checkpoint.save_teacher(path, variables, checkpoint.teacher_meta(...), "
        "overwrite=True)), or delete it and train/import the teacher again.")
  try:
    model = get_model(meta["model"], int(meta["num_classes"]), **meta["model_options"])
  except ConfigError as e:
    raise CheckpointError(f"The teacher checkpoint {path} names a model this wmdd_jax cannot "
                          f"build ({e}). Fix its meta or train the teacher again.") from e
  x = jax.ShapeDtypeStruct((1, *meta["image_shape"]), jnp.float32)
  abstract = jax.eval_shape(
      lambda x: model.init(jax.random.key(0), x, train=False, mutable=["params", "batch_stats"]),
      x)
  want = jax.tree.map(lambda a: tuple(a.shape),
                      {k: abstract.get(k, {}) for k in ("params", "batch_stats")})
  have = jax.tree.map(lambda a: tuple(np.shape(a)), variables)
  if want != have:
    diff = _tree_difference(want, have)
    raise CheckpointError(f"The variables in {path} do not fit the model its meta describes "
                          f"({meta['model']}, {meta['model_options']}, {meta['num_classes']} "
                          f"classes): {diff}. The meta is wrong for these weights; re-save the "
                          "checkpoint with the right teacher_meta.")
  return model, variables, meta


def _tree_difference(want: Any, have: Any) -> str:
  """A short description of the first paths where two trees of shapes differ."""
  flat = lambda t: {jax.tree_util.keystr(p): v for p, v in
                    jax.tree_util.tree_flatten_with_path(t, is_leaf=lambda x: isinstance(
                        x, tuple))[0]}
  a, b = flat(want), flat(have)
  notes = [f"{k} missing" for k in sorted(set(a) - set(b))]
  notes += [f"{k} unexpected" for k in sorted(set(b) - set(a))]
  notes += [f"{k} has shape {b[k]}, the model needs {a[k]}" for k in sorted(set(a) & set(b))
            if a[k] != b[k]]
  return "; ".join(notes[:5]) + (f" (and {len(notes) - 5} more)" if len(notes) > 5 else "")


# --- Synthetic sets -----------------------------------------------------------------------------


@dataclasses.dataclass
class SyntheticSet:
  """A distilled dataset.

  Attributes:
    images: f32[C, k, H, W, ch], normalised with ``mean`` / ``std``.
    labels: i32[C, k], the class of each image.
    weights: f32[C, k], barycenter weights (each class's row sums to 1).
    class_names: the C class names, in label order.
    mean, std: per-channel normalisation constants (pixel scale [0, 1]).
    config: the configuration that made the set (JSON-serialisable).
  """

  images: np.ndarray
  labels: np.ndarray
  weights: np.ndarray
  class_names: list[str]
  mean: tuple[float, ...]
  std: tuple[float, ...]
  config: dict[str, Any] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    images = np.asarray(self.images, np.float32)
    if images.ndim != 5:
      raise ShapeError(f"SyntheticSet images must be f32[C, k, H, W, ch]; got {images.shape}.")
    c, k = images.shape[:2]
    labels = np.asarray(self.labels, np.int32)
    weights = np.asarray(self.weights, np.float32)
    if labels.shape != (c, k) or weights.shape != (c, k):
      raise ShapeError(f"SyntheticSet labels {labels.shape} and weights {weights.shape} must both "
                       f"be [C, k] = [{c}, {k}] to match images {images.shape}.")
    if len(self.class_names) != c:
      raise ShapeError(f"SyntheticSet has {c} classes of images but {len(self.class_names)} "
                       "class names.")
    self.images, self.labels, self.weights = images, labels, weights
    self.class_names = [str(n) for n in self.class_names]
    self.mean = tuple(float(m) for m in self.mean)
    self.std = tuple(float(s) for s in self.std)

  @property
  def ipc(self) -> int:
    return int(self.images.shape[1])

  @property
  def num_classes(self) -> int:
    return int(self.images.shape[0])

  def flat(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(images f32[C*k, H, W, ch], labels i32[C*k], weights f32[C*k])."""
    c, k = self.images.shape[:2]
    return (self.images.reshape(c * k, *self.images.shape[2:]), self.labels.reshape(-1),
            self.weights.reshape(-1))


def save_synthetic_set(path: str | os.PathLike, synset: SyntheticSet, *,
                       overwrite: bool = False) -> None:
  """Saves a SyntheticSet atomically (Orbax arrays + ``meta.json``).

  The set is written to a temporary sibling directory and renamed into place, so a killed run
  never leaves a half-written set at ``path``.

  Raises:
    CheckpointError: ``path`` exists and ``overwrite`` is False.
  """
  path = os.path.abspath(os.fspath(path))
  if os.path.exists(path) and not overwrite:
    raise CheckpointError(f"{path} already exists; pass overwrite=True or choose another path.")
  # With several processes every one calls this (Orbax writes collectively) and process 0 does
  # the file-system work, so the temporary name must be the same in all of them.
  several = jax.process_count() > 1
  primary = jax.process_index() == 0
  tmp = f"{path}.tmp-multiprocess" if several else f"{path}.tmp-{os.getpid()}"
  if primary:
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
  sharding.sync_processes("synset-tmp")
  arrays = {"images": synset.images, "labels": synset.labels, "weights": synset.weights}
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.join(tmp, "arrays"), arrays)
    ckptr.wait_until_finished()
  if primary:
    meta = {"format": SYNSET_FORMAT, "class_names": synset.class_names, "mean": synset.mean,
            "std": synset.std, "config": synset.config, "shape": list(synset.images.shape)}
    with open(os.path.join(tmp, "meta.json"), "w") as f:
      json.dump(meta, f, indent=1, default=str)
    if os.path.exists(path):
      old = f"{path}.old-{os.getpid()}"
      os.replace(path, old)
      os.replace(tmp, path)
      shutil.rmtree(old, ignore_errors=True)
    else:
      os.replace(tmp, path)
  sharding.sync_processes("synset-done")


def load_synthetic_set(path: str | os.PathLike) -> SyntheticSet:
  """Loads a SyntheticSet saved by :func:`save_synthetic_set`.

  Raises:
    CheckpointError: missing, truncated or corrupt set (names the path and what is wrong).
  """
  path = os.path.abspath(os.fspath(path))
  meta_path = os.path.join(path, "meta.json")
  if not os.path.isfile(meta_path):
    raise CheckpointError(f"No synthetic set at {path} (meta.json missing). Re-run the recover "
                          "stage, or point to a directory written by save_synthetic_set.")
  try:
    with open(meta_path) as f:
      meta = json.load(f)
    c, k, h, w, ch = meta["shape"]
    abstract = {
        "images": jax.ShapeDtypeStruct((c, k, h, w, ch), np.float32),
        "labels": jax.ShapeDtypeStruct((c, k), np.int32),
        "weights": jax.ShapeDtypeStruct((c, k), np.float32),
    }
    with ocp.StandardCheckpointer() as ckptr:
      arrays = ckptr.restore(os.path.join(path, "arrays"), abstract)
  except Exception as e:  # noqa: BLE001 - any failure here means an unusable checkpoint
    raise CheckpointError(f"Synthetic set at {path} is truncated or corrupt ({type(e).__name__}: "
                          f"{e}). Delete it and re-run the recover stage.") from e
  return SyntheticSet(np.asarray(arrays["images"]), np.asarray(arrays["labels"]),
                      np.asarray(arrays["weights"]), meta["class_names"], meta["mean"],
                      meta["std"], meta.get("config", {}))


def _folder_name(index: int, name: str) -> str:
  safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)
  return f"{index:04d}_{safe}"


def export_image_folder(root: str | os.PathLike, synset: SyntheticSet, split: str = "train"
                        ) -> str:
  """Writes the set as PNGs in ImageFolder layout ``root/<split>/<NNNN_class>/<j>.png``.

  Folder names carry the class index so that sorted order is label order (what PyTorch's
  ImageFolder and ``folder:`` specs assume); ``root/classes.json`` records the real names and
  ``root/weights.json`` the barycenter weights. Returns the split directory.
  """
  from PIL import Image  # noqa: PLC0415 - only needed here

  split_dir = os.path.join(os.fspath(root), split)
  mean = np.asarray(synset.mean, np.float32)
  std = np.asarray(synset.std, np.float32)
  pixels = np.clip(np.rint((synset.images * std + mean) * 255.0), 0, 255).astype(np.uint8)
  weights = {}
  for c, name in enumerate(synset.class_names):
    folder = _folder_name(c, name)
    os.makedirs(os.path.join(split_dir, folder), exist_ok=True)
    for j in range(synset.ipc):
      img = pixels[c, j]
      img = img[..., 0] if img.shape[-1] == 1 else img
      Image.fromarray(img).save(os.path.join(split_dir, folder, f"{j:05d}.png"))
    weights[folder] = synset.weights[c].tolist()
  with open(os.path.join(os.fspath(root), "classes.json"), "w") as f:
    json.dump({"class_names": synset.class_names, "mean": synset.mean, "std": synset.std}, f)
  with open(os.path.join(os.fspath(root), "weights.json"), "w") as f:
    json.dump(weights, f)
  return split_dir


def import_image_folder(root: str | os.PathLike, split: str = "train") -> SyntheticSet:
  """Reads a set written by :func:`export_image_folder` (or any same-count ImageFolder).

  Images are normalised with the constants in ``classes.json`` when present (else 0.5 / 0.5
  per channel is an error: the constants must be known), weights come from ``weights.json`` or
  are uniform.
  """
  from PIL import Image  # noqa: PLC0415

  root = os.fspath(root)
  split_dir = os.path.join(root, split)
  if not os.path.isdir(split_dir):
    raise CheckpointError(f"No image folder at {split_dir}; export one with export_image_folder.")
  info_path = os.path.join(root, "classes.json")
  if not os.path.isfile(info_path):
    raise CheckpointError(f"{info_path} is missing: it holds the class names and normalisation "
                          "constants. Re-export the set with export_image_folder.")
  with open(info_path) as f:
    info = json.load(f)
  weights_path = os.path.join(root, "weights.json")
  weights_map = {}
  if os.path.isfile(weights_path):
    with open(weights_path) as f:
      weights_map = json.load(f)
  folders = sorted(d for d in os.listdir(split_dir) if os.path.isdir(os.path.join(split_dir, d)))
  if len(folders) != len(info["class_names"]):
    raise CheckpointError(f"{split_dir} has {len(folders)} class folders but classes.json names "
                          f"{len(info['class_names'])} classes.")
  images, weights = [], []
  for folder in folders:
    files = sorted(os.listdir(os.path.join(split_dir, folder)))
    try:
      imgs = [np.asarray(Image.open(os.path.join(split_dir, folder, fn))) for fn in files]
    except OSError as e:
      raise CheckpointError(f"Unreadable image in {os.path.join(split_dir, folder)}: {e}") from e
    imgs = [im[..., None] if im.ndim == 2 else im for im in imgs]
    images.append(np.stack(imgs))
    weights.append(weights_map.get(folder, [1.0 / len(files)] * len(files)))
  if len({len(w) for w in weights}) != 1:
    raise CheckpointError(f"Class folders in {split_dir} hold different numbers of images; a "
                          "SyntheticSet needs the same count per class.")
  pixels = np.stack(images).astype(np.float32) / 255.0
  mean = np.asarray(info["mean"], np.float32)
  std = np.asarray(info["std"], np.float32)
  c, k = pixels.shape[:2]
  return SyntheticSet((pixels - mean) / std, np.repeat(np.arange(c), k).reshape(c, k),
                      np.asarray(weights, np.float32), info["class_names"], info["mean"],
                      info["std"], {"imported_from": os.path.abspath(root)})


# --- Resumable recover state ------------------------------------------------------------------


class RecoverCheckpointer:
  """Saves and restores the recover state of each class chunk with Orbax.

  One ``CheckpointManager`` per chunk under ``directory/chunk_NNNN``, keeping the last
  ``max_to_keep`` saves. Use :meth:`resume` and :meth:`on_block` as the ``resume`` / ``on_block``
  callbacks of :func:`wmdd_jax.recover.recover`. The PRNG key is not stored: every step's key is
  ``fold_in(key, step)``, so the restored step is all a bit-identical continuation needs.
  """

  def __init__(self, directory: str | os.PathLike, *, save_every: int, iterations: int,
               max_to_keep: int = 2):
    self.directory = os.path.abspath(os.fspath(directory))
    self.save_every = max(1, int(save_every))
    self.iterations = int(iterations)
    self.max_to_keep = max_to_keep
    self._managers: dict[int, ocp.CheckpointManager] = {}
    self._last_saved: dict[int, int] = {}

  def _manager(self, chunk: int) -> ocp.CheckpointManager:
    if chunk not in self._managers:
      self._managers[chunk] = ocp.CheckpointManager(
          os.path.join(self.directory, f"chunk_{chunk:04d}"),
          options=ocp.CheckpointManagerOptions(max_to_keep=self.max_to_keep,
                                               enable_async_checkpointing=True))
    return self._managers[chunk]

  def resume(self, chunk: int, fresh_state: Any) -> Any | None:
    """The latest saved state of ``chunk`` (structured like ``fresh_state``), or None."""
    manager = self._manager(chunk)
    step = manager.latest_step()
    if step is None:
      return None
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, fresh_state)
    try:
      restored = manager.restore(step, args=ocp.args.StandardRestore(abstract))
    except Exception as e:  # noqa: BLE001
      raise CheckpointError(
          f"Recover checkpoint {manager.directory}/{step} is corrupt or incompatible with the "
          f"current config ({type(e).__name__}: {e}). Delete {self.directory} to restart the "
          "recover stage.") from e
    self._last_saved[chunk] = step
    return type(fresh_state)(*restored) if hasattr(fresh_state, "_fields") else restored

  def on_block(self, chunk: int, state: Any, metrics: Any = None) -> None:
    """Saves ``state`` every ``save_every`` steps (as blocks allow) and at the last step."""
    del metrics
    step = int(state.step)
    if step - self._last_saved.get(chunk, 0) >= self.save_every or step >= self.iterations:
      # A copy on device (sharded states stay sharded: each process writes its own shards): the
      # next jitted step donates, i.e. frees, the buffers it is given while the save runs.
      snapshot = jax.tree.map(lambda x: x.copy() if isinstance(x, jax.Array) else x, state)
      self._manager(chunk).save(step, args=ocp.args.StandardSave(snapshot))
      self._last_saved[chunk] = step
      if step >= self.iterations:
        # A finished chunk is not saved again: release its manager (ImageNet-scale runs have
        # hundreds of chunks).
        manager = self._managers.pop(chunk)
        manager.wait_until_finished()
        manager.close()

  def close(self) -> None:
    for manager in self._managers.values():
      manager.wait_until_finished()
      manager.close()
    self._managers.clear()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


# --- Resumable teacher training -----------------------------------------------------------------

TEACHER_TRAIN_FORMAT = "wmdd_jax.teacher_training/1"


class TeacherCheckpointer:
  """Saves and restores a teacher's training state every few epochs with Orbax.

  :func:`wmdd_jax.teacher.train_teacher` uses it for its ``checkpoint_dir``. One Orbax
  ``CheckpointManager`` in ``directory`` whose step numbers are epochs (completed passes), keeping
  the last ``max_to_keep``; each checkpoint holds two items, written atomically:

    * ``state``: the ``TrainState`` (params, batch_stats, opt_state, step; StandardSave), saved
      as placed (a state replicated over a mesh is written once, every process taking part);
    * ``meta``: JSON ``{"format", "epoch", "fingerprint"}``.

  ``fingerprint`` is what makes a checkpoint belong to a run (the trainer builds it: the options
  that shape the weights, the model's variables, the data's size). :meth:`restore` refuses a
  checkpoint whose fingerprint differs, naming the differences: its state would be silently
  reused for another training. The PRNG key and the shuffle are not stored: the augmentation key
  is ``fold_in(key, step)`` and epoch ``e``'s order a function of (seed, e), so the state and
  the epoch are all a bit-identical continuation needs.

  With several processes every process must create it, :meth:`restore` and :meth:`save` with the
  same arguments (Orbax's saves are collective).
  """

  def __init__(self, directory: str | os.PathLike, fingerprint: Mapping[str, Any], *,
               save_every: int = 1, last_epoch: int, max_to_keep: int = 2):
    """Opens (creating it if needed) the checkpoint directory.

    Args:
      directory: where the checkpoints live (one sub-directory per saved epoch).
      fingerprint: JSON-serialisable description of the run; a checkpoint is resumed only when
        its fingerprint is equal (after a JSON round trip: tuples compare as lists).
      save_every: save after every this many epochs (and after ``last_epoch``); >= 1.
      last_epoch: the run's final epoch, always saved.
      max_to_keep: how many of the newest checkpoints are kept.

    Raises:
      ConfigError: ``save_every`` < 1 or a fingerprint that is not JSON-serialisable.
    """
    if not isinstance(save_every, int | np.integer) or save_every < 1:
      raise ConfigError(f"checkpoint_every must be an int >= 1 (epochs between teacher "
                        f"checkpoints), got {save_every!r}.")
    try:
      self.fingerprint = json.loads(json.dumps(dict(fingerprint)))
    except (TypeError, ValueError) as e:
      raise ConfigError(f"The teacher checkpoint fingerprint is not JSON-serialisable ({e}).") \
          from e
    self.directory = os.path.abspath(os.fspath(directory))
    self.save_every = int(save_every)
    self.last_epoch = int(last_epoch)
    self._manager = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, enable_async_checkpointing=True))

  def latest_epoch(self) -> int | None:
    """The newest completely written checkpoint's epoch, or None when there is none."""
    return self._manager.latest_step()

  def restore(self, fresh_state: Any) -> tuple[Any, int]:
    """The newest checkpoint's state and epoch, or ``(fresh_state, 0)`` when there is none.

    Args:
      fresh_state: the state training would start from; gives the structure, shapes, dtypes and
        placement (shardings) the restored arrays get.

    Returns:
      ``(state, epoch)``: the restored state (structured and placed like ``fresh_state``) and the
      number of epochs it has completed.

    Raises:
      CheckpointError: the checkpoint belongs to another run (its fingerprint differs: the
        message lists how) or is unreadable; either way, the fix is deleting ``directory``.
    """
    epoch = self._manager.latest_step()
    if epoch is None:
      return fresh_state, 0
    where = os.path.join(self.directory, str(epoch))
    try:
      meta = self._manager.restore(epoch, args=ocp.args.Composite(
          meta=ocp.args.JsonRestore()))["meta"]
    except Exception as e:  # noqa: BLE001 - any failure means an unusable checkpoint
      raise CheckpointError(
          f"The teacher checkpoint {where} has no readable meta ({type(e).__name__}: "
          f"{str(e)[:300]}); it is corrupt or not a teacher training checkpoint. Delete "
          f"{self.directory} to train the teacher from scratch.") from e
    if not isinstance(meta, dict) or meta.get("format") != TEACHER_TRAIN_FORMAT:
      found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
      raise CheckpointError(
          f"{where} is not a wmdd_jax teacher training checkpoint (format {found!r}, expected "
          f"{TEACHER_TRAIN_FORMAT!r}). Delete {self.directory} or point checkpoint_dir "
          "elsewhere.")
    difference = _json_difference(meta.get("fingerprint"), self.fingerprint)
    if difference:
      raise CheckpointError(
          f"The teacher checkpoint in {self.directory} (epoch {epoch}) was written by a different "
          f"training run, so it cannot be resumed: {difference}. Delete {self.directory} to "
          "train this teacher from scratch, or run with the settings it was written with.")
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, fresh_state)
    try:
      state = self._manager.restore(epoch, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract)))["state"]
    except Exception as e:  # noqa: BLE001
      raise CheckpointError(
          f"The teacher checkpoint {where} is incomplete or corrupt ({type(e).__name__}: "
          f"{str(e)[:300]}). Delete {self.directory} to train the teacher from scratch.") from e
    if jax.tree.structure(state) != jax.tree.structure(fresh_state):
      raise CheckpointError(
          f"The teacher checkpoint {where} restored a state of another structure than the "
          f"current TrainState. Delete {self.directory} to train the teacher from scratch.")
    return state, int(epoch)

  def save(self, epoch: int, state: Any) -> bool:
    """Saves ``state`` after ``epoch`` completed epochs when it is due.

    A save is due every ``save_every`` epochs and at ``last_epoch``. It runs in the background;
    a device copy of the state is written, so the caller may donate ``state`` to its next step.

    Args:
      epoch: completed epochs (>= 1).
      state: the TrainState after them.

    Returns:
      Whether a save was started.
    """
    epoch = int(epoch)
    if epoch % self.save_every and epoch != self.last_epoch:
      return False
    snapshot = jax.tree.map(lambda x: x.copy() if isinstance(x, jax.Array) else x, state)
    meta = {"format": TEACHER_TRAIN_FORMAT, "epoch": epoch, "fingerprint": self.fingerprint}
    try:
      self._manager.save(epoch, args=ocp.args.Composite(state=ocp.args.StandardSave(snapshot),
                                                        meta=ocp.args.JsonSave(meta)),
                         force=True)
    except Exception as e:  # noqa: BLE001
      raise CheckpointError(f"Could not save the teacher checkpoint of epoch {epoch} in "
                            f"{self.directory}: {e}. Check free disk space and permissions.") \
          from e
    return True

  def close(self) -> None:
    """Waits for a save in flight and releases the manager."""
    self._manager.wait_until_finished()
    self._manager.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def _json_difference(stored: Any, wanted: Any, prefix: str = "") -> str:
  """A short description of where two JSON values differ ("" when equal)."""
  notes: list[str] = []

  def walk(a, b, path):
    if isinstance(a, dict) and isinstance(b, dict):
      for k in sorted(set(a) | set(b)):
        sub = f"{path}.{k}" if path else str(k)
        if k not in a:
          notes.append(f"{sub} is not recorded there (here {b[k]!r})")
        elif k not in b:
          notes.append(f"{sub} is {a[k]!r} there, absent here")
        else:
          walk(a[k], b[k], sub)
    elif a != b:
      notes.append(f"{path or 'the fingerprint'} is {a!r} there, {b!r} here")

  walk(stored, wanted, prefix)
  return "; ".join(notes[:5]) + (f" (and {len(notes) - 5} more)" if len(notes) > 5 else "")
