"""PNG files of maps, written fast: one fixed filter per map kind and zlib-ng's fastest deflate.

Why not Pillow or libpng: both choose a filter per row by trying all five (the adaptive
heuristic), which is most of their time on maps, and Pillow runs stock zlib speeds at
level 1. Maps need no search: upsampled maps are locally linear, so one fixed filter
(``up`` for label maps, whose nearest-upsampled rows repeat and become zero rows;
``sub`` for the rest) with zlib-ng at level 1 writes files of the same size or smaller
many times faster (bench/RESULTS.md: Pillow, OpenCV's ``imencode`` with each strategy,
imagecodecs' libpng and libspng, fpng, and this). RGB (normals) goes to fpng, a dedicated
fast encoder of 8-bit RGB(A), which was faster still. What is written here is only the PNG
container (signature, IHDR, PLTE, one IDAT, IEND: PNG specification, section 5) around
numpy's filter and zlib-ng's deflate; every file is read back bit-exact by Pillow in the
tests and by browsers (the web page decodes it itself).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

import fpng
import numpy as np
from zlib_ng import zlib_ng

SIGNATURE = b"\x89PNG\r\n\x1a\n"
FILTER_SUB, FILTER_UP = 1, 2
GREY, RGB, PALETTE = 0, 2, 3  # PNG colour types
LEVEL = 1


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib_ng.crc32(data, zlib_ng.crc32(kind)))


def _filtered(rows: np.ndarray, bpp: int, kind: int) -> np.ndarray:
    """Byte rows ``[H, stride]`` -> ``[H, 1 + stride]`` with the PNG filter byte and filtered bytes."""
    height, stride = rows.shape
    out = np.empty((height, stride + 1), np.uint8)
    if kind == FILTER_UP:  # each byte minus the byte above (the first row has nothing above: no filter)
        out[:, 0] = FILTER_UP
        out[0, 0] = 0
        out[0, 1:] = rows[0]
        np.subtract(rows[1:], rows[:-1], out=out[1:, 1:])
    else:  # each byte minus the same byte of the pixel to the left
        out[:, 0] = FILTER_SUB
        out[:, 1:bpp + 1] = rows[:, :bpp]
        np.subtract(rows[:, bpp:], rows[:, :-bpp], out=out[:, bpp + 1:])
    return out


def png(pixels: np.ndarray, palette: Sequence[Sequence[int]] | None = None, filter_kind: int = FILTER_SUB,
        strategy: int = zlib_ng.Z_DEFAULT_STRATEGY) -> bytes:
    """uint8 ``[H, W]`` (grey, or class indices with ``palette``), uint16 ``[H, W]`` (16-bit grey) or
    uint8 ``[H, W, 3]`` (RGB) -> a PNG file."""
    if pixels.ndim == 3:
        if pixels.dtype != np.uint8 or pixels.shape[2] != 3:
            raise ValueError(f"RGB PNG needs uint8 [H, W, 3], got {pixels.dtype} {pixels.shape}")
        return fpng.from_ndarray(np.ascontiguousarray(pixels))
    height, width = pixels.shape
    if pixels.dtype == np.uint16:
        depth, rows = 16, pixels.astype(">u2").view(np.uint8).reshape(height, 2 * width)  # PNG is big-endian
    elif pixels.dtype == np.uint8:
        depth, rows = 8, np.ascontiguousarray(pixels)
    else:
        raise ValueError(f"grey PNG needs uint8 or uint16, got {pixels.dtype}")
    colour = GREY if palette is None else PALETTE
    compressor = zlib_ng.compressobj(LEVEL, zlib_ng.DEFLATED, 15, 9, strategy)
    data = compressor.compress(_filtered(rows, depth // 8, filter_kind)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)  # deflate, filtering 0, no interlace
    chunks = [_chunk(b"IHDR", header)]
    if palette is not None:
        chunks.append(_chunk(b"PLTE", bytes(v for rgb in palette for v in rgb)))
    return SIGNATURE + b"".join([*chunks, _chunk(b"IDAT", data), _chunk(b"IEND", b"")])
