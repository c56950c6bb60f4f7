"""What every benchmark records: the machine it ran on, peak memory, and an atomic JSON write."""

from __future__ import annotations

import json
import os
import platform
import resource

import jax


def machine() -> dict:
  """The backend, devices and host the figures were taken on (this CPU machine is shared)."""
  return {
      "backend": jax.default_backend(),
      "devices": [str(d) for d in jax.devices()],
      "device_kind": jax.devices()[0].device_kind,
      "device_count": jax.device_count(),
      "cpu_count": os.cpu_count(),
      "processor": platform.processor() or platform.machine(),
      "load_average_at_end": os.getloadavg(),
      "jax": jax.__version__,
      "python": platform.python_version(),
  }


def peak_rss_mib() -> float:
  """Peak resident memory of this process so far (Linux reports KiB)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def device_peak_mib() -> float | None:
  """Peak device memory where the backend reports it (GPU/TPU), else None."""
  stats = jax.devices()[0].memory_stats() or {}
  peak = stats.get("peak_bytes_in_use")
  return None if peak is None else peak / 2**20


def write_result(path: str, data: dict) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.tmp"
  with open(tmp, "w") as f:
    json.dump(data, f, indent=2, default=str)
    f.write("\n")
  os.replace(tmp, path)
  print(f"wrote {path}")
