"""The monitoring stack of issue 14: the shipped Prometheus config and alert rules (promtool), the Grafana
provisioning and dashboard, docker-compose.yml wiring them together, every metric they name being exported by the
app, and a real `prometheus` binary scraping a live server on loopback (counts checked through its HTTP API, the
shipped rules loaded and evaluated, every dashboard query run).

The binaries come from the Debian package `prometheus` (`.ci/run` installs it when apt is available); the tests that
need one skip, saying so, where it is missing."""

from __future__ import annotations

import json
import pkgutil
import re
import shutil
import socket
import subprocess
import sys
import time
import types
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

import service.http.routes as route_package
from service.http.app import create_app, load_models
from service.runtime.metrics import WORK_KINDS, Metrics
from tests.helpers import (
    png_bytes,
    random_image,
    settings_for,
    tiny_cnn_config,
    tiny_vit_config,
    uvicorn_in_thread,
)

ROOT = Path(__file__).resolve().parents[1]
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
PROMETHEUS_CONFIG = PROMETHEUS_DIR / "prometheus.yml"
ALERT_RULES = PROMETHEUS_DIR / "alerts.yml"
ALERT_RULE_TESTS = PROMETHEUS_DIR / "alerts_test.yml"
GRAFANA_DIR = ROOT / "deploy" / "grafana"
DATASOURCES = GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yml"
DASHBOARD_PROVIDERS = GRAFANA_DIR / "provisioning" / "dashboards" / "dashboards.yml"
DASHBOARD = GRAFANA_DIR / "dashboards" / "saliency-server.json"
COMPOSE = ROOT / "docker-compose.yml"

JOB = "saliency-server"  # the scrape job's name: the rules and the dashboard select `job="saliency-server"`
METHODS = ("gradcam", "saliency")  # explanation methods both tiny models (a ViT and a CNN) support

# Families the app declares but this test's traffic cannot give samples to, each with the reason; their names are
# taken from a Metrics registry that is made to produce them (a fake CUDA device, a failed batch item).
CUDA_ONLY = {
    "saliency_gpu_memory_allocated_bytes": "torch's allocator counters: only exported on CUDA",
    "saliency_gpu_memory_reserved_bytes": "torch's caching allocator: only exported on CUDA",
    "saliency_gpu_memory_used_bytes": "NVML (nvidia-ml-py): only exported on CUDA",
    "saliency_gpu_memory_total_bytes": "NVML (nvidia-ml-py): only exported on CUDA",
}
ONLY_ON_FAILURE = {"saliency_failed_items_total": "counts failed batch items; every request of this test succeeds"}

METRIC_NAME = re.compile(r"\b(?:saliency|process|python)_[A-Za-z0-9_]*[A-Za-z0-9]")
STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
SELECTOR = re.compile(r"\b((?:saliency|process|python)_[A-Za-z0-9_]*[A-Za-z0-9]|up)\s*\{([^}]*)\}")
MATCHER = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')


# -- helpers ----------------------------------------------------------------------------------------------------------


def binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"`{name}` is not installed: the Debian package `prometheus` provides it (.ci/run installs it "
                    "when apt-get is available)")
    return path


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def metric_names(expr: str) -> set[str]:
    """The app metrics a PromQL expression names (string literals, i.e. label values, left out)."""
    return set(METRIC_NAME.findall(STRING.sub('""', expr)))


def matchers(expr: str) -> list[tuple[str, str, str, str]]:
    """(metric, label, operator, value) of every label matcher on a named app metric (or `up`)."""
    found = []
    for metric, body in SELECTOR.findall(expr):
        found.extend((metric, label, op, value) for label, op, value in MATCHER.findall(body))
    return found


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


def dashboard_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from dashboard_panels(panel.get("panels", []))


def dashboard_exprs() -> list[str]:
    """Every PromQL expression of the dashboard: panel targets and the template variables' queries."""
    data = dashboard()
    exprs = [target["expr"] for panel in dashboard_panels(data["panels"]) for target in panel.get("targets", [])]
    for variable in data["templating"]["list"]:
        query = variable.get("query")
        exprs.append(query["query"] if isinstance(query, dict) else query)
    return exprs


