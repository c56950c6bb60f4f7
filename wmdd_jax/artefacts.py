"""A run's files: where each lives in the working directory, and how each is written and read.

    teacher/              Orbax teacher (wmdd_jax.checkpoint; or config.teacher.checkpoint)
    teacher_metrics.jsonl one line per teacher epoch
    stats.npz             per-class and global BN-input statistics, class counts, labels
    features.npy          penultimate features of the train split (f32[N, d])
    barycenter.npz        per-class barycenter support and weights
    recover_ckpt/         resumable recover state (Orbax, wmdd_jax.checkpoint)
    recover_history.npz   per-step recover loss and terms
    synset/               the synthetic set (Orbax + meta.json, wmdd_jax.checkpoint); grid.png
    syn_data/             the set as the official JPEG folder (recover.store="jpeg")
    eval.json             student results
    metrics.json, timings.json, config.json, curves.png, summary.txt
    fingerprints.json     what each stage was computed from, and the content hashes of stats.npz,
                          features.npy and barycenter.npz (see wmdd_jax/pipeline.py)
    .lock                 held (flock) while a run uses the workdir: pid, host, start time

With several processes every process computes and calls the writers with the same data; process
0 writes (atomically: a temporary file ``<name>.tmp-<pid>[.npz|.npy]``, then a rename) and the
others wait for it (:func:`wmdd_jax.distributed.sharding.sync_processes`), so each file appears
once and whole. Temporaries a killed run left behind are removed by the next run
(:func:`remove_temporary`).

Everything read back is checked: a missing, truncated or corrupt file raises
:class:`~wmdd_jax.errors.CheckpointError` naming the file and the stage to recompute; a failed
write (a full disk, a read-only directory) raises :class:`WorkdirError` naming the path.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import socket
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import numpy as np

from wmdd_jax import report
from wmdd_jax.barycenter import Barycenter
from wmdd_jax.distributed import sharding
from wmdd_jax.errors import CheckpointError, WMDDError, WorkdirBusyError, WorkdirError
from wmdd_jax.statistics import ClassStatistics, Features

_STAT_FIELDS = ("mean", "var", "global_mean", "global_var")


@dataclasses.dataclass(frozen=True)
class RunFiles:
  """The paths of a run's files under ``workdir`` (see the module docstring)."""

  workdir: str

  def _path(self, name: str) -> str:
    return os.path.join(self.workdir, name)

  teacher = property(lambda self: self._path("teacher"))
  teacher_metrics = property(lambda self: self._path("teacher_metrics.jsonl"))
  stats = property(lambda self: self._path("stats.npz"))
  features = property(lambda self: self._path("features.npy"))
  barycenter = property(lambda self: self._path("barycenter.npz"))
  recover_ckpt = property(lambda self: self._path("recover_ckpt"))
  recover_history = property(lambda self: self._path("recover_history.npz"))
  synset = property(lambda self: self._path("synset"))
  syn_data = property(lambda self: self._path("syn_data"))
  grid = property(lambda self: self._path("grid.png"))
  eval = property(lambda self: self._path("eval.json"))
  metrics = property(lambda self: self._path("metrics.json"))
  timings = property(lambda self: self._path("timings.json"))
  config = property(lambda self: self._path("config.json"))
  curves = property(lambda self: self._path("curves.png"))
  summary = property(lambda self: self._path("summary.txt"))
  fingerprints = property(lambda self: self._path("fingerprints.json"))
  lock = property(lambda self: self._path(".lock"))
  # Resumable teacher training state (Orbax), for the teacher stage's own checkpoints.
  teacher_ckpt = property(lambda self: self._path("teacher_ckpt"))


# What each stage's files are, for messages ("delete stats.npz ... to recompute the statistics
# stage").
STAGE_FILES: dict[str, tuple[str, ...]] = {
    "teacher": ("teacher", "teacher_ckpt", "teacher_metrics.jsonl"),
    "statistics": ("stats.npz", "features.npy"),
    "barycenter": ("barycenter.npz",),
    "synset": ("synset", "recover_ckpt", "recover_history.npz", "syn_data"),
    "evaluate": ("eval.json",),
}


