"""Configs as data: YAML presets in ``faar/configs`` loaded into typed dataclasses.

A preset may name a ``base`` preset it extends. Command-line overrides are dotted
``key=value`` pairs whose values are parsed as YAML (``model.img_size=[512,512]``).
Unknown keys anywhere are errors that name the full dotted key, so a typo never
silently trains the wrong model.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A config file or override that cannot be applied."""


@dataclass
class AdapterConfig:
    """Adapter placement and form (MTLoRA's layout; see backbone.py)."""

    kind: Literal["lora", "dora", "none"] = "dora"
    targets: list[str] = field(default_factory=lambda: ["qkv", "proj", "fc1", "fc2"])
    task_targets: list[str] = field(default_factory=lambda: ["proj", "fc1", "fc2"])
    rank_shared: int = 64
    rank_task: int = 64
    scale_shared: float = 4.0
    scale_task: float = 4.0
    # DoRA training forward: "fused" builds the merged weight then runs one linear
    # (fast where tokens are many), "unmerged" runs base + low-rank paths.
    forward: Literal["fused", "unmerged"] = "fused"
    # MTLoRA also puts shared adapters in the very last block, whose shared output
    # nothing reads; only needed to reproduce its parameter count.
    final_shared: bool = False


@dataclass
class DecoderConfig:
    """HRNet-style multi-scale head with the Task-Spectral Pyramidal Decoder."""

    # "merged": MTLoRA's taps, stage outputs after the next patch merging
    # (strides 8, 16, 32, 32); "stages": plain stage outputs (strides 4..32).
    taps: Literal["merged", "stages"] = "merged"
    branch_channels: list[int] = field(default_factory=lambda: [18, 36, 72, 144])
    hidden_ratio: int = 4
    spectral: bool = True
    xt_cons: bool = True
    fft: Literal["torch", "matmul"] = "torch"
    low_freq_radius: float = 0.25


@dataclass
class ModelConfig:
    backbone: str = "swin_tiny_patch4_window7_224"
    pretrained: bool = False
    backbone_weights: str | None = None
    img_size: list[int] = field(default_factory=lambda: [448, 448])
    drop_path_rate: float = 0.1
    tasks: list[str] = field(default_factory=lambda: ["semseg", "human_parts", "saliency", "normals"])
    # Overrides of the registry's channel count per label task (e.g. NYUD semseg: 40).
    num_classes: dict[str, int] = field(default_factory=dict)
    # Backbone parameters trained besides adapters (name fragments, MTLoRA's set),
    # or ["all"] for full fine-tuning.
    trainable: list[str] = field(
        default_factory=lambda: ["patch_embed", "norm", "relative_position_bias_table", "downsample"]
    )
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)


@dataclass
class PDRSConfig:
    """Performance-Driven Rank Shrinking (see pdrs.py)."""

    enabled: bool = True
    rho_shared: float = 0.95
    rho_task: float = 0.95
    beta: float = 0.9
    min_rank: int = 1
    # Shrink at the end of these epochs (1-based); empty means every epoch.
    epochs: list[int] = field(default_factory=list)


@dataclass
class DataConfig:
    dataset: Literal["scenes", "pascal_context", "nyud"] = "scenes"
    root: str | None = None
    train_split: str = "train"
    val_split: str = "val"
    # scenes only: how many images to generate per split, and the seed.
    num_train: int = 512
    num_val: int = 64
    seed: int = 0
    augment: bool = True
    workers: int = 0


@dataclass
class TrainConfig:
    epochs: int = 300
    batch_size: int = 32
    lr: float = 5e-4
    weight_decay: float = 1e-4
    warmup_epochs: int = 0
    loss_weights: dict[str, float] = field(default_factory=dict)
    seed: int = 0
    amp: bool = True
    eval_every: int = 1
    # Single-task numbers for the delta_m metric, per task per metric.
    single_task: dict[str, dict[str, float]] = field(default_factory=dict)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    pdrs: PDRSConfig = field(default_factory=PDRSConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``, building nested dataclasses."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return _build(tp, value, key)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError("; ".join(errors))
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {list(args)}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return {str(k): _coerce(v, args[1], f"{key}.{k}") for k, v in value.items()}
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    return value


def _build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(f"unknown config key '{where}{unknown[0]}' (known: {sorted(names)})")
    kwargs = {k: _coerce(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in data.items()}
    return cls(**kwargs)


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def preset_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("faar.configs").iterdir() if p.name.endswith(".yaml"))


def _read_raw(name_or_path: str) -> dict[str, Any]:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        text = path.read_text()
    else:
        res = resources.files("faar.configs") / f"{name_or_path}.yaml"
        if not res.is_file():
            raise ConfigError(f"unknown config '{name_or_path}' (presets: {', '.join(preset_names())})")
        text = res.read_text()
    raw = yaml.safe_load(text) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config {name_or_path} is not a mapping")
    base = raw.pop("base", None)
    return _merge(_read_raw(base), raw) if base else raw


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """Turn ``["a.b=1", "c=[2,3]"]`` into a nested dict with YAML-parsed values."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = yaml.safe_load(text)
    return out


def load_config(name_or_path: str | None = None, overrides: list[str] | None = None) -> Config:
    """Load a preset name or YAML file, apply dotted overrides, validate every key."""
    raw = _read_raw(name_or_path) if name_or_path else {}
    if overrides:
        raw = _merge(raw, parse_overrides(overrides))
    return config_from_dict(raw)


def config_from_dict(raw: dict[str, Any]) -> Config:
    return _build(Config, raw)


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
