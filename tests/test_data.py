"""faar.data: generated scenes (determinism, exact geometry), transforms (flip/rotate/scale keep
every task consistent), and the PASCAL_MT / NYUD_MT loaders on tiny on-disk fixtures."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.io
import torch
from fixtures_data import AEROPLANE, NORMAL, WALL, make_nyud_mt, make_pascal_mt
from torch.utils.data import default_collate

from faar.config import DataConfig
from faar.data import build_dataset
from faar.data.scenes import (
    SCENE_CLASSES,
    SCENE_PARTS,
    Scenes,
    render_scene,
    sample_scene,
    scene_seed,
    write_scenes,
)
from faar.data.transforms import IMAGENET_MEAN, IMAGENET_STD, Augmentation, transform_sample

ALL_SCENE_TASKS = ["semseg", "human_parts", "saliency", "normals", "depth", "edge"]
SIZE = (64, 80)


# --- scenes: determinism and labels ---------------------------------------------------------
def test_scene_is_deterministic_and_seeds_differ():
    a, b = render_scene(5, SIZE), render_scene(5, SIZE)
    for key in ["image", *ALL_SCENE_TASKS]:
        np.testing.assert_array_equal(a[key], b[key])
    assert not np.array_equal(a["image"], render_scene(6, SIZE)["image"])
    train = {scene_seed(0, "train", i) for i in range(200)}
    val = {scene_seed(0, "val", i) for i in range(200)}
    assert len(train) == 200 and not train & val
    assert scene_seed(1, "train", 0) not in train


def _camera_rays(size: tuple[int, int], focal: float) -> np.ndarray:
    """Camera-frame ray directions with z = -1, matching the renderer's pixel centres."""
    h, w = size
    u = (np.arange(w) + 0.5 - w / 2) / focal
    v = -(np.arange(h) + 0.5 - h / 2) / focal
    return np.stack(np.broadcast_arrays(u[None, :], v[:, None], -1.0), -1)


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4, 5])
def test_scene_labels_are_consistent(seed):
    r = render_scene(seed, SIZE)
    cam = sample_scene(seed).camera
    semseg, parts, depth, normals = r["semseg"], r["human_parts"], r["depth"], r["normals"]
    objects = semseg >= SCENE_CLASSES.index("sphere")
    sky, ground = semseg == SCENE_CLASSES.index("sky"), semseg == SCENE_CLASSES.index("ground")
    assert objects.any() and ground.any()
    np.testing.assert_array_equal(r["saliency"], objects.astype(np.float32))
    np.testing.assert_array_equal(parts > 0, objects)
    part_class = np.array([0] + [SCENE_CLASSES.index(p.rsplit("_", 1)[0]) for p in SCENE_PARTS[1:]])
    np.testing.assert_array_equal(part_class[parts[objects]], semseg[objects])
    # Depth and normals exist exactly off the sky; normals are unit vectors.
    np.testing.assert_array_equal(depth > 0, ~sky)
    norm = np.linalg.norm(normals, axis=-1)
    np.testing.assert_allclose(norm[~sky], 1.0, atol=1e-5)
    assert (norm[sky] == 0).all()
    # Ground: normal is world-up seen by a camera pitched down, points lie on the plane y = 0.
    up = np.array([0.0, np.cos(cam.pitch), np.sin(cam.pitch)])
    np.testing.assert_allclose(normals[ground], np.tile(up, (int(ground.sum()), 1)), atol=1e-5)
    points = depth[..., None] * _camera_rays(SIZE, cam.focal(SIZE[0]))
    height = cam.height + points @ cam.rotation()[1]
    np.testing.assert_allclose(height[ground], 0.0, atol=1e-3)
    assert (height[objects] > -1e-3).all()  # nothing below the ground
    # Parts follow the geometry: tops face up, sides are vertical, sphere halves split at the equator.
    up_component = normals @ cam.rotation()[1]
    def is_up(y):
        return np.abs(y - 1) < 1e-5

    def is_level(y):
        return np.abs(y) < 1e-5

    for name, check in (("box_top", is_up), ("cylinder_top", is_up), ("box_side", is_level),
                        ("cylinder_side", is_level), ("sphere_upper", lambda y: y > 0),
                        ("sphere_lower", lambda y: y < 0)):
        assert check(up_component[parts == SCENE_PARTS.index(name)]).all(), name


