"""Results as files: image grids and curves as PNG, metrics as JSON (written atomically)."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

_COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
            (140, 86, 75)]


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


def save_curves(path: str | os.PathLike,
                panels: Sequence[tuple[str, Mapping[str, tuple[Sequence[float], Sequence[float]]]]],
                *, width: int = 420, height: int = 260) -> None:
  """Draws simple line charts side by side (no plotting library needed).

  Args:
    path: the PNG to write.
    panels: (title, {series name: (x values, y values)}) per panel; NaNs are skipped.
    width, height: size of each panel in pixels.
  """
  img = Image.new("RGB", (width * max(1, len(panels)), height), "white")
  draw = ImageDraw.Draw(img)
  for p, (title, series) in enumerate(panels):
    x0, left, top, right, bottom = p * width, 52, 22, 12, 30
    box = (x0 + left, top, x0 + width - right, height - bottom)
    draw.rectangle(box, outline="black")
    draw.text((x0 + left, 4), title, fill="black")
    pts = [(np.asarray(x, float), np.asarray(y, float)) for x, y in series.values()]
    finite = [(x[np.isfinite(y)], y[np.isfinite(y)]) for x, y in pts]
    xs = np.concatenate([x for x, _ in finite]) if finite else np.zeros(0)
    ys = np.concatenate([y for _, y in finite]) if finite else np.zeros(0)
    if xs.size == 0:
      continue
    xmin, xmax = float(xs.min()), float(xs.max()) or 1.0
    ymin, ymax = float(ys.min()), float(ys.max())
    if xmax == xmin:
      xmax = xmin + 1.0
    if ymax == ymin:
      ymax = ymin + 1.0
    draw.text((x0 + 2, top), f"{ymax:.3g}", fill="black")
    draw.text((x0 + 2, box[3] - 10), f"{ymin:.3g}", fill="black")
    draw.text((box[0], box[3] + 4), f"{xmin:.3g}", fill="black")
    draw.text((box[2] - 30, box[3] + 4), f"{xmax:.3g}", fill="black")
    for i, (name, (x, y)) in enumerate(zip(series, finite)):
      colour = _COLOURS[i % len(_COLOURS)]
      px = box[0] + (x - xmin) / (xmax - xmin) * (box[2] - box[0])
      py = box[3] - (y - ymin) / (ymax - ymin) * (box[3] - box[1])
      line = list(zip(px.tolist(), py.tolist()))
      if len(line) > 1:
        draw.line(line, fill=colour, width=2)
      elif line:
        draw.ellipse((line[0][0] - 2, line[0][1] - 2, line[0][0] + 2, line[0][1] + 2), fill=colour)
      draw.text((box[0] + 6, box[1] + 4 + 12 * i), name, fill=colour)
  img.save(os.fspath(path))
