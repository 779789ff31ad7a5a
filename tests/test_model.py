"""The model: adapters, merge, spectral transforms, shapes, parameter counts, gradients."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from fixtures_model import randomize
from safetensors.torch import save_file
from timm.models.swin_transformer import SwinTransformer, SwinTransformerBlock
from torch import nn

from faar.adapters import AdapterLinear, adapters_of
from faar.backbone import BackboneError, MultiTaskSwin, check_timm, create_swin
from faar.config import AdapterConfig, ConfigError, load_config, preset_names
from faar.model import build_model, merge_model, parameter_summary
from faar.run import load_model, save_model
from faar.spectral import DFT2, TaskSpectralBlock, resample_filter, resample_symmetric_filter


def tiny(**overrides: object) -> torch.nn.Module:
    cfg = load_config("tiny", [f"{k}={v}" for k, v in overrides.items()])
    torch.manual_seed(0)
    return build_model(cfg.model)


@pytest.mark.parametrize("kind", ["lora", "dora"])
@pytest.mark.parametrize("mode", ["fused", "unmerged"])
@pytest.mark.parametrize("rank", [1, 4, 16])
def test_adapter_merge_is_exact(kind: str, mode: str, rank: int) -> None:
    torch.manual_seed(rank)
    base = nn.Linear(48, 80)
    a = AdapterLinear(base, rank, kind, scale=2.0, forward_mode=mode)
    nn.init.normal_(a.lora_B, std=0.1)
    if kind == "dora":
        a.magnitude.data.mul_(torch.rand(80) + 0.5)
    x = torch.randn(5, 7, 48)
    with torch.no_grad():
        y = a(x)
        merged = a.merge()
        assert type(merged) is nn.Linear
        rel = (merged(x) - y).abs().max() / y.abs().max()
    assert rel < 1e-5


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_shrink_keeps_chosen_components_and_merge_stays_exact(kind: str) -> None:
    torch.manual_seed(1)
    a = AdapterLinear(nn.Linear(32, 24), 8, kind)
    nn.init.normal_(a.lora_B, std=0.1)
    keep = torch.tensor([5, 0, 3])
    gate = torch.zeros(8)
    gate[keep] = 1
    x = torch.randn(4, 32)
    with torch.no_grad():
        a.gate = gate
        expected = a(x)
        a.gate = None
        a.keep(keep)
        assert a.lora_A.shape == (3, 32) and a.lora_B.shape == (24, 3)
        torch.testing.assert_close(a(x), expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a.merge()(x), expected, rtol=1e-5, atol=1e-5)


def test_prefix_gate_only_lets_first_ranks_act() -> None:
    torch.manual_seed(2)
    a = AdapterLinear(nn.Linear(16, 16), 6, "lora")
    nn.init.normal_(a.lora_B)
    x = torch.randn(3, 16)
    a.gate = torch.tensor([1.0, 1, 0, 0, 0, 0])
    with torch.no_grad():
        gated = a(x)
        a.gate = None
        a.keep(torch.tensor([0, 1]))
        torch.testing.assert_close(a(x), gated)


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_gate_gradient_equals_paper_importance(kind: str) -> None:
    """dL/dgate_i == <A_i, dL/dA_i> == <B_:,i, dL/dB_:,i> (no extra backward needed)."""
    torch.manual_seed(3)
    a = AdapterLinear(nn.Linear(12, 10), 5, kind, scale=3.0, forward_mode="unmerged")
    nn.init.normal_(a.lora_B)
    a.gate = torch.ones(5, requires_grad=True)
    a(torch.randn(8, 12)).pow(2).sum().backward()
    via_a = (a.lora_A * a.lora_A.grad).sum(1)
    via_b = (a.lora_B * a.lora_B.grad).sum(0)
    torch.testing.assert_close(a.gate.grad, via_a, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(a.gate.grad, via_b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_zero_adapters_reproduce_frozen_backbone(kind: str) -> None:
    torch.manual_seed(4)
    swin = create_swin("swin_nano", (64, 96), drop_path_rate=0.0).eval()
    reference = copy.deepcopy(swin)
    backbone = MultiTaskSwin(swin, ["semseg", "depth"], AdapterConfig(kind=kind, rank_shared=4, rank_task=4),
                             taps="stages").eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        feats = backbone(x)
        h = reference.patch_embed(x)
        expected = []
        for stage in reference.layers:
            h = stage(h)
            expected.append(h.permute(0, 3, 1, 2))
    for task in ("semseg", "depth"):
        for got, want in zip(feats[task], expected, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("size", [(16, 16), (14, 14), (7, 12), (28, 9)])
def test_dft_backends_agree(size: tuple[int, int]) -> None:
    torch.manual_seed(5)
    x = torch.randn(2, 3, *size)
    t, m = DFT2(size, "torch"), DFT2(size, "matmul")
    (tr, ti), (mr, mi) = t(x), m(x)
    torch.testing.assert_close(mr, tr, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(mi, ti, atol=1e-4, rtol=1e-4)
    re, im = tr * 0.7 + 0.1, ti * -0.3
    torch.testing.assert_close(m.inverse(re, im), t.inverse(re, im), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(t.inverse(tr, ti), x, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("form", ["channel", "shared"])
def test_spectral_block_identity_at_init_and_backends_agree(form: str) -> None:
    torch.manual_seed(6)
    feats = [torch.randn(2, 4, 12, 10) for _ in range(3)]
    block = TaskSpectralBlock(3, 4, (12, 10), "torch", form=form)
    for got, x in zip(block(feats), feats, strict=True):
        torch.testing.assert_close(got, x, atol=1e-5, rtol=1e-5)
    randomize(block)
    with torch.no_grad():
        a = block(feats)
        block.set_backend("matmul")
        b = block(feats)
    assert max((u - v).abs().max().item() for u, v in zip(a, b, strict=True)) < 1e-4
    assert max((u - x).abs().max().item() for u, x in zip(a, feats, strict=True)) > 1e-2


@pytest.mark.parametrize("size", [(12, 10), (7, 9)])
def test_channel_form_is_the_published_cw_sp(size: tuple[int, int]) -> None:
    """x + alpha * (scale * IDFT(W_c * DFT(x)) + shift), with one real gain per channel and (|fy|, |fx|),
    written here with torch.fft from the definition."""
    torch.manual_seed(7)
    h, w = size
    block = randomize(TaskSpectralBlock(2, 3, size, "matmul", xt_cons=False, form="channel"))
    assert block.filters.shape == (2, 3, h // 2 + 1, w // 2 + 1)
    feats = [torch.randn(2, 3, h, w) for _ in range(2)]
    with torch.no_grad():
        out = block(feats)
        for t, x in enumerate(feats):
            rows = [min(k, h - k) for k in range(h)]
            gain = block.filters[t][:, rows]  # (C, H, W//2+1): rows of -fy read the row of +fy
            filtered = torch.fft.irfft2(torch.fft.rfft2(x) * gain, s=size)
            y = filtered * block.scale[t][:, None, None] + block.shift[t][:, None, None]
            torch.testing.assert_close(out[t], x + block.alpha[t] * y, atol=1e-5, rtol=1e-5)


def test_channel_form_commutes_with_flips() -> None:
    """Real, mirror-symmetric gains and radial XT-Cons masks: flipping the input flips the output."""
    torch.manual_seed(8)
    block = randomize(TaskSpectralBlock(3, 4, (12, 10), "torch", form="channel")).eval()
    feats = [torch.randn(2, 4, 12, 10) for _ in range(3)]
    with torch.no_grad():
        out = block(feats)
        for dims in ([-1], [-2]):
            flipped = block([f.flip(dims) for f in feats])
            for a, b in zip(flipped, out, strict=True):
                torch.testing.assert_close(a, b.flip(dims), atol=1e-5, rtol=1e-5)


def test_symmetric_filter_resampling_keeps_same_size_and_dc() -> None:
    filt = torch.randn(2, 3, 5, 6)  # (tasks, C, H//2+1, W//2+1) of an 8 x 10 map
    torch.testing.assert_close(resample_symmetric_filter(filt, (8, 10)), filt)
    up = resample_symmetric_filter(filt, (16, 20))
    assert up.shape == (2, 3, 9, 11)
    torch.testing.assert_close(up[..., 0, 0], filt[..., 0, 0])
    torch.testing.assert_close(up[..., -1, -1], filt[..., -1, -1])  # Nyquist to Nyquist


@pytest.mark.parametrize("form", ["channel", "shared"])
def test_resampling_grids_follow_the_filter_device(form: str) -> None:
    """set_input_size on a CUDA model: every grid is built on the filter's device (here the meta device,
    which refuses to mix with CPU tensors just as CUDA does)."""
    block = TaskSpectralBlock(2, 3, (8, 10), form=form).to("meta")
    block.set_size((16, 12))
    assert block.filters.device.type == "meta"
    assert block.filters.shape[-2:] == ((9, 7) if form == "channel" else (16, 7))
    assert resample_filter(torch.empty(2, 8, 6, device="meta"), (16, 16)).device.type == "meta"


def test_filter_resampling_keeps_same_size_and_dc() -> None:
    filt = torch.randn(2, 8, 5)
    torch.testing.assert_close(resample_filter(filt, (8, 8)), filt)
    up = resample_filter(filt, (16, 16))
    assert up.shape == (2, 16, 9)
    torch.testing.assert_close(up[:, 0, 0], filt[:, 0, 0])


@pytest.mark.parametrize("size,tasks", [((64, 64), "[semseg,depth]"), ((96, 64), "[normals]"),
                                        ((64, 128), "[semseg,human_parts,saliency,normals,depth,edge]")])
def test_output_shapes(size: tuple[int, int], tasks: str) -> None:
    model = tiny(**{"model.img_size": list(size), "model.tasks": tasks}).eval()
    out = model(torch.randn(2, 3, *size))
    assert set(out) == set(model.tasks)
    for name, y in out.items():
        assert y.shape == (2, model.tasks[name].channels, *size)
    pred = model.predict(torch.randn(1, 3, *size))
    if "semseg" in pred:
        assert pred["semseg"].shape == (1, *size) and pred["semseg"].dtype == torch.int64
    if "normals" in pred:
        torch.testing.assert_close(pred["normals"].norm(dim=1), torch.ones(1, *size))


def test_wrong_input_size_is_a_clear_error() -> None:
    model = tiny().eval()
    with pytest.raises(ValueError, match="built for"):
        model(torch.randn(1, 3, 96, 96))
    with pytest.raises(ConfigError, match=r"model.img_size\[0\]: 60 must be a positive multiple of 32"):
        tiny(**{"model.img_size": [60, 64]})
    with pytest.raises(BackboneError, match="multiples of 32"):
        create_swin("swin_nano", (60, 64))


def test_set_input_size_runs_at_new_size() -> None:
    model = randomize(tiny()).eval()
    model.set_input_size((96, 128))
    assert model(torch.randn(1, 3, 96, 128))["semseg"].shape[-2:] == (96, 128)


@pytest.mark.parametrize("kind,spectral,form", [("dora", True, "channel"), ("dora", True, "shared"),
                                                ("lora", False, "channel"), ("dora", False, "channel")])
def test_merge_model_matches_unmerged(kind: str, spectral: bool, form: str) -> None:
    model = randomize(tiny(**{"model.adapter.kind": kind, "model.decoder.spectral": spectral,
                              "model.decoder.spectral_filter": form})).eval()
    merged = merge_model(model)
    assert not any(isinstance(m, AdapterLinear) for m in merged.modules())
    assert not any(p.requires_grad for p in merged.parameters())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        a, b = model(x), merged(x)
    for t in a:
        assert (a[t] - b[t]).abs().max() < 1e-4, t
    assert max((a[t] - tiny().eval()(x)[t]).abs().max() for t in a) > 1e-2  # adapters really matter


def test_mtlora_parameter_count_is_exact() -> None:
    model = build_model(load_config("mtlora_pascal_r64", ["model.pretrained=false"]).model)
    summary = parameter_summary(model)
    assert summary["trainable_parameters"] == 8_344_634
    assert summary["trainable_by_group"] == {"adapters": 4_798_464, "other_backbone": 1_599_546,
                                             "decoder": 1_946_624, "spectral": 0}


def test_tspd_parameter_counts_on_swin_t_pascal() -> None:
    """The published CW-SP form: per task and level, one real gain per channel and (|fy|, |fx|) bin, plus
    per-channel scale and shift, a residual scale and XT-Cons's two scalars. Swin-T at 448 with MTLoRA's
    taps gives 56, 28, 14, 14 feature sizes, so 29x29, 15x15, 8x8, 8x8 gains for 18, 36, 72, 144 channels:
    4 x (18*841 + 36*225 + 72*64 + 144*64) = 148,248, + 4 x 270 x 2 = 2,160, + 4 x 4 x 3 = 48."""
    counts = {}
    for form in ("channel", "shared"):
        cfg = load_config("faar_pascal_swin_t", ["model.pretrained=false", f"model.decoder.spectral_filter={form}"])
        counts[form] = parameter_summary(build_model(cfg.model, load_weights=False))["trainable_by_group"]["spectral"]
    assert counts == {"channel": 148_248 + 2_160 + 48, "shared": 20_336}


def test_gradients_reach_only_trainable_parameters() -> None:
    model = randomize(tiny()).train()
    out = model(torch.randn(2, 3, 64, 64))
    sum(y.float().pow(2).mean() for y in out.values()).backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, f"{name} is trainable but got no gradient"
        else:
            assert p.grad is None, f"{name} is frozen but got a gradient"
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert any(n.endswith("base.weight") for n in frozen)
    assert all(a.lora_A.requires_grad for a in adapters_of(model).values())


def test_task_adapters_are_per_task_and_share_frozen_weight() -> None:
    model = tiny()
    forks = model.backbone.forks[0].task_layers
    assert forks["semseg"]["proj"] is not forks["depth"]["proj"]
    assert forks["semseg"]["proj"].base is forks["depth"]["proj"].base


def test_local_backbone_weights(tmp_path) -> None:
    swin = create_swin("swin_nano", (64, 64))
    path = tmp_path / "nano.safetensors"
    save_file({k: v.contiguous() for k, v in swin.state_dict().items()}, str(path))
    loaded = create_swin("swin_nano", (64, 64), weights=str(path))
    torch.testing.assert_close(loaded.state_dict()["layers.2.blocks.1.attn.qkv.weight"],
                               swin.state_dict()["layers.2.blocks.1.attn.qkv.weight"])
    with pytest.raises(BackboneError, match="not found"):
        create_swin("swin_nano", (64, 64), weights=str(tmp_path / "missing.safetensors"))
    bad = tmp_path / "bad.safetensors"
    save_file({"patch_embed.proj.weight": torch.zeros(3, 3)}, str(bad))
    with pytest.raises(BackboneError, match="do not fit"):
        create_swin("swin_nano", (64, 64), weights=str(bad))


def test_config_errors_name_the_key() -> None:
    with pytest.raises(ConfigError, match="model.adapter.rnak"):
        load_config("tiny", ["model.adapter.rnak=3"])
    with pytest.raises(ConfigError, match="model.adapter.kind"):
        load_config("tiny", ["model.adapter.kind=lorax"])
    with pytest.raises(ConfigError, match="unknown config"):
        load_config("no_such_preset")
    cfg = load_config("tiny", ["model.img_size=[96, 128]", "train.lr=0.1"])
    assert cfg.model.img_size == [96, 128] and cfg.train.lr == 0.1


@pytest.mark.parametrize("override,message", [
    ("model.adapter.targets=[qkv,mlp]", r"model.adapter.targets\[1\]: 'mlp' is not one of"),
    ("model.adapter.task_targets=[qkv]", r"model.adapter.task_targets\[0\]: 'qkv' is not one of \['proj'"),
    ("model.img_size=[448]", r"model.img_size: \[448\] must be \[height, width\]"),
    ("model.adapter.rank_task=0", "model.adapter.rank_task: 0 must be >= 1"),
    ("pdrs.rho_shared=0", r"pdrs.rho_shared: 0.0 must be in \(0, 1\]"),
    ("pdrs.rho_task=1.5", r"pdrs.rho_task: 1.5 must be in \(0, 1\]"),
    ("pdrs.margin=-1", "pdrs.margin: -1 must be >= 0"),
    ("model.tasks=[semseg,albedo]", r"model.tasks\[1\]: 'albedo' must be a known task"),
    ("model.tasks=[semseg,semseg]", "model.tasks: .* without repeats"),
    ("model.decoder.spectral_filter=full", "model.decoder.spectral_filter: 'full' is not one of"),
    ("model.decoder.branch_channels=[8,8]", "model.decoder.branch_channels: .* four values"),
    ("train.loss_weights={albedo: 1}", "train.loss_weights.albedo: 'albedo' is not one of model.tasks"),
    ("model.num_classes={depth: 3}", "model.num_classes.depth: 'depth' has no classes"),
    ("train.single_task={semseg_: {miou: 1}}", "train.single_task.semseg_: 'semseg_' must be a known task"),
    ("data.label_drop=1", r"data.label_drop: 1.0 must be in \[0, 1\)"),
])
def test_bad_values_fail_at_load_naming_the_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config("tiny", [override])


def test_every_preset_loads() -> None:
    for name in preset_names():
        load_config(name)
    assert load_config("faar_nyud_swin_t").train.single_task.keys() == {"semseg", "depth", "normals"}


def test_timm_private_names_are_there_and_window_12_survives_a_resize() -> None:
    """backbone.py relies on SwinTransformerBlock._attn and SwinTransformer._ref_window_sizes (timm has no
    public equivalent): this fails loudly if a timm release renames them. A window-12 Swin keeps window 12
    when resized, where timm's own default would rescale it with the grid."""
    assert callable(getattr(SwinTransformerBlock, "_attn", None))
    swin = SwinTransformer(img_size=(96, 96), embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 1, 2, 4),
                           window_size=12, num_classes=0)
    backbone = MultiTaskSwin(swin, ["semseg"], AdapterConfig(rank_shared=2, rank_task=2))
    assert backbone.window_size == ((12, 12),) * 4
    backbone.set_input_size((192, 192))  # stage 1 features 48 x 48
    assert tuple(swin.layers[0].blocks[0].window_size) == (12, 12)
    check_timm(swin)
    del swin._ref_window_sizes  # what an older timm looks like
    with pytest.raises(BackboneError, match=r"timm .* lacks SwinTransformer._ref_window_sizes.*timm>=1.0.31"):
        MultiTaskSwin(swin, ["semseg"], AdapterConfig(rank_shared=2, rank_task=2))


def test_a_format_1_run_rebuilds_with_the_shared_filter(tmp_path) -> None:
    """Runs saved before decoder.spectral_filter existed had the shared form; they still load."""
    model = randomize(tiny(**{"model.decoder.spectral_filter": "shared"})).eval()
    save_model(model, tmp_path)
    meta = json.loads((tmp_path / "model.json").read_text())
    del meta["model"]["decoder"]["spectral_filter"]
    (tmp_path / "model.json").write_text(json.dumps({**meta, "format_version": 1}))
    loaded = load_model(tmp_path)
    assert loaded.config.decoder.spectral_filter == "shared"
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x)["semseg"], model(x)["semseg"])
