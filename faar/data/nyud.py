"""NYUDv2 in the NYUD_MT layout used by ASTMT, MTI-Net, MTLoRA and FAAR.

Layout under ``root`` (one id per line in the split lists)::

    gt_sets/{train,val}.txt
    images/<id>.jpg  (or .png)
    segmentation/<id>.png   NYU-40 ids 1..40, 0 = unlabelled
    depth/<id>.npy          float (H, W) metres, 0 = missing
    normals/<id>.npy        float (H, W, 3)
    edge/<id>.npy           float (H, W) in {0, 1}

Conversions: segmentation 0 -> 255 (ignore) and 1..40 -> 0..39, as the references do;
normals renormalised (all-zero stays "no label"); depth and edge as stored. Normals are
assumed to be stored in our camera frame (x right, y up, z towards the camera), the same
convention as PASCAL's normals_distill, which were distilled from a network trained on these
labels; check on real data that floor pixels (class 1 after the shift) have normals with
y > 0.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..losses import IGNORE_INDEX
from .base import FolderDataset, first_existing, read_indexed_png
from .transforms import unit_normals

NYUD_CLASSES = (
    "wall", "floor", "cabinet", "bed", "chair", "sofa", "table", "door", "window", "bookshelf",
    "picture", "counter", "blinds", "desk", "shelves", "curtain", "dresser", "pillow", "mirror", "floor_mat",
    "clothes", "ceiling", "books", "refrigerator", "television", "paper", "towel", "shower_curtain", "box",
    "whiteboard", "person", "night_stand", "toilet", "sink", "lamp", "bathtub", "bag", "otherstructure",
    "otherfurniture", "otherprop",
)

_FOLDERS = {"semseg": ("segmentation", ".png"), "depth": ("depth", ".npy"), "normals": ("normals", ".npy"),
            "edge": ("edge", ".npy")}


class NYUD(FolderDataset):
    """NYUDv2 multi-task (NYUD_MT): semseg (40 classes), depth, normals, edge."""

    name = "nyud"
    provides = ("semseg", "depth", "normals", "edge")
    label_classes = {"semseg": NYUD_CLASSES}

    def list_file(self, split: str) -> Path:
        return self.root / "gt_sets" / f"{split}.txt"

    def image_file(self, sample_id: str) -> Path:
        images = self.root / "images"
        return first_existing(images / f"{sample_id}.jpg", images / f"{sample_id}.png")

    def label_files(self, task: str, sample_id: str) -> tuple[Path, ...]:
        folder, ext = _FOLDERS[task]
        return (self.root / folder / f"{sample_id}{ext}",)

    def read_label(self, task: str, files: tuple[Path, ...], shape: tuple[int, int]) -> np.ndarray:
        path = files[0]
        if task == "semseg":
            seg = read_indexed_png(path).astype(np.int64)
            if seg.max(initial=0) > len(NYUD_CLASSES):
                raise ValueError(f"{path}: class id {seg.max()} > {len(NYUD_CLASSES)}")
            return np.where(seg == 0, IGNORE_INDEX, seg - 1).astype(np.uint8)
        value = np.load(path).astype(np.float32)
        if task == "normals":
            if value.ndim != 3 or value.shape[-1] != 3:
                raise ValueError(f"{path}: normals must be (H, W, 3), got {value.shape}")
            return unit_normals(value)
        if value.ndim == 3 and value.shape[-1] == 1:
            value = value[..., 0]
        if value.ndim != 2:
            raise ValueError(f"{path}: {task} must be (H, W), got {value.shape}")
        return value
