"""PDRS: prefix sampling, importance scores, coverage, physical shrink with optimizer state."""

from __future__ import annotations

import torch
from torch import nn

from faar.adapters import AdapterLinear
from faar.config import PDRSConfig, load_config
from faar.model import build_model
from faar.pdrs import PDRS, mean_rank


class Two(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = AdapterLinear(nn.Linear(8, 8), 6, "dora")
        self.b = AdapterLinear(nn.Linear(8, 4), 4, "lora")
        self.b.group = "semseg"
        nn.init.normal_(self.a.lora_B)
        nn.init.normal_(self.b.lora_B)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


def test_keep_count_covers_rho_with_floor() -> None:
    p = PDRS(Two(), PDRSConfig(rho_shared=0.9, margin=0, min_rank=1))
    assert p.keep_count(torch.tensor([5.0, 3.0, 1.0, 1.0]), 0.5) == 1
    assert p.keep_count(torch.tensor([5.0, 3.0, 1.0, 1.0]), 0.8) == 2
    assert p.keep_count(torch.tensor([5.0, 3.0, 1.0, 1.0]), 0.95) == 4
    assert p.keep_count(torch.tensor([1.0, 0.0, 0.0]), 0.95) == 1
    assert p.keep_count(torch.zeros(3), 0.95) == 3  # no signal yet: keep all
    p.cfg.min_rank = 3
    assert p.keep_count(torch.tensor([5.0, 0.0, 0.0, 0.0]), 0.5) == 3


def test_keep_count_margin_and_floor_as_the_release() -> None:
    """FAAR's release keeps max(floor, min(rank, K + margin)) with margin 1 and floor 2: our defaults."""
    cfg = PDRSConfig()
    assert (cfg.margin, cfg.min_rank) == (1, 2)
    p = PDRS(Two(), cfg)
    scores = torch.tensor([5.0, 3.0, 1.0, 1.0])
    assert p.keep_count(scores, 0.5) == 2  # K = 1, plus the margin
    assert p.keep_count(scores, 0.8) == 3  # K = 2, plus the margin
    assert p.keep_count(scores, 0.95) == 4  # K = 4: never more than the current rank
    assert p.keep_count(torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0]), 0.5) == 2  # K = 1
    assert p.keep_count(torch.tensor([1.0]), 0.5) == 1  # an adapter already below the floor stays
    p.cfg.margin = 3
    assert p.keep_count(torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0, 0.0]), 0.5) == 4


def test_sampled_prefix_and_scores_only_for_active_ranks() -> None:
    model = Two()
    p = PDRS(model, PDRSConfig(beta=0.5), seed=3)
    p.sample()
    b = int(model.a.gate.sum())
    assert torch.equal(model.a.gate, torch.cat([torch.ones(b), torch.zeros(6 - b)]))
    model(torch.randn(16, 8)).pow(2).sum().backward()
    grad = model.a.gate.grad.clone()
    p.accumulate()
    assert model.a.gate is None
    assert torch.allclose(p.scores["a"][:b], 0.5 * grad[:b].abs())
    assert torch.all(p.scores["a"][b:] == 0)


def test_shrink_moves_best_to_front_and_slices_optimizer_state() -> None:
    model = Two()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(torch.randn(4, 8)).sum().backward()
    opt.step()
    p = PDRS(model, PDRSConfig(rho_shared=0.8, rho_task=0.99, margin=0, min_rank=1))
    p.scores["a"] = torch.tensor([0.1, 4.0, 0.1, 0.1, 5.0, 0.1])  # keep 4 then 1
    p.scores["b"] = torch.tensor([1.0, 1.0, 1.0, 1.0])
    A_before = model.a.lora_A.detach().clone()
    m_before = opt.state[model.a.lora_A]["exp_avg"].clone()
    v_before = opt.state[model.a.lora_B]["exp_avg_sq"].clone()
    n_state = len(opt.state)
    changes = p.shrink(opt)
    assert changes == {"a": (6, 2)}
    assert torch.equal(model.a.lora_A, A_before[[4, 1]])
    assert torch.equal(opt.state[model.a.lora_A]["exp_avg"], m_before[[4, 1]])
    assert torch.equal(opt.state[model.a.lora_B]["exp_avg_sq"], v_before[:, [4, 1]])
    assert torch.equal(p.scores["a"], torch.tensor([5.0, 4.0]))
    assert len(opt.state) == n_state
    assert any(q is model.a.lora_A for q in opt.param_groups[0]["params"])
    # the optimizer keeps working with the new shapes
    model(torch.randn(4, 8)).sum().backward()
    opt.step()
    assert model.a.lora_A.shape == (2, 8)


def test_pdrs_on_the_model_shrinks_and_keeps_outputs_of_kept_ranks() -> None:
    cfg = load_config("tiny")
    torch.manual_seed(0)
    model = build_model(cfg.model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    p = PDRS(model, cfg.pdrs, seed=0)
    start = mean_rank(model)
    x = torch.randn(4, 3, 64, 64)
    for _ in range(4):
        p.sample()
        out = model(x)
        sum(y.pow(2).mean() for y in out.values()).backward()
        p.accumulate()
        opt.step()
        opt.zero_grad()
    model.eval()
    p.shrink(opt)
    assert mean_rank(model) < start
    assert all(a.rank >= cfg.pdrs.min_rank for a in p.adapters.values())
    state = p.state_tensors()
    fresh = PDRS(model, cfg.pdrs)
    fresh.load_state_tensors(state)
    assert all(torch.equal(fresh.scores[n], p.scores[n]) for n in p.scores)