@pytest.mark.parametrize("seed", [0, 3, 7])
def test_scene_edges_sit_on_the_occluding_side_of_boundaries(seed):
    r = render_scene(seed, SIZE)
    semseg, edge, depth = r["semseg"].astype(int), r["edge"] > 0, r["depth"]
    far = np.where(semseg == SCENE_CLASSES.index("sky"), np.inf, depth)
    occluding = np.zeros_like(edge)  # nearer pixel of a pair across a class or depth boundary
    for axis in (0, 1):
        a = [slice(None)] * 2
        b = [slice(None)] * 2
        a[axis], b[axis] = slice(0, -1), slice(1, None)
        a, b = tuple(a), tuple(b)
        differ = semseg[a] != semseg[b]
        assert (edge[a] | edge[b])[differ].all(), "a class boundary without an edge"
        with np.errstate(invalid="ignore"):
            step = differ | (np.abs(far[a] - far[b]) > 0.01 * np.minimum(far[a], far[b]))
        occluding[a] |= step & (far[b] >= far[a])
        occluding[b] |= step & (far[a] >= far[b])
    assert edge.any() and occluding[edge].all(), "an edge that is not the near side of a boundary"


def test_scene_normals_match_depth_geometry():
    """Normals estimated from back-projected depth agree with the rendered normals on objects."""
    size = (96, 128)
    errors = []
    for seed in range(4):
        r = render_scene(seed, size)
        cam = sample_scene(seed).camera
        p = r["depth"][..., None] * _camera_rays(size, cam.focal(size[0]))
        est = np.cross(p[2:, 1:-1] - p[:-2, 1:-1], p[1:-1, 2:] - p[1:-1, :-2])
        est /= np.linalg.norm(est, axis=-1, keepdims=True) + 1e-12
        parts = r["human_parts"]
        same = np.ones_like(parts[1:-1, 1:-1], dtype=bool)
        for dv, du in ((0, 1), (2, 1), (1, 0), (1, 2)):
            same &= parts[dv:dv + size[0] - 2, du:du + size[1] - 2] == parts[1:-1, 1:-1]
        inner = same & (parts[1:-1, 1:-1] > 0)
        cos = (est * r["normals"][1:-1, 1:-1]).sum(-1)[inner]
        errors.append(np.degrees(np.arccos(np.clip(cos, -1, 1))))
    errors = np.concatenate(errors)
    assert len(errors) > 500
    assert np.median(errors) < 2.0 and np.percentile(errors, 90) < 10.0


def test_scene_objects_rest_on_the_ground():
    for seed in range(30):
        scene = sample_scene(seed)
        lowest: dict[int, float] = {}
        for prim in scene.primitives:
            lo, _ = prim.shape.bounds()
            lowest[prim.instance] = min(lowest.get(prim.instance, np.inf), lo[1])
        assert lowest and all(abs(v) < 1e-9 for v in lowest.values())


def test_write_scenes_round_trip(tmp_path):
    size = (32, 40)
    write_scenes(tmp_path, 3, seed=4, size=size, split="val")
    cfg_disk = DataConfig(dataset="scenes", root=str(tmp_path), seed=4)
    cfg_live = DataConfig(dataset="scenes", seed=4, num_val=3)
    disk = build_dataset(cfg_disk, "val", ALL_SCENE_TASKS, size, train=False)
    live = build_dataset(cfg_live, "val", ALL_SCENE_TASKS, size, train=False)
    assert len(disk) == len(live) == 3
    for i in range(3):
        a, b = disk.raw(i), live.raw(i)
        assert a["meta"] == b["meta"]
        for key in ["image", *ALL_SCENE_TASKS]:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


