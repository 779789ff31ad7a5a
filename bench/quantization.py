"""INT8 against fp32 in ONNX Runtime (CPU), same run: what quantising buys, and what each float group costs.

Forms, all in the gateway's session settings (ORT_ENABLE_ALL, no spin-wait), timed round-robin:
  fp32            the exported graph
  int8_all        every MatMul and Conv quantised (static QDQ, as ``faar.export.quantize``)
  float:<group>   everything quantised but that group (``faar.export.quantize.node_groups``):
                  the speed each group kept float costs (timed at the first batch size only) and,
                  with ``--run``, the accuracy it buys back
  int8_gated      ``--run`` only: the graph the accuracy gate accepted (the sensitivity pass's
                  choice), with the gate's task metrics against fp32 on the held-out images

``--config`` benchmarks the preset with random weights (calibrated on rendered scenes; its
accuracy means nothing, so no gate); ``--run`` a trained run through the real export path
(calibration on its training split, gate on its validation split, default limits).

    python -m bench.quantization --config faar_pascal_swin_t --batches 1 8 --out bench/results/quantization_swin_t.json
    python -m bench.quantization --run runs/demo --batches 1 8 --out bench/results/quantization_demo.json
    python -m bench.quantization --quick
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from bench.common import interleaved_medians, markdown_table, ort_call, random_model, write_result
from faar.data.scenes import render_scene
from faar.evaluation import evaluate, onnx_predictor
from faar.export import build_export_module, export_onnx
from faar.export.gate import calibration_images, cpu_description, gate_limits, held_out, judge, run_config
from faar.export.quantize import node_groups, quantize_graph, quantize_with_gate
from faar.model import merge_model
from faar.run import load_model
from faar_serve.engines.onnx import create_session


def fp32_graph(work: Path, config: str | None, run: Path | None) -> tuple[Path, Any]:
    """The fp32 graph as faar-export writes it (merged, matmul DFT) and the model it came from."""
    model = load_model(run) if run else random_model(config)
    merged = merge_model(model)
    merged.set_fft_backend("matmul")
    path = work / "fp32.onnx"
    export_onnx(build_export_module(merged), path)
    return path, model


def forms_gate(forms: dict[str, tuple[Path, list[str]]], tasks: dict, held: list) -> dict[str, Any]:
    """Every form's gate figures against fp32 on the held-out images (default limits)."""
    metrics, _ = evaluate({n: onnx_predictor(p, tasks) for n, (p, _) in forms.items()}, tasks, held)
    limits = gate_limits(list(tasks), {t: next(iter(m)) for t, m in metrics["fp32"].items()})
    judged = {n: judge(metrics["fp32"], m, limits) for n, m in metrics.items() if n != "fp32"}
    return {n: {"score": j["score"], "passed": j["passed"],
                "worse_by": {t: v["worse_by"] for t, v in j["tasks"].items()}} for n, j in judged.items()}


