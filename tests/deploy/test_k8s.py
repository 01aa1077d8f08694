"""deploy/k8s: every manifest validates against the Kubernetes API schemas (strict, as
kubernetes-validate ships them), and the manifests agree with the app, the settings,
the images and each other."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.deploy.deploy_assets import (
    ADAPTER_VALUES,
    DEPLOY,
    K8S_DIR,
    adapter_rules,
    adapter_series_name,
    app_paths,
    compose_service,
    dockerfile_instructions,
    exposed_metric_names,
    k8s_manifests,
    k8s_object,
    load_yaml,
    load_yaml_docs,
    settings_env_names,
    settings_from_env,
)

KUBERNETES_VERSION = "1.30.0"
# Objects of API groups that come from add-ons, not from Kubernetes itself.
ADDON_GROUPS = ("kustomize.config.k8s.io/", "monitoring.coreos.com/")
CORE = [
    (name, doc) for name, doc in k8s_manifests() if not doc["apiVersion"].startswith(ADDON_GROUPS)
]


def kubernetes_validate() -> Any:
    try:
        import kubernetes_validate  # type: ignore[import-untyped]  # ships no type information
    except ImportError:
        pytest.fail(
            "kubernetes-validate is not installed: it belongs in the dev extra of pyproject.toml"
        )
    return kubernetes_validate


def config() -> dict[str, str]:
    data: dict[str, str] = k8s_object("ConfigMap", "simmer-config")["data"]
    return data


def pod_spec(kind: str, name: str) -> dict[str, Any]:
    spec: dict[str, Any] = k8s_object(kind, name)["spec"]["template"]["spec"]
    return spec


def container(kind: str, name: str) -> dict[str, Any]:
    (only,) = pod_spec(kind, name)["containers"]
    result: dict[str, Any] = only
    return result


def pod_labels(kind: str, name: str) -> dict[str, str]:
    labels: dict[str, str] = k8s_object(kind, name)["spec"]["template"]["metadata"]["labels"]
    return labels


def dockerfile_uid(name: str) -> int:
    users = [args for keyword, args in dockerfile_instructions(DEPLOY / name) if keyword == "USER"]
    return int(users[-1].split(":")[0])


@pytest.mark.parametrize(
    ("name", "doc"),
    CORE,
    ids=[f"{name}:{doc['kind']}/{doc['metadata']['name']}" for name, doc in CORE],
)
def test_manifest_validates_against_the_kubernetes_schema(name: str, doc: dict[str, Any]) -> None:
    validator = kubernetes_validate()
    try:
        validator.validate(doc, KUBERNETES_VERSION, strict=True)
    except validator.ValidationError as exc:
        pytest.fail(f"{name}: {exc.message} at {'/'.join(map(str, exc.path))}")


def test_kustomization_lists_every_core_manifest() -> None:
    kustomization = load_yaml(K8S_DIR / "kustomization.yaml")
    assert sorted(kustomization["resources"]) == sorted({name for name, _ in CORE})


def test_probes_ask_routes_the_app_serves_on_the_container_port() -> None:
    server = container("Deployment", "simmer")
    ports = {p["name"]: p["containerPort"] for p in server["ports"]}
    probes = {
        kind: server[kind]["httpGet"]
        for kind in ("startupProbe", "livenessProbe", "readinessProbe")
    }
    assert probes["livenessProbe"]["path"] == "/healthz"
    assert probes["readinessProbe"]["path"] == "/readyz"
    for probe in probes.values():
        assert probe["path"] in app_paths()
        assert ports[probe["port"]] == int(config()["SIMMER_PORT"])


def test_configmap_holds_valid_settings_for_redis_sessions() -> None:
    env = config()
    assert set(env) <= settings_env_names(), set(env) - settings_env_names()
    settings = settings_from_env(env)
    assert settings.store == "redis"
    url = urlsplit(settings.redis_url)
    redis_service = k8s_object("Service", "simmer-redis")
    assert url.hostname == redis_service["metadata"]["name"]
    assert url.port in {p["port"] for p in redis_service["spec"]["ports"]}
    assert settings.host == "0.0.0.0"
    assert container("Deployment", "simmer")["envFrom"] == [
        {"configMapRef": {"name": "simmer-config"}}
    ]


def test_the_redis_cluster_component_switches_sessions_to_the_charts_cluster() -> None:
    component_dir = K8S_DIR / "redis-cluster"
    component = load_yaml(component_dir / "kustomization.yaml")
    assert component["kind"] == "Component"
    # offered, commented out, in the base kustomization
    assert "#   - redis-cluster" in (K8S_DIR / "kustomization.yaml").read_text()
    patches = [
        doc
        for entry in component["patches"]
        for doc in load_yaml_docs(component_dir / entry["path"])
    ]
    (config_patch,) = [doc for doc in patches if doc["kind"] == "ConfigMap"]
    assert config_patch["metadata"]["name"] == "simmer-config"
    settings = settings_from_env({**config(), **config_patch["data"]})
    assert settings.store == "redis" and settings.redis_cluster is True
    # the seed is the chart release's Service, on the port the chart serves
    values = load_yaml(component_dir / "values.yaml")
    assert urlsplit(settings.redis_url).hostname == "simmer-redis-cluster"
    assert urlsplit(settings.redis_url).port == 6379
    assert values["cluster"] == {"nodes": 6, "replicas": 1}
    assert "cluster-require-full-coverage no" in values["redis"]["configmap"]
    # the single Redis it replaces is removed, and it exists to be removed
    deleted = {(doc["kind"], doc["metadata"]["name"]) for doc in patches if doc.get("$patch")}
    assert deleted == {("StatefulSet", "simmer-redis"), ("Service", "simmer-redis")}
    for kind, name in deleted:
        k8s_object(kind, name)


def test_services_and_budget_select_the_pods_they_front() -> None:
    simmer = k8s_object("Service", "simmer")["spec"]
    assert simmer["selector"].items() <= pod_labels("Deployment", "simmer").items()
    assert simmer["ports"][0]["targetPort"] in {
        p["name"] for p in container("Deployment", "simmer")["ports"]
    }
    assert simmer.get("sessionAffinity", "None") == "None"
    redis = k8s_object("Service", "simmer-redis")["spec"]
    assert redis["selector"].items() <= pod_labels("StatefulSet", "simmer-redis").items()
    budget = k8s_object("PodDisruptionBudget", "simmer")["spec"]
    assert budget["selector"]["matchLabels"].items() <= pod_labels("Deployment", "simmer").items()
    deployment = k8s_object("Deployment", "simmer")["spec"]
    assert (
        deployment["selector"]["matchLabels"].items() <= pod_labels("Deployment", "simmer").items()
    )


@pytest.mark.parametrize(
    ("kind", "name", "dockerfile"),
    [
        ("Deployment", "simmer", "Dockerfile.serve"),
        ("Job", "simmer-train", "Dockerfile.train"),
        ("StatefulSet", "simmer-redis", None),
    ],
)
def test_pods_run_as_non_root_with_requests_and_limits(
    kind: str, name: str, dockerfile: str | None
) -> None:
    pod = pod_spec(kind, name)["securityContext"]
    assert pod["runAsNonRoot"] is True and pod["runAsUser"] != 0
    if dockerfile is not None:
        assert pod["runAsUser"] == dockerfile_uid(dockerfile), "the image's own user"
    for each in pod_spec(kind, name)["containers"]:
        assert each["securityContext"]["allowPrivilegeEscalation"] is False
        assert each["securityContext"]["capabilities"]["drop"] == ["ALL"]
        for section in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(each["resources"][section]), f"{name}: {section}"


def test_onnxruntime_threads_fit_the_cpu_limit() -> None:
    limit = container("Deployment", "simmer")["resources"]["limits"]["cpu"]
    cpus = int(limit[:-1]) / 1000 if limit.endswith("m") else float(limit)
    threads = settings_from_env(config()).intra_op_threads
    assert 1 <= threads <= cpus


def test_images_are_the_ones_compose_builds() -> None:
    assert container("Deployment", "simmer")["image"] == compose_service("simmer")["image"]
    assert container("Job", "simmer-train")["image"] == compose_service("trainer")["image"]


def test_server_and_trainer_share_the_bundle_volume_where_settings_look() -> None:
    server = container("Deployment", "simmer")
    (bundle_mount,) = [m for m in server["volumeMounts"] if m["name"] == "bundle"]
    assert bundle_mount["readOnly"] is True
    assert config()["SIMMER_BUNDLE"].startswith(bundle_mount["mountPath"] + "/")
    claims = {
        v["name"]: v["persistentVolumeClaim"]["claimName"]
        for v in pod_spec("Deployment", "simmer")["volumes"]
        if "persistentVolumeClaim" in v
    }
    trainer = container("Job", "simmer-train")
    (train_mount,) = [m for m in trainer["volumeMounts"] if m["name"] == "bundle"]
    train_claims = {
        v["name"]: v["persistentVolumeClaim"]["claimName"]
        for v in pod_spec("Job", "simmer-train")["volumes"]
        if "persistentVolumeClaim" in v
    }
    assert (
        claims["bundle"]
        == train_claims["bundle"]
        == k8s_object("PersistentVolumeClaim", "simmer-bundle")["metadata"]["name"]
    )
    trainer_env = {e["name"]: e["value"] for e in trainer["env"]}
    assert trainer_env["BUNDLE"].removeprefix(train_mount["mountPath"]) == config()[
        "SIMMER_BUNDLE"
    ].removeprefix(bundle_mount["mountPath"])


def test_readonly_root_filesystem_leaves_tmp_writable() -> None:
    server = container("Deployment", "simmer")
    assert server["securityContext"]["readOnlyRootFilesystem"] is True
    assert "/tmp" in {m["mountPath"] for m in server["volumeMounts"] if not m.get("readOnly")}


def test_hpa_scales_the_deployment_on_metrics_the_adapter_serves() -> None:
    hpa = k8s_object("HorizontalPodAutoscaler", "simmer")["spec"]
    assert hpa["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "simmer",
    }
    served = {rule["name"]["as"] for rule in adapter_rules()}
    targets = {m["pods"]["metric"]["name"]: m["pods"]["target"] for m in hpa["metrics"]}
    assert set(targets) <= served, f"{ADAPTER_VALUES.name} serves {served}"
    assert (
        float(targets["simmer_num_requests_running"]["averageValue"])
        < settings_from_env(config()).max_batch
    )
    budget = k8s_object("PodDisruptionBudget", "simmer")["spec"]
    assert hpa["minReplicas"] > budget["minAvailable"], "a drain must be able to evict a pod"


def test_adapter_rules_read_metrics_the_service_exposes() -> None:
    for rule in adapter_rules():
        assert adapter_series_name(rule) in exposed_metric_names(), rule["seriesQuery"]
        assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}
        for placeholder in ("<<.Series>>", "<<.LabelMatchers>>", "<<.GroupBy>>"):
            assert placeholder in rule["metricsQuery"], rule["name"]["as"]


def test_pod_monitor_scrapes_the_http_port_as_job_simmer() -> None:
    monitor = k8s_object("PodMonitor", "simmer")["spec"]
    labels = pod_labels("Deployment", "simmer")
    assert monitor["selector"]["matchLabels"].items() <= labels.items()
    assert labels[monitor["jobLabel"]] == "simmer"
    (endpoint,) = monitor["podMetricsEndpoints"]
    assert endpoint["port"] in {p["name"] for p in container("Deployment", "simmer")["ports"]}
    assert endpoint["path"] in app_paths()
    annotations = k8s_object("Deployment", "simmer")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/path"] == endpoint["path"]
    assert annotations["prometheus.io/port"] == config()["SIMMER_PORT"]
