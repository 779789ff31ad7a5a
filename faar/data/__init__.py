"""Multi-task dense-prediction datasets: generated scenes, PASCAL-Context, NYUDv2.

``build_dataset(cfg.data, split, tasks, img_size, train)`` is the one entry point the
training loop uses; ``ds[i]`` is a dict of tensors (``transforms.py`` has the conventions)
and ``ds.raw(i)`` the untransformed numpy sample.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..config import DataConfig
from .base import MultiTaskDataset
from .nyud import NYUD, NYUD_CLASSES
from .pascal_context import PascalContext
from .scenes import SCENE_CLASSES, SCENE_PARTS, SceneFolder, Scenes, render_scene, write_scenes
from .transforms import IMAGENET_MEAN, IMAGENET_STD, Augmentation, sample_augmentation, transform_sample

__all__ = [
    "IMAGENET_MEAN", "IMAGENET_STD", "NYUD", "NYUD_CLASSES", "SCENE_CLASSES", "SCENE_PARTS", "Augmentation",
    "MultiTaskDataset", "PascalContext", "SceneFolder", "Scenes", "build_dataset", "render_scene",
    "sample_augmentation", "transform_sample", "write_scenes",
]


def build_dataset(cfg: DataConfig, split: str, tasks: Sequence[str], img_size: Sequence[int], train: bool,
                  generator: torch.Generator | None = None) -> MultiTaskDataset:
    """The dataset ``cfg.dataset`` for split name ``split`` (e.g. ``cfg.train_split``).

    ``train`` turns on augmentation when ``cfg.augment`` is set; validation only resizes.
    Augmentation draws from ``generator`` when given (reproducible single-process loading),
    else from torch's global RNG, which DataLoader seeds differently in every worker.
    Scenes are rendered on the fly unless ``cfg.root`` points at a ``write_scenes`` folder;
    their count is ``cfg.num_train`` for ``cfg.train_split`` and ``cfg.num_val`` for
    ``cfg.val_split``, and ``cfg.label_drop`` leaves labels out of the training split only.
    """
    augment = train and cfg.augment
    if cfg.dataset == "scenes":
        if cfg.root is not None:
            return SceneFolder(cfg.root, split, tasks, img_size, augment, generator)
        counts = {cfg.val_split: cfg.num_val, cfg.train_split: cfg.num_train}
        if split not in counts:
            raise ValueError(f"scenes: unknown split '{split}' (configured: {sorted(counts)})")
        label_drop = cfg.label_drop if split == cfg.train_split else 0.0
        return Scenes(counts[split], cfg.seed, split, tasks, img_size, augment, generator, label_drop=label_drop)
    datasets = {"pascal_context": PascalContext, "nyud": NYUD}
    if cfg.dataset not in datasets:
        raise ValueError(f"unknown dataset '{cfg.dataset}' (known: scenes, {', '.join(datasets)})")
    if cfg.root is None:
        raise ValueError(f"dataset '{cfg.dataset}' needs data.root (the folder holding its files)")
    return datasets[cfg.dataset](cfg.root, split, tasks, img_size, augment, generator)
