"""Training: the loop, PDRS shrinking, evaluation, and a resumable run directory.

``train(cfg, out_dir)`` is what ``faar-train`` calls: a ``Trainer`` is set up (data, model,
optimizer, AMP, PDRS, restored state), then every epoch is one pass over the training set
(``train_epoch``) and its end (``end_epoch``: shrink, evaluate, save). Single process on
CPU or one GPU (AMP on CUDA), or several processes under ``torchrun``
(DistributedDataParallel; gloo on CPU, nccl on GPU; rank 0 writes). Reproducible resume:
the data order, the augmentations and PDRS's prefix draws are seeded per epoch and the
learning rate is a pure function of the step, so a run killed at any point and resumed
from its last saved epoch follows the same path. The run directory and its state are
``run.py``'s; the rank report and plot are ``ranks.py``'s.

Decisions:
- AMP uses bfloat16 only where the GPU has it in hardware (compute capability 8.0 and
  up): ``torch.cuda.is_bf16_supported()`` also says yes on a T4 (sm_75), where bf16 is
  emulated and slow. Elsewhere float16 with a GradScaler.
- Partial labels: a task's loss is the mean over the batch's labelled pixels, so a sample
  without that task's label (every pixel unlabelled; datasets turn a missing label into
  that, see ``faar.data``) adds nothing to it, and a batch where no sample has it adds 0.
  Metrics skip unlabelled pixels the same way.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, SequentialSampler, Subset
from tqdm import tqdm

from .adapters import adapters_of
from .config import Config, dump_config
from .data import build_dataset
from .metrics import MultiTaskMetrics, delta_m, trivial_baseline
from .model import build_model, parameter_summary
from .pdrs import PDRS, mean_rank
from .ranks import plot_ranks, rank_record, rank_report, report_line
from .run import (
    TrainState,
    atomic_path,
    latest_state,
    load_model,
    load_state,
    load_state_dict_shared,
    save_model,
    save_state,
    write_json,
)
from .tasks import TaskSpec

# The trivial predictor (class prior, mean depth...) is fit on this many training images.
TRIVIAL_FIT_IMAGES = 256
BF16_MIN_CAPABILITY = (8, 0)  # Ampere: bfloat16 in hardware


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


def amp_dtype(capability: tuple[int, int]) -> torch.dtype:
    """The autocast dtype for a CUDA device of this compute capability (module docstring)."""
    return torch.bfloat16 if tuple(capability) >= BF16_MIN_CAPABILITY else torch.float16


def loss_weights(cfg: Config, tasks: dict[str, TaskSpec]) -> dict[str, float]:
    return {t: cfg.train.loss_weights.get(t, spec.weight) for t, spec in tasks.items()}


def lr_at(cfg: Config, step: int, steps_per_epoch: int) -> float:
    """Linear warm-up then cosine decay to zero, a pure function of the step."""
    total = max(cfg.train.epochs * steps_per_epoch, 1)
    warm = cfg.train.warmup_epochs * steps_per_epoch
    if step < warm:
        return cfg.train.lr * (step + 1) / warm
    progress = (step - warm) / max(total - warm, 1)
    return cfg.train.lr * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def task_losses(tasks: dict[str, TaskSpec], out: dict[str, torch.Tensor],
                batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Every task's loss of raw outputs ``out`` against the batch's labels."""
    return {t: spec.compute_loss(out[t].float(), batch[t]) for t, spec in tasks.items()}


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


@dataclass
class EpochStats:
    """What one pass over the training set measured."""

    loss: float
    step_time_s: float
    epoch_time_s: float


