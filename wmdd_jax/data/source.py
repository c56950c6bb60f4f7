"""What a dataset source is, and the one table of sources that ``open_dataset`` reads.

A *source* (tfds, image folder, IDX files, an ``.npz`` archive, sklearn digits) knows how to list
labels and read images by index; :class:`wmdd_jax.data.dataset.Dataset` wraps one and adds what
every source shares. This module holds what the sources need from the rest of the package (the
:class:`Source` base class, :data:`NORMALIZATION`, :func:`known_normalization`,
:func:`stratified_holdout`) and :data:`SOURCES`, the registry mapping a spec prefix (``tfds``,
``folder``, ``idx``, ``npz``, ``digits``) to its :class:`SourceKind`: the spec form shown in error
messages, the options it accepts and the function that opens it. The spec parser
(:func:`parse_spec`), the options check (:func:`split_options`) and their error messages all read
that table, so a new source is one :func:`register_source` call in its own module (imported by
:mod:`wmdd_jax.data.dataset`, which is how built-in sources get registered).

This module imports no other module of :mod:`wmdd_jax.data`: the source modules import it, and
:mod:`wmdd_jax.data.dataset` imports both, so there is no import circle.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from wmdd_jax.errors import ConfigError

# Published per-channel constants in [0, 1] pixel scale. CIFAR-10's std is the one the SRe2L/WMDD
# code uses (the widely copied 0.2023..., not the true pixel std 0.247...), so teachers trained
# here match theirs; ImageNet's are used for its subsets (ImageNette, Tiny-ImageNet) as WMDD does.
NORMALIZATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "mnist": ((0.1307,), (0.3081,)),
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}

# Options every source accepts (read by Dataset); each SourceKind adds its own. The last four
# choose the loader (wmdd_jax.data.loader.OPTIONS).
COMMON_OPTIONS = ("resize", "val_fraction", "seed", "normalization", "load_split_max_bytes",
                  "loader", "worker_count", "read_threads", "prefetch")


def known_normalization(name: str) -> str | None:
  """Maps a dataset name (tfds name, folder or file name) to a key of NORMALIZATION, or None."""
  key = "".join(ch for ch in name.lower() if ch.isalnum())
  if key.startswith("fashion") and "mnist" in key:
    return "fashion_mnist"
  if key in ("mnist",) or (key.startswith("mnist") and key[5:].isdigit()):
    return "mnist"
  if key.startswith("cifar100"):
    return "cifar100"
  if key.startswith("cifar10"):
    return "cifar10"
  if key.startswith(("imagenet", "imagenette", "imagewoof", "tinyimagenet", "imagewang")):
    return "imagenet"
  return None


def stratified_holdout(
    labels: np.ndarray, fraction: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
  """Splits positions ``0..N-1`` into (kept, held out), ``fraction`` of every class held out.

  Each class with at least two examples gives ``round(n_c * fraction)`` examples, at least one
  and at most ``n_c - 1``, so both parts see every such class. Both index arrays are sorted.

  Args:
    labels: i32[N].
    fraction: in (0, 1).
    rng: the seeded generator that picks which examples.

  Returns:
    (kept i64[N - M], held i64[M]).
  """
  held = []
  for c in np.unique(labels):
    where = np.flatnonzero(labels == c)
    n = len(where)
    if n < 2:
      continue
    take = min(max(int(round(n * fraction)), 1), n - 1)
    held.append(rng.permutation(where)[:take])
  held_idx = np.sort(np.concatenate(held)) if held else np.zeros(0, np.int64)
  mask = np.ones(len(labels), bool)
  mask[held_idx] = False
  return np.flatnonzero(mask), held_idx


class Source(abc.ABC):
  """What a backend provides. Indices are positions within one of the source's own splits."""

  #: Whether :meth:`read` may be called with any indices (else only :meth:`stream` works).
  random_access: bool = True
  #: Names the example whose size set ``native_shape`` (for mixed-size errors), if any.
  shape_reference: str | None = None

  def __init__(self, spec: str):
    self.spec = spec

  @property
  @abc.abstractmethod
  def splits(self) -> tuple[str, ...]:
    """The split names, e.g. ('train', 'test')."""

  @property
  @abc.abstractmethod
  def class_names(self) -> list[str]:
    """One name per class, in label order."""

  @property
  @abc.abstractmethod
  def native_shape(self) -> tuple[int | None, int | None, int]:
    """(H, W, ch) of the stored images; H and W are None when they vary."""

  @abc.abstractmethod
  def labels(self, split: str) -> np.ndarray:
    """All labels of ``split`` as an integer array [N] (not yet range-checked)."""

  def read(
      self, split: str, indices: np.ndarray, fit: Callable[[np.ndarray], np.ndarray] | None = None
  ) -> np.ndarray | list[np.ndarray]:
    """Images at ``indices``: u8[B, H, W, ch], or a list of u8[h, w, ch] of possibly mixed sizes.

    ``fit``, when given, is the resize the dataset will apply; a source that decodes in worker
    threads may apply it there (the dataset skips images already of the right size).
    """
    raise NotImplementedError

  def serial(self) -> Source:
    """A source reading in the calling thread only: a loader that reads several batches at once
    (``loader="grain"``) parallelises over batches instead. A source with its own decoding
    threads returns a copy without them; the default returns ``self``. Sources are pickled into
    grain's worker processes, so one holding something unpicklable (a thread pool, a module)
    drops it in ``__getstate__``.
    """
    return self

  def stream(self, split: str) -> Iterator[np.ndarray]:
    """All images of ``split`` in index order (for sources without random access)."""
    raise NotImplementedError

  def describe(self, split: str, index: int) -> str:
    """Names one example for error messages (a file path where there is one)."""
    return f"example {index} of split {split!r} of {self.spec}"

  def default_normalization(self) -> str | None:
    """A key of NORMALIZATION when the data is a known dataset."""
    return None

  def stats_cache_key(self, split: str) -> str | None:
    """A fingerprint of the content of ``split``, or None to keep computed mean/std in memory.

    When given, computed mean/std are cached between runs in the user cache folder under a key
    built from it, so it must change whenever any image of the split (or its label) changes:
    e.g. a hash of every file's relative path, size and modification time.
    """
    del split
    return None