# --- the training-loop interface ---------------------------------------------------------
def test_build_dataset_sample_format_and_collate():
    cfg = DataConfig(dataset="scenes", num_train=4, num_val=2)
    tasks = ["semseg", "human_parts", "normals", "depth"]
    ds = build_dataset(cfg, "train", tasks, (48, 56), train=True, generator=torch.Generator().manual_seed(0))
    assert len(ds) == 4
    assert ds.classes == {"semseg": list(SCENE_CLASSES), "human_parts": list(SCENE_PARTS)}
    s = ds[1]
    assert set(s) == {"image", "meta", *tasks}
    assert s["image"].shape == (3, 48, 56) and s["image"].dtype == torch.float32
    assert s["semseg"].shape == (48, 56) and s["semseg"].dtype == torch.int64
    assert s["normals"].shape == (3, 48, 56) and s["depth"].shape == (1, 48, 56)
    assert s["meta"] == {"name": "train_000001", "size": (48, 56)}
    batch = default_collate([ds[0], ds[1]])
    assert batch["image"].shape == (2, 3, 48, 56)
    assert batch["meta"]["name"] == ["train_000000", "train_000001"]
    assert len(build_dataset(cfg, "val", tasks, (48, 56), train=False)) == 2
    with pytest.raises(ValueError, match="split 'test'"):
        build_dataset(cfg, "test", tasks, (48, 56), train=False)


def test_label_drop_leaves_labels_out_of_training_samples_only():
    cfg = DataConfig(dataset="scenes", num_train=40, num_val=8, label_drop=0.5)
    train = build_dataset(cfg, "train", ALL_SCENE_TASKS, (32, 32), train=False)
    kept = [train.labelled_tasks(i) for i in range(40)]
    dropped = sum(len(ALL_SCENE_TASKS) - len(k) for k in kept)
    assert 0.3 < dropped / (40 * len(ALL_SCENE_TASKS)) < 0.7
    # decided by the sample's seed: the same for another dataset object and for a subset of tasks
    again = build_dataset(cfg, "train", ["depth", "semseg"], (32, 32), train=False)
    assert [set(again.labelled_tasks(i)) for i in range(40)] == [{t for t in k if t in ("semseg", "depth")}
                                                            for k in kept]
    i = next(i for i, k in enumerate(kept) if len(k) < len(ALL_SCENE_TASKS))
    assert set(train.raw(i)) == {"image", "meta", *kept[i]}
    val = build_dataset(cfg, "val", ALL_SCENE_TASKS, (32, 32), train=False)
    assert all(set(val.raw(i)) == {"image", "meta", *ALL_SCENE_TASKS} for i in range(8))
    with pytest.raises(ValueError, match="label_drop"):
        Scenes(2, 0, "train", ALL_SCENE_TASKS, (32, 32), label_drop=1.0)


def test_a_missing_label_becomes_an_unlabelled_map_of_the_real_shape():
    """What the DataLoader carries for a missing label: the kind's all-unlabelled map, collated as usual."""
    full = Scenes(2, 0, "train", ALL_SCENE_TASKS, (32, 40))

    class NoLabels(Scenes):
        def _load(self, index):
            return {k: v for k, v in super()._load(index).items() if k in ("image", "meta")}

    empty = NoLabels(2, 0, "train", ALL_SCENE_TASKS, (32, 40))
    a, b = full[0], empty[0]
    torch.testing.assert_close(b["image"], a["image"])
    for task in ALL_SCENE_TASKS:
        assert b[task].shape == a[task].shape and b[task].dtype == a[task].dtype, task
    assert (b["semseg"] == 255).all() and (b["saliency"] == 255).all() and (b["edge"] == 255).all()
    assert (b["normals"] == 0).all() and (b["depth"] == 0).all()
    batch = default_collate([full[1], empty[1]])
    assert batch["semseg"].shape == (2, 32, 40) and batch["normals"].shape == (2, 3, 32, 40)


