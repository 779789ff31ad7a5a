"""Adapter cost at inference and in training, measured side by side in one run.

Inference (eval, no grad), one model architecture in several forms:
  floor      the same network (per-task last blocks included) with plain linears and no
             adapters at all: the frozen weights, never adapted
  single     ``adapter.kind=none``: no per-task forks either (what the forks cost)
  merged     ``merge_model`` of the DoRA model: adapters folded into plain linears
  unmerged   the DoRA model as MTLoRA's / FAAR's own code runs it (they cannot merge),
             at the initial rank and after shrinking to ``--shrunk`` ranks per adapter
Training (one forward+backward+AdamW step): fused vs unmerged DoRA forward at the initial
rank and after shrinking, with the step's memory (see ``train_memory_mib``).

Besides time, every inference form's GFLOP per image is counted exactly
(``FlopCounterMode``): ``merged`` and ``floor`` must come out equal, which settles "adapters
cost nothing once merged" where the machine's timing noise cannot.

Every number is a median over ``--repeats`` timed runs after warm-up; every comparison is a
ratio to ``floor`` taken in the same process, because the machine is shared and noisy.

    python -m bench.adapter_cost --config faar_pascal_swin_t --batch 1 --out bench/results/adapter_cost_swin_t.json
    python -m bench.adapter_cost --quick   # tiny sizes, for the smoke test
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import torch

from bench.common import count_flops, eager_call, interleaved_medians, markdown_table, random_model, write_result
from faar.adapters import adapters_of
from faar.config import load_config
from faar.model import merge_model


def shrink_all(model: torch.nn.Module, rank: int) -> None:
    for a in adapters_of(model).values():
        a.keep(torch.arange(min(rank, a.rank)))


def train_memory_mib(model: torch.nn.Module, x: torch.Tensor) -> dict[str, float]:
    """Memory one training step holds at its peak (end of forward), device-independent.

    ``activations``: distinct storages autograd saves for backward, frozen weights excluded
    (they exist anyway; the fused DoRA weight ``W + BA`` built per call is counted, as it
    should be). ``trainable``: the adapters' and decoder's weights, gradients and the two
    AdamW moments (4x the trainable bytes). Counted, not sampled from the allocator, so the
    number is exact and the same on CPU and CUDA.
    """
    frozen = {p.untyped_storage().data_ptr() for p in model.parameters() if not p.requires_grad}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in frozen:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    del out
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    mib = 2.0 ** 20
    return {"activations": sum(saved.values()) / mib, "trainable": 4 * trainable / mib}


def run(config: str, batch: int, shrunk: int, repeats: int, warmup: int, train: bool) -> dict:
    cfg = load_config(config, ["model.pretrained=false"])
    h, w = cfg.model.img_size
    x = torch.randn(batch, 3, h, w)
    results: dict[str, dict] = {"inference_s": {}, "train_step_s": {}}

    dora = random_model(config, ["model.adapter.forward=unmerged"])
    r0 = max(a.rank for a in adapters_of(dora).values())
    shrunk_model = random_model(config, ["model.adapter.forward=unmerged"])
    shrink_all(shrunk_model, shrunk)
    models = {
        "floor": merge_model(random_model(config, adapted=False)),
        "single": random_model(config, ["model.adapter.kind=none"]),
        "merged": merge_model(dora),
        f"unmerged_r{r0}": dora,
        "merged_after_shrink": merge_model(shrunk_model),
        f"unmerged_r{shrunk}": shrunk_model,
    }
    forms = {k: eager_call(m.eval(), x) for k, m in models.items()}
    inf = results["inference_s"] = interleaved_medians(forms, repeats, warmup)
    results["gflop_per_image"] = {k: count_flops(m, x[:1]) / 1e9 for k, m in models.items()}

    if train:
        steps, memory = {}, {}
        for mode in ("fused", "unmerged"):
            for rank in (r0, shrunk):
                model = random_model(config, [f"model.adapter.forward={mode}"]).train()
                if rank != r0:
                    shrink_all(model, rank)
                memory[f"{mode}_r{rank}"] = train_memory_mib(model, x)
                steps[f"{mode}_r{rank}"] = _train_step(model, x)
        results["train_step_s"] = interleaved_medians(steps, max(repeats // 2, 2), 1)
        results["train_memory_mib"] = memory

    results["ratio_to_floor"] = {k: v / inf["floor"] for k, v in inf.items()}
    if results["train_step_s"]:
        base = results["train_step_s"][f"fused_r{r0}"]
        results["train_ratio_to_fused_r0"] = {k: v / base for k, v in results["train_step_s"].items()}
    results["setup"] = {"config": config, "img_size": [h, w], "batch": batch, "initial_rank": r0, "shrunk_rank": shrunk,
                        "repeats": repeats}
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
    print(markdown_table(["inference form", "median s", "x floor", "GFLOP/image"],
                         [[k, v, results["ratio_to_floor"][k], results["gflop_per_image"][k]]
                          for k, v in results["inference_s"].items()]))
    if results["train_step_s"]:
        memory = results["train_memory_mib"]
        print(markdown_table(["training step", "median s", "x fused at initial rank", "activations MiB",
                              "trainable state MiB"],
                             [[k, v, results["train_ratio_to_fused_r0"][k], memory[k]["activations"],
                               memory[k]["trainable"]] for k, v in results["train_step_s"].items()]))


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