# ------------------------------------------------------------------------------------ registry


@dataclasses.dataclass(frozen=True)
class SourceKind:
  """One entry of :data:`SOURCES`: a spec prefix and how to open it.

  Attributes:
    prefix: what comes before ``:`` in a spec, lower case, e.g. ``"idx"``.
    form: the spec form with a short note, shown when a spec is not understood, e.g.
      ``"idx:<dir>  (MNIST-format train-/t10k- IDX files)"``.
    options: the options this source accepts on top of :data:`COMMON_OPTIONS`.
    open: ``open(spec, arg, *, seed, **own) -> Source``: ``arg`` is the stripped text after
      the ``:`` ('' for a bare prefix), ``seed`` the ``seed`` option as given (default 0), and
      ``own`` those of ``options`` that were given, except ``verify``, which ``open_dataset``
      carries out itself for any source that lists it.
    takes_argument: whether the spec is ``<prefix>:<arg>`` (True) or the bare ``<prefix>``.
  """

  prefix: str
  form: str
  options: tuple[str, ...]
  open: Callable[..., Source]
  takes_argument: bool = True


# prefix -> SourceKind, in registration order (the order the forms are listed in errors).
SOURCES: dict[str, SourceKind] = {}


def register_source(kind: SourceKind) -> SourceKind:
  """Adds ``kind`` to :data:`SOURCES`, so ``open_dataset`` accepts its specs and options.

  Args:
    kind: the new entry; its prefix must be lower case and not yet taken.

  Returns:
    ``kind``.

  Raises:
    ConfigError: the prefix is malformed, clashes with a common option name, or is taken by a
      different opener.
  """
  prefix = kind.prefix
  if not prefix or prefix != prefix.strip().lower() or ":" in prefix:
    raise ConfigError(
        f"source prefix {prefix!r} must be a non-empty lower-case word without ':' or spaces, "
        "e.g. 'npz'."
    )
  clash = sorted(set(kind.options) & set(COMMON_OPTIONS))
  if clash:
    raise ConfigError(
        f"source {prefix!r} lists common option(s) {clash} among its own; drop them from "
        "SourceKind.options (every source already accepts them)."
    )
  old = SOURCES.get(prefix)
  if old is not None and _identity(old) != _identity(kind):
    raise ConfigError(
        f"dataset source prefix {prefix!r} is already registered by {_identity(old)[0]}; pick "
        "another prefix for the new source."
    )
  SOURCES[prefix] = kind  # The same entry again (a module reload): the newer one replaces it.
  return kind


def _identity(kind: SourceKind) -> tuple[str, str, tuple[str, ...], bool]:
  """What stays equal when a module registering ``kind`` is reloaded."""
  opener = kind.open
  where = f"{getattr(opener, '__module__', '?')}.{getattr(opener, '__qualname__', repr(opener))}"
  return where, kind.form, kind.options, kind.takes_argument


def spec_forms() -> tuple[str, ...]:
  """The spec forms of every registered source, as listed in error messages."""
  return tuple(kind.form for kind in SOURCES.values())


def parse_spec(spec: Any) -> tuple[SourceKind, str]:
  """Splits a spec into its registered source and its argument.

  Args:
    spec: e.g. ``"idx:../data/mnist"`` or ``"digits"``.

  Returns:
    (the :class:`SourceKind` of the prefix, the stripped text after ``:``, '' when none).

  Raises:
    ConfigError: not a string, an unknown prefix (the message lists the valid forms), a missing
      argument, or an argument given to a source that takes none.
  """
  if not isinstance(spec, str):
    raise ConfigError(f"spec must be a string such as 'digits', got {spec!r}.")
  prefix, _, arg = spec.partition(":")
  prefix, arg = prefix.strip().lower(), arg.strip()
  kind = SOURCES.get(prefix)
  if kind is None or (kind.takes_argument and not arg):
    forms = "\n  ".join(spec_forms())
    raise ConfigError(f"unknown dataset spec {spec!r}; valid forms are:\n  {forms}")
  if not kind.takes_argument and arg:
    raise ConfigError(f"spec {spec!r}: {prefix!r} takes no argument; use spec={prefix!r}.")
  return kind, arg


def split_options(
    kind: SourceKind, options: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
  """Checks ``open_dataset``'s options against ``kind`` and splits them.

  Args:
    kind: the source the spec names.
    options: the keyword options given to ``open_dataset``.

  Returns:
    (the :data:`COMMON_OPTIONS` given, the source's own options given).

  Raises:
    ConfigError: an option neither common nor the source's own (the message lists the valid
      ones).
  """
  allowed = COMMON_OPTIONS + kind.options
  unknown = sorted(set(options) - set(allowed))
  if unknown:
    raise ConfigError(
        f"unknown option(s) {unknown} for a {kind.prefix!r} dataset; it accepts {sorted(allowed)}."
    )
  common = {k: options[k] for k in COMMON_OPTIONS if k in options}
  own = {k: options[k] for k in kind.options if k in options}
  return common, own
