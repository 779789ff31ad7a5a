"""Send images to the FAAR gateway; save every map as PNG next to a side-by-side preview.

    python -m clients.predict photo.jpg street.png --url http://127.0.0.1:8080 --out predictions/

writes, per image, ``OUT/<stem>.<task>.png`` (the gateway's PNG as it came: palette label
maps, 8-bit probabilities, 16-bit depth in millimetres, RGB normals) and
``OUT/<stem>.preview.png`` (the image and every map side by side, depth colour-scaled).

The same request with curl (the answer is JSON with base64 PNGs; ``format=npz`` gives the
exact arrays instead):

    curl -s -F image=@photo.jpg 'http://127.0.0.1:8080/v1/predict?tasks=semseg,depth'

Needs httpx, Pillow and ``faar_serve`` (its preview); exits 1 if any image failed. Without a
server, ``faar-predict`` writes the same files from a model repository directly.
"""

from __future__ import annotations

import argparse
import base64
import io
import sys
from pathlib import Path

import httpx
from PIL import Image, ImageOps

from faar_serve.preview import panel, side_by_side


def predict_one(http: httpx.Client, path: Path, out: Path, tasks: str | None, size: str = "original") -> list[Path]:
    params = {"size": size, **({"tasks": tasks} if tasks else {})}
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
        panels.append((name, panel(task["kind"], Image.open(io.BytesIO(data)))))
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
    parser.add_argument("--size", default="original",
                        help="original (the image's size), model (the model's resolution) or a longest side in pixels")
    parser.add_argument("--api-key", help="if the gateway runs with one")
    parser.add_argument("--timeout", type=float, default=60.0)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    failed = 0
    with httpx.Client(base_url=args.url, headers=headers, timeout=args.timeout) as http:
        for path in args.images:
            try:
                predict_one(http, path, args.out, args.tasks, args.size)
            except (OSError, RuntimeError, httpx.HTTPError) as exc:
                failed += 1
                print(f"{path}: failed: {exc}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
