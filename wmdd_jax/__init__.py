"""wmdd-jax: Dataset Distillation via the Wasserstein Metric (Liu et al., ICCV 2025) in JAX."""

from wmdd_jax.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    DatasetNotFoundError,
    NonFiniteError,
    ShapeError,
    WMDDError,
    WorkdirBusyError,
    WorkdirError,
)

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "ConfigError",
    "DataError",
    "DatasetNotFoundError",
    "NonFiniteError",
    "ShapeError",
    "WMDDError",
    "WorkdirBusyError",
    "WorkdirError",
    "__version__",
]
