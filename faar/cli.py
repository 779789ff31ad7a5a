"""Thin command-line shells over the library (``faar-train``, ``faar-export``)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .config import ConfigError, dump_config, load_config, preset_names


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def train_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="faar-train",
        description="Train a FAAR model (DoRA adapters + PDRS + TS-PD) into a run directory.",
        epilog=f"presets: {', '.join(preset_names())}",
    )
    parser.add_argument("--config", help="preset name or YAML file (on --resume: defaults to RUN_DIR/config.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="dotted override, value parsed as YAML (repeatable), e.g. model.adapter.rank_shared=16")
    parser.add_argument("--out", help="run directory to write")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its last epoch")
    parser.add_argument("--quiet", action="store_true", help="no progress bar; one log line per epoch")
    parser.add_argument("--summary", action="store_true",
                        help="print parameter counts as JSON (last line) and exit without training")
    parser.add_argument("--eval-only", action="store_true", help="evaluate the model saved in --out and exit")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config (every key, defaults included) as YAML and exit: the "
                             "config reference, and what --set can change")
    args = parser.parse_args(argv)

    from .model import build_model, parameter_summary
    from .train import TrainError, evaluate_run, train

    try:
        config_source = args.config
        if config_source is None and args.out and (args.resume or args.eval_only):
            config_source = str(Path(args.out) / "config.yaml")
        if config_source is None:
            return _fail("--config is required (a preset name or a YAML file)")
        cfg = load_config(config_source, args.overrides)
        if args.print_config:
            print(dump_config(cfg), end="")
            return 0
        if args.summary:
            summary = parameter_summary(build_model(cfg.model, load_weights=False))
            print(json.dumps(summary))
            return 0
        if not args.out:
            return _fail("--out RUN_DIR is required")
        if args.eval_only:
            print(json.dumps(evaluate_run(args.out, cfg)))
            return 0
        history = train(cfg, args.out, resume=args.resume, quiet=args.quiet)
    except (ConfigError, TrainError, ValueError, FileNotFoundError) as exc:
        return _fail(str(exc))
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    last = history["epochs"][-1] if history["epochs"] else {}
    print(json.dumps({"run": str(args.out), "epochs": len(history["epochs"]), "mean_rank": last.get("mean_rank"),
                      "val": last.get("val")}))
    return 0


def export_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="faar-export",
        description="Rebuild a run's model, merge its adapters into the frozen weights, export ONNX, "
                    "check it against the unmerged model in ONNX Runtime, and write a Triton model "
                    "repository: REPO_DIR/NAME/config.pbtxt and REPO_DIR/NAME/VERSION/{model.onnx,"
                    "manifest.json}. Nothing is written unless the parity check passes and, for fp16 and "
                    "int8, the accuracy gate: task metrics on held-out images of the run's validation split "
                    "within limits of the fp32 graph's (defaults: mIoU and F-scores -1 point, normals mean "
                    "angle +0.5 degrees, depth rmse +2%%).",
    )
    add = parser.add_argument
    add("--run", required=True, metavar="RUN_DIR", help="run directory (model.json + model.safetensors)")
    add("--out", required=True, metavar="REPO_DIR",
        help="Triton model repository to write into: a folder, or s3://bucket/prefix (staged locally, "
             "checked against the bucket's contents, then uploaded with boto3; needs faar[s3])")
    add("--name", default="", help="model name, the folder under REPO_DIR (default: faar, or faar_gpu with "
        "--device-kind gpu: config.pbtxt fixes the instance kind for every version of a name)")
    add("--version", type=int, default=1, help="model version folder, >= 1 (default: 1)")
    add("--height", type=int, help="input height, a multiple of 32 (default: the run's size)")
    add("--width", type=int, help="input width, a multiple of 32 (default: the run's size)")
    add("--fft", choices=["matmul", "torch", "dft"], default="matmul",
        help="the decoder's 2-D DFTs, named as in the config's decoder.fft. matmul (default): MatMuls "
             "with constant matrices, run on every execution provider; torch: torch.fft, exported as the "
             "ONNX DFT operator (no CUDA kernel in ONNX Runtime, slow on CPU); dft: the old name of torch")
    add("--exporter", choices=["auto", "torchscript", "dynamo"], default="auto",
        help="auto (default): torchscript for --fft matmul (fast), dynamo for --fft torch (the only "
             "exporter of FFTs)")
    add("--precision", choices=["fp32", "fp16", "int8"], default=None,
        help="fp32 (default); fp16: float16 weights and compute (inputs, outputs and the spectral blocks "
             "stay fp32); int8: static QDQ quantisation calibrated on --calibration, operators whose "
             "quantisation costs accuracy kept float (measured)")
    add("--fp16", action="store_true", help="the same as --precision fp16")
    add("--calibration", default="run", metavar="DIR|run",
        help="int8 calibration images: 'run' (default: the run's training split, from its config.yaml) or "
             "a folder of image files")
    add("--calibration-images", type=int, default=64, metavar="N", help="int8 calibration images (default: 64)")
    add("--gate-images", type=int, default=64, metavar="N",
        help="held-out images of the run's validation split for the accuracy gate (default: 64)")
    add("--gate", action="append", default=[], metavar="TASK=VALUE[%]",
        help="replace a task's gate limit: how much its headline metric may worsen, in its units or in "
             "percent of the fp32 value (e.g. semseg=2, depth=5%%); repeatable")
    add("--data-root", metavar="DIR", help="the run's data.root, if the data moved since training")
    add("--probabilities", action="store_true",
        help="also output TASK_probs (float32 class probabilities) for label tasks")
    add("--max-batch-size", type=int, default=8, help="Triton max_batch_size (default: 8)")
    add("--device-kind", choices=["gpu", "cpu"], default="cpu",
        help="Triton instance_group kind (default: cpu); gpu also names the CUDA provider, TF32 off")
    add("--tf32", action="store_true",
        help="gpu: let the server use TF32 for fp32 MatMul/Conv (faster on Ampere+, not what parity checked)")
    add("--queue-timeout-s", type=float, default=10.0,
        help="Triton rejects a request still queued after this long, or after its own shorter timeout "
             "(default: 10, the gateway's --triton-timeout-s default)")
    add("--parity-device", choices=["cpu", "cuda"], default="cpu",
        help="where the parity gate runs the graph in ONNX Runtime (default: cpu; cuda runs with TF32 off)")
    add("--opset", type=int, help="ONNX opset (default: 18)")
    add("--overwrite", action="store_true", help="replace an existing NAME/VERSION folder")
    add("--s3-endpoint-url", metavar="URL",
        help="S3-compatible endpoint for --out s3://... (default: AWS_ENDPOINT_URL, else AWS); "
             "credentials as boto3 finds them (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, profiles, roles)")
    args = parser.parse_args(argv)

    from .export import ExportError, ExportOptions, export_run
    from .run import RunError

    if args.fp16 and args.precision not in (None, "fp16"):
        return _fail(f"--fp16 contradicts --precision {args.precision}")
    precision = "fp16" if args.fp16 else args.precision or "fp32"
    options = ExportOptions(name=args.name, version=args.version, height=args.height, width=args.width,
                            fft=args.fft, precision=precision, max_batch_size=args.max_batch_size,
                            device_kind=args.device_kind, opset=args.opset, probabilities=args.probabilities,
                            overwrite=args.overwrite, exporter=args.exporter, calibration=args.calibration,
                            calibration_images=args.calibration_images, gate_images=args.gate_images,
                            gate=tuple(args.gate), data_root=args.data_root,
                            queue_timeout_s=args.queue_timeout_s, parity_device=args.parity_device, tf32=args.tf32)
    from .export.storage import export_to_s3, is_object_store

    if is_object_store(args.out):
        try:
            uploaded = export_to_s3(args.run, args.out, options, args.s3_endpoint_url)
        except (ExportError, RunError) as exc:
            return _fail(str(exc))
        for warning in uploaded.warnings:
            print(f"warning: {warning}", file=sys.stderr)
        print(json.dumps({"model": uploaded.model_url, "version": uploaded.version, "objects": uploaded.keys,
                          "triton_model_repository": uploaded.triton_repository,
                          "sha256": uploaded.manifest["onnx"]["sha256"]}))
        return 0
    try:
        result = export_run(args.run, args.out, options)
    except (ExportError, RunError) as exc:
        return _fail(str(exc))
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    m = result.manifest
    print(json.dumps({"model": str(result.model_dir), "version": args.version, "onnx": str(result.onnx_path),
                      "sha256": m["onnx"]["sha256"], "exporter": m["export"]["exporter"],
                      "precision": m["export"]["precision"], "seconds": m["export"]["total_seconds"],
                      "parity": m["parity"]["outputs"], "gate": _gate_summary(m["parity"]["gate"])}))
    return 0


def _gate_summary(gate: dict | None) -> dict | None:
    """Per task: metric, fp32 -> this graph, limit (the manifest has the rest)."""
    if gate is None:
        return None
    def num(x: float | None) -> str:
        return "nan" if x is None else f"{x:.4g}"

    return {t: f"{v['metric']} {num(v['fp32'])} -> {num(v['candidate'])} (limit {v['limit']})"
            for t, v in gate["tasks"].items()}


def eval_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="faar-eval",
        description="Task metrics of an exported model on a dataset split, through the gateway's own image "
                    "path (resize in, ONNX Runtime, resize maps back to each label's size) and the training "
                    "metrics; with --run, the run's PyTorch model on the same pixels and the differences.",
    )
    add = parser.add_argument
    add("--model-repository", required=True, metavar="REPO_DIR", help="model repository written by faar-export")
    add("--name", default="faar", help="model name under REPO_DIR (default: faar)")
    add("--version", type=int, help="model version (default: the newest)")
    add("--config", help="preset or YAML whose data section names the dataset (default with --run: "
                         "RUN_DIR/config.yaml)")
    add("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="dotted config override, e.g. data.root=/data/PASCAL_MT (repeatable)")
    add("--split", help="dataset split (default: the config's data.val_split)")
    add("--run", metavar="RUN_DIR", help="also evaluate this run's PyTorch model and print the differences")
    add("--limit", type=int, help="evaluate the first N images only")
    add("--batch-size", type=int, default=8, help="images per ONNX Runtime call (default: 8)")
    add("--device", choices=["cpu", "cuda", "auto"], default="cpu", help="ONNX Runtime device (default: cpu)")
    add("--out", metavar="JSON", help="write the report here as JSON")
    args = parser.parse_args(argv)

    from .evaluation import EvalError, evaluate_export, format_table
    from .run import RunError

    if args.limit is not None and args.limit < 1:
        return _fail(f"--limit must be >= 1, got {args.limit}")
    if args.batch_size < 1:
        return _fail(f"--batch-size must be >= 1, got {args.batch_size}")
    config = args.config or (str(Path(args.run) / "config.yaml") if args.run else None)
    if config is None:
        return _fail("--config is required without --run (it names the dataset)")
    try:
        cfg = load_config(config, args.overrides)
        report = evaluate_export(args.model_repository, cfg.data, args.split, args.name, args.version, args.run,
                                 args.limit, args.batch_size, args.device)
    except (ConfigError, EvalError, RunError, ValueError, FileNotFoundError) as exc:
        return _fail(str(exc))
    print(format_table(report))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({"images": report["data"]["images"], "out": args.out}))
    return 0
