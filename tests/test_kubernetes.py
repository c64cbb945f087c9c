"""The Kubernetes deliverable (deploy/kubernetes/, issue 15), checked without a cluster.

- Every manifest passes `kubernetes-validate` (strict: unknown fields are errors) for Kubernetes 1.31 and for the
  newest version the package bundles: each resource file as it is, and, where `kubectl kustomize` is installed,
  everything each kustomization renders (overlays, KServe variant, the example composing the components). The
  custom resources (ServiceMonitor, PodMonitor, ScaledObject, InferenceService) have no schema there: they get a
  minimal structure check here instead, and the parts of them that are Kubernetes types (the InferenceService's
  pod spec and containers, the ScaledObject's HPA behaviour) are validated by wrapping them in a Pod or an HPA.
- Without kubectl the rendered checks skip, and the patches and components are checked to target resources that
  exist (kind and name), so a renamed resource still fails here.
- Against the live app (tiny models, in process): every probe path answers 200 once ready, the metric every
  autoscaler reads (HPA through prometheus-adapter, KEDA) is exported, as a gauge, with the labels the queries use.
- The ConfigMap's TOML, with each container's SALIENCY_* variables, loads with the server's own settings loader
  (so a wrong setting name fails), ports agree (--port, containerPort, probes, Service targetPort), pods run as a
  numeric non-root user on a read-only root filesystem, and terminationGracePeriodSeconds covers preStop + drain_s
  + 30 s.
"""

from __future__ import annotations

import asyncio
import copy
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from service.config import ServerSettings, load_settings
from tests.helpers import running_app, settings_for, tiny_vit_config

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "kubernetes"
CONFIG_TOML = K8S / "config" / "config.toml"
BASE_DEPLOYMENT = K8S / "base" / "deployment.yaml"
BASE_SERVICE = K8S / "base" / "service.yaml"
BASE_HPA = K8S / "base" / "hpa.yaml"
INFERENCE_SERVICE = K8S / "kserve" / "inferenceservice.yaml"
ADAPTER_VALUES = K8S / "prometheus-adapter" / "values.yaml"
SCALED_OBJECT = K8S / "components" / "keda" / "scaledobject.yaml"
REDIS = K8S / "redis" / "redis.yaml"
README = ROOT / "README.md"

# The oldest Kubernetes the manifests are meant for (the preStop `sleep` action is on by default from 1.30) and the
# newest kubernetes-validate bundles.
KUBERNETES_VERSIONS = ("1.31.0", kubernetes_validate.latest_version())
SERVER_IMAGE = "saliency-server"
SERVER_UID = 10001  # the image's USER (deploy/Dockerfile)
FINISH_S = 30  # uvicorn's graceful-shutdown limit for the requests in flight after the drain (README "Batching")
# Directories `kubectl apply -k` is meant for (the README's commands); base/ is rendered too.
VARIANTS = ("base", "overlays/cpu", "overlays/gpu", "kserve", "examples/production")
METRIC = re.compile(r"\b(saliency_[a-z0-9_]*[a-z0-9])\b")


# -- reading the manifests --------------------------------------------------------------------------------------------


def documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc]


def one(path: Path) -> dict[str, Any]:
    (doc,) = documents(path)
    return doc


def kustomizations() -> dict[Path, dict[str, Any]]:
    """Every kustomization.yaml under deploy/kubernetes, by directory."""
    return {path.parent: one(path) for path in sorted(K8S.rglob("kustomization.yaml"))}


def resource_files() -> list[Path]:
    """The files (not directories) that kustomizations list as resources."""
    files = []
    for directory, kustomization in kustomizations().items():
        for entry in kustomization.get("resources", []):
            path = (directory / entry).resolve()
            if path.is_file():
                files.append(path)
    return sorted(set(files))


def patch_files() -> list[Path]:
    return sorted({(directory / patch["path"]).resolve() for directory, kustomization in kustomizations().items()
                   for patch in kustomization.get("patches", []) if "path" in patch})


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def pod_spec(resource: dict[str, Any]) -> dict[str, Any]:
    """The pod spec of a Deployment, or the inlined pod spec of an InferenceService's predictor."""
    if resource["kind"] == "InferenceService":
        return resource["spec"]["predictor"]
    return resource["spec"]["template"]["spec"]


