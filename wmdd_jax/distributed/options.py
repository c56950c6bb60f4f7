"""How a run uses its devices: the ``parallel`` section of a config."""

from __future__ import annotations

import dataclasses

import numpy as np

from wmdd_jax.errors import ConfigError

MESH_MODES = ("auto", "on", "off")
COMPILER_MODES = ("auto", "none")


@dataclasses.dataclass(frozen=True)
class ExecutionOptions:
  """Device policy of a run (config section ``parallel``).

  Attributes:
    mesh: "auto": one mesh of every device when there are several, else the default device;
      "on": always a mesh; "off": the default device only.
    memory_budget_bytes: > 0: recover's class chunk is sized so that one compiled step fits this
      many bytes per device; 0: no sizing.
    units: 0: each batch (or class chunk) split over the mesh by XLA, equal to one device up to
      round-off. N > 0: every batch cut into N deterministic work units, so a run is
      bit-identical for any device count (one process only; train-mode BN then normalises per
      unit).
    compiler_options: how each compiled program is built. "auto": on the CPU backend, the XLA
      options measured faster for that kind of program (recover's step and the student's step
      compile without XLA:CPU's YNNPACK convolution fusion, which kept only ~1.4 of 2 cores busy;
      :data:`wmdd_jax.distributed.execution.CPU_PROGRAM_OPTIONS`, bench/official.py), XLA's
      defaults elsewhere, on other backends and under ``units`` (whose bit-identity across
      device counts those options would break); options this jaxlib does not know are dropped.
      "none": XLA's defaults for every program. The numbers agree to float round-off.
  """

  mesh: str = "auto"
  memory_budget_bytes: int = 0
  units: int = 0
  compiler_options: str = "auto"

  def __post_init__(self):
    if self.mesh not in MESH_MODES:
      raise ConfigError(f"parallel.mesh={self.mesh!r} is not one of {MESH_MODES}.")
    if self.compiler_options not in COMPILER_MODES:
      raise ConfigError(f"parallel.compiler_options={self.compiler_options!r} is not one of "
                        f"{COMPILER_MODES} ('none': XLA's defaults).")
    for name in ("memory_budget_bytes", "units"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 0:
        raise ConfigError(f"parallel.{name} must be an int >= 0, got {value!r}.")
