"""What one image costs the gateway in memory at its peak, known from its header before any pixel is decoded.

Admission (``admission``) budgets bytes, not images: a 35 KB PNG declaring 6000x6000 costs
as much as a thousand photos of phone size (issue 14). The cost is the larger of the two
phases an image goes through, each counted with every copy that exists at once:

* decode: the upload's bytes, the decoded pixels (at the reduced scale the decoder will
  use: ``codec.Probe.decoded_size``, known from the header) three times over (the
  decoder's image, a mode conversion, the numpy array), and the model's input;
* render: the upload's bytes, the model's outputs for the image, and at the answer's size
  (``codec.output_size``) every map asked for, resized (labels uint8, other maps float32 per channel, all held
  until the answer is encoded), the largest temporary of one resize (normals: the
  unnormalised planes and their length), and the encoded answer: for JSON each 8/16-bit
  plane, its PNG (no smaller than the plane, at worst), its base64 (4/3) and the JSON text
  that holds it (4/3 again); for NPZ each array in its NPZ dtype twice (the converted array,
  the archive's buffer; ``BytesIO.getvalue`` hands that buffer over without a copy).

These are upper bounds (PNG compresses maps well), so the budget errs on the side of the
machine: for a 6000x6000 upload with ``format=npz&precision=float32`` this says 3.4 GB, and
the gateway's peak RSS grew by 1.5 GB (bench/RESULTS.md, "Overload").
"""

from __future__ import annotations

import math

from .manifest import ModelSpec

DECODE_COPIES = 3
JSON_FACTOR = 1 + 1 + 4 / 3 + 4 / 3  # plane, PNG, base64, JSON text
NPZ_COPIES = 2
CHANNELS = {"normals": 3}  # every other kind has one channel
RESIZE_TEMPORARY = {"normals": 16, "labels": 1}  # bytes per pixel of one resize's temporaries (float maps: 4)
PNG_PLANE_BYTES = {"labels": 1, "probability": 1, "depth": 2, "normals": 3}  # codec.maps' PNG encodings
OUTPUT_DTYPE_BYTES = {"uint8": 1, "float32": 4}


def map_bytes_per_pixel(kind: str, fmt: str, npz_value_bytes: int) -> float:
    """Bytes one task's map holds per pixel of the answer: resized, plus encoded in ``fmt``."""
    channels = CHANNELS.get(kind, 1)
    resized = 1 if kind == "labels" else 4 * channels
    if fmt == "npz":
        return resized + NPZ_COPIES * (1 if kind == "labels" else npz_value_bytes * channels)
    return resized + JSON_FACTOR * PNG_PLANE_BYTES[kind]


def resize_temporary(kinds: list[str]) -> int:
    return max(RESIZE_TEMPORARY.get(k, 4) for k in kinds)


def output_bytes(spec: ModelSpec) -> int:
    """The model's outputs for one image (every output: the engine returns them all)."""
    return sum(math.prod(o.shape[1:]) * OUTPUT_DTYPE_BYTES[o.dtype] for o in spec.manifest.outputs)


def image_cost(*, upload_bytes: int, decoded_hw: tuple[int, int], output_hw: tuple[int, int], spec: ModelSpec,
               tasks: list[str], fmt: str, npz_value_bytes: int = 4) -> int:
    """Peak bytes of one image (see the module docstring)."""
    model_input = spec.height * spec.width * 3
    decode = DECODE_COPIES * decoded_hw[0] * decoded_hw[1] * 3 + model_input
    kinds = [spec.tasks[t].kind for t in tasks]
    per_pixel = sum(map_bytes_per_pixel(k, fmt, npz_value_bytes) for k in kinds) + resize_temporary(kinds)
    render = output_bytes(spec) + output_hw[0] * output_hw[1] * per_pixel
    return int(upload_bytes + max(decode, render))

