"""The run directory: everything a training run leaves, written atomically.

    RUN_DIR/config.yaml          resolved config (for humans and --resume)
    RUN_DIR/model.safetensors    weights (adapters at their current, shrunk ranks)
    RUN_DIR/model.json           what rebuilds the model without the config file:
                                 format version, model config, class names, ranks
    RUN_DIR/state/epoch-NNNN/    resumable training state: weights.safetensors,
                                 optimizer.safetensors (AdamW moments), pdrs.safetensors
                                 (importance scores), state.json (counters, ranks, history)
    RUN_DIR/state/LATEST         the name of the last complete state folder
    RUN_DIR/metrics.json, ranks.json, ranks.png

A state folder is written to a temporary folder and renamed, then ``LATEST`` replaced
atomically, so ``kill -9`` at any moment leaves the last good epoch. Nothing here
unpickles: weights are safetensors, everything else JSON or YAML.

Run format 2 added ``decoder.spectral_filter`` (default ``channel``); a format-1
``model.json`` predates it and is read as ``shared``, the only form then.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .config import ConfigError, model_config_from_dict
from .model import FAARModel, build_model

FORMAT_VERSION = 2
READS_FORMATS = (1, 2)
MODEL_FILE = "model.safetensors"
META_FILE = "model.json"
STATE_DIR = "state"


class RunError(ValueError):
    """A run directory that is missing, incomplete or from an incompatible version."""


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it over ``path`` only on success.

    A crash (even SIGKILL) mid-write leaves the previous file intact.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2) + "\n")


def state_dict_for_save(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A state dict with tensors that share storage written once (safetensors refuses aliases)."""
    out: dict[str, torch.Tensor] = {}
    seen: dict[tuple[int, int, tuple[int, ...]], str] = {}
    for k, v in module.state_dict().items():
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape))
        if key in seen:
            continue
        seen[key] = k
        out[k] = v.detach().contiguous().cpu()
    return out


