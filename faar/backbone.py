"""timm's Swin Transformer with adapters injected and per-task streams.

Layout (MTLoRA's, which FAAR follows):

* Every block has *shared* adapters on ``adapter.targets`` (qkv, proj, fc1, fc2); the
  shared stream runs through all blocks and continues to the next stage.
* The last block of each stage forks one stream per task: attention (qkv) is computed
  once on the shared input with the shared qkv adapter; then each task applies its own
  adapted ``proj``, the residual, the shared ``norm2``, and its own adapted MLP
  (``fc1``, ``fc2``) -- ``adapter.task_targets``. That block's shared stream uses the
  shared adapters and feeds the next stage; the last stage computes no shared stream.
  A task layer is ``W x + b + s B_t A_t x`` (LoRA) or DoRA with its own magnitude,
  applied to that task's own input (MTLoRA adds the frozen output of the *shared*
  input there, which cannot be folded into one linear; we do not copy that quirk).
* Taps: ``stages`` gives each task's stage outputs (strides 4, 8, 16, 32); ``merged``
  (MTLoRA) passes stages 1-3 through the next stage's patch merging (strides 8, 16,
  32, 32). Patch merging is shared by the streams.

Because the projection after attention is a per-token linear, applying it after the
window reverse is identical to timm's placement inside ``WindowAttention``.

Two of timm's private names are used, because timm has no public equivalent:
``SwinTransformerBlock._attn`` (the windowed attention without the residual, which the
task fork needs before its per-task projections) and ``SwinTransformer._ref_window_sizes``
(the constructor's window per stage: ``set_input_size`` must be given it explicitly, or
timm rescales windows with the grid, and blocks only keep windows clamped to their
feature size). Both exist from timm 1.0.31 on; ``pyproject.toml`` pins the tested range
and ``check_timm`` refuses, with the fix in the message, a timm that lacks them (older
releases would otherwise silently resize window-12 Swins with window 7).
"""

from __future__ import annotations

from pathlib import Path

import timm
import torch
from timm.models.swin_transformer import SwinTransformer, SwinTransformerBlock
from torch import nn

from .adapters import AdapterLinear
from .config import AdapterConfig

# Small Swins built from timm's own class, for tests and the CPU demo.
EXTRA_BACKBONES: dict[str, dict] = {
    "swin_micro": dict(embed_dim=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), window_size=7),
    "swin_nano": dict(embed_dim=16, depths=(1, 1, 2, 1), num_heads=(1, 1, 2, 4), window_size=7),
}
_SWIN_ALIASES = {
    "swin_tiny": "swin_tiny_patch4_window7_224",
    "swin_small": "swin_small_patch4_window7_224",
    "swin_base": "swin_base_patch4_window7_224",
    "swin_large": "swin_large_patch4_window7_224",
}


# The timm releases this module was tested with (pyproject.toml pins the same range).
TIMM_TESTED = ">=1.0.31,<1.1"


class BackboneError(ValueError):
    """A backbone that cannot be built as configured (name, size, weights or timm version)."""


def check_timm(swin: SwinTransformer) -> None:
    """Fail loudly when timm lacks the private names this module relies on (module docstring)."""
    missing = [name for name, owner in (("SwinTransformerBlock._attn", SwinTransformerBlock),
                                        ("SwinTransformer._ref_window_sizes", swin))
               if not hasattr(owner, name.rsplit(".", 1)[-1])]
    if missing:
        raise BackboneError(f"timm {timm.__version__} lacks {', '.join(missing)}; FAAR needs timm{TIMM_TESTED} "
                            f"(pip install 'timm{TIMM_TESTED}')")


def stage_window_sizes(swin: SwinTransformer) -> tuple[tuple[int, int], ...]:
    """The window (h, w) of every stage as constructed, before clamping to feature sizes."""
    check_timm(swin)
    return tuple(tuple(int(v) for v in ws) for ws in swin._ref_window_sizes)


