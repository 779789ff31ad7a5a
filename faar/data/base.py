"""Shared dataset machinery: task checks, raw -> tensor samples, and list-file folder layouts.

A dataset yields raw samples (numpy, native size; conventions in ``transforms.py``) from
``raw(i)``, and ``ds[i]`` runs them through ``transform_sample`` with a fresh augmentation
draw when ``augment`` is on (from ``generator``, or torch's global RNG, which DataLoader
seeds per worker).

Missing labels: a raw sample may leave out a requested task's key (partially labelled
data). ``ds[i]`` then holds that task's all-unlabelled map (255 for class and binary maps,
zeros for normals and depth: ``TaskKind.unlabelled``), the same shape as a real label.
That is how a missing label travels through the DataLoader: every batch has one tensor
per task and PyTorch's default collate stacks it; losses and metrics count labelled
pixels only, so "missing" and "every pixel ignored" are one case and such a sample adds
nothing to that task (losses.py). No custom collate, no per-sample flags to keep in step.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ..tasks import get_task
from .transforms import Augmentation, sample_augmentation, transform_sample


class MultiTaskDataset(Dataset):
    """Base class: subclasses set ``name``, ``provides``, ``label_classes`` and implement ``_load``."""

    name: ClassVar[str]
    provides: ClassVar[tuple[str, ...]]
    label_classes: ClassVar[Mapping[str, Sequence[str]]]

    def __init__(self, tasks: Sequence[str], img_size: Sequence[int], augment: bool = False,
                 generator: torch.Generator | None = None) -> None:
        for task in tasks:
            get_task(task)  # unknown names fail here, with the registry's message
        missing = [t for t in tasks if t not in self.provides]
        if missing:
            raise ValueError(f"dataset '{self.name}' cannot provide task(s) {missing} "
                             f"(it provides {list(self.provides)})")
        if len(img_size) != 2:
            raise ValueError(f"img_size must be (H, W), got {img_size}")
        self.tasks = tuple(tasks)
        self.img_size = (int(img_size[0]), int(img_size[1]))
        self.augment = augment
        self.generator = generator

    @property
    def classes(self) -> dict[str, list[str]]:
        """Class names of the requested label tasks (semseg, human_parts)."""
        return {t: list(self.label_classes[t]) for t in self.tasks if t in self.label_classes}

    def __len__(self) -> int:
        raise NotImplementedError

    def _load(self, index: int) -> dict[str, Any]:
        """Image, the requested tasks' labels and meta for sample ``index`` (raw conventions)."""
        raise NotImplementedError

    def raw(self, index: int) -> dict[str, Any]:
        """The untransformed sample: uint8 RGB image at native size, numpy labels, meta."""
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        return self._load(index)

    def __getitem__(self, index: int) -> dict[str, Any]:
        aug = sample_augmentation(self.generator) if self.augment else Augmentation()
        sample = transform_sample(self.raw(index), self.img_size, aug)
        for task in self.tasks:
            if task not in sample:
                spec = get_task(task)
                sample[task] = spec.rules.unlabelled(spec, self.img_size)
        return sample


def read_rgb(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.array(im.convert("RGB"), dtype=np.uint8)


def read_indexed_png(path: Path) -> np.ndarray:
    """A label PNG's stored values (palette indices stay indices, no colour conversion)."""
    with Image.open(path) as im:
        if im.mode not in ("P", "L", "I", "I;16"):
            raise ValueError(f"{path}: expected a single-channel label PNG, got mode {im.mode}")
        return np.array(im)


def read_gray(path: Path) -> np.ndarray:
    """A grey-level PNG (saliency-style maps) as float32 in [0, 1]."""
    with Image.open(path) as im:
        return np.asarray(im.convert("L"), dtype=np.float32) / 255.0


class FolderDataset(MultiTaskDataset):
    """A dataset on disk: a split list of sample ids and per-task files named after each id.

    Subclasses give the paths (``list_file``, ``image_file``, ``label_files``) and the decoding
    (``read_label``). Every file the requested tasks need is checked at construction, so a list
    naming a missing file fails early with both names; a label whose size differs from its
    image fails when read.
    """

    def __init__(self, root: str | Path, split: str, tasks: Sequence[str], img_size: Sequence[int],
                 augment: bool = False, generator: torch.Generator | None = None) -> None:
        super().__init__(tasks, img_size, augment, generator)
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"{self.name}: root folder {self.root} does not exist")
        list_file = self.list_file(split)
        if not list_file.is_file():
            raise FileNotFoundError(f"{self.name}: split list {list_file} does not exist")
        self.ids = [line.strip() for line in list_file.read_text().splitlines() if line.strip()]
        self.files = [self._files_for(sample_id, list_file) for sample_id in self.ids]

    def _files_for(self, sample_id: str, list_file: Path) -> dict[str, tuple[Path, ...]]:
        files = {"image": (self.image_file(sample_id),)}
        files.update({t: self.label_files(t, sample_id) for t in self.tasks})
        for paths in files.values():
            for path in paths:
                if not path.is_file():
                    raise FileNotFoundError(f"{list_file} names '{sample_id}' but {path} does not exist")
        return files

    def list_file(self, split: str) -> Path:
        raise NotImplementedError

    def image_file(self, sample_id: str) -> Path:
        raise NotImplementedError

    def label_files(self, task: str, sample_id: str) -> tuple[Path, ...]:
        """The file(s) ``read_label`` needs for ``task``; the first is named in size errors."""
        raise NotImplementedError

    def read_label(self, task: str, files: tuple[Path, ...], shape: tuple[int, int]) -> np.ndarray:
        """Decode one task's label into the raw conventions; ``shape`` is the image's (H, W)."""
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.ids)

    def _load(self, index: int) -> dict[str, Any]:
        files = self.files[index]
        image = read_rgb(files["image"][0])
        shape = image.shape[:2]
        out: dict[str, Any] = {"image": image}
        for task in self.tasks:
            label = self.read_label(task, files[task], shape)
            if label.shape[:2] != shape:
                raise ValueError(f"{files[task][0]}: {task} label is {label.shape[:2]} but image "
                                 f"{files['image'][0]} is {shape}")
            out[task] = label
        out["meta"] = {"name": self.ids[index], "size": shape}
        return out


def first_existing(*candidates: Path) -> Path:
    """The first candidate that exists, else the first one (so a missing-file error names it)."""
    return next((p for p in candidates if p.is_file()), candidates[0])
