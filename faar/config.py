"""Configs as data: YAML presets in ``faar/configs`` loaded into typed dataclasses.

A preset may name a ``base`` preset it extends. Command-line overrides are dotted
``key=value`` pairs whose values are parsed as YAML (``model.img_size=[512,512]``).
Every value is checked when the config is loaded, against its annotation: types,
``Literal`` choices and the ranges declared with ``Check`` (ranks >= 1, rho in (0, 1],
input sizes multiples of 32...), plus the cross-references between sections (loss
weights, single-task numbers and class counts must name model tasks). Errors name the
full dotted key, so a typo never silently trains the wrong model and a bad value never
waits for the backbone to be built.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml

from .adapters import ForwardMode
from .spectral import FFTBackend, SpectralFilter
from .tasks import TASKS


class ConfigError(ValueError):
    """A config file or override that cannot be applied."""


@dataclass(frozen=True)
class Check:
    """A condition on a loaded value, with the words that complete "must be ..."."""

    test: Callable[[Any], bool]
    words: str


PositiveInt = Annotated[int, Check(lambda v: v >= 1, ">= 1")]
NonNegativeInt = Annotated[int, Check(lambda v: v >= 0, ">= 0")]
PositiveFloat = Annotated[float, Check(lambda v: v > 0, "> 0")]
NonNegativeFloat = Annotated[float, Check(lambda v: v >= 0, ">= 0")]
Fraction = Annotated[float, Check(lambda v: 0 < v <= 1, "in (0, 1]")]
Probability = Annotated[float, Check(lambda v: 0 <= v < 1, "in [0, 1)")]
ImageSize = Annotated[
    list[Annotated[int, Check(lambda v: v >= 32 and v % 32 == 0, "a positive multiple of 32")]],
    Check(lambda v: len(v) == 2, "[height, width]"),
]
TaskName = Annotated[str, Check(lambda v: v in TASKS, f"a known task ({', '.join(TASKS)})")]
SharedTarget = Literal["qkv", "proj", "fc1", "fc2"]
TaskTarget = Literal["proj", "fc1", "fc2"]  # qkv is computed once per block, on the shared stream


@dataclass
class AdapterConfig:
    """Adapter placement and form (MTLoRA's layout; see backbone.py)."""

    kind: Literal["lora", "dora", "none"] = "dora"
    targets: list[SharedTarget] = field(default_factory=lambda: ["qkv", "proj", "fc1", "fc2"])
    task_targets: list[TaskTarget] = field(default_factory=lambda: ["proj", "fc1", "fc2"])
    rank_shared: PositiveInt = 64
    rank_task: PositiveInt = 64
    scale_shared: PositiveFloat = 4.0
    scale_task: PositiveFloat = 4.0
    # DoRA training forward: "fused" builds the merged weight then runs one linear
    # (fast where tokens are many), "unmerged" runs base + low-rank paths.
    forward: ForwardMode = "fused"
    # MTLoRA also puts shared adapters in the very last block, whose shared output
    # nothing reads; only needed to reproduce its parameter count.
    final_shared: bool = False


@dataclass
class DecoderConfig:
    """HRNet-style multi-scale head with the Task-Spectral Pyramidal Decoder."""

    # "merged": MTLoRA's taps, stage outputs after the next patch merging
    # (strides 8, 16, 32, 32); "stages": plain stage outputs (strides 4..32).
    taps: Literal["merged", "stages"] = "merged"
    branch_channels: Annotated[list[PositiveInt], Check(lambda v: len(v) == 4, "four values (one per stage)")] = \
        field(default_factory=lambda: [18, 36, 72, 144])
    hidden_ratio: PositiveInt = 4
    spectral: bool = True
    # CW-SP filter form (spectral.py): "channel" (as published: a filter per channel, added
    # to the input through a learned scale) or "shared" (one filter per task and level).
    spectral_filter: SpectralFilter = "channel"
    xt_cons: bool = True
    fft: FFTBackend = "torch"
    low_freq_radius: Annotated[float, Check(lambda v: 0 < v < 1.5, "in (0, 1.5)")] = 0.25


@dataclass
class ModelConfig:
    backbone: str = "swin_tiny_patch4_window7_224"
    pretrained: bool = False
    backbone_weights: str | None = None
    img_size: ImageSize = field(default_factory=lambda: [448, 448])
    drop_path_rate: Probability = 0.1
    tasks: Annotated[list[TaskName], Check(lambda v: len(v) >= 1 and len(set(v)) == len(v),
                                           "a non-empty list without repeats")] = \
        field(default_factory=lambda: ["semseg", "human_parts", "saliency", "normals"])
    # Overrides of the registry's channel count per label task (e.g. NYUD semseg: 40).
    num_classes: dict[str, PositiveInt] = field(default_factory=dict)
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
    rho_shared: Fraction = 0.95
    rho_task: Fraction = 0.95
    beta: Probability = 0.9
    # An adapter keeps min(rank, K + margin) components, never fewer than min_rank (the
    # floor), where K covers rho of its score. FAAR's release: margin 1, floor 2.
    margin: NonNegativeInt = 1
    min_rank: PositiveInt = 2
    # Shrink at the end of these epochs (1-based); empty means every epoch.
    epochs: list[PositiveInt] = field(default_factory=list)


@dataclass
class DataConfig:
    dataset: Literal["scenes", "pascal_context", "nyud"] = "scenes"
    root: str | None = None
    train_split: str = "train"
    val_split: str = "val"
    # scenes only: how many images to generate per split, and the seed.
    num_train: PositiveInt = 512
    num_val: PositiveInt = 64
    seed: int = 0
    # scenes only: drop each label of each training image with this probability
    # (partially labelled data; validation keeps every label).
    label_drop: Probability = 0.0
    augment: bool = True
    workers: NonNegativeInt = 0


@dataclass
class TrainConfig:
    epochs: PositiveInt = 300
    batch_size: PositiveInt = 32
    lr: PositiveFloat = 5e-4
    weight_decay: NonNegativeFloat = 1e-4
    warmup_epochs: NonNegativeInt = 0
    loss_weights: dict[str, NonNegativeFloat] = field(default_factory=dict)
    seed: int = 0
    amp: bool = True
    eval_every: PositiveInt = 1
    # Single-task numbers for the delta_m metric, per task per metric: a dataset's table,
    # of which delta_m uses the model's tasks (a single-task run compares on its one task).
    single_task: dict[TaskName, dict[str, float]] = field(default_factory=dict)


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
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return _build(tp, value, key)
    origin = typing.get_origin(tp)
    if origin is Annotated:
        return _checked(value, tp, key)
    if origin in (typing.Union, types.UnionType):
        return _union(value, typing.get_args(tp), key)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{key}: {value!r} is not one of {list(typing.get_args(tp))}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, typing.get_args(tp)[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        key_tp, value_tp = typing.get_args(tp)
        return {_coerce(str(k), key_tp, f"{key}.{k}"): _coerce(v, value_tp, f"{key}.{k}") for k, v in value.items()}
    return _scalar(value, tp, key)


def _checked(value: Any, tp: Any, key: str) -> Any:
    base, *checks = typing.get_args(tp)
    value = _coerce(value, base, key)
    for check in checks:
        if isinstance(check, Check) and not check.test(value):
            raise ConfigError(f"{key}: {value!r} must be {check.words}")
    return value


def _union(value: Any, args: tuple[Any, ...], key: str) -> Any:
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


# Scalar annotations: what a YAML value must be, and the words for the error.
_SCALARS: dict[type, tuple[Callable[[Any], bool], str]] = {
    float: (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number"),
    int: (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    bool: (lambda v: isinstance(v, bool), "true or false"),
    str: (lambda v: isinstance(v, str), "a string"),
}


def _scalar(value: Any, tp: Any, key: str) -> Any:
    if tp not in _SCALARS:
        return value
    accepts, words = _SCALARS[tp]
    if not accepts(value):
        raise ConfigError(f"{key}: expected {words}, got {value!r}")
    return float(value) if tp is float else value


def _build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls, include_extras=True)
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
    """A checked ``Config`` from plain data (a loaded YAML mapping)."""
    cfg = _build(Config, raw)
    _check_task_references(cfg)
    return cfg


def model_config_from_dict(raw: dict[str, Any]) -> ModelConfig:
    """A checked ``ModelConfig`` (the ``model`` section alone, e.g. from a run's ``model.json``)."""
    return _build(ModelConfig, raw, "model")


def _check_task_references(cfg: Config) -> None:
    """Sections that name tasks may name only the model's tasks."""
    tasks = set(cfg.model.tasks)
    for key, names in (("model.num_classes", cfg.model.num_classes), ("train.loss_weights", cfg.train.loss_weights)):
        unknown = sorted(set(names) - tasks)
        if unknown:
            raise ConfigError(f"{key}.{unknown[0]}: '{unknown[0]}' is not one of model.tasks {cfg.model.tasks}")
    unlabelled = sorted(t for t in cfg.model.num_classes if not TASKS[t].classes)
    if unlabelled:
        raise ConfigError(f"model.num_classes.{unlabelled[0]}: '{unlabelled[0]}' has no classes")


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
