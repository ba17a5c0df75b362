"""kubernetes/: it renders with `kubectl kustomize`, every object validates against its schema, and the objects
are wired to the code they run: real CLI commands, real routes, RQ's own queue key, one credentials Secret and
one store volume at CACHE_DIR for API and workers, a grace period that covers JOB_TIMEOUT. All offline."""

from __future__ import annotations

import secrets
import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from redis import Redis
from rq import Queue

from docker_http_passthrough.api.app import create_app
from docker_http_passthrough.cli import build_parser
from docker_http_passthrough.shared.metrics import JOBS_IN_FLIGHT
from docker_http_passthrough.shared.settings import load_settings
from tests.support import keda_schema
from tests.support.services import REPO_ROOT, child_env, require

pytestmark = pytest.mark.deploy

K8S_VERSION = kubernetes_validate.latest_version()
VARIANTS = {"keda": ".", "hpa": "overlays/hpa"}


def kustomize(directory: Path) -> subprocess.CompletedProcess[str]:
    kubectl = shutil.which("kubectl")
    require(kubectl is not None, "kubectl is not installed (it renders the kustomize base)")
    return subprocess.run([kubectl, "kustomize", str(directory)], capture_output=True, text=True, timeout=60,
                          env=child_env())


@pytest.fixture(scope="module")
def manifests(tmp_path_factory) -> Path:
    """A copy of kubernetes/ with the credentials key file an operator creates first."""
    copy = tmp_path_factory.mktemp("k8s") / "kubernetes"
    shutil.copytree(REPO_ROOT / "kubernetes", copy, ignore=shutil.ignore_patterns("credentials-key.env"))
    (copy / "base" / "credentials-key.env").write_text(f"CREDENTIALS_KEY={secrets.token_urlsafe(32)}\n")
    return copy


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def rendered(request, manifests) -> list[dict]:
    result = kustomize(manifests / VARIANTS[request.param])
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def the(objects: list[dict], kind: str, component: str | None = None) -> dict:
    found = [o for o in objects if o["kind"] == kind and (
        component is None or o["metadata"].get("labels", {}).get("app.kubernetes.io/component") == component)]
    assert len(found) == 1, f"{len(found)} {kind} objects for {component}"
    return found[0]


def container(deployment: dict) -> dict:
    (only,) = deployment["spec"]["template"]["spec"]["containers"]
    return only


def settings_of(objects: list[dict]) -> dict[str, str]:
    return the(objects, "ConfigMap")["data"]


def test_render_without_the_key_file_names_it(tmp_path):
    copy = tmp_path / "kubernetes"
    shutil.copytree(REPO_ROOT / "kubernetes", copy, ignore=shutil.ignore_patterns("credentials-key.env"))
    result = kustomize(copy)
    assert result.returncode != 0 and "credentials-key.env" in result.stderr
    kustomization = yaml.safe_load((REPO_ROOT / "kubernetes/base/kustomization.yaml").read_text())
    (generator,) = kustomization["secretGenerator"]
    assert generator["envs"] == ["credentials-key.env"] and "literals" not in generator  # no committed value
    ignored = subprocess.run(["git", "check-ignore", "-q", "kubernetes/base/credentials-key.env"], cwd=REPO_ROOT)
    assert ignored.returncode == 0, "the operator's key file must be git-ignored"


def test_every_object_validates_against_its_schema(rendered):
    kinds = {o["kind"] for o in rendered}
    assert {"Namespace", "ConfigMap", "Secret", "Service", "Deployment", "StatefulSet", "PersistentVolumeClaim",
            "PodDisruptionBudget", "NetworkPolicy"} <= kinds
    assert kinds & {"ScaledObject", "HorizontalPodAutoscaler"}
    keda = [o for o in rendered if o["apiVersion"].startswith("keda.sh/")]
    for obj in rendered:
        if obj not in keda:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    if keda:
        require(keda_schema.available() is None, f"KEDA schema: {keda_schema.available()}")
        assert keda_schema.validation_errors(keda) == []


def test_keda_schema_check_can_fail(manifests):
    """The KEDA validator rejects what KEDA would: a wrongly typed field in our own ScaledObject."""
    keda = [o for o in yaml.safe_load_all(kustomize(manifests).stdout) if o and o["kind"] == "ScaledObject"]
    require(keda_schema.available() is None, f"KEDA schema: {keda_schema.available()}")
    broken = yaml.safe_load(yaml.safe_dump(keda[0]))
    broken["spec"]["triggers"][0]["metadata"]["listLength"] = 1  # KEDA wants strings in trigger metadata
    assert keda_schema.validation_errors([broken]) != []


def test_container_commands_are_real_cli_commands(rendered):
    parser = build_parser()
    for deployment in (the(rendered, "Deployment", "api"), the(rendered, "Deployment", "worker")):
        spec = container(deployment)
        commands = [spec["command"]]
        for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
            if "exec" in spec.get(probe, {}):
                commands.append(spec[probe]["exec"]["command"])
        for command in commands:
            assert command[0] == "docker-http-passthrough", command
            parser.parse_args(command[1:])  # exits (fails the test) on anything the CLI does not know
    assert container(the(rendered, "Deployment", "api"))["command"][1] == "serve"
    worker = container(the(rendered, "Deployment", "worker"))
    assert worker["command"][1] == "worker"
    name_file = parser.parse_args(worker["command"][1:]).name_file
    assert parser.parse_args(worker["livenessProbe"]["exec"]["command"][1:]).name_file == name_file
    mounts = {m["mountPath"] for m in worker["volumeMounts"]}
    assert str(Path(name_file).parent) in mounts  # written to the writable emptyDir


