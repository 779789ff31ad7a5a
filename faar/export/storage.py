"""Model repositories in object storage: ``faar-export --out s3://bucket/prefix``.

Triton reads ``s3://`` repositories itself (``--model-repository=s3://bucket/prefix`` on AWS,
``s3://host:port/bucket/prefix`` for an S3-compatible store), so the exporter only has to
put the same layout into the bucket.

Decisions:

* Stage locally, then upload with boto3. The bucket's ``<name>/`` is mirrored first into a
  temporary folder (every ``manifest.json`` and ``config.pbtxt`` downloaded, other objects
  as empty placeholders), and ``export_run`` writes into that mirror: the refusals of a local
  export (an existing version without ``--overwrite``, a different model under the same
  name, a folder faar-export did not write) come from the same code, on the bucket's
  contents, before any ONNX work. Only then is anything uploaded.
* Upload order: the version's files first, the shared ``config.pbtxt`` last, so a Triton
  polling the bucket never sees a config for a version that is not complete. Objects left
  in an overwritten version that the new export does not write are deleted.
* Not atomic across objects (S3 has no rename): two exporters writing the same version at
  the same moment are not detected. Export each version once; roll it out by restarting or
  loading (``deploy/k8s/README.md``).
* Endpoint and credentials come from boto3's own configuration (``AWS_ENDPOINT_URL``,
  ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, profiles, instance roles); ``endpoint_url``
  overrides the endpoint. boto3 is the ``s3`` extra: ``pip install 'faar[s3]'``.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .options import ExportError, ExportOptions

MIRRORED = ("manifest.json", "config.pbtxt")  # what the destination checks read


@dataclass(frozen=True)
class S3Location:
    bucket: str
    prefix: str  # without leading or trailing "/"; "" is the bucket's root

    @classmethod
    def parse(cls, url: str) -> S3Location:
        parts = urlsplit(url)
        if parts.scheme != "s3" or not parts.netloc:
            raise ExportError(f"{url!r} is not an s3://bucket/prefix URL")
        return cls(parts.netloc, parts.path.strip("/"))

    def key(self, *parts: str) -> str:
        return "/".join(p for p in (self.prefix, *parts) if p)

    def url(self, *parts: str) -> str:
        return f"s3://{self.bucket}/{self.key(*parts)}".rstrip("/")

    def triton_url(self, endpoint_url: str | None) -> str:
        """How Triton spells this repository: ``s3://host:port/bucket/prefix`` for a custom endpoint."""
        if not endpoint_url:
            return self.url()
        return f"s3://{urlsplit(endpoint_url).netloc}/{self.bucket}/{self.prefix}".rstrip("/")


@dataclass
class UploadResult:
    model_url: str  # s3://bucket/prefix/<name>
    version: int
    keys: list[str]  # every object written, in upload order
    triton_repository: str  # the --model-repository value for Triton
    manifest: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def is_object_store(out: str | os.PathLike) -> bool:
    return str(out).startswith("s3://")


def endpoint(endpoint_url: str | None) -> str | None:
    """The endpoint boto3 will use: the argument, else ``AWS_ENDPOINT_URL`` (None: AWS itself)."""
    return endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None


def s3_client(endpoint_url: str | None = None) -> Any:
    try:
        import boto3
    except ModuleNotFoundError as exc:
        raise ExportError("exporting to s3:// needs boto3: pip install 'faar[s3]'") from exc
    return boto3.client("s3", endpoint_url=endpoint(endpoint_url))


def _storage_errors() -> tuple[type[BaseException], ...]:
    from botocore.exceptions import BotoCoreError, ClientError

    return BotoCoreError, ClientError


def _keys(s3: Any, loc: S3Location, *parts: str) -> list[str]:
    prefix = loc.key(*parts) + "/"
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=loc.bucket, Prefix=prefix)
    return [obj["Key"] for page in pages for obj in page.get("Contents", [])]


def mirror_model(s3: Any, loc: S3Location, name: str, dest: Path) -> Path:
    """``dest/<name>/`` shaped like the bucket's: manifests and config.pbtxt downloaded, other
    objects as empty files. Returns ``dest``, a repository the local checks can read."""
    model_prefix = loc.key(name) + "/"
    for key in _keys(s3, loc, name):
        relative = key[len(model_prefix):]
        if not relative or relative.endswith("/"):
            continue
        path = dest / name / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.name in MIRRORED:
            s3.download_file(loc.bucket, key, str(path))
        else:
            path.touch()
    dest.mkdir(parents=True, exist_ok=True)
    return dest


def upload_version(s3: Any, loc: S3Location, repo: Path, name: str, version: int) -> list[str]:
    """Put ``repo/<name>/<version>/*`` and ``repo/<name>/config.pbtxt`` under ``loc``; delete what
    else the bucket held in that version. No checks: ``export_to_s3`` makes them first."""
    version_dir = repo / name / str(version)
    files = sorted(p for p in version_dir.rglob("*") if p.is_file())
    if not files:
        raise ExportError(f"{version_dir} holds no files to upload")
    written = []
    for path in [*files, repo / name / "config.pbtxt"]:
        key = loc.key(name, path.relative_to(repo / name).as_posix())
        s3.upload_file(str(path), loc.bucket, key)
        written.append(key)
    stale = set(_keys(s3, loc, name, str(version))) - set(written)
    for key in sorted(stale):
        s3.delete_object(Bucket=loc.bucket, Key=key)
    return written


def export_to_s3(run_dir: str | os.PathLike, url: str, options: ExportOptions | None = None,
                 endpoint_url: str | None = None) -> UploadResult:
    """``export_run`` into a mirror of the bucket, then upload the new version.

    Raises ``ExportError`` (and ``faar.run.RunError`` for a bad run) with the bucket unchanged,
    except when an upload itself fails midway (then the message says what was written).
    """
    from . import export_run

    options = options or ExportOptions()
    loc = S3Location.parse(url)
    s3 = s3_client(endpoint_url)
    errors = _storage_errors()
    with tempfile.TemporaryDirectory(prefix="faar-export-s3-") as tmp:
        repo = Path(tmp) / "repo"
        try:
            s3.head_bucket(Bucket=loc.bucket)
            mirror_model(s3, loc, options.name, repo)
        except errors as exc:
            raise ExportError(f"cannot read {loc.url()} (endpoint {endpoint(endpoint_url) or 'AWS'}): {exc}") from exc
        result = export_run(run_dir, repo, options)
        try:
            keys = upload_version(s3, loc, repo, options.name, options.version)
        except errors as exc:
            raise ExportError(f"upload to {loc.url(options.name, str(options.version))} failed midway, "
                              f"the version there is incomplete; export it again with --overwrite: {exc}") from exc
    return UploadResult(loc.url(options.name), options.version, keys, loc.triton_url(endpoint(endpoint_url)),
                        result.manifest, result.warnings)