def server_container(resource: dict[str, Any]) -> dict[str, Any]:
    containers = [c for c in pod_spec(resource)["containers"] if SERVER_IMAGE in c.get("image", "")]
    assert len(containers) == 1, f"{resource['kind']}/{resource['metadata']['name']}: one saliency-server container"
    return containers[0]


def is_server(resource: dict[str, Any]) -> bool:
    return resource["kind"] in ("Deployment", "InferenceService") and any(
        SERVER_IMAGE in c.get("image", "") for c in pod_spec(resource)["containers"])


def server_workloads(resources: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in resources if is_server(r)]


def env_values(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


def merged_env(base: dict[str, Any], patch: dict[str, Any] | None) -> dict[str, str]:
    """The server container's plain env after a strategic-merge patch (env entries merge by name)."""
    env = env_values(base)
    if patch is not None:
        for container in patch.get("spec", {}).get("template", {}).get("spec", {}).get("containers", []):
            if container.get("name") == base["name"]:
                env.update(env_values(container))
    return env


def flag(container: dict[str, Any], name: str) -> str:
    argv = [*container.get("command", []), *container.get("args", [])]
    assert name in argv, f"container {container['name']} is not started with {name}: {argv}"
    return argv[argv.index(name) + 1]


def named_port(container: dict[str, Any], port: int | str) -> int:
    """A probe's or Service's port (a number or a port name) as the container's port number."""
    if isinstance(port, int):
        assert port in [p["containerPort"] for p in container["ports"]], f"{port} is not a containerPort"
        return port
    matches = [p["containerPort"] for p in container["ports"] if p.get("name") == port]
    assert matches, f"no containerPort named {port!r} in container {container['name']}"
    return matches[0]


def probes(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {kind: container[kind] for kind in ("startupProbe", "readinessProbe", "livenessProbe") if kind in container}


def pre_stop_seconds(container: dict[str, Any]) -> int:
    pre_stop = container.get("lifecycle", {}).get("preStop")
    assert pre_stop, f"container {container['name']} has no preStop pause"
    if "sleep" in pre_stop:
        return int(pre_stop["sleep"]["seconds"])
    command = pre_stop["exec"]["command"]
    assert command[0] in ("sleep", "/bin/sleep"), f"preStop is not a pause: {command}"
    return int(command[1])


def settings_of(container: dict[str, Any], env: dict[str, str], monkeypatch: pytest.MonkeyPatch,
                tmp_path: Path) -> ServerSettings:
    """The server's settings as this container would load them: config.toml and its SALIENCY_* variables."""
    for name in list(os.environ):
        if name.startswith("SALIENCY_"):
            monkeypatch.delenv(name)
    assert flag(container, "--config") == "/etc/saliency-server/config.toml"
    for name, value in env.items():
        if not name.startswith("SALIENCY_"):
            continue
        assert name[len("SALIENCY_"):].lower() in ServerSettings.model_fields, (
            f"{name} names no server setting (pydantic-settings would silently ignore it)")
        if name == "SALIENCY_API_KEYS_FILE":  # the Secret's file: a stand-in with a valid key
            keys = tmp_path / "keys"
            keys.write_text("# a stand-in for the Secret\n" + "k" * 32 + "\n", encoding="utf-8")
            value = str(keys)
        monkeypatch.setenv(name, value)
    return load_settings(CONFIG_TOML)


# -- custom resources: no schema in kubernetes-validate, a structure check here ---------------------------------------


def validate_kubernetes(resource: dict[str, Any]) -> None:
    """kubernetes-validate, strict, for every version in KUBERNETES_VERSIONS; custom resources get a structure check."""
    for version in KUBERNETES_VERSIONS:
        try:
            kubernetes_validate.validate(resource, version, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            check_custom_resource(resource)
            return
        except kubernetes_validate.ValidationError as error:
            path = ".".join(str(p) for p in error.path)
            pytest.fail(f"{resource['kind']}/{resource['metadata']['name']} is not valid for Kubernetes {version}: "
                        f"{path}: {error.message}")


def require(resource: dict[str, Any], *path: str) -> Any:
    value: Any = resource
    for key in path:
        assert isinstance(value, dict) and key in value, f"{resource['kind']}: {'.'.join(path)} is missing"
        value = value[key]
    return value


def check_metadata(resource: dict[str, Any]) -> None:
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", require(resource, "metadata", "name"))


def check_monitor(resource: dict[str, Any], endpoints_key: str) -> None:
    check_metadata(resource)
    assert require(resource, "spec", "selector", "matchLabels")
    endpoints = require(resource, "spec", endpoints_key)
    assert endpoints
    for endpoint in endpoints:
        assert isinstance(endpoint["port"], str) and endpoint["path"].startswith("/")
        assert re.fullmatch(r"\d+s", endpoint["interval"])


def check_scaled_object(resource: dict[str, Any]) -> None:
    check_metadata(resource)
    assert require(resource, "spec", "scaleTargetRef", "name")
    assert 1 <= resource["spec"]["minReplicaCount"] <= resource["spec"]["maxReplicaCount"]
    triggers = require(resource, "spec", "triggers")
    for trigger in triggers:
        assert trigger["type"] in ("prometheus", "cpu", "memory"), trigger["type"]
        assert trigger["metricType"] in ("AverageValue", "Value", "Utilization")
        # KEDA reads trigger metadata as strings only: a number there is an admission error.
        assert all(isinstance(v, str) for v in trigger["metadata"].values()), trigger["metadata"]
    behavior = resource["spec"].get("advanced", {}).get("horizontalPodAutoscalerConfig", {}).get("behavior")
    if behavior:  # a Kubernetes type: validated inside an HPA
        validate_kubernetes({"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
                             "metadata": {"name": "behavior-check"},
                             "spec": {"scaleTargetRef": {"kind": "Deployment", "name": "x"}, "maxReplicas": 2,
                                      "behavior": behavior}})


# ComponentExtensionSpec (replicas, scaling, pod labels) of a KServe predictor; the rest is an inlined PodSpec.
KSERVE_COMPONENT_FIELDS = {"minReplicas", "maxReplicas", "scaleMetric", "scaleTarget", "labels", "annotations",
                           "containerConcurrency", "timeout", "canaryTrafficPercent", "logger", "batcher"}


def check_inference_service(resource: dict[str, Any]) -> None:
    check_metadata(resource)
    predictor = copy.deepcopy(require(resource, "spec", "predictor"))
    assert predictor["containers"][0]["name"] == "kserve-container", "KServe's custom predictor container name"
    assert predictor.get("scaleMetric", "cpu") in ("cpu", "memory", "concurrency", "rps")
    assert 1 <= predictor.get("minReplicas", 1) <= predictor.get("maxReplicas", 1)
    pod = {key: value for key, value in predictor.items() if key not in KSERVE_COMPONENT_FIELDS}
    validate_kubernetes({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "predictor-check"}, "spec": pod})


CUSTOM_RESOURCES = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): lambda r: check_monitor(r, "endpoints"),
    ("monitoring.coreos.com/v1", "PodMonitor"): lambda r: check_monitor(r, "podMetricsEndpoints"),
    ("keda.sh/v1alpha1", "ScaledObject"): check_scaled_object,
    ("serving.kserve.io/v1beta1", "InferenceService"): check_inference_service,
}