def _fix(path: str, stage: str) -> str:
  names = STAGE_FILES.get(stage, (os.path.basename(path),))
  where = os.path.dirname(path)
  listed = " and ".join(os.path.join(where, n) for n in names
                        if os.path.exists(os.path.join(where, n))) or path
  return f"delete {listed} to recompute the {stage} stage"


def _damaged(path: str, stage: str, cause: BaseException | str) -> CheckpointError:
  if isinstance(cause, BaseException):
    cause = f"{type(cause).__name__}: {str(cause)[:200]}" if str(cause) else type(cause).__name__
  return CheckpointError(f"{path} is missing, truncated or corrupt ({cause}); {_fix(path, stage)}"
                         " (or use a new --workdir).")


@contextlib.contextmanager
def writing(path: str) -> Iterator[None]:
  """Turns an OSError while writing ``path`` into a :class:`WorkdirError` naming it."""
  try:
    yield
  except WMDDError:
    raise
  except OSError as e:
    raise WorkdirError(write_failure(path, e)) from e


def write_failure(path: str, error: OSError) -> str:
  """The message of a failed write to ``path``: the cause and the fix."""
  if error.errno in (errno.ENOSPC, errno.EDQUOT):
    fix = "free disk space (or use a --workdir on another disk), then re-run: finished stages " \
          "are kept"
  elif error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
    fix = "make the directory writable or use another --workdir"
  elif error.errno in (errno.ENOTDIR, errno.EEXIST):
    fix = "--workdir must be a directory (or a path that does not exist yet); pass another path"
  else:
    fix = "check the path, permissions and free space, or use another --workdir"
  return f"Could not write {path} ({type(error).__name__}: {error.strerror or error}); {fix}."


def is_primary() -> bool:
  """Whether this process writes the run's files (process 0; every process computes)."""
  return jax.process_index() == 0


def _atomic(path: str, suffix: str, write: Callable[[str], None]) -> None:
  """``write(tmp)``, then renames ``tmp`` to ``path``; the temporary is removed on failure."""
  tmp = f"{path}.tmp-{os.getpid()}{suffix}"
  try:
    with writing(path):
      write(tmp)
      os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      with contextlib.suppress(OSError):
        os.remove(tmp)


def save_npz(path: str, **arrays: Any) -> None:
  """Every process calls it with the same arrays; process 0 writes them (atomically)."""
  if is_primary():
    _atomic(path, ".npz", lambda tmp: np.savez(tmp, **arrays))
  sharding.sync_processes(os.path.basename(path))


def _write_json(path: str, data: Any) -> None:
  if is_primary():
    with writing(path):
      report.write_json(path, data)


def _read_json(path: str, stage: str) -> Any:
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError) as e:  # JSONDecodeError, UnicodeDecodeError are ValueErrors
    raise _damaged(path, stage, e) from e


def file_sha256(path: str) -> str:
  """The sha256 of ``path``'s bytes (hex), read in 16 MiB blocks.

  Raises:
    CheckpointError: the file cannot be read.
  """
  digest = hashlib.sha256()
  try:
    with open(path, "rb") as f:
      while block := f.read(1 << 24):
        digest.update(block)
  except OSError as e:
    raise CheckpointError(f"Could not read {path} ({e}); check the file and its permissions.") \
        from e
  return digest.hexdigest()


def verify_sha256(path: str, expected: str | None, stage: str) -> None:
  """Refuses ``path`` when its content hash is not ``expected`` (None: nothing recorded).

  Raises:
    CheckpointError: the bytes changed since the stage wrote them (names the file and the fix).
  """
  if expected is None or not os.path.exists(path):
    return
  actual = file_sha256(path)
  if actual != expected:
    raise CheckpointError(
        f"{path} is not the file the {stage} stage wrote: its sha256 is {actual[:16]}..., "
        f"recorded {expected[:16]}... in fingerprints.json (the file was damaged or replaced); "
        f"{_fix(path, stage)} (or use a new --workdir).")


# ----------------------------------------------------------------------------- statistics


