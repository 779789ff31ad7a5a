"""Training: the loop, PDRS shrinking, evaluation, and a resumable run directory.

``train(cfg, out_dir)`` is what ``faar-train`` calls. Single process on CPU or one GPU
(AMP on CUDA), or several processes under ``torchrun`` (DistributedDataParallel; gloo
on CPU, nccl on GPU; rank 0 writes). Reproducible resume: the data order, the
augmentations and PDRS's prefix draws are seeded per epoch and the learning rate is a
pure function of the step, so a run killed at any point and resumed from its last
saved epoch follows the same path.

Training state per epoch (``RUN_DIR/state/epoch-NNNN/``, written to a temporary
directory and renamed, then ``state/LATEST`` is replaced atomically): weights,
optimizer moments and PDRS scores as safetensors, counters and ranks as JSON.
Loading never unpickles.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Iterable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, SequentialSampler, Subset
from tqdm import tqdm

from .adapters import adapters_of
from .config import Config, dump_config
from .data import build_dataset
from .metrics import MultiTaskMetrics, delta_m, trivial_baseline
from .model import FAARModel, build_model, parameter_summary
from .pdrs import PDRS, mean_rank
from .run import atomic_path, load_model, load_state_dict_shared, save_model, state_dict_for_save, write_json
from .tasks import TaskSpec

STATE_DIR = "state"
# The trivial predictor (class prior, mean depth...) is fit on this many training images.
TRIVIAL_FIT_IMAGES = 256


class TrainError(RuntimeError):
    """A training run that cannot start or continue as asked."""


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed() -> Dist:
    """Read torchrun's environment; a plain ``python`` run is a world of one."""
    use_cuda = torch.cuda.is_available()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist(device=torch.device("cuda" if use_cuda else "cpu"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), torch.device(f"cuda:{local}" if use_cuda else "cpu"))


def loss_weights(cfg: Config, tasks: dict[str, TaskSpec]) -> dict[str, float]:
    unknown = set(cfg.train.loss_weights) - set(tasks)
    if unknown:
        raise TrainError(f"train.loss_weights names task(s) not in the model: {sorted(unknown)}")
    return {t: cfg.train.loss_weights.get(t, spec.weight) for t, spec in tasks.items()}


def lr_at(cfg: Config, step: int, steps_per_epoch: int) -> float:
    """Linear warm-up then cosine decay to zero, a pure function of the step."""
    total = max(cfg.train.epochs * steps_per_epoch, 1)
    warm = cfg.train.warmup_epochs * steps_per_epoch
    if step < warm:
        return cfg.train.lr * (step + 1) / warm
    progress = (step - warm) / max(total - warm, 1)
    return cfg.train.lr * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def _to(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def _targets(batch: dict[str, Any], tasks: Iterable[str]) -> dict[str, torch.Tensor]:
    return {t: batch[t] for t in tasks}


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: DataLoader, tasks: dict[str, TaskSpec], device: torch.device,
             predictor=None) -> dict[str, dict[str, float]]:
    """Metrics of ``model`` (or of ``predictor(images)``) over ``loader``, summed across processes."""
    metrics = MultiTaskMetrics(tasks)
    was_training = model.training
    model.eval()
    for batch in loader:
        batch = _to(batch, device)
        preds = predictor(batch["image"]) if predictor is not None else model(batch["image"])
        metrics.update({t: p.float() for t, p in preds.items()}, _targets(batch, tasks))
    metrics.all_reduce()
    model.train(was_training)
    return metrics.compute()


def _rank_record(model: FAARModel) -> dict[str, dict[str, Any]]:
    return {n: {"rank": a.rank, "group": a.group, "site": a.site} for n, a in adapters_of(model).items()}