def alert_rules() -> list[dict[str, Any]]:
    return [rule for group in load_yaml(ALERT_RULES)["groups"] for rule in group["rules"]]


def all_exprs() -> list[str]:
    return dashboard_exprs() + [rule["expr"] for rule in alert_rules()]


def compose_service(name: str) -> dict[str, Any]:
    services = load_yaml(COMPOSE)["services"]
    assert name in services, f"docker-compose.yml has no `{name}` service"
    return services[name]


def bind_mounts(service: dict[str, Any]) -> dict[str, str]:
    """A compose service's bind mounts, container path -> host path (relative to the repository root)."""
    mounts = {}
    for volume in service.get("volumes", []):
        source, target, *_ = volume.split(":")
        if source.startswith("."):
            mounts[target] = str((ROOT / source).resolve().relative_to(ROOT))
    return mounts


def exposition(text: str) -> tuple[set[str], dict[str, set[str]], set[str]]:
    """Sample names, each sample name's label names, and the names of families declared without samples (expanded
    into the sample names Prometheus would store)."""
    samples: set[str] = set()
    labels: dict[str, set[str]] = {}
    empty: set[str] = set()
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    for family in text_string_to_metric_families(text):
        if not family.samples:
            empty.update(family.name + suffix for suffix in suffixes.get(family.type, ("",)))
        for sample in family.samples:
            samples.add(sample.name)
            labels.setdefault(sample.name, set()).update(set(sample.labels) - {"le"})
    return samples, labels, empty


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# -- the shipped files --------------------------------------------------------------------------------------------


