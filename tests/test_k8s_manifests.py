"""Offline validation of the Kubernetes manifests (k8s/) and the Docker files (docker/).

No cluster and no image registry are needed:
- RayService / RayCluster against the KubeRay CRDs' `openAPIV3Schema` (../shared/k8s-crds/), made strict: CRD
  schemas accept unknown fields (the API server silently prunes them), so `additionalProperties: false` is added
  wherever `properties` are listed and `x-kubernetes-preserve-unknown-fields` is not set;
- built-in kinds (StatefulSet, Service, Secret, PersistentVolumeClaim) with `kubernetes-validate` in strict mode;
- the Serve config (the RayService's serveConfigV2 and deployments/serve_config.yaml) with Ray's own
  `ServeDeploySchema` plus a walk that rejects unknown keys at every level (Serve's pydantic models ignore them),
  and by building the application from it (`deployments.app.application` rejects unknown `args`);
- k8s/rayservice.yaml is what k8s/render.py renders now, and its serveConfigV2 differs from
  deployments/serve_config.yaml exactly in `render.CLUSTER_OVERRIDES`;
- names shared between files agree (Secret keys, PVC, Redis Service, ports, model ids, images);
- a one-letter typo in a field name of every manifest kind fails validation.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import json
import re
import subprocess
import types
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml

# Ray Serve's pydantic models warn about their own Field(...) usage on import.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

import jsonschema  # noqa: E402 (the test extra: jsonschema, kubernetes-validate)
import kubernetes_validate  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(__file__).resolve().parents[2] / "shared"
CRDS = SHARED / "k8s-crds"
K8S = ROOT / "k8s"
DOCKER = ROOT / "docker"
SERVE_CONFIG = ROOT / "deployments" / "serve_config.yaml"
#: The Kubernetes version the built-in kinds are validated against (gRPC probes are GA since 1.27).
K8S_VERSION = "1.33"
#: Every manifest file (the RayService template is not one: it holds a placeholder).
MANIFESTS = sorted(p for p in K8S.glob("*.yaml") if not p.name.endswith(".template.yaml"))
RAYSERVICE = K8S / "rayservice.yaml"
EXPECTED_KINDS = {"RayService", "StatefulSet", "Service", "Secret", "PersistentVolumeClaim"}


def _load_render():
    spec = importlib.util.spec_from_file_location("k8s_render", K8S / "render.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


render = _load_render()


def load_docs(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def all_docs() -> list[tuple[str, int, dict[str, Any]]]:
    return [(path.name, i, doc) for path in MANIFESTS for i, doc in enumerate(load_docs(path))]


def the_doc(kind: str, name: str | None = None) -> dict[str, Any]:
    found = [doc for _, _, doc in all_docs() if doc["kind"] == kind and name in (None, doc["metadata"]["name"])]
    assert len(found) == 1, f"expected one {kind} {name or ''} in k8s/, found {len(found)}"
    return copy.deepcopy(found[0])


# --- CRD schemas ------------------------------------------------------------------------------------------------


def strict_schema(node: Any) -> Any:
    """The CRD schema with unknown fields rejected and int-or-string nodes typeless (see the module docstring)."""
    if isinstance(node, list):
        return [strict_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: strict_schema(value) for key, value in node.items()}
    if out.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
    if "properties" in out and not out.get("x-kubernetes-preserve-unknown-fields"):
        out.setdefault("additionalProperties", False)
    return out


@functools.cache
def _crd_schemas() -> dict[str, dict[str, Any]]:
    """Kind -> strict openAPIV3Schema of its ray.io/v1 version, from every CRD file in ../shared/k8s-crds/."""
    assert CRDS.is_dir(), f"the KubeRay CRDs are expected in {CRDS}"
    schemas = {}
    for path in sorted(CRDS.glob("*.yaml")):
        for crd in yaml.load_all(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)):
            if not crd or crd.get("kind") != "CustomResourceDefinition":
                continue
            version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
            schemas[crd["spec"]["names"]["kind"]] = strict_schema(version["schema"]["openAPIV3Schema"])
    return schemas


@functools.cache
def crd_validator(kind: str) -> Any:
    schema = _crd_schemas()[kind]
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def crd_errors(doc: dict[str, Any]) -> list[str]:
    assert doc.get("apiVersion") == "ray.io/v1", doc.get("apiVersion")
    errors = crd_validator(doc["kind"]).iter_errors(doc)
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in errors]


def builtin_errors(doc: dict[str, Any]) -> list[str]:
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as err:
        return [f"{'.'.join(map(str, err.path))}: {err.message}"]
    return []


# --- Serve config -----------------------------------------------------------------------------------------------


def _serve_models() -> dict[str, type]:
    from ray.serve.config import AutoscalingConfig
    from ray.serve.schema import (
        DeploymentSchema,
        gRPCOptionsSchema,
        HTTPOptionsSchema,
        RayActorOptionsSchema,
        ServeApplicationSchema,
        ServeDeploySchema,
    )

    return {
        model.__name__: model
        for model in (
            ServeDeploySchema,
            ServeApplicationSchema,
            DeploymentSchema,
            gRPCOptionsSchema,
            HTTPOptionsSchema,
            AutoscalingConfig,
            RayActorOptionsSchema,
        )
    }


def _is_model(annotation: Any) -> bool:
    from pydantic import BaseModel

    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _arms(annotation: Any) -> list[Any]:
    """The alternatives of a (possibly Optional / Union / Annotated) annotation."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _arms(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        return [arm for arg in typing.get_args(annotation) for arm in _arms(arg)]
    return [annotation]


