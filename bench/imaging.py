"""Building blocks of the gateway's data path, candidate by candidate: what ``faar_serve.codec`` chose from.

1. JPEG decode of photo-like files (``photos.py``) at full size and at reduced scale in the
   DCT domain: Pillow (full, ``draft``), simplejpeg, PyTurboJPEG, OpenCV ``IMREAD_REDUCED_*``.
2. Resizing a model-sized map up to the upload's size: Pillow on float32 planes (the old
   path) against OpenCV on uint8/uint16/float32 planes, and numpy indexing for labels.
3. PNG encoders on maps as the gateway sends them (upsampled labels, 8-bit probability,
   16-bit depth, RGB normals): Pillow at compress levels 0 and 1, OpenCV ``imencode`` at
   level 1 with each zlib strategy, fpng (RGB only), imagecodecs (libpng, libspng), and
   ``faar_serve.codec.png`` (one fixed filter, zlib-ng level 1; what the gateway uses:
   ``up`` + RLE for labels, ``sub`` for the rest, fpng for RGB); every output read back by
   Pillow and compared bit for bit.

Candidates whose package is missing are skipped and named. Milliseconds, medians of
round-robin runs on one thread each (``cv2.setNumThreads(1)``).

    python -m bench.imaging --out bench/results/imaging.json
    python -m bench.imaging --quick
"""

from __future__ import annotations

import argparse
import importlib
import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from zlib_ng import zlib_ng

from bench.common import interleaved_medians, markdown_table, write_result
from bench.photos import encoded, photo_like
from faar_serve.codec import png as codec_png
from faar_serve.codec import resize as codec_resize

SIZES = {"1280x720": (720, 1280), "1920x1080": (1080, 1920), "4032x3024": (3024, 4032)}
MODEL_SIDES = (128, 448)  # the demo model's input and Swin-T's