def test_promtool_check_config_accepts_the_shipped_prometheus_config() -> None:
    done = subprocess.run([binary("promtool"), "check", "config", str(PROMETHEUS_CONFIG)], capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 rule files found" in done.stdout + done.stderr  # rule_files resolved (relative to the config)


def test_promtool_check_rules_accepts_the_shipped_alert_rules() -> None:
    done = subprocess.run([binary("promtool"), "check", "rules", str(ALERT_RULES)], capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"{len(alert_rules())} rules found" in done.stdout + done.stderr


def test_promtool_unit_tests_show_the_alerts_fire_on_synthetic_drift_and_errors_only() -> None:
    """deploy/prometheus/alerts_test.yml: the drift rules fire a week after a shift (not before, not for a stable
    model), the class-share rule sees classes that appear and vanish, the error ratio ignores warm-up 503s."""
    done = subprocess.run([binary("promtool"), "test", "rules", str(ALERT_RULE_TESTS)], capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    tested = set(re.findall(r"alertname: (\w+)", ALERT_RULE_TESTS.read_text(encoding="utf-8")))
    assert {"SaliencyConfidenceDrift", "SaliencyPredictedClassShift", "SaliencyMapBorderMassDrift",
            "SaliencyHighErrorRatio"} <= tested


def test_every_alert_has_a_unique_name_a_severity_and_a_summary_and_description() -> None:
    rules = alert_rules()
    names = [rule["alert"] for rule in rules]
    assert len(names) == len(set(names)), names
    for rule in rules:
        assert rule["labels"]["severity"] in {"critical", "warning"}, rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]
    drift = [rule for rule in rules if "Drift" in rule["alert"] or "Shift" in rule["alert"]]
    # Week-over-week drift of the medians and of the class shares, each compared `offset 1w`.
    assert {rule["alert"] for rule in drift} >= {"SaliencyConfidenceDrift", "SaliencyPredictionEntropyDrift",
                                                "SaliencyMapEntropyDrift", "SaliencyMapBorderMassDrift",
                                                "SaliencyPredictedClassShift"}
    assert all("offset 1w" in rule["expr"] and rule.get("for") for rule in drift)


def test_prometheus_config_scrapes_the_compose_service_and_loads_the_alert_rules() -> None:
    config = load_yaml(PROMETHEUS_CONFIG)
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert JOB in jobs
    targets = [target for static in jobs[JOB]["static_configs"] for target in static["targets"]]
    assert targets == ["saliency-server:8000"]
    assert jobs[JOB].get("metrics_path", "/metrics") == "/metrics"
    assert [(PROMETHEUS_CONFIG.parent / path).resolve() for path in config["rule_files"]] == [ALERT_RULES.resolve()]
    # The compose service of that name serves on port 8000.
    server = compose_service("saliency-server")
    assert any(str(port).split(":")[-1] == "8000" for port in server["ports"])


def test_compose_mounts_the_files_prometheus_and_grafana_are_configured_to_read() -> None:
    prometheus = compose_service("prometheus")
    assert prometheus["image"].startswith("prom/prometheus")
    config_flag = next(arg for arg in prometheus["command"] if arg.startswith("--config.file="))
    config_path = Path(config_flag.split("=", 1)[1])
    mounts = bind_mounts(prometheus)
    assert mounts.get(str(config_path.parent)) == "deploy/prometheus", mounts
    assert all(volume.endswith(":ro") for volume in prometheus["volumes"] if volume.startswith("./"))
    assert any(str(port).endswith("9090") for port in prometheus["ports"])

    grafana = compose_service("grafana")
    assert grafana["image"].startswith("grafana/grafana")
    assert "prometheus" in grafana["depends_on"]
    mounts = bind_mounts(grafana)
    assert mounts.get("/etc/grafana/provisioning") == "deploy/grafana/provisioning", mounts
    provider_path = load_yaml(DASHBOARD_PROVIDERS)["providers"][0]["options"]["path"]
    assert mounts.get(provider_path) == "deploy/grafana/dashboards", (provider_path, mounts)
    assert all(volume.endswith(":ro") for volume in grafana["volumes"] if volume.startswith("./"))
    assert any(str(port).endswith("3000") for port in grafana["ports"])
    # The datasource's URL names the compose service and Prometheus' port.
    datasource = load_yaml(DATASOURCES)["datasources"][0]
    assert httpx.URL(datasource["url"]).host == "prometheus" and httpx.URL(datasource["url"]).port == 9090


def test_grafana_datasource_and_dashboard_provider_are_valid_provisioning_files() -> None:
    datasources = load_yaml(DATASOURCES)
    assert datasources["apiVersion"] == 1
    [datasource] = datasources["datasources"]
    assert datasource["type"] == "prometheus" and datasource["uid"] == "prometheus" and datasource["access"] == "proxy"
    providers = load_yaml(DASHBOARD_PROVIDERS)
    assert providers["apiVersion"] == 1
    [provider] = providers["providers"]
    assert provider["type"] == "file" and provider["name"] and provider["options"]["path"].startswith("/")


def test_the_dashboard_is_valid_grafana_json_with_a_model_variable_and_the_provisioned_datasource() -> None:
    data = dashboard()
    uid = load_yaml(DATASOURCES)["datasources"][0]["uid"]
    assert isinstance(data["uid"], str) and 0 < len(data["uid"]) <= 40
    assert data["title"] and "id" not in data  # provisioned dashboards must not carry a database id
    assert isinstance(data["schemaVersion"], int) and data["schemaVersion"] >= 36
    panels = list(dashboard_panels(data["panels"]))
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    boxes = []
    for panel in panels:
        assert panel["type"] in {"row", "timeseries", "stat", "table"}, panel["title"]
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["w"] > 0 and grid["x"] + grid["w"] <= 24 and grid["h"] > 0, panel["title"]
        boxes.append((panel["title"], grid))
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": uid}, panel["title"]
        assert panel["targets"], panel["title"]
        refs = [target["refId"] for target in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip() and target["datasource"]["uid"] == uid, panel["title"]
    for i, (title, a) in enumerate(boxes):  # no two panels overlap on the grid
        for other, b in boxes[i + 1:]:
            overlap = (a["x"] < b["x"] + b["w"] and b["x"] < a["x"] + a["w"]
                       and a["y"] < b["y"] + b["h"] and b["y"] < a["y"] + a["h"])
            assert not overlap, (title, other)
    [model] = [variable for variable in data["templating"]["list"] if variable["name"] == "model"]
    assert model["type"] == "query" and model["datasource"]["uid"] == uid and model["multi"] and model["includeAll"]
    assert "label_values(saliency_model_ready, model)" in json.dumps(model["query"])
    assert sum('model=~"$model"' in expr for expr in dashboard_exprs()) >= 10


def test_the_dashboard_has_a_panel_for_every_signal_the_issue_asks_for() -> None:
    named = set().union(*(metric_names(expr) for expr in dashboard_exprs()))
    wanted = {
        "traffic": "saliency_requests_total", "latency percentiles": "saliency_request_duration_seconds_bucket",
        "queue wait": "saliency_queue_wait_seconds_bucket", "batch size": "saliency_batch_size_count",
        "explain cost by method": "saliency_explain_method_seconds_sum",
        "confidence drift": "saliency_prediction_confidence_ratio_bucket",
        "entropy drift": "saliency_prediction_entropy_ratio_bucket",
        "map entropy": "saliency_map_entropy_ratio_bucket", "top-10% mass": "saliency_map_top10_mass_ratio_bucket",
        "border mass": "saliency_map_border_mass_ratio_bucket", "class share": "saliency_predicted_class_total",
        "GPU memory": "saliency_gpu_memory_allocated_bytes", "jobs": "saliency_jobs",
        "in flight": "saliency_requests_in_flight", "build info": "saliency_build_info",
    }
    missing = {signal: metric for signal, metric in wanted.items() if metric not in named}
    assert not missing
    drift = [expr for expr in dashboard_exprs() if "offset 1w" in expr]
    for metric in ("saliency_prediction_confidence_ratio_bucket", "saliency_prediction_entropy_ratio_bucket"):
        assert any(metric in expr for expr in drift), f"{metric}: no week-ago line"


def test_the_metric_name_parser_reads_selectors_and_skips_label_values() -> None:
    expr = ('sum by (le) (rate(saliency_x_bucket{job="saliency_fake", endpoint=~"a|b"}[5m])) / process_y '
            '+ on (model) saliency_z_total')
    assert metric_names(expr) == {"saliency_x_bucket", "process_y", "saliency_z_total"}
    assert matchers(expr) == [("saliency_x_bucket", "job", "=", "saliency_fake"),
                              ("saliency_x_bucket", "endpoint", "=~", "a|b")]


# -- a live server --------------------------------------------------------------------------------------------------


@dataclass
class LiveServer:
    url: str
    app: Any
    traffic_done: float  # time.time() after the last request of the traffic below
    predictions: dict[str, int]  # per model: 200 predicts + 200 explains (each observes one prediction)
    predicts: int
    explains: int


@pytest.fixture(scope="module")
def live_server() -> Iterator[LiveServer]:
    """Both tiny models behind a real uvicorn server on loopback, after 3 predictions, 2 explanations of 2 methods
    each, one 404 (unknown model) and one 422 (unknown method)."""
    settings = settings_for(tiny_vit_config(), tiny_cnn_config(), log_level="warning")
    app = create_app(settings, models=load_models(settings))
    with uvicorn_in_thread(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        for _ in range(600):
            if client.get("/readyz").status_code == 200:
                break
            time.sleep(0.05)
        else:
            raise TimeoutError("the models never became ready")

        def upload(seed: int) -> dict[str, Any]:
            return {"file": ("image.png", png_bytes(random_image(seed)), "image/png")}

        for seed, model in enumerate(("tiny_vit", "tiny_vit", "tiny_cnn")):
            answer = client.post(f"/v1/models/{model}/predict", files=upload(seed))
            assert answer.status_code == 200, answer.text
        for seed, model in enumerate(("tiny_vit", "tiny_cnn"), start=10):
            answer = client.post(f"/v1/models/{model}/explain", files=upload(seed),
                                 data={"methods": json.dumps(list(METHODS))})
            assert answer.status_code == 200, answer.text
        answer = client.post("/v1/models/no_such_model/predict", files=upload(20))
        assert answer.status_code == 404 and answer.json()["error"]["code"] == "model_not_found", answer.text
        answer = client.post("/v1/models/tiny_vit/explain", files=upload(21), data={"methods": '["no_such_method"]'})
        assert answer.status_code == 422 and answer.json()["error"]["code"] == "invalid_request", answer.text
        yield LiveServer(url=url, app=app, traffic_done=time.time(), predictions={"tiny_vit": 3, "tiny_cnn": 2},
                         predicts=3, explains=2)


def declared_only_names(monkeypatch: pytest.MonkeyPatch) -> tuple[set[str], dict[str, set[str]]]:
    """The sample names (and labels) of CUDA_ONLY and ONLY_ON_FAILURE, from a Metrics registry that has a fake CUDA
    device with NVML and one failed batch item."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda index: 1 << 20)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda index: 2 << 20)
    nvml = types.ModuleType("pynvml")
    nvml.nvmlInit = lambda: None  # type: ignore[attr-defined]
    nvml.nvmlDeviceGetHandleByIndex = lambda index: index  # type: ignore[attr-defined]
    nvml.nvmlDeviceGetMemoryInfo = lambda handle: types.SimpleNamespace(used=3 << 20, total=8 << 20)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    metrics = Metrics(process_collectors=False)
    metrics.failed_items.labels("tiny_vit").inc()
    samples, labels, _ = exposition(metrics.render().decode())
    wanted = set(CUDA_ONLY) | set(ONLY_ON_FAILURE)
    assert wanted <= samples, wanted - samples
    return wanted, {name: labels[name] for name in wanted}


def test_every_metric_in_the_dashboard_and_the_alerts_is_exported_by_the_app(
    live_server: LiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    scraped = httpx.get(f"{live_server.url}/metrics", timeout=30).text
    samples, labels, declared_empty = exposition(scraped)
    extra, extra_labels = declared_only_names(monkeypatch)
    # The failure counter's series exist from start-up (at 0), so that the first failure is an increase.
    assert set(ONLY_ON_FAILURE) <= samples
    known = samples | extra
    labels = {**labels, **extra_labels}
    missing = {}
    for expr in all_exprs():
        for name in metric_names(expr) - known:
            missing.setdefault(name, expr)
    assert not missing, f"named in the dashboard or the rules but not exported: {missing}"
    # Label matchers name labels those series carry (job and instance are Prometheus' own).
    wrong = {(metric, label) for expr in all_exprs() for metric, label, _, _ in matchers(expr)
             if metric != "up" and label not in labels[metric] | {"job", "instance"}}
    assert not wrong, wrong


def test_label_values_in_the_dashboard_and_alerts_are_values_the_app_produces() -> None:
    routes = {"unmatched"}
    for module in pkgutil.iter_modules(route_package.__path__):
        router = getattr(__import__(f"{route_package.__name__}.{module.name}", fromlist=["router"]), "router", None)
        routes.update(route.name for route in getattr(router, "routes", []))
    codes = set()
    for path in (ROOT / "service").rglob("*.py"):
        codes.update(re.findall(r'ApiError\(\s*\d+,\s*"(\w+)"', path.read_text(encoding="utf-8")))
    allowed = {"endpoint": routes, "kind": set(WORK_KINDS), "code": codes | {""}, "job": {JOB}}
    checked = 0
    for expr in all_exprs():
        for metric, label, op, value in matchers(expr):
            if label not in allowed or "$" in value:
                continue
            values = value.split("|") if op in ("=~", "!~") else [value]
            unknown = [v for v in values if v not in allowed[label]]
            assert not unknown, f"{metric}{{{label}{op}{value!r}}}: {unknown} never produced"
            checked += 1
    assert checked >= 10
    assert {"predict", "explain", "healthz", "readyz", "v2_infer"} <= routes  # the route names were found


# -- a real Prometheus ----------------------------------------------------------------------------------------------


@dataclass
class RunningPrometheus:
    url: str
    log: Path
    rule_names: list[str]

    def query(self, expr: str) -> list[dict[str, Any]]:
        answer = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=30)
        body = answer.json()
        assert answer.status_code == 200 and body["status"] == "success", (expr, body)
        return body["data"]["result"]

    def scalar(self, expr: str) -> float:
        result = self.query(expr)
        assert len(result) == 1, (expr, result)
        return float(result[0]["value"][1])

    def by(self, label: str, expr: str) -> dict[str, float]:
        return {series["metric"][label]: float(series["value"][1]) for series in self.query(expr)}

    def log_tail(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")[-3000:]


@pytest.fixture(scope="module")
def prometheus(live_server: LiveServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningPrometheus]:
    """The `prometheus` binary scraping the live server every second, with the shipped alert rules (their groups
    evaluated every second), once it has scraped twice after the traffic and evaluated every rule."""
    executable = binary("prometheus")
    workdir = tmp_path_factory.mktemp("prometheus")
    rules = load_yaml(ALERT_RULES)
    for group in rules["groups"]:
        group["interval"] = "1s"  # the expressions as shipped; evaluated now rather than within 5 minutes
    (workdir / "alerts.yml").write_text(yaml.safe_dump(rules, sort_keys=False), encoding="utf-8")
    (workdir / "prometheus.yml").write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": ["alerts.yml"],
        "scrape_configs": [{"job_name": JOB, "static_configs": [{"targets": [httpx.URL(live_server.url).netloc.decode()]}]}],
    }), encoding="utf-8")
    port = free_port()
    log = workdir / "prometheus.log"
    with log.open("wb") as log_file:
        process = subprocess.Popen(
            [executable, f"--config.file={workdir / 'prometheus.yml'}", f"--storage.tsdb.path={workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
            stdout=log_file, stderr=subprocess.STDOUT,
        )
    running = RunningPrometheus(url=f"http://127.0.0.1:{port}", log=log,
                                rule_names=[rule["alert"] for rule in alert_rules()])
    try:
        deadline = time.monotonic() + 45
        while True:
            assert process.poll() is None, f"prometheus exited: {running.log_tail()}"
            assert time.monotonic() < deadline, f"prometheus never scraped or evaluated: {running.log_tail()}"
            try:
                ready = httpx.get(f"{running.url}/-/ready", timeout=10).status_code == 200
            except httpx.TransportError:
                ready = False  # not listening yet
            if not ready:
                time.sleep(0.25)
                continue
            scraped = running.query(f'timestamp(up{{job="{JOB}"}})')
            rules_answer = httpx.get(f"{running.url}/api/v1/rules", timeout=10).json()
            loaded = [rule for group in rules_answer["data"]["groups"] for rule in group["rules"]]
            evaluated = len(loaded) == len(running.rule_names) and all(rule["health"] != "unknown" for rule in loaded)
            # Two scrapes after the traffic (rates need two samples), and every rule evaluated once.
            if scraped and float(scraped[0]["value"][1]) > live_server.traffic_done + 2.0 and evaluated:
                break
            time.sleep(0.25)
        yield running
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=15)


def test_prometheus_scrapes_the_latency_and_drift_series_with_the_expected_counts(
    live_server: LiveServer, prometheus: RunningPrometheus
) -> None:
    q = prometheus
    assert q.scalar(f'up{{job="{JOB}"}}') == 1
    # Latency of every outcome, by endpoint, status and error code.
    assert q.scalar('sum(saliency_request_duration_seconds_count{endpoint="predict", status="200"})') == 3
    assert q.scalar('sum(saliency_request_duration_seconds_count{endpoint="explain", status="200"})') == 2
    [not_found] = q.query('saliency_request_duration_seconds_count{code="model_not_found"}')
    assert float(not_found["value"][1]) == 1
    assert {**not_found["metric"], "instance": ""} == {
        "__name__": "saliency_request_duration_seconds_count", "job": JOB, "instance": "", "model": "unknown",
        "endpoint": "predict", "status": "404", "code": "model_not_found"}
    assert q.by("model", 'saliency_requests_total{code="invalid_request", status="422", endpoint="explain"}') == {
        "tiny_vit": 1}
    median = q.scalar('histogram_quantile(0.5, sum by (le) '
                      '(saliency_request_duration_seconds_bucket{endpoint="predict", status="200"}))')
    assert 0 < median < 60
    # Queue wait and compute by kind, explain cost per method.
    assert q.scalar('sum(saliency_queue_wait_seconds_count{kind="predict"})') == 3
    assert q.scalar('sum(saliency_queue_wait_seconds_count{kind="explain"})') == 2
    assert q.scalar('sum(saliency_compute_seconds_count{kind="predict"})') >= 1
    assert q.by("method", "sum by (method) (saliency_explain_method_seconds_count)") == {m: 2 for m in METHODS}
    # Drift: one prediction observed per predict and per explain, one map per method and explanation.
    expected = {model: float(count) for model, count in live_server.predictions.items()}
    assert q.by("model", "saliency_prediction_confidence_ratio_count") == expected
    assert q.by("model", "saliency_prediction_entropy_ratio_count") == expected
    assert q.by("model", "sum by (model) (saliency_predicted_class_total)") == expected
    for family in ("saliency_map_entropy_ratio", "saliency_map_top10_mass_ratio", "saliency_map_border_mass_ratio"):
        assert q.by("method", f"sum by (method) ({family}_count)") == {m: 2 for m in METHODS}, family
        per_map = q.scalar(f"sum({family}_sum) / sum({family}_count)")
        assert 0 <= per_map <= 1, family
    # The state of the process.
    assert q.by("model", "saliency_model_ready") == {"tiny_vit": 1, "tiny_cnn": 1}
    [build] = q.query("saliency_build_info")
    assert build["metric"]["version"] and build["metric"]["device"] == "cpu"


def test_prometheus_loads_and_evaluates_every_shipped_alert_rule_without_errors(prometheus: RunningPrometheus) -> None:
    groups = httpx.get(f"{prometheus.url}/api/v1/rules", timeout=10).json()["data"]["groups"]
    rules = {rule["name"]: rule for group in groups for rule in group["rules"]}
    assert sorted(rules) == sorted(prometheus.rule_names)
    unhealthy = {name: (rule["health"], rule.get("lastError")) for name, rule in rules.items()
                 if rule["health"] != "ok"}
    assert not unhealthy
    # On this server (both models on random weights, no 5xx, nothing queued) exactly one rule matches, per model.
    alerts = httpx.get(f"{prometheus.url}/api/v1/alerts", timeout=10).json()["data"]["alerts"]
    active = {(alert["labels"]["alertname"], alert["labels"].get("model")) for alert in alerts}
    assert active == {("SaliencyRandomWeights", "tiny_vit"), ("SaliencyRandomWeights", "tiny_cnn")}, alerts


def test_every_dashboard_query_runs_in_prometheus_and_finds_series(prometheus: RunningPrometheus) -> None:
    """The dashboard's queries with Grafana's variables filled in (all models; a 1m rate interval) are valid PromQL
    and find data, except where none can exist on this server: a week ago, GPU memory on a CPU, 5xx answers."""
    empty = []
    for expr in dashboard_exprs():
        if expr.startswith("label_values("):
            continue
        query = expr.replace("$model", "(tiny_vit|tiny_cnn)").replace("$__rate_interval", "1m")
        result = prometheus.query(query)
        expected_empty = "offset 1w" in expr or "saliency_gpu_" in expr or 'status=~"5.."' in expr
        if not expected_empty and not result:
            empty.append(expr)
        if expected_empty:
            assert not result, expr
    assert not empty, empty
