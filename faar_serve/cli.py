"""Command shells: ``faar-serve`` (the gateway) and ``faar-triton`` (a local Triton server).

``faar-serve`` has one flag per setting (``--max-queue`` for ``max_queue``...), generated
from ``Settings`` so flags, ``FAAR_*`` variables and defaults can never drift apart. A
flag wins over its environment variable, which wins over the default. Any settings
problem, from a flag or from the environment, ends the command with one line naming the
setting; the model repository is checked before the server starts, also in one line.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
import typing
from collections.abc import Sequence
from types import FrameType

from pydantic import ValidationError
from pydantic_settings import SettingsError

from .settings import Settings


def _settings_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="faar-serve", description="HTTP gateway for a model repository written by faar-export. "
        "Every flag can also be set as FAAR_<NAME> in the environment (e.g. FAAR_MAX_QUEUE=32).")
    for name, field in Settings.model_fields.items():
        options: dict[str, typing.Any] = {"default": argparse.SUPPRESS, "help": field.description or ""}
        if typing.get_origin(field.annotation) is typing.Literal:
            options["choices"] = typing.get_args(field.annotation)
        if typing.get_origin(field.annotation) is list:
            options["nargs"] = "+"
        if field.annotation is bool:
            options["action"] = argparse.BooleanOptionalAction  # --flag / --no-flag
        parser.add_argument("--" + name.replace("_", "-"), **options)
    return parser


def load_settings(argv: Sequence[str] | None = None) -> Settings:
    args = vars(_settings_parser().parse_args(argv))
    try:
        return Settings(**args)
    except ValidationError as exc:
        problems = "; ".join(f"{_setting_name(e['loc'])}: {e['msg'].removeprefix('Value error, ')}"
                             for e in exc.errors(include_url=False))
        raise SystemExit(f"faar-serve: invalid settings: {problems}") from None
    except SettingsError as exc:  # an environment variable pydantic-settings could not parse
        cause = f" ({exc.__cause__})" if exc.__cause__ else ""
        raise SystemExit(f"faar-serve: invalid settings: {exc}{cause}") from None


def _setting_name(loc: tuple) -> str:
    """``('cors_origins', 0)`` -> ``cors_origins (--cors-origins / FAAR_CORS_ORIGINS)``."""
    if not loc:
        return "settings"
    name = str(loc[0])
    return f"{name} (--{name.replace('_', '-')} / FAAR_{name.upper()})"


def main(argv: Sequence[str] | None = None) -> None:
    from .manifest import ManifestError, load_model_spec
    from .server import serve

    settings = load_settings(argv)
    print("faar-serve settings:", json.dumps(settings.describe(), indent=2, default=str), flush=True)
    if settings.model_repository is not None and settings.engine == "onnx":
        try:  # in the parent, so a bad repository is one line here, not a traceback per worker
            load_model_spec(settings.model_repository, settings.model, settings.model_version)
        except (ManifestError, ValueError) as exc:
            raise SystemExit(f"faar-serve: {exc}") from None
    serve(settings)


def triton_main(argv: Sequence[str] | None = None) -> None:
    from .triton_local import LocalTriton, TritonStartError, explicit_models

    parser = argparse.ArgumentParser(
        prog="faar-triton", description="Run a real Triton Inference Server (from the nvidia-pytriton wheel) "
        "on a model repository written by faar-export, until Ctrl-C or SIGTERM.")
    parser.add_argument("--model-repository", required=True)
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 for every interface)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the models to load")
    parser.add_argument("--workdir", help="backend directory and log (default: a temporary folder)")
    parser.add_argument("--log-verbose", type=int, default=0)
    parser.add_argument("--model", action="append", default=[], metavar="NAME",
                        help="load only this model (repeat for several; default: every model in the repository), "
                        "e.g. faar on a machine without a GPU when the repository also holds faar_gpu")
    args = parser.parse_args(argv)

    def stop(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        server = LocalTriton(args.model_repository, args.http_port, args.grpc_port, args.workdir, args.host,
                             args.log_verbose, extra_args=explicit_models(args.model))
        with server:
            print(f"triton ready: grpc {server.grpc_url}, http {server.http_url}, log {server.log_path}",
                  flush=True)
            while server.running():
                time.sleep(0.5)
            code = server.process.returncode if server.process else 1
            sys.exit(f"tritonserver exited with code {code}:\n{server.log_tail()}")
    except TritonStartError as exc:
        sys.exit(f"faar-triton: {exc}")
    except KeyboardInterrupt:
        print("faar-triton: stopped", flush=True)
