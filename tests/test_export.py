"""faar-export: merged ONNX, parity gate, Triton repository, manifest, refusals (CPU, tiny preset)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from fixtures_model import randomize
from google.protobuf import json_format, text_format
from tritonclient.grpc import model_config_pb2

import faar.export as export
from faar.cli import export_main
from faar.config import load_config
from faar.export import ExportError, ExportOptions, check_parity, config_pbtxt, export_run
from faar.export.graph import spectral_nodes, spectral_scopes, to_fp16
from faar.model import IMAGENET_MEAN, IMAGENET_STD, build_model
from faar.run import RunError, load_model, save_model
from faar.tasks import TaskSpec, palette
from faar_serve.manifest import load_manifest, manifest_from_model_config, parse_manifest

ONNX_TO_NP = {onnx.TensorProto.UINT8: "uint8", onnx.TensorProto.FLOAT: "float32"}
TRITON_TO_NP = {model_config_pb2.TYPE_UINT8: "uint8", model_config_pb2.TYPE_FP32: "float32"}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny preset with one task of each kind (fewer tasks: a faster dynamo export)."""
    cfg = load_config("tiny", ["model.tasks=[semseg,saliency,normals,depth]"])
    torch.manual_seed(0)
    model = build_model(cfg.model)
    randomize(model)  # non-zero adapters, every TS-PD parameter off its identity start
    path = tmp_path_factory.mktemp("run") / "tiny"
    save_model(model, path)
    return path


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("repo") / "model_repository"


@pytest.fixture(scope="module")
def exported(run_dir: Path, repo: Path) -> export.ExportResult:
    """Version 1: the defaults (matmul DFT, TorchScript exporter)."""
    return export_run(run_dir, repo, ExportOptions())


