"""Results as files: image grids as PNG, curves as PNG (matplotlib), metrics as JSON (written
atomically)."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image


def write_json(path: str | os.PathLike, data: Mapping[str, Any]) -> None:
  """Writes JSON atomically (temporary file + rename), so a killed run never leaves half a file."""
  path = os.fspath(path)
  tmp = f"{path}.tmp-{os.getpid()}"
  try:
    with open(tmp, "w") as f:
      json.dump(data, f, indent=2, sort_keys=True, default=jsonable)
      f.write("\n")
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):  # a failed write (full disk, ...) leaves no temporary behind
      try:
        os.remove(tmp)
      except OSError:
        pass


def jsonable(value: Any) -> Any:
  """``json.dump``'s ``default``: numpy scalars as numbers, arrays as lists, the rest as str."""
  if isinstance(value, np.generic):
    return value.item()
  if isinstance(value, np.ndarray):
    return value.tolist()
  return str(value)


def image_grid(pixels: np.ndarray, *, max_classes: int = 20, max_per_class: int = 10,
               scale: int = 0, pad: int = 1) -> np.ndarray:
  """Tiles images into rows of classes.

  Args:
    pixels: f32[C, k, H, W, ch] in [0, 1] (clipped here).
    max_classes: rows shown (evenly spaced classes when C is larger).
    max_per_class: columns shown.
    scale: integer upscaling of each image; 0 picks one so tiles are at least 32 px.
    pad: pixels between tiles.

  Returns:
    u8[rows, cols, 3] image.
  """
  c, k, h, w, ch = pixels.shape
  rows = np.linspace(0, c - 1, min(c, max_classes)).round().astype(int)
  cols = min(k, max_per_class)
  scale = scale or max(1, math.ceil(32 / max(h, w)))
  tile = np.clip(pixels[rows][:, :cols], 0.0, 1.0)
  tile = np.repeat(np.repeat(tile, scale, axis=2), scale, axis=3)
  if ch == 1:
    tile = np.repeat(tile, 3, axis=-1)
  th, tw = h * scale, w * scale
  out = np.full((len(rows) * (th + pad) + pad, cols * (tw + pad) + pad, 3), 255, np.uint8)
  for i in range(len(rows)):
    for j in range(cols):
      y, x = pad + i * (th + pad), pad + j * (tw + pad)
      out[y:y + th, x:x + tw] = np.rint(tile[i, j, ..., :3] * 255).astype(np.uint8)
  return out


def save_grid(path: str | os.PathLike, pixels: np.ndarray, **kwargs: Any) -> None:
  """Writes :func:`image_grid` of ``pixels`` f32[C, k, H, W, ch] in [0, 1] as a PNG."""
  Image.fromarray(image_grid(pixels, **kwargs)).save(os.fspath(path))


def smooth(values: Sequence[float], window: int) -> np.ndarray:
  """Centred moving average over ``window`` points (shrinking at the ends), NaNs ignored.

  Returns:
    f64[n]: NaN where the window holds no finite value.
  """
  y = np.asarray(values, np.float64)
  finite = np.isfinite(y)
  half = max(int(window), 1) // 2
  sums = np.concatenate([[0.0], np.cumsum(np.where(finite, y, 0.0))])
  counts = np.concatenate([[0], np.cumsum(finite)])
  idx = np.arange(y.size)
  lo, hi = np.maximum(idx - half, 0), np.minimum(idx + half + 1, y.size)
  n = counts[hi] - counts[lo]
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(n > 0, (sums[hi] - sums[lo]) / np.maximum(n, 1), np.nan)


# Series with at least this many points are drawn smoothed, the raw curve faint behind.
SMOOTH_FROM = 50


def _log_scale_helps(ys: Sequence[np.ndarray]) -> bool:
  """Positive values spanning more than a factor of 20."""
  values = np.concatenate([y[np.isfinite(y)] for y in ys]) if ys else np.zeros(0)
  return bool(values.size and values.min() > 0 and values.max() / values.min() > 20)


def save_curves(path: str | os.PathLike,
                panels: Sequence[tuple[Any, ...]],
                *, width: int = 480, height: int = 340) -> None:
  """Line charts side by side, drawn with matplotlib (written atomically).

  Series with at least :data:`SMOOTH_FROM` points are drawn smoothed (a centred moving average
  over about 1/25 of the points), the raw curve faint behind; the y axis is logarithmic where
  positive values span more than a factor of 20, unless the panel says otherwise; axes show
  plain integers (no offsets, no "1e+03").

  Args:
    path: the PNG to write.
    panels: ``(title, {series name: (x values, y values)})`` or ``(title, series, options)``
      per panel, options a dict of ``xlabel``, ``ylabel``, ``yscale`` ("auto", "linear",
      "log") and ``smooth`` (None: by length, True, False). NaNs are gaps.
    width, height: size of each panel in pixels (at 100 dpi).
  """
  # Imported when a figure is drawn (about a second); the Agg canvas needs no display and no
  # pyplot state.
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415
  from matplotlib.figure import Figure  # noqa: PLC0415
  from matplotlib.ticker import MaxNLocator, ScalarFormatter  # noqa: PLC0415

  count = max(1, len(panels))
  fig = Figure(figsize=(width * count / 100, height / 100), dpi=100, layout="constrained")
  FigureCanvasAgg(fig)
  colours = [f"C{i}" for i in range(10)]
  for p, panel in enumerate(panels):
    title, series = panel[0], panel[1]
    options = dict(panel[2]) if len(panel) > 2 and panel[2] else {}
    ax = fig.add_subplot(1, count, p + 1)
    ax.set_title(str(title), fontsize=10)
    curves = [(str(name), np.asarray(x, np.float64).reshape(-1),
               np.asarray(y, np.float64).reshape(-1)) for name, (x, y) in series.items()]
    curves = [(n, x, y) for n, x, y in curves if np.isfinite(y).any()]
    for i, (name, x, y) in enumerate(curves):
      colour = colours[i % len(colours)]
      smoothed = options.get("smooth")
      if smoothed is None:
        smoothed = np.isfinite(y).sum() >= SMOOTH_FROM
      if smoothed:
        ax.plot(x, y, color=colour, alpha=0.25, linewidth=0.8)
        ax.plot(x, smooth(y, max(3, y.size // 25)), color=colour, linewidth=1.8, label=name)
      else:
        marker = "o" if np.isfinite(y).sum() <= 30 else None
        ax.plot(x, y, color=colour, linewidth=1.6, marker=marker, markersize=3.5, label=name)
    scale = options.get("yscale", "auto")
    if scale == "log" or (scale == "auto" and _log_scale_helps([y for _, _, y in curves])):
      ax.set_yscale("log")
    else:
      formatter = ScalarFormatter(useOffset=False)
      formatter.set_scientific(False)
      ax.yaxis.set_major_formatter(formatter)
    xformatter = ScalarFormatter(useOffset=False)
    xformatter.set_scientific(False)
    ax.xaxis.set_major_formatter(xformatter)
    ax.xaxis.set_major_locator(MaxNLocator(nbins=6, integer=True, steps=[1, 2, 2.5, 5, 10]))
    ax.set_xlabel(options.get("xlabel", ""))
    ax.set_ylabel(options.get("ylabel", ""))
    ax.grid(True, which="major", alpha=0.3)
    ax.tick_params(labelsize=8)
    if curves:
      ax.legend(fontsize=8, frameon=False)
    else:
      ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center")
  path = os.fspath(path)
  tmp = f"{path}.tmp-{os.getpid()}"
  try:
    fig.savefig(tmp, format="png", dpi=100)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
