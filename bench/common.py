"""What every benchmark records: the machine, peak memory, how it was run, and an atomic JSON write.

Every script in ``bench/`` runs as a module from the repository root (``python -m bench.<name>``)
and writes its results with :func:`write_result`, which adds the ``script`` and ``command`` that
reproduce the file and the ``machine`` it ran on. ``python -m bench.render_docs`` turns
``bench/results/*.json`` into ``docs/benchmarks.md``.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import shlex
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(ROOT, "bench", "results")


def _cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def machine(**extra: Any) -> dict[str, Any]:
  """The backend, devices and host the figures were taken on (the dev CPU machine is shared).

  Args:
    **extra: more entries (library versions, load averages, notes), added last.

  Returns:
    A JSON-ready dict.
  """
  return {
      "backend": jax.default_backend(),
      "devices": [str(d) for d in jax.devices()],
      "device_kind": jax.devices()[0].device_kind,
      "device_count": jax.device_count(),
      "cpu_count": os.cpu_count(),
      "processor": platform.processor() or platform.machine(),
      "cpu_model": _cpu_model(),
      "platform": platform.platform(),
      "load_average_at_end": os.getloadavg(),
      "jax": jax.__version__,
      "numpy": np.__version__,
      "python": platform.python_version(),
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
      **extra,
  }


def peak_rss_mib() -> float:
  """Peak resident memory of this process so far (Linux reports KiB)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def device_peak_mib() -> float | None:
  """Peak device memory where the backend reports it (GPU/TPU), else None."""
  stats = jax.devices()[0].memory_stats() or {}
  peak = stats.get("peak_bytes_in_use")
  return None if peak is None else peak / 2**20


def script_path() -> str:
  """The running benchmark as a repository path, e.g. ``bench/step.py``."""
  spec = getattr(sys.modules.get("__main__"), "__spec__", None)
  if spec is not None and spec.name.startswith("bench."):
    return spec.name.replace(".", "/") + ".py"
  return os.path.relpath(os.path.abspath(sys.argv[0]), ROOT)


def command_line() -> str:
  """The command that started this process, as ``python -m bench.<name> <args>``.

  ``XLA_FLAGS`` is prefixed when set, since it changes what is measured (e.g. simulated devices).
  A process that is not a ``bench`` module gives ``python <argv>``.
  """
  spec = getattr(sys.modules.get("__main__"), "__spec__", None)
  if spec is not None and spec.name.startswith("bench."):
    start = f"python -m {spec.name}"
  else:
    start = f"python {shlex.quote(sys.argv[0])}"
  env = f"XLA_FLAGS={shlex.quote(os.environ['XLA_FLAGS'])} " if os.environ.get("XLA_FLAGS") else ""
  return f"{env}{start} {shlex.join(sys.argv[1:])}".rstrip()


def write_result(path: str, data: dict[str, Any], *, script: str | None = None,
                 command: str | None = None) -> None:
  """Writes ``data`` to ``path`` as JSON (atomically), with how to reproduce it.

  The file starts with ``benchmark`` (what it measures), ``script`` and ``command`` (what wrote
  it, default: this process's, see :func:`command_line`) and ends with ``machine`` (default
  :func:`machine`); values already in ``data`` win.

  Args:
    path: the JSON file.
    data: the results.
    script: the script to name (default :func:`script_path`).
    command: the command to name (default :func:`command_line`).
  """
  head = {"benchmark": data.get("benchmark", ""),
          "script": data.get("script") or script or script_path(),
          "command": data.get("command") or command or command_line()}
  body = {k: v for k, v in data.items() if k not in head and k != "machine"}
  out = {**head, **body, "machine": data.get("machine") or machine()}
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.tmp"
  with open(tmp, "w") as f:
    json.dump(out, f, indent=2, default=_jsonable)
    f.write("\n")
  os.replace(tmp, path)
  print(f"wrote {path}")


def _jsonable(value: Any) -> Any:
  if isinstance(value, (np.generic, jax.Array)):
    return np.asarray(value).tolist()
  if isinstance(value, tuple):
    return list(value)
  return str(value)


def needs_statistics(config: Any) -> bool:
  """Whether a run of ``config`` reads the statistics pass (per-class BN moments, features)."""
  from wmdd_jax import methods, pipeline  # noqa: PLC0415
  method = methods.get_method(config.method)
  return method.runs_recover and method.needs_statistics(pipeline.recover_options(config))


def random_recover_targets(model, variables, num_classes: int, ipc: int, shape, seed: int = 0):
  """Random but well-shaped :class:`wmdd_jax.recover.RecoverTargets` for timing the recover loss.

  Features are |N(0, 1)| of the model's penultimate width, per-class BN means |N(0, 1)| and
  variances |N(0, 1)| + 0.5 per channel of every BN layer, global statistics 0 and 1.
  """
  from wmdd_jax import recover as recover_lib  # noqa: PLC0415
  from wmdd_jax.models import apply_model  # noqa: PLC0415

  out = jax.eval_shape(lambda v, x: apply_model(model, v, x), variables,
                       jnp.zeros((1, *shape), jnp.float32))
  d = out.features.shape[-1]
  rng = np.random.default_rng(seed)
  per_class = lambda ch: np.abs(rng.normal(size=(num_classes, ch))).astype(np.float32)
  return recover_lib.RecoverTargets(
      np.abs(rng.normal(size=(num_classes, ipc, d))).astype(np.float32),
      tuple(per_class(m.shape[-1]) for m in out.bn_mean),
      tuple(per_class(m.shape[-1]) + 0.5 for m in out.bn_var),
      tuple(np.zeros(m.shape[-1], np.float32) for m in out.bn_mean),
      tuple(np.ones(m.shape[-1], np.float32) for m in out.bn_var))
