"""The side-by-side preview (the image and every map in a row), for ``clients/predict.py`` and ``Predictor``.

Both build it from the maps as PNG-encoded (the gateway's answer, or ``codec``'s PNGs), so
it shows exactly what was saved: label maps in their palette, probabilities as grey,
normals as RGB, depth colour-scaled to its own range (near = bright).
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageOps

PREVIEW_HEIGHT = 256


def panel(kind: str, png: Image.Image) -> Image.Image:
    """A map as an RGB picture for people: depth stretched to its range, the rest as encoded."""
    if kind == "depth":
        depth = np.asarray(png, dtype=np.float64)
        top = max(depth.max(), 1.0)
        grey = Image.fromarray((255 - depth / top * 255).astype(np.uint8))  # near = bright
        return ImageOps.colorize(grey, black="#0b0b3b", white="#ffd000")
    return png.convert("RGB")


def side_by_side(panels: list[tuple[str, Image.Image]]) -> Image.Image:
    """Named pictures scaled to one height and placed left to right, each with its name."""
    scaled = [(name, im.resize((max(1, round(im.width * PREVIEW_HEIGHT / im.height)), PREVIEW_HEIGHT)))
              for name, im in panels]
    sheet = Image.new("RGB", (sum(im.width for _, im in scaled), PREVIEW_HEIGHT), "white")
    draw = ImageDraw.Draw(sheet)
    x = 0
    for name, im in scaled:
        sheet.paste(im, (x, 0))
        draw.text((x + 4, 4), name, fill="white", stroke_width=2, stroke_fill="black")
        x += im.width
    return sheet
