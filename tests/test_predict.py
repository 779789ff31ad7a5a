"""``Predictor`` and ``faar-predict`` on a model exported by the real exporter (no server)."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from support import OfflineMaps, encode, image, manifest, post_image, settings

from faar_serve import codec
from faar_serve.app import create_app
from faar_serve.predictor import Predictor
from faar_serve.predictor.cli import main as faar_predict

ALL_TASKS = ["semseg", "human_parts", "saliency", "normals", "depth", "edge"]
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def predictor(repo: Path) -> Iterator[Predictor]:
    with Predictor(repo, threads=2) as p:
        yield p


def test_every_input_kind_gives_the_reference_maps(predictor: Predictor, repo: Path, tmp_path: Path,
                                                   offline_maps: OfflineMaps) -> None:
    rgb = image(800, height=45, width=70)
    path = tmp_path / "a.png"
    path.write_bytes(encode(rgb))
    want = offline_maps(rgb)
    for source in (path, str(path), path.read_bytes(), Image.fromarray(rgb), rgb):
        p = predictor.predict(source)
        assert list(p.maps) == ALL_TASKS and p.size == (45, 70) and p.image_size == (45, 70)
        for task, ref in want.items():
            if ref.dtype == np.uint8:
                np.testing.assert_array_equal(p[task], ref, err_msg=task)
            else:
                np.testing.assert_allclose(p[task], ref, atol=1e-5, err_msg=task)
    meta = manifest(repo)["tasks"]
    assert list(p.classes("semseg")) == meta["semseg"]["classes"]
    assert [list(c) for c in p.palette("semseg")] == meta["semseg"]["palette"] and p.units("depth") == "m"


def test_tasks_size_and_batches(predictor: Predictor) -> None:
    images = [image(810 + i, height=40 + 10 * i, width=90) for i in range(3)]
    batch = predictor.predict_batch(images, tasks="depth,semseg", size="model")
    assert [list(p.maps) for p in batch] == [["depth", "semseg"]] * 3
    assert {p.size for p in batch} == {(64, 64)} and [p.image_size for p in batch] == [(40, 90), (50, 90), (60, 90)]
    for p, rgb in zip(batch, images, strict=True):  # the same as one at a time: no mix-up inside a batch
        np.testing.assert_array_equal(p["semseg"], predictor.predict(rgb, tasks=["semseg"], size="model")["semseg"])
    assert predictor.predict(images[0], size=30).size == (13, 30)
    with pytest.raises(KeyError, match="depht"):
        predictor.predict(images[0], tasks="depht")
    with pytest.raises(ValueError, match="size must be"):
        predictor.predict(images[0], size="huge")
    with pytest.raises(codec.ImageError, match="uint8"):
        predictor.predict(np.zeros((8, 8, 3), np.float32))


def test_save_writes_the_gateways_pngs_and_a_preview(predictor: Predictor, repo: Path, tmp_path: Path) -> None:
    data = encode(image(820, height=50, width=80), "JPEG", quality=90)
    written = predictor.predict(data).save(tmp_path, stem="photo")
    assert [p.name for p in written] == [f"photo.{t}.png" for t in ALL_TASKS] + ["photo.preview.png"]
    with TestClient(create_app(settings(repo))) as client:
        answer = client.post("/v1/predict", files=post_image(data, "photo.jpg")).json()
    for task in ALL_TASKS:  # byte for byte what the gateway sends
        assert (tmp_path / f"photo.{task}.png").read_bytes() == base64.b64decode(answer["tasks"][task]["png"]), task
    preview = Image.open(tmp_path / "photo.preview.png")
    assert preview.height == 256 and preview.width == 7 * round(80 * 256 / 50)
    (npz,) = predictor.predict(data, tasks="depth").save(tmp_path, stem="arrays", fmt="npz", preview=False)
    with np.load(npz) as z:
        assert z.files == ["depth"] and z["depth"].dtype == np.float16 and z["depth"].shape == (50, 80)


def photo_folder(root: Path) -> Path:
    folder = root / "photos"
    (folder / "street").mkdir(parents=True)
    for i in range(3):
        (folder / f"{i}.jpg").write_bytes(encode(image(830 + i, height=48, width=64), "JPEG"))
    (folder / "street" / "3.png").write_bytes(encode(image(833, height=30, width=40)))
    (folder / "notes.jpg").write_text("not an image")  # an image suffix, text inside
    good = encode(image(834, height=120, width=160), "JPEG")
    (folder / "cut.jpg").write_bytes(good[: len(good) // 2])  # truncated
    return folder


def summary(out: Path) -> dict:
    return json.loads((out / "faar-predict-summary.json").read_text())


def test_folder_with_bad_files_finishes_the_rest_and_resumes(repo: Path, tmp_path: Path) -> None:
    folder, out = photo_folder(tmp_path), tmp_path / "maps"
    args = ["--model-repository", str(repo), str(folder), str(tmp_path / "missing.png"), "--out", str(out),
            "--quiet", "--workers", "2", "--tasks", "semseg,depth"]
    assert faar_predict(args) == 1
    first = summary(out)
    assert (first["done"], first["failed"], first["skipped_existing"]) == (4, 3, 0)
    errors = {Path(f["input"]).name: f["error"] for f in first["failures"]}
    assert errors == {"notes.jpg": "not_an_image", "cut.jpg": "corrupt_image", "missing.png": "not_found"}
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png")) == sorted(
        [f"{n}.{t}.png" for n in ("0", "1", "2", "street/3") for t in ("semseg", "depth")]
        + [f"{n}.preview.png" for n in ("0", "1", "2", "street/3")])
    assert Image.open(out / "street" / "3.depth.png").size == (40, 30)

    (out / "1.depth.png").unlink()  # as if killed half-way through image 1
    stamp = (out / "0.semseg.png").stat().st_mtime_ns
    assert faar_predict(args) == 1
    second = summary(out)
    assert (second["done"], second["skipped_existing"], second["failed"]) == (1, 3, 3)
    assert (out / "1.depth.png").exists() and (out / "0.semseg.png").stat().st_mtime_ns == stamp
    assert faar_predict([*args, "--overwrite"]) == 1 and summary(out)["done"] == 4


def test_globs_lists_npz_and_the_console_script(repo: Path, tmp_path: Path) -> None:
    folder = photo_folder(tmp_path)
    listing = tmp_path / "list.txt"
    listing.write_text("# two photos\nphotos/0.jpg\n\nphotos/street/3.png\n")
    out = tmp_path / "npz"
    assert faar_predict(["--model-repository", str(repo), str(listing), str(folder / "[12].jpg"), "--out", str(out),
                         "--format", "npz", "--size", "model", "--no-preview", "--quiet"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["0.npz", "1.npz", "2.npz", "3.npz", "faar-predict-summary.json"]
    with np.load(out / "3.npz") as z:
        assert sorted(z.files) == sorted(ALL_TASKS) and z["semseg"].shape == (64, 64)
        assert z["semseg"].dtype == np.uint8 and z["normals"].dtype == np.float16
    # As users run it, in a process of its own, and it stays torch-free.
    code = textwrap.dedent(f"""
        import sys
        from faar_serve.predictor.cli import main
        code = main(["--model-repository", {str(repo)!r}, {str(folder / "0.jpg")!r}, "--out", {str(tmp_path / "o")!r},
                     "--quiet"])
        assert not [m for m in sys.modules if m.split(".")[0] in ("torch", "faar", "timm")]
        sys.exit(code)
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["done"] == 1 and (tmp_path / "o" / "0.preview.png").exists()
    bad = subprocess.run([sys.executable, "-m", "faar_serve.predictor.cli", "--model-repository", str(tmp_path),
                          str(folder), "--out", str(tmp_path / "x")], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert bad.returncode == 2 and "not found" in bad.stderr
