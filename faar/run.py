"""The run directory: everything a training run leaves, written atomically.

    RUN_DIR/config.yaml          resolved config (for humans and --resume)
    RUN_DIR/model.safetensors    weights (adapters at their current, shrunk ranks)
    RUN_DIR/model.json           what rebuilds the model without the config file:
                                 format version, model config, class names, ranks
    RUN_DIR/state/               resumable training state (train.py)
    RUN_DIR/metrics.json, ranks.json, ranks.png

Nothing here unpickles: weights are safetensors, everything else JSON or YAML.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .config import ModelConfig, _build
from .model import FAARModel, build_model

FORMAT_VERSION = 1
MODEL_FILE = "model.safetensors"
META_FILE = "model.json"


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
    if version != FORMAT_VERSION:
        raise RunError(f"{run_dir} has run format {version!r}; this faar reads format {FORMAT_VERSION}")
    return meta


def load_model(run_dir: str | os.PathLike, device: str | torch.device = "cpu") -> FAARModel:
    """Rebuild the model of a run from ``model.json`` and load its weights (no config file)."""
    run_dir = Path(run_dir)
    meta = read_meta(run_dir)
    try:
        cfg = _build(ModelConfig, meta["model"], "model")
    except (KeyError, ValueError) as exc:
        raise RunError(f"{run_dir / META_FILE}: bad model description: {exc}") from exc
    classes = {t: v["classes"] for t, v in meta["tasks"].items() if v.get("classes")}
    model = build_model(cfg, classes=classes, load_weights=False)
    model.set_ranks(meta["ranks"])
    load_state_dict_shared(model, load_file(str(run_dir / MODEL_FILE)), str(run_dir / MODEL_FILE))
    return model.to(device).eval()
