"""What the gateway knows about a model: read from the exported repository, never from ``faar``.

``faar-export`` writes ``<repo>/<name>/config.pbtxt`` (Triton's view: batch limit) and
``<repo>/<name>/<version>/manifest.json`` (tasks, outputs, classes, palette, units). Only
the keys below are read; anything else in the manifest is passed through untouched.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

KINDS = ("labels", "probability", "normals", "depth")
FORMAT_VERSION = 1


class ManifestError(ValueError):
    """The repository does not hold a model the gateway can serve; the message says why."""


@dataclass(frozen=True)
class TaskInfo:
    name: str
    kind: str  # one of KINDS
    output: str  # graph output holding the task's map
    description: str = ""
    classes: tuple[str, ...] = ()
    palette: tuple[tuple[int, int, int], ...] = ()
    units: str = ""


@dataclass(frozen=True)
class ModelSpec:
    name: str
    version: int
    input_name: str
    height: int
    width: int
    max_batch_size: int
    tasks: dict[str, TaskInfo]
    manifest: dict[str, Any]
    model_dir: Path

    @property
    def onnx_path(self) -> Path:
        return self.model_dir / str(self.version) / self.manifest.get("onnx", {}).get("file", "model.onnx")

    def select_tasks(self, names: str | None) -> list[str]:
        """``"semseg,depth"`` -> those tasks in that order; None or empty -> every task."""
        if not names or not names.strip():
            return list(self.tasks)
        wanted = [n.strip() for n in names.split(",") if n.strip()]
        unknown = [n for n in wanted if n not in self.tasks]
        if unknown:
            raise KeyError(f"unknown task(s) {unknown}; this model has {list(self.tasks)}")
        return list(dict.fromkeys(wanted))


def latest_version(model_dir: Path) -> int:
    """The highest numeric version folder with a manifest (what Triton's ``latest`` policy serves)."""
    versions = [int(p.name) for p in model_dir.iterdir()
                if p.is_dir() and p.name.isdigit() and (p / "manifest.json").is_file()]
    if not versions:
        raise ManifestError(f"{model_dir} holds no <version>/manifest.json; export a model with faar-export")
    return max(versions)


def read_max_batch_size(config_pbtxt: Path) -> int:
    """``max_batch_size`` from Triton's config, the limit Triton enforces for the same model."""
    try:
        text = config_pbtxt.read_text()
    except OSError as exc:
        raise ManifestError(f"cannot read {config_pbtxt}: {exc}") from exc
    match = re.search(r"^\s*max_batch_size\s*:\s*(\d+)", text, re.MULTILINE)
    if not match or int(match.group(1)) < 1:
        raise ManifestError(f"{config_pbtxt} sets no positive max_batch_size (the model needs a batch axis)")
    return int(match.group(1))


def _task(name: str, entry: dict[str, Any], outputs: dict[str, dict[str, Any]]) -> TaskInfo:
    kind = entry.get("kind")
    if kind not in KINDS:
        raise ManifestError(f"task {name!r}: kind {kind!r} is not one of {KINDS}")
    # The map is the output named after the task (label tasks may add "<task>_probs").
    candidates = [o for o in entry.get("outputs", []) if o in outputs]
    output = name if name in candidates else next(iter(candidates), None)
    if output is None:
        raise ManifestError(f"task {name!r} names no graph output")
    classes = tuple(entry.get("classes", ()))
    palette = tuple(tuple(int(v) for v in c) for c in entry.get("palette", ()))
    if kind == "labels" and (not classes or len(palette) < len(classes)):
        raise ManifestError(f"label task {name!r} needs classes and a palette entry per class")
    return TaskInfo(name, kind, output, str(entry.get("convention") or entry.get("description", "")),
                    classes, palette, str(entry.get("units", "")))


def load_model_spec(repository: str | os.PathLike, model: str, version: int | None = None) -> ModelSpec:
    model_dir = Path(repository) / model
    if not model_dir.is_dir():
        raise ManifestError(f"model {model!r} not found: {model_dir} is not a directory")
    version = latest_version(model_dir) if version is None else version
    path = model_dir / str(version) / "manifest.json"
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ManifestError(f"cannot read {path}: {exc}") from exc
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ManifestError(f"{path}: manifest format {manifest.get('format_version')!r}; this gateway reads "
                            f"format {FORMAT_VERSION} (update faar_serve or re-export)")
    try:
        image = manifest["inputs"][0]
        _, height, width, channels = image["shape"]
        outputs = {o["name"]: o for o in manifest["outputs"]}
        entries = dict(manifest["tasks"])
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise ManifestError(f"{path} is not a faar-export manifest ({type(exc).__name__}: {exc})") from exc
    if image.get("dtype") != "uint8" or channels != 3 or image.get("layout", "NHWC") != "NHWC":
        raise ManifestError(f"{path}: input {image.get('name')!r} is not uint8 NHWC RGB")
    tasks = {name: _task(name, entry, outputs) for name, entry in entries.items()}
    if not tasks:
        raise ManifestError(f"{path} lists no tasks")
    return ModelSpec(name=model, version=version, input_name=image["name"], height=int(height),
                     width=int(width), max_batch_size=read_max_batch_size(model_dir / "config.pbtxt"),
                     tasks=tasks, manifest=manifest, model_dir=model_dir)