def check_custom_resource(resource: dict[str, Any]) -> None:
    check = CUSTOM_RESOURCES.get((resource["apiVersion"], resource["kind"]))
    assert check is not None, (f"{resource['apiVersion']} {resource['kind']}: neither in kubernetes-validate's "
                               "schemas nor given a structure check in this test")
    check(resource)


# -- kubectl kustomize ------------------------------------------------------------------------------------------------


def kubectl() -> str:
    path = shutil.which("kubectl")
    if path is None:
        pytest.skip("`kubectl` is not installed: `kubectl kustomize` renders the overlays (the per-file checks and "
                    "test_patches_and_components_target_resources_that_exist still run)")
    return path


_rendered: dict[str, list[dict[str, Any]]] = {}


def rendered(variant: str) -> list[dict[str, Any]]:
    if variant not in _rendered:
        result = subprocess.run([kubectl(), "kustomize", str(K8S / variant)], check=False,
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, f"kubectl kustomize {variant} failed:\n{result.stderr}"
        _rendered[variant] = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    return _rendered[variant]


def find(resources: list[dict[str, Any]], kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [r for r in resources if r["kind"] == kind and (name is None or r["metadata"]["name"] == name)]


# -- the live app -----------------------------------------------------------------------------------------------------


def probe_paths() -> set[str]:
    paths = set()
    for path in (BASE_DEPLOYMENT, INFERENCE_SERVICE):
        for probe in probes(server_container(one(path))).values():
            paths.add(probe["httpGet"]["path"])
    return paths


@pytest.fixture(scope="module")
def live() -> dict[str, Any]:
    """The tiny-model app, ready: each probe path's status, and /metrics parsed into families."""

    async def run() -> dict[str, Any]:
        async with running_app(settings_for(tiny_vit_config())) as (client, _):
            statuses = {path: (await client.get(path)).status_code for path in sorted(probe_paths())}
            metrics = (await client.get("/metrics")).text
        return {"statuses": statuses, "families": {f.name: f for f in text_string_to_metric_families(metrics)}}

    return asyncio.run(run())


# -- every manifest is valid ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", resource_files(), ids=rel)
def test_every_resource_file_passes_kubernetes_validate(path: Path) -> None:
    for resource in documents(path):
        validate_kubernetes(resource)


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_rendered_variant_passes_kubernetes_validate(variant: str) -> None:
    resources = rendered(variant)
    assert server_workloads(resources), f"{variant} renders no saliency-server workload"
    for resource in resources:
        validate_kubernetes(resource)


def test_the_validator_rejects_a_misspelt_field() -> None:
    # Strict mode is what catches a typo that Kubernetes would silently drop (a read-only root fs never applied).
    deployment = one(BASE_DEPLOYMENT)
    server_container(deployment)["securityContext"]["readOnlyRootFileSystem"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[0], strict=True)


def test_every_yaml_file_is_a_resource_patch_or_kustomization() -> None:
    # A manifest that no kustomization lists would never be applied, nor validated above.
    known = set(resource_files()) | set(patch_files()) | {ADAPTER_VALUES}
    for directory, kustomization in kustomizations().items():
        known.add(directory / "kustomization.yaml")
        known.update((directory / entry).resolve() for entry in kustomization.get("configurations", []))
    stray = sorted(rel(p) for p in K8S.rglob("*.yaml") if p.resolve() not in known)
    assert not stray, f"YAML files no kustomization uses: {stray}"


def test_patches_and_components_target_resources_that_exist() -> None:
    """Without kustomize: every patch (and every component's patch, wherever the component is used) names a kind
    and name that the kustomization's resources provide, and every listed path exists."""
    all_kustomizations = kustomizations()

    def provided(directory: Path) -> set[tuple[str, str]]:
        kustomization = all_kustomizations[directory]
        out = set()
        for entry in [*kustomization.get("resources", []), *kustomization.get("components", [])]:
            path = (directory / entry).resolve()
            assert path.exists(), f"{rel(directory)}: {entry} does not exist"
            if path.is_dir():
                out |= provided(path)
            else:
                out |= {(doc["kind"], doc["metadata"]["name"]) for doc in documents(path)}
        for generator in kustomization.get("configMapGenerator", []):
            out.add(("ConfigMap", generator["name"]))
            for file in generator.get("files", []):
                assert (directory / file).is_file(), f"{rel(directory)}: {file} does not exist"
        return out

    def patch_targets(directory: Path) -> Iterator[tuple[Path, str, str]]:
        kustomization = all_kustomizations[directory]
        for patch in kustomization.get("patches", []):
            if "target" in patch:
                yield directory, patch["target"]["kind"], patch["target"]["name"]
            else:
                doc = one(directory / patch["path"])
                yield directory, doc["kind"], doc["metadata"]["name"]
        for component in kustomization.get("components", []):
            yield from patch_targets((directory / component).resolve())

    checked = 0
    for directory, kustomization in all_kustomizations.items():
        if kustomization["kind"] == "Component":
            continue  # checked where it is used
        available = provided(directory)
        for source, kind, name in patch_targets(directory):
            assert (kind, name) in available, (f"{rel(source)} patches {kind}/{name}, which {rel(directory)} does "
                                               f"not provide")
            checked += 1
    assert checked >= 6  # the overlays' patches and every component's


# -- the pods ---------------------------------------------------------------------------------------------------------


def workloads_to_check() -> Iterator[tuple[str, dict[str, Any]]]:
    for path in (BASE_DEPLOYMENT, INFERENCE_SERVICE, REDIS):
        for resource in documents(path):
            if resource["kind"] in ("Deployment", "InferenceService"):
                yield f"{rel(path)}: {resource['metadata']['name']}", resource
    if shutil.which("kubectl"):
        for variant in VARIANTS:
            for resource in rendered(variant):
                if resource["kind"] in ("Deployment", "InferenceService"):
                    yield f"{variant} (rendered): {resource['metadata']['name']}", resource


def test_pods_run_as_a_numeric_non_root_user_on_a_read_only_root_filesystem() -> None:
    for where, resource in workloads_to_check():
        spec = pod_spec(resource)
        pod = spec.get("securityContext", {})
        assert pod.get("runAsNonRoot") is True, where
        assert pod.get("seccompProfile", {}).get("type") == "RuntimeDefault", where
        assert spec.get("automountServiceAccountToken") is False, where
        for container in spec["containers"]:
            context = container.get("securityContext", {})
            user = context.get("runAsUser", pod.get("runAsUser"))
            # A named USER cannot be verified by the kubelet: runAsNonRoot needs a number.
            assert isinstance(user, int) and user > 0, f"{where}: runAsUser must be a non-zero number, not {user!r}"
            if SERVER_IMAGE in container["image"]:
                assert user == SERVER_UID, f"{where}: the image's user is uid {SERVER_UID}"
            assert context.get("readOnlyRootFilesystem") is True, where
            assert context.get("allowPrivilegeEscalation") is False, where
            assert context.get("capabilities", {}).get("drop") == ["ALL"], where
            assert container["resources"]["requests"].get("cpu"), f"{where}: no CPU request (HPA utilisation needs it)"
            assert container["resources"]["limits"].get("memory"), where


def test_the_server_writes_only_to_mounted_volumes() -> None:
    # Read-only root: /tmp (uploads spooled, HOME, matplotlib) and the weights cache must be volumes.
    for where, resource in workloads_to_check():
        if not is_server(resource):
            continue
        container = server_container(resource)
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in pod_spec(resource)["volumes"]}
        env = env_values(container)
        for path in ("/tmp", env["HF_HOME"], env["HOME"], env["MPLCONFIGDIR"], env["TORCH_HOME"]):
            mount = next((m for m in mounts if path == m or path.startswith(m.rstrip("/") + "/")), None)
            assert mount is not None, f"{where}: {path} is on the read-only root filesystem"
            volume = volumes[mounts[mount]]
            assert "emptyDir" in volume or "persistentVolumeClaim" in volume, f"{where}: {path} is not writable"
        assert env["HF_HOME"] == "/cache/huggingface", where


def test_termination_grace_covers_pre_stop_drain_and_finish(monkeypatch, tmp_path) -> None:
    for where, resource in workloads_to_check():
        if not is_server(resource):
            continue
        container = server_container(resource)
        drain_s = settings_of(container, env_values(container), monkeypatch, tmp_path).drain_s
        assert drain_s > 0, f"{where}: no drain: connections would be refused during a rollout"
        grace = pod_spec(resource)["terminationGracePeriodSeconds"]
        needed = pre_stop_seconds(container) + drain_s + FINISH_S
        assert grace >= needed, f"{where}: terminationGracePeriodSeconds {grace} < preStop + drain_s + 30 = {needed}"


def test_probes_cover_start_up_readiness_and_liveness() -> None:
    for where, resource in workloads_to_check():
        if not is_server(resource):
            continue
        container = server_container(resource)
        found = probes(container)
        assert set(found) == {"startupProbe", "readinessProbe", "livenessProbe"}, where
        assert found["readinessProbe"]["httpGet"]["path"] == "/readyz", f"{where}: route traffic on warm replicas"
        assert found["livenessProbe"]["httpGet"]["path"] == "/healthz", where
        startup = found["startupProbe"]
        assert startup["httpGet"]["path"] == "/healthz", where
        # Model loading, downloads and warm-up: at least 5 minutes before the liveness probe may restart the pod.
        assert startup["periodSeconds"] * startup["failureThreshold"] >= 300, where


def test_probe_paths_answer_200_on_the_live_app_once_ready(live) -> None:
    assert live["statuses"], "no probe paths found"
    for path, status in live["statuses"].items():
        assert status == 200, f"probe path {path} answered {status} on a ready app"


def test_ports_agree_between_the_server_the_container_its_probes_and_the_service() -> None:
    deployment, service = one(BASE_DEPLOYMENT), one(BASE_SERVICE)
    for resource in (deployment, one(INFERENCE_SERVICE)):
        container = server_container(resource)
        listen = int(flag(container, "--port"))
        assert flag(container, "--host") == "0.0.0.0", "the server must listen beyond loopback in a pod"
        assert [p["containerPort"] for p in container["ports"]] == [listen]
        for kind, probe in probes(container).items():
            assert named_port(container, probe["httpGet"]["port"]) == listen, kind
    (port,) = service["spec"]["ports"]
    assert port["name"] == "http" and port["port"] == 8000
    assert named_port(server_container(deployment), port["targetPort"]) == int(flag(server_container(deployment),
                                                                                      "--port"))
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items(), "the Service selects no server pod"


# -- configuration ----------------------------------------------------------------------------------------------------


def container_envs() -> Iterator[tuple[str, dict[str, Any], dict[str, str]]]:
    """The server container with its plain env: base alone, base with each patch, the KServe predictor."""
    base = server_container(one(BASE_DEPLOYMENT))
    yield rel(BASE_DEPLOYMENT), base, merged_env(base, None)
    for path in patch_files():
        doc = one(path)
        if doc.get("kind") == "Deployment" and doc["metadata"]["name"] == "saliency-server":
            yield rel(path), base, merged_env(base, doc)
    kserve = server_container(one(INFERENCE_SERVICE))
    yield rel(INFERENCE_SERVICE), kserve, env_values(kserve)


def test_the_config_map_toml_loads_with_the_server_settings_loader(monkeypatch, tmp_path) -> None:
    seen = set()
    for where, container, env in container_envs():
        try:
            settings = settings_of(container, env, monkeypatch, tmp_path)
        except Exception as error:  # noqa: BLE001 - the message names the setting
            pytest.fail(f"{rel(CONFIG_TOML)} with the SALIENCY_* variables of {where} does not load: {error}")
        assert settings.models, where
        assert not any(m.fallback == "random" or m.weights == "random" for m in settings.models), (
            f"{where}: production must not serve random weights")
        seen |= {name for name in env if name.startswith("SALIENCY_")}
    # The variables the overlays and components exist to set.
    assert {"SALIENCY_DEVICE", "SALIENCY_JOB_STORE", "SALIENCY_API_KEYS_FILE"} <= seen


def test_the_config_map_is_generated_from_the_toml_and_mounted() -> None:
    (generator,) = one(K8S / "config" / "kustomization.yaml")["configMapGenerator"]
    assert generator["files"] == ["config.toml"]
    for resource in (one(BASE_DEPLOYMENT), one(INFERENCE_SERVICE)):
        container = server_container(resource)
        volumes = {v["name"]: v for v in pod_spec(resource)["volumes"]}
        mount = next(m for m in container["volumeMounts"] if flag(container, "--config").startswith(m["mountPath"]))
        assert volumes[mount["name"]]["configMap"]["name"] == generator["name"]
    # Rendered: the hash-suffixed name reaches the Deployment and the InferenceService (kserve/kustomizeconfig.yaml).
    if shutil.which("kubectl"):
        for variant in VARIANTS:
            resources = rendered(variant)
            (config_map,) = find(resources, "ConfigMap")
            assert config_map["data"]["config.toml"] == CONFIG_TOML.read_text(encoding="utf-8")
            for workload in server_workloads(resources):
                names = [v["configMap"]["name"] for v in pod_spec(workload)["volumes"] if "configMap" in v]
                assert names == [config_map["metadata"]["name"]], variant


def test_the_api_keys_file_comes_from_a_mounted_secret() -> None:
    patch = one(K8S / "components" / "api-keys" / "deployment-api-keys.yaml")
    spec = patch["spec"]["template"]["spec"]
    container = spec["containers"][0]
    path = env_values(container)["SALIENCY_API_KEYS_FILE"]
    mount = next(m for m in container["volumeMounts"] if path.startswith(m["mountPath"].rstrip("/") + "/"))
    assert "subPath" not in mount, "a subPath mount never sees a rotated Secret (the server re-reads the file)"
    volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
    assert volume["secret"]["secretName"]
    assert volume["secret"]["defaultMode"] & 0o040, "the pod's group (fsGroup) must be able to read the keys"


def test_the_job_store_points_at_the_shipped_redis_service() -> None:
    redis = {r["kind"]: r for r in documents(REDIS)}
    service = redis["Service"]
    url = env_values(one(K8S / "components" / "redis" / "deployment-job-store.yaml")
                     ["spec"]["template"]["spec"]["containers"][0])["SALIENCY_JOB_STORE"]
    assert url == env_values(server_container(one(INFERENCE_SERVICE)))["SALIENCY_JOB_STORE"]
    match = re.fullmatch(r"redis://([a-z0-9-]+):(\d+)/\d+", url)
    assert match, url
    assert match[1] == service["metadata"]["name"]
    assert int(match[2]) in [p["port"] for p in service["spec"]["ports"]]
    assert service["spec"]["selector"].items() <= redis["Deployment"]["spec"]["template"]["metadata"]["labels"].items()
    # The NetworkPolicy lets the server pods (Deployment and KServe predictor) in.
    allowed = redis["NetworkPolicy"]["spec"]["ingress"][0]["from"][0]["podSelector"]["matchLabels"]
    assert allowed.items() <= one(BASE_DEPLOYMENT)["spec"]["template"]["metadata"]["labels"].items()
    assert allowed.items() <= one(INFERENCE_SERVICE)["spec"]["predictor"]["labels"].items()


# -- autoscaling ------------------------------------------------------------------------------------------------------


def adapter_rules() -> list[dict[str, Any]]:
    return one(ADAPTER_VALUES)["rules"]["custom"]


def test_the_hpa_reads_a_metric_the_prometheus_adapter_serves_with_cpu_as_fallback() -> None:
    served = {rule["name"]["as"] for rule in adapter_rules()}
    hpas = [one(BASE_HPA), one(K8S / "overlays" / "gpu" / "hpa-gpu.yaml")]
    for hpa in hpas:
        kinds = {m["type"]: m for m in hpa["spec"]["metrics"]}
        assert set(kinds) == {"Pods", "Resource"}, "a per-pod custom metric plus CPU as the fallback"
        assert kinds["Pods"]["pods"]["metric"]["name"] in served
        assert kinds["Resource"]["resource"]["name"] == "cpu"
        assert float(kinds["Pods"]["pods"]["target"]["averageValue"]) > 0
        assert hpa["spec"].get("minReplicas", 1) >= 2, "one replica: a rollout or node drain empties the Service"
    assert one(BASE_HPA)["spec"]["scaleTargetRef"]["name"] == one(BASE_DEPLOYMENT)["metadata"]["name"]


def test_the_prometheus_adapter_rules_select_gauges_the_live_app_exports(live) -> None:
    families = live["families"]
    for rule in adapter_rules():
        (series,) = set(METRIC.findall(rule["seriesQuery"]))
        assert re.fullmatch(rule["name"]["matches"], series), rule["name"]
        assert series in families, f"{series} (prometheus-adapter) is not exported by /metrics"
        # avg_over_time of a counter would be meaningless: the rules average gauges.
        assert families[series].type == "gauge", series
        assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}, "a per-pod metric for a Pods HPA"
        for label in re.findall(r"[,{]\s*([a-z_]+)\s*!?=", rule["metricsQuery"]):
            assert all(label in s.labels for s in families[series].samples), f"{series} has no label {label}"


