"""A model whose adapters and TS-PD matter: the helper every model, merge and export test shares."""

from __future__ import annotations

import torch
from torch import nn

from faar.adapters import ADAPTER_PARAMS, adapters_of
from faar.spectral import TaskSpectralBlock


def randomize(model: nn.Module, std: float = 0.05, seed: int = 0) -> nn.Module:
    """Non-zero adapters (``lora_B`` starts at zero), DoRA magnitudes off ``||W||``, and every TS-PD
    parameter moved off its identity start, so merging, export and the spectra all have work to do."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for adapter in adapters_of(model).values():
            for name in ADAPTER_PARAMS:
                p = getattr(adapter, name, None)
                if name == "lora_B":
                    p.copy_(torch.randn(p.shape, generator=g) * std)
                elif name == "magnitude" and p is not None:
                    p.mul_(1 + 0.1 * torch.randn(p.shape, generator=g))
        for block in (m for m in model.modules() if isinstance(m, TaskSpectralBlock)):
            for p in block.parameters():
                p.add_(0.2 * torch.randn(p.shape, generator=g))
    return model
