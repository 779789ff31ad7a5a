"""Maps out, step one: from the model's resolution to the size the client asked for.

The contract (tests/test_codec.py checks it against a float64 reference written from these
definitions, on several sizes and all eight EXIF orientations):

* Size: ``original`` (default) = the upload's size after EXIF orientation; ``model`` = the
  model's own output resolution, nothing resampled (for clients that resize themselves);
  a number N = the longest side at most N pixels, aspect ratio kept (each side rounded,
  at least 1), and never larger than the upload: a smaller upload keeps its own size, the
  way a thumbnail does. Every answer states the size it holds.
* Label maps: nearest neighbour with half-pixel centres: output pixel i of an axis takes
  source pixel floor((i + 0.5) * in / out), in exact integer arithmetic (PyTorch's
  ``nearest-exact``). Not OpenCV's ``INTER_NEAREST`` (floor(i * in / out): half a source pixel
  off), nor its ``INTER_NEAREST_EXACT`` or Pillow's NEAREST: both follow this rule but in fixed
  or floating point, so they disagree with it where a sample falls exactly on a border
  between source pixels (128 -> 1080 has one) and OpenCV's drifts by a pixel at large
  enlargements (2 -> 1080). Two numpy gathers are exact and faster than both: the columns
  of the small map, then whole rows (a memcpy each).
* Probability and depth maps: bilinear with half-pixel centres and clamped edges, without
  antialiasing (PyTorch's ``bilinear`` with ``align_corners=False``, as the training code
  upsamples predictions; OpenCV's ``INTER_LINEAR``), in float32, then rounded once to the
  encoding: within half a step of the float64 value (plus float32 round-off).
* Normals: each axis bilinear as above, then renormalised to unit length.

Why OpenCV (``opencv-python-headless``): its resize is SIMD and releases the GIL; Pillow on
float32 planes took 7-30x longer (bench/RESULTS.md, ``bench/imaging.py``).
"""

from __future__ import annotations

from typing import Literal

import cv2
import numpy as np

SizeRequest = Literal["original", "model"] | int
SIZE_HELP = ("original (default): the upload's size after EXIF orientation; model: the model's output "
             "resolution, nothing resampled; N: longest side at most N pixels, aspect ratio kept, never "
             "larger than the upload")
SIZE_PATTERN = r"^(original|model|[1-9][0-9]{0,5})$"


def parse_size(value: str | int | None) -> SizeRequest:
    """``"original"``, ``"model"`` or a positive integer (as text or int) -> the request; else ValueError."""
    if value is None or value == "original":
        return "original"
    if value == "model":
        return "model"
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"size must be original, model or a positive integer, not {value!r}") from None
    if n < 1 or isinstance(value, bool):
        raise ValueError(f"size must be original, model or a positive integer, not {value!r}")
    return n


def output_size(request: SizeRequest, image_hw: tuple[int, int], model_hw: tuple[int, int]) -> tuple[int, int]:
    """(height, width) of the maps for ``request``, given the upload's and the model's sizes."""
    if request == "original":
        return image_hw
    if request == "model":
        return model_hw
    height, width = image_hw
    longest = max(height, width)
    if request >= longest:
        return image_hw
    return max(1, round(height * request / longest)), max(1, round(width * request / longest))


def nearest_index(n_in: int, n_out: int) -> np.ndarray:
    """Source index of each output index on one axis: floor((i + 0.5) * n_in / n_out), exactly."""
    return (2 * np.arange(n_out, dtype=np.int64) + 1) * n_in // (2 * n_out)


def labels(arr: np.ndarray, height: int, width: int) -> np.ndarray:
    """Class indices ``[h, w]`` -> uint8 ``[height, width]``, nearest with half-pixel centres."""
    arr = np.asarray(arr, dtype=np.uint8)
    if arr.shape == (height, width):
        return arr
    columns = arr.take(nearest_index(arr.shape[1], width), axis=1)
    return columns.take(nearest_index(arr.shape[0], height), axis=0)


def continuous(arr: np.ndarray, height: int, width: int) -> np.ndarray:
    """A float map ``[h, w]`` -> float32 ``[height, width]``, bilinear."""
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    return arr if arr.shape == (height, width) else cv2.resize(arr, (width, height), interpolation=cv2.INTER_LINEAR)


def normals(arr: np.ndarray, height: int, width: int) -> np.ndarray:
    """Normals ``[3, h, w]`` -> unit float32 ``[3, height, width]``: bilinear per axis, renormalised.

    Planar all the way (OpenCV's ``magnitude`` and ``divide`` on whole planes, one pass each),
    so no step walks an interleaved ``[H, W, 3]`` array with a stride of three.
    """
    if arr.shape[-2:] == (height, width):
        return np.asarray(arr, dtype=np.float32)
    out = np.empty((3, height, width), np.float32)
    for c in range(3):
        cv2.resize(np.ascontiguousarray(arr[c], dtype=np.float32), (width, height), dst=out[c],
                   interpolation=cv2.INTER_LINEAR)
    length = cv2.magnitude(out[0], out[1])
    cv2.magnitude(length, out[2], magnitude=length)
    np.maximum(length, 1e-12, out=length)
    for c in range(3):
        cv2.divide(out[c], length, dst=out[c])
    return out


def present_classes(arr: np.ndarray, resized: np.ndarray, count: int) -> np.ndarray:
    """Indices of the classes in ``resized`` (nearest-resampled ``arr``), counted on the smaller of the two:
    when no axis shrinks, nearest resampling with half-pixel centres keeps every source pixel."""
    grows = resized.shape[0] >= arr.shape[0] and resized.shape[1] >= arr.shape[1]
    counts = np.bincount((arr if grows else resized).ravel(), minlength=count)
    return np.flatnonzero(counts)