def test_the_keda_query_reads_a_gauge_the_live_app_exports(live) -> None:
    families = live["families"]
    scaled_object = one(SCALED_OBJECT)
    (prometheus,) = [t for t in scaled_object["spec"]["triggers"] if t["type"] == "prometheus"]
    assert [t["type"] for t in scaled_object["spec"]["triggers"]].count("cpu") == 1, "CPU as the fallback"
    query = prometheus["metadata"]["query"]
    names = set(METRIC.findall(query))
    assert names, query
    for name in names:
        assert name in families and families[name].type == "gauge", f"{name} (KEDA query) is not an exported gauge"
        for label in re.findall(r"[,{]\s*([a-z_]+)\s*!?=\s*\"", query):
            if label != "service":  # added by Prometheus from the ServiceMonitor, not by the app
                assert all(label in s.labels for s in families[name].samples), f"{name} has no label {label}"
    assert prometheus["metricType"] == "AverageValue", "the threshold is per replica"
    # The same per-replica target as the HPA it replaces.
    hpa_target = next(m for m in one(BASE_HPA)["spec"]["metrics"] if m["type"] == "Pods")["pods"]["target"]
    assert float(prometheus["metadata"]["threshold"]) == float(hpa_target["averageValue"])
    assert scaled_object["spec"]["scaleTargetRef"]["name"] == one(BASE_DEPLOYMENT)["metadata"]["name"]


