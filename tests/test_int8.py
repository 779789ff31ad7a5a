"""faar-export --precision int8 (and fp16) behind the accuracy gate; the gateway and Triton serve the result."""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import onnx
import pytest
import torch
from support import LiveServer, encode, image, load_npz, post_image, settings

from faar.cli import export_main
from faar.config import dump_config, load_config
from faar.data import build_dataset
from faar.export import ExportError, ExportOptions, export_run
from faar.export.gate import Limit, calibration_images, judge, parse_limit
from faar.export.quantize import node_groups
from faar.model import build_model
from faar.run import save_model
from faar_serve.app import create_app
from faar_serve.manifest import load_manifest
from faar_serve.triton_local import LocalTriton

# A tiny random model has no accuracy to keep: the gate is relaxed here (the defaults are tested
# for what they say in test_default_limits_and_judging), except where it must refuse.
RELAXED = ("semseg=20", "saliency=20", "normals=20", "depth=50%")
SMALL = {"calibration_images": 4, "gate_images": 4}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny scenes run (four tasks, one per kind) with its config.yaml: the data for calibration and gate."""
    cfg = load_config("tiny", ["model.tasks=[semseg,saliency,normals,depth]", "data.num_train=8", "data.num_val=8"])
    ds = build_dataset(cfg.data, "val", cfg.model.tasks, cfg.model.img_size, train=False)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("run") / "tiny"
    save_model(build_model(cfg.model, classes=ds.classes, load_weights=False), path)
    (path / "config.yaml").write_text(dump_config(cfg))
    return path


@pytest.fixture(scope="module")
def models(run_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Version 1 fp32, version 2 int8 of the same run (one config.pbtxt serves both)."""
    repo = tmp_path_factory.mktemp("repo") / "models"
    export_run(run_dir, repo, ExportOptions())
    assert export_main(["--run", str(run_dir), "--out", str(repo), "--version", "2", "--precision", "int8",
                        "--calibration-images", "4", "--gate-images", "4",
                        *[f"--gate={g}" for g in RELAXED]]) == 0
    return repo


