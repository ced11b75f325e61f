"""Offline structural checks of the deployment files: Kubernetes manifests, compose file and Dockerfile."""
import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"


def manifests():
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        docs += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    return {doc["kind"]: doc for doc in docs}


def container(deployment):
    (only,) = deployment["spec"]["template"]["spec"]["containers"]
    return only


def test_every_manifest_has_the_basic_kubernetes_shape():
    for kind, doc in manifests().items():
        assert {"apiVersion", "kind", "metadata", "spec"} <= set(doc), kind
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"]), kind


def test_deployment_probes_use_ready_and_health():
    c = container(manifests()["Deployment"])
    assert c["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/health"
    port_names = {p["name"] for p in c["ports"]}
    assert c["readinessProbe"]["httpGet"]["port"] in port_names


def test_deployment_requests_and_limits_resources():
    resources = container(manifests()["Deployment"])["resources"]
    assert {"cpu", "memory"} <= set(resources["requests"]) and "memory" in resources["limits"]


def test_deployment_selector_matches_its_pods_and_the_service():
    m = manifests()
    labels = m["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert m["Deployment"]["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert m["Service"]["spec"]["selector"].items() <= labels.items()


def test_service_targets_the_container_port():
    m = manifests()
    target = m["Service"]["spec"]["ports"][0]["targetPort"]
    assert target in {p["name"] for p in container(m["Deployment"])["ports"]} | {8080}


def test_autoscaler_scales_the_deployment():
    m = manifests()
    ref = m["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]
    assert (ref["kind"], ref["name"]) == ("Deployment", m["Deployment"]["metadata"]["name"])
    spec = m["HorizontalPodAutoscaler"]["spec"]
    assert 1 <= spec["minReplicas"] <= spec["maxReplicas"]


def test_grace_period_outlasts_the_servers_graceful_timeout():
    source = (ROOT / "cosyvoice_lite" / "serve" / "gunicorn_conf.py").read_text()
    match = re.search(r'graceful_timeout = int\(os.environ.get\("GRACEFUL_TIMEOUT", "(\d+)"\)\)', source)
    assert match, "gunicorn_conf.py no longer sets graceful_timeout from GRACEFUL_TIMEOUT"
    grace = manifests()["Deployment"]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace >= int(match.group(1)) + 5


def test_compose_file_maps_the_port_and_mounts_models():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    (service,) = compose["services"].values()
    assert "8080:8080" in service["ports"]
    assert any(v.split(":")[1] == "/app/models" for v in service["volumes"])


def test_dockerfile_is_cpu_only_non_root_with_a_healthcheck():
    text = (ROOT / "Dockerfile").read_text()
    lines = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert lines[0] == "ARG BASE=python:3.11-slim" and lines[1] == "FROM ${BASE}"
    assert re.search(r"^USER (?!root)\w+", text, re.M)
    assert "HEALTHCHECK" in text and "/health" in text
    assert "torch==2.13.0" in text and "whl/cpu" in text
    for gpu_only in ("cuda", "tensorrt", "deepspeed", "onnxruntime-gpu"):
        assert gpu_only not in text.lower()


def test_requirements_are_pinned_and_cpu_only():
    for name in ("requirements.txt", "requirements-nodeps.txt", "requirements-dev.txt"):
        for line in (ROOT / name).read_text().splitlines():
            line = line.split("#")[0].strip()
            if line:
                assert re.fullmatch(r"[A-Za-z0-9_.\-]+==[\w.]+", line), f"{name}: {line!r} is not pinned"
                assert not re.search(r"cuda|tensorrt|deepspeed|lightning|gradio|onnxruntime-gpu", line, re.I)