@pytest.fixture(scope="module")
def exported_dft(run_dir: Path, repo: Path, exported: export.ExportResult) -> export.ExportResult:
    """Version 2 of the same model: torch.fft as ONNX DFT through the dynamo exporter."""
    return export_run(run_dir, repo, ExportOptions(version=2, fft="torch"))


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under the parent of ``root`` (temporary export folders included)."""
    base = root.parent
    return {str(p.relative_to(base)): p.read_bytes() for p in sorted(base.rglob("*")) if p.is_file()}


def leftovers(repo: Path) -> list[str]:
    return [p.name for p in repo.parent.iterdir() if ".export-" in p.name]


def run_onnx(path: Path, images: np.ndarray) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, {"image": images}), strict=True))


def images(n: int, size: tuple[int, int], seed: int = 7) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, *size, 3), dtype=np.uint8)


def parse_config(text: str) -> model_config_pb2.ModelConfig:
    return text_format.Parse(text, model_config_pb2.ModelConfig())


def tensor_types(proto: onnx.ModelProto) -> dict[str, int]:
    """Element type of every tensor of the graph (after ONNX shape inference)."""
    inferred = onnx.shape_inference.infer_shapes(proto)
    g = inferred.graph
    types = {v.name: v.type.tensor_type.elem_type for v in (*g.value_info, *g.input, *g.output)}
    return types | {t.name: t.data_type for t in g.initializer}


def fp16_nodes(proto: onnx.ModelProto, names: set[str]) -> list[str]:
    """Those of the nodes ``names`` that read or write a float16 tensor."""
    types = tensor_types(proto)
    return [n.name for n in proto.graph.node if n.name in names
            and any(types.get(t) == onnx.TensorProto.FLOAT16 for t in (*n.input, *n.output))]


# --- the repository and its files --------------------------------------------------------------
def test_both_fft_modes_pass_parity_and_share_one_model_folder(exported, exported_dft, repo: Path) -> None:
    model_dir = repo / "faar"
    assert sorted(p.name for p in model_dir.iterdir()) == ["1", "2", "config.pbtxt"]
    for result, version in ((exported, 1), (exported_dft, 2)):
        assert result.version_dir == model_dir / str(version)
        assert sorted(p.name for p in result.version_dir.iterdir()) == ["manifest.json", "model.onnx"]
        parity = result.manifest["parity"]
        assert parity["passed"] and not parity["failures"]
        assert {i["batch"] for i in parity["inputs"]} == {1, 2}
        for name, entry in parity["outputs"].items():
            if "agreement" in entry:
                assert entry["agreement"] >= 0.999, name
            else:
                assert entry["max_abs_error"] <= 1e-3 and entry["mean_abs_error"] <= 1e-4, name
    assert exported.manifest["export"]["exporter"] == "torchscript"
    assert exported_dft.manifest["export"]["exporter"] == "dynamo"
    assert not leftovers(repo)


def test_graphs_hold_no_adapter_and_the_right_transform(exported, exported_dft) -> None:
    for result, has_dft in ((exported, False), (exported_dft, True)):
        proto = onnx.load(str(result.onnx_path))
        onnx.checker.check_model(proto, full_check=True)
        g = proto.graph
        names = [n.name for n in g.node] + [t.name for t in g.initializer]
        names += [x for n in g.node for x in (*n.input, *n.output)]
        assert not [n for n in names if any(k in n.lower() for k in ("lora", "magnitude", "gate"))]
        assert ("DFT" in {n.op_type for n in g.node}) == has_dft
        # rfft2 and irfft2 per task and pyramid level: 4 tasks x 4 levels x (2 + 2) one-axis DFTs
        assert result.manifest["export"]["op_types"].get("DFT", 0) == (64 if has_dft else 0)


def test_uint8_only_at_the_graph_edges_for_tensorrt(exported, exported_dft) -> None:
    """TensorRT takes UINT8 only as a network input or output: the image is cast to float before
    anything else, and a label map is cast to uint8 as the last op, after an integer ArgMax."""
    for result in (exported, exported_dft):
        proto = onnx.load(str(result.onnx_path))
        g = proto.graph
        (first,) = [n for n in g.node if "image" in n.input]
        assert first.op_type == "Cast" and first.attribute[0].i == onnx.TensorProto.FLOAT
        edges = {v.name for v in (*g.input, *g.output)}
        types = tensor_types(proto)
        assert sorted(t for t, k in types.items() if k == onnx.TensorProto.UINT8 and t not in edges) == []
        producer = {o: n for n in g.node for o in n.output}
        for out in g.output:
            if out.type.tensor_type.elem_type == onnx.TensorProto.UINT8:
                cast = producer[out.name]
                assert cast.op_type == "Cast" and producer[cast.input[0]].op_type == "ArgMax", out.name
                assert types[cast.input[0]] in (onnx.TensorProto.INT64, onnx.TensorProto.INT32)


def test_spectral_blocks_are_found_by_scope_in_both_exporters(exported, exported_dft, run_dir: Path) -> None:
    module = export.build_export_module(load_model(run_dir))
    scopes = spectral_scopes(module)
    assert scopes == [f"/model/decoder/spectral.{i}" for i in range(4)]
    for result in (exported, exported_dft):
        proto = onnx.load(str(result.onnx_path))
        found = set(spectral_nodes(proto, scopes))
        transforms = [n.name for n in proto.graph.node if n.op_type == "DFT" or
                      (n.op_type == "MatMul" and any(s + "/dft" in n.name for s in scopes))]
        assert transforms and set(transforms) <= found  # every DFT (MatMul or DFT node) is inside
        assert not any("backbone" in n for n in found)


def test_fp16_keeps_every_spectral_node_fp32_in_the_dynamo_graph(exported_dft, run_dir: Path) -> None:
    """The conversion ``--fp16`` applies, on the dynamo graph (the TorchScript one is exported in
    fp16 below): DFT nodes and all that surrounds them in the spectral blocks stay fp32."""
    proto = onnx.load(str(exported_dft.onnx_path))
    scopes = spectral_scopes(export.build_export_module(load_model(run_dir)))
    names = set(spectral_nodes(proto, scopes))
    converted = to_fp16(proto, scopes)
    assert fp16_nodes(converted, names) == []
    everything = {n.name for n in converted.graph.node}
    assert len(fp16_nodes(converted, everything - names)) > 100  # the rest did become fp16


def test_manifest_describes_tasks_outputs_ranks_and_file(exported, run_dir: Path) -> None:
    m = exported.manifest
    assert json.loads(exported.manifest_path.read_text()) == m
    model = load_model(run_dir)
    assert m["onnx"]["sha256"] == export.sha256_file(exported.onnx_path)
    assert m["input_size"] == [64, 64]
    (image,) = m["inputs"]
    assert image["name"] == "image" and image["dtype"] == "uint8" and image["shape"] == [-1, 64, 64, 3]
    assert image["normalization"]["mean"] == list(IMAGENET_MEAN)
    assert image["normalization"]["std"] == list(IMAGENET_STD)
    assert list(m["tasks"]) == list(model.tasks)
    outputs = {o["name"]: o for o in m["outputs"]}
    for task, spec in model.tasks.items():
        entry = m["tasks"][task]
        assert entry["outputs"] == [task] and outputs[task]["task"] == task
        if spec.kind == "labels":
            assert entry["classes"] == list(spec.classes)
            assert entry["palette"] == palette(spec.channels)
            assert outputs[task]["dtype"] == "uint8" and outputs[task]["shape"] == [-1, 64, 64]
        elif spec.kind == "normals":
            assert "camera" in entry["convention"] and outputs[task]["shape"] == [-1, 3, 64, 64]
        else:
            assert outputs[task]["dtype"] == "float32" and outputs[task]["shape"] == [-1, 64, 64]
    assert m["tasks"]["depth"]["units"] == "m"
    assert m["tasks"]["saliency"]["range"] == [0.0, 1.0]
    layers = m["ranks"]["layers"]
    assert {k: v["rank"] for k, v in layers.items()} == model.ranks()
    assert m["ranks"]["count"] == len(layers) > 0
    assert all(v["parameters_before"] > v["parameters_after"] for v in layers.values())
    params = m["parameters"]
    assert params["before_merge"] == sum(p.numel() for p in model.parameters())
    assert params["trainable_before_merge"] > 0
    assert params["after_merge"] > 0 and params["onnx_initializer_elements"] > 0
    assert m["export"]["options"]["fft"] == "matmul" and m["export"]["fft_backend"] == "matmul"
    assert m["parity"]["tolerance"] == {"max_abs": 1e-3, "mean_abs": 1e-4, "min_label_agreement": 0.999}
    assert m["parity"]["provider"] == "CPUExecutionProvider" and "CPUExecutionProvider" in m["parity"]["candidate"]
    assert m["export"]["options"]["queue_timeout_s"] == 10.0 and m["export"]["options"]["tf32"] is False


def test_manifest_round_trips_through_the_gateway_schema(exported, exported_dft) -> None:
    """What the exporter writes is exactly what the gateway's schema reads and would write back."""
    for result in (exported, exported_dft):
        text = result.manifest_path.read_text()
        parsed = parse_manifest(json.loads(text), str(result.manifest_path))
        assert parsed.to_json() == text
        assert parsed.model_dump(mode="json") == result.manifest
    assert exported_dft.manifest["export"]["options"]["fft"] == "torch"
    assert exported_dft.manifest["export"]["fft_backend"] == "torch"


