"""``make demo``: the main job end to end on embedded defaults, with nothing to download.

1. train the ``demo`` preset on generated scenes (resumes, or skips when the run is done);
2. export it: merged ONNX + a Triton model repository in ``model_repository/``;
3. start the real gateway (``faar-serve``, embedded ONNX Runtime engine) on a free port;
4. upload a freshly generated scene and an ordinary photo (matplotlib's bundled
   ``grace_hopper.jpg``) with ``python -m clients.predict``, which saves every map as PNG
   plus a side-by-side preview;
5. print what was learned (metrics against the trivial predictor, ranks) and where
   everything is.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from faar_serve.net import free_port, wait_ready

from .config import load_config
from .data.scenes import render_scene
from .export import ExportOptions, export_run
from .tasks import palette
from .train import train

REPO_ROOT = Path(__file__).resolve().parent.parent
SCENE_SEED = 2026  # not one of the training or validation scenes (those use derived seeds)


def write_inputs(folder: Path) -> list[Path]:
    """A generated scene (with its ground-truth maps beside it) and a bundled photograph."""
    import matplotlib

    folder.mkdir(parents=True, exist_ok=True)
    scene = render_scene(SCENE_SEED, size=(240, 320))
    scene_path = folder / "scene.png"
    Image.fromarray(scene["image"]).save(scene_path)
    truth = folder / "scene_truth"
    truth.mkdir(exist_ok=True)
    pal = np.array(palette(256), dtype=np.uint8)
    Image.fromarray(pal[scene["semseg"]]).save(truth / "semseg.png")
    Image.fromarray(pal[scene["human_parts"]]).save(truth / "human_parts.png")
    Image.fromarray(((scene["normals"] + 1) * 127.5).astype(np.uint8)).save(truth / "normals.png")
    Image.fromarray((scene["saliency"] * 255).astype(np.uint8)).save(truth / "saliency.png")
    photo_path = folder / "photo.jpg"
    shutil.copyfile(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg", photo_path)
    return [scene_path, photo_path]


def run_demo(out: Path, config: str = "demo", overrides: list[str] | None = None,
             repo: Path = REPO_ROOT / "model_repository") -> dict:
    out.mkdir(parents=True, exist_ok=True)
    run_dir = out / "run"
    print(f"[1/4] training '{config}' into {run_dir}", flush=True)
    history = train(load_config(config, overrides), run_dir, resume=True)

    print(f"[2/4] exporting to {repo}", flush=True)
    result = export_run(run_dir, repo, ExportOptions(overwrite=True))
    parity = result.manifest.get("parity", {})

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    print(f"[3/4] serving {repo} at {url}", flush=True)
    server = subprocess.Popen([sys.executable, "-m", "faar_serve", "--model-repository", str(repo),
                               "--host", "127.0.0.1", "--port", str(port)])
    try:
        wait_ready(url, server)
        images = write_inputs(out / "inputs")
        maps = out / "maps"
        print(f"[4/4] uploading {', '.join(p.name for p in images)}; maps go to {maps}", flush=True)
        subprocess.run([sys.executable, "-m", "clients.predict", *(str(p.resolve()) for p in images),
                        "--url", url, "--out", str(maps.resolve())], cwd=REPO_ROOT, check=True)
    finally:
        server.terminate()
        server.wait(timeout=30)

    summary = {
        "run": str(run_dir),
        "model_repository": str(result.model_dir),
        "maps": str(out / "maps"),
        "trivial": history.get("trivial"),
        "final": history["epochs"][-1]["val"] if history["epochs"] else None,
        "mean_rank": {"initial": _initial_mean(history), "final": history["epochs"][-1]["mean_rank"]},
        "rank_report": history["ranks"].get("report"),
        "parity": parity,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    _print_summary(summary)
    return summary


def _initial_mean(history: dict) -> float:
    ranks = [r["rank"] for r in history["ranks"]["initial"].values()]
    return sum(ranks) / len(ranks)


def _print_summary(s: dict) -> None:
    print("\nwhat the model learned (validation, model vs trivial predictor):")
    for task, metrics in (s["final"] or {}).items():
        key = next(iter(metrics))
        trivial = (s["trivial"] or {}).get(task, {}).get(key, float("nan"))
        print(f"  {task:12s} {key:6s} {metrics[key]:8.2f}   trivial {trivial:8.2f}")
    print(f"mean adapter rank: {s['mean_rank']['initial']:.1f} -> {s['mean_rank']['final']:.1f}; "
          f"pattern: {s['rank_report']}")
    print(f"run: {s['run']}\nrepository: {s['model_repository']}\nmaps: {s['maps']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m faar.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("out/demo"))
    parser.add_argument("--config", default="demo")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--repo", type=Path, default=REPO_ROOT / "model_repository")
    args = parser.parse_args(argv)
    run_demo(args.out, args.config, args.overrides, args.repo)
    return 0


if __name__ == "__main__":
    sys.exit(main())
