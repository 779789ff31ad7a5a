"""``faar-predict`` on a folder of photos against the bare engine, in the same run.

A folder of N photo-like 1280x720 JPEGs (``photos.py``); ``faar_serve.predictor.batch.run``
(what ``faar-predict`` runs: decode, model, resize, encode, write every map and the
preview) against ONNX Runtime alone on the already decoded and resized images, one image
per call as the CPU engine runs them, with spin-waiting threads (its fastest setting when
nothing else runs). The two take turns ``--rounds`` times; medians of images/s. Models:
Swin-T at 448x448 and the demo model, random weights, exported by the real exporter.

    python -m bench.predict --out bench/results/predict.json
    python -m bench.predict --quick
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from bench.common import markdown_table, write_result
from bench.photos import encoded, photo_like
from bench.serving import export_repository
from faar_serve import codec
from faar_serve.manifest import load_model_spec
from faar_serve.predictor import Predictor
from faar_serve.predictor.batch import collect, run
from faar_serve.providers import create_session

MODEL = "faar"


def bare_images_per_s(repo: Path, folder: Path) -> float:
    """ONNX Runtime alone, one image per call, on every photo already decoded and resized."""
    spec = load_model_spec(repo, MODEL)
    session = create_session(spec.onnx_path, "cpu", spin_wait=True)
    pixels = [codec.prepare(codec.probe(p.read_bytes(), 10**9), spec.height, spec.width).pixels
              for p in sorted(folder.iterdir())]
    session.run(None, {spec.input_name: pixels[0][None]})  # warm-up
    t0 = time.perf_counter()
    for x in pixels:
        session.run(None, {spec.input_name: x[None]})
    return len(pixels) / (time.perf_counter() - t0)


def predict_images_per_s(repo: Path, folder: Path, out: Path, workers: int) -> dict:
    with Predictor(repo) as predictor:
        jobs, _ = collect([str(folder)])
        run(predictor, jobs[:2], out, workers=workers, overwrite=True)  # warm-up
        summary = run(predictor, jobs, out, workers=workers, overwrite=True)
    assert summary["failed"] == 0, summary["failures"]
    return summary


def measure(config: str, images: int, rounds: int, workers: int, tmp: Path) -> dict:
    repo = export_repository(config, tmp / config, max_batch_size=8)
    folder = tmp / "photos"
    if not folder.is_dir():
        folder.mkdir()
        for i in range(images):
            (folder / f"{i:03d}.jpg").write_bytes(encoded(photo_like(720, 1280, i)))
    bare, predict = [], []
    for _ in range(rounds):
        bare.append(bare_images_per_s(repo, folder))
        predict.append(predict_images_per_s(repo, folder, tmp / "out", workers)["images_per_s"])
    return {"config": config, "images": images, "rounds": rounds, "workers": workers,
            "bare_images_per_s": bare, "predict_images_per_s": predict,
            "ratio": statistics.median(p / b for p, b in zip(predict, bare, strict=True))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["faar_pascal_swin_t", "demo"])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="the tiny preset, 8 images, one round")
    parser.add_argument("--out", type=Path, default=Path("bench/results/predict.json"))
    args = parser.parse_args(argv)
    if args.quick:
        args.configs, args.images, args.rounds = ["tiny"], 8, 1
    with tempfile.TemporaryDirectory() as tmp:
        rows = [measure(c, args.images, args.rounds, args.workers, Path(tmp)) for c in args.configs]
    print(markdown_table(["model", "images", "bare engine images/s", "faar-predict images/s", "ratio (median)"],
                         [[r["config"], r["images"], statistics.median(r["bare_images_per_s"]),
                           statistics.median(r["predict_images_per_s"]), r["ratio"]] for r in rows]))
    write_result(args.out, {"rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