def save_statistics(path: str, stats: ClassStatistics, labels: np.ndarray) -> None:
  """stats.npz: ``num_layers``, ``counts``, ``labels`` and ``<field>_<layer>`` for the mean,
  var, global_mean and global_var of every BN layer."""
  arrays = {"num_layers": len(stats.mean), "counts": stats.counts, "labels": labels}
  for name in _STAT_FIELDS:
    for i, a in enumerate(getattr(stats, name)):
      arrays[f"{name}_{i}"] = a
  save_npz(path, **arrays)


def save_features(path: str, features: np.ndarray) -> None:
  """features.npy, written by process 0 (atomically). The single-process statistics pass
  streams it itself (``compute_class_statistics(feature_path=...)``)."""
  if is_primary():
    _atomic(path, ".npy", lambda tmp: np.save(tmp, features))


def load_statistics(files: RunFiles, hashes: Mapping[str, str] | None = None
                    ) -> tuple[ClassStatistics, Features]:
  """stats.npz and features.npy (memory-mapped) as written by the statistics stage.

  Args:
    files: the run's files.
    hashes: file name -> sha256 recorded when they were written (fingerprints.json); the files
      are checked against them. None or a missing name: not checked.

  Raises:
    CheckpointError: a missing, truncated, corrupt or changed file (names it and the fix).
  """
  hashes = hashes or {}
  for path in (files.stats, files.features):
    verify_sha256(path, hashes.get(os.path.basename(path)), "statistics")
  try:
    with np.load(files.stats) as data:
      layers = int(data["num_layers"])
      get = lambda name: tuple(data[f"{name}_{i}"] for i in range(layers))  # noqa: E731
      stats = ClassStatistics(*(get(name) for name in _STAT_FIELDS), data["counts"])
      labels = data["labels"]
  except Exception as e:  # noqa: BLE001 - BadZipFile, EOFError, KeyError, zlib.error, ...
    raise _damaged(files.stats, "statistics", e) from e
  if not os.path.exists(files.features):
    raise _damaged(files.features, "statistics", "features.npy is missing")
  try:
    features = np.load(files.features, mmap_mode="r")
  except Exception as e:  # noqa: BLE001 - "mmap length is greater than file size", ...
    raise _damaged(files.features, "statistics", e) from e
  if features.ndim != 2 or features.shape[0] != len(labels):
    raise _damaged(files.features, "statistics",
                   f"{features.shape} features for {len(labels)} labels in stats.npz")
  return stats, Features(features, labels)


# ----------------------------------------------------------------------------- barycenters


def save_barycenter(path: str, bary: Barycenter) -> None:
  """barycenter.npz: ``support`` f32[C, k, d] and ``weights`` f32[C, k]."""
  save_npz(path, support=bary.support, weights=bary.weights)


def load_barycenter(path: str, sha256: str | None = None) -> Barycenter:
  """barycenter.npz, checked against its recorded ``sha256`` (None: not checked).

  Raises:
    CheckpointError: a missing, truncated, corrupt or changed file (names it and the fix).
  """
  verify_sha256(path, sha256, "barycenter")
  try:
    with np.load(path) as data:
      support, weights = data["support"], data["weights"]
  except Exception as e:  # noqa: BLE001 - BadZipFile, EOFError, KeyError, zlib.error, ...
    raise _damaged(path, "barycenter", e) from e
  if support.ndim != 3 or weights.shape != support.shape[:2]:
    raise _damaged(path, "barycenter", f"support {support.shape} and weights {weights.shape} "
                   "are not [C, k, d] and [C, k]")
  return Barycenter(support, weights)


# ----------------------------------------------------------------------------- recover


