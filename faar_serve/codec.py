"""Uploads in, maps out: image decoding with limits, resizing, PNG/NPZ encoding.

Decisions:

* Resize, no letterbox: the image is stretched to the model's fixed input size and every
  map is stretched back to the original size, because training resizes each axis on its
  own (``faar/data/transforms.py``), so a stretched image is what the model has seen;
  letterbox bars would be out of distribution and cost resolution. The image is resized
  with Pillow's bilinear filter (antialiased when shrinking), label maps back with nearest
  neighbour, continuous maps bilinearly, normals bilinearly and then renormalised.
* EXIF orientation is applied first, so maps line up with the image as it is displayed.
* Everything becomes 8-bit RGB: 16-bit grey is scaled by 1/257, transparency is composited
  over white (how the image looks on a page), palette/grey/CMYK images are converted.
* Limits before pixels are decoded: the header's width x height against ``max_pixels``
  (413), which also stops decompression bombs; Pillow's own bomb check maps to 413 too.
* PNG encodings (all lossless at the stated precision):
  labels   palette PNG, pixel = class index, palette and class names in the answer;
  [0, 1]   8-bit grey, value = pixel / 255;
  depth    16-bit grey, value = pixel * 0.001 (millimetre steps, 65.535 m at most);
  normals  RGB, pixel = round((n + 1) / 2 * 255) per axis (x right, y up, z to the camera).
"""

from __future__ import annotations

import base64
import io
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .manifest import TaskInfo

FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "TIFF")  # JPEG covers MPO, the variant many phones write
FORMAT_NAMES = "JPEG, PNG, WebP, BMP, TIFF"
DEPTH_SCALE = 0.001  # depth PNG step in the task's units (millimetres for metres)
UINT16_MAX = 65535
NORMALS_CONVENTION = "pixel = round((n + 1) / 2 * 255) per axis"
HIGH_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


class ImageError(ValueError):
    """An upload that cannot be served; ``status`` is the HTTP answer, ``code`` a stable name."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


def decode_image(data: bytes, max_pixels: int) -> np.ndarray:
    """Bytes of a JPEG/PNG/WebP/BMP/TIFF file -> uint8 RGB ``[H, W, 3]`` as displayed."""
    if not data:
        raise ImageError(400, "empty_file", "the uploaded file is empty")
    try:
        im = Image.open(io.BytesIO(data), formats=FORMATS)
    except Image.DecompressionBombError as exc:
        raise ImageError(413, "too_many_pixels", f"decompression bomb refused: {exc}") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ImageError(415, "not_an_image", f"not an image in a supported format ({FORMAT_NAMES})") from exc
    width, height = im.size
    if width * height > max_pixels:
        raise ImageError(413, "too_many_pixels",
                         f"image is {width}x{height} = {width * height} pixels; the limit is {max_pixels}")
    if width == 0 or height == 0:
        raise ImageError(422, "corrupt_image", f"image has no pixels ({width}x{height})")
    try:
        im.load()
        return _to_rgb(ImageOps.exif_transpose(im))
    except Image.DecompressionBombError as exc:
        raise ImageError(413, "too_many_pixels", f"decompression bomb refused: {exc}") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageError(422, "corrupt_image", f"truncated or corrupt {im.format} image: {exc}") from exc


def _to_rgb(im: Image.Image) -> np.ndarray:
    if im.mode in HIGH_BIT_MODES:
        grey = np.clip(np.asarray(im, dtype=np.float64) / 257.0, 0, 255).round().astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if "A" in im.getbands() or "transparency" in im.info:
        rgba = im.convert("RGBA")
        im = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return np.asarray(im.convert("RGB"))


def resize_image(rgb: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 RGB to the model's input size (bilinear; antialiased when shrinking)."""
    if rgb.shape[:2] == (height, width):
        return rgb
    return np.asarray(Image.fromarray(rgb).resize((width, height), Image.Resampling.BILINEAR))


def _resize_plane(plane: np.ndarray, height: int, width: int, resample: Image.Resampling) -> np.ndarray:
    return np.asarray(Image.fromarray(plane).resize((width, height), resample))


def resize_map(kind: str, arr: np.ndarray, height: int, width: int) -> np.ndarray:
    """One task's map (model layout: ``[h, w]``, normals ``[3, h, w]``) to ``height x width``."""
    if arr.shape[-2:] == (height, width):
        return arr
    if kind == "labels":
        return _resize_plane(arr, height, width, Image.Resampling.NEAREST)
    if kind == "normals":
        planes = arr.astype(np.float32)
        n = np.stack([_resize_plane(c, height, width, Image.Resampling.BILINEAR) for c in planes])
        return n / np.maximum(np.linalg.norm(n, axis=0, keepdims=True), 1e-12)
    return _resize_plane(arr.astype(np.float32), height, width, Image.Resampling.BILINEAR)


def png_bytes(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG", compress_level=1)  # maps compress well even at level 1; speed matters more
    return buf.getvalue()


def encode_map(task: TaskInfo, arr: np.ndarray) -> dict[str, Any]:
    """A map at output size -> the JSON fields of its answer (base64 PNG and how to read it)."""
    if task.kind == "labels":
        im = Image.fromarray(arr.astype(np.uint8))
        im.putpalette([v for rgb in task.palette for v in rgb])
        counts = np.bincount(arr.ravel(), minlength=len(task.classes))  # faster than np.unique
        present = [task.classes[i] for i in np.flatnonzero(counts) if i < len(task.classes)]
        fields: dict[str, Any] = {"encoding": "png-palette", "classes": list(task.classes),
                                  "palette": [list(c) for c in task.palette], "classes_present": present}
    elif task.kind == "normals":
        rgb = np.clip((arr + 1) * 127.5, 0, 255).round().astype(np.uint8)
        im = Image.fromarray(np.ascontiguousarray(rgb.transpose(1, 2, 0)))
        fields = {"encoding": "png-rgb", "convention": f"{task.description}; {NORMALS_CONVENTION}"}
    elif task.kind == "depth":
        im = Image.fromarray(np.clip(arr / DEPTH_SCALE, 0, UINT16_MAX).round().astype(np.uint16))
        fields = {"encoding": "png-16bit", "scale": DEPTH_SCALE, "units": task.units,
                  "min": float(arr.min()), "max": float(arr.max())}
    else:
        im = Image.fromarray((np.clip(arr, 0, 1) * 255).round().astype(np.uint8))
        fields = {"encoding": "png-8bit", "scale": 1 / 255, "range": [0.0, 1.0]}
    return {"kind": task.kind, "description": task.description, **fields,
            "png": base64.b64encode(png_bytes(im)).decode("ascii")}


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """Exact arrays in one uncompressed NPZ (maps compress poorly as floats; speed wins)."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()