def test_config_pbtxt_parses_with_triton_schema_and_matches_the_graph(exported, exported_dft) -> None:
    cfg = text_format.Parse(exported.config_path.read_text(), model_config_pb2.ModelConfig())
    assert cfg.name == "faar" and cfg.backend == "onnxruntime" and cfg.max_batch_size == 8
    assert cfg.version_policy.latest.num_versions == 1
    assert list(cfg.dynamic_batching.preferred_batch_size) == [2, 4, 8]
    assert cfg.dynamic_batching.max_queue_delay_microseconds > 0
    policy = cfg.dynamic_batching.default_queue_policy  # past the caller's deadline: dropped, not run
    assert policy.timeout_action == model_config_pb2.ModelQueuePolicy.REJECT and policy.allow_timeout_override
    # Triton takes a request's timeout only below this default; 0 would ignore every one
    assert policy.default_timeout_microseconds == 10_000_000
    assert [g.kind for g in cfg.instance_group] == [model_config_pb2.ModelInstanceGroup.KIND_CPU]
    assert not cfg.HasField("optimization")  # the GPU section is only in GPU exports
    (warmup,) = cfg.model_warmup
    assert warmup.inputs["image"].zero_data and list(warmup.inputs["image"].dims) == [64, 64, 3]
    for result in (exported, exported_dft):
        graph = onnx.load(str(result.onnx_path)).graph
        for declared, values in ((cfg.input, graph.input), (cfg.output, graph.output)):
            assert [t.name for t in declared] == [v.name for v in values]
            for t, v in zip(declared, values, strict=True):
                dims = v.type.tensor_type.shape.dim
                assert dims[0].dim_param == "batch"
                assert list(t.dims) == [d.dim_value for d in dims[1:]], t.name
                assert TRITON_TO_NP[t.data_type] == ONNX_TO_NP[v.type.tensor_type.elem_type], t.name


