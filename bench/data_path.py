"""The gateway's data path against its model: photo-like uploads to a real ``faar-serve``.

Sends the four uploads of issue 13 (``photos.UPLOADS``: a 320x240 PNG and 1280x720,
1920x1080 and 4032x3024 JPEGs of photo-like content) one at a time to a ``faar-serve``
process on a model repository, all maps, ``format=json``, for each ``size`` asked for, and
reads each answer's own ``Server-Timing``. Reported per upload and size: the median of each
stage (decode, resize, queue, inference, encode; ms), the median over answers of
(decode + resize + encode) / inference, the answer's size, and the size of the
``format=npz`` answer. A gateway without a ``resize`` stage (the code before issue 13,
which counted resizing inside decode and encode) reads as resize 0; ``--gateway-pythonpath``
runs such a gateway from another checkout, so before and after come from one script.

    python -m bench.data_path --model-repository model_repository --out bench/results/data_path.json
    git archive <commit> faar_serve | tar -x -C /tmp/before    # the gateway before issue 13
    python -m bench.data_path --model-repository model_repository --sizes original --label before \
        --gateway-pythonpath /tmp/before --out bench/results/data_path_before.json
    python -m bench.data_path --quick    # the tiny preset (random weights), the two small uploads
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from bench.common import markdown_table, write_result
from bench.photos import UPLOADS, upload
from bench.serving import Gateway, export_repository
from clients.loadgen import server_timing

ROOT = Path(__file__).resolve().parent.parent

STAGES = ("decode", "resize", "queue", "inference", "encode")
WORK = ("decode", "resize", "encode")  # the gateway's own CPU work per image


def answers(http: httpx.Client, data: bytes, params: dict[str, str], repeats: int) -> list[dict]:
    """``repeats`` answers (after one warm-up): stages in ms and the body's size."""
    out = []
    for i in range(repeats + 1):
        r = http.post("/v1/predict", params=params, files={"image": ("upload", data)})
        r.raise_for_status()
        if i:
            stages = server_timing(r.headers.get("server-timing", ""))
            out.append({**{s: stages.get(s, 0.0) for s in STAGES}, "bytes": len(r.content)})
    return out


def summarise(runs: list[dict]) -> dict:
    medians = {s: round(statistics.median(r[s] for r in runs), 2) for s in STAGES}
    ratio = statistics.median(sum(r[s] for s in WORK) / r["inference"] for r in runs)
    return {"stages_ms": medians, "work_over_inference": round(ratio, 3), "answer_kib": round(runs[0]["bytes"] / 1024),
            "answers": len(runs)}


def run(repo: Path, names: list[str], sizes: list[str], repeats: int, flags: list[str],
        pythonpath: str | None = None) -> dict:
    rows = []
    gateway = Gateway(repo, *flags, pythonpath=pythonpath)
    try:
        with httpx.Client(base_url=gateway.url, timeout=300) as http:
            for name in names:
                t = time.perf_counter()
                data = upload(name)
                print(f"{name}: {len(data) / 1024:.0f} KiB, made in {time.perf_counter() - t:.1f} s", flush=True)
                npz = answers(http, data, {"format": "npz"}, 1)[0]["bytes"]
                for size in sizes:
                    row = summarise(answers(http, data, {"format": "json", "size": size}, repeats))
                    rows.append({"upload": name, "size": size, "npz_mib": round(npz / 2**20, 1), **row})
    finally:
        gateway.close()
    return {"setup": {"repository": str(repo), "uploads": names, "sizes": sizes, "repeats": repeats,
                      "gateway_flags": flags, "gateway_pythonpath": pythonpath}, "rows": rows}


def print_table(result: dict, label: str) -> None:
    print(f"{label}: {result['setup']}")
    print(markdown_table(["upload", "size", *STAGES, "(decode + resize + encode) / inference", "JSON KiB",
                          "NPZ MiB (default precision)"],
                         [[r["upload"], r["size"], *(r["stages_ms"][s] for s in STAGES), r["work_over_inference"],
                           r["answer_kib"], r["npz_mib"]] for r in result["rows"]]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-repository", type=Path, default=ROOT / "model_repository",
                        help="default: make demo's repository")
    parser.add_argument("--sizes", nargs="+", default=["original", "model"])
    parser.add_argument("--uploads", nargs="+", choices=list(UPLOADS), default=list(UPLOADS))
    parser.add_argument("--repeats", type=int, default=7, help="answers per upload and size (median)")
    parser.add_argument("--gateway-flag", action="append", default=[], dest="flags",
                        help="extra faar-serve flag, e.g. --gateway-flag=--render-threads=1 (repeatable)")
    parser.add_argument("--gateway-pythonpath", help="run the gateway's faar_serve from this folder")
    parser.add_argument("--label", default="after", help="name of this run in the printout")
    parser.add_argument("--quick", action="store_true",
                        help="a freshly exported tiny model, the two small uploads, two repeats")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "data_path.json")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        if args.quick:
            args.model_repository = export_repository("tiny", Path(tmp), max_batch_size=8)
            args.uploads, args.repeats = list(UPLOADS)[:2], 2
        if not (args.model_repository / "faar").is_dir():
            parser.error(f"{args.model_repository} holds no model 'faar': run `make demo` or pass --model-repository")
        result = run(args.model_repository, args.uploads, args.sizes, args.repeats, args.flags,
                     args.gateway_pythonpath)
    result["label"] = args.label
    print_table(result, args.label)
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