def test_each_rendered_deployment_has_exactly_one_autoscaler() -> None:
    # KEDA creates its own HPA: the keda component must remove base's, or the two would fight.
    for variant in ("overlays/cpu", "overlays/gpu", "examples/production"):
        resources = rendered(variant)
        hpas, scaled_objects = find(resources, "HorizontalPodAutoscaler"), find(resources, "ScaledObject")
        assert len(hpas) + len(scaled_objects) == 1, f"{variant}: {len(hpas)} HPAs, {len(scaled_objects)} KEDA"
        (autoscaler,) = hpas + scaled_objects
        assert autoscaler["spec"]["scaleTargetRef"]["name"] == "saliency-server"
        (deployment,) = find(resources, "Deployment", "saliency-server")
        assert "replicas" not in deployment["spec"], f"{variant}: a fixed replica count fights the autoscaler"


def test_the_pod_disruption_budget_and_monitor_select_the_server_pods() -> None:
    labels = one(BASE_DEPLOYMENT)["spec"]["template"]["metadata"]["labels"]
    pdb = one(K8S / "base" / "pdb.yaml")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["spec"].get("maxUnavailable") == 1 or pdb["spec"].get("minAvailable") == 1
    monitor = one(K8S / "base" / "servicemonitor.yaml")
    service = one(BASE_SERVICE)
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == [p["name"] for p in service["spec"]["ports"]]
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"


