"""The shipped Prometheus config, rules and Grafana dashboard against the real tools: promtool checks
and unit tests, then a real Prometheus (Debian's `prometheus` package) scraping a real `grm-serve`
under traffic, read back through its HTTP API: every project metric, every recording rule, every
Grafana panel query and the prometheus-adapter queries the HPA scales on must return data."""

from __future__ import annotations

import json
import math
import subprocess
import threading
import time
import urllib.parse
import urllib.request

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from grmserve.clients.reward_client import RewardClient

from ..processes import free_port
from .conftest import DEPLOY, require_binary

PROM = DEPLOY / "prometheus"
RULE_FILES = sorted((PROM / "rules").glob("*.yml"))
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "grm-serve.json"
ADAPTER = DEPLOY / "k8s" / "prometheus-adapter" / "values.yaml"
JOB = "grm-serve"
DEADLINE_S = 120  # how long Prometheus may take to show every series (a few seconds when idle)


def promtool(*args: str, cwd=PROM) -> subprocess.CompletedProcess:
    return subprocess.run([require_binary("promtool"), *args], cwd=cwd, capture_output=True, text=True, timeout=120)


# -- static checks ------------------------------------------------------------------------------


def test_promtool_checks_the_shipped_config_and_rules():
    for args in (["check", "config", "prometheus.yml"], ["check", "rules", *map(str, RULE_FILES)]):
        res = promtool(*args)
        assert res.returncode == 0, f"promtool {' '.join(args)}:\n{res.stdout}{res.stderr}"


def test_alert_rules_pass_their_promtool_unit_tests():
    res = promtool("test", "rules", "alerts_test.yml")
    assert res.returncode == 0, res.stdout + res.stderr


def test_every_alert_has_a_runbook_and_a_unit_test():
    alerts = [r for f in RULE_FILES for g in yaml.safe_load(f.read_text())["groups"] for r in g["rules"]
              if "alert" in r]
    tests = (PROM / "alerts_test.yml").read_text()
    for rule in alerts:
        assert rule["annotations"].get("runbook", "").strip(), f"{rule['alert']} has no runbook annotation"
        assert f"alertname: {rule['alert']}\n        exp_alerts:\n          - exp_labels" in tests, \
            f"{rule['alert']} is never shown firing in alerts_test.yml"


# -- queries the deploy files make ---------------------------------------------------------------


def recording_rules() -> list[str]:
    return [r["record"] for f in RULE_FILES for g in yaml.safe_load(f.read_text())["groups"] for r in g["rules"]
            if "record" in r]


def panel_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) for every Grafana panel target, with the dashboard variables filled in
    as Grafana would: $job = the scrape job, $__rate_interval = 1m."""
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [(p["title"], t["expr"].replace("$job", JOB).replace("$__rate_interval", "1m"))
            for p in panels for t in p["targets"]]


def adapter_queries() -> list[tuple[str, str]]:
    """prometheus-adapter's metricsQuery templates with its placeholders filled in for one job."""
    out = []
    for rule in yaml.safe_load(ADAPTER.read_text())["rules"]["custom"]:
        series = rule["seriesQuery"].split("{")[0]
        query = (rule["metricsQuery"].replace("<<.Series>>", series).replace("<<.LabelMatchers>>", f'job="{JOB}"')
                 .replace("<<.GroupBy>>", "instance"))
        out.append((rule["name"]["as"], query))
    return out


def test_dashboard_reads_recording_rules_that_exist():
    known = set(recording_rules())
    for title, expr in panel_queries():
        for name in (w for w in expr.replace("(", " ").replace("{", " ").split() if w.count(":") >= 2):
            assert name in known, f"panel {title!r} reads {name}, which no recording rule defines"


# -- a real Prometheus scraping a real grm-serve ---------------------------------------------------


def write_test_config(tmp_path, metrics_port: int) -> str:
    """The shipped prometheus.yml with its target pointed at the test server and 1 s intervals."""
    cfg = yaml.safe_load((PROM / "prometheus.yml").read_text())
    cfg["global"].update(scrape_interval="1s", evaluation_interval="1s")
    (job,) = [j for j in cfg["scrape_configs"] if j["job_name"] == JOB]
    job["static_configs"] = [{"targets": [f"127.0.0.1:{metrics_port}"]}]
    (tmp_path / "rules").mkdir()
    for f in RULE_FILES:
        (tmp_path / "rules" / f.name).write_text(f.read_text())
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


