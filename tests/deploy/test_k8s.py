"""The Kubernetes manifests: each kustomization builds with `kubectl kustomize` (offline), every
built object validates against the Kubernetes OpenAPI schemas (kubernetes-validate, strict: unknown
fields fail), and the parts that must agree do: probes, ports, selectors, grace periods, and the
command lines, which the real parsers of grm-serve, grm-train and torchrun accept.

The ServiceMonitor is a CRD (monitoring.coreos.com/v1) that kubernetes-validate has no schema
for: it is checked by what the Prometheus Operator does with it instead (its selector picks exactly
the Service with the metrics port, its endpoint names that port)."""

from __future__ import annotations

import json
import subprocess
import sys

import jsonschema
import pytest
import yaml

from grmserve.protos import SERVICE_NAME

from .conftest import DEPLOY, require_binary

K8S = DEPLOY / "k8s"
KUBERNETES_VERSION = "1.32.0"  # native gRPC probes: 1.27+; preStop `sleep`: 1.30+ (on by default)
SERVER_OVERLAYS = ["overlays/cpu", "overlays/gpu"]
CRD_GROUPS = ("monitoring.coreos.com/",)


def build(kustomization: str) -> list[dict]:
    res = subprocess.run([require_binary("kubectl"), "kustomize", str(K8S / kustomization)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, f"kubectl kustomize {kustomization}:\n{res.stderr}"
    return [doc for doc in yaml.safe_load_all(res.stdout) if doc]


def one(docs: list[dict], kind: str, name: str | None = None) -> dict:
    (found,) = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    return found


def container(docs: list[dict]) -> dict:
    (c,) = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    return c


def expand_env(args: list[str], c: dict) -> list[str]:
    """Kubernetes' $(VAR) expansion of container args, for variables taken from resource limits."""
    values = {e["name"]: str(c["resources"]["limits"][e["valueFrom"]["resourceFieldRef"]["resource"].split(".")[1]])
              for e in c.get("env", []) if "resourceFieldRef" in e.get("valueFrom", {})}
    for name, value in values.items():
        args = [a.replace(f"$({name})", value) for a in args]
    return args


@pytest.mark.parametrize("kustomization", SERVER_OVERLAYS + ["training"])
def test_kustomization_builds_and_validates_against_kubernetes_schemas(kustomization):
    import kubernetes_validate

    docs = build(kustomization)
    for doc in docs:
        if doc["apiVersion"].startswith(CRD_GROUPS):
            continue  # no schema in kubernetes-validate: see test_service_monitor_scrapes_each_pod_once
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except jsonschema.ValidationError as exc:
            pytest.fail(f"{kustomization}: {doc['kind']}/{doc['metadata']['name']}: {exc.message} at {list(exc.path)}")
    kinds = sorted(d["kind"] for d in docs)
    expected = (["Job", "PersistentVolumeClaim", "PersistentVolumeClaim"] if kustomization == "training" else
                ["Deployment", "HorizontalPodAutoscaler", "PodDisruptionBudget", "Service", "Service",
                 "ServiceMonitor"])
    assert kinds == expected


@pytest.mark.parametrize("overlay", SERVER_OVERLAYS)
def test_server_args_parse_and_grace_covers_the_drain(overlay):
    from grmserve.server.config import parse_serve_args

    docs = build(overlay)
    c = container(docs)
    config = parse_serve_args(expand_env(c["args"], c))
    assert config.model.threads == int(c["resources"]["limits"]["cpu"])
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    pre_stop = c["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["terminationGracePeriodSeconds"] > pre_stop + config.server.grace_seconds
    assert c["resources"]["requests"]["memory"] and c["resources"]["limits"]["memory"]


@pytest.mark.parametrize("overlay", SERVER_OVERLAYS)
def test_probes_ports_and_selectors_agree(overlay):
    docs = build(overlay)
    c = container(docs)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"grpc": 50051, "metrics": 9400}  # grm-serve's defaults (--server.port, --server.metrics_port)
    assert c["readinessProbe"]["grpc"] == {"port": ports["grpc"], "service": SERVICE_NAME}
    assert c["startupProbe"]["grpc"] == {"port": ports["grpc"], "service": SERVICE_NAME}
    assert c["livenessProbe"]["grpc"] == {"port": ports["grpc"]}
    template = one(docs, "Deployment")["spec"]["template"]
    assert template["metadata"]["annotations"]["prometheus.io/port"] == str(ports["metrics"])
    pod_labels = template["metadata"]["labels"]
    for kind in ("Service", "PodDisruptionBudget"):
        for obj in (d for d in docs if d["kind"] == kind):
            selector = obj["spec"]["selector"]
            selector = selector.get("matchLabels", selector)
            assert selector.items() <= pod_labels.items(), f"{kind}/{obj['metadata']['name']} selects no server pod"
    headless = one(docs, "Service", "grm-serve-headless")
    assert headless["spec"]["clusterIP"] == "None" and not headless["spec"]["publishNotReadyAddresses"]
    hpa = one(docs, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == one(docs, "Deployment")["metadata"]["name"]


@pytest.mark.parametrize("overlay", SERVER_OVERLAYS)
def test_service_monitor_scrapes_each_pod_once(overlay):
    docs = build(overlay)
    monitor = one(docs, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    wanted = monitor["spec"]["selector"]["matchLabels"]
    chosen = [s for s in docs if s["kind"] == "Service" and wanted.items() <= s["metadata"]["labels"].items()]
    assert [s["metadata"]["name"] for s in chosen] == ["grm-serve"], "exactly one Service, or pods are scraped twice"
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in chosen[0]["spec"]["ports"]}
    assert endpoint["path"] == "/metrics"


def test_hpa_metrics_are_the_ones_prometheus_adapter_serves():
    adapter = yaml.safe_load((K8S / "prometheus-adapter" / "values.yaml").read_text())
    served = {rule["name"]["as"] for rule in adapter["rules"]["custom"]}
    hpa = one(build("overlays/cpu"), "HorizontalPodAutoscaler")
    assert {m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"]} == served


def test_training_job_runs_torchrun_with_arguments_the_trainer_accepts():
    from torch.distributed.run import get_args_parser

    job = one(build("training"), "Job")
    (c,) = job["spec"]["template"]["spec"]["containers"]
    assert c["command"] == ["torchrun"]
    launch = get_args_parser().parse_args(c["args"])
    assert launch.module and launch.training_script == "grmserve.training.trainer" and launch.standalone
    res = subprocess.run([sys.executable, "-m", launch.training_script, *launch.training_script_args, "--print_config"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, f"grm-train rejects the Job's arguments:\n{res.stderr}"
    cfg = json.loads(res.stdout)
    assert cfg["resume"] and cfg["run_dir"].startswith("/runs/") and cfg["data"]["train"].startswith("/data/")
    mounts = {m["mountPath"] for m in c["volumeMounts"]}
    assert {"/data", "/runs", "/dev/shm", "/tmp"} <= mounts