def save_recover_history(path: str, history: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Writes recover_history.npz and returns what it wrote.

  A resumed recover saw only its last steps (NaN for the others): where an earlier record of the
  same shape is on disk, its values fill those steps.
  """
  if os.path.exists(path):
    try:
      with np.load(path) as before:
        history = {k: np.where(np.isnan(v), before[k], v) if k in before.files
                   and before[k].shape == v.shape else v for k, v in history.items()}
    except Exception:  # noqa: BLE001 - a damaged earlier record: this one replaces it
      pass
  save_npz(path, **history)
  return history


def load_recover_history(path: str) -> dict[str, np.ndarray] | None:
  """recover_history.npz as a dict, or None when there is none (random real images).

  Raises:
    CheckpointError: a truncated or corrupt file (names it and the fix).
  """
  if not os.path.exists(path):
    return None
  try:
    with np.load(path) as data:
      history = {k: data[k] for k in data.files}
  except Exception as e:  # noqa: BLE001 - BadZipFile, EOFError, zlib.error, ...
    raise CheckpointError(
        f"{path} is truncated or corrupt ({type(e).__name__}: {str(e)[:200]}); delete it (the "
        "recover curves are then left out of curves.png), or delete it with synset/ and "
        "recover_ckpt/ to recompute the synset stage.") from e
  return history


# ----------------------------------------------------------------------------- results


def save_eval(path: str, result: dict[str, Any]) -> None:
  """eval.json: test_top1/top5, best_top1/top5, student, history (one dict per evaluation)."""
  _write_json(path, result)
  sharding.sync_processes(os.path.basename(path))


EVAL_KEYS = ("test_top1", "test_top5", "best_top1", "best_top5")


def load_eval(path: str) -> dict[str, Any] | None:
  """eval.json, or None when the evaluation has not finished.

  Raises:
    CheckpointError: a truncated, emptied or incomplete file (names it and the fix).
  """
  if not os.path.exists(path):
    return None
  result = _read_json(path, "evaluate")
  if not isinstance(result, dict):
    raise _damaged(path, "evaluate", f"a JSON {type(result).__name__}, not an object")
  bad = [k for k in EVAL_KEYS if not isinstance(result.get(k), int | float)
         or isinstance(result.get(k), bool)]
  if bad:
    raise _damaged(path, "evaluate", f"no number for {bad}")
  history = result.get("history", [])
  if not isinstance(history, list) or not all(
      isinstance(h, dict) and "epoch" in h and "top1" in h for h in history):
    raise _damaged(path, "evaluate", "its history is not a list of {epoch, top1, ...}")
  return result


def read_timings(path: str, log: Callable[[str], Any] | None = None) -> dict[str, float]:
  """timings.json (seconds per stage) of an earlier, resumed run; {} for a new one.

  A damaged file is bookkeeping only: it is reset ({}), with a line to ``log``.
  """
  if not os.path.exists(path):
    return {}
  try:
    with open(path) as f:
      timings = json.load(f)
    if isinstance(timings, dict) and all(isinstance(v, int | float) for v in timings.values()):
      return timings
    cause = "not an object of seconds per stage"
  except (OSError, ValueError) as e:
    cause = f"{type(e).__name__}: {e}"
  if log is not None:
    log(f"warning: {path} is damaged ({cause}); the seconds per stage start afresh.")
  return {}


def write_timings(path: str, timings: dict[str, float]) -> None:
  _write_json(path, timings)


def write_metrics(path: str, metrics: dict[str, Any]) -> None:
  """metrics.json (the README's contract: dataset, method, ipc, ..., seconds)."""
  _write_json(path, metrics)


def write_config(path: str, config: Any) -> None:
  """config.json: the run's resolved config (written atomically)."""
  if is_primary():
    text = (config.to_json_best_effort(indent=2) if hasattr(config, "to_json_best_effort")
            else json.dumps(dict(config), indent=2, default=str))
    write_text(path, text)


def write_text(path: str, text: str) -> None:
  """A text file (summary.txt), written by process 0 (atomically)."""
  if is_primary():
    def write(tmp):
      with open(tmp, "w") as f:
        f.write(text)
    _atomic(path, "", write)


def save_grid(path: str, pixels: np.ndarray) -> None:
  """grid.png (:func:`wmdd_jax.report.save_grid`), written by process 0."""
  if is_primary():
    with writing(path):
      report.save_grid(path, pixels)


def save_curves(path: str, panels: Any) -> None:
  """curves.png (:func:`wmdd_jax.report.save_curves`), written by process 0."""
  if is_primary():
    with writing(path):
      report.save_curves(path, panels)


# ----------------------------------------------------------------------------- fingerprints

FINGERPRINTS_FORMAT = "wmdd_jax.fingerprints/1"


def read_fingerprints(path: str) -> dict[str, Any]:
  """fingerprints.json: {"stages": {stage: record}, "files": {name: sha256}}; empty for a
  workdir that has none (new, or made before fingerprints existed).

  Raises:
    CheckpointError: a damaged file (names it and the fix).
  """
  empty = {"format": FINGERPRINTS_FORMAT, "stages": {}, "files": {}}
  if not os.path.exists(path):
    return empty
  try:
    with open(path) as f:
      data = json.load(f)
    if not (isinstance(data, dict) and isinstance(data.get("stages"), dict)
            and isinstance(data.get("files"), dict)):
      raise ValueError("not a fingerprints object")
  except (OSError, ValueError) as e:
    raise CheckpointError(
        f"{path} is damaged ({type(e).__name__}: {e}): it records what each stage was computed "
        "from. Delete it to accept the results in this workdir as made with the current config "
        "(they are checked afresh from then on), or use a new --workdir.") from e
  return {**empty, **data}


def write_fingerprints(path: str, data: Mapping[str, Any]) -> None:
  """Writes fingerprints.json atomically (process 0)."""
  _write_json(path, {**data, "format": FINGERPRINTS_FORMAT})


# ----------------------------------------------------------------------------- the workdir


def prepare_workdir(path: str) -> bool:
  """Creates the working directory if needed; returns whether it is writable.

  Raises:
    WorkdirError: ``path`` is an existing file, or cannot be created.
  """
  if os.path.exists(path) and not os.path.isdir(path):
    raise WorkdirError(f"--workdir {path} is an existing file, not a directory; pass a directory "
                       "(or a path that does not exist yet).")
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    raise WorkdirError(f"Could not create the workdir {path} ({type(e).__name__}: "
                       f"{e.strerror or e}); pass a path in a writable directory.") from e
  probe = os.path.join(path, f".probe.tmp-{os.getpid()}")
  try:
    with open(probe, "w"):
      pass
  except OSError:
    return False
  with contextlib.suppress(OSError):  # (another process may have cleaned it up already)
    os.remove(probe)
  return True


# Temporaries of the atomic writers: artefacts.py and report.py (<name>.tmp-<pid>[.npz|.npy]),
# checkpoint.save_synthetic_set (synset.tmp-<pid>, synset.tmp-multiprocess, synset.old-<pid>),
# store.write_image_folder (.syn_data.tmp-<random>), prepare_workdir's probe, and Orbax's
# <name>.orbax-checkpoint-tmp[-<time>] directories.
_TEMPORARY = re.compile(r"^(?:.+\.tmp-\d+(?:\.npz|\.npy)?|.+\.tmp-multiprocess|.+\.old-\d+"
                        r"|\..+\.tmp-[A-Za-z0-9_]+|.+\.orbax-checkpoint-tmp(?:-.*)?)$")


def remove_temporary(workdir: str, log: Callable[[str], Any] = print) -> list[str]:
  """Removes what killed atomic writes left in ``workdir`` (and in recover_ckpt/'s chunks).

  Call it only while holding the workdir's lock (no other run is writing there). Returns the
  paths removed.
  """
  removed = []
  folders = [workdir]
  ckpt = os.path.join(workdir, "recover_ckpt")
  if os.path.isdir(ckpt):
    folders += [os.path.join(ckpt, d) for d in sorted(os.listdir(ckpt))]
  for folder in folders:
    if not os.path.isdir(folder):
      continue
    for name in sorted(os.listdir(folder)):
      if not _TEMPORARY.match(name):
        continue
      path = os.path.join(folder, name)
      try:
        if os.path.isdir(path) and not os.path.islink(path):
          shutil.rmtree(path)
        else:
          os.remove(path)
      except OSError as e:
        log(f"warning: could not remove the leftover temporary {path}: {e}")
        continue
      removed.append(path)
  if removed:
    log(f"removed {len(removed)} temporary file(s) a killed run left: "
        + ", ".join(os.path.relpath(p, workdir) for p in removed))
  return removed


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


class WorkdirLock:
  """An exclusive lock on a working directory (``flock`` on ``<workdir>/.lock``).

  The file holds the holder's pid, host and start time, for the message another run gets. The
  kernel releases the lock when the holder exits, however it exits; a holder recorded on this
  host whose pid is gone (e.g. the lock file outlived it on a network file system) is taken
  over, with a log line.
  """

  def __init__(self, path: str, log: Callable[[str], Any] = print):
    self.path, self.log = path, log
    self._fd: int | None = None

  def _holder(self, fd: int) -> dict[str, Any]:
    try:
      os.lseek(fd, 0, os.SEEK_SET)
      text = os.read(fd, 4096).decode(errors="replace")
      holder = json.loads(text) if text.strip() else {}
      return holder if isinstance(holder, dict) else {}
    except (OSError, ValueError):
      return {}

  @staticmethod
  def _describe(holder: Mapping[str, Any]) -> str:
    return (f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, started "
            f"{holder.get('started', '?')}")

  def acquire(self) -> None:
    """Takes the lock.

    Raises:
      WorkdirBusyError: another live process holds it (names its pid, host and start time).
      WorkdirError: the lock file cannot be created.
    """
    host = socket.gethostname()
    for attempt in range(3):
      try:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
      except OSError as e:
        raise WorkdirError(write_failure(self.path, e)) from e
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except OSError as e:
        holder = self._holder(fd)
        os.close(fd)
        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
          raise WorkdirError(f"Could not lock {self.path} ({e}); use a --workdir on a file "
                             "system that supports flock.") from e
        pid = holder.get("pid")
        if (attempt == 0 and holder.get("host") == host and isinstance(pid, int)
            and not _pid_alive(pid)):
          self.log(f"taking over the lock {self.path} of a run that is gone "
                   f"({self._describe(holder)})")
          with contextlib.suppress(OSError):
            os.remove(self.path)
          continue
        raise WorkdirBusyError(
            f"The workdir {os.path.dirname(self.path)} is in use by another run "
            f"({self._describe(holder)}). Wait for it to finish or stop it, or use another "
            f"--workdir; if that run is gone (e.g. on another host), delete {self.path}.") from e
      try:
        same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
      except OSError:
        same = False
      if not same:  # the file was replaced between open and flock: lock the new one
        os.close(fd)
        continue
      previous = self._holder(fd)
      if previous and previous.get("pid") != os.getpid():
        self.log(f"taking over the lock {self.path} left by a run that ended without releasing "
                 f"it ({self._describe(previous)})")
      me = {"pid": os.getpid(), "host": host,
            "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
      try:
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, json.dumps(me).encode())
      except OSError as e:
        os.close(fd)
        raise WorkdirError(write_failure(self.path, e)) from e
      self._fd = fd
      return
    raise WorkdirBusyError(f"Could not lock {self.path}: it keeps being replaced by another run; "
                           "use another --workdir.")

  def release(self) -> None:
    """Releases the lock and removes the lock file (a no-op when not held)."""
    if self._fd is None:
      return
    with contextlib.suppress(OSError):
      os.remove(self.path)
    with contextlib.suppress(OSError):
      os.close(self._fd)  # closing releases the flock
    self._fd = None

  def __enter__(self) -> WorkdirLock:
    self.acquire()
    return self

  def __exit__(self, *exc: Any) -> None:
    self.release()


__all__ = ["EVAL_KEYS", "STAGE_FILES", "RunFiles", "WorkdirBusyError", "WorkdirError",
           "WorkdirLock", "file_sha256", "is_primary", "load_barycenter", "load_eval",
           "load_recover_history", "load_statistics", "prepare_workdir", "read_fingerprints",
           "read_timings", "remove_temporary", "save_barycenter", "save_curves", "save_eval",
           "save_features", "save_grid", "save_npz", "save_recover_history", "save_statistics",
           "verify_sha256", "write_config", "write_failure", "write_fingerprints",
           "write_metrics", "write_text", "write_timings", "writing"]