def test_validation_sample_is_the_normalised_raw_sample():
    cfg = DataConfig(dataset="scenes", num_val=2)
    ds = build_dataset(cfg, "val", ALL_SCENE_TASKS, SIZE, train=False)
    raw, s = ds.raw(0), ds[0]
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    expected = (torch.tensor(raw["image"]).permute(2, 0, 1) / 255.0 - mean) / std
    torch.testing.assert_close(s["image"], expected, atol=1e-5, rtol=0)
    assert torch.equal(s["semseg"], torch.from_numpy(raw["semseg"]).long())
    normals = torch.from_numpy(raw["normals"]).permute(2, 0, 1)
    torch.testing.assert_close(s["normals"], normals, atol=1e-5, rtol=0)
    torch.testing.assert_close(s["depth"][0], torch.from_numpy(raw["depth"]), atol=1e-4, rtol=1e-5)
    assert torch.equal(s["edge"][0], torch.from_numpy(raw["edge"]))


def test_unavailable_or_unknown_task_is_a_clear_error(tmp_path):
    make_pascal_mt(tmp_path)
    with pytest.raises(ValueError, match=r"pascal_context.*depth"):
        build_dataset(DataConfig(dataset="pascal_context", root=str(tmp_path)), "train", ["depth"], SIZE,
                      train=False)
    with pytest.raises(ValueError, match="unknown task 'albedo'"):
        build_dataset(DataConfig(), "train", ["albedo"], SIZE, False)


def test_augmentation_is_deterministic_given_a_generator():
    cfg = DataConfig(dataset="scenes", num_train=2)

    def draw(seed: int) -> dict:
        ds = build_dataset(cfg, "train", ALL_SCENE_TASKS, SIZE, train=True,
                           generator=torch.Generator().manual_seed(seed))
        return ds[0]

    a, b, c = draw(3), draw(3), draw(4)
    for key in ["image", *ALL_SCENE_TASKS]:
        assert torch.equal(a[key], b[key]), key
    assert not torch.equal(a["image"], c["image"])


# --- transforms ------------------------------------------------------------------------------
def _mirror(raw: dict) -> dict:
    """The mirror-image world of a raw sample, done by hand in numpy."""
    out = {k: np.ascontiguousarray(v[:, ::-1]) for k, v in raw.items() if k != "meta"}
    out["normals"] = out["normals"] * np.array([-1, 1, 1], dtype=np.float32)
    out["meta"] = raw["meta"]
    return out


def test_flip_mirrors_every_task_and_flipping_twice_is_identity():
    raw = render_scene(2, SIZE)
    plain = transform_sample(raw, SIZE)
    flipped = transform_sample(raw, SIZE, Augmentation(flip=True))
    for key in ["image", *ALL_SCENE_TASKS]:
        expected = plain[key].flip(-1)
        if key == "normals":
            expected = expected * torch.tensor([-1.0, 1.0, 1.0]).view(3, 1, 1)
        torch.testing.assert_close(flipped[key], expected, atol=1e-5, rtol=1e-5, msg=key)
    twice = transform_sample(_mirror(raw), SIZE, Augmentation(flip=True))
    for key in ["image", *ALL_SCENE_TASKS]:
        torch.testing.assert_close(twice[key], plain[key], atol=1e-5, rtol=1e-5, msg=key)


def _radial_sample(size: tuple[int, int]) -> dict:
    """Normals pointing away from the image centre (a bump facing the camera), constant depth 2."""
    h, w = size
    x = np.arange(w) + 0.5 - w / 2
    y = -(np.arange(h) + 0.5 - h / 2)
    x, y = np.meshgrid(x, y)
    normals = np.stack([x, y, np.full_like(x, 10.0)], -1)
    normals /= np.linalg.norm(normals, axis=-1, keepdims=True)
    return {"image": np.zeros((h, w, 3), np.uint8), "normals": normals.astype(np.float32),
            "depth": np.full((h, w), 2.0, np.float32), "semseg": np.ones((h, w), np.uint8),
            "meta": {"name": "radial", "size": (h, w)}}


@pytest.mark.parametrize("aug", [Augmentation(angle=20.0), Augmentation(angle=-15.0, scale=1.2),
                                 Augmentation(flip=True, angle=10.0, scale=0.8)])
