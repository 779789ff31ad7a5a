"""Send images to the FAAR gateway; save every map as PNG next to a side-by-side preview.

    python -m clients.predict photo.jpg street.png --url http://127.0.0.1:8080 --out predictions/

writes, per image, ``OUT/<stem>.<task>.png`` (the gateway's PNG as it came: palette label
maps, 8-bit probabilities, 16-bit depth in millimetres, RGB normals) and
``OUT/<stem>.preview.png`` (the image and every map side by side, depth colour-scaled).

The same request with curl (the answer is JSON with base64 PNGs; ``format=npz`` gives the
exact arrays instead):

    curl -s -F image=@photo.jpg 'http://127.0.0.1:8080/v1/predict?tasks=semseg,depth'

Needs httpx, numpy and Pillow; exits 1 if any image failed.
"""

from __future__ import annotations

import argparse
import base64
import io
import sys
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image, ImageDraw, ImageOps

PREVIEW_HEIGHT = 256


def panel(task: dict[str, Any], png: Image.Image) -> Image.Image:
    """A map as an RGB picture for people: depth stretched to its range, the rest as encoded."""
    if task["kind"] == "depth":
        depth = np.asarray(png, dtype=np.float64)
        top = max(depth.max(), 1.0)
        grey = Image.fromarray((255 - depth / top * 255).astype(np.uint8))  # near = bright
        return ImageOps.colorize(grey, black="#0b0b3b", white="#ffd000")
    return png.convert("RGB")


def side_by_side(panels: list[tuple[str, Image.Image]]) -> Image.Image:
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


def predict_one(http: httpx.Client, path: Path, out: Path, tasks: str | None) -> list[Path]:
    params = {"tasks": tasks} if tasks else {}
    with path.open("rb") as f:
        response = http.post("/v1/predict", params=params, files={"image": (path.name, f)})
    if response.status_code != 200:
        raise RuntimeError(f"HTTP {response.status_code}: {response.text}")
    answer = response.json()
    original = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
    written, panels = [], [("image", original)]
    for name, task in answer["tasks"].items():
        data = base64.b64decode(task["png"])
        target = out / f"{path.stem}.{name}.png"
        target.write_bytes(data)
        written.append(target)
        panels.append((name, panel(task, Image.open(io.BytesIO(data)))))
    preview = out / f"{path.stem}.preview.png"
    side_by_side(panels).save(preview)
    timings = ", ".join(f"{k} {v:.1f} ms" for k, v in answer["timings_ms"].items())
    print(f"{path}: {answer['width']}x{answer['height']}, {len(written)} maps -> {out} ({timings})")
    return [*written, preview]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("images", nargs="+", type=Path, metavar="IMAGE")
    parser.add_argument("--url", default="http://127.0.0.1:8080", help="the gateway")
    parser.add_argument("--out", type=Path, default=Path("predictions"), help="folder for the PNGs")
    parser.add_argument("--tasks", help="comma-separated subset, e.g. semseg,depth")
    parser.add_argument("--api-key", help="if the gateway runs with one")
    parser.add_argument("--timeout", type=float, default=60.0)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    failed = 0
    with httpx.Client(base_url=args.url, headers=headers, timeout=args.timeout) as http:
        for path in args.images:
            try:
                predict_one(http, path, args.out, args.tasks)
            except (OSError, RuntimeError, httpx.HTTPError) as exc:
                failed += 1
                print(f"{path}: failed: {exc}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
