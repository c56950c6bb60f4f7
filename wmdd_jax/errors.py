"""Errors the library raises on purpose.

Every one derives from :class:`WMDDError` and, where apt, from the matching builtin (ValueError,
FileNotFoundError, ...), so callers can catch either. Messages name the cause and the fix.
"""


class WMDDError(Exception):
  """Base class of every error wmdd_jax raises on purpose."""


class ConfigError(WMDDError, ValueError):
  """A bad option, spec or argument value."""


class ShapeError(WMDDError, ValueError):
  """An array with the wrong shape, rank or dtype."""


class DatasetNotFoundError(WMDDError, FileNotFoundError):
  """A dataset path, file or split that does not exist."""


class DataError(WMDDError, ValueError):
  """Data that exists but is unusable: corrupt images, bad labels, empty classes."""


class NonFiniteError(WMDDError, FloatingPointError):
  """A loss or statistic became NaN or Inf."""


class CheckpointError(WMDDError, OSError):
  """A checkpoint that is missing, truncated, corrupt or incompatible."""


class WorkdirError(WMDDError, OSError):
  """A working directory that cannot be used: a file, not writable, full, or in use."""


class WorkdirBusyError(WorkdirError):
  """Another run holds the working directory's lock."""
