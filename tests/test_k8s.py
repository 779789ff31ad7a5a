"""deploy/k8s, checked without a cluster: both overlays render with kustomize, every object
passes Kubernetes' own schemas (strict: an unknown or misspelt field fails), references
resolve inside the rendering, the gateway's settings parse as the image will read them, and
the autoscaler's metric is built from series that a real Triton exports."""

from __future__ import annotations

import functools
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.http as tritonhttp
import yaml
from packaging_support import ROOT, image_env, instructions
from support import MODEL

from faar_serve.net import free_port
from faar_serve.settings import Settings
from faar_serve.triton_local import LocalTriton

kubernetes_validate = pytest.importorskip("kubernetes_validate")
KUBECTL = shutil.which("kubectl")
pytestmark = pytest.mark.skipif(KUBECTL is None, reason="kubectl (with kustomize) is not installed")

K8S = ROOT / "deploy" / "k8s"
OVERLAYS = ["overlays/cpu", "overlays/gpu"]
# The oldest Kubernetes the manifests aim at (autoscaling/v2 and policy/v1 are GA there) and
# the kubectl installed on the build machines.
VERSIONS = ["1.28", "1.32"]
Obj = dict[str, Any]


@functools.cache
def render(folder: str) -> tuple[Obj, ...]:
    out = subprocess.run([KUBECTL, "kustomize", str(K8S / folder)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return tuple(d for d in yaml.safe_load_all(out.stdout) if d)


def one(docs: tuple[Obj, ...], kind: str, name: str) -> Obj:
    """The object of ``kind`` whose name is ``name`` (ConfigMaps: before kustomize's hash suffix)."""
    found = [d for d in docs if d["kind"] == kind and re.fullmatch(re.escape(name) + r"(-[a-z0-9]{10})?",
                                                                     d["metadata"]["name"])]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def container(deployment: Obj) -> Obj:
    (c,) = deployment["spec"]["template"]["spec"]["containers"]
    return c


def config_map(docs: tuple[Obj, ...], name: str) -> dict[str, str]:
    return one(docs, "ConfigMap", name)["data"]


def deployments(docs: tuple[Obj, ...]) -> Iterator[Obj]:
    return (d for d in docs if d["kind"] == "Deployment")


def selects(selector: dict[str, str], deployment: Obj) -> bool:
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("folder", [*OVERLAYS, "monitoring"])
def test_every_object_passes_the_kubernetes_schema(folder: str, version: str) -> None:
    docs = render(folder)
    assert docs
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{folder}: {doc['kind']}/{doc['metadata']['name']} (Kubernetes {version}): {exc.message}")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_selectors_and_references_resolve_within_the_rendering(overlay: str) -> None:
    docs = render(overlay)
    deps = list(deployments(docs))
    assert {d["metadata"]["name"] for d in deps} == {"faar-triton", "faar-gateway"}
    namespace = one(docs, "Namespace", "faar")["metadata"]["name"]
    for doc in docs:
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == namespace, doc["metadata"]["name"]
    for dep in deps:
        assert dep["spec"]["selector"]["matchLabels"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
        name = dep["metadata"]["name"]
        service = [s for s in docs if s["kind"] == "Service" and selects(s["spec"]["selector"], dep)]
        assert service, f"no Service selects {name}"
        ports = {p["name"]: p["containerPort"] for p in container(dep)["ports"]}
        for s in service:
            assert {p["targetPort"] for p in s["spec"]["ports"]} <= set(ports)
        for probe in ("readinessProbe", "livenessProbe"):
            assert container(dep)[probe]["httpGet"]["port"] in ports, (name, probe)
        pdb = one(docs, "PodDisruptionBudget", name)
        assert selects(pdb["spec"]["selector"]["matchLabels"], dep)
        hpa = one(docs, "HorizontalPodAutoscaler", name)
        assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": name}
        # The budget can always be met by evicting one pod: never fewer than two replicas.
        assert hpa["spec"]["minReplicas"] >= 2 and pdb["spec"]["maxUnavailable"] == 1
        resources = container(dep)["resources"]
        assert {"cpu", "memory"} <= set(resources["requests"]) and "memory" in resources["limits"]
        assert dep["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
        config_maps = {d["metadata"]["name"] for d in docs if d["kind"] == "ConfigMap"}
        for source in container(dep).get("envFrom", []):
            if "configMapRef" in source:
                assert source["configMapRef"]["name"] in config_maps
        for var in container(dep).get("env", []):
            if "configMapKeyRef" in var.get("valueFrom", {}):
                ref = var["valueFrom"]["configMapKeyRef"]
                assert ref["name"] in config_maps
                assert ref["key"] in next(d["data"] for d in docs if d["metadata"]["name"] == ref["name"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_gateway_reaches_triton_through_the_headless_service(overlay: str) -> None:
    docs = render(overlay)
    gateway = one(docs, "Deployment", "faar-gateway")
    c = container(gateway)
    env = config_map(docs, "faar-gateway")
    fields = {f"FAAR_{name.upper()}" for name in Settings.model_fields}
    assert set(env) <= fields, set(env) - fields
    # What the container reads: the image's ENV, then the ConfigMap.
    settings = Settings(**{k[5:].lower(): v for k, v in {**image_env(), **env}.items() if k.startswith("FAAR_")})
    assert settings.engine == "triton" and settings.triton_protocol == "grpc"
    match = re.fullmatch(r"dns:///([a-z0-9-]+):(\d+)", settings.triton_url)
    assert match, settings.triton_url
    headless = one(docs, "Service", match.group(1))
    assert headless["spec"]["clusterIP"] == "None"
    assert selects(headless["spec"]["selector"], one(docs, "Deployment", "faar-triton"))
    assert int(match.group(2)) in {p["port"] for p in headless["spec"]["ports"] if p["name"] == "grpc"}
    # The image listens where the Deployment and its probes expect it.
    assert [p["containerPort"] for p in c["ports"]] == [settings.port] == [int(e) for e in instructions("EXPOSE")]
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz" and c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    # Written for the gateway that reads the manifest from Triton: no model repository beside it.
    assert [m["mountPath"] for m in c.get("volumeMounts", [])] == ["/tmp"]
    base = yaml.safe_load((K8S / "base" / "kustomization.yaml").read_text())
    (image,) = base["images"]
    assert c["image"] == f"{image['newName']}:{image['newTag']}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_triton_loads_from_object_storage_with_secret_credentials(overlay: str) -> None:
    docs = render(overlay)
    triton = one(docs, "Deployment", "faar-triton")
    c = container(triton)
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    assert c["image"] == compose["services"]["triton"]["image"]  # one Triton release everywhere
    assert c["args"][0] == "tritonserver" and "--model-repository=$(MODEL_REPOSITORY)" in c["args"]
    (var,) = [v for v in c["env"] if v["name"] == "MODEL_REPOSITORY"]
    ref = var["valueFrom"]["configMapKeyRef"]
    assert config_map(docs, "faar-triton")[ref["key"]].startswith("s3://")
    assert {"secretRef": {"name": "faar-model-store"}} in c["envFrom"]
    assert "faar-model-store" in (K8S / "README.md").read_text()  # the Secret the user creates is documented
    assert c["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    annotations = triton["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == ports["metrics"]
    assert f"--metrics-port={ports['metrics']}" in c["args"]


def test_gpu_resources_only_in_the_gpu_overlay() -> None:
    gpu = container(one(render("overlays/gpu"), "Deployment", "faar-triton"))["resources"]
    assert gpu["limits"]["nvidia.com/gpu"] == "1"
    pod = one(render("overlays/gpu"), "Deployment", "faar-triton")["spec"]["template"]["spec"]
    assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    for overlay in OVERLAYS:
        for dep in deployments(render(overlay)):
            if overlay != "overlays/gpu" or dep["metadata"]["name"] != "faar-triton":
                assert "nvidia.com/gpu" not in str(container(dep)["resources"]), (overlay, dep["metadata"]["name"])


def adapter_rule() -> Obj:
    config = yaml.safe_load(one(render("monitoring"), "ConfigMap", "adapter-config")["data"]["config.yaml"])
    (rule,) = config["rules"]
    return rule


def test_the_triton_autoscaler_uses_the_adapter_metric() -> None:
    for overlay in OVERLAYS:
        docs = render(overlay)
        (metric,) = one(docs, "HorizontalPodAutoscaler", "faar-triton")["spec"]["metrics"]
        assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] == adapter_rule()["name"]["as"]
        (cpu,) = one(docs, "HorizontalPodAutoscaler", "faar-gateway")["spec"]["metrics"]
        assert cpu["resource"]["name"] == "cpu"


def test_the_adapter_rule_reads_series_that_triton_exports(repo: Path) -> None:
    """The rule's series, read from a real tritonserver's /metrics after it has answered once."""
    rule = adapter_rule()
    series = set(re.findall(r"\b(nv_[a-z_]+)\{", rule["seriesQuery"] + " " + rule["metricsQuery"]))
    assert {"nv_inference_queue_duration_us", "nv_inference_request_success"} <= series
    with LocalTriton(repo, metrics_port=free_port()) as server:
        client = tritonhttp.InferenceServerClient(server.http_url)
        (spec,) = client.get_model_config(MODEL)["input"]
        shape = [1, *map(int, spec["dims"])]
        image = tritonhttp.InferInput(spec["name"], shape, "UINT8")
        image.set_data_from_numpy(np.zeros(shape, np.uint8))
        client.infer(MODEL, [image])
        assert server.metrics_url is not None
        text = httpx.get(server.metrics_url, timeout=10).text
    exported = dict(re.findall(rf'^(nv_[a-z_]+)\{{[^}}]*model="{MODEL}"[^}}]*\}} (\S+)$', text, re.MULTILINE))
    assert series <= set(exported), series - set(exported)
    assert float(exported["nv_inference_request_success"]) >= 1