def run(config: str | None, run_dir: Path | None, batches: list[int], repeats: int, calibration: int,
        gate_images: int, per_group: bool, fp32_onnx: Path | None = None) -> dict[str, Any]:
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if fp32_onnx is not None:  # a graph faar-export (or this script) already wrote: no model needed
            fp32, model = fp32_onnx, None
            size = tuple(d.dim_value for d in onnx.load(str(fp32), load_external_data=False)
                         .graph.input[0].type.tensor_type.shape.dim[1:3])
        else:
            fp32, model = fp32_graph(work, config, run_dir)
            size = model.img_size
        groups = node_groups(onnx.load(str(fp32)))
        gate: dict[str, Any] | None = None
        if run_dir is not None:
            cfg = run_config(run_dir)
            images = calibration_images("run", cfg, list(model.tasks), size, calibration)
        else:
            images = [render_scene(10_000 + i, size)["image"] for i in range(calibration)]
        cache = work / "calibration.json"
        forms = {"fp32": (fp32, [])}
        forms["int8_all"] = (work / "int8_all.onnx", [])
        quantize_graph(fp32, forms["int8_all"][0], "image", images, cache)
        if per_group:
            for group, names in groups.items():
                path = work / f"float_{group}.onnx"
                quantize_graph(fp32, path, "image", images, cache, names)
                forms[f"float:{group}"] = (path, [group])
        if run_dir is not None:
            held = held_out(cfg, list(model.tasks), size, gate_images)
            record = quantize_with_gate(fp32, work / "int8_gated.onnx", "image", model.tasks, images, held)
            forms["int8_gated"] = (work / "int8_gated.onnx", record["float_groups"])
            gate = {"float_groups": record["float_groups"], "sensitivity": record["sensitivity"],
                    "tried": record["tried"], "tasks": record["gate"]["tasks"], "passed": record["gate"]["passed"],
                    "held_out_images": len(held), "forms": forms_gate(forms, model.tasks, held)}
        sessions = {name: create_session(path, "cpu") for name, (path, _) in forms.items()}
        rows = []
        for k, batch in enumerate(batches):
            pixels = np.stack([images[i % len(images)] for i in range(batch)])
            timed = {n: s for n, s in sessions.items() if k == 0 or not n.startswith("float:")}
            times = interleaved_medians({n: ort_call(s, {"image": pixels}) for n, s in timed.items()},
                                        repeats, warmup=1)
            for name, seconds in times.items():
                rows.append({"batch": batch, "form": name, "float_groups": forms[name][1],
                             "ms_per_batch": seconds * 1000, "images_per_s": batch / seconds,
                             "x_fp32": times["fp32"] / seconds, "x_int8_all": times["int8_all"] / seconds})
    return {"setup": {"model": str(run_dir) if run_dir else config, "fp32_onnx": str(fp32_onnx or ""),
                      "img_size": list(size), "batches": batches,
                      "repeats": repeats, "calibration_images": len(images),
                      "groups": {g: len(n) for g, n in groups.items()}, "cpu": cpu_description(),
                      "seconds": round(time.monotonic() - t0, 1)},
            "rows": rows, "gate": gate}


def print_tables(result: dict[str, Any]) -> None:
    print(f"setup: {result['setup']}")
    print(markdown_table(["batch", "form", "ms/batch", "images/s", "x fp32", "x int8_all"],
                         [[r["batch"], r["form"], r["ms_per_batch"], r["images_per_s"], r["x_fp32"],
                           r["x_int8_all"]] for r in result["rows"]]))
    gate = result["gate"]
    if gate:
        print(f"gate ({'passed' if gate['passed'] else 'FAILED'}, {gate['held_out_images']} held-out images), "
              f"float groups: {gate['float_groups'] or 'none'}")
        print(markdown_table(["task", "metric", "fp32", "int8", "worse by", "limit"],
                             [[t, v["metric"], v["fp32"], v["candidate"], v["worse_by"], v["limit"]]
                              for t, v in gate["tasks"].items()]))
        tasks = list(gate["tasks"])
        print(markdown_table(["form", "gate score (1 = at a limit)", "passed", *[f"{t} worse by" for t in tasks]],
                             [[n, f["score"], f["passed"], *[f["worse_by"][t] for t in tasks]]
                              for n, f in gate["forms"].items()]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--config", default="faar_pascal_swin_t", help="preset, random weights (no gate)")
    source.add_argument("--run", type=Path, help="a trained run: the real export path, gate included")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--calibration-images", type=int, default=16)
    parser.add_argument("--gate-images", type=int, default=64)
    parser.add_argument("--fp32-onnx", type=Path,
                        help="with --config: time this already exported fp32 graph instead of exporting the preset")
    parser.add_argument("--no-groups", dest="per_group", action="store_false",
                        help="skip the float:<group> forms (one quantisation and session each)")
    parser.add_argument("--quick", action="store_true", help="the tiny preset, batch 1 and 2, few repeats")
    parser.add_argument("--out", type=Path, default=Path("bench/results/quantization.json"))
    args = parser.parse_args(argv)
    if args.quick:
        args.config, args.run, args.batches, args.repeats, args.calibration_images = "tiny", None, [1, 2], 2, 4
    if args.fp32_onnx and args.run:
        parser.error("--fp32-onnx goes with --config (a --run is exported as faar-export does)")
    result = run(None if args.run else args.config, args.run, args.batches, args.repeats, args.calibration_images,
                 args.gate_images, args.per_group, args.fp32_onnx)
    print_tables(result)
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
