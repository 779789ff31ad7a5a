"""Performance-Driven Rank Shrinking: sample prefixes, score ranks, remove the weak ones.

Per training step: every adapter gets a prefix gate ``[1]*b + [0]*(r-b)`` with
``b ~ Uniform{1..r}`` (nested-dropout style; the paper leaves the distribution open,
uniform is the simplest). The gate has ``requires_grad``; after the backward pass its
gradient *is* the importance ``s_i = 0.5 * (|<A_i, dL/dA_i>| + |<B_:,i, dL/dB_:,i>|)``
of every active rank (both halves equal ``dL/dgate_i``, see adapters.py), so no extra
backward is needed. Scores are an EMA over steps (``beta``), active ranks only.

At the end of a shrink epoch each adapter finds the smallest number ``K`` of ranks whose
score covers ``rho`` of its total (``rho_shared`` or ``rho_task``) and keeps
``min(rank, K + margin)`` of them, never fewer than ``min_rank`` (the floor). FAAR's
release shrinks the same way with margin 1 and floor 2 (our defaults too): shrinking
happens at every epoch end and never grows back, so with no margin the coverage set
of the *current* ranks is taken again and again, and over 300 epochs at rho 0.95 ranks
can ratchet down to 1; the margin keeps one spare component per adapter and the floor
stops the ratchet at 2. Kept components move to the front in score order, the tensors are
sliced (memory and FLOPs really drop), and the optimizer moments are sliced with them
(FAAR's release keeps pruned ranks in memory and drops the moments; we do neither).

Under DistributedDataParallel every process samples the same prefixes (same seed) and
scores are averaged across processes before a shrink, so all replicas stay identical.
Works on any module tree holding ``AdapterLinear``s.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from .adapters import AdapterLinear, adapters_of
from .config import PDRSConfig


class PDRS:
    def __init__(self, model: nn.Module, cfg: PDRSConfig, seed: int = 0) -> None:
        self.cfg = cfg
        self.adapters: dict[str, AdapterLinear] = adapters_of(model)
        self.scores: dict[str, torch.Tensor] = {
            n: torch.zeros(a.rank, device=a.lora_A.device) for n, a in self.adapters.items()
        }
        self._active: dict[str, int] = {}
        self.generator = torch.Generator().manual_seed(seed)

    def reseed(self, seed: int) -> None:
        """Make prefix sampling reproducible per epoch (resume lands on the same draws)."""
        self.generator.manual_seed(seed)

    def sample(self) -> None:
        """Draw a prefix size per adapter and install its gate for the next forward."""
        for name, a in self.adapters.items():
            r = a.rank
            b = int(torch.randint(1, r + 1, (1,), generator=self.generator))
            gate = torch.zeros(r, device=a.lora_A.device)
            gate[:b] = 1.0
            a.gate = gate.requires_grad_(True)
            self._active[name] = b

    @torch.no_grad()
    def accumulate(self, grad_scale: float = 1.0) -> None:
        """Fold this step's gate gradients into the EMA scores, then remove the gates.

        ``grad_scale``: the AMP loss scale the gradients carry (1 without AMP).
        Adapters whose output did not reach the loss keep their scores.
        """
        beta = self.cfg.beta
        for name, a in self.adapters.items():
            gate, a.gate = a.gate, None
            if gate is None or gate.grad is None:
                continue
            b = self._active[name]
            s = gate.grad[:b].abs() / grad_scale
            if torch.isfinite(s).all():
                self.scores[name][:b].mul_(beta).add_(s, alpha=1 - beta)
        self._active.clear()

    def clear(self) -> None:
        for a in self.adapters.values():
            a.gate = None
        self._active.clear()

    def keep_count(self, score: torch.Tensor, rho: float) -> int:
        """How many ranks to keep: the smallest K whose top-K scores cover ``rho`` of the total,
        plus ``margin``, at most the current rank and at least ``min_rank``."""
        rank = score.numel()
        total = score.sum()
        if not torch.isfinite(total) or total <= 0:
            return rank  # nothing learned yet: keep everything
        cum = score.sort(descending=True).values.cumsum(0) / total
        k = int((cum < rho).sum()) + 1
        return max(min(k + self.cfg.margin, rank), min(self.cfg.min_rank, rank))

    @torch.no_grad()
    def shrink(self, optimizer: torch.optim.Optimizer | None = None) -> dict[str, tuple[int, int]]:
        """Remove low-importance ranks for good; returns ``{name: (old_rank, new_rank)}``."""
        self.clear()
        self._sync_scores()
        changes = {}
        for name, a in self.adapters.items():
            score = self.scores[name]
            rho = self.cfg.rho_shared if a.group == "shared" else self.cfg.rho_task
            k = self.keep_count(score, rho)
            if k == a.rank:
                continue
            order = score.argsort(descending=True)[:k]
            old, old_A, old_B = a.rank, a.lora_A, a.lora_B
            a.keep(order)
            _move_optimizer_state(optimizer, old_A, a.lora_A, order, dim=0)
            _move_optimizer_state(optimizer, old_B, a.lora_B, order, dim=1)
            self.scores[name] = score[order].clone()
            changes[name] = (old, k)
        return changes

    def _sync_scores(self) -> None:
        if not (dist.is_available() and dist.is_initialized()) or not self.scores:
            return
        flat = torch.cat(list(self.scores.values()))
        dist.all_reduce(flat)
        flat /= dist.get_world_size()
        offset = 0
        for s in self.scores.values():
            s.copy_(flat[offset:offset + s.numel()])
            offset += s.numel()

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {f"pdrs.{n}": s.detach().cpu() for n, s in self.scores.items()}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, a in self.adapters.items():
            s = tensors.get(f"pdrs.{name}")
            if s is None or s.numel() != a.rank:
                raise ValueError(f"PDRS state does not match adapter {name} (rank {a.rank})")
            self.scores[name] = s.to(a.lora_A.device).clone()


def _move_optimizer_state(optimizer: torch.optim.Optimizer | None, old: torch.Tensor, new: torch.Tensor,
                          index: torch.Tensor, dim: int) -> None:
    """Point the optimizer at ``new`` and give it ``old``'s moments sliced along ``dim``."""
    if optimizer is None:
        return
    for group in optimizer.param_groups:
        group["params"] = [new if p is old else p for p in group["params"]]
    state = optimizer.state.pop(old, None)
    if state is None:
        return
    optimizer.state[new] = {
        k: v.index_select(dim, index.to(v.device)).contiguous() if torch.is_tensor(v) and v.shape == old.shape else v
        for k, v in state.items()
    }


def mean_rank(model: nn.Module) -> float:
    adapters = adapters_of(model)
    return sum(a.rank for a in adapters.values()) / max(len(adapters), 1)
