"""The Kubernetes manifests of deploy/kubernetes: every object validates against the Kubernetes API's schemas (strict:
an unknown or misspelt field fails), and what deploy/kubernetes/README.md promises holds in them, read from the
manifests themselves. Offline: kubernetes-validate carries its schemas."""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import all_versions

DEPLOY = Path(__file__).resolve().parent.parent / "deploy" / "kubernetes"
KUSTOMIZATION = DEPLOY / "kustomization.yaml"

KUBERNETES_VERSION = "1.30.0"
"""The Kubernetes release whose API the manifests are validated against (a schema kubernetes-validate bundles)."""

Doc = dict[str, Any]


def manifest_files() -> list[Path]:
    return sorted(p for p in DEPLOY.glob("*.yaml") if p != KUSTOMIZATION) + sorted(DEPLOY.glob("*.yml"))


def load(path: Path) -> list[Doc]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def objects() -> list[Doc]:
    return [doc for path in manifest_files() for doc in load(path)]


def find(kind: str, name: str) -> Doc:
    found = [doc for doc in objects() if doc["kind"] == kind and doc["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name} under {DEPLOY}, found {len(found)}"
    return found[0]


def validate(doc: Doc) -> None:
    kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_schemas_of_the_version_are_bundled():
    assert KUBERNETES_VERSION in all_versions(), f"kubernetes-validate has {sorted(set(all_versions()))}"


def test_there_are_manifests():
    assert {p.name for p in manifest_files()} >= {"nats.yaml", "vigild.yaml"}


@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: p.name)
def test_manifests_validate_strictly(path: Path):
    docs = load(path)
    assert docs, f"{path.name} has no objects"
    for doc in docs:
        where = f"{path.name}: {doc.get('kind')} {doc.get('metadata', {}).get('name')}"
        try:
            validate(doc)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{where}: {'.'.join(map(str, e.path))}: {e.message}")
        except kubernetes_validate.SchemaNotFoundError as e:
            pytest.fail(f"{where}: {e.message}")  # an apiVersion that Kubernetes 1.30 does not serve


QUANTITY = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)(Ki|Mi|Gi|Ti|Pi|Ei|m|k|M|G|T|P|E|[eE][+-]?\d+)?$")
"""A resource quantity as the API server parses it (the schemas only say `string or number`: "8 GB" passes them)."""


def quantities(node: Any, path: str = "") -> list[tuple[str, Any]]:
    """Every (path, value) under a `requests`, `limits` or `capacity` map, and every `sizeLimit`."""
    found: list[tuple[str, Any]] = []
    if isinstance(node, dict):
        for key, value in node.items():
            here = f"{path}.{key}" if path else key
            if key in ("requests", "limits", "capacity") and isinstance(value, dict):
                found += [(f"{here}.{name}", amount) for name, amount in value.items()]
            elif key == "sizeLimit":
                found.append((here, value))
            else:
                found += quantities(value, here)
    elif isinstance(node, list):
        for i, item in enumerate(node):
            found += quantities(item, f"{path}[{i}]")
    return found


def test_resource_quantities_parse():
    seen = []
    for doc in objects():
        for path, amount in quantities(doc):
            seen.append(path)
            assert QUANTITY.match(str(amount)), f"{doc['kind']} {doc['metadata']['name']}: {path}: {amount!r}"
    assert any(path.endswith("nvidia.com/gpu") for path in seen)


