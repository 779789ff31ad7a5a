"""Photo-like test images for the data-path benchmarks: what a camera writes, not flat colour.

Decoders and PNG encoders are sensitive to content (flat colour decodes and compresses far
faster than a photo), so every benchmark of the data path uses these: smooth colour
regions (a bicubic-enlarged coarse random field) over a lighting gradient, oriented
texture whose strength varies across the frame, and sensor-like noise; saved as a
baseline JPEG at quality 90 with 4:2:0 chroma subsampling, as phones do.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

UPLOADS = {  # the four uploads of issue 13: name -> (height, width, format)
    "320x240 PNG": (240, 320, "PNG"),
    "1280x720 JPEG": (720, 1280, "JPEG"),
    "1920x1080 JPEG": (1080, 1920, "JPEG"),
    "4032x3024 JPEG": (3024, 4032, "JPEG"),
}


def photo_like(height: int, width: int, seed: int = 0) -> np.ndarray:
    """uint8 RGB ``[height, width, 3]``: regions + gradient + texture + noise."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(30, 226, (6, 8, 3), dtype=np.uint8)
    regions = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC), np.float32)
    y = np.linspace(0, 1, height, dtype=np.float32)[:, None]
    x = np.linspace(0, 1, width, dtype=np.float32)[None, :]
    light = 0.75 + 0.35 * (0.6 * x + 0.4 * (1 - y))  # brighter towards one corner
    texture = np.zeros((height, width), np.float32)
    for _ in range(4):  # oriented gratings at a few scales, each fading in over part of the frame
        angle, period = rng.uniform(0, np.pi), rng.uniform(4, 40)
        phase = (x * np.cos(angle) * width + y * np.sin(angle) * height) * (2 * np.pi / period)
        texture += np.sin(phase) * np.clip(rng.uniform(-1, 1) + x * rng.uniform(-1, 2) + y, 0, 1) * 14
    noise = rng.normal(0, 5, (height, width, 3)).astype(np.float32)
    out = regions * light[..., None] + texture[..., None] + noise
    return np.clip(out, 0, 255).astype(np.uint8)


def encoded(rgb: np.ndarray, fmt: str = "JPEG", orientation: int | None = None) -> bytes:
    """``rgb`` as a file: JPEG (quality 90, 4:2:0) or PNG; ``orientation`` adds an EXIF tag.

    With an orientation, ``rgb`` is what is *displayed*: the stored pixels are transformed
    so that a viewer applying the tag shows ``rgb``.
    """
    im = Image.fromarray(rgb)
    params: dict = {"quality": 90, "subsampling": "4:2:0"} if fmt == "JPEG" else {"compress_level": 1}
    if orientation is not None:
        im = im.transpose(STORE[orientation]) if STORE[orientation] is not None else im
        exif = Image.Exif()
        exif[0x0112] = orientation
        params["exif"] = exif
    buf = io.BytesIO()
    im.save(buf, format=fmt, **params)
    return buf.getvalue()


# The inverse of what each EXIF orientation asks a viewer to do (Pillow's exif_transpose table).
STORE: dict[int, Image.Transpose | None] = {
    1: None,
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}


def upload(name: str, seed: int = 0) -> bytes:
    height, width, fmt = UPLOADS[name]
    return encoded(photo_like(height, width, seed), fmt)
