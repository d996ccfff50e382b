"""The container images and compose file. Where a container runtime with the base image is present,
the CPU image is built and run until its HEALTHCHECK reports healthy. Without one (as on the
project's CI machines: no Docker daemon, and nothing may pull images), what the images would run is
run here instead: the HEALTHCHECK command against a real server, the ENTRYPOINT/CMD through
grm-serve's own argument parser, the build steps' files and modules; and the compose file's parts
are checked against each other and against the Prometheus and Grafana files it mounts."""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
import yaml

from .conftest import DEPLOY, REPO

DOCKERFILES = sorted((DEPLOY / "docker").glob("Dockerfile.*"))
COMPOSE = DEPLOY / "docker" / "compose.yaml"


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(l for l in dockerfile.read_text().splitlines()
                                          if not l.lstrip().startswith("#")))
    return [(line.split()[0].upper(), line.split(None, 1)[1]) for line in text.splitlines() if line.strip()]


def final_stage(dockerfile: Path) -> list[tuple[str, str]]:
    steps = instructions(dockerfile)
    last_from = max(i for i, (op, _) in enumerate(steps) if op == "FROM")
    return steps[last_from:]


def exec_form(dockerfile: Path, op: str) -> list[str]:
    (args,) = [a for o, a in final_stage(dockerfile) if o == op]
    if op == "HEALTHCHECK":
        args = args.split("CMD", 1)[1]
    return json.loads(args)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_healthcheck_command_reports_a_real_server(dockerfile, servers):
    cmd = exec_form(dockerfile, "HEALTHCHECK")
    assert cmd[0] == "python"
    serving = subprocess.run([sys.executable, *cmd[1:-1], servers[0].target], capture_output=True, text=True,
                             timeout=60)
    assert (serving.returncode, serving.stdout.strip()) == (0, "SERVING"), serving.stderr
    closed = subprocess.run([sys.executable, *cmd[1:-1], "127.0.0.1:1"], capture_output=True, text=True, timeout=60)
    assert closed.returncode == 1 and closed.stdout.startswith("UNREACHABLE"), closed.stdout + closed.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_image_runs_grm_serve_as_non_root_with_flags_it_accepts(dockerfile):
    from grmserve.server.config import parse_serve_args

    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert exec_form(dockerfile, "ENTRYPOINT") == ["grm-serve"] and "grm-serve" in scripts
    config = parse_serve_args(exec_form(dockerfile, "CMD"))
    assert config.model.checkpoint == "/opt/grm-serve/model"
    users = [a for o, a in final_stage(dockerfile) if o == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root")


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_build_steps_copy_existing_files_and_run_existing_modules(dockerfile):
    steps = instructions(dockerfile)
    for op, args in steps:
        if op == "COPY" and not args.startswith("--from"):
            for source in shlex.split(args)[:-1]:
                assert (REPO / source).exists(), f"{dockerfile.name}: COPY {source}: no such file in the repository"
    runs = " ".join(a for o, a in steps if o == "RUN")
    for module in re.findall(r"python -m ([\w.]+)", runs):
        if module != "venv":
            assert importlib.util.find_spec(module), f"{dockerfile.name} runs python -m {module}, which does not exist"
    imports = re.findall(r"from ([\w.]+) import (\w+)", runs)
    assert imports, "no build step builds the default model"
    for module, name in imports:
        assert hasattr(importlib.import_module(module), name), (
            f"{dockerfile.name} imports {name} from {module}: missing")


def test_compose_wires_server_prometheus_and_grafana_together():
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    assert set(services) == {"grm-serve", "prometheus", "grafana"}
    for service in services.values():
        for volume in service.get("volumes", []):
            host = volume.split(":")[0]
            if host.startswith("."):
                assert (COMPOSE.parent / host).exists(), f"compose mounts {host}, which does not exist"
    server = services["grm-serve"]
    assert (COMPOSE.parent / server["build"]["context"] / server["build"]["dockerfile"]).is_file()
    prom = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    (target,) = [t for job in prom["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]]
    host, port = target.split(":")
    assert host == "grm-serve" and f"{port}:{port}" in server["ports"], "Prometheus scrapes the server's metrics port"
    datasource = yaml.safe_load(
        (DEPLOY / "grafana/provisioning/datasources/prometheus.yaml").read_text())["datasources"][0]
    assert datasource["url"] == "http://prometheus:9090" and "9090:9090" in services["prometheus"]["ports"]
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/grm-serve.yaml").read_text())["providers"][0]
    assert f"../grafana/dashboards:{provider['options']['path']}:ro" in services["grafana"]["volumes"]
    dashboard = json.loads((DEPLOY / "grafana/dashboards/grm-serve.json").read_text())
    (ds_var,) = [v for v in dashboard["templating"]["list"] if v["type"] == "datasource"]
    assert ds_var["current"]["value"] == datasource["uid"]
    grace = float(server["command"][server["command"].index("--server.grace_seconds") + 1])
    assert float(server["stop_grace_period"].rstrip("s")) > grace


def docker_ready() -> str:
    """Why no image can be built here, or '' when a daemon with the base image is available."""
    try:
        info = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        return "no docker CLI"
    if info.returncode != 0:
        return f"no container runtime: `docker info` fails ({info.stderr.strip().splitlines()[-1][:120]})"
    base = re.search(r"ARG PYTHON_IMAGE=(\S+)", DOCKERFILES[0].read_text())[1]
    if subprocess.run(["docker", "image", "inspect", base], capture_output=True).returncode != 0:
        return f"base image {base} is not present locally, and tests never pull images"
    return ""


def test_cpu_image_builds_and_turns_healthy():
    reason = docker_ready()
    if reason:
        pytest.skip(f"{reason}; the HEALTHCHECK command, CMD and build steps are checked without it above")
    tag = "grm-serve:test-cpu"
    subprocess.run(["docker", "build", "-f", str(DEPLOY / "docker/Dockerfile.cpu"), "-t", tag, str(REPO)],
                   check=True, timeout=1800)
    cid = subprocess.run(["docker", "run", "-d", "--read-only", "--tmpfs", "/tmp", tag], capture_output=True,
                         text=True, check=True).stdout.strip()
    try:
        for _ in range(120):
            status = subprocess.run(["docker", "inspect", "-f", "{{.State.Health.Status}}", cid],
                                    capture_output=True, text=True).stdout.strip()
            if status in ("healthy", "unhealthy"):
                break
            time.sleep(5)
        assert status == "healthy", subprocess.run(["docker", "logs", cid], capture_output=True,
                                                   text=True).stderr[-3000:]
    finally:
        subprocess.run(["docker", "rm", "-f", cid], capture_output=True)