# -- overlays ---------------------------------------------------------------------------------------------------------


def rendered_server(variant: str) -> tuple[dict[str, Any], dict[str, Any], dict[str, str]]:
    (workload,) = server_workloads(rendered(variant))
    container = server_container(workload)
    return workload, container, env_values(container)


@pytest.mark.parametrize("variant", ("overlays/gpu", "kserve", "examples/production"))
def test_gpu_variants_take_one_gpu_with_the_cuda_image_and_device(variant: str) -> None:
    workload, container, env = rendered_server(variant)
    assert container["image"].endswith(":0.1.0-cuda")
    assert env["SALIENCY_DEVICE"] == "cuda"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1, "one replica per GPU"
    spec = pod_spec(workload)
    assert spec["nodeSelector"] and any(t["key"] == "nvidia.com/gpu" for t in spec["tolerations"])


def test_the_cpu_overlay_uses_the_cpu_image_and_device_without_a_gpu() -> None:
    workload, container, env = rendered_server("overlays/cpu")
    assert container["image"].endswith(":0.1.0-cpu")
    assert env["SALIENCY_DEVICE"] == "cpu"
    resources = container["resources"]
    assert "nvidia.com/gpu" not in resources["limits"] and "nodeSelector" not in pod_spec(workload)
    assert resources["requests"]["cpu"] == resources["limits"]["cpu"], "the batch timings assume the cores"
    assert int(env["SALIENCY_CPU_WORKERS"]) <= int(resources["limits"]["cpu"])


@pytest.mark.parametrize("variant", ("overlays/cpu", "overlays/gpu", "kserve"))
def test_multi_replica_variants_share_jobs_through_the_redis_job_store(variant: str) -> None:
    resources = rendered(variant)
    _, _, env = rendered_server(variant)
    assert env["SALIENCY_JOB_STORE"].startswith("redis://saliency-redis:")
    assert find(resources, "Deployment", "saliency-redis") and find(resources, "Service", "saliency-redis")


def test_the_readme_deploy_commands_name_existing_kustomizations() -> None:
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## Scaling out"):text.index("## Repository layout")]
    commands = re.findall(r"kubectl apply -k (\S+)", section)
    assert {"deploy/kubernetes/overlays/cpu", "deploy/kubernetes/overlays/gpu", "deploy/kubernetes/kserve"} <= set(
        commands)
    for path in commands:
        assert (ROOT / path / "kustomization.yaml").is_file(), path
