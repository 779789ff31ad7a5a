"""Model repositories in object storage, with real servers: moto's S3 server (a local process
on a free port, spoken to by boto3) and the real ``tritonserver`` reading ``s3://host:port/...``.

Version 1 is put into the bucket, Triton loads it from there and the gateway (``--engine
triton``) answers with its maps; ``faar-export --out s3://...`` writes version 2 of another
model, which Triton serves only after an explicit load (``--model-control-mode=explicit``),
and then exactly as ONNX Runtime computes it from the uploaded file. Until the gateway reads
manifests from Triton (issue 15.1) it reads them from a mirror of the bucket's manifests.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import torch
import tritonclient.http as tritonhttp
from fastapi.testclient import TestClient
from support import (
    MODEL,
    OfflineMaps,
    assert_maps_equal,
    encode,
    image,
    load_npz,
    manifest,
    post_image,
    settings,
)

import faar.export
from faar.cli import export_main
from faar.config import load_config
from faar.export import ExportError, ExportOptions
from faar.export.storage import S3Location, export_to_s3, mirror_model, s3_client, upload_version
from faar.model import build_model
from faar.run import save_model
from faar_serve.app import create_app
from faar_serve.net import free_port
from faar_serve.triton_local import LocalTriton

boto3 = pytest.importorskip("boto3")
pytest.importorskip("moto")
BUCKET = "faar-models"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="module")
def store() -> Iterator[str]:
    """A moto S3 server; the environment points boto3 at it. Yields its endpoint URL."""
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    with pytest.MonkeyPatch.context() as env:
        for key, value in {**CREDENTIALS, "AWS_ENDPOINT_URL": endpoint}.items():
            env.setenv(key, value)
        try:
            client = s3_client()
            deadline = time.monotonic() + 30
            while True:
                try:
                    client.create_bucket(Bucket=BUCKET)
                    break
                except Exception:  # noqa: BLE001  (connection refused until the server listens)
                    if proc.poll() is not None or time.monotonic() > deadline:
                        raise
                    time.sleep(0.1)
            yield endpoint
        finally:
            proc.terminate()
            proc.wait(10)


def ort_maps(onnx_path: Path, rgb: np.ndarray, tasks: list[str]) -> dict[str, np.ndarray]:
    """The graph's own outputs for one image at the model's size (no resizing on either side)."""
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    raw = dict(zip(names, session.run(names, {"image": rgb[None]}), strict=True))
    return {task: raw[task][0] for task in tasks}


def gateway_maps(repo: Path, url: str, rgb: np.ndarray) -> tuple[int, dict[str, np.ndarray]]:
    """(version the gateway serves, its maps for ``rgb``) with ``--engine triton``."""
    app = create_app(settings(repo, engine="triton", triton_url=url, triton_timeout_s=10))
    with TestClient(app) as client:
        assert client.get("/readyz").json()["ready"] is True
        version = client.get("/v1/model").json()["model"]["version"]
        r = client.post("/v1/predict", params={"format": "npz", "precision": "float32"}, files=post_image(encode(rgb)))
        assert r.status_code == 200, r.text
        return version, load_npz(r.content)


def other_run(path: Path) -> Path:
    """The tiny preset with other random weights: same inputs and outputs, other maps."""
    torch.manual_seed(1)
    save_model(build_model(load_config("tiny").model), path)
    return path


def test_triton_serves_the_bucket_and_a_new_version_after_an_explicit_load(
        store: str, repo: Path, offline_maps: OfflineMaps, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    s3 = s3_client()
    loc = S3Location(BUCKET, "repo")
    local = repo
    upload_version(s3, loc, local, MODEL, 1)
    repository = loc.triton_url(store)
    assert repository == f"s3://{store.split('://')[1]}/{BUCKET}/repo"
    rgb = image(800)
    tasks = list(manifest(local)["tasks"])
    with LocalTriton(repository, env=CREDENTIALS,
                     extra_args=["--model-control-mode=explicit", f"--load-model={MODEL}"]) as triton:
        client = tritonhttp.InferenceServerClient(triton.http_url)
        assert client.is_model_ready(MODEL, "1")

        version, maps = gateway_maps(mirror_model(s3, loc, MODEL, tmp_path / "mirror1"), triton.grpc_url, rgb)
        assert version == 1
        assert_maps_equal(maps, offline_maps(rgb))

        code = export_main(["--run", str(other_run(tmp_path / "run2")), "--out", f"s3://{BUCKET}/repo",
                            "--version", "2"])
        assert code == 0
        printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert printed["model"] == f"s3://{BUCKET}/repo/{MODEL}" and printed["version"] == 2
        assert printed["triton_model_repository"] == repository
        assert printed["objects"][-1] == f"repo/{MODEL}/config.pbtxt"  # the shared config goes last
        keys = {o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix="repo/")["Contents"]}
        assert {f"repo/{MODEL}/{v}/{f}" for v in (1, 2) for f in ("model.onnx", "manifest.json")} <= keys

        # Explicit model control: nothing changes until the load call, which re-reads the bucket.
        assert client.is_model_ready(MODEL, "1") and not client.is_model_ready(MODEL, "2")
        client.load_model(MODEL)
        assert client.is_model_ready(MODEL, "2") and not client.is_model_ready(MODEL, "1")

        onnx_v2 = tmp_path / "v2.onnx"
        s3.download_file(BUCKET, f"repo/{MODEL}/2/model.onnx", str(onnx_v2))
        want = ort_maps(onnx_v2, rgb, tasks)
        version, maps = gateway_maps(mirror_model(s3, loc, MODEL, tmp_path / "mirror2"), triton.grpc_url, rgb)
        assert version == 2
        assert_maps_equal(maps, want)
        v1 = offline_maps(rgb)
        assert any(not np.array_equal(v1[t], want[t]) for t in tasks)  # it is another model


def test_the_bucket_is_checked_like_a_folder_before_any_export_work(store: str, repo: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    s3 = s3_client()
    loc = S3Location(BUCKET, "checks")
    upload_version(s3, loc, repo, MODEL, 1)
    run = repo.parent / "run"

    def no_export(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the ONNX export started although the destination must be refused")

    monkeypatch.setattr(faar.export, "export_onnx", no_export)

    def refused(url: str, **options: Any) -> str:
        with pytest.raises(ExportError) as err:
            export_to_s3(run, url, ExportOptions(**options))
        return str(err.value)

    assert "already exists" in refused(loc.url(), version=1)
    s3.put_object(Bucket=BUCKET, Key="checks/stray/1/model.onnx", Body=b"not ours")
    assert "not written by faar-export" in refused(loc.url(), name="stray")
    assert "cannot read s3://no-such-bucket" in refused("s3://no-such-bucket/x")
    assert "is not an s3://bucket/prefix URL" in refused("s3:///prefix-without-bucket")
    # Nothing was uploaded by the refusals.
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix="checks/")["Contents"]}
    assert keys == {f"checks/{MODEL}/1/model.onnx", f"checks/{MODEL}/1/manifest.json", f"checks/{MODEL}/config.pbtxt",
                    "checks/stray/1/model.onnx"}
    assert os.environ["AWS_ENDPOINT_URL"] == store