def test_rotation_and_scale_keep_normals_and_depth_consistent(aug):
    """A field that points away from the centre must still do so after any flip/rotation/zoom."""
    size = (40, 48)
    raw = _radial_sample((60, 72))
    s = transform_sample(raw, size, aug)
    h, w = size
    x = torch.arange(w) + 0.5 - w / 2
    y = -(torch.arange(h) + 0.5 - h / 2)
    y, x = torch.meshgrid(y, x, indexing="ij")
    radial = torch.stack([x, y]) / torch.hypot(x, y)
    n = s["normals"]
    valid = (n.abs().sum(0) > 0) & (torch.hypot(x, y) > 3)
    in_plane = n[:2] / n[:2].norm(dim=0, keepdim=True).clamp(min=1e-8)
    assert valid.sum() > 0.5 * h * w
    assert ((in_plane * radial).sum(0)[valid] > 0.99).all()
    torch.testing.assert_close(n.norm(dim=0)[valid], torch.ones(int(valid.sum())), atol=1e-5, rtol=0)
    depth, label = s["depth"][0], s["semseg"]
    torch.testing.assert_close(depth[label == 1], torch.full_like(depth[label == 1], 2.0 / aug.scale))
    outside = label == 255
    if aug.scale < 1:  # zooming out brings in pixels from outside: ignored everywhere
        assert outside.any()
    assert (depth[outside] == 0).all() and (n[:, outside] == 0).all()
    assert set(label.unique().tolist()) <= {1, 255}


def test_resize_keeps_label_values_and_unit_normals():
    raw = render_scene(1, (96, 120))
    s = transform_sample(raw, (40, 52))
    assert set(s["semseg"].unique().tolist()) <= set(np.unique(raw["semseg"]).tolist())
    assert set(s["edge"].unique().tolist()) <= {0.0, 1.0}
    norm = s["normals"].norm(dim=0)
    labelled = norm > 0
    torch.testing.assert_close(norm[labelled], torch.ones(int(labelled.sum())), atol=1e-5, rtol=0)
    assert (s["depth"][0][labelled] > 0).all() and (s["depth"][0][~labelled] == 0).all()


# --- real layouts on fixtures -----------------------------------------------------------------
PASCAL_TASKS = ["semseg", "human_parts", "saliency", "normals", "edge"]


def test_pascal_context_loader_decodes_every_task(tmp_path):
    expected = make_pascal_mt(tmp_path)
    cfg = DataConfig(dataset="pascal_context", root=str(tmp_path))
    ds = build_dataset(cfg, "train", PASCAL_TASKS, (16, 24), train=False)
    assert len(ds) == 2 and ds.classes["human_parts"][4] == "lower_arm" and len(ds.classes["semseg"]) == 21
    for i in range(len(ds)):
        raw = ds.raw(i)
        exp = expected[raw["meta"]["name"]]
        assert raw["image"].dtype == np.uint8 and raw["image"].shape == (20, 28, 3)
        for key in ("semseg", "human_parts", "saliency"):
            np.testing.assert_array_equal(raw[key], exp[key], err_msg=key)
        np.testing.assert_allclose(raw["normals"], exp["normals"], atol=0.01)  # 8-bit quantisation
        labelmap = exp["labelmap"]
        boundary = np.zeros(labelmap.shape, bool)
        boundary[:, :-1] |= labelmap[:, :-1] != labelmap[:, 1:]
        boundary[:-1] |= labelmap[:-1] != labelmap[1:]
        np.testing.assert_array_equal(raw["edge"] > 0, boundary)
    # The VOC12 annotation wins over pascal-context; the one without parts is all-ignore.
    assert ds.raw(0)["meta"]["name"] == "2008_000002"
    assert (ds.raw(1)["human_parts"] == 255).all()
    s = ds[0]
    assert s["human_parts"].dtype == torch.int64 and s["saliency"].shape == (1, 16, 24)
    val = build_dataset(cfg, "val", PASCAL_TASKS, (16, 24), train=True)
    assert len(val) == 1 and (val.raw(0)["human_parts"] == 255).all()
    default_collate([val[0], val[0]])


