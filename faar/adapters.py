"""One low-rank adapter around a frozen ``nn.Linear``: LoRA or DoRA.

    LoRA: y = W x + b + s * B diag(g) A x
    DoRA: y = m / ||W + s B diag(g) A||_row * (W + s B diag(g) A) x + b

``g`` is the rank gate: all ones in eval, a prefix mask ``[1]*b + [0]*(r-b)`` while
PDRS samples (pdrs.py). Because A and B only enter through ``B diag(g) A``, the
gradient of a gate with ``requires_grad`` is the PDRS importance of each rank
component, for free. Decisions: the DoRA norm is per output feature and detached from
the graph (DoRA paper, sec. 4.3; peft does the same), and ``m`` starts at ``||W||``
so a zero ``B`` reproduces the frozen layer exactly.

The adapter knows nothing about Swin or PDRS: it exposes ``rank``, ``gate``,
``keep(indices)`` (physically shrink) and ``merge()`` (fold into a plain Linear).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

AdapterKind = Literal["lora", "dora"]
ForwardMode = Literal["fused", "unmerged"]
# The trainable parameters an adapter adds (``magnitude``: DoRA only), by attribute name:
# what decides "adapter parameter" for model.py's trainable set and parameter counts.
ADAPTER_PARAMS: tuple[str, ...] = ("lora_A", "lora_B", "magnitude")


class AdapterLinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank (LoRA/DoRA) update."""

    def __init__(self, base: nn.Linear, rank: int, kind: AdapterKind = "dora", scale: float = 1.0,
                 forward_mode: ForwardMode = "fused") -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"adapter rank must be >= 1, got {rank}")
        if kind not in ("lora", "dora"):
            raise ValueError(f"adapter kind must be 'lora' or 'dora', got {kind!r}")
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.kind: AdapterKind = kind
        self.scale = float(scale)
        self.forward_mode: ForwardMode = forward_mode
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=w.device, dtype=w.dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=w.device, dtype=w.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        if kind == "dora":
            self.magnitude = nn.Parameter(w.detach().norm(dim=1))
        # Set by PDRS for one forward/backward; None means every rank acts.
        self.gate: torch.Tensor | None = None
        # Opaque labels set by whoever injects the adapter: which stream it serves
        # ("shared" or a task name) and where it sits (for rank reports).
        self.group = "shared"
        self.site = ""

    @property
    def rank(self) -> int:
        return self.lora_A.shape[0]

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def extra_repr(self) -> str:
        return f"kind={self.kind}, rank={self.rank}, scale={self.scale}"

    def _scaled_A(self) -> torch.Tensor:
        a = self.lora_A * self.scale
        return a if self.gate is None else a * self.gate.to(a.dtype)[:, None]

    def delta_weight(self) -> torch.Tensor:
        return self.lora_B @ self._scaled_A()

    def _dora_factor(self, weight: torch.Tensor) -> torch.Tensor:
        return self.magnitude / weight.norm(dim=1).detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        W, bias = self.base.weight, self.base.bias
        if self.kind == "lora" or self.forward_mode == "unmerged":
            low_rank = F.linear(F.linear(x, self._scaled_A()), self.lora_B)
            if self.kind == "lora":
                return F.linear(x, W, bias) + low_rank
            factor = self._dora_factor(W + self.delta_weight())
            out = (F.linear(x, W) + low_rank) * factor
            return out if bias is None else out + bias
        merged = W + self.delta_weight()
        return F.linear(x, merged * self._dora_factor(merged)[:, None], bias)

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """The weight of the equivalent plain linear (every current rank acting)."""
        gate, self.gate = self.gate, None
        try:
            merged = self.base.weight + self.delta_weight()
            if self.kind == "dora":
                merged = merged * self._dora_factor(merged)[:, None]
        finally:
            self.gate = gate
        return merged

    @torch.no_grad()
    def merge(self) -> nn.Linear:
        """A new ``nn.Linear`` whose output equals this adapter's (float32 precision)."""
        w = self.base.weight
        lin = nn.Linear(self.in_features, self.out_features, bias=self.base.bias is not None,
                        device=w.device, dtype=w.dtype)
        lin.weight.copy_(self.merged_weight())
        if self.base.bias is not None:
            lin.bias.copy_(self.base.bias)
        lin.requires_grad_(False)
        return lin

    @torch.no_grad()
    def keep(self, indices: torch.Tensor) -> None:
        """Keep only rank components ``indices`` (in that order); the tensors shrink.

        The low-rank factors become new ``nn.Parameter`` objects (autograd caches a
        leaf's shape, so resizing ``.data`` in place is not safe); whoever holds an
        optimizer moves its state over (pdrs.py).
        """
        indices = torch.as_tensor(indices, dtype=torch.long, device=self.lora_A.device)
        if indices.numel() < 1:
            raise ValueError("an adapter must keep at least one rank component")
        self._replace_factors(self.lora_A[indices], self.lora_B[:, indices])

    @torch.no_grad()
    def set_rank(self, rank: int) -> None:
        """Resize to ``rank`` components (used to rebuild a shrunk model before loading)."""
        self._replace_factors(self.lora_A.new_zeros(rank, self.in_features),
                              self.lora_B.new_zeros(self.out_features, rank))

    def _replace_factors(self, a: torch.Tensor, b: torch.Tensor) -> None:
        grad = self.lora_A.requires_grad
        self.lora_A = nn.Parameter(a.contiguous(), requires_grad=grad)
        self.lora_B = nn.Parameter(b.contiguous(), requires_grad=grad)
        self.gate = None


def is_adapter_param(name: str) -> bool:
    """Whether a qualified parameter name (``...attn.qkv.lora_A``) is an adapter's own parameter."""
    return name.rsplit(".", 1)[-1] in ADAPTER_PARAMS


def adapters_of(module: nn.Module) -> dict[str, AdapterLinear]:
    """Every adapter in ``module`` by qualified name, in a stable order."""
    return {name: m for name, m in module.named_modules() if isinstance(m, AdapterLinear)}