def optional(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


cv2, simplejpeg, turbojpeg, fpng, imagecodecs = (optional(n) for n in
                                                 ("cv2", "simplejpeg", "turbojpeg", "fpng", "imagecodecs"))


def pillow_decode(data: bytes, side: int | None) -> np.ndarray:
    im = Image.open(io.BytesIO(data))
    if side:
        im.draft("RGB", (side, side))
    return np.asarray(im.convert("RGB"))


def decoders(side: int | None) -> dict[str, Callable[[bytes], np.ndarray]]:
    """name -> bytes -> RGB at full size (``side`` None) or at least ``side`` pixels a side."""
    out: dict[str, Callable[[bytes], np.ndarray]] = {"pillow" + ("_draft" if side else ""):
                                                     lambda d: pillow_decode(d, side)}
    if simplejpeg:
        out["simplejpeg"] = lambda d: simplejpeg.decode_jpeg(d, "RGB", min_height=side or 0,
                                                             min_width=side or 0)
    if turbojpeg:
        tj = turbojpeg.TurboJPEG()

        def turbo(d: bytes) -> np.ndarray:
            if not side:
                return tj.decode(d, pixel_format=turbojpeg.TJPF_RGB)
            w, h, _, _ = tj.decode_header(d)
            factor = next((f for f in ((1, 8), (1, 4), (1, 2)) if min(w, h) // f[1] >= side), (1, 1))
            return tj.decode(d, pixel_format=turbojpeg.TJPF_RGB, scaling_factor=factor)

        out["turbojpeg"] = turbo
    if cv2:
        def opencv(d: bytes) -> np.ndarray:
            buf = np.frombuffer(d, np.uint8)
            if not side:
                return cv2.imdecode(buf, cv2.IMREAD_COLOR)
            h, w = Image.open(io.BytesIO(d)).size[::-1]
            flag = next((f for k, f in ((8, cv2.IMREAD_REDUCED_COLOR_8), (4, cv2.IMREAD_REDUCED_COLOR_4),
                                        (2, cv2.IMREAD_REDUCED_COLOR_2)) if min(h, w) // k >= side),
                        cv2.IMREAD_COLOR)
            return cv2.imdecode(buf, flag)

        out["opencv"] = opencv
    return out


def bench_decode(repeats: int, sizes: dict[str, tuple[int, int]]) -> list[dict]:
    rows = []
    for label, (h, w) in sizes.items():
        data = encoded(photo_like(h, w, 1))
        for side in (None, *MODEL_SIDES):
            fns = decoders(side)
            shapes = {k: fn(data).shape[:2] for k, fn in fns.items()}
            times = interleaved_medians({k: (lambda fn=fn, d=data: fn(d)) for k, fn in fns.items()}, repeats, 1)
            for name, t in times.items():
                rows.append({"upload": label, "at_least": side or "full", "decoder": name,
                             "ms": round(t * 1000, 2), "decoded": list(shapes[name])})
    return rows


def smooth_field(rng: np.random.Generator, h: int, w: int, channels: int = 1) -> np.ndarray:
    """A model-output-like float32 field: large smooth structures plus some fine detail."""
    coarse = rng.normal(size=(channels, 6, 6)).astype(np.float32)
    fine = rng.normal(size=(channels, h, w)).astype(np.float32) * 0.05
    up = np.stack([np.asarray(Image.fromarray(c).resize((w, h), Image.Resampling.BICUBIC)) for c in coarse])
    return up + fine


def model_maps(side: int = 128, seed: int = 0) -> dict[str, np.ndarray]:
    """Six maps as the demo model returns them (model layout, model size)."""
    rng = np.random.default_rng(seed)
    labels = smooth_field(rng, side, side, 8).argmax(0).astype(np.uint8)
    normals = smooth_field(rng, side, side, 3)
    normals[2] += 1.5
    normals /= np.linalg.norm(normals, axis=0, keepdims=True)
    return {"labels": labels, "probability": 1 / (1 + np.exp(-3 * smooth_field(rng, side, side)[0])),
            "depth": 5 + 2 * smooth_field(rng, side, side)[0], "normals": normals}


def pil_plane(plane: np.ndarray, h: int, w: int, resample: Image.Resampling) -> np.ndarray:
    return np.asarray(Image.fromarray(plane).resize((w, h), resample))


def renormalised_uint8(n: np.ndarray) -> np.ndarray:
    """HWC float normals -> unit length -> RGB encoding."""
    n = n / np.maximum(np.sqrt((n * n).sum(axis=-1, keepdims=True)), 1e-12)
    return (n * 127.5 + 128).astype(np.uint8)


def resizers(maps: dict[str, np.ndarray], h: int, w: int) -> dict[str, Callable[[], object]]:
    lab, prob, depth, nrm = maps["labels"], maps["probability"], maps["depth"], maps["normals"]
    prob8, depth16 = np.round(prob * 255).astype(np.uint8), np.round(depth * 1000).astype(np.uint16)
    hwc = np.ascontiguousarray(nrm.transpose(1, 2, 0))
    rows = ((np.arange(h) + 0.5) * lab.shape[0] / h).astype(np.intp)
    cols = ((np.arange(w) + 0.5) * lab.shape[1] / w).astype(np.intp)
    fns: dict[str, Callable[[], object]] = {
        "labels pillow nearest": lambda: pil_plane(lab, h, w, Image.Resampling.NEAREST),
        "labels numpy take rows then columns": lambda: lab.take(rows, 0).take(cols, 1),
        "labels codec (numpy take columns then rows)": lambda: codec_resize.labels(lab, h, w),
        "normals codec (OpenCV planar float32 + renorm)": lambda: codec_resize.normals(nrm, h, w),
        "probability pillow float32": lambda: pil_plane(prob, h, w, Image.Resampling.BILINEAR),
        "probability pillow uint8": lambda: pil_plane(prob8, h, w, Image.Resampling.BILINEAR),
        "depth pillow float32": lambda: pil_plane(depth, h, w, Image.Resampling.BILINEAR),
        "normals pillow float32 x3 + renorm": lambda: renormalised_uint8(np.stack(
            [pil_plane(c, h, w, Image.Resampling.BILINEAR) for c in nrm], axis=-1)),
    }
    if cv2:
        fns.update({
            "labels opencv nearest_exact": lambda: cv2.resize(lab, (w, h), interpolation=cv2.INTER_NEAREST_EXACT),
            "probability opencv float32": lambda: cv2.resize(prob, (w, h), interpolation=cv2.INTER_LINEAR),
            "probability opencv uint8": lambda: cv2.resize(prob8, (w, h), interpolation=cv2.INTER_LINEAR),
            "depth opencv float32": lambda: cv2.resize(depth, (w, h), interpolation=cv2.INTER_LINEAR),
            "depth opencv uint16": lambda: cv2.resize(depth16, (w, h), interpolation=cv2.INTER_LINEAR),
            "normals opencv float32 HWC": lambda: cv2.resize(hwc, (w, h), interpolation=cv2.INTER_LINEAR),
            "normals opencv float32 HWC + renorm": lambda: renormalised_uint8(
                cv2.resize(hwc, (w, h), interpolation=cv2.INTER_LINEAR)),
        })
    return fns


def bench_resize(repeats: int, sizes: dict[str, tuple[int, int]]) -> list[dict]:
    maps = model_maps()
    rows = []
    for label, (h, w) in sizes.items():
        times = interleaved_medians(resizers(maps, h, w), repeats, 1)
        rows += [{"to": label, "resize": k, "ms": round(t * 1000, 2)} for k, t in times.items()]
    return rows


def upsampled(maps: dict[str, np.ndarray], h: int, w: int) -> dict[str, np.ndarray]:
    """Maps at the upload's size in their PNG encodings (what the encoders get)."""
    def up(a: np.ndarray, resample: Image.Resampling) -> np.ndarray:
        return pil_plane(a, h, w, resample)

    normals = np.stack([up(c, Image.Resampling.BILINEAR) for c in maps["normals"]], axis=-1)
    return {"labels": up(maps["labels"], Image.Resampling.NEAREST),
            "probability": np.round(up(maps["probability"], Image.Resampling.BILINEAR) * 255).astype(np.uint8),
            "depth": np.round(up(maps["depth"], Image.Resampling.BILINEAR) * 1000).astype(np.uint16),
            "normals": renormalised_uint8(normals)}


def pillow_png(arr: np.ndarray, level: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", compress_level=level)
    return buf.getvalue()


def encoders(arr: np.ndarray) -> dict[str, Callable[[], bytes]]:
    fns: dict[str, Callable[[], bytes]] = {"pillow level 0": lambda: pillow_png(arr, 0),
                                           "pillow level 1": lambda: pillow_png(arr, 1)}
    bgr = arr[..., ::-1].copy() if arr.ndim == 3 else arr  # OpenCV takes BGR
    if cv2:
        for name in ("DEFAULT", "FILTERED", "HUFFMAN_ONLY", "RLE", "FIXED"):
            params = [cv2.IMWRITE_PNG_COMPRESSION, 1, cv2.IMWRITE_PNG_STRATEGY,
                      getattr(cv2, f"IMWRITE_PNG_STRATEGY_{name}")]
            fns[f"opencv level 1 {name.lower()}"] = lambda p=params: cv2.imencode(".png", bgr, p)[1].tobytes()
    if fpng and arr.ndim == 3:
        fns["fpng"] = lambda: fpng.from_ndarray(arr)
    palette = [(i, i, i) for i in range(256)] if arr.ndim == 2 and arr.dtype == np.uint8 else None
    for filter_name, kind in (("sub", codec_png.FILTER_SUB), ("up", codec_png.FILTER_UP)):
        for strategy_name, strategy in (("default", zlib_ng.Z_DEFAULT_STRATEGY), ("rle", zlib_ng.Z_RLE)):
            if arr.ndim == 2:
                fns[f"codec writer {filter_name} {strategy_name}"] = (
                    lambda k=kind, s=strategy: codec_png.png(arr, filter_kind=k, strategy=s))
    if palette is not None:
        fns["codec writer up rle, palette (labels as sent)"] = lambda: codec_png.png(arr, palette, codec_png.FILTER_UP,
                                                                                     zlib_ng.Z_RLE)
    if imagecodecs:
        fns["imagecodecs libpng level 1 rle sub"] = lambda: imagecodecs.png_encode(arr, level=1, strategy=3,
                                                                                   filter=16)
        fns["imagecodecs libpng level 1 rle up"] = lambda: imagecodecs.png_encode(arr, level=1, strategy=3,
                                                                                  filter=32)
        fns["imagecodecs libspng level 1"] = lambda: imagecodecs.spng_encode(arr, level=1)
    return fns


def bench_encode(repeats: int, sizes: dict[str, tuple[int, int]]) -> list[dict]:
    maps = model_maps()
    rows = []
    for label, (h, w) in sizes.items():
        for kind, arr in upsampled(maps, h, w).items():
            fns = encoders(arr)
            exact = {k: bool(np.array_equal(np.asarray(Image.open(io.BytesIO(fn()))), arr)) for k, fn in fns.items()}
            sizes_kb = {k: round(len(fn()) / 1024, 1) for k, fn in fns.items()}
            times = interleaved_medians(fns, repeats, 1)
            rows += [{"size": label, "map": kind, "encoder": k, "ms": round(t * 1000, 2), "kib": sizes_kb[k],
                      "pillow_reads_bit_exact": exact[k]} for k, t in times.items()]
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="one size, two repeats")
    parser.add_argument("--only", nargs="+", choices=["decode", "resize", "encode"])
    parser.add_argument("--out", type=Path, default=Path("bench/results/imaging.json"))
    args = parser.parse_args(argv)
    if cv2:
        cv2.setNumThreads(1)
    sizes = {"1280x720": SIZES["1280x720"]} if args.quick else SIZES
    repeats = 2 if args.quick else args.repeats
    parts = args.only or ["decode", "resize", "encode"]
    missing = [n for n, m in zip(("opencv", "simplejpeg", "turbojpeg", "fpng", "imagecodecs"),
                                 (cv2, simplejpeg, turbojpeg, fpng, imagecodecs), strict=True) if m is None]
    result: dict[str, Any] = {"missing": missing, "repeats": repeats}
    if "decode" in parts:
        result["decode"] = bench_decode(repeats, sizes)
        print(markdown_table(["upload", "decoded at least", "decoder", "ms", "decoded HxW"],
                             [[r["upload"], r["at_least"], r["decoder"], r["ms"], "x".join(map(str, r["decoded"]))]
                              for r in result["decode"]]))
    if "resize" in parts:
        result["resize"] = bench_resize(repeats, sizes)
        print(markdown_table(["128x128 to", "resize", "ms"], [[r["to"], r["resize"], r["ms"]]
                                                              for r in result["resize"]]))
    if "encode" in parts:
        result["encode"] = bench_encode(repeats, sizes)
        print(markdown_table(["size", "map", "encoder", "ms", "KiB", "Pillow reads it bit-exact"],
                             [[r["size"], r["map"], r["encoder"], r["ms"], r["kib"], r["pillow_reads_bit_exact"]]
                              for r in result["encode"]]))
    if missing:
        print("skipped (not installed):", ", ".join(missing))
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