def test_config_pbtxt_carries_each_versions_manifest(exported, exported_dft, repo: Path) -> None:
    """What a gateway without the repository reads: config.pbtxt's parameters, as Triton's
    model-config API gives them (protobuf's JSON), are exactly each version's manifest.json."""
    cfg = json_format.MessageToDict(parse_config((repo / "faar" / "config.pbtxt").read_text()),
                                    preserving_proto_field_name=True)
    assert sorted(cfg["parameters"]) == ["faar_manifest_v1", "faar_manifest_v2"]
    for result, version in ((exported, 1), (exported_dft, 2)):
        got = manifest_from_model_config(cfg, version, "config.pbtxt")
        assert got.to_json() == result.manifest_path.read_text()


@pytest.mark.parametrize("device_kind, max_batch, preferred", [("gpu", 1, []), ("cpu", 6, [2, 4, 6])])
def test_config_pbtxt_options(exported, device_kind: str, max_batch: int, preferred: list[int]) -> None:
    module = export.build_export_module(load_model(exported.manifest["source"]["run"]))
    options = ExportOptions(device_kind=device_kind, max_batch_size=max_batch, fft="dft", queue_timeout_s=0.25)
    text = config_pbtxt("m", module.inputs, module.outputs, options)
    cfg = parse_config(text)
    assert cfg.max_batch_size == max_batch and list(cfg.dynamic_batching.preferred_batch_size) == preferred
    assert cfg.dynamic_batching.default_queue_policy.default_timeout_microseconds == 250_000
    kind = model_config_pb2.ModelInstanceGroup.Kind.Value(f"KIND_{device_kind.upper()}")
    assert [g.kind for g in cfg.instance_group] == [kind]
    assert "DFT nodes" in text and "cuda_graph" not in text  # CUDA graphs cannot work with dynamic batching
    if device_kind == "gpu":
        (cuda,) = cfg.optimization.execution_accelerators.gpu_execution_accelerator
        assert cuda.name == "cuda" and dict(cuda.parameters) == {"use_tf32": "0"}
        tf32 = parse_config(config_pbtxt("m", module.inputs, module.outputs, ExportOptions(device_kind="gpu",
                                                                                           tf32=True)))
        assert dict(tf32.optimization.execution_accelerators.gpu_execution_accelerator[0].parameters) == {
            "use_tf32": "1"}
        # TensorRT stays a comment: FP32, LayerNorm fallback, an engine cache outside the read-only repository
        trt = "\n".join(line.strip().removeprefix("#").strip() for line in text.splitlines() if "#" in line)
        assert 'key: "precision_mode" value: "FP32"' in trt and "trt_layer_norm_fp32_fallback" in trt
        assert 'key: "trt_engine_cache_path" value: "/tmp/trt_cache/m"' in trt
        enabled = text.replace("# , {", ", {").replace("#   ", "    ").replace("  # }", "  }")
        both = parse_config(enabled).optimization.execution_accelerators.gpu_execution_accelerator
        assert [a.name for a in both] == ["cuda", "tensorrt"]  # uncommented as told, it parses
    else:
        assert "tensorrt" not in text and not cfg.HasField("optimization")


