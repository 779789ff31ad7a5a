"""The HRNet-style multi-scale head with the Task-Spectral Pyramidal Decoder (TS-PD).

Per task (MTLoRA's head): a bias-free 1x1 conv brings each of the four stage features
to ``branch_channels``; all branches are upsampled to the first branch's resolution,
concatenated, and a 1x1 conv (x ``hidden_ratio``), BatchNorm, ReLU and a 1x1 conv
give the task's output.

TS-PD sits between the branch projections and the fusion, at every resolution of the
pyramid: there every task's map has the same channel count, so one
``TaskSpectralBlock`` per resolution filters each task (CW-SP) and aligns it with the
others (XT-Cons). ``decoder.spectral_filter`` picks the CW-SP form (spectral.py:
``channel`` as published, ``shared`` the lighter one); ``decoder.spectral: false``
removes TS-PD for ablations.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import DecoderConfig
from .spectral import FFTBackend, TaskSpectralBlock


class FusionHead(nn.Module):
    """Concatenate upsampled branches, then conv-BN-ReLU-conv to the task's channels."""

    def __init__(self, in_channels: int, out_channels: int, hidden_ratio: int) -> None:
        super().__init__()
        hidden = in_channels * hidden_ratio
        self.fuse = nn.Conv2d(in_channels, hidden, 1)
        self.bn = nn.BatchNorm2d(hidden)
        self.out = nn.Conv2d(hidden, out_channels, 1)

    def forward(self, branches: list[torch.Tensor]) -> torch.Tensor:
        size = branches[0].shape[-2:]
        ups = [branches[0]] + [F.interpolate(b, size=size, mode="bilinear", align_corners=False)
                               for b in branches[1:]]
        return self.out(F.relu(self.bn(self.fuse(torch.cat(ups, 1)))))


class MultiTaskDecoder(nn.Module):
    def __init__(self, tasks: dict[str, int], in_channels: list[int], feat_sizes: list[tuple[int, int]],
                 cfg: DecoderConfig) -> None:
        """``tasks``: name -> output channels; ``feat_sizes``: (H, W) of each input level."""
        super().__init__()
        if len(cfg.branch_channels) != len(in_channels):
            raise ValueError(f"decoder.branch_channels needs {len(in_channels)} values, "
                             f"got {cfg.branch_channels}")
        self.tasks = list(tasks)
        pairs = list(zip(in_channels, cfg.branch_channels, strict=True))
        self.project = nn.ModuleDict(
            {t: nn.ModuleList(nn.Conv2d(ci, co, 1, bias=False) for ci, co in pairs) for t in tasks}
        )
        self.spectral = None
        if cfg.spectral:
            self.spectral = nn.ModuleList(
                TaskSpectralBlock(len(tasks), co, size, cfg.fft, cfg.xt_cons, cfg.low_freq_radius, cfg.spectral_filter)
                for co, size in zip(cfg.branch_channels, feat_sizes, strict=True)
            )
        self.heads = nn.ModuleDict({t: FusionHead(sum(cfg.branch_channels), n, cfg.hidden_ratio)
                                    for t, n in tasks.items()})

    def set_feature_sizes(self, feat_sizes: list[tuple[int, int]]) -> None:
        if self.spectral is not None:
            for block, size in zip(self.spectral, feat_sizes, strict=True):
                block.set_size(size)

    def set_fft_backend(self, backend: FFTBackend) -> None:
        if self.spectral is not None:
            for block in self.spectral:
                block.set_backend(backend)

    def forward(self, feats: dict[str, list[torch.Tensor]]) -> dict[str, torch.Tensor]:
        branches = {t: [conv(f) for conv, f in zip(self.project[t], feats[t], strict=True)] for t in self.tasks}
        if self.spectral is not None:
            for level, block in enumerate(self.spectral):
                filtered = block([branches[t][level] for t in self.tasks])
                for t, y in zip(self.tasks, filtered, strict=True):
                    branches[t][level] = y
        return {t: self.heads[t](branches[t]) for t in self.tasks}