def rank_report(ranks: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Mean rank per stage for shared and task adapters, and whether the paper's pattern shows
    (task-specific and deep layers keep more rank than shallow shared ones)."""
    by: dict[tuple[str, int], list[int]] = {}
    for r in ranks.values():
        kind = "shared" if r["group"] == "shared" else "task"
        by.setdefault((kind, _site_key(r["site"])[0]), []).append(r["rank"])
    table = {f"{kind}_stage{stage}": sum(v) / len(v) for (kind, stage), v in sorted(by.items())}
    shared = [v for (kind, _), vs in by.items() if kind == "shared" for v in vs]
    task = [v for (kind, _), vs in by.items() if kind == "task" for v in vs]
    stages = sorted({stage for _, stage in by})
    first = [v for (_, st), vs in by.items() if st == stages[0] for v in vs]
    last = [v for (_, st), vs in by.items() if st == stages[-1] for v in vs]
    return {
        "mean_rank_by_stage": table,
        "task_keeps_more_than_shared": _mean(task) > _mean(shared) if task and shared else None,
        "deep_keeps_more_than_shallow": _mean(last) > _mean(first),
    }


def _mean(xs: list[int]) -> float:
    return sum(xs) / len(xs)


def plot_ranks(ranks: dict[str, dict[str, Any]], path: Path, title: str) -> None:
    """Heatmap of adapter ranks: rows are layers (stage.block.linear), columns shared/tasks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    sites = sorted({r["site"] for r in ranks.values()}, key=_site_key)
    groups = ["shared"] + sorted({r["group"] for r in ranks.values()} - {"shared"})
    grid = np.full((len(sites), len(groups)), np.nan)
    for r in ranks.values():
        grid[sites.index(r["site"]), groups.index(r["group"])] = r["rank"]
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(groups), 1.0 + 0.22 * len(sites)))
    im = ax.imshow(grid, aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(groups)), groups, rotation=30, ha="right")
    ax.set_yticks(range(len(sites)), sites, fontsize=7)
    for (i, j), v in np.ndenumerate(grid):
        if not np.isnan(v):
            ax.text(j, i, int(v), ha="center", va="center", fontsize=6, color="w")
    fig.colorbar(im, ax=ax, label="rank")
    ax.set_title(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def _site_key(site: str) -> tuple:
    stage, block, layer = site.split(".")
    return int(stage[1:]), int(block[1:]), ["qkv", "proj", "fc1", "fc2"].index(layer)


# --- resumable state ----------------------------------------------------------------


def save_state(run_dir: Path, epoch: int, step: int, model: FAARModel, optimizer: torch.optim.Optimizer,
               pdrs: PDRS | None, scaler: torch.amp.GradScaler | None, history: dict[str, Any]) -> None:
    state_root = run_dir / STATE_DIR
    state_root.mkdir(parents=True, exist_ok=True)
    final = state_root / f"epoch-{epoch:04d}"
    tmp = state_root / f".epoch-{epoch:04d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(state_dict_for_save(model), str(tmp / "weights.safetensors"))
    opt_tensors, opt_meta = _flatten_optimizer(optimizer)
    save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
    save_file(pdrs.state_tensors() if pdrs else {}, str(tmp / "pdrs.safetensors"))
    (tmp / "state.json").write_text(json.dumps({
        "epoch": epoch, "step": step, "ranks": model.ranks(), "optimizer": opt_meta,
        "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
        "history": history,
    }))
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    with atomic_path(state_root / "LATEST") as p:
        p.write_text(final.name)
    for old in state_root.glob("epoch-*"):
        if old != final:
            shutil.rmtree(old, ignore_errors=True)


def latest_state(run_dir: Path) -> Path | None:
    root = run_dir / STATE_DIR
    pointer = root / "LATEST"
    if pointer.is_file():
        path = root / pointer.read_text().strip()
        if (path / "state.json").is_file():
            return path
    complete = sorted(p for p in root.glob("epoch-*") if (p / "state.json").is_file())
    return complete[-1] if complete else None


def _flatten_optimizer(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{idx}.{k}"] = v.detach().contiguous().cpu()
            else:
                scalars[f"{idx}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, v in list(tensors.items()) + list(meta["scalars"].items()):
        idx, _, name = key.partition(".")
        state.setdefault(int(idx), {})[name] = v
    return {"state": state, "param_groups": meta["param_groups"]}


# --- the loop -------------------------------------------------------------------------


def _loader(ds, batch_size: int, shuffle: bool, d: Dist, seed: int, workers: int, drop_last: bool) -> DataLoader:
    if d.world > 1:
        sampler = DistributedSampler(ds, num_replicas=d.world, rank=d.rank, shuffle=shuffle, seed=seed)
    elif shuffle:
        sampler = RandomSampler(ds, generator=torch.Generator())
    else:
        sampler = SequentialSampler(ds)
    return DataLoader(ds, batch_size=batch_size, sampler=sampler, num_workers=workers, drop_last=drop_last,
                      pin_memory=d.device.type == "cuda", persistent_workers=workers > 0)


def _set_epoch(loader: DataLoader, epoch: int, seed: int) -> None:
    sampler = loader.sampler
    if isinstance(sampler, DistributedSampler):
        sampler.set_epoch(epoch)
    elif isinstance(sampler, RandomSampler):
        sampler.generator.manual_seed(seed * 1000 + epoch)


def train(cfg: Config, out_dir: str | os.PathLike, resume: bool = False, quiet: bool = False,
          log=print) -> dict[str, Any]:
    """Train (or resume) a run into ``out_dir``; returns the metrics history."""
    run_dir = Path(out_dir)
    d = setup_distributed()
    state_path = latest_state(run_dir) if run_dir.exists() else None
    if state_path is not None and not resume:
        raise TrainError(f"{run_dir} already holds a training run ({state_path.name}); "
                         "pass --resume to continue it or choose another --out")

    torch.manual_seed(cfg.train.seed)
    tasks_list = cfg.model.tasks
    img_size = (cfg.model.img_size[0], cfg.model.img_size[1])
    train_ds = build_dataset(cfg.data, cfg.data.train_split, tasks_list, img_size, train=True)
    val_ds = build_dataset(cfg.data, cfg.data.val_split, tasks_list, img_size, train=False)
    if len(train_ds) < cfg.train.batch_size * d.world:
        raise TrainError(f"training set has {len(train_ds)} images, fewer than one batch "
                         f"({cfg.train.batch_size} x {d.world} processes)")
    model = build_model(cfg.model, classes=train_ds.classes)
    history: dict[str, Any] = {"epochs": [], "ranks": {"initial": _rank_record(model), "epochs": []}}
    meta = json.loads((state_path / "state.json").read_text()) if state_path is not None else None
    if meta is not None:
        model.set_ranks(meta["ranks"])
        load_state_dict_shared(model, load_file(str(state_path / "weights.safetensors")), str(state_path))
    model.to(d.device)
    tasks = model.tasks
    weights = loss_weights(cfg, tasks)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    use_amp = cfg.train.amp and d.device.type == "cuda"
    amp_dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)
    pdrs = PDRS(model, cfg.pdrs, seed=cfg.train.seed) if cfg.pdrs.enabled and adapters_of(model) else None

    start_epoch, step = 1, 0
    if meta is not None:
        if pdrs is not None:
            pdrs.load_state_tensors(load_file(str(state_path / "pdrs.safetensors")))
        optimizer.load_state_dict(_unflatten_optimizer(load_file(str(state_path / "optimizer.safetensors")),
                                                       meta["optimizer"]))
        if meta["scaler"]:
            scaler.load_state_dict(meta["scaler"])
        history = meta["history"]
        start_epoch, step = meta["epoch"] + 1, meta["step"]
        if d.main:
            log(f"resuming {run_dir} after epoch {meta['epoch']} (step {step})")

    workers = cfg.data.workers
    train_loader = _loader(train_ds, cfg.train.batch_size, True, d, cfg.train.seed, workers, drop_last=True)
    val_loader = _loader(val_ds, cfg.train.batch_size, False, d, cfg.train.seed, workers, drop_last=False)
    steps_per_epoch = len(train_loader)

    if d.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        with atomic_path(run_dir / "config.yaml") as p:
            p.write_text(dump_config(cfg))
        summary = parameter_summary(model)
        log(f"model: {summary['trainable_parameters']:,} trainable of {summary['total_parameters']:,} "
            f"parameters; {len(train_ds)} train / {len(val_ds)} val images; device {d.device} x {d.world}")
    if "trivial" not in history:
        fit_on = Subset(train_ds, range(min(len(train_ds), TRIVIAL_FIT_IMAGES)))
        predictor = trivial_baseline(tasks, (_targets(b, tasks) for b in DataLoader(fit_on, batch_size=16)))
        history["trivial"] = evaluate(model, val_loader, tasks, d.device, predictor=predictor)

    wrapped = _wrap(model, d, cfg)
    for epoch in range(start_epoch, cfg.train.epochs + 1):
        torch.manual_seed(cfg.train.seed * 1000 + epoch)
        _set_epoch(train_loader, epoch, cfg.train.seed)
        if pdrs is not None:
            pdrs.reseed(cfg.train.seed * 1000 + epoch)
        model.train()
        t0 = time.perf_counter()
        compute_time, loss_sum, n = 0.0, 0.0, 0
        bar = tqdm(train_loader, desc=f"epoch {epoch}/{cfg.train.epochs}", disable=quiet or not d.main,
                   dynamic_ncols=True, leave=False)
        for batch in bar:
            batch = _to(batch, d.device)
            ts = time.perf_counter()
            for group in optimizer.param_groups:
                group["lr"] = lr_at(cfg, step, steps_per_epoch)
            if pdrs is not None:
                pdrs.sample()
            autocast = torch.autocast("cuda", dtype=amp_dtype) if use_amp else nullcontext()
            with autocast:
                out = wrapped(batch["image"])
                losses = {t: tasks[t].compute_loss(out[t].float(), batch[t]) for t in tasks}
                total = sum(weights[t] * losses[t] for t in tasks)
            if not torch.isfinite(total):
                raise TrainError(f"non-finite loss at epoch {epoch} step {step}: "
                                 + ", ".join(f"{t}={v.item():.4g}" for t, v in losses.items()))
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(total).backward()
            if pdrs is not None:
                pdrs.accumulate(scaler.get_scale() if scaler.is_enabled() else 1.0)
            scaler.step(optimizer)
            scaler.update()
            if d.device.type == "cuda":
                torch.cuda.synchronize(d.device)
            compute_time += time.perf_counter() - ts
            loss_sum += total.item()
            n += 1
            step += 1
            bar.set_postfix(loss=f"{loss_sum / n:.3f}", rank=f"{mean_rank(model):.1f}")
        bar.close()
        train_time = time.perf_counter() - t0
        step_time = compute_time / max(n, 1)
        rank_before = mean_rank(model)
        shrunk = {}
        if pdrs is not None and (not cfg.pdrs.epochs or epoch in cfg.pdrs.epochs):
            shrunk = pdrs.shrink(optimizer)
            if shrunk:
                wrapped = _wrap(model, d, cfg)  # DDP must see the new parameter shapes
        val = evaluate(model, val_loader, tasks, d.device) if epoch % cfg.train.eval_every == 0 \
            or epoch == cfg.train.epochs else None
        entry = {
            "epoch": epoch, "train_loss": loss_sum / max(n, 1), "step_time_s": step_time, "epoch_time_s": train_time,
            "mean_rank_before_shrink": rank_before, "mean_rank": mean_rank(model), "adapters_shrunk": len(shrunk),
            "val": val, "delta_m": delta_m(val, cfg.train.single_task) if val and cfg.train.single_task else None,
        }
        history["epochs"].append(entry)
        history["ranks"]["epochs"].append({"epoch": epoch, "ranks": {n: a.rank for n, a in adapters_of(model).items()}})
        if d.main:
            save_model(model, run_dir, extra={"epoch": epoch})
            save_state(run_dir, epoch, step, model, optimizer, pdrs, scaler, history)
            write_json(run_dir / "metrics.json", {"trivial": history["trivial"], "epochs": history["epochs"]})
            history["ranks"]["report"] = rank_report(_rank_record(model))
            write_json(run_dir / "ranks.json", history["ranks"])
            if adapters_of(model):
                plot_ranks(_rank_record(model), run_dir / "ranks.png",
                           f"adapter ranks after epoch {epoch} (mean {mean_rank(model):.1f})")
            log(_epoch_line(entry))
        if d.world > 1:
            dist.barrier()
    if d.main and "report" in history["ranks"]:
        report = history["ranks"]["report"]
        log("rank pattern: task-specific keep more than shared: {}; deepest stage keeps more than the first: {}"
            .format(report["task_keeps_more_than_shared"], report["deep_keeps_more_than_shallow"]))
    if d.world > 1:
        dist.destroy_process_group()
    return history


def _wrap(model: FAARModel, d: Dist, cfg: Config) -> torch.nn.Module:
    if d.world == 1:
        return model
    ids = [d.device.index] if d.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=cfg.model.adapter.final_shared)


def _epoch_line(e: dict[str, Any]) -> str:
    parts = [f"epoch {e['epoch']}: loss {e['train_loss']:.4f}", f"step {e['step_time_s'] * 1000:.0f} ms",
             f"mean rank {e['mean_rank_before_shrink']:.2f} -> {e['mean_rank']:.2f}"]
    for task, m in (e["val"] or {}).items():
        key = next(iter(m))
        parts.append(f"{task} {key} {m[key]:.3f}")
    if e["delta_m"] is not None:
        parts.append(f"delta_m {e['delta_m']:+.2f}%")
    return " | ".join(parts)


def evaluate_run(run_dir: str | os.PathLike, cfg: Config, device: str | None = None) -> dict[str, Any]:
    """Evaluate a run's saved model on the configured validation split."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = load_model(run_dir, dev)
    img_size = model.img_size
    val_ds = build_dataset(cfg.data, cfg.data.val_split, list(model.tasks), img_size, train=False)
    loader = DataLoader(val_ds, batch_size=cfg.train.batch_size, num_workers=cfg.data.workers)
    val = evaluate(model, loader, model.tasks, dev)
    return {"val": val, "delta_m": delta_m(val, cfg.train.single_task) if cfg.train.single_task else None}