def test_probe_paths_are_routes_and_ports_are_declared(rendered):
    routes = {route.path for route in create_app(load_settings({})).routes}
    api = container(the(rendered, "Deployment", "api"))
    ports = {p["name"]: p["containerPort"] for p in api["ports"]}
    for probe in ("readinessProbe", "livenessProbe"):
        assert api[probe]["httpGet"]["path"] == "/health" and "/health" in routes
        assert api[probe]["httpGet"]["port"] in ports
    assert api["command"][api["command"].index("--port") + 1] == str(ports["http"])
    service = the(rendered, "Service", "api")
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    pod_labels = the(rendered, "Deployment", "api")["spec"]["template"]["metadata"]["labels"]
    for selector in (service["spec"]["selector"], the(rendered, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"]):
        assert selector.items() <= pod_labels.items()
    assert the(rendered, "Deployment", "api")["spec"]["replicas"] >= 2


def test_prometheus_scrape_annotations_match_the_metrics_ports(rendered):
    routes = {route.path for route in create_app(load_settings({})).routes}
    settings = settings_of(rendered)
    for component, port in (("api", "8080"), ("worker", settings["WORKER_METRICS_PORT"])):
        template = the(rendered, "Deployment", component)["spec"]["template"]
        annotations = template["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/port"] == port
        assert annotations["prometheus.io/path"] == "/metrics" and "/metrics" in routes
        assert int(port) in {p["containerPort"] for p in container({"spec": {"template": template}})["ports"]}
    assert "OTEL_EXPORTER_OTLP_ENDPOINT" in settings and "OTEL_SERVICE_NAME" in settings


def test_autoscaler_watches_rqs_own_queue_key_and_the_worker_deployment(rendered):
    settings = settings_of(rendered)
    worker = the(rendered, "Deployment", "worker")
    scaled = [o for o in rendered if o["kind"] == "ScaledObject"]
    if scaled:
        (trigger,) = scaled[0]["spec"]["triggers"]
        assert trigger["type"] == "redis"
        assert trigger["metadata"]["listName"] == Queue(settings["QUEUE_NAME"], connection=Redis()).key
        redis_service = the(rendered, "Service", "redis")
        host, port = trigger["metadata"]["address"].rsplit(":", 1)
        assert host.split(".")[:2] == [redis_service["metadata"]["name"], redis_service["metadata"]["namespace"]]
        assert int(port) == redis_service["spec"]["ports"][0]["port"]
        assert settings["REDIS_URL"] == f"redis://{redis_service['metadata']['name']}:{port}/{trigger['metadata']['databaseIndex']}"
        assert scaled[0]["spec"]["scaleTargetRef"]["name"] == worker["metadata"]["name"]
        assert scaled[0]["spec"]["minReplicaCount"] == 1 < scaled[0]["spec"]["maxReplicaCount"]
    else:
        hpa = the(rendered, "HorizontalPodAutoscaler")
        assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                                 "name": worker["metadata"]["name"]}
        assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == JOBS_IN_FLIGHT._name
    assert "replicas" not in worker["spec"]  # the autoscaler owns it


def test_worker_grace_period_covers_job_timeout(rendered):
    job_timeout = load_settings(settings_of(rendered)).job_timeout
    worker = the(rendered, "Deployment", "worker")["spec"]["template"]["spec"]
    assert worker["terminationGracePeriodSeconds"] >= job_timeout


def test_api_and_workers_share_the_credentials_secret_and_the_store_at_cache_dir(rendered):
    settings = settings_of(rendered)
    secret = the(rendered, "Secret")
    assert set(secret["data"]) == {"CREDENTIALS_KEY"}
    claim = the(rendered, "PersistentVolumeClaim")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    for component in ("api", "worker"):
        deployment = the(rendered, "Deployment", component)
        spec = container(deployment)
        (key_env,) = [e for e in spec["env"] if e["name"] == "CREDENTIALS_KEY"]
        assert key_env["valueFrom"]["secretKeyRef"] == {"name": secret["metadata"]["name"], "key": "CREDENTIALS_KEY"}
        assert spec["envFrom"] == [{"configMapRef": {"name": the(rendered, "ConfigMap")["metadata"]["name"]}}]
        volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
        (store_mount,) = [m for m in spec["volumeMounts"] if
                          volumes[m["name"]].get("persistentVolumeClaim", {}).get("claimName") == claim["metadata"]["name"]]
        assert store_mount["mountPath"] == settings["CACHE_DIR"]


def test_every_pod_is_restricted_with_a_writable_tmp(rendered):
    for obj in rendered:
        if obj["kind"] not in ("Deployment", "StatefulSet"):
            continue
        pod = obj["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        assert pod["automountServiceAccountToken"] is False
        for spec in pod["containers"]:
            context = spec["securityContext"]
            assert context == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                               "capabilities": {"drop": ["ALL"]}}, obj["metadata"]["name"]
            assert spec["resources"]["requests"] and spec["resources"]["limits"]["memory"]
        if obj["kind"] == "Deployment":
            volumes = {v["name"]: v for v in pod["volumes"]}
            (tmp,) = [m for m in pod["containers"][0]["volumeMounts"] if m["mountPath"] == "/tmp"]
            assert volumes[tmp["name"]] == {"name": tmp["name"], "emptyDir": {}}
    namespace = the(rendered, "Namespace")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
