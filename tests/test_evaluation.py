"""faar-eval: an exported model's task metrics through the gateway's image path (scenes, PASCAL_MT, NYUD_MT)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from fixtures_data import make_nyud_mt, make_pascal_mt
from PIL import Image

from faar.cli import eval_main
from faar.config import load_config
from faar.data import build_dataset
from faar.evaluation import EvalError, evaluate_export, maps_as_raw
from faar.export import ExportOptions, export_run
from faar.model import build_model
from faar.run import save_model
from faar.tasks import get_task

SCENE_TASKS = "model.tasks=[semseg,human_parts,saliency,normals,depth,edge]"


def _export(tmp: Path, config: str, overrides: list[str], classes: dict | None = None) -> tuple[Path, Path]:
    """A freshly initialised tiny model of ``config``'s tasks, saved as a run and exported (fp32)."""
    cfg = load_config(config, overrides)
    torch.manual_seed(0)
    model = build_model(cfg.model, classes=classes, load_weights=False)
    run, repo = tmp / "run", tmp / "repo"
    save_model(model, run)
    export_run(run, repo, ExportOptions())
    return run, repo


@pytest.fixture(scope="module")
def scenes(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    cfg = load_config("tiny", [SCENE_TASKS])
    ds = build_dataset(cfg.data, "val", cfg.model.tasks, cfg.model.img_size, train=False)
    return _export(tmp_path_factory.mktemp("scenes"), "tiny", [SCENE_TASKS], ds.classes)


def test_exported_model_matches_pytorch_on_scenes(scenes: tuple[Path, Path], tmp_path: Path) -> None:
    run, repo = scenes
    out = tmp_path / "eval.json"
    assert eval_main(["--model-repository", str(repo), "--config", "tiny", "--set", SCENE_TASKS, "--run", str(run),
                      "--limit", "6", "--batch-size", "4", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["data"] == {"dataset": "scenes", "root": None, "split": "val", "images": 6}
    assert report["model"]["precision"] == "fp32"
    assert set(report["exported"]) == {"semseg", "human_parts", "saliency", "normals", "depth", "edge"}
    # Scenes are rendered at the model's size, so both paths see the same pixels and the only
    # difference is the export itself (merge + ONNX): ~1e-6 in the maps, nothing in the metrics.
    for task, metrics in report["difference"].items():
        for name, diff in metrics.items():
            assert abs(diff) < 1e-3, (task, name, diff)
    assert math.isfinite(report["exported"]["normals"]["mean"])


def test_exported_maps_feed_the_meters_unchanged() -> None:
    """Each kind's map, turned into a raw output, post-processes back to the same map."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 7, (5, 6)).astype(np.uint8)
    spec = get_task("human_parts")
    np.testing.assert_array_equal(spec.postprocess(maps_as_raw(spec, labels))[0].numpy(), labels)
    prob = rng.random((5, 6)).astype(np.float32)
    back = get_task("saliency").activate(maps_as_raw(get_task("saliency"), prob))[0, 0].numpy()
    np.testing.assert_allclose(back, prob, atol=1e-6)
    normals = rng.normal(size=(3, 5, 6)).astype(np.float32)
    normals /= np.linalg.norm(normals, axis=0)
    np.testing.assert_allclose(get_task("normals").activate(maps_as_raw(get_task("normals"), normals))[0].numpy(),
                               normals, atol=1e-6)
    with pytest.raises(EvalError, match="class index"):
        maps_as_raw(spec, np.full((2, 2), 9, dtype=np.uint8))


def _by_hand(repo: Path, image: np.ndarray) -> dict[str, np.ndarray]:
    """ONNX Runtime on the Pillow-resized image, maps resized back to the image (independent of faar)."""
    session = ort.InferenceSession(str(repo / "faar" / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    _, h, w, _ = session.get_inputs()[0].shape
    x = np.asarray(Image.fromarray(image).resize((w, h), Image.Resampling.BILINEAR))
    names = [o.name for o in session.get_outputs()]
    out = dict(zip(names, (a[0] for a in session.run(names, {"image": x[None]})), strict=True))
    size = (image.shape[1], image.shape[0])
    maps = {"semseg": np.asarray(Image.fromarray(out["semseg"]).resize(size, Image.Resampling.NEAREST))}
    if "depth" in out:
        maps["depth"] = np.asarray(Image.fromarray(out["depth"]).resize(size, Image.Resampling.BILINEAR))
    return maps


@pytest.mark.parametrize("layout", ["pascal", "nyud"])
def test_real_dataset_layouts_at_native_label_size(layout: str, tmp_path: Path) -> None:
    """Fixtures in the PASCAL_MT / NYUD_MT layouts (20x28 images, a 64x64 model): the maps are
    resized back to each label's size, and the metrics equal a computation by hand."""
    root = tmp_path / layout
    if layout == "pascal":
        expected = make_pascal_mt(root)
        config, tasks = "faar_pascal_swin_t", "[semseg,human_parts,saliency,normals]"
    else:
        expected = make_nyud_mt(root)
        config, tasks = "faar_nyud_swin_t", "[semseg,depth,normals,edge]"
    overrides = [f"data.root={root}", f"model.tasks={tasks}", "model.backbone=swin_nano", "model.img_size=[64,64]",
                 "model.pretrained=false", "model.decoder.branch_channels=[8,8,16,16]"]
    cfg = load_config(config, overrides)
    ds = build_dataset(cfg.data, "val", cfg.model.tasks, cfg.model.img_size, train=False)
    run, repo = _export(tmp_path, config, overrides, ds.classes)

    report = evaluate_export(repo, cfg.data, run_dir=run)
    assert report["data"]["images"] == 1 and report["data"]["split"] == "val"
    name = ds.ids[0]
    maps = _by_hand(repo, ds.raw(0)["image"])
    gt = expected[name]["semseg"].astype(np.int64)
    valid = gt != 255
    acc = 100 * float(np.mean(maps["semseg"][valid] == gt[valid]))
    assert report["exported"]["semseg"]["pixel_acc"] == pytest.approx(acc, abs=1e-9)
    if layout == "nyud":
        depth = expected[name]["depth"]
        valid = depth > 0
        rmse = float(np.sqrt(np.mean((maps["depth"][valid].astype(np.float64) - depth[valid]) ** 2)))
        assert report["exported"]["depth"]["rmse"] == pytest.approx(rmse, rel=1e-5)
    assert set(report["pytorch"]) == set(report["exported"]) == set(report["difference"])


def test_bad_requests_fail_with_one_line(scenes: tuple[Path, Path], tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    run, repo = scenes
    assert eval_main(["--model-repository", str(repo)]) == 2
    assert "--config is required" in capsys.readouterr().err
    assert eval_main(["--model-repository", str(tmp_path), "--config", "tiny"]) == 2
    assert "not found" in capsys.readouterr().err
    # a dataset that cannot be read (no NYUD_MT files there) is one line, not a traceback
    assert eval_main(["--model-repository", str(repo), "--config", "tiny", "--set", "data.dataset=nyud",
                      "--set", f"data.root={tmp_path}"]) == 2
    assert "error:" in capsys.readouterr().err
