"""``faar-predict``: every map of files, folders, globs or lists of paths, from a model repository.

    faar-predict --model-repository model_repository photos/ --out maps/

A thin shell over ``batch.collect`` and ``batch.run``: a progress bar on stderr, the summary
(JSON, every failure listed) in ``OUT/faar-predict-summary.json`` and on stdout. Exit status:
0 when every image is done (or was already), 1 when any failed, 2 for bad arguments or a
model repository that cannot be served.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from .. import codec
from ..manifest import ManifestError
from .batch import SUMMARY_NAME, collect, run


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="faar-predict", description=__doc__.split("\n\n")[0])
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="image files, folders (recursive), quoted glob patterns, or .txt files listing paths")
    p.add_argument("--model-repository", required=True, help="a repository written by faar-export")
    p.add_argument("--out", required=True, type=Path, help="folder for the maps (the input tree is mirrored)")
    p.add_argument("--model", default="faar")
    p.add_argument("--version", type=int, help="default: the highest")
    p.add_argument("--tasks", help="comma-separated subset, e.g. semseg,depth (default: every task)")
    p.add_argument("--format", choices=["png", "npz"], default="png",
                   help="png: one PNG per map as the gateway encodes it; npz: one NPZ of arrays per image")
    p.add_argument("--precision", choices=codec.PRECISIONS, default="float16", help="npz float maps")
    p.add_argument("--size", default="original", help=codec.SIZE_HELP)
    p.add_argument("--engine", choices=["onnx", "triton"], default="onnx")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="onnx engine")
    p.add_argument("--triton-url", default="127.0.0.1:8001")
    p.add_argument("--triton-protocol", choices=["grpc", "http"], default="grpc")
    p.add_argument("--batch-size", type=int, help="images per engine call (default: the model's max batch)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 2, help="threads decoding and encoding")
    p.add_argument("--overwrite", action="store_true", help="redo images whose outputs already exist")
    p.add_argument("--no-preview", dest="preview", action="store_false", help="skip <name>.preview.png")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from tqdm import tqdm

    from .api import Predictor

    args = parser().parse_args(argv)
    try:
        codec.parse_size(args.size)
    except ValueError as exc:
        parser().error(str(exc))
    if (args.batch_size is not None and args.batch_size < 1) or args.workers < 1:
        parser().error("--batch-size and --workers must be at least 1")
    jobs, failures = collect(args.inputs)
    try:
        predictor = Predictor(args.model_repository, args.model, args.version, engine=args.engine,
                              device=args.device, triton_url=args.triton_url, triton_protocol=args.triton_protocol,
                              batch_size=args.batch_size)
    except (ManifestError, ValueError, RuntimeError) as exc:
        print(f"faar-predict: {exc}", file=sys.stderr)
        return 2
    with predictor, tqdm(total=len(jobs), unit="image", disable=args.quiet) as bar:
        try:
            summary = run(predictor, jobs, args.out, tasks=args.tasks, fmt=args.format, size=args.size,
                          precision=args.precision, batch_size=args.batch_size, workers=args.workers,
                          overwrite=args.overwrite, preview=args.preview, progress=bar.update)
        except KeyError as exc:  # an unknown task
            print(f"faar-predict: {exc.args[0]}", file=sys.stderr)
            return 2
    summary["failures"] = failures + summary["failures"]
    summary["failed"] = len(summary["failures"])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / SUMMARY_NAME).write_text(json.dumps(summary, indent=2))
    print(json.dumps({k: v for k, v in summary.items() if k != "failures"}))
    for failure in summary["failures"]:
        print(f"failed: {failure['input']}: {failure['error']}: {failure['detail']}", file=sys.stderr)
    return 1 if summary["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