def test_the_validation_can_fail():
    """A misspelt field and a wrong type are refused: the validation above is not passing everything."""
    deployment = find("Deployment", "vigild")
    validate(deployment)

    unknown = copy.deepcopy(deployment)
    unknown["spec"]["replicaz"] = unknown["spec"].pop("replicas")
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(unknown)

    wrong_type = copy.deepcopy(deployment)
    wrong_type["spec"]["replicas"] = "three"
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(wrong_type)

    misplaced = copy.deepcopy(deployment)
    misplaced["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["exec"]["cmd"] = ["true"]
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(misplaced)


def test_kustomization_lists_every_manifest():
    kustomization = yaml.safe_load(KUSTOMIZATION.read_text())
    assert kustomization["kind"] == "Kustomization"
    resources = kustomization["resources"]
    assert sorted(resources) == sorted(p.name for p in manifest_files())
    assert len(resources) == len(set(resources))


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kustomize_builds():
    """`kubectl apply -k deploy/kubernetes` would send these objects (kustomize runs offline, in kubectl)."""
    built = subprocess.run(
        ["kubectl", "kustomize", str(DEPLOY)], capture_output=True, text=True, timeout=60, check=False
    )
    assert built.returncode == 0, built.stderr
    names = sorted((d["kind"], d["metadata"]["name"]) for d in yaml.safe_load_all(built.stdout) if d)
    assert names == sorted((d["kind"], d["metadata"]["name"]) for d in objects())


# NATS


def nats_conf() -> str:
    return find("ConfigMap", "nats-config")["data"]["nats-server.conf"]


def block(conf: str, name: str) -> str:
    """The body of the top-level `name { ... }` block of a nats-server.conf (no nested braces in ours)."""
    found = re.search(rf"^{name}\s*\{{(.*?)^\}}", conf, re.MULTILINE | re.DOTALL)
    assert found, f"nats-server.conf has no {name} block"
    return found.group(1)


def test_nats_statefulset():
    statefulset = find("StatefulSet", "nats")
    spec = statefulset["spec"]
    assert spec["replicas"] == 3
    headless = find("Service", "nats-headless")
    assert spec["serviceName"] == "nats-headless"
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["publishNotReadyAddresses"] is True

    pod = spec["template"]["spec"]
    (container,) = pod["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert env["SERVER_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"client": 4222, "cluster": 6222, "monitor": 8222}
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"]["path"] == "/healthz"
        assert container[probe]["httpGet"]["port"] in ("monitor", 8222)

    (claim,) = spec["volumeClaimTemplates"]
    assert claim["spec"]["resources"]["requests"]["storage"] == "10Gi"
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts[claim["metadata"]["name"]] == "/data"

    client = find("Service", "nats")
    assert [p["port"] for p in client["spec"]["ports"]] == [4222]
    assert find("PodDisruptionBudget", "nats")["spec"]["maxUnavailable"] == 1


def test_nats_config_enables_jetstream_with_a_route_to_every_pod():
    conf = nats_conf()
    assert re.search(r"^server_name:\s*\$SERVER_NAME\s*$", conf, re.MULTILINE)
    assert re.search(r"^listen:\s*0\.0\.0\.0:4222\s*$", conf, re.MULTILINE)
    assert re.search(r"^http:\s*0\.0\.0\.0:8222\s*$", conf, re.MULTILINE)
    jetstream = block(conf, "jetstream")
    assert re.search(r"^\s*store_dir:\s*/data/jetstream\s*$", jetstream, re.MULTILINE)

    cluster = block(conf, "cluster")
    assert re.search(r"^\s*listen:\s*0\.0\.0\.0:6222\s*$", cluster, re.MULTILINE)
    routes = re.findall(r"nats://([\w.-]+):(\d+)", cluster)
    replicas = find("StatefulSet", "nats")["spec"]["replicas"]
    assert sorted(routes) == [(f"nats-{i}.nats-headless", "6222") for i in range(replicas)]
    assert len(routes) == 3


@pytest.mark.skipif(shutil.which("nats-server") is None, reason="nats-server is not installed")
def test_nats_server_accepts_the_config(tmp_path: Path):
    """nats-server's own check of the config (`-t`: parse and verify, start nothing), with the pod's environment."""
    conf = tmp_path / "nats-server.conf"
    conf.write_text(nats_conf())
    env = {**os.environ, "SERVER_NAME": "nats-0", "NATS_PASSWORD": "change-me"}
    checked = subprocess.run(
        ["nats-server", "-t", "-c", str(conf)], capture_output=True, text=True, env=env, timeout=30, check=False
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_nats_and_vigild_share_the_password():
    """The NATS servers' user and vigild's cluster credentials come from the one Secret."""
    secret = find("Secret", "vigild-nats")
    assert "NATS_PASSWORD" in secret["stringData"]
    for kind, name in (("StatefulSet", "nats"), ("Deployment", "vigild")):
        (container,) = find(kind, name)["spec"]["template"]["spec"]["containers"]
        env = {e["name"]: e for e in container["env"]}
        assert env["NATS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "vigild-nats", "key": "NATS_PASSWORD"}
    assert re.search(r"\{\s*user:\s*vigild,\s*password:\s*\$NATS_PASSWORD\s*\}", block(nats_conf(), "authorization"))
    cluster = vigild_config()["cluster"]
    assert cluster["username"] == "vigild"
    assert cluster["password"] == "${NATS_PASSWORD}"


# vigild


def deployment_pod() -> Doc:
    return find("Deployment", "vigild")["spec"]["template"]


def vigild_config() -> Doc:
    config = yaml.safe_load(find("ConfigMap", "vigild-config")["data"]["vigild.yaml"])
    assert isinstance(config, dict)
    return config


def option(command: list[str], name: str) -> str:
    """The value given to option `name` in an exec-form command."""
    assert name in command, f"{name} not in {command}"
    return command[command.index(name) + 1]


def config_path(container: Doc, volumes: dict[str, Doc]) -> str:
    """Where `container` sees the key vigild.yaml of the ConfigMap vigild-config, failing if it does not mount it."""
    for mount in container.get("volumeMounts", []):
        source = volumes[mount["name"]].get("configMap")
        if source is None or source["name"] != "vigild-config":
            continue
        if "subPath" in mount:
            return mount["mountPath"]
        items = {item["key"]: item["path"] for item in source.get("items", [])} or {"vigild.yaml": "vigild.yaml"}
        return f"{mount['mountPath'].rstrip('/')}/{items['vigild.yaml']}"
    pytest.fail(f"container {container['name']} does not mount the ConfigMap vigild-config")


def test_vigild_replicas_share_one_config():
    deployment = find("Deployment", "vigild")
    assert deployment["spec"]["replicas"] >= 2
    pod = deployment_pod()["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    for container in pod["containers"] + pod.get("initContainers", []):
        path = config_path(container, volumes)
        assert path == "/etc/vigild/vigild.yaml"
        if container["name"] == "vigild":
            command = container["command"]
            assert command[:2] == ["vigild", "run"]
            assert option(command, "--config") == path


def test_vigild_config():
    config = vigild_config()
    url = re.fullmatch(r"nats://([\w.-]+):(\d+)", config["cluster"]["nats"])
    assert url, config["cluster"]["nats"]
    host, port = url.groups()
    nats_service = find("Service", host.split(".")[0])
    assert int(port) in [p["port"] for p in nats_service["spec"]["ports"]]
    assert any(output["type"] == "nats" for output in config["outputs"])
    assert config["cluster"]["replicas"] <= find("StatefulSet", "nats")["spec"]["replicas"]
    assert config["metrics"]["enabled"] is True
    assert config["metrics"]["address"] == "0.0.0.0"  # scraped from outside the pod

    pod = deployment_pod()["spec"]
    (container,) = pod["containers"]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    models = Path(config["plugins"][0]["weights"]).parent.as_posix()
    assert volumes[mounts[models]]["persistentVolumeClaim"]["claimName"] == "vigild-models"
    assert find("PersistentVolumeClaim", "vigild-models")["spec"]["accessModes"] == ["ReadOnlyMany"]
    journal = Path(config["journal"]["path"])
    assert "emptyDir" in volumes[mounts[journal.parent.as_posix()]]


def test_vigild_accepts_its_config(tmp_path: Path):
    """The ConfigMap's vigild.yaml through vigild's own loader, as a replica reads it: the Secret's NATS_PASSWORD in
    the environment, and the models volume (whose weights file must exist) mapped to a directory here."""
    from vigild.config.loading import load_config

    text = find("ConfigMap", "vigild-config")["data"]["vigild.yaml"]
    pod = deployment_pod()["spec"]
    (claim,) = [
        v["name"] for v in pod["volumes"] if v.get("persistentVolumeClaim", {}).get("claimName") == "vigild-models"
    ]
    (models,) = [m["mountPath"].rstrip("/") + "/" for m in pod["containers"][0]["volumeMounts"] if m["name"] == claim]
    local = tmp_path / "models"
    for name in re.findall(rf"{re.escape(models)}([\w.-]+)", text):
        local.mkdir(exist_ok=True)
        (local / name).write_bytes(b"")  # the loader checks that a weights file is there, not what it holds
    file = tmp_path / "vigild.yaml"
    file.write_text(text.replace(models, f"{local}/"))
    secret = find("Secret", "vigild-nats")["stringData"]["NATS_PASSWORD"]

    settings = load_config(file, environ={"HOME": str(tmp_path), "NATS_PASSWORD": secret}, edits=False).settings
    assert settings.cluster is not None
    assert settings.cluster.password is not None and settings.cluster.password.get_secret_value() == secret
    assert [output.type for output in settings.outputs] == ["nats"]
    assert settings.metrics.enabled and settings.metrics.port == 9108


def test_vigild_gpu_and_probes():
    pod = deployment_pod()["spec"]
    (container,) = pod["containers"]
    assert int(container["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    assert any(t["key"] == "nvidia.com/gpu" and t["effect"] == "NoSchedule" for t in pod["tolerations"])

    liveness = container["livenessProbe"]["exec"]["command"]
    assert liveness[:2] == ["vigild", "ctl"] and liveness[-1] == "status"
    ctl_timeout = float(option(liveness, "--timeout"))
    assert container["livenessProbe"].get("timeoutSeconds", 1) > ctl_timeout  # ctl's reply decides, not the kubelet
    readiness = container["readinessProbe"]["exec"]["command"]
    assert readiness[:3] == ["vigild", "cluster", "ready"]
    for command in (liveness, readiness):
        assert option(command, "--config") == option(container["command"], "--config")
    assert pod["terminationGracePeriodSeconds"] == 30


def test_vigild_metrics_port_agrees_everywhere():
    template = deployment_pod()
    annotations = template["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/path"] == "/metrics"
    (container,) = template["spec"]["containers"]
    (metrics,) = [p for p in container["ports"] if p.get("name") == "metrics"]
    assert int(annotations["prometheus.io/port"]) == metrics["containerPort"] == vigild_config()["metrics"]["port"]
    service = find("Service", "vigild-metrics")
    (port,) = service["spec"]["ports"]
    assert port["port"] == metrics["containerPort"]
    assert port["targetPort"] in ("metrics", metrics["containerPort"])
    assert service["spec"]["selector"].items() <= template["metadata"]["labels"].items()


def test_vigild_runs_unprivileged():
    pod = deployment_pod()["spec"]
    (container,) = pod["containers"]
    merged = {**pod.get("securityContext", {}), **container.get("securityContext", {})}
    assert merged["runAsNonRoot"] is True
    assert merged["runAsUser"] != 0
    assert merged["readOnlyRootFilesystem"] is True
    assert merged["allowPrivilegeEscalation"] is False
    assert merged["capabilities"]["drop"] == ["ALL"]
    assert find("PodDisruptionBudget", "vigild")["spec"]["maxUnavailable"] == 1


def test_selectors_match_their_pods():
    for doc in objects():
        kind = doc["kind"]
        if kind in ("Deployment", "StatefulSet"):
            selector = doc["spec"]["selector"]["matchLabels"]
            assert selector.items() <= doc["spec"]["template"]["metadata"]["labels"].items(), doc["metadata"]["name"]
        elif kind in ("Service", "PodDisruptionBudget"):
            selector = doc["spec"]["selector"]
            selector = selector.get("matchLabels", selector) if kind == "PodDisruptionBudget" else selector
            pods = [
                d["spec"]["template"]["metadata"]["labels"]
                for d in objects()
                if d["kind"] in ("Deployment", "StatefulSet")
                and selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()
            ]
            assert len(pods) == 1, f"{kind} {doc['metadata']['name']} selects {len(pods)} workloads"