def load_state_dict_shared(module: torch.nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Load tensors saved by ``state_dict_for_save``; aliases of a saved tensor are fine."""
    result = module.load_state_dict(tensors, strict=False)
    expected = module.state_dict()
    aliased = {k for k in result.missing_keys if _has_alias_in(k, expected, tensors)}
    missing = [k for k in result.missing_keys if k not in aliased]
    if missing or result.unexpected_keys:
        raise RunError(f"{source} does not match the model: missing {missing[:3]}, "
                       f"unexpected {result.unexpected_keys[:3]}")


def _has_alias_in(key: str, expected: dict[str, torch.Tensor], saved: dict[str, torch.Tensor]) -> bool:
    ptr = expected[key].untyped_storage().data_ptr()
    return any(expected[k].untyped_storage().data_ptr() == ptr for k in saved if k in expected)


def save_model(model: FAARModel, run_dir: str | os.PathLike, extra: dict[str, Any] | None = None) -> None:
    """Write ``model.safetensors`` and ``model.json`` (both atomically)."""
    run_dir = Path(run_dir)
    with atomic_path(run_dir / MODEL_FILE) as tmp:
        save_file(state_dict_for_save(model), str(tmp), metadata={"format_version": str(FORMAT_VERSION)})
    meta = {
        "format_version": FORMAT_VERSION,
        "model": dataclasses.asdict(model.config),
        "tasks": {t: {"kind": s.kind, "channels": s.channels, "classes": list(s.classes)}
                  for t, s in model.tasks.items()},
        "ranks": model.ranks(),
        **(extra or {}),
    }
    write_json(run_dir / META_FILE, meta)


def read_meta(run_dir: str | os.PathLike) -> dict[str, Any]:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunError(f"run directory not found: {run_dir}")
    for name in (META_FILE, MODEL_FILE):
        if not (run_dir / name).is_file():
            raise RunError(f"{run_dir} is incomplete: {name} is missing (did training finish an epoch?)")
    try:
        meta = json.loads((run_dir / META_FILE).read_text())
    except json.JSONDecodeError as exc:
        raise RunError(f"{run_dir / META_FILE} is not valid JSON: {exc}") from exc
    version = meta.get("format_version")
    if version not in READS_FORMATS:
        raise RunError(f"{run_dir} has run format {version!r}; this faar reads formats {list(READS_FORMATS)}")
    if version == 1:
        meta.get("model", {}).get("decoder", {}).setdefault("spectral_filter", "shared")
    return meta


def load_model(run_dir: str | os.PathLike, device: str | torch.device = "cpu") -> FAARModel:
    """Rebuild the model of a run from ``model.json`` and load its weights (no config file)."""
    run_dir = Path(run_dir)
    meta = read_meta(run_dir)
    try:
        cfg = model_config_from_dict(meta["model"])
    except (KeyError, ConfigError) as exc:
        raise RunError(f"{run_dir / META_FILE}: bad model description: {exc}") from exc
    classes = {t: v["classes"] for t, v in meta["tasks"].items() if v.get("classes")}
    model = build_model(cfg, classes=classes, load_weights=False)
    model.set_ranks(meta["ranks"])
    load_state_dict_shared(model, load_file(str(run_dir / MODEL_FILE)), str(run_dir / MODEL_FILE))
    return model.to(device).eval()


# --- resumable training state ------------------------------------------------------------


@dataclass
class TrainState:
    """What ``save_state`` wrote for one epoch, read back (tensors on the CPU)."""

    path: Path
    epoch: int
    step: int
    ranks: dict[str, int]
    history: dict[str, Any]
    weights: dict[str, torch.Tensor]
    optimizer: dict[str, Any]  # an ``Optimizer.state_dict()``
    pdrs: dict[str, torch.Tensor]
    scaler: dict[str, Any] | None


def save_state(run_dir: Path, epoch: int, step: int, model: FAARModel, optimizer: torch.optim.Optimizer,
               pdrs: dict[str, torch.Tensor], scaler: dict[str, Any] | None, history: dict[str, Any]) -> None:
    """Write ``state/epoch-NNNN`` for ``epoch``, point ``state/LATEST`` at it, drop older epochs."""
    state_root = run_dir / STATE_DIR
    state_root.mkdir(parents=True, exist_ok=True)
    final = state_root / f"epoch-{epoch:04d}"
    tmp = state_root / f".epoch-{epoch:04d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(state_dict_for_save(model), str(tmp / "weights.safetensors"))
    opt_tensors, opt_meta = _flatten_optimizer(optimizer)
    save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
    save_file(pdrs, str(tmp / "pdrs.safetensors"))
    (tmp / "state.json").write_text(json.dumps({
        "epoch": epoch, "step": step, "ranks": model.ranks(), "optimizer": opt_meta, "scaler": scaler,
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
    """The last complete state folder of a run, or None."""
    root = run_dir / STATE_DIR
    pointer = root / "LATEST"
    if pointer.is_file():
        path = root / pointer.read_text().strip()
        if (path / "state.json").is_file():
            return path
    complete = sorted(p for p in root.glob("epoch-*") if (p / "state.json").is_file())
    return complete[-1] if complete else None


def load_state(path: Path) -> TrainState:
    """Read a state folder written by ``save_state``."""
    meta = json.loads((path / "state.json").read_text())
    optimizer = _unflatten_optimizer(load_file(str(path / "optimizer.safetensors")), meta["optimizer"])
    return TrainState(path=path, epoch=meta["epoch"], step=meta["step"], ranks=meta["ranks"], history=meta["history"],
                      weights=load_file(str(path / "weights.safetensors")), optimizer=optimizer,
                      pdrs=load_file(str(path / "pdrs.safetensors")), scaler=meta["scaler"])


def _flatten_optimizer(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """An optimizer state dict as safetensors tensors (``"<param index>.<name>"``) plus JSON metadata."""
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
