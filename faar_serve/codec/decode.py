"""Uploads in: the header first, then only as many pixels as the model needs.

Decisions:

* Two steps, so a caller can refuse or budget an image before any pixel is decoded:
  ``probe(data, max_pixels)`` parses the header only (format, size, EXIF orientation) and
  applies the limits there: width x height against ``max_pixels`` (413, which also stops
  decompression bombs; Pillow's own bomb check maps to 413 too). ``Probe.decoded_size(h, w)``
  says, from the header alone, what ``Probe.decode(h, w)`` will return.
* Reduced-scale decoding: a JPEG is decoded by libjpeg-turbo (Pillow's ``draft``) at 1/2,
  1/4 or 1/8 scale in the DCT domain, the smallest scale at which both sides stay at least
  the requested size (the model's input); the reduced inverse DCT averages each block, so
  the antialiased resize that follows sees what it would have seen at full size (the model
  input differs from a full decode by about one grey level on photos: bench/RESULTS.md).
  Pillow's ``draft`` was as fast as simplejpeg, PyTurboJPEG and OpenCV's reduced decoding
  (bench/imaging.py), so no second JPEG library. PNG, WebP, BMP and TIFF have no reduced
  decoding in Pillow (WebP's scaled decoding is not exposed) and decode at full size.
* The model input is then resized with Pillow's bilinear filter, antialiased when
  shrinking, after an integer box reduction where the image is over 3x the target
  (``reducing_gap=3``, Pillow's own fast path for big shrinks).
* EXIF orientation is read from the header and applied to the decoded (reduced) pixels, so
  maps line up with the image as it is displayed. Sizes in the answer are the *original*
  size after orientation, never the reduced one.
* Everything becomes 8-bit RGB: 16-bit grey is scaled by 1/257, transparency is composited
  over white (how the image looks on a page), palette/grey/CMYK images are converted.
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "TIFF")  # JPEG covers MPO, the variant many phones write
FORMAT_NAMES = "JPEG, PNG, WebP, BMP, TIFF"
HIGH_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
ORIENTATION_TAG = 0x0112
DRAFT_SCALES = (8, 4, 2, 1)  # libjpeg's DCT-domain reductions, as Pillow's draft tries them
# What a viewer does to the stored pixels for each EXIF orientation (TIFF/EXIF specification).
ORIENT: dict[int, Image.Transpose | None] = {
    1: None, 2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90,
}


class ImageError(ValueError):
    """An upload that cannot be served; ``status`` is the HTTP answer, ``code`` a stable name."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


def _bomb(exc: Exception) -> ImageError:
    return ImageError(413, "too_many_pixels", f"decompression bomb refused: {exc}")