def test_pascal_normals_keep_our_axes_and_only_nyud_classes(tmp_path):
    make_pascal_mt(tmp_path)
    cfg = DataConfig(dataset="pascal_context", root=str(tmp_path))
    ds = build_dataset(cfg, "train", ["normals"], (20, 28), train=False)
    raw = ds.raw(0)
    labelmap = scipy.io.loadmat(tmp_path / "pascal-context" / "trainval" / "2008_000002.mat")["LabelMap"]
    wall = labelmap == WALL
    np.testing.assert_allclose(raw["normals"][wall], np.tile(NORMAL, (int(wall.sum()), 1)), atol=0.01)
    assert (raw["normals"][labelmap == AEROPLANE] == 0).all()


def test_nyud_loader(tmp_path):
    expected = make_nyud_mt(tmp_path)
    cfg = DataConfig(dataset="nyud", root=str(tmp_path))
    tasks = ["semseg", "depth", "normals", "edge"]
    ds = build_dataset(cfg, "train", tasks, (16, 24), train=True, generator=torch.Generator().manual_seed(0))
    assert len(ds) == 2 and len(ds.classes["semseg"]) == 40 and ds.classes["semseg"][1] == "floor"
    for i in range(2):  # .jpg and .png images
        raw = ds.raw(i)
        exp = expected[raw["meta"]["name"]]
        np.testing.assert_array_equal(raw["semseg"], exp["semseg"])
        np.testing.assert_array_equal(raw["depth"], exp["depth"])
        np.testing.assert_array_equal(raw["edge"], exp["edge"])
        n = exp["normals"]
        unit = n / np.maximum(np.linalg.norm(n, axis=-1, keepdims=True), 1e-12)
        np.testing.assert_allclose(raw["normals"], unit, atol=1e-6)
    s = ds[1]
    assert s["depth"].shape == (1, 16, 24) and s["semseg"].dtype == torch.int64
    with pytest.raises(ValueError, match="cannot provide.*human_parts"):
        build_dataset(cfg, "train", ["human_parts"], (16, 24), train=False)


# --- errors ---------------------------------------------------------------------------------------
def test_missing_root_is_an_error_naming_it(tmp_path):
    missing = tmp_path / "nowhere"
    for name in ("nyud", "pascal_context", "scenes"):
        with pytest.raises(FileNotFoundError, match="nowhere"):
            build_dataset(DataConfig(dataset=name, root=str(missing)), "train", ["semseg"], SIZE, False)
    with pytest.raises(ValueError, match="needs data.root"):
        build_dataset(DataConfig(dataset="nyud"), "train", ["semseg"], SIZE, False)
    make_nyud_mt(tmp_path)
    with pytest.raises(FileNotFoundError, match="test.txt"):
        build_dataset(DataConfig(dataset="nyud", root=str(tmp_path)), "test", ["semseg"], SIZE, False)


def test_list_naming_a_missing_file_is_an_error_naming_both(tmp_path):
    make_nyud_mt(tmp_path)
    (tmp_path / "depth" / "0002.npy").unlink()
    cfg = DataConfig(dataset="nyud", root=str(tmp_path))
    assert len(build_dataset(cfg, "train", ["semseg"], SIZE, False)) == 2  # depth not requested: fine
    with pytest.raises(FileNotFoundError, match=r"train\.txt.*'0002'.*depth/0002\.npy"):
        build_dataset(cfg, "train", ["semseg", "depth"], SIZE, False)
    make_pascal_mt(tmp_path / "pascal")
    (tmp_path / "pascal" / "human_parts" / "2008_000003.mat").unlink()
    with pytest.raises(FileNotFoundError, match=r"human_parts/2008_000003\.mat"):
        build_dataset(DataConfig(dataset="pascal_context", root=str(tmp_path / "pascal")), "train",
                      ["human_parts"], SIZE, False)


def test_wrong_size_label_is_an_error_naming_the_file(tmp_path):
    make_nyud_mt(tmp_path)
    np.save(tmp_path / "depth" / "0001.npy", np.ones((5, 5), np.float32))
    ds = build_dataset(DataConfig(dataset="nyud", root=str(tmp_path)), "train", ["depth"], SIZE, False)
    ds.raw(1)
    with pytest.raises(ValueError, match=r"depth/0001\.npy"):
        ds.raw(0)