def test_model_names_follow_the_device_kind(exported, run_dir: Path, repo: Path) -> None:
    """config.pbtxt (with its instance kind) is shared by every version: a GPU export under the CPU
    model's name would leave no version loadable on a CPU server, so it is refused before any work."""
    assert ExportOptions().name == "faar" and ExportOptions(device_kind="gpu").name == "faar_gpu"
    assert ExportOptions(device_kind="gpu", name="mine").name == "mine"
    before = snapshot(repo)
    with pytest.raises(ExportError, match="is a cpu model .*another --name .*'faar_gpu'"):
        export_run(run_dir, repo, ExportOptions(name="faar", device_kind="gpu", version=3))
    assert snapshot(repo) == before


# --- what the graph computes ----------------------------------------------------------------
def test_graph_equals_model_predict_at_any_batch_in_both_fft_modes(exported, exported_dft, run_dir) -> None:
    """Independent of ExportWrapper: normalise by hand and call FAARModel.predict (unmerged)."""
    model = load_model(run_dir)
    batch = images(3, (64, 64))  # batch 3: neither the export example nor a parity batch size
    x = torch.from_numpy(batch).permute(0, 3, 1, 2).float() / 255
    x = (x - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]
    want = {t: y.numpy() for t, y in model.predict(x).items()}
    for result in (exported, exported_dft):
        got = run_onnx(result.onnx_path, batch)
        assert set(got) == set(want)
        for task, spec in model.tasks.items():
            if spec.kind == "labels":
                assert got[task].dtype == np.uint8
                assert np.mean(got[task] == want[task]) >= 0.999, task
            else:
                expected = want[task][:, 0] if spec.channels == 1 else want[task]
                assert got[task].shape == expected.shape
                np.testing.assert_allclose(got[task], expected, atol=1e-4, err_msg=task)
        assert np.allclose(np.linalg.norm(got["normals"], axis=1), 1, atol=1e-4)
        assert got["saliency"].min() >= 0 and got["saliency"].max() <= 1 and got["depth"].min() >= 0


def test_other_size_with_probabilities(run_dir: Path, tmp_path: Path) -> None:
    result = export_run(run_dir, tmp_path / "repo", ExportOptions(height=96, width=96, probabilities=True))
    m = result.manifest
    assert m["input_size"] == [96, 96] and m["parity"]["passed"]
    outputs = {o["name"]: o for o in m["outputs"]}
    assert outputs["semseg_probs"]["shape"] == [-1, 21, 96, 96]
    assert m["tasks"]["semseg"]["outputs"] == ["semseg", "semseg_probs"]
    got = run_onnx(result.onnx_path, images(1, (96, 96)))
    assert got["semseg"].shape == (1, 96, 96)
    np.testing.assert_allclose(got["semseg_probs"].sum(1), 1, atol=1e-5)
    np.testing.assert_array_equal(got["semseg_probs"].argmax(1), got["semseg"])
    cfg = text_format.Parse(result.config_path.read_text(), model_config_pb2.ModelConfig())
    assert list(cfg.input[0].dims) == [96, 96, 3]


