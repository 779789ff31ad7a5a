"""Thin command-line shells over the library (``faar-train``, ``faar-export``)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .config import ConfigError, load_config, preset_names


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