def unknown_keys(value: Any, annotation: Any, path: str, visited: set[str]) -> list[str]:
    """Keys in `value` that the pydantic `annotation` does not declare, at every level (free-form dicts
    such as `args`, `runtime_env`, `resources` excepted)."""
    problems: list[str] = []
    for arm in _arms(annotation):
        origin = typing.get_origin(arm)
        if _is_model(arm) and isinstance(value, dict):
            visited.add(arm.__name__)
            fields = {}
            for name, field in arm.model_fields.items():
                fields[name] = field
                if field.alias:
                    fields[field.alias] = field
            for key, item in value.items():
                if key not in fields:
                    problems.append(f"{path}.{key}: not a field of {arm.__name__} (known: {sorted(arm.model_fields)})")
                else:
                    problems += unknown_keys(item, fields[key].annotation, f"{path}.{key}", visited)
            return problems
        if origin in (list, typing.List) and isinstance(value, list):
            (item_type,) = typing.get_args(arm) or (Any,)
            for i, item in enumerate(value):
                problems += unknown_keys(item, item_type, f"{path}[{i}]", visited)
            return problems
    return problems


def serve_errors(config: dict[str, Any], visited: set[str] | None = None) -> list[str]:
    """Ray's own validation of a Serve config plus the strict walk; [] when both pass."""
    from pydantic import ValidationError
    from ray.serve.schema import ServeDeploySchema

    visited = set() if visited is None else visited
    problems = unknown_keys(config, ServeDeploySchema, "serve", visited)
    try:
        ServeDeploySchema.model_validate(config)
    except ValidationError as err:
        problems.append(f"ServeDeploySchema: {err}")
    return problems


def embedded_serve_config(rayservice: dict[str, Any]) -> dict[str, Any]:
    return yaml.safe_load(rayservice["spec"]["serveConfigV2"])


def manifest_errors(doc: dict[str, Any]) -> list[str]:
    """Every validation that applies to one manifest document."""
    if doc.get("apiVersion", "").startswith("ray.io/"):
        problems = crd_errors(doc)
        if doc["kind"] == "RayService":
            problems += serve_errors(embedded_serve_config(doc))
            problems += crd_errors(raycluster_of(doc))
        return problems
    return builtin_errors(doc)


def raycluster_of(rayservice: dict[str, Any]) -> dict[str, Any]:
    """The RayCluster KubeRay creates from the RayService (its rayClusterConfig), for the RayCluster CRD."""
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayCluster",
        "metadata": {"name": rayservice["metadata"]["name"]},
        "spec": copy.deepcopy(rayservice["spec"]["rayClusterConfig"]),
    }


def build_application(config: dict[str, Any]) -> None:
    """Build the Serve application from a config (as Serve would from its import_path + args + deployments)."""
    from deployments.app import APP_NAME, application

    app = next(a for a in config["applications"] if a["name"] == APP_NAME)
    options = {d["name"]: {k: v for k, v in d.items() if k != "name"} for d in app.get("deployments", [])}
    application(app.get("args", {}), options)


# --- helpers for typos -------------------------------------------------------------------------------------------


