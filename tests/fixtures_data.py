"""Tiny on-disk datasets in the real PASCAL_MT and NYUD_MT layouts, so the loaders' file code runs.

Each builder writes a few samples under ``root`` and returns what the loader should decode.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import scipy.io
from PIL import Image

H, W = 20, 28
# PASCAL-Context LabelMap ids: 'wall' has NYUD normals, 'sky' and 'aeroplane' do not.
WALL, SKY, AEROPLANE = 440, 360, 2
NORMAL = np.array([0.6, 0.0, 0.8])


def _save_png(path: Path, array: np.ndarray, mode: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(array)
    if mode == "P":  # palette PNG like VOC's: stored values are palette indices
        image.putpalette([v for i in range(256) for v in (i, 255 - i, (7 * i) % 256)])
    image.save(path)


def _struct_array(records: list[dict], fields: tuple[str, ...]) -> np.ndarray:
    """A MATLAB struct array (1 x n) for savemat."""
    out = np.zeros((1, len(records)), dtype=[(f, object) for f in fields])
    for i, rec in enumerate(records):
        for f in fields:
            out[0, i][f] = rec[f]
    return out


def _parts_mat(path: Path, objects: list[tuple[int, np.ndarray, list[tuple[str, np.ndarray]]]]) -> None:
    """A PASCAL-Part ``anno`` file: objects as (class_ind, mask, [(part_name, mask), ...])."""
    records = [{
        "class": "person" if cls == 15 else "dog", "class_ind": cls, "mask": mask.astype(np.uint8),
        "parts": (_struct_array([{"part_name": n, "mask": m.astype(np.uint8)} for n, m in parts],
                                ("part_name", "mask")) if parts else np.zeros((0, 0))),
    } for cls, mask, parts in objects]
    path.parent.mkdir(parents=True, exist_ok=True)
    objects = _struct_array(records, ("class", "class_ind", "mask", "parts"))
    scipy.io.savemat(path, {"anno": {"imname": path.stem, "objects": objects}})


def box(y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    mask = np.zeros((H, W), dtype=bool)
    mask[y0:y1, x0:x1] = True
    return mask


def make_pascal_mt(root: Path) -> dict[str, dict[str, np.ndarray]]:
    """PASCAL_MT with train = [a, b], val = [c]; returns the expected raw labels per id."""
    rng = np.random.default_rng(0)
    expected: dict[str, dict[str, np.ndarray]] = {}
    ids = {"train": ["2008_000002", "2008_000003"], "val": ["2008_000007"]}
    for split, names in ids.items():
        path = root / "ImageSets" / "Context" / f"{split}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(names) + "\n")
    for k, name in enumerate(ids["train"] + ids["val"]):
        _save_png(root / "JPEGImages" / f"{name}.jpg", rng.integers(0, 255, (H, W, 3), dtype=np.uint8))
        semseg = rng.integers(0, 21, (H, W)).astype(np.uint8)
        semseg[0, :] = 255
        _save_png(root / "semseg" / "pascal-context" / f"{name}.png", semseg, mode="P")
        if k == 0:  # VOC12 annotation exists too and must win
            semseg = (semseg + 1) % 21
            _save_png(root / "semseg" / "VOC12" / f"{name}.png", semseg, mode="P")
        sal = np.zeros((H, W), dtype=np.uint8)
        sal[:, : W // 2] = 128  # 128/255 > 0.5 -> salient
        sal[:, W // 2:] = 127
        _save_png(root / "sal_distill" / f"{name}.png", sal)
        labelmap = np.full((H, W), SKY, dtype=np.uint16)
        labelmap[:, : W // 2] = WALL
        labelmap[5:8, 3:6] = AEROPLANE  # no normals on this class; adds boundaries
        (root / "pascal-context" / "trainval").mkdir(parents=True, exist_ok=True)
        scipy.io.savemat(root / "pascal-context" / "trainval" / f"{name}.mat", {"LabelMap": labelmap})
        encoded = np.round((NORMAL + 1) / 2 * 255).astype(np.uint8)
        _save_png(root / "normals_distill" / f"{name}.png", np.broadcast_to(encoded, (H, W, 3)).copy())
        normals = np.zeros((H, W, 3), dtype=np.float32)
        normals[labelmap == WALL] = NORMAL
        if k == 0:  # a person with parts and a dog with parts (ignored)
            parts = np.zeros((H, W), dtype=np.uint8)
            person = box(2, 18, 2, 12)
            head, hand, leg = box(2, 6, 4, 8), box(8, 10, 2, 4), box(12, 18, 8, 12)
            parts[head], parts[hand], parts[leg] = 1, 4, 5
            objects = [(12, box(0, 5, 20, 28), [("head", box(0, 2, 20, 24))]),
                       (15, person, [("head", head), ("lhand", hand), ("ruleg", leg)])]
        elif k == 1:  # no person: every pixel ignored
            parts = np.full((H, W), 255, dtype=np.uint8)
            objects = [(12, box(0, 5, 20, 28), [("tail", box(0, 2, 20, 24))])]
        else:  # a person without part annotations: ignored as well
            parts = np.full((H, W), 255, dtype=np.uint8)
            objects = [(15, box(2, 18, 2, 12), [])]
        _parts_mat(root / "human_parts" / f"{name}.mat", objects)
        expected[name] = {"semseg": semseg, "human_parts": parts, "normals": normals, "labelmap": labelmap,
                          "saliency": (sal > 127.5).astype(np.float32)}
    return expected


def make_nyud_mt(root: Path) -> dict[str, dict[str, np.ndarray]]:
    """NYUD_MT with train = [0001 (.jpg image), 0002 (.png image)], val = [0003]."""
    rng = np.random.default_rng(1)
    expected: dict[str, dict[str, np.ndarray]] = {}
    ids = {"train": ["0001", "0002"], "val": ["0003"]}
    (root / "gt_sets").mkdir(parents=True, exist_ok=True)
    for split, names in ids.items():
        (root / "gt_sets" / f"{split}.txt").write_text("\n".join(names) + "\n")
    for k, name in enumerate(ids["train"] + ids["val"]):
        ext = "png" if k == 1 else "jpg"
        _save_png(root / "images" / f"{name}.{ext}", rng.integers(0, 255, (H, W, 3), dtype=np.uint8))
        seg = rng.integers(0, 41, (H, W)).astype(np.uint8)
        _save_png(root / "segmentation" / f"{name}.png", seg)
        depth = rng.uniform(0.5, 9.0, (H, W)).astype(np.float32)
        depth[0, 0] = 0.0
        normals = rng.normal(size=(H, W, 3)).astype(np.float32) * 3
        normals[1, 1] = 0.0
        edge = (rng.random((H, W)) > 0.8).astype(np.float32)
        for folder, value in (("depth", depth), ("normals", normals), ("edge", edge)):
            (root / folder).mkdir(exist_ok=True)
            np.save(root / folder / f"{name}.npy", value)
        expected[name] = {"semseg": np.where(seg == 0, 255, seg.astype(np.int64) - 1).astype(np.uint8),
                          "depth": depth, "normals": normals, "edge": edge}
    return expected