def create_swin(name: str, img_size: tuple[int, int], pretrained: bool = False,
                weights: str | None = None, drop_path_rate: float = 0.1) -> SwinTransformer:
    """A timm Swin at ``img_size`` (multiple of 32), optionally with pretrained weights.

    ``pretrained`` downloads through timm's hub; ``weights`` loads a local file through
    timm's own loader (its checkpoint filter handles the original Microsoft format).
    """
    if img_size[0] % 32 or img_size[1] % 32 or min(img_size) < 32:
        raise BackboneError(f"input size {tuple(img_size)} must be positive multiples of 32")
    name = _SWIN_ALIASES.get(name, name)
    kwargs = dict(img_size=tuple(img_size), num_classes=0, drop_path_rate=drop_path_rate)
    if weights is not None and not Path(weights).is_file():
        raise BackboneError(f"backbone weights file not found: {weights}")
    try:
        if name in EXTRA_BACKBONES:
            if pretrained:
                raise BackboneError(f"'{name}' has no published weights; give model.backbone_weights=PATH")
            model = SwinTransformer(**EXTRA_BACKBONES[name], **kwargs)
            if weights is not None:
                state = timm.models.load_state_dict(weights)
                # classifier-side weights are optional: FAAR never uses them
                state = {k: v for k, v in state.items() if not k.startswith(("head.", "norm."))}
                _strip_classifier(model)
                model.load_state_dict(state, strict=True)
        elif name in timm.list_models("swin*"):
            overlay = {"file": str(weights)} if weights is not None else None
            model = timm.create_model(name, pretrained=pretrained or weights is not None,
                                      pretrained_cfg_overlay=overlay, **kwargs)
        else:
            known = sorted(EXTRA_BACKBONES) + sorted(_SWIN_ALIASES)
            raise BackboneError(f"unknown backbone '{name}' (known: {known} or any timm swin_* name)")
    except (RuntimeError, KeyError) as exc:
        raise BackboneError(f"backbone weights {weights or '(hub)'} do not fit {name}: {exc}") from exc
    if not isinstance(model, SwinTransformer):
        raise BackboneError(f"'{name}' is not a timm SwinTransformer")
    _strip_classifier(model)
    return model


def _strip_classifier(model: SwinTransformer) -> None:
    """The classifier side is never used: drop it so parameter counts are honest."""
    model.norm = nn.Identity()
    model.head = nn.Identity()


class TaskForkBlock(nn.Module):
    """The last block of a stage: one shared stream plus one stream per task."""

    def __init__(self, block: SwinTransformerBlock, tasks: list[str], task_targets: list[str],
                 make_task_adapter, shared_needed: bool, make_shared_adapter) -> None:
        super().__init__()
        self.block = block
        self.tasks = list(tasks)
        self.shared_needed = shared_needed
        attn, mlp = block.attn, block.mlp
        base = {"proj": attn.proj, "fc1": mlp.fc1, "fc2": mlp.fc2}
        self.task_layers = nn.ModuleDict()
        for task in tasks:
            layers = {k: make_task_adapter(lin, k, task) if k in task_targets else lin for k, lin in base.items()}
            self.task_layers[task] = nn.ModuleDict(layers)
        if make_shared_adapter is not None:
            attn.qkv = make_shared_adapter(attn.qkv, "qkv")
            for key, parent in (("proj", attn), ("fc1", mlp), ("fc2", mlp)):
                setattr(parent, key, make_shared_adapter(getattr(parent, key), key))
        # proj moves out of WindowAttention (see module docstring).
        self.shared_proj = attn.proj
        attn.proj = nn.Identity()

    def _branch(self, x: torch.Tensor, a: torch.Tensor, proj: nn.Module, fc1: nn.Module,
                fc2: nn.Module) -> torch.Tensor:
        blk = self.block
        B, H, W, C = x.shape
        y = x + blk.drop_path1(proj(a))
        y = y.reshape(B, -1, C)
        y = y + blk.drop_path2(fc2(blk.mlp.act(fc1(blk.norm2(y)))))
        return y.reshape(B, H, W, C)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
        a = self.block._attn(self.block.norm1(x))  # private: see the module docstring
        shared = None
        if self.shared_needed:
            mlp = self.block.mlp
            shared = self._branch(x, a, self.shared_proj, mlp.fc1, mlp.fc2)
        streams = {t: self._branch(x, a, ly["proj"], ly["fc1"], ly["fc2"]) for t, ly in self.task_layers.items()}
        return shared, streams