def test_int8_graph_and_manifest(models: Path) -> None:
    manifest = load_manifest(models / "faar" / "2" / "manifest.json")
    export = manifest.export
    assert export.precision == "int8" and not export.fp16 and export.options.precision == "int8"
    q = export.quantization
    assert q is not None and q.method.format == "QDQ" and q.calibration.images == 4
    assert q.calibration.source == "scenes train"
    assert set(q.groups) >= {"backbone.linear", "backbone.attention", "decoder.conv"}
    assert set(q.float_groups) < set(q.groups)  # something is quantised
    assert q.tried and q.tried[0].float_groups == []  # everything quantised is always tried first
    gate = manifest.parity.gate
    assert gate is not None and gate.passed and gate.images == 4 and gate.data == "scenes val"
    assert set(gate.tasks) == {"semseg", "saliency", "normals", "depth"}
    assert gate.tasks["depth"].metric == "rmse" and gate.tasks["depth"].limit == "50%"
    assert isinstance(gate.cpu.vnni, bool)
    assert manifest.parity.passed and "fp32 graph" in manifest.parity.candidate

    proto = onnx.load(str(models / "faar" / "2" / "model.onnx"))
    ops = {n.op_type for n in proto.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert export.op_types == {k: v for k, v in sorted(export.op_types.items())}
    assert export.op_types["DequantizeLinear"] == sum(n.op_type == "DequantizeLinear" for n in proto.graph.node)
    # the fp32 version's manifest is unchanged in meaning: no gate, precision fp32
    fp32 = load_manifest(models / "faar" / "1" / "manifest.json")
    assert fp32.export.precision == "fp32" and fp32.parity.gate is None and fp32.export.quantization is None


def test_gate_refuses_and_names_the_task(run_dir: Path, tmp_path: Path) -> None:
    """An impossible limit (semseg must gain 100 points): every tested set of float groups fails."""
    repo = tmp_path / "models"
    with pytest.raises(ExportError, match=r"int8 fails the accuracy gate on semseg\b.*nothing written"):
        export_run(run_dir, repo, ExportOptions(precision="int8", gate=(*RELAXED[1:], "semseg=-100"), **SMALL))
    assert not repo.exists()
    assert not [p for p in tmp_path.iterdir() if p.name != "models"]  # no temporary folder left


def test_fp16_gate_and_spectral_blocks_in_fp32(run_dir: Path, tmp_path: Path) -> None:
    result = export_run(run_dir, tmp_path / "models", ExportOptions(fp16=True, gate=RELAXED, **SMALL))
    manifest = load_manifest(result.manifest_path)
    assert manifest.export.precision == "fp16" and manifest.export.fp16
    assert manifest.parity.gate is not None and manifest.parity.gate.passed
    proto = onnx.load(str(result.onnx_path))
    weights = {t.name: t.data_type for t in proto.graph.initializer}
    spectral = [n for n in proto.graph.node if "/spectral" in n.name and n.op_type == "MatMul"]
    assert spectral and all(weights.get(i, onnx.TensorProto.FLOAT) == onnx.TensorProto.FLOAT
                            for n in spectral for i in n.input)
    assert onnx.TensorProto.FLOAT16 in weights.values()  # the rest is half


def test_cli_refusals(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = str(tmp_path / "models")
    assert export_main(["--run", str(run_dir), "--out", out, "--fp16", "--precision", "int8"]) == 2
    assert "contradicts" in capsys.readouterr().err
    assert export_main(["--run", str(run_dir), "--out", out, "--precision", "int8", "--gate", "semseg"]) == 2
    assert "TASK=VALUE" in capsys.readouterr().err
    assert export_main(["--run", str(run_dir), "--out", out, "--precision", "int8", "--gate", "edge=1"]) == 2
    assert "does not have" in capsys.readouterr().err
    assert export_main(["--run", str(run_dir), "--out", out, "--precision", "int8",
                        "--calibration", str(tmp_path / "none")]) == 2
    assert "not 'run' and not a folder" in capsys.readouterr().err
    bare = tmp_path / "bare"  # a run without config.yaml has no data to calibrate or gate on
    bare.mkdir()
    for f in ("model.safetensors", "model.json"):
        (bare / f).write_bytes((run_dir / f).read_bytes())
    assert export_main(["--run", str(bare), "--out", out, "--precision", "int8"]) == 2
    assert "config.yaml does not exist" in capsys.readouterr().err
    assert not Path(out).exists()


def test_calibration_from_a_folder(tmp_path: Path) -> None:
    """Image files of any size and format, decoded and resized by the gateway's codec; others skipped."""
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    for i in range(3):
        (folder / ("sub" if i else "") / f"{i}.jpg").write_bytes(encode(image(i, 90, 120), "JPEG"))
    (folder / "notes.txt").write_text("not an image")
    images = calibration_images(str(folder), None, ["semseg"], (64, 32), 8)
    assert len(images) == 3 and all(im.shape == (64, 32, 3) and im.dtype == np.uint8 for im in images)
    assert len(calibration_images(str(folder), None, ["semseg"], (64, 32), 2)) == 2
    (folder / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(ExportError, match="broken.png"):
        calibration_images(str(folder), None, ["semseg"], (64, 32), 8)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ExportError, match="holds no images"):
        calibration_images(str(tmp_path / "empty"), None, [], (64, 32), 1)


def test_default_limits_and_judging() -> None:
    assert parse_limit("depth=2%") == ("depth", Limit(2.0, relative=True))
    assert parse_limit("semseg = 1.5") == ("semseg", Limit(1.5))
    ref = {"semseg": {"miou": 50.0}, "normals": {"mean": 20.0}, "depth": {"rmse": 1.0}}
    limits = {"semseg": Limit(1.0), "normals": Limit(0.5), "depth": Limit(2.0, relative=True)}
    ok = judge(ref, {"semseg": {"miou": 49.2}, "normals": {"mean": 20.4}, "depth": {"rmse": 1.019}}, limits)
    assert ok["passed"] and 0.9 < ok["score"] < 1.0  # depth: 1.9 % of a 2 % limit
    bad = judge(ref, {"semseg": {"miou": 48.9}, "normals": {"mean": 20.6}, "depth": {"rmse": float("nan")}}, limits)
    assert not bad["passed"] and [t for t, v in bad["tasks"].items() if not v["passed"]] == list(ref)


def test_node_groups_cover_every_matmul_and_conv(models: Path) -> None:
    proto = onnx.load(str(models / "faar" / "1" / "model.onnx"))
    groups = node_groups(proto)
    named = sorted(n for names in groups.values() for n in names)
    assert named == sorted(n.name for n in proto.graph.node if n.op_type in ("MatMul", "Conv"))
    assert all(n.startswith("/model/decoder/") for n in groups["decoder.spectral"] + groups["decoder.conv"])


def test_gateway_and_triton_serve_the_int8_model(models: Path) -> None:
    """The same config.pbtxt serves fp32 v1 and int8 v2; both servers answer with v2 (the newest)."""
    rgb = image(7)
    app = create_app(settings(models))
    with LiveServer(app) as server:
        r = httpx.post(f"{server.url}/v1/predict?format=npz&precision=float32", files=post_image(encode(rgb)),
                       timeout=60)
        assert r.status_code == 200, r.text
        via_gateway = load_npz(r.content)
        info = httpx.get(f"{server.url}/v1/model", timeout=10).json()
    assert info["model"]["version"] == 2 and info["precision"] == "int8" and info["parity"]["gate"]["passed"]
    with LocalTriton(models) as triton:
        import tritonclient.http as http

        client = http.InferenceServerClient(triton.http_url)
        inp = http.InferInput("image", [1, 64, 64, 3], "UINT8")
        inp.set_data_from_numpy(rgb[None])
        result = client.infer("faar", [inp])
        assert client.get_model_metadata("faar")["versions"] == ["2"]
    for task, got in via_gateway.items():
        want = result.as_numpy(task)[0]
        if want.dtype == np.uint8:
            np.testing.assert_array_equal(got, want)
        else:
            np.testing.assert_allclose(got, want, atol=1e-5)