@dataclass
class Probe:
    """An upload whose header has been read and checked; no pixel is decoded yet."""

    image: Image.Image  # opened lazily by Pillow
    format: str
    orientation: int  # EXIF 1-8 (1 where there is none)
    stored: tuple[int, int]  # (width, height) as stored, from the header (``draft`` changes image.size)

    @property
    def swaps_axes(self) -> bool:
        return self.orientation >= 5  # 5-8 turn the image by 90 degrees

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) as displayed, at full size."""
        width, height = self.stored
        return (width, height) if self.swaps_axes else (height, width)

    def _scale(self, min_height: int, min_width: int) -> int:
        """The DCT-domain reduction ``decode`` will use (Pillow's ``draft`` rule; 1 for non-JPEG)."""
        if self.format != "JPEG" or min_height <= 0 or min_width <= 0:
            return 1
        want_w, want_h = (min_height, min_width) if self.swaps_axes else (min_width, min_height)
        width, height = self.stored
        fits = min(width // want_w, height // want_h)
        return next(s for s in DRAFT_SCALES if fits >= s or s == 1)

    def decoded_size(self, min_height: int = 0, min_width: int = 0) -> tuple[int, int]:
        """(height, width) of ``decode(min_height, min_width)``, known before decoding."""
        s = self._scale(min_height, min_width)
        height, width = self.size
        return -(-height // s), -(-width // s)

    def decode(self, min_height: int = 0, min_width: int = 0) -> np.ndarray:
        """uint8 RGB ``[H, W, 3]`` as displayed, at the smallest scale with both sides at least
        ``min_height`` x ``min_width`` (0: full size). Once per probe: Pillow decodes a file once."""
        im = self.image
        if self._scale(min_height, min_width) > 1:
            want = (min_height, min_width) if self.swaps_axes else (min_width, min_height)
            im.draft("RGB", want)
        try:
            im.load()
            rgb = _to_rgb(im)
        except Image.DecompressionBombError as exc:
            raise _bomb(exc) from exc
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            raise ImageError(422, "corrupt_image", f"truncated or corrupt {self.format} image: {exc}") from exc
        rgb = _orient(rgb, self.orientation)
        if rgb.shape[:2] != self.decoded_size(min_height, min_width):  # Pillow changed its draft rule
            raise RuntimeError(f"decoded {rgb.shape[:2]}, expected {self.decoded_size(min_height, min_width)}")
        return rgb


def probe(data: bytes, max_pixels: int) -> Probe:
    """Bytes of a JPEG/PNG/WebP/BMP/TIFF file -> its header, checked against ``max_pixels``."""
    if not data:
        raise ImageError(400, "empty_file", "the uploaded file is empty")
    try:
        im = Image.open(io.BytesIO(data), formats=FORMATS)
    except Image.DecompressionBombError as exc:
        raise _bomb(exc) from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ImageError(415, "not_an_image", f"not an image in a supported format ({FORMAT_NAMES})") from exc
    width, height = im.size
    if width * height > max_pixels:
        raise ImageError(413, "too_many_pixels",
                         f"image is {width}x{height} = {width * height} pixels; the limit is {max_pixels}")
    if width == 0 or height == 0:
        raise ImageError(422, "corrupt_image", f"image has no pixels ({width}x{height})")
    fmt = "JPEG" if im.format == "MPO" else str(im.format)
    return Probe(im, fmt, _orientation(im), (width, height))


def _orientation(im: Image.Image) -> int:
    """The EXIF orientation from the header. PNG's ``getexif`` would decode the whole image to
    look for an eXIf chunk after the pixels, so there only a chunk before them counts."""
    try:
        if im.format == "PNG" and "exif" not in im.info:
            return 1
        value = im.getexif().get(ORIENTATION_TAG, 1)
    except (OSError, SyntaxError, ValueError, TypeError, KeyError):
        return 1  # unreadable EXIF: show the image as stored
    return value if isinstance(value, int) and value in ORIENT else 1


def _orient(rgb: np.ndarray, orientation: int) -> np.ndarray:
    method = ORIENT[orientation]
    if method is None:
        return rgb
    return np.asarray(Image.fromarray(rgb).transpose(method))


def _to_rgb(im: Image.Image) -> np.ndarray:
    if im.mode == "RGB":
        return np.asarray(im)
    if im.mode in HIGH_BIT_MODES:
        grey = np.clip(np.asarray(im, dtype=np.float64) / 257.0, 0, 255).round().astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if "A" in im.getbands() or "transparency" in im.info:
        rgba = im.convert("RGBA")
        im = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return np.asarray(im.convert("RGB"))


def rgb_array(arr: np.ndarray) -> np.ndarray:
    """uint8 grey ``[H, W]``, RGB or RGBA ``[H, W, 3|4]`` -> uint8 RGB, by the rules above."""
    return arr if arr.ndim == 3 and arr.shape[2] == 3 else _to_rgb(Image.fromarray(arr))


@dataclass
class Prepared:
    """An image ready for the model, and what the answer needs to know about it."""

    pixels: np.ndarray  # uint8 RGB at the model's input size
    image: np.ndarray  # uint8 RGB as displayed, as decoded (at reduced scale for a large JPEG)
    size: tuple[int, int]  # (height, width) of the original as displayed: what size=original means
    decode_ms: float
    resize_ms: float


def prepare(source: Probe | np.ndarray, height: int, width: int) -> Prepared:
    """A probed upload (decoded at the smallest scale that keeps the model's ``height x width``)
    or RGB pixels -> the model's input."""
    t0 = time.perf_counter()
    if isinstance(source, Probe):
        rgb, size = source.decode(height, width), source.size
    else:
        rgb, size = source, source.shape[:2]
    t1 = time.perf_counter()
    pixels = model_input(rgb, height, width)
    t2 = time.perf_counter()
    return Prepared(pixels, rgb, (int(size[0]), int(size[1])), (t1 - t0) * 1000, (t2 - t1) * 1000)


def model_input(rgb: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 RGB to the model's input size (bilinear, antialiased when shrinking)."""
    if rgb.shape[:2] == (height, width):
        return rgb
    im = Image.fromarray(rgb)
    return np.asarray(im.resize((width, height), Image.Resampling.BILINEAR, reducing_gap=3.0))
