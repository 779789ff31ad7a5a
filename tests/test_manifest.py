"""The manifest schema (faar_serve.manifest): what it accepts, what it refuses and how it says so.

``data/manifest_format1.json`` was written by faar-export before the schema existed
(commit a430580, tiny preset, ``--fft dft --probabilities``; ``ranks.layers`` trimmed to
four entries), so it stands for every format-1 manifest already on disk.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from faar_serve.engines import BatchLimit
from faar_serve.manifest import (
    FORMAT_VERSION,
    KINDS,
    Manifest,
    ManifestError,
    ModelSpec,
    load_manifest,
    manifest_from_model_config,
    parse_manifest,
)

FORMAT1 = Path(__file__).parent / "data" / "manifest_format1.json"


@pytest.fixture
def data() -> dict[str, Any]:
    return json.loads(FORMAT1.read_text())


def test_a_format1_manifest_written_before_the_schema_loads(data: dict[str, Any]) -> None:
    manifest = load_manifest(FORMAT1)
    assert manifest.format_version == FORMAT_VERSION == 1
    spec = ModelSpec.from_manifest(manifest, Path("/repo/faar"), 1, max_batch_size=8)
    assert (spec.name, spec.input_name, spec.height, spec.width) == ("faar", "image", 64, 64)
    assert {t.name: t.kind for t in spec.tasks.values()} == {
        "semseg": "labels", "saliency": "probability", "normals": "normals", "depth": "depth"}
    semseg = spec.tasks["semseg"]
    assert semseg.output == "semseg"  # the map, not semseg_probs
    assert len(semseg.classes) == 21 and semseg.palette[1] == (128, 0, 0)
    assert spec.tasks["depth"].units == "m" and "camera" in spec.tasks["normals"].description
    assert spec.onnx_path == Path("/repo/faar/1/model.onnx")
    # the old spelling of the FFT backend is read in the config's vocabulary; all else is kept as written
    assert data["export"]["options"]["fft"] == "dft" and manifest.export.options.fft == "torch"
    data["export"]["options"]["fft"] = "torch"
    assert json.loads(manifest.to_json()) == data


def edit(data: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A copy of ``data`` with the dotted ``path`` set to ``value`` (deleted when value is ...)."""
    out = copy.deepcopy(data)
    *parents, last = path.split(".")
    node = out
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    if value is ...:
        del node[last]
    else:
        node[last] = value
    return out


@pytest.mark.parametrize("path, value, message", [
    ("tasks.semseg.kind", "segment", "tasks.semseg: .*'segment'.*'labels', 'probability', 'normals', 'depth'"),
    ("tasks.semseg.palette", [[0, 0, 0]], "tasks.semseg.labels: 21 classes but 1 palette colours"),
    ("tasks.depth.units", ..., "tasks.depth.depth.units: Field required"),
    ("tasks.saliency.outputs", ["sal"], "task 'saliency' names outputs \\['sal'\\]"),
    ("outputs.0.task", "parts", "output 'semseg' names task 'parts'"),
    ("inputs.0.shape", [-1, 64, 64, 4], "inputs.0.shape: .*RGB"),
    ("input_size", [32, 32], "input_size \\[32, 32\\] is not the input's \\[64, 64\\]"),
    ("onnx.sha256", "not a hash", "onnx.sha256: String should match pattern"),
    ("parity.passd", True, "parity.passd: Extra inputs are not permitted"),
    ("tasks", {}, "tasks: Dictionary should have at least 1 item"),
])
def test_a_bad_manifest_is_refused_in_one_line_naming_the_field(data: dict[str, Any], path: str, value: Any,
                                                                message: str) -> None:
    with pytest.raises(ManifestError, match=f"^where.json is not a valid faar-export manifest: .*{message}") as exc:
        parse_manifest(edit(data, path, value), "where.json")
    assert "\n" not in str(exc.value)


@pytest.mark.parametrize("version", [2, 0, "1", None])
def test_an_unknown_format_version_is_named_with_the_file(data: dict[str, Any], tmp_path: Path,
                                                          version: Any) -> None:
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps({**data, "format_version": version}))
    with pytest.raises(ManifestError, match=f"^{path}: manifest format {version!r}; this gateway reads format 1"):
        load_manifest(path)
    with pytest.raises(ManifestError, match="format"):  # models built in code check it too
        parse_manifest(Manifest.model_validate(data).model_dump() | {"format_version": version}, "x")


def test_unreadable_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match=f"cannot read {tmp_path / 'nope.json'}"):
        load_manifest(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ManifestError, match="cannot read .*bad.json"):
        load_manifest(tmp_path / "bad.json")


def test_every_kind_faar_defines_has_a_schema_model() -> None:
    from faar.tasks import KINDS as FAAR_KINDS

    assert set(KINDS) == set(FAAR_KINDS) == {"labels", "probability", "normals", "depth"}


@pytest.mark.parametrize("requested, model, cpu, size", [
    (None, 8, False, 8), (None, 8, True, 1), (4, 8, True, 4), (16, 8, False, 8), (16, 8, True, 8)])
def test_batch_limit_is_the_request_capped_by_the_model(requested: int | None, model: int, cpu: bool,
                                                        size: int) -> None:
    assert BatchLimit(requested=requested, model=model).size(cpu=cpu) == size


def test_optional_fields_are_written_only_when_the_manifest_has_them(data: dict[str, Any]) -> None:
    """Fields added within format 1 (TF32, queue timeout, parity provider) stay out of an older file."""
    old = Manifest.model_validate(data)
    assert old.export.options.tf32 is None and '"tf32"' not in old.to_json()
    new = Manifest.model_validate(edit(edit(data, "export.options.tf32", False), "parity.provider", "CUDA"))
    assert '"tf32": false' in new.to_json() and json.loads(new.to_json(compact=True))["parity"]["provider"] == "CUDA"
    assert "\n" not in new.to_json(compact=True)


def test_the_copy_in_a_triton_model_config_is_read_per_version(data: dict[str, Any]) -> None:
    """The gateway in front of Triton reads ``faar_manifest_v<version>`` of the model config."""
    text = Manifest.model_validate(data).to_json(compact=True)
    config = {"name": "faar", "parameters": {"faar_manifest_v3": {"string_value": text}}}
    assert manifest_from_model_config(config, 3, "triton").to_json() == Manifest.model_validate(data).to_json()
    with pytest.raises(ManifestError, match="^triton has no parameter 'faar_manifest_v1': .*re-export"):
        manifest_from_model_config(config, 1, "triton")
    with pytest.raises(ManifestError, match="^triton: parameter 'faar_manifest_v3' is not JSON"):
        manifest_from_model_config({"parameters": {"faar_manifest_v3": {"string_value": text[:-9]}}}, 3, "triton")
    bad = json.dumps(edit(data, "tasks.depth.units", ...))
    with pytest.raises(ManifestError, match=r"triton \(faar_manifest_v3\) is not a valid .*tasks.depth.depth.units"):
        manifest_from_model_config({"parameters": {"faar_manifest_v3": {"string_value": bad}}}, 3, "triton")


def test_a_spec_read_from_triton_has_a_name_and_no_onnx_file() -> None:
    spec = ModelSpec.from_manifest(load_manifest(FORMAT1), None, 2, max_batch_size=8, name="faar_gpu")
    assert (spec.name, spec.version, spec.model_dir) == ("faar_gpu", 2, None)
    assert spec.output_names == ["semseg", "saliency", "normals", "depth"]  # the maps, not semseg_probs
    with pytest.raises(ManifestError, match="read from Triton"):
        _ = spec.onnx_path