def test_check_parity_fails_on_a_real_difference(exported, run_dir: Path) -> None:
    """The gate itself: the merged file against a reference whose depth head is off."""
    model = load_model(run_dir)
    with torch.no_grad():
        model.decoder.heads["depth"].out.bias.add_(0.01)
    reference = export.build_export_module(model)
    batches = export.parity_batches((64, 64))[:1]
    report = check_parity(exported.onnx_path, reference, batches, export.TOLERANCES["fp32"])
    assert not report["passed"]
    assert [f.split(":")[0] for f in report["failures"]] == ["depth"]
    assert report["outputs"]["depth"]["max_abs_error"] > 1e-3


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(), reason="a CUDA build runs it")
def test_parity_on_cuda_needs_cuda(exported, run_dir: Path) -> None:
    """--parity-device cuda never quietly checks on the CPU."""
    reference = export.build_export_module(load_model(run_dir))
    with pytest.raises(ExportError, match="parity on cuda: .*has no CUDAExecutionProvider"):
        check_parity(exported.onnx_path, reference, export.parity_batches((64, 64))[:1],
                     export.TOLERANCES["fp32"], device="cuda")


# --- refusals leave nothing behind --------------------------------------------------------------
def test_missing_incomplete_and_incompatible_run_dirs(run_dir: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    with pytest.raises(RunError, match="not found"):
        export_run(tmp_path / "nope", repo)
    broken = tmp_path / "broken"
    shutil.copytree(run_dir, broken)
    (broken / "model.safetensors").unlink()
    with pytest.raises(RunError, match="incomplete"):
        export_run(broken, repo)
    future = tmp_path / "future"
    shutil.copytree(run_dir, future)
    meta = json.loads((future / "model.json").read_text())
    (future / "model.json").write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(RunError, match="format"):
        export_run(future, repo)
    assert not repo.exists() and not leftovers(repo)


@pytest.mark.parametrize("options, message", [
    (ExportOptions(height=100, width=96), "multiples of 32"),
    (ExportOptions(height=0, width=0), "multiples of 32"),
    (ExportOptions(height=96), "both"),
    (ExportOptions(version=0), "positive"),
    (ExportOptions(name="../x"), "model name"),
    (ExportOptions(fft="dft", exporter="torchscript"), "cannot export torch.fft"),
    (ExportOptions(fft="dft", opset=17), "opset"),
    (ExportOptions(max_batch_size=0), "max_batch_size"),
    (ExportOptions(queue_timeout_s=0), "queue_timeout_s"),
    (ExportOptions(parity_device="gpu"), "parity_device"),  # type: ignore[arg-type]
])
def test_bad_options(run_dir: Path, tmp_path: Path, options: ExportOptions, message: str) -> None:
    with pytest.raises(ExportError, match=message):
        export_run(run_dir, tmp_path / "repo", options)
    assert not (tmp_path / "repo").exists() and not leftovers(tmp_path / "repo")


def test_too_many_classes_for_uint8() -> None:
    spec = TaskSpec("semseg", "labels", 256, 1.0, "x", classes=tuple(map(str, range(256))))
    with pytest.raises(ExportError, match="255"):
        export.output_specs({"semseg": spec}, (64, 64), probabilities=False)


def test_existing_version_and_different_model_are_refused(exported, exported_dft, run_dir, repo) -> None:
    before = snapshot(repo)
    with pytest.raises(ExportError, match="already exists.*--overwrite"):
        export_run(run_dir, repo, ExportOptions(version=1))
    with pytest.raises(ExportError, match="different model"):
        export_run(run_dir, repo, ExportOptions(version=3, height=96, width=96))
    foreign = repo / "other"
    foreign.mkdir()
    (foreign / "config.pbtxt").write_text('name: "other"\n')
    with pytest.raises(ExportError, match="not written by faar-export|no model version"):
        export_run(run_dir, repo, ExportOptions(name="other"))
    shutil.rmtree(foreign)
    assert snapshot(repo) == before


def test_parity_failure_writes_nothing(exported, run_dir: Path, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A graph with one corrupted weight (the exported one, noised) must be refused by the gate."""

    def corrupted_export(module, path, *args, **kwargs):
        proto = onnx.load(str(exported.onnx_path))
        first_conv = next(n for n in proto.graph.node if n.op_type == "Conv")  # the patch embedding
        weight = next(t for t in proto.graph.initializer if t.name == first_conv.input[1])
        array = onnx.numpy_helper.to_array(weight)
        array = array + np.random.default_rng(0).normal(0, array.std(), array.shape).astype(array.dtype)
        weight.CopyFrom(onnx.numpy_helper.from_array(array, weight.name))
        onnx.save(proto, str(path))
        return exported.manifest["export"]

    monkeypatch.setattr(export, "export_onnx", corrupted_export)
    repo = tmp_path / "repo"
    with pytest.raises(ExportError, match="parity check failed"):
        export_run(run_dir, repo)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no repository, no temporary folder


# --- the command line -----------------------------------------------------------------------------
def test_cli_help_lists_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        export_main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    options = ("--run --out --name --version --height --width --fft --exporter --fp16 --opset "
               "--max-batch-size --device-kind --probabilities --overwrite --tf32 --queue-timeout-s "
               "--parity-device")
    for option in options.split():
        assert option in text


def test_fft_takes_the_config_names_and_the_old_spelling(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert ExportOptions(fft="dft").fft == "torch" and ExportOptions(fft="torch").fft == "torch"
    assert export_main(["--run", str(tmp_path / "nope"), "--out", str(tmp_path / "repo"), "--fft", "dft"]) == 2
    assert "not found" in capsys.readouterr().err  # the flag parsed; the missing run is what failed


def test_cli_errors_exit_non_zero(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert export_main(["--run", str(tmp_path / "nope"), "--out", str(tmp_path / "repo")]) != 0
    assert "not found" in capsys.readouterr().err
    assert not (tmp_path / "repo").exists()


def test_cli_fp16_overwrite_keeps_other_versions(exported, exported_dft, repo: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    copy = tmp_path / "repo"
    shutil.copytree(repo, copy)
    old_sha = exported.manifest["onnx"]["sha256"]
    rc = export_main(["--run", exported.manifest["source"]["run"], "--out", str(copy), "--version", "1",
                      "--overwrite", "--fp16", "--max-batch-size", "4"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    summary = json.loads(captured.out.strip().splitlines()[-1])
    assert summary["version"] == 1 and summary["sha256"] != old_sha
    assert "older than version 2" in captured.err  # Triton keeps serving the newest version
    manifest = json.loads((copy / "faar" / "1" / "manifest.json").read_text())
    assert manifest["export"]["fp16"] and manifest["parity"]["passed"]
    assert manifest["parity"]["tolerance"] == {"max_abs": 0.1, "mean_abs": 5e-3, "min_label_agreement": 0.98}
    assert (copy / "faar" / "2" / "model.onnx").read_bytes() == exported_dft.onnx_path.read_bytes()
    cfg = parse_config((copy / "faar" / "config.pbtxt").read_text())
    assert cfg.max_batch_size == 4
    assert not leftovers(copy)
    # no MatMul of the spectral blocks (the DFT of --fft matmul) computes in fp16; the backbone's do
    proto = onnx.load(str(copy / "faar" / "1" / "model.onnx"))
    matmuls = {n.name for n in proto.graph.node if n.op_type == "MatMul"}
    spectral = {n for n in matmuls if "/model/decoder/spectral." in n}
    assert spectral and fp16_nodes(proto, spectral) == []
    assert fp16_nodes(proto, {n for n in matmuls if "/model/backbone/" in n})
    # config.pbtxt now carries the fp16 version 1 and the untouched version 2
    params = json_format.MessageToDict(cfg, preserving_proto_field_name=True)
    assert manifest_from_model_config(params, 1, "config").export.fp16
    assert manifest_from_model_config(params, 2, "config") == load_manifest(copy / "faar" / "2" / "manifest.json")