def rename_key(doc: Any, path: tuple[Any, ...], old: str, new: str) -> Any:
    """A copy of `doc` with the key `old` of the mapping at `path` renamed to `new` (order kept)."""
    doc = copy.deepcopy(doc)
    node = doc
    for step in path:
        node = node[step]
    assert old in node, f"{old!r} not at {path}: {sorted(node)}"
    items = list(node.items())
    node.clear()
    node.update((new if key == old else key, value) for key, value in items)
    return doc


def flatten(node: Any, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    """Leaves by path; list elements with a `name` are keyed by it (as in render.CLUSTER_OVERRIDES)."""
    if isinstance(node, dict):
        if not node:
            return {prefix: {}}
        out = {}
        for key, value in node.items():
            out.update(flatten(value, prefix + (str(key),)))
        return out
    if isinstance(node, list) and node and all(isinstance(x, dict) and "name" in x for x in node):
        out = {}
        for item in node:
            out.update(flatten({k: v for k, v in item.items() if k != "name"}, prefix + (item["name"],)))
        return out
    return {prefix: node}


# === tests: the manifests ========================================================================================


def test_every_expected_kind_is_present():
    kinds = [doc["kind"] for _, _, doc in all_docs()]
    assert set(kinds) == EXPECTED_KINDS, kinds


@pytest.mark.parametrize(("name", "index", "doc"), all_docs(), ids=[f"{n}[{i}]-{d['kind']}" for n, i, d in all_docs()])
def test_manifest_validates(name, index, doc):
    assert manifest_errors(doc) == [], f"{name} document {index} ({doc['kind']})"


def test_crd_schema_is_strict_and_typeless_on_int_or_string():
    schema = _crd_schemas()["RayService"]
    assert schema["properties"]["spec"]["additionalProperties"] is False
    text = json.dumps(schema)
    assert '"x-kubernetes-int-or-string": true' in text
    for node in _nodes(schema):
        if node.get("x-kubernetes-int-or-string"):
            assert "type" not in node
        if "properties" in node and not node.get("x-kubernetes-preserve-unknown-fields"):
            assert "additionalProperties" in node


def _nodes(node: Any):
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _nodes(value)
    elif isinstance(node, list):
        for value in node:
            yield from _nodes(value)


def test_rayservice_is_rendered_from_the_serve_config():
    assert RAYSERVICE.read_text() == render.render(), "k8s/rayservice.yaml is stale: run python k8s/render.py"
    assert render.main(["--check"]) == 0


def test_serve_config_v2_differs_only_by_the_cluster_overrides():
    base = flatten(yaml.safe_load(SERVE_CONFIG.read_text()))
    cluster = flatten(embedded_serve_config(the_doc("RayService")))
    absent = "<absent>"
    changed = {path for path in base.keys() | cluster.keys() if base.get(path, absent) != cluster.get(path, absent)}
    declared = set()
    for path, value in render.CLUSTER_OVERRIDES.items():
        leaves = flatten(value, path) if isinstance(value, dict) else {path: value}
        for leaf, leaf_value in leaves.items():
            assert cluster[leaf] == leaf_value
            if base.get(leaf, absent) != leaf_value:
                declared.add(leaf)
    assert changed == declared


def test_render_rejects_a_template_without_exactly_one_placeholder():
    with pytest.raises(ValueError, match="exactly once"):
        render.render(template="apiVersion: ray.io/v1\n")


# === tests: the Serve config =====================================================================================


@pytest.mark.parametrize("which", ["deployments/serve_config.yaml", "serveConfigV2"])
def test_serve_config_is_valid_and_has_no_unknown_keys(which):
    config = yaml.safe_load(SERVE_CONFIG.read_text()) if which != "serveConfigV2" else embedded_serve_config(
        the_doc("RayService")
    )
    visited: set[str] = set()
    assert serve_errors(config, visited) == []
    # The walk reached every model that the config's sections use.
    assert set(_serve_models()) <= visited, sorted(set(_serve_models()) - visited)
    build_application(config)


SERVE_TYPOS = [
    # (path to the mapping, field, typo)
    (("applications", 0, "deployments", 3, "autoscaling_config"), "max_replicas", "max_replica"),
    (("applications", 0, "deployments", 2, "ray_actor_options"), "num_gpus", "num_gpu"),
    (("applications", 0, "deployments", 0), "max_ongoing_requests", "max_ongoing_request"),
    (("applications", 0), "route_prefix", "route_prefx"),
    (("grpc_options",), "grpc_servicer_functions", "grpc_servicer_function"),
    (("http_options",), "host", "hots"),
    ((), "proxy_location", "proxy_locaton"),
]


@pytest.mark.parametrize("which", ["deployments/serve_config.yaml", "serveConfigV2"])
@pytest.mark.parametrize(("path", "old", "new"), SERVE_TYPOS, ids=[t[2] for t in SERVE_TYPOS])
def test_a_serve_config_typo_fails(which, path, old, new):
    config = yaml.safe_load(SERVE_CONFIG.read_text()) if which != "serveConfigV2" else embedded_serve_config(
        the_doc("RayService")
    )
    bad = rename_key(config, path, old, new)
    problems = serve_errors(bad)
    assert any(new in p for p in problems), problems
    # Ray's own schema alone lets these through: that is why the strict walk exists.
    from ray.serve.schema import ServeDeploySchema

    ServeDeploySchema.model_validate(bad)


def test_a_typo_in_the_application_args_fails():
    config = yaml.safe_load(SERVE_CONFIG.read_text())
    bad = rename_key(config, ("applications", 0, "args"), "slots", "slot")
    assert serve_errors(bad) == []  # args are free-form for Serve ...
    with pytest.raises(ValueError, match="slot"):  # ... but not for the application
        build_application(bad)


# === tests: typos in the Kubernetes manifests ====================================================================

WORKER_CPU = ("spec", "rayClusterConfig", "workerGroupSpecs", 0)
HEAD_CONTAINER = ("spec", "rayClusterConfig", "headGroupSpec", "template", "spec", "containers", 0)
MANIFEST_TYPOS = [
    # (kind, path to the mapping, field, typo)
    ("RayService", WORKER_CPU, "replicas", "replcias"),
    ("RayService", ("spec", "rayClusterConfig"), "enableInTreeAutoscaling", "enableInTreeAutoScaling"),
    ("RayService", ("spec", "upgradeStrategy"), "type", "typ"),
    ("RayService", HEAD_CONTAINER, "resources", "resource"),
    ("RayService", WORKER_CPU + ("template", "spec", "containers", 0, "ports", 0), "containerPort", "containerPrt"),
    ("RayService", HEAD_CONTAINER[:-2] + ("volumes", 0, "emptyDir"), "sizeLimit", "sizeLimt"),
    ("RayService", WORKER_CPU + ("template", "spec", "initContainers", 0), "volumeMounts", "volumeMount"),
    ("StatefulSet", ("spec",), "replicas", "replcias"),
    ("StatefulSet", ("spec",), "volumeClaimTemplates", "volumeClaimTemplate"),
    ("StatefulSet", ("spec", "template", "spec", "containers", 0), "readinessProbe", "readinesProbe"),
    ("Service", ("spec",), "clusterIP", "clusterIp"),
    ("Secret", (), "stringData", "stringdata"),
    ("PersistentVolumeClaim", ("spec",), "accessModes", "accesModes"),
]


@pytest.mark.parametrize(("kind", "path", "old", "new"), MANIFEST_TYPOS, ids=[f"{t[0]}-{t[3]}" for t in MANIFEST_TYPOS])
def test_a_manifest_typo_fails(kind, path, old, new):
    doc = the_doc(kind, "qwen3-stream-redis" if kind == "Secret" else None)
    assert manifest_errors(doc) == []
    problems = manifest_errors(rename_key(doc, path, old, new))
    # "'replcias' was unexpected", or "'containerPort' is a required property" where the field is required.
    assert any(f"'{new}'" in p or f"'{old}'" in p for p in problems), problems


def test_a_typo_in_the_incremental_upgrade_options_fails():
    doc = the_doc("RayService")
    options = {"gatewayClassName": "istio", "intervalSeconds": 60, "stepSizePercent": 25, "maxSurgePercent": 25}
    doc["spec"]["upgradeStrategy"] = {"type": "NewClusterWithIncrementalUpgrade", "clusterUpgradeOptions": options}
    assert manifest_errors(doc) == []
    bad = rename_key(doc, ("spec", "upgradeStrategy", "clusterUpgradeOptions"), "stepSizePercent", "stepSizPercent")
    assert any("stepSizPercent" in p for p in manifest_errors(bad))


def test_a_typo_in_the_embedded_serve_config_fails():
    doc = the_doc("RayService")
    config = rename_key(embedded_serve_config(doc), ("applications", 0, "deployments", 3, "autoscaling_config"),
                        "max_replicas", "max_replica")
    doc["spec"]["serveConfigV2"] = yaml.safe_dump(config, sort_keys=False)
    assert any("max_replica" in p for p in manifest_errors(doc))


def test_a_typo_in_the_raycluster_fails():
    cluster = raycluster_of(the_doc("RayService"))
    assert crd_errors(cluster) == []
    bad = rename_key(cluster, ("spec", "workerGroupSpecs", 1), "maxReplicas", "maxReplica")
    assert any("maxReplica" in p for p in crd_errors(bad))


# === tests: what the files must agree on ========================================================================


def _groups(rayservice: dict[str, Any]) -> dict[str, dict[str, Any]]:
    spec = rayservice["spec"]["rayClusterConfig"]
    groups = {"head": spec["headGroupSpec"]}
    groups.update({g["groupName"]: g for g in spec["workerGroupSpecs"]})
    return groups


def _ray_container(group: dict[str, Any]) -> dict[str, Any]:
    (container,) = [c for c in group["template"]["spec"]["containers"] if c["name"].startswith("ray-")]
    return container


def _env(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def _ray_resources(group: dict[str, Any]) -> dict[str, float]:
    """The custom resources of a group's `rayStartParams.resources` (a JSON object, quoted for the shell)."""
    text = group.get("rayStartParams", {}).get("resources")
    if text is None:
        return {}
    assert text.startswith('"') and text.endswith('"'), "KubeRay expects the JSON inside double quotes"
    return json.loads(text[1:-1].replace('\\"', '"'))


def test_cluster_layout_matches_the_serve_config():
    rayservice = the_doc("RayService")
    config = embedded_serve_config(rayservice)
    groups = _groups(rayservice)
    cluster = rayservice["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["rayVersion"] == "2.60.0"
    assert rayservice["spec"]["upgradeStrategy"]["type"] in {"NewCluster", "NewClusterWithIncrementalUpgrade"}
    # The head schedules no work and names the Service's gRPC port `serve-grpc` (KubeRay >= 1.6 exposes serve-*
    # ports): 50051, TLS, served by each worker pod's TLS front; Serve's own proxy listens behind it.
    assert groups["head"]["rayStartParams"]["num-cpus"] == "0"
    head_ports = {p["name"]: p["containerPort"] for p in _ray_container(groups["head"])["ports"]}
    assert head_ports["serve-grpc"] == 50051
    assert head_ports["proxy-grpc"] == config["grpc_options"]["port"] == 50052
    assert head_ports["serve"] == config["http_options"]["port"]
    from deployments.app import GRPC_SERVICERS

    assert config["grpc_options"]["grpc_servicer_functions"] == list(GRPC_SERVICERS)
    assert config["http_options"]["host"] == "0.0.0.0"
    # Every deployment fits exactly one worker group: CPU stages by the custom resource, GPU stages by num_gpus.
    deployments = {d["name"]: d for d in config["applications"][0]["deployments"]}
    placement = {"Ingress": "cpu", "FeatureExtractor": "cpu", "CausalEncoder": "gpu", "Decoder": "gpu"}
    for name, group_name in placement.items():
        options = deployments[name]["ray_actor_options"]
        fitting = []
        for gname, group in groups.items():
            limits = _ray_container(group)["resources"]["limits"]
            gpus = float(limits.get("nvidia.com/gpu", 0))
            cpus = 0.0 if gname == "head" else float(limits["cpu"])
            extra = _ray_resources(group)
            if (
                options.get("num_cpus", 1) <= cpus
                and options.get("num_gpus", 0) <= gpus
                and all(extra.get(k, 0) >= v for k, v in options.get("resources", {}).items())
            ):
                fitting.append(gname)
        assert fitting == [group_name], f"{name} fits {fitting}"
    # One encoder and one decoder replica share a GPU.
    assert deployments["CausalEncoder"]["ray_actor_options"]["num_gpus"] == 0.5
    assert deployments["Decoder"]["ray_actor_options"]["num_gpus"] == 0.5
    gpu_limits = _ray_container(groups["gpu"])["resources"]["limits"]
    assert gpu_limits["nvidia.com/gpu"] == "1"
    args = config["applications"][0]["args"]
    assert (args["device"], args["dtype"]) == ("cuda", "bfloat16")
    # Requests and limits everywhere.
    for group in groups.values():
        for container in group["template"]["spec"]["containers"] + group["template"]["spec"].get("initContainers", []):
            assert set(container["resources"]) >= {"requests", "limits"}, container["name"]
    for group_name in ("cpu", "gpu"):
        group = groups[group_name]
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    # KubeRay's own probes on every Ray container: for RayService workers its readiness probe also checks the
    # node's Serve proxy on the port named `serve` (and fails while the proxy drains), so keep it unset here.
    for group_name, group in groups.items():
        container = _ray_container(group)
        assert "readinessProbe" not in container and "livenessProbe" not in container, group_name
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports["serve"] == config["http_options"]["port"], group_name


def test_every_worker_pod_serves_the_grpc_port_with_tls():
    """The Serve Service's gRPC port lands on a `tls-front` sidecar in every worker pod (the pods the Service
    selects), with the certificate Secret mounted, forwarding to the pod's own Serve proxy; no Ray container
    exposes the plaintext proxy under a `serve*` name."""
    rayservice = the_doc("RayService")
    proxy_port = embedded_serve_config(rayservice)["grpc_options"]["port"]
    secret = the_doc("Secret", "qwen3-stream-tls")
    assert secret["type"] == "kubernetes.io/tls" and {"tls.crt", "tls.key"} <= secret["stringData"].keys()
    from cli import build_parser

    for name, group in _groups(rayservice).items():
        ports = {p["name"]: p["containerPort"] for p in _ray_container(group)["ports"]}
        assert ports["proxy-grpc"] == proxy_port, name
        if name == "head":
            continue
        assert "serve-grpc" not in ports, name
        spec = group["template"]["spec"]
        (front,) = [c for c in spec["containers"] if c["name"] == "tls-front"]
        assert spec["containers"][0]["name"].startswith("ray-")  # KubeRay takes the first container for Ray
        assert {p["name"]: p["containerPort"] for p in front["ports"]} == {"serve-grpc": 50051}
        assert front["command"][:2] == ["qwen3-stream", "tls-front"]
        args = build_parser().parse_args(front["command"][1:])  # the sidecar's command parses as the CLI's
        assert (args.port, args.upstream) == (50051, f"127.0.0.1:{proxy_port}")
        mount = {m["name"]: m for m in front["volumeMounts"]}["tls"]
        assert mount["readOnly"] is True
        assert str(args.tls_cert).startswith(mount["mountPath"] + "/") and str(args.tls_key).startswith(mount["mountPath"] + "/")
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert volumes["tls"]["secret"]["secretName"] == secret["metadata"]["name"]
        assert {Path(str(args.tls_cert)).name, Path(str(args.tls_key)).name} == {"tls.crt", "tls.key"}
        assert front["image"].endswith("-cpu") and set(front["resources"]) >= {"requests", "limits"}


def test_pods_get_the_model_cache_redis_secret_and_transport():
    from deployments.server import DEFAULT_TRANSPORT, TRANSPORTS

    rayservice = the_doc("RayService")
    secret = the_doc("Secret", "qwen3-stream-redis")
    pvc = the_doc("PersistentVolumeClaim")
    args = embedded_serve_config(rayservice)["applications"][0]["args"]
    secret_ref = {"url": None, "password": None}
    for name, group in _groups(rayservice).items():
        env = _env(_ray_container(group))
        for key, value in TRANSPORTS[DEFAULT_TRANSPORT].items():
            assert env[key] == value
        assert env["HF_HOME"] == "/models/hf"
        for var, key in (("REDIS_URL", "url"), ("REDIS_PASSWORD", "password")):
            ref = env[var]["secretKeyRef"]
            assert ref == {"name": secret["metadata"]["name"], "key": key}
            assert key in secret["stringData"]
            secret_ref[key] = ref
        if name == "head":
            continue
        spec = group["template"]["spec"]
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert volumes["models"]["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
        assert "ReadWriteMany" in pvc["spec"]["accessModes"]
        mounts = {m["name"]: m["mountPath"] for m in _ray_container(group)["volumeMounts"]}
        assert env["HF_HOME"].startswith(mounts["models"] + "/")
        (init,) = spec["initContainers"]
        assert _env(init)["HF_HOME"] == env["HF_HOME"]
        assert {m["name"]: m["mountPath"] for m in init["volumeMounts"]}["models"] == mounts["models"]
        assert init["command"] == ["/bin/sh", "-c"]
        (script,) = init["args"]
        subprocess.run(["sh", "-n", "-c", script], check=True)  # parses
        assert "hf download" in script
        for repo in (args["model"], args["tower"]):
            assert repo in script, f"the initContainer does not fetch {repo}"
        assert init["image"] == _ray_container(group)["image"]


def test_redis_matches_the_secret_and_the_url():
    statefulset, service, secret = the_doc("StatefulSet"), the_doc("Service"), the_doc("Secret", "qwen3-stream-redis")
    spec = statefulset["spec"]
    assert spec["replicas"] == 1
    assert spec["serviceName"] == service["metadata"]["name"]
    assert service["spec"]["selector"].items() <= spec["template"]["metadata"]["labels"].items()
    (container,) = spec["template"]["spec"]["containers"]
    assert container["image"] == "redis:7"
    command = container["command"] + container["args"]
    assert command[command.index("--appendonly") + 1] == "yes"
    assert command[command.index("--requirepass") + 1] == "$(REDIS_PASSWORD)"
    env = _env(container)
    assert env["REDIS_PASSWORD"]["secretKeyRef"] == {"name": secret["metadata"]["name"], "key": "password"}
    assert {"readinessProbe", "livenessProbe", "resources"} <= container.keys()
    (claim,) = spec["volumeClaimTemplates"]
    assert {m["name"]: m["mountPath"] for m in container["volumeMounts"]}[claim["metadata"]["name"]] == "/data"
    (port,) = service["spec"]["ports"]
    url = secret["stringData"]["url"]
    assert re.fullmatch(rf"redis://{service['metadata']['name']}:{port['port']}/\d+", url), url


# === tests: the Docker files ====================================================================================

DOCKERFILES = sorted(DOCKER.glob("Dockerfile.*"))
DOCKERFILE_NAMES = [p.name for p in DOCKERFILES if not p.name.endswith(".dockerignore")]


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    lines, current = [], ""
    for raw in path.read_text().splitlines():
        if raw.lstrip().startswith("#") and not current:
            continue
        line = raw.rstrip()
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        current += line
        if current.strip():
            word, _, rest = current.strip().partition(" ")
            lines.append((word.upper(), rest.strip()))
        current = ""
    return lines


def test_both_dockerfiles_exist():
    assert set(DOCKERFILE_NAMES) == {"Dockerfile.cpu", "Dockerfile.cuda"}


@pytest.mark.parametrize("name", DOCKERFILE_NAMES)
def test_dockerfile_lint(name):
    steps = _instructions(DOCKER / name)
    words = [word for word, _ in steps]
    assert words[0] in ("FROM", "ARG") and "FROM" in words
    assert all(word == "ARG" for word in words[: words.index("FROM")])
    runs = [(i, rest) for i, (word, rest) in enumerate(steps) if word == "RUN"]
    torch = [i for i, rest in runs if re.search(r"pip install [^&]*torch", rest)]
    project = [i for i, rest in runs if re.search(r"pip install (--\S+ )*\.(\s|$)", rest)]
    assert torch and project and torch[0] < project[0], "torch must be installed before the project"
    copied = " ".join(rest for word, rest in steps if word == "COPY")
    for needed in ("pyproject.toml", "protos/", "deployments/", "pipeline/"):
        assert needed in copied, f"{name} does not copy {needed}"
    for word, rest in steps:
        if word == "COPY":
            for source in rest.split()[:-1]:
                if not source.startswith("--"):
                    assert (ROOT / source).exists(), f"{name} copies {source}, which is not in the repository"
    env = " ".join(rest for word, rest in steps if word == "ENV")
    assert re.search(r"PYTHONPATH=/app\b", env)
    assert ("WORKDIR", "/app") in steps
    assert any("wget" in rest for word, rest in steps if word == "RUN"), "KubeRay's default probes need wget"
    text = (DOCKER / name).read_text()
    if name.endswith(".cpu"):
        assert "whl/cpu" in text
    else:
        assert "whl/cpu" not in text and "torch.version.cuda" in text


def test_rayservice_images_match_the_dockerfiles():
    groups = _groups(the_doc("RayService"))
    images = {name: _ray_container(group)["image"] for name, group in groups.items()}
    assert images["head"].endswith("-cpu") and images["cpu"].endswith("-cpu")
    assert images["gpu"].endswith("-cuda")
    assert images["head"] == images["cpu"]