class Trainer:
    """One training run: built by ``__init__`` (fresh or from the run's last state), driven by ``run``."""

    def __init__(self, cfg: Config, out_dir: str | os.PathLike, resume: bool = False, quiet: bool = False,
                 log=print) -> None:
        self.cfg, self.run_dir, self.quiet, self.log = cfg, Path(out_dir), quiet, log
        self.d = setup_distributed()
        state_path = latest_state(self.run_dir) if self.run_dir.exists() else None
        if state_path is not None and not resume:
            raise TrainError(f"{self.run_dir} already holds a training run ({state_path.name}); "
                             "pass --resume to continue it or choose another --out")
        torch.manual_seed(cfg.train.seed)
        self._build_data()
        self.model = build_model(cfg.model, classes=self.train_ds.classes)
        self.history: dict[str, Any] = {"epochs": [], "ranks": {"initial": rank_record(self.model), "epochs": []}}
        state = load_state(state_path) if state_path is not None else None
        if state is not None:
            self.model.set_ranks(state.ranks)
            load_state_dict_shared(self.model, state.weights, str(state_path))
        self.model.to(self.d.device)
        self.tasks = self.model.tasks
        self.weights = loss_weights(cfg, self.tasks)
        self.single_task = {t: v for t, v in cfg.train.single_task.items() if t in self.tasks}
        self.optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad],
                                           lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
        self.use_amp = cfg.train.amp and self.d.device.type == "cuda"
        self.amp_dtype = amp_dtype(torch.cuda.get_device_capability(self.d.device)) if self.use_amp else None
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp and self.amp_dtype == torch.float16)
        self.pdrs = PDRS(self.model, cfg.pdrs, seed=cfg.train.seed) \
            if cfg.pdrs.enabled and adapters_of(self.model) else None
        self.start_epoch, self.step = 1, 0
        if state is not None:
            self._restore(state)
        self._prepare_run_dir()
        self.wrapped = self._wrap()

    def _build_data(self) -> None:
        cfg, d = self.cfg, self.d
        img_size = (cfg.model.img_size[0], cfg.model.img_size[1])
        self.train_ds = build_dataset(cfg.data, cfg.data.train_split, cfg.model.tasks, img_size, train=True)
        self.val_ds = build_dataset(cfg.data, cfg.data.val_split, cfg.model.tasks, img_size, train=False)
        if len(self.train_ds) < cfg.train.batch_size * d.world:
            raise TrainError(f"training set has {len(self.train_ds)} images, fewer than one batch "
                             f"({cfg.train.batch_size} x {d.world} processes)")
        args = (cfg.train.batch_size, d, cfg.train.seed, cfg.data.workers)
        self.train_loader = _loader(self.train_ds, args[0], True, *args[1:], drop_last=True)
        self.val_loader = _loader(self.val_ds, args[0], False, *args[1:], drop_last=False)

    def _restore(self, state: TrainState) -> None:
        if self.pdrs is not None:
            self.pdrs.load_state_tensors(state.pdrs)
        self.optimizer.load_state_dict(state.optimizer)
        if state.scaler:
            self.scaler.load_state_dict(state.scaler)
        self.history = state.history
        self.start_epoch, self.step = state.epoch + 1, state.step
        if self.d.main:
            self.log(f"resuming {self.run_dir} after epoch {state.epoch} (step {state.step})")

    def _prepare_run_dir(self) -> None:
        if self.d.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            with atomic_path(self.run_dir / "config.yaml") as p:
                p.write_text(dump_config(self.cfg))
            summary = parameter_summary(self.model)
            self.log(f"model: {summary['trainable_parameters']:,} trainable of {summary['total_parameters']:,} "
                     f"parameters (TS-PD {summary['trainable_by_group']['spectral']:,}); {len(self.train_ds)} "
                     f"train / {len(self.val_ds)} val images; device {self.d.device} x {self.d.world}")
        if "trivial" not in self.history:
            fit_on = Subset(self.train_ds, range(min(len(self.train_ds), TRIVIAL_FIT_IMAGES)))
            targets = (_targets(b, self.tasks) for b in DataLoader(fit_on, batch_size=16))
            predictor = trivial_baseline(self.tasks, targets)
            self.history["trivial"] = evaluate(self.model, self.val_loader, self.tasks, self.d.device,
                                               predictor=predictor)

    def _wrap(self) -> torch.nn.Module:
        """The module the step runs: the model, or DDP around it (rebuilt after a shrink changes shapes)."""
        if self.d.world == 1:
            return self.model
        ids = [self.d.device.index] if self.d.device.type == "cuda" else None
        return DistributedDataParallel(self.model, device_ids=ids,
                                       find_unused_parameters=self.cfg.model.adapter.final_shared)

    def run(self) -> dict[str, Any]:
        """Train the remaining epochs; returns the metrics history."""
        for epoch in range(self.start_epoch, self.cfg.train.epochs + 1):
            self.end_epoch(epoch, self.train_epoch(epoch))
        if self.d.main and adapters_of(self.model):
            self.log(report_line(rank_report(rank_record(self.model))))
        if self.d.world > 1:
            dist.destroy_process_group()
        return self.history

    def train_epoch(self, epoch: int) -> EpochStats:
        """One pass over the training set, seeded by the epoch (resume lands on the same draws)."""
        seed = self.cfg.train.seed
        torch.manual_seed(seed * 1000 + epoch)
        _set_epoch(self.train_loader, epoch, seed)
        if self.pdrs is not None:
            self.pdrs.reseed(seed * 1000 + epoch)
        self.model.train()
        t0 = time.perf_counter()
        compute_time, loss_sum, n = 0.0, 0.0, 0
        bar = tqdm(self.train_loader, desc=f"epoch {epoch}/{self.cfg.train.epochs}",
                   disable=self.quiet or not self.d.main, dynamic_ncols=True, leave=False)
        for batch in bar:
            batch = _to(batch, self.d.device)
            ts = time.perf_counter()
            loss_sum += self._step(batch, epoch)
            compute_time += time.perf_counter() - ts
            n += 1
            bar.set_postfix(loss=f"{loss_sum / n:.3f}", rank=f"{mean_rank(self.model):.1f}")
        bar.close()
        return EpochStats(loss_sum / max(n, 1), compute_time / max(n, 1), time.perf_counter() - t0)

    def _step(self, batch: dict[str, Any], epoch: int) -> float:
        """One optimizer step on ``batch``; returns the weighted total loss."""
        steps_per_epoch = len(self.train_loader)
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(self.cfg, self.step, steps_per_epoch)
        if self.pdrs is not None:
            self.pdrs.sample()
        autocast = torch.autocast("cuda", dtype=self.amp_dtype) if self.use_amp else nullcontext()
        with autocast:
            losses = task_losses(self.tasks, self.wrapped(batch["image"]), batch)
            total = sum(self.weights[t] * losses[t] for t in self.tasks)
        if not torch.isfinite(total):
            raise TrainError(f"non-finite loss at epoch {epoch} step {self.step}: "
                             + ", ".join(f"{t}={v.item():.4g}" for t, v in losses.items()))
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        if self.pdrs is not None:
            self.pdrs.accumulate(self.scaler.get_scale() if self.scaler.is_enabled() else 1.0)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.d.device.type == "cuda":
            torch.cuda.synchronize(self.d.device)
        self.step += 1
        return total.item()

    def end_epoch(self, epoch: int, stats: EpochStats) -> None:
        """Shrink ranks, evaluate, record the epoch and save everything (rank 0)."""
        cfg = self.cfg
        rank_before = mean_rank(self.model)
        shrunk = {}
        if self.pdrs is not None and (not cfg.pdrs.epochs or epoch in cfg.pdrs.epochs):
            shrunk = self.pdrs.shrink(self.optimizer)
            if shrunk:
                self.wrapped = self._wrap()  # DDP must see the new parameter shapes
        val = None
        if epoch % cfg.train.eval_every == 0 or epoch == cfg.train.epochs:
            val = evaluate(self.model, self.val_loader, self.tasks, self.d.device)
        entry = {
            "epoch": epoch, "train_loss": stats.loss, "step_time_s": stats.step_time_s,
            "epoch_time_s": stats.epoch_time_s, "mean_rank_before_shrink": rank_before,
            "mean_rank": mean_rank(self.model), "adapters_shrunk": len(shrunk), "val": val,
            "delta_m": delta_m(val, self.single_task) if val and self.single_task else None,
        }
        self.history["epochs"].append(entry)
        self.history["ranks"]["epochs"].append({"epoch": epoch, "ranks": self.model.ranks()})
        if self.model.ranks():
            self.history["ranks"]["report"] = rank_report(rank_record(self.model))
        if self.d.main:
            self._save(epoch)
            self.log(_epoch_line(entry))
        if self.d.world > 1:
            dist.barrier()

    def _save(self, epoch: int) -> None:
        run_dir, h = self.run_dir, self.history
        save_model(self.model, run_dir, extra={"epoch": epoch})
        save_state(run_dir, epoch, self.step, self.model, self.optimizer,
                   self.pdrs.state_tensors() if self.pdrs else {},
                   self.scaler.state_dict() if self.scaler.is_enabled() else None, h)
        write_json(run_dir / "metrics.json", {"trivial": h["trivial"], "epochs": h["epochs"]})
        write_json(run_dir / "ranks.json", h["ranks"])
        if adapters_of(self.model):
            plot_ranks(rank_record(self.model), run_dir / "ranks.png",
                       f"adapter ranks after epoch {epoch} (mean {mean_rank(self.model):.1f})")


def train(cfg: Config, out_dir: str | os.PathLike, resume: bool = False, quiet: bool = False,
          log=print) -> dict[str, Any]:
    """Train (or resume) a run into ``out_dir``; returns the metrics history."""
    return Trainer(cfg, out_dir, resume=resume, quiet=quiet, log=log).run()


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
    val_ds = build_dataset(cfg.data, cfg.data.val_split, list(model.tasks), model.img_size, train=False)
    loader = DataLoader(val_ds, batch_size=cfg.train.batch_size, num_workers=cfg.data.workers)
    val = evaluate(model, loader, model.tasks, dev)
    single_task = {t: v for t, v in cfg.train.single_task.items() if t in model.tasks}
    return {"val": val, "delta_m": delta_m(val, single_task) if single_task else None}
