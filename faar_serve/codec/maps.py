"""Maps out, step two: a resized map in its encoding, with what a client needs to read it.

PNG encodings (all lossless at the stated precision; values are rounded once, from float32):
  labels       palette PNG, pixel = class index, palette and class names in the answer;
  probability  8-bit grey, value = pixel / 255;
  depth        16-bit grey, value = pixel * 0.001 (millimetre steps, 65.535 m at most);
  normals      RGB, pixel = round((n + 1) / 2 * 255) per axis (x right, y up, z to the camera).
NPZ arrays (``format=npz``): label maps uint8 class indices; every other map float16 by
default, float32 with ``precision=float32``; normals as ``[3, H, W]``. float16 has 11
significant bits, so it holds a value to within 2^-11 of its magnitude: depth at 10 m to
within 4 mm (16 mm at 60 m), a probability or a normal component to within 2.5e-4. That is
finer than the PNG's 8-bit step (1/255) for probabilities and normals; for depth it is finer
than the PNG's millimetre below 2 m and coarser beyond (ask for float32 there).
"""

from __future__ import annotations

from typing import Any, Literal

import cv2
import numpy as np
from zlib_ng import zlib_ng

from ..manifest import TaskInfo
from . import resize
from .png import FILTER_UP, png

DEPTH_SCALE = 0.001  # depth PNG step in the task's units (millimetres for metres)
NORMALS_CONVENTION = "pixel = round((n + 1) / 2 * 255) per axis"
Precision = Literal["float16", "float32"]
PRECISIONS: tuple[Precision, ...] = ("float16", "float32")


def resize_map(kind: str, arr: np.ndarray, height: int, width: int) -> np.ndarray:
    """One map of task kind ``kind`` (model output ``[h, w]``, normals ``[3, h, w]``) at
    ``height x width``: labels uint8, other maps float32 (the exact values every encoding is
    rounded from). ``faar-eval`` resizes exported maps to the label's size with it too."""
    if kind == "labels":
        return resize.labels(arr, height, width)
    if kind == "normals":
        return resize.normals(arr, height, width)
    return resize.continuous(arr, height, width)


def png_map(task: TaskInfo, model_map: np.ndarray, resized: np.ndarray) -> tuple[bytes, dict[str, Any]]:
    """A resized map -> (its PNG, the answer's fields saying how to read it). ``model_map`` is the
    model's output it came from (class presence and depth range are read there: cheaper, same answer)."""
    fields: dict[str, Any] = {"kind": task.kind, "description": task.description}
    if task.kind == "labels":
        present = resize.present_classes(model_map, resized, len(task.classes))
        fields.update(encoding="png-palette", classes=list(task.classes), palette=[list(c) for c in task.palette],
                      classes_present=[task.classes[i] for i in present if i < len(task.classes)])
        return png(resized, task.palette, FILTER_UP, zlib_ng.Z_RLE), fields
    if task.kind == "normals":
        # |n * 127.5 + 127.5| rounded and saturated: n >= -1, so the absolute value changes nothing.
        rgb = cv2.merge([cv2.convertScaleAbs(c, alpha=127.5, beta=127.5) for c in resized])
        fields.update(encoding="png-rgb", convention=f"{task.description}; {NORMALS_CONVENTION}")
        return png(rgb), fields
    if task.kind == "depth":
        fields.update(encoding="png-16bit", scale=DEPTH_SCALE, units=task.units,
                      min=float(np.min(model_map)), max=float(np.max(model_map)))
        return png(cv2.multiply(resized, 1 / DEPTH_SCALE, dtype=cv2.CV_16U)), fields  # rounded, clipped
    fields.update(encoding="png-8bit", scale=1 / 255, range=[0.0, 1.0])
    return png(cv2.multiply(resized, 255.0, dtype=cv2.CV_8U)), fields  # rounded, clipped to [0, 255]


def npz_map(task: TaskInfo, resized: np.ndarray, precision: Precision = "float16") -> np.ndarray:
    """A resized map as the NPZ answer holds it."""
    if task.kind == "labels" or precision == "float32":
        return resized
    # OpenCV's F16C conversion (round to nearest even, as numpy's astype) is 40x numpy's loop.
    return cv2.convertFp16(resized).view(np.float16)