class MultiTaskSwin(nn.Module):
    """Frozen Swin + shared/task adapters; returns per-task multi-scale features (NCHW)."""

    def __init__(self, swin: SwinTransformer, tasks: list[str], adapter: AdapterConfig,
                 taps: str = "merged") -> None:
        super().__init__()
        self.swin = swin
        self.tasks = list(tasks)
        self.taps = taps
        self.window_size = stage_window_sizes(swin)
        for p in swin.parameters():
            p.requires_grad_(False)
        use_adapters = adapter.kind != "none"
        forks = use_adapters and bool(adapter.task_targets)

        site = ""

        def shared_adapter(lin: nn.Linear, key: str) -> nn.Module:
            if not use_adapters or key not in adapter.targets:
                return lin
            a = AdapterLinear(lin, adapter.rank_shared, adapter.kind, adapter.scale_shared, adapter.forward)
            a.site = f"{site}.{key}"
            return a

        def task_adapter(lin: nn.Linear, key: str, task: str) -> nn.Module:
            a = AdapterLinear(lin, adapter.rank_task, adapter.kind, adapter.scale_task, adapter.forward)
            a.group, a.site = task, f"{site}.{key}"
            return a

        stages = list(swin.layers)
        self.forks = nn.ModuleList()
        for s, stage in enumerate(stages):
            blocks = list(stage.blocks)
            for b, blk in enumerate(blocks[:-1]):
                site = f"s{s}.b{b}"
                _inject(blk, shared_adapter)
            last = blocks[-1]
            site = f"s{s}.b{len(blocks) - 1}"
            final = s == len(stages) - 1
            if forks:
                final_shared = (not final) or adapter.final_shared
                fork = TaskForkBlock(last, self.tasks, adapter.task_targets, task_adapter,
                                     shared_needed=not final,
                                     make_shared_adapter=shared_adapter if final_shared else _qkv_only(shared_adapter))
            else:
                _inject(last, shared_adapter)
                fork = None
            self.forks.append(fork if fork is not None else nn.Identity())
        self._forked = forks
        dims = [int(st.blocks[0].norm1.normalized_shape[0]) for st in stages]
        strides = [4 * 2**i for i in range(len(stages))]
        if taps == "merged":
            dims = dims[1:] + dims[-1:]
            strides = strides[1:] + strides[-1:]
        self.out_channels = dims
        self.out_strides = strides

    def set_input_size(self, img_size: tuple[int, int]) -> None:
        if img_size[0] % 32 or img_size[1] % 32 or min(img_size) < 32:
            raise BackboneError(f"input size {tuple(img_size)} must be positive multiples of 32")
        self.swin.set_input_size(img_size=tuple(img_size), window_size=self.window_size)

    @property
    def img_size(self) -> tuple[int, int]:
        return tuple(self.swin.patch_embed.img_size)

    def forward(self, x: torch.Tensor) -> dict[str, list[torch.Tensor]]:
        x = self.swin.patch_embed(x)
        feats: dict[str, list[torch.Tensor]] = {t: [] for t in self.tasks}
        prev: dict[str, torch.Tensor] | None = None
        for stage, fork in zip(self.swin.layers, self.forks, strict=True):
            if prev is not None and self.taps == "merged":
                for t in self.tasks:
                    feats[t].append(stage.downsample(prev[t]))
            x = stage.downsample(x)
            blocks = stage.blocks
            if self._forked:
                for blk in blocks[:-1]:
                    x = blk(x)
                x, streams = fork(x)
            else:
                x = blocks(x)
                streams = {t: x for t in self.tasks}
            if self.taps == "stages":
                for t in self.tasks:
                    feats[t].append(streams[t])
            prev = streams
        if self.taps == "merged":
            for t in self.tasks:
                feats[t].append(prev[t])
        return {t: [f.permute(0, 3, 1, 2) for f in fs] for t, fs in feats.items()}


def _inject(block: SwinTransformerBlock, make) -> None:
    block.attn.qkv = make(block.attn.qkv, "qkv")
    block.attn.proj = make(block.attn.proj, "proj")
    block.mlp.fc1 = make(block.mlp.fc1, "fc1")
    block.mlp.fc2 = make(block.mlp.fc2, "fc2")


def _qkv_only(make):
    return lambda lin, key: make(lin, key) if key == "qkv" else lin
