"""The generated-scene datasets: ``Scenes`` (rendered on the fly) and ``SceneFolder`` (read back).

Sample ``i`` of split ``s`` is the scene of ``scene_seed(base_seed, s, i)`` (render.py), so
splits never share a scene.

On-disk layout written by ``write_scenes`` and read back by ``SceneFolder`` (same arrays)::

    <root>/<split>.txt              one sample id per line
    <root>/images/<id>.png          uint8 RGB
    <root>/semseg/<id>.png          uint8 class ids (SCENE_CLASSES)
    <root>/human_parts/<id>.png     uint8 part ids (SCENE_PARTS)
    <root>/saliency/<id>.png        uint8 0 / 255
    <root>/edge/<id>.png            uint8 0 / 255
    <root>/normals/<id>.npy         float32 (H, W, 3)
    <root>/depth/<id>.npy           float32 (H, W) metres

``Scenes`` keeps rendered samples in an in-memory LRU cache (256 MB by default, per
DataLoader worker), so later epochs cost nothing; ``write_scenes`` is the on-disk cache.

Partial labels: ``Scenes(..., label_drop=p)`` leaves out each label of each sample with
probability ``p``, decided by the sample's own seed (the same for every epoch, worker and
requested task set). A left-out task is a missing key in ``raw(i)``; ``MultiTaskDataset``
turns it into that task's all-unlabelled map (base.py).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..base import FolderDataset, MultiTaskDataset, read_indexed_png
from .render import SCENE_CLASSES, SCENE_PARTS, SCENE_TASKS, render, sample_scene, scene_seed


def _sample_name(split: str, index: int) -> str:
    return f"{split}_{index:06d}"


class Scenes(MultiTaskDataset):
    """Scenes rendered on the fly at ``img_size``, with an in-memory LRU cache of raw samples."""

    name = "scenes"
    provides = SCENE_TASKS
    label_classes = {"semseg": SCENE_CLASSES, "human_parts": SCENE_PARTS}

    def __init__(self, num: int, seed: int, split: str, tasks: Sequence[str], img_size: Sequence[int],
                 augment: bool = False, generator: torch.Generator | None = None,
                 cache_mb: float = 256, label_drop: float = 0.0) -> None:
        super().__init__(tasks, img_size, augment, generator)
        if num < 1:
            raise ValueError(f"scenes: split '{split}' needs at least one sample, got {num}")
        if not 0 <= label_drop < 1:
            raise ValueError(f"scenes: label_drop must be in [0, 1), got {label_drop}")
        self.num, self.seed, self.split, self.label_drop = num, seed, split, label_drop
        self.cache_bytes = int(cache_mb * 2 ** 20)
        self._cache: OrderedDict[int, dict[str, Any]] = OrderedDict()
        self._cached_bytes = 0

    def __len__(self) -> int:
        return self.num

    def labelled_tasks(self, index: int) -> tuple[str, ...]:
        """The requested tasks whose label sample ``index`` keeps (all of them when ``label_drop`` is 0)."""
        if not self.label_drop:
            return self.tasks
        rng = np.random.default_rng(np.random.SeedSequence([scene_seed(self.seed, self.split, index), 1]))
        draws = dict(zip(SCENE_TASKS, rng.random(len(SCENE_TASKS)).tolist(), strict=True))
        return tuple(t for t in self.tasks if draws[t] >= self.label_drop)

    def _load(self, index: int) -> dict[str, Any]:
        if index in self._cache:
            self._cache.move_to_end(index)
            return dict(self._cache[index])
        full = render(sample_scene(scene_seed(self.seed, self.split, index)), self.img_size)
        sample = {k: full[k] for k in ("image", *self.labelled_tasks(index))}
        sample["meta"] = {"name": _sample_name(self.split, index), "size": self.img_size}
        nbytes = sum(v.nbytes for k, v in sample.items() if k != "meta")
        if nbytes <= self.cache_bytes:
            self._cache[index] = sample
            self._cached_bytes += nbytes
            while self._cached_bytes > self.cache_bytes:
                _, old = self._cache.popitem(last=False)
                self._cached_bytes -= sum(v.nbytes for k, v in old.items() if k != "meta")
        return dict(sample)


_FILES = {"semseg": ("semseg", ".png"), "human_parts": ("human_parts", ".png"),
          "saliency": ("saliency", ".png"), "edge": ("edge", ".png"), "normals": ("normals", ".npy"),
          "depth": ("depth", ".npy")}


def write_scenes(out_dir: str | Path, n: int, seed: int, size: Sequence[int], split: str = "train") -> Path:
    """Render samples 0..n-1 of ``split`` (the same scenes ``Scenes`` yields) into the documented
    layout under ``out_dir``; returns the split list file."""
    root = Path(out_dir)
    for folder in ("images", *(folder for folder, _ in _FILES.values())):
        (root / folder).mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n):
        name = _sample_name(split, i)
        sample = render(sample_scene(scene_seed(seed, split, i)), size)
        Image.fromarray(sample["image"]).save(root / "images" / f"{name}.png")
        for task, (folder, ext) in _FILES.items():
            value = sample[task]
            if ext == ".npy":
                np.save(root / folder / f"{name}.npy", value)
            else:
                scale = 255 if task in ("saliency", "edge") else 1
                Image.fromarray((value * scale).astype(np.uint8)).save(root / folder / f"{name}.png")
        names.append(name)
    list_file = root / f"{split}.txt"
    list_file.write_text("".join(f"{name}\n" for name in names))
    return list_file


class SceneFolder(FolderDataset):
    """Scenes read back from the ``write_scenes`` layout."""

    name = "scenes"
    provides = SCENE_TASKS
    label_classes = Scenes.label_classes

    def list_file(self, split: str) -> Path:
        return self.root / f"{split}.txt"

    def image_file(self, sample_id: str) -> Path:
        return self.root / "images" / f"{sample_id}.png"

    def label_files(self, task: str, sample_id: str) -> tuple[Path, ...]:
        folder, ext = _FILES[task]
        return (self.root / folder / f"{sample_id}{ext}",)

    def read_label(self, task: str, files: tuple[Path, ...], shape: tuple[int, int]) -> np.ndarray:
        if task in ("normals", "depth"):
            return np.load(files[0]).astype(np.float32)
        value = read_indexed_png(files[0])
        if task in ("saliency", "edge"):
            return (value >= 128).astype(np.float32)
        return value.astype(np.uint8)
