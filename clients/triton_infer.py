"""Call Triton directly (no gateway) with ``tritonclient``: the raw model outputs of some images.

    python -m clients.triton_infer photo.jpg --url 127.0.0.1:8001 --protocol grpc --out maps.npz

Reads the model's input size from Triton's model metadata, stretches each image to it (as
the gateway does), sends them as one batch and prints every output's shape, dtype and
range. ``--out`` saves the outputs (at the model's size, batch axis first) as NPZ.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps


def connect(url: str, protocol: str, timeout_s: float) -> tuple[Any, Any, dict[str, Any]]:
    """(tritonclient module, client, keyword arguments that put a deadline on a call)."""
    if protocol == "grpc":
        import tritonclient.grpc as api

        return api, api.InferenceServerClient(url), {"client_timeout": timeout_s}
    import tritonclient.http as api

    return api, api.InferenceServerClient(url, connection_timeout=timeout_s, network_timeout=timeout_s), {}


def load_batch(paths: list[Path], height: int, width: int) -> np.ndarray:
    images = [ImageOps.exif_transpose(Image.open(p)).convert("RGB") for p in paths]
    return np.stack([np.asarray(im.resize((width, height), Image.Resampling.BILINEAR)) for im in images])


def infer(url: str, protocol: str, model: str, paths: list[Path], timeout_s: float) -> dict[str, np.ndarray]:
    api, client, deadline = connect(url, protocol, timeout_s)
    try:
        as_json = {"as_json": True} if protocol == "grpc" else {}  # the HTTP client always answers JSON
        meta = client.get_model_metadata(model, **as_json, **deadline)
        (image_meta,) = meta["inputs"]
        _, height, width, _ = (int(d) for d in image_meta["shape"])
        batch = load_batch(paths, height, width)
        image = api.InferInput(image_meta["name"], list(batch.shape), "UINT8")
        image.set_data_from_numpy(batch)
        names = [o["name"] for o in meta["outputs"]]
        wanted = [api.InferRequestedOutput(n) for n in names]
        result = client.infer(model, [image], outputs=wanted, **deadline)
        return {n: result.as_numpy(n) for n in names}
    finally:
        client.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("images", nargs="+", type=Path, metavar="IMAGE")
    parser.add_argument("--url", default="127.0.0.1:8001", help="Triton's host:port (gRPC 8001, HTTP 8000)")
    parser.add_argument("--protocol", choices=["grpc", "http"], default="grpc")
    parser.add_argument("--model", default="faar")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per call")
    parser.add_argument("--out", type=Path, help="save the outputs as NPZ")
    args = parser.parse_args(argv)
    from tritonclient.utils import InferenceServerException

    try:
        outputs = infer(args.url, args.protocol, args.model, args.images, args.timeout)
    except (InferenceServerException, OSError) as exc:
        print(f"triton at {args.url}: {exc}", file=sys.stderr)
        return 1
    summary = {n: {"shape": list(a.shape), "dtype": str(a.dtype), "range": [float(a.min()), float(a.max())]}
               for n, a in outputs.items()}
    print(json.dumps(summary, indent=2))
    if args.out:
        np.savez(args.out, **outputs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