@pytest.fixture(scope="session")
def prometheus_binary() -> str:
    return require_binary("prometheus")


@pytest.fixture()
def prometheus(prometheus_binary, tmp_path, servers):
    binary = prometheus_binary
    port = free_port()
    log = (tmp_path / "prometheus.log").open("w")
    proc = subprocess.Popen([binary, f"--config.file={write_test_config(tmp_path, servers[0].metrics_port)}",
                             f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: http_ok(f"{url}/-/ready"), 60,
                   f"Prometheus did not become ready; log: {tmp_path}/prometheus.log")
        yield url
    finally:
        proc.terminate()
        proc.wait(30)


def http_ok(url: str) -> bool:
    try:
        return urllib.request.urlopen(url, timeout=5).status == 200
    except OSError:
        return False


def wait_until(predicate, seconds: float, message: str) -> None:
    end = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(message)
        time.sleep(0.5)


def query(url: str, promql: str) -> list[dict]:
    reply = json.load(urllib.request.urlopen(f"{url}/api/v1/query?{urllib.parse.urlencode({'query': promql})}",
                                             timeout=10))
    assert reply["status"] == "success", (promql, reply)
    return reply["data"]["result"]


def has_data(result: list[dict]) -> bool:
    """At least one series with a finite value (NaN, e.g. a quantile of nothing, is not data)."""
    return any(math.isfinite(float(r["value"][1])) for r in result)


def traffic_round(client: RewardClient) -> None:
    chat = [{"role": "user", "content": "Is 91 prime?"}]
    client.score([(chat, "No, 7 x 13."), (chat, "Yes."), ("A raw prompt", " a reply")])
    client.score_candidates(chat, ["No.", "91 = 7 * 13, so no.", "Yes"])
    client.info()


def send_traffic(client: RewardClient, stop: threading.Event) -> None:
    while not stop.wait(0.05):
        traffic_round(client)


def project_series(server) -> list[str]:
    """Every grm_serve_* sample name the server exposes (counters' _total, histograms' _bucket/_sum/_count)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).read().decode()
    return sorted({s.name for fam in text_string_to_metric_families(text) for s in fam.samples
                   if s.name.startswith("grm_serve_") and not s.name.endswith("_created")})


def test_prometheus_scrapes_grm_serve_and_every_rule_panel_and_adapter_query_has_data(prometheus_binary, servers,
                                                                                      prometheus):
    client = RewardClient(servers[0].target, timeout=30)
    traffic_round(client)  # every labelled series exists from here on
    stop = threading.Event()
    traffic = threading.Thread(target=send_traffic, args=(client, stop), daemon=True)
    traffic.start()
    try:
        queries = ([("up", f'up{{job="{JOB}"}} == 1')] + [("metric", name) for name in project_series(servers[0])]
                   + [("recording rule", name) for name in recording_rules()]
                   + [(f"panel {title!r}", expr) for title, expr in panel_queries()]
                   + [(f"prometheus-adapter {name}", expr) for name, expr in adapter_queries()])
        missing = list(queries)
        end = time.monotonic() + DEADLINE_S
        while missing and time.monotonic() < end:
            missing = [(what, q) for what, q in missing if not has_data(query(prometheus, q))]
            time.sleep(1)
    finally:
        stop.set()
        traffic.join(30)
        client.close()
    assert not missing, "no data for:\n" + "\n".join(f"  {what}: {q}" for what, q in missing)
    names = {q for what, q in queries if what == "metric"}
    assert {"grm_serve_requests_total", "grm_serve_request_seconds_bucket", "grm_serve_queue_seconds_bucket",
            "grm_serve_batch_rows_bucket", "grm_serve_prefix_cache_lookups_total", "grm_serve_jobs_total",
            "grm_serve_ready"} <= names, names
    rules = [r for g in json.load(urllib.request.urlopen(f"{prometheus}/api/v1/rules", timeout=10))["data"]["groups"]
             for r in g["rules"]]
    assert all(r["health"] == "ok" for r in rules), [(r["name"], r.get("lastError")) for r in rules
                                                     if r["health"] != "ok"]
    active = [(r["name"], r["state"]) for r in rules if r["type"] == "alerting" and r["state"] != "inactive"]
    assert not active, f"alerts pending or firing on a healthy, lightly loaded server: {active}"
