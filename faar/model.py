"""FAARModel: the multi-task Swin + decoder, ``build_model`` and ``merge_model``."""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .adapters import AdapterLinear, adapters_of, is_adapter_param
from .backbone import MultiTaskSwin, create_swin
from .config import ModelConfig
from .decoder import MultiTaskDecoder
from .spectral import FFTBackend
from .tasks import TaskSpec, resolve_tasks

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class FAARModel(nn.Module):
    """Normalised image batch (B, 3, H, W) -> raw per-task maps at input resolution."""

    def __init__(self, backbone: MultiTaskSwin, decoder: MultiTaskDecoder, tasks: dict[str, TaskSpec],
                 config: ModelConfig) -> None:
        super().__init__()
        self.backbone = backbone
        self.decoder = decoder
        self.tasks = tasks
        self.config = config

    @property
    def img_size(self) -> tuple[int, int]:
        return self.backbone.img_size

    def feature_sizes(self, img_size: tuple[int, int] | None = None) -> list[tuple[int, int]]:
        h, w = img_size or self.img_size
        return [(h // s, w // s) for s in self.backbone.out_strides]

    def set_input_size(self, img_size: Sequence[int]) -> None:
        """Rebuild for another input size (multiple of 32); spectral filters are resampled."""
        img_size = (int(img_size[0]), int(img_size[1]))
        self.backbone.set_input_size(img_size)
        self.decoder.set_feature_sizes(self.feature_sizes(img_size))
        self.config.img_size = list(img_size)

    def set_fft_backend(self, backend: FFTBackend) -> None:
        self.decoder.set_fft_backend(backend)
        self.config.decoder.fft = backend

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if tuple(x.shape[-2:]) != self.img_size:
            raise ValueError(f"model built for {self.img_size} input, got {tuple(x.shape[-2:])}; "
                             "call set_input_size() to change it")
        out = self.decoder(self.backbone(x))
        size = x.shape[-2:]
        return {t: F.interpolate(y, size=size, mode="bilinear", align_corners=False) for t, y in out.items()}

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Post-processed maps: class indices for label tasks, activated maps otherwise."""
        return {t: self.tasks[t].postprocess(y) for t, y in self(x).items()}

    def ranks(self) -> dict[str, int]:
        return {name: a.rank for name, a in adapters_of(self).items()}

    def set_ranks(self, ranks: dict[str, int]) -> None:
        """Resize adapters to saved ranks (before loading a shrunk state dict)."""
        adapters = adapters_of(self)
        missing = set(ranks) ^ set(adapters)
        if missing:
            raise ValueError(f"rank table does not match the model's adapters: {sorted(missing)[:3]}")
        for name, r in ranks.items():
            adapters[name].set_rank(r)


def build_model(cfg: ModelConfig, classes: dict[str, Sequence[str]] | None = None,
                load_weights: bool = True) -> FAARModel:
    """Build a FAAR model from its config.

    ``classes`` (from the dataset) names label classes; ``load_weights=False`` skips
    pretrained backbone weights, for rebuilding a model whose weights come from a run.
    """
    tasks = resolve_tasks(cfg.tasks, classes, cfg.num_classes)
    img_size = (int(cfg.img_size[0]), int(cfg.img_size[1]))
    swin = create_swin(cfg.backbone, img_size,
                       pretrained=cfg.pretrained and load_weights,
                       weights=cfg.backbone_weights if load_weights else None,
                       drop_path_rate=cfg.drop_path_rate)
    backbone = MultiTaskSwin(swin, list(tasks), cfg.adapter, cfg.decoder.taps)
    feat_sizes = [(img_size[0] // s, img_size[1] // s) for s in backbone.out_strides]
    decoder = MultiTaskDecoder({t: s.channels for t, s in tasks.items()}, backbone.out_channels, feat_sizes,
                               cfg.decoder)
    model = FAARModel(backbone, decoder, tasks, copy.deepcopy(cfg))
    set_trainable(model, cfg.trainable)
    return model


def set_trainable(model: FAARModel, trainable: Sequence[str]) -> None:
    """Adapters, decoder and the named backbone parameters train; the rest is frozen.

    ``trainable`` holds name fragments (MTLoRA's set: patch_embed, norm,
    relative_position_bias_table, downsample) or ``"all"`` for full fine-tuning.
    The frozen weight under an adapter never trains.
    """
    adapter_bases = {id(p) for a in adapters_of(model).values() for p in a.base.parameters()}
    for name, p in model.backbone.named_parameters():
        if id(p) in adapter_bases:
            p.requires_grad_(False)
        elif is_adapter_param(name):
            p.requires_grad_(True)
        else:
            p.requires_grad_("all" in trainable or any(frag in name for frag in trainable))
    model.decoder.requires_grad_(True)


def parameter_summary(model: nn.Module) -> dict:
    """Total and trainable parameter counts, trainable split into the four groups."""
    groups = {"adapters": 0, "other_backbone": 0, "decoder": 0, "spectral": 0}
    total = trainable = 0
    for name, p in model.named_parameters():
        total += p.numel()
        if not p.requires_grad:
            continue
        trainable += p.numel()
        if name.startswith("backbone."):
            groups["adapters" if is_adapter_param(name) else "other_backbone"] += p.numel()
        elif ".spectral." in name:
            groups["spectral"] += p.numel()
        else:
            groups["decoder"] += p.numel()
    return {"total_parameters": total, "trainable_parameters": trainable, "trainable_by_group": groups}


@torch.no_grad()
def merge_model(model: FAARModel) -> FAARModel:
    """A copy with every adapter folded into a plain ``nn.Linear``, in eval mode.

    Task adapters sharing one frozen linear become independent per-task linears.
    The copy has no adapter modules, no rank gates, and nothing requires grad.
    """
    merged = copy.deepcopy(model).eval()
    for name, adapter in list(adapters_of(merged).items()):
        parent_name, _, leaf = name.rpartition(".")
        parent = merged.get_submodule(parent_name) if parent_name else merged
        setattr(parent, leaf, adapter.merge())
    merged.requires_grad_(False)
    assert not any(isinstance(m, AdapterLinear) for m in merged.modules())
    return merged
