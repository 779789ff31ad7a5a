"""PASCAL-Context in the PASCAL_MT layout used by ASTMT, MTI-Net, MTLoRA and FAAR.

Layout under ``root`` (one id per line in the split lists)::

    ImageSets/Context/{train,val}.txt
    JPEGImages/<id>.jpg
    semseg/VOC12/<id>.png  or  semseg/pascal-context/<id>.png   21 classes, 255 = ignore
    human_parts/<id>.mat            PASCAL-Part annotations (struct ``anno``)
    sal_distill/<id>.png            distilled saliency, grey levels
    normals_distill/<id>.png        distilled normals, RGB = (n + 1) / 2 * 255
    pascal-context/trainval/<id>.mat  full PASCAL-Context ``LabelMap`` (459 classes)

Conversions (the references' rules unless stated):
- semseg: the stored 21-class ids; the VOC12 file wins over the pascal-context one when both
  exist (MTLoRA's order).
- human_parts: the parts of every person object (VOC class 15) painted in annotation order,
  grouped into the 6 parts of ``HUMAN_PARTS_CLASSES``; 0 elsewhere. An image with no person
  part annotation is all 255, so it is ignored (MTLoRA's AddIgnoreRegions).
- saliency: grey level / 255 > 0.5.
- normals: ``2 * x / 255 - 1``, kept only on pixels whose ``LabelMap`` class also exists in
  NYUD (``NORMALS_VALID_CONTEXT_IDS``), zero (no label) elsewhere, then renormalised. Axis
  convention: the stored channels are already ours (R = x right, G = y up, B = z towards the
  camera); checked on ASTMT's published normals figure, where upward-facing surfaces (tops
  of heads, armrests) are green and camera-facing ones blue, so no axis is flipped.
- edge: pixels whose ``LabelMap`` class differs from their right or lower neighbour. The
  references thin ``Laplacian(LabelMap) != 0`` with skimage; this gives the same kind of
  1-pixel boundary without cv2/skimage (at most a one-pixel shift).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import scipy.io

from ..losses import IGNORE_INDEX
from ..tasks import HUMAN_PARTS_CLASSES, PASCAL_CONTEXT_CLASSES
from .base import FolderDataset, first_existing, read_gray, read_indexed_png, read_rgb
from .transforms import unit_normals

PERSON_CLASS = 15  # VOC class index of "person" in PASCAL-Part's class_ind

# PASCAL-Part person part names -> the 6 grouped parts (MTI-Net/MTLoRA's num_human_parts=6).
PART_GROUPS: dict[str, tuple[str, ...]] = {
    "head": ("hair", "head", "lear", "rear", "lebrow", "rebrow", "leye", "reye", "mouth", "nose"),
    "torso": ("neck", "torso"),
    "upper_arm": ("luarm", "ruarm"),
    "lower_arm": ("llarm", "rlarm", "lhand", "rhand"),
    "upper_leg": ("luleg", "ruleg"),
    "lower_leg": ("llleg", "rlleg", "lfoot", "rfoot"),
}
PART_IDS = {part: HUMAN_PARTS_CLASSES.index(group) for group, parts in PART_GROUPS.items() for part in parts}

# PASCAL-Context LabelMap ids whose class name is also a NYUD class name ('unknown' excluded),
# plus tvmonitor (427): the classes on which distilled normals are trusted. Derived from
# ASTMT's db_info nyu_classes.json and context_classes.json, as MTLoRA does at load time.
NORMALS_VALID_CONTEXT_IDS = frozenset((
    3, 4, 6, 9, 10, 11, 13, 15, 17, 18, 22, 23, 29, 30, 33, 34, 36, 37, 38, 39, 41, 43, 46, 49, 50, 51,
    53, 55, 56, 59, 61, 62, 65, 66, 68, 69, 72, 73, 78, 83, 84, 85, 87, 88, 95, 96, 101, 104, 105, 107,
    111, 113, 115, 122, 124, 135, 141, 142, 143, 146, 150, 154, 157, 158, 159, 165, 172, 174, 181, 183,
    184, 191, 193, 195, 197, 199, 202, 213, 215, 216, 219, 220, 223, 225, 228, 230, 232, 233, 238, 239,
    242, 243, 246, 250, 251, 252, 255, 260, 261, 263, 269, 272, 273, 275, 281, 283, 284, 285, 286, 287,
    288, 290, 291, 292, 293, 295, 304, 307, 309, 310, 314, 315, 319, 323, 329, 330, 331, 336, 342, 345,
    349, 350, 351, 352, 355, 357, 368, 370, 371, 374, 379, 380, 383, 384, 397, 401, 403, 405, 407, 408,
    411, 412, 413, 414, 417, 419, 421, 423, 427, 429, 430, 432, 440, 441, 442, 443, 444, 446, 454, 457,
))


def label_boundaries(label_map: np.ndarray) -> np.ndarray:
    """1-pixel boundaries of a label map: where a pixel differs from its right or lower neighbour."""
    edge = np.zeros(label_map.shape, dtype=np.float32)
    edge[:, :-1] = label_map[:, :-1] != label_map[:, 1:]
    edge[:-1, :] = np.maximum(edge[:-1, :], label_map[:-1, :] != label_map[1:, :])
    return edge


def read_context_labelmap(path: Path) -> np.ndarray:
    mat = scipy.io.loadmat(path)
    if "LabelMap" not in mat:
        raise ValueError(f"{path}: no 'LabelMap' variable")
    return np.asarray(mat["LabelMap"])


def read_human_parts(path: Path, shape: tuple[int, int]) -> np.ndarray:
    """PASCAL-Part ``anno`` struct -> (H, W) uint8 map of the 7 human part classes."""
    anno = scipy.io.loadmat(path, squeeze_me=True, struct_as_record=False)["anno"]
    target: np.ndarray | None = None
    for obj in np.atleast_1d(anno.objects):
        parts = np.atleast_1d(obj.parts)
        if int(obj.class_ind) != PERSON_CLASS or parts.size == 0:
            continue
        if target is None:
            target = np.zeros(np.shape(obj.mask), dtype=np.uint8)
        for part in parts:
            name = str(part.part_name)
            if name not in PART_IDS:
                raise ValueError(f"{path}: unknown person part '{name}'")
            target[np.asarray(part.mask).astype(bool)] = PART_IDS[name]
    return np.full(shape, IGNORE_INDEX, dtype=np.uint8) if target is None else target


class PascalContext(FolderDataset):
    """PASCAL-Context multi-task (PASCAL_MT): semseg, human_parts, saliency, normals, edge."""

    name = "pascal_context"
    provides = ("semseg", "human_parts", "saliency", "normals", "edge")
    label_classes = {"semseg": PASCAL_CONTEXT_CLASSES, "human_parts": HUMAN_PARTS_CLASSES}

    def list_file(self, split: str) -> Path:
        return self.root / "ImageSets" / "Context" / f"{split}.txt"

    def image_file(self, sample_id: str) -> Path:
        return self.root / "JPEGImages" / f"{sample_id}.jpg"

    def label_files(self, task: str, sample_id: str) -> tuple[Path, ...]:
        root = self.root
        context = root / "pascal-context" / "trainval" / f"{sample_id}.mat"
        if task == "semseg":
            return (first_existing(root / "semseg" / "VOC12" / f"{sample_id}.png",
                                   root / "semseg" / "pascal-context" / f"{sample_id}.png"),)
        if task == "human_parts":
            return (root / "human_parts" / f"{sample_id}.mat",)
        if task == "saliency":
            return (root / "sal_distill" / f"{sample_id}.png",)
        if task == "normals":
            return (root / "normals_distill" / f"{sample_id}.png", context)
        return (context,)  # edge

    def read_label(self, task: str, files: tuple[Path, ...], shape: tuple[int, int]) -> np.ndarray:
        if task == "semseg":
            return read_indexed_png(files[0]).astype(np.uint8)
        if task == "human_parts":
            return read_human_parts(files[0], shape)
        if task == "saliency":
            return (read_gray(files[0]) > 0.5).astype(np.float32)
        if task == "edge":
            return label_boundaries(read_context_labelmap(files[0]))
        normals = read_rgb(files[0]).astype(np.float32) * (2.0 / 255.0) - 1.0
        label_map = read_context_labelmap(files[1])
        if label_map.shape != normals.shape[:2]:
            raise ValueError(f"{files[1]}: LabelMap is {label_map.shape} but {files[0]} is "
                             f"{normals.shape[:2]}")
        valid = np.isin(label_map, list(NORMALS_VALID_CONTEXT_IDS))
        return unit_normals(normals * valid[..., None])
