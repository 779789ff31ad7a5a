"""Adapter cost at inference and in training, measured side by side in one run.

Inference (eval, no grad), one model architecture in several forms:
  floor      the same network (per-task last blocks included) with plain linears and no
             adapters at all: the frozen weights, never adapted
  single     ``adapter.kind=none``: no per-task forks either (what the forks cost)
  merged     ``merge_model`` of the DoRA model: adapters folded into plain linears
  unmerged   the DoRA model as MTLoRA's / FAAR's own code runs it (they cannot merge),
             at the initial rank and after shrinking to ``--shrunk`` ranks per adapter
Training (one forward+backward+AdamW step): fused vs unmerged DoRA forward at the initial
rank and after shrinking.

Every number is a median over ``--repeats`` timed runs after warm-up; every comparison is a
ratio to ``floor`` taken in the same process, because the machine is shared and noisy.

    python bench/adapter_cost.py --config faar_pascal_swin_t --batch 1 --out bench/results/adapter_cost_swin_t.json
    python bench/adapter_cost.py --quick   # tiny sizes, for the smoke test
"""

from __future__ import annotations

import argparse
import platform
from collections.abc import Callable
from pathlib import Path

import torch
from common import eager_call, interleaved_medians, write_result

from faar.adapters import adapters_of
from faar.config import load_config
from faar.model import build_model, merge_model


def shrink_all(model: torch.nn.Module, rank: int) -> None:
    for a in adapters_of(model).values():
        a.keep(torch.arange(min(rank, a.rank)))


def build(config: str, overrides: list[str], adapted: bool = True) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(load_config(config, ["model.pretrained=false", *overrides]).model, load_weights=False)
    if adapted:
        with torch.no_grad():
            for a in adapters_of(model).values():
                a.lora_B.normal_(std=0.02)
    return model


def run(config: str, batch: int, shrunk: int, repeats: int, warmup: int, train: bool) -> dict:
    cfg = load_config(config, ["model.pretrained=false"])
    h, w = cfg.model.img_size
    x = torch.randn(batch, 3, h, w)
    results: dict[str, dict[str, float]] = {"inference_s": {}, "train_step_s": {}}

    def infer(model: torch.nn.Module) -> Callable[[], object]:
        model.eval()
        return eager_call(model, x)

    dora = build(config, ["model.adapter.forward=unmerged"])
    r0 = max(a.rank for a in adapters_of(dora).values())
    forms = {
        "floor": infer(merge_model(build(config, [], adapted=False))),
        "single": infer(build(config, ["model.adapter.kind=none"])),
        "merged": infer(merge_model(dora)),
        f"unmerged_r{r0}": infer(dora),
    }
    shrunk_model = build(config, ["model.adapter.forward=unmerged"])
    shrink_all(shrunk_model, shrunk)
    forms["merged_after_shrink"] = infer(merge_model(shrunk_model))
    forms[f"unmerged_r{shrunk}"] = infer(shrunk_model)
    inf = results["inference_s"] = interleaved_medians(forms, repeats, warmup)

    if train:
        steps = {}
        for mode in ("fused", "unmerged"):
            for rank in (r0, shrunk):
                model = build(config, [f"model.adapter.forward={mode}"]).train()
                if rank != r0:
                    shrink_all(model, rank)
                steps[f"{mode}_r{rank}"] = _train_step(model, x)
        results["train_step_s"] = interleaved_medians(steps, max(repeats // 2, 2), 1)

    results["ratio_to_floor"] = {k: v / inf["floor"] for k, v in inf.items()}
    if results["train_step_s"]:
        base = results["train_step_s"][f"fused_r{r0}"]
        results["train_ratio_to_fused_r0"] = {k: v / base for k, v in results["train_step_s"].items()}
    results["setup"] = {"config": config, "img_size": [h, w], "batch": batch, "initial_rank": r0, "shrunk_rank": shrunk,
                        "repeats": repeats, "threads": torch.get_num_threads(), "torch": torch.__version__,
                        "cpu": platform.processor() or platform.machine()}
    return results


def _train_step(model: torch.nn.Module, x: torch.Tensor) -> Callable[[], None]:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> None:
        out = model(x)
        sum(y.float().pow(2).mean() for y in out.values()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def print_table(results: dict) -> None:
    print(f"setup: {results['setup']}")
    print(f"{'inference form':24s} {'median s':>10s} {'x floor':>8s}")
    for k, v in results["inference_s"].items():
        print(f"{k:24s} {v:10.4f} {results['ratio_to_floor'][k]:8.3f}")
    for k, v in results["train_step_s"].items():
        print(f"train step {k:13s} {v:10.4f} {results['train_ratio_to_fused_r0'][k]:8.3f} (x fused at initial rank)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="faar_pascal_swin_t")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--shrunk", type=int, default=4, help="ranks kept per adapter for the shrunk forms")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--no-train", dest="train", action="store_false", help="skip the training-step timings")
    parser.add_argument("--quick", action="store_true", help="the tiny preset, few repeats (smoke test)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/adapter_cost.json"))
    args = parser.parse_args(argv)
    if args.quick:
        args.config, args.repeats, args.warmup, args.shrunk = "tiny", 3, 1, 2
    results = run(args.config, args.batch, args.shrunk, args.repeats, args.warmup, args.train)
    print_table(results)
    write_result(args.out, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
