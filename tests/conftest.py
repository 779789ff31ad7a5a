"""Shared fixtures of the serving tests: one exported repository per session, its offline
reference, and live gateways on real sockets, each stopped when its scope ends.

* ``repo``: a real model repository written once per session by the real exporter
  (``faar.export.export_run``) from a freshly initialised ``tiny`` model (64x64, six tasks,
  max batch 8), under pytest's temporary directory. Its outputs depend on the image, so a
  batching mix-up changes the maps. (``test_export.py`` has its own ``repo``.)
* ``offline_maps``: ``rgb -> {task: map}`` for ``repo`` without the gateway (one ONNX
  Runtime session for the whole session).
* ``live_gateway``: the default gateway on ``repo`` behind a real socket, shared by the
  modules that only send it requests.
* ``live_server``: starts any app behind a real socket for one test; stopped after it.

Plain helpers (images, settings, comparisons) are in ``support.py``.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import onnxruntime as ort
import pytest
from support import MODEL, LiveServer, OfflineMaps, ServeApp, manifest, offline_inference, settings


@pytest.fixture(scope="session")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch

    from faar.config import load_config
    from faar.export import ExportOptions, export_run
    from faar.model import build_model
    from faar.run import save_model

    root = tmp_path_factory.mktemp("serve-repo")
    torch.manual_seed(0)
    save_model(build_model(load_config("tiny").model), root / "run")
    export_run(root / "run", root / "repo", ExportOptions(name=MODEL, version=1, max_batch_size=8))
    return root / "repo"


@pytest.fixture(scope="session")
def offline_maps(repo: Path) -> OfflineMaps:
    session = ort.InferenceSession(str(repo / MODEL / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    return functools.partial(offline_inference, session, manifest(repo))


@pytest.fixture(scope="session")
def live_gateway(repo: Path) -> Iterator[LiveServer]:
    from faar_serve.app import create_app

    with LiveServer(create_app(settings(repo))) as server:
        yield server


@pytest.fixture
def live_server() -> Iterator[ServeApp]:
    with contextlib.ExitStack() as running:
        def start(app: Any) -> LiveServer:
            return running.enter_context(LiveServer(app))

        yield start
