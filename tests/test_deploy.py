"""Offline structural checks of the deployment files: Kubernetes manifests, compose file and Dockerfile."""
import os
import re
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from cosyvoice_lite.service.metrics import Metrics

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"


KUBERNETES_VERSIONS = ("1.27.0", "1.37.0")  # schemas shipped inside the pinned kubernetes-validate wheel


def manifest_files():
    return sorted(path for path in K8S.glob("*.yaml") if path.name != "kustomization.yaml")


def manifests():
    docs = []
    for path in manifest_files():
        docs += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    return {doc["kind"]: doc for doc in docs}


def env_of(c):
    return {e["name"]: e for e in c["env"]}


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


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_manifest_validates_against_the_kubernetes_schemas(version):
    """Offline: the OpenAPI-derived JSON schemas of each Kubernetes version, strict (no unknown fields)."""
    for path in manifest_files():
        for doc in yaml.safe_load_all(path.read_text()):
            kubernetes_validate.validate(doc, version, strict=True)


def test_kustomization_applies_every_manifest_and_sets_the_image():
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == sorted(p.name for p in manifest_files())
    (image,) = kustomization["images"]
    assert image["name"] == container(manifests()["Deployment"])["image"].split(":")[0]
    assert image["newName"] and image["newTag"]


def test_grace_period_covers_the_pre_stop_delay_and_a_drain_as_long_as_the_request_timeout():
    pod = manifests()["Deployment"]["spec"]["template"]["spec"]
    c = container(manifests()["Deployment"])
    env = env_of(c)
    graceful, request_timeout = int(env["GRACEFUL_TIMEOUT"]["value"]), int(env["REQUEST_TIMEOUT"]["value"])
    assert graceful >= request_timeout  # a rollout lets the longest admitted request finish
    sleep = c["lifecycle"]["preStop"]["exec"]["command"]
    assert sleep[0] == "sleep" and int(sleep[1]) >= 5
    assert pod["terminationGracePeriodSeconds"] >= int(sleep[1]) + graceful + 5


def _gunicorn_graceful_timeout(env: dict) -> int:
    code = ("import sys; sys.argv = ['gunicorn']; import runpy; "
            "print(runpy.run_path('cosyvoice_lite/serve/gunicorn_conf.py')['graceful_timeout'])")
    base = {k: v for k, v in os.environ.items() if k not in ("GRACEFUL_TIMEOUT", "REQUEST_TIMEOUT")}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**base, **env}, capture_output=True,
                         text=True, timeout=60, check=True)
    return int(out.stdout.strip())


def test_gunicorn_drains_as_long_as_the_request_timeout_unless_told_otherwise():
    assert _gunicorn_graceful_timeout({"REQUEST_TIMEOUT": "120"}) == 120
    assert _gunicorn_graceful_timeout({"REQUEST_TIMEOUT": "120", "GRACEFUL_TIMEOUT": "45"}) == 45


def test_compose_stop_grace_period_covers_the_drain():
    (service,) = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"].values()
    env = service["environment"]
    assert int(env["GRACEFUL_TIMEOUT"]) >= int(env["REQUEST_TIMEOUT"])
    assert int(service["stop_grace_period"].rstrip("s")) >= int(env["GRACEFUL_TIMEOUT"]) + 5


def test_api_key_comes_from_a_secret():
    env = env_of(container(manifests()["Deployment"]))
    ref = env["API_KEY"]["valueFrom"]["secretKeyRef"]
    assert (ref["name"], ref["key"]) == ("cosyvoice-lite", "api-key") and "value" not in env["API_KEY"]


def test_disruption_budget_covers_the_pods_and_keeps_one_serving():
    m = manifests()
    spec = m["PodDisruptionBudget"]["spec"]
    labels = m["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= labels.items()
    assert spec["maxUnavailable"] < m["HorizontalPodAutoscaler"]["spec"]["minReplicas"]


def test_autoscaler_scales_on_requests_in_flight_served_by_the_prometheus_adapter():
    (metric,) = manifests()["HorizontalPodAutoscaler"]["spec"]["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["target"]["type"] == "AverageValue"
    (rule,) = yaml.safe_load((ROOT / "deploy" / "prometheus-adapter-values.yaml").read_text())["rules"]["custom"]
    assert rule["name"]["as"] == metric["pods"]["metric"]["name"]
    assert rule["resources"]["overrides"]["pod"] == {"resource": "pod"}
    # the series the rule reads are the ones /metrics serves
    exposed = set(re.findall(r"^# TYPE (\w+) gauge$", Metrics().render("piper", True, 9), re.M))
    used = set(re.findall(r"\b(cosyvoice_\w+)\{", rule["metricsQuery"] + rule["seriesQuery"]))
    assert used == {"cosyvoice_in_progress", "cosyvoice_queue_depth"} and used <= exposed


def test_prometheus_scrape_job_sends_the_api_key_and_keeps_pod_labels():
    (job,) = yaml.safe_load((ROOT / "deploy" / "prometheus-scrape-config.yaml").read_text())
    assert job["metrics_path"] == "/metrics" and job["authorization"]["type"] == "Bearer"
    targets = {r.get("target_label") for r in job["relabel_configs"]}
    assert {"namespace", "pod"} <= targets


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
    assert "whl/cpu" in text and "scripts/install_torch.sh" in text
    for gpu_only in ("cuda", "tensorrt", "deepspeed", "onnxruntime-gpu"):
        assert gpu_only not in text.lower()


def test_requirements_are_pinned_and_cpu_only():
    for name in ("requirements.txt", "requirements-nodeps.txt", "requirements-dev.txt"):
        for line in (ROOT / name).read_text().splitlines():
            line = line.split("#")[0].strip()
            if line:
                assert re.fullmatch(r"[A-Za-z0-9_.\-]+==[\w.]+", line), f"{name}: {line!r} is not pinned"
                assert not re.search(r"cuda|tensorrt|deepspeed|lightning|gradio|onnxruntime-gpu", line, re.I)


def _pins(name):
    lines = (line.split("#")[0].strip() for line in (ROOT / name).read_text().splitlines())
    return {line for line in lines if line}


def test_pip_install_dot_has_the_runtime_dependencies_of_the_requirements_files():
    declared = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"])
    assert declared == _pins("requirements.txt") | _pins("requirements-nodeps.txt")


def test_torch_installer_picks_the_cpu_build_within_seconds():
    """scripts/install_torch.sh (used by ./run and the Dockerfile) resolves torch==X+cpu: from the PyTorch CPU index,
    or, when that index is unreachable (as on machines that only reach the usual registries), from local wheels."""
    env = {**os.environ, "PIP_DRY_RUN": "1", "PIP_NO_DEPS": "1", "PIP_IGNORE_INSTALLED": "1", "PIP_VERBOSE": "1"}
    started = time.monotonic()
    result = subprocess.run(["sh", str(ROOT / "scripts" / "install_torch.sh"), str(Path(sys.executable).parent / "pip")],
                            env=env, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Would install torch-2.13.0+cpu" in result.stdout, result.stdout[-2000:] + result.stderr[-2000:]
    assert "warning: torch" not in result.stderr
    assert time.monotonic() - started < 120
