"""Uploads in, maps out: the one data path of the gateway, ``Predictor`` and ``faar-predict``.

``decode``  header first (size, format, orientation, limits), then pixels at reduced scale;
``resize``  the size parameter and the resampling contract (conventions, accuracy);
``maps``    each map kind's PNG encoding and NPZ dtype, and what the answer says about it;
``png``     the PNG writer; ``render`` one image's maps, resized then encoded, optionally in
parallel. Each module's docstring holds its decisions.

Resize, no letterbox: the image is stretched to the model's fixed input size and every map
is stretched back, because training resizes each axis on its own (``faar/data/transforms.py``),
so a stretched image is what the model has seen; letterbox bars would be out of
distribution and cost resolution.
"""

from __future__ import annotations

import io

import numpy as np

from .decode import (
    FORMAT_NAMES,
    FORMATS,
    ImageError,
    Prepared,
    Probe,
    model_input,
    prepare,
    probe,
    rgb_array,
)
from .maps import DEPTH_SCALE, NORMALS_CONVENTION, PRECISIONS, Precision, npz_map, png_map, resize_map
from .render import Format, RenderedMaps, encode_maps, render, resize_maps
from .resize import SIZE_HELP, SIZE_PATTERN, SizeRequest, output_size, parse_size

__all__ = [
    "DEPTH_SCALE", "FORMATS", "FORMAT_NAMES", "NORMALS_CONVENTION", "PRECISIONS", "SIZE_HELP", "SIZE_PATTERN",
    "Format", "ImageError", "Precision", "Prepared", "Probe", "RenderedMaps", "SizeRequest",
    "encode_maps", "model_input", "npz_bytes", "npz_map", "output_size", "parse_size", "png_map", "prepare", "probe",
    "render", "resize_map", "resize_maps", "rgb_array",
]


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """Arrays in one uncompressed NPZ: deflate gains under 2x on float maps at a cost of
    more than the whole rest of the request (bench/RESULTS.md), so none."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()
