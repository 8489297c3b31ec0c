"""Offline checks of the cluster definitions under ``infra/``: nothing is launched, nothing is downloaded.

* Ray cluster launcher YAMLs (``infra/ray/*.yaml``) go through Ray's own validation,
  ``ray.autoscaler._private.util.prepare_config`` then ``validate_config``: a private API whose JSON schema belongs
  to the installed Ray, so the installed version must be the pinned one (checked here). Their start commands are
  parsed by Ray's own ``ray start`` command-line parser.
* KubeRay manifests (``infra/k8s/raycluster.yaml``, ``rayjob.yaml``) are validated against the OpenAPI v3 schemas
  of the KubeRay CRDs in ``tests/assets/kuberay-crds/``, strictly (unknown fields are errors, as with
  ``kubectl apply --validate=strict``).
* ``infra/k8s/mlflow.yaml`` is checked structurally, and its server arguments by MLflow's own ``mlflow server``
  parser.
* Consistency: versions equal the pins of ``constraints.txt``, the node shapes declared in ``infra/clusters.yaml``
  equal those of the cluster files, the RayJob runs a recipe that exists, no credentials anywhere under ``infra/``.
* Each validator is also shown to reject a deliberately broken file.

``infra/clusters.yaml`` is read by ``pipeline.plan.clusters.load_node_shapes``, the reader ``revcol plan --cluster``
uses; the format checks below go through it.
"""

from __future__ import annotations

import copy
import functools
import re
import shlex
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from pipeline.plan.clusters import load_node_shapes

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
CRD_DIR = Path(__file__).resolve().parent / "assets" / "kuberay-crds"

# Importing Ray's CLI and MLflow's server emits their own dependencies' deprecation warnings; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

RAY_CLUSTER_FILES = sorted((INFRA / "ray").glob("*.yaml"))
NODE_ROLES = ("head", "train", "data")
ROLE_LABEL = "revcol/role"


def _load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def _load_all(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def pinned_version(package: str) -> str:
    """The version ``constraints.txt`` pins for ``package``."""
    for line in (REPO / "constraints.txt").read_text().splitlines():
        name, sep, version = line.partition("==")
        if sep and name.strip().lower() == package.lower():
            return version.strip()
    raise AssertionError(f"{package} is not pinned in constraints.txt")


RAY_VERSION = pinned_version("ray")


# ---------------------------------------------------------------------------------------------------------------
# Declared node shapes (infra/clusters.yaml), for `revcol plan` and friends
# ---------------------------------------------------------------------------------------------------------------

def test_clusters_yaml_format_and_roles() -> None:
    clusters = load_node_shapes()
    assert set(clusters) == {"aws", "local", "k8s"}
    for name, entry in clusters.items():
        assert (REPO / entry["source"]).is_file(), f"{name}: source {entry['source']} missing"
        shapes = entry["node_types"]
        roles = sorted(s["role"] for s in shapes.values())
        assert roles.count("head") == 1 and "train" in roles and "data" in roles, name
        for node_type, s in shapes.items():
            if s["role"] == "train":
                assert s["gpus"] > 0 and s["gpu_mem_gib"] > 0, (name, node_type)
            else:
                assert s["gpus"] == 0, f"{name}.{node_type}: only training nodes have GPUs"
            if s["role"] == "head":
                assert s["cpus"] == 0 and s["min_nodes"] == s["max_nodes"] == 1, (name, node_type)


def test_load_node_shapes_rejects_bad_entries(tmp_path: Path) -> None:
    good = yaml.safe_load((INFRA / "clusters.yaml").read_text())
    broken = [
        ("gpus", "eight"),
        ("role", "trainer"),
        ("min_nodes", 9),
        ("gpu_mem_gib", 0),
        ("colour", "blue"),
    ]
    for key, value in broken:
        doc = copy.deepcopy(good)
        doc["clusters"]["aws"]["node_types"]["gpu_h100x8"][key] = value
        path = tmp_path / "clusters.yaml"
        path.write_text(yaml.safe_dump(doc))
        with pytest.raises(ValueError, match="gpu_h100x8"):
            load_node_shapes(path=path)


# ---------------------------------------------------------------------------------------------------------------
# Ray cluster launcher YAMLs
# ---------------------------------------------------------------------------------------------------------------


def ray_validate(config: dict[str, Any]) -> dict[str, Any]:
    """Ray's own offline validation of a cluster-launcher config; returns the prepared (defaults-filled) config."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def _docker_env(config: dict[str, Any]) -> dict[str, str]:
    env = {}
    for option in config["docker"]["run_options"]:
        if option.startswith("--env="):
            key, _, value = option.removeprefix("--env=").partition("=")
            env[key] = value
    return env


def _ray_start_commands(commands: list[str]) -> list[list[str]]:
    """The `ray start ...` invocations in a list of shell commands, as argument lists."""
    found = []
    for command in commands:
        for segment in re.split(r";|&&|\|\|", command):
            argv = shlex.split(segment)
            if argv[:2] == ["ray", "start"]:
                found.append(argv[2:])
    return found


def _ray_start_params(argv: list[str]) -> dict[str, Any]:
    """Parses `ray start` arguments with Ray's own command-line definition (nothing is started)."""
    from ray.scripts.scripts import start

    return start.make_context("start", list(argv)).params


def test_installed_ray_is_the_pinned_one() -> None:
    # validate_config uses the installed Ray's schema: a different Ray would validate against different rules.
    import ray

    assert ray.__version__ == RAY_VERSION


@pytest.mark.parametrize("path", RAY_CLUSTER_FILES, ids=lambda p: p.name)
def test_ray_cluster_config_is_valid(path: Path) -> None:
    prepared = ray_validate(_load(path))
    assert prepared["cluster_name"]


def test_ray_cluster_files_are_the_expected_ones() -> None:
    assert [p.name for p in RAY_CLUSTER_FILES] == ["aws.yaml", "local.yaml"]


def _break_unknown_top_level(c: dict[str, Any]) -> None:
    c["min_worker"] = 1  # typo of a removed field


def _break_node_type_field(c: dict[str, Any]) -> None:
    c["available_node_types"]["gpu_h100x8"]["gpus"] = 8  # belongs in resources


def _break_min_workers_type(c: dict[str, Any]) -> None:
    c["available_node_types"]["cpu_data"]["min_workers"] = "2"


def _break_fractional_resource(c: dict[str, Any]) -> None:
    c["available_node_types"]["gpu_h100x8"]["resources"]["GPU"] = 7.5


def _break_docker_field(c: dict[str, Any]) -> None:
    c["docker"]["gpus"] = "all"


def _break_label_value_type(c: dict[str, Any]) -> None:
    c["available_node_types"]["cpu_data"]["labels"][ROLE_LABEL] = 1


@pytest.mark.parametrize(
    "breaker",
    [
        _break_unknown_top_level,
        _break_node_type_field,
        _break_min_workers_type,
        _break_fractional_resource,
        _break_docker_field,
        _break_label_value_type,
    ],
)
def test_ray_validation_rejects_broken_config(breaker: Any) -> None:
    config = _load(INFRA / "ray" / "aws.yaml")
    ray_validate(config)  # the unbroken file passes
    breaker(config)
    with pytest.raises(jsonschema.ValidationError):
        ray_validate(config)


def test_ray_validation_rejects_broken_local_config() -> None:
    config = _load(INFRA / "ray" / "local.yaml")
    config["provider"]["worker_ips"] = "GPU_NODE_1_HOST"  # a string, not a list
    with pytest.raises(jsonschema.ValidationError):
        ray_validate(config)
    import click

    config = _load(INFRA / "ray" / "local.yaml")
    del config["provider"]["head_ip"]
    with pytest.raises(click.ClickException, match="head_ip"):
        ray_validate(config)
    config = _load(INFRA / "ray" / "local.yaml")
    # The local provider defines its single node type itself; declaring types is refused.
    config["available_node_types"] = {"gpu": {"resources": {"GPU": 8}, "node_config": {}}}
    with pytest.raises(click.ClickException, match="available_node_types"):
        ray_validate(config)


def test_aws_node_types_land_work_on_the_right_nodes() -> None:
    from ray._private.label_utils import validate_node_label_syntax

    config = _load(INFRA / "ray" / "aws.yaml")
    types = config["available_node_types"]
    roles = {name: t["labels"][ROLE_LABEL] for name, t in types.items()}
    assert roles[config["head_node_type"]] == "head"
    for name, node_type in types.items():
        validate_node_label_syntax(node_type["labels"])  # Ray's own label rules
        resources = node_type["resources"]
        if roles[name] == "head":
            assert resources == {"CPU": 0}, "the head runs no tasks or training"
        elif roles[name] == "train":
            assert resources["GPU"] > 0 and resources["CPU"] > 0
        else:
            assert roles[name] == "data"
            assert resources.get("GPU", 0) == 0 and resources["CPU"] > 0
            assert node_type["node_config"]["InstanceType"].startswith("c7i.")
        if roles[name] != "head":
            assert 0 <= node_type["min_workers"] <= node_type["max_workers"]
    assert sorted(roles.values()) == ["data", "head", "train"]
    assert sum(t.get("min_workers", 0) for t in types.values()) <= config["max_workers"]
    assert sum(t.get("max_workers", 0) for t in types.values()) <= config["max_workers"]


@pytest.mark.parametrize("path", RAY_CLUSTER_FILES, ids=lambda p: p.name)
def test_head_binds_and_exports_what_is_needed(path: Path) -> None:
    config = _load(path)
    heads = _ray_start_commands(config["head_start_ray_commands"])
    assert len(heads) == 1
    params = _ray_start_params(heads[0])
    assert params["head"] is True
    assert params["port"] == 6379
    assert params["dashboard_host"] == "0.0.0.0"  # job API reachable from workers / tunnel
    assert params["dashboard_port"] == 8265
    assert params["ray_client_server_port"] == 10001
    assert params["autoscaling_config"] == "~/ray_bootstrap_config.yaml"
    if config["provider"]["type"] == "local":
        assert params["num_cpus"] == 0
    workers = _ray_start_commands(config["worker_start_ray_commands"])
    assert len(workers) == 1
    assert _ray_start_params(workers[0])["address"] == "$RAY_HEAD_IP:6379"

    env = _docker_env(config)
    assert env["REVCOL_STORAGE"].startswith("s3://")
    assert re.match(r"https?://", env["MLFLOW_TRACKING_URI"])
    # Ray 2.60 token auth: on for every node, with the token file that file_mounts copies from the operator.
    assert env["RAY_AUTH_MODE"] == "token"
    assert env["RAY_AUTH_TOKEN_PATH"] in config["file_mounts"]
    assert config["file_mounts"][env["RAY_AUTH_TOKEN_PATH"]] == "~/.ray/auth_token"


def test_local_workers_label_themselves() -> None:
    from ray._private.label_utils import parse_node_labels_string

    config = _load(INFRA / "ray" / "local.yaml")
    (argv,) = _ray_start_commands(config["worker_start_ray_commands"])
    labels = _ray_start_params(argv)["labels"]
    for role in ("train", "data"):
        assert parse_node_labels_string(labels.replace("$ROLE", role)) == {ROLE_LABEL: role}
    (head,) = _ray_start_commands(config["head_start_ray_commands"])
    assert parse_node_labels_string(_ray_start_params(head)["labels"]) == {ROLE_LABEL: "head"}


def test_recipe_placement_defaults_are_the_infra_labels() -> None:
    """What ``scaling.placement: auto`` selects by default is what the cluster files above label their nodes."""
    from pipeline.config import ScalingConfig

    scaling = ScalingConfig()
    assert (scaling.role_label, scaling.train_role, scaling.data_role) == (ROLE_LABEL, "train", "data")
    assert {scaling.train_role, scaling.data_role} < set(NODE_ROLES)


@pytest.mark.parametrize("path", RAY_CLUSTER_FILES, ids=lambda p: p.name)
def test_nodes_install_the_pinned_release(path: Path) -> None:
    config = _load(path)
    env = _docker_env(config)
    image, _, tag = config["docker"]["image"].partition(":")
    assert image == "rayproject/ray" and tag == f"{RAY_VERSION}-py311-gpu"
    assert re.fullmatch(r"v\d+\.\d+\.\d+", env["REVCOL_VERSION"]), "a release tag, not a branch"
    assert re.fullmatch(r"[\w.-]+/[\w.-]+", env["REVCOL_REPO"])
    install = " ".join(config["setup_commands"])
    assert '"revcol-pipeline @ git+https://github.com/${REVCOL_REPO}.git@${REVCOL_VERSION}"' in install
    assert "-c \"https://raw.githubusercontent.com/${REVCOL_REPO}/${REVCOL_VERSION}/constraints.txt\"" in install
    assert f"ray.__version__ == '{RAY_VERSION}'" in install
    # no node compiles DeepSpeed's ops at run time; the NVMe offload op links libaio
    commands = config["setup_commands"]
    (pip,) = [i for i, c in enumerate(commands) if "pip install" in c]
    (libaio,) = [i for i, c in enumerate(commands) if "apt-get install -y -q libaio-dev" in c]
    assert commands[-1] == "python -m pipeline.setup_ops" and pip < len(commands) - 1 and libaio < len(commands) - 1


def test_aws_shapes_match_clusters_yaml() -> None:
    config = _load(INFRA / "ray" / "aws.yaml")
    shapes = load_node_shapes("aws")
    types = config["available_node_types"]
    assert set(shapes) == set(types)
    for name, shape in shapes.items():
        node_type = types[name]
        assert node_type["resources"].get("CPU") == shape["cpus"], name
        assert node_type["resources"].get("GPU", 0) == shape["gpus"], name
        assert node_type["labels"][ROLE_LABEL] == shape["role"], name
        assert node_type["node_config"]["InstanceType"] == shape["instance_type"], name
        if name == config["head_node_type"]:
            assert (shape["min_nodes"], shape["max_nodes"]) == (1, 1)
        else:
            assert (node_type["min_workers"], node_type["max_workers"]) == (shape["min_nodes"], shape["max_nodes"])


def test_local_machine_lists_match_clusters_yaml() -> None:
    config = _load(INFRA / "ray" / "local.yaml")
    shapes = load_node_shapes("local")
    hosts = config["provider"]["worker_ips"]
    per_role = {role: sum(s["max_nodes"] for s in shapes.values() if s["role"] == role) for role in NODE_ROLES}
    assert per_role["head"] == 1
    assert sum(h.startswith("GPU_NODE_") for h in hosts) == per_role["train"]
    assert sum(h.startswith("DATA_NODE_") for h in hosts) == per_role["data"]
    assert len(hosts) == per_role["train"] + per_role["data"]
    for shape in shapes.values():
        assert shape["min_nodes"] == shape["max_nodes"], "fixed machines: no autoscaling range"


# ---------------------------------------------------------------------------------------------------------------
# KubeRay manifests against the CRD schemas
# ---------------------------------------------------------------------------------------------------------------


def _structural(schema: Any) -> Any:
    """An OpenAPI v3 (Kubernetes structural) schema as JSON Schema, with Kubernetes' meaning:

    * ``x-kubernetes-int-or-string``: an integer or a string (the CRDs already say so with ``anyOf``; added where not);
    * ``nullable: true``: null is allowed too;
    * objects with ``properties`` and no ``additionalProperties``/``x-kubernetes-preserve-unknown-fields`` are
      closed: the API server drops unknown fields and ``kubectl --validate=strict`` (the default) rejects them;
    * other ``x-kubernetes-*`` keys (list types, CEL ``x-kubernetes-validations``) are left out: they govern
      merges, updates and server-side rules this offline check cannot evaluate.
    """
    if isinstance(schema, list):
        return [_structural(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _structural(v) for k, v in schema.items() if not k.startswith("x-kubernetes-") and k != "nullable"}
    if schema.get("x-kubernetes-int-or-string") and "type" not in schema and "anyOf" not in schema:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if schema.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"] if isinstance(out["type"], str) else [*out["type"], "null"]
    if (
        out.get("type") == "object"
        and "properties" in out
        and "additionalProperties" not in out
        and not schema.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


@functools.cache
def crd_validator(kind: str) -> jsonschema.Draft7Validator:
    """A validator for ``kind`` (RayCluster, RayJob) from the CRD's served, stored version (v1)."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are ~2 MB; libyaml reads them in ~1 s
    path = CRD_DIR / f"ray.io_{kind.lower()}s.yaml"
    crd = yaml.load(path.read_text(), Loader=loader)
    assert crd["kind"] == "CustomResourceDefinition" and crd["spec"]["names"]["kind"] == kind
    (version,) = [v for v in crd["spec"]["versions"] if v["storage"]]
    assert version["name"] == "v1" and version["served"]
    schema = _structural(version["schema"]["openAPIV3Schema"])
    jsonschema.Draft7Validator.check_schema(schema)  # the conversion produced a well-formed schema
    return jsonschema.Draft7Validator(schema)


def crd_errors(manifest: dict[str, Any]) -> list[str]:
    """Schema violations of a KubeRay manifest, as 'path: message' lines (empty when valid)."""
    errors = []
    if manifest.get("apiVersion") != "ray.io/v1":
        errors.append(f"apiVersion: {manifest.get('apiVersion')!r} is not ray.io/v1")
    meta = manifest.get("metadata") or {}
    if not re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", str(meta.get("name", ""))) or len(meta["name"]) > 63:
        errors.append(f"metadata.name: {meta.get('name')!r} is not a DNS-1123 label")
    validator = crd_validator(manifest.get("kind", "RayCluster"))
    for err in sorted(validator.iter_errors(manifest), key=lambda e: list(e.absolute_path)):
        errors.append(f"{'.'.join(map(str, err.absolute_path)) or '<root>'}: {err.message}")
    return errors


KUBERAY_FILES = {"RayCluster": INFRA / "k8s" / "raycluster.yaml", "RayJob": INFRA / "k8s" / "rayjob.yaml"}


@pytest.mark.parametrize("kind", sorted(KUBERAY_FILES))
def test_kuberay_manifest_matches_crd_schema(kind: str) -> None:
    (manifest,) = _load_all(KUBERAY_FILES[kind])
    assert manifest["kind"] == kind
    assert crd_errors(manifest) == []


def _cluster_spec(manifest: dict[str, Any]) -> dict[str, Any]:
    return manifest["spec"] if manifest["kind"] == "RayCluster" else manifest["spec"]["rayClusterSpec"]


BROKEN_KUBERAY = {
    "replicas is a string": ("RayCluster", lambda m: _cluster_spec(m)["workerGroupSpecs"][0].update(replicas="two")),
    "unknown worker group field": ("RayCluster", lambda m: _cluster_spec(m)["workerGroupSpecs"][0].update(gpus=8)),
    "worker group without groupName": (
        "RayCluster",
        lambda m: _cluster_spec(m)["workerGroupSpecs"][0].pop("groupName"),
    ),
    "auth mode not in enum": ("RayCluster", lambda m: _cluster_spec(m)["authOptions"].update(mode="password")),
    "container without name": (
        "RayCluster",
        lambda m: _cluster_spec(m)["headGroupSpec"]["template"]["spec"]["containers"][0].pop("name"),
    ),
    "resource quantity is a list": (
        "RayCluster",
        lambda m: _cluster_spec(m)["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"][
            "limits"
        ].update({"nvidia.com/gpu": [8]}),
    ),
    "env value from an unknown source": (
        "RayCluster",
        lambda m: _cluster_spec(m)["headGroupSpec"]["template"]["spec"]["containers"][0]["env"][0]["valueFrom"].update(
            vault={"path": "x"}
        ),
    ),
    "bad metadata name": ("RayCluster", lambda m: m["metadata"].update(name="RevCol_Cluster")),
    "shutdown flag is a string": ("RayJob", lambda m: m["spec"].update(shutdownAfterJobFinishes="yes")),
    "entrypoint is a list": ("RayJob", lambda m: m["spec"].update(entrypoint=["python", "-m", "pipeline"])),
    "unknown RayJob field": ("RayJob", lambda m: m["spec"].update(ttlSeconds=60)),
    "ttl is a string": ("RayJob", lambda m: m["spec"].update(ttlSecondsAfterFinished="1h")),
    "wrong apiVersion": ("RayJob", lambda m: m.update(apiVersion="ray.io/v2")),
    "nested cluster spec broken": (
        "RayJob",
        lambda m: _cluster_spec(m)["workerGroupSpecs"][1].update(maxReplicas=-0.5),
    ),
}


@pytest.mark.parametrize("case", sorted(BROKEN_KUBERAY))
def test_crd_validation_rejects_broken_manifest(case: str) -> None:
    kind, breaker = BROKEN_KUBERAY[case]
    (manifest,) = _load_all(KUBERAY_FILES[kind])
    breaker(manifest)
    assert crd_errors(manifest), f"{case}: not rejected"


def test_structural_schema_conversion() -> None:
    schema = _structural(
        {
            "type": "object",
            "properties": {
                "q": {"anyOf": [{"type": "integer"}, {"type": "string"}], "x-kubernetes-int-or-string": True},
                "p": {"x-kubernetes-int-or-string": True},
                "n": {"type": "string", "nullable": True},
                "free": {
                    "type": "object",
                    "properties": {"a": {"type": "string"}},
                    "x-kubernetes-preserve-unknown-fields": True,
                },
            },
        }
    )
    validator = jsonschema.Draft7Validator(schema)
    assert validator.is_valid({"q": 8, "p": "8", "n": None, "free": {"a": "x", "b": 1}})
    assert not validator.is_valid({"q": 1.5})
    assert not validator.is_valid({"p": [8]})
    assert not validator.is_valid({"unknown": 1})


# ---------------------------------------------------------------------------------------------------------------
# KubeRay manifests: content and consistency
# ---------------------------------------------------------------------------------------------------------------


def _ray_containers(spec: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    groups = [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec["workerGroupSpecs"]]
    return [(name, c) for name, group in groups for c in group["template"]["spec"]["containers"]]


def test_rayjob_inlines_the_raycluster_spec() -> None:
    (cluster,) = _load_all(KUBERAY_FILES["RayCluster"])
    (job,) = _load_all(KUBERAY_FILES["RayJob"])
    assert job["spec"]["rayClusterSpec"] == cluster["spec"]
    assert cluster["metadata"]["namespace"] == job["metadata"]["namespace"] == "revcol"


def test_ray_and_image_versions_are_the_pinned_ones() -> None:
    images = set()
    for path in KUBERAY_FILES.values():
        (manifest,) = _load_all(path)
        spec = _cluster_spec(manifest)
        assert spec["rayVersion"] == RAY_VERSION
        images |= {c["image"] for _, c in _ray_containers(spec)}
    (image,) = images  # one image for every Ray container of both manifests
    tag = image.rpartition(":")[2]
    assert tag.endswith(f"-ray{RAY_VERSION}"), image
    # The image is built from infra/k8s/Dockerfile on the pinned Ray image.
    dockerfile = (INFRA / "k8s" / "Dockerfile").read_text()
    assert f"ARG RAY_VERSION={RAY_VERSION}\n" in dockerfile
    assert "FROM rayproject/ray:${RAY_VERSION}-py311-gpu" in dockerfile
    assert "-c constraints.txt" in dockerfile
    # ... with DeepSpeed's ops built into the image (libaio first, for the NVMe offload op), as `make install` does
    assert dockerfile.index("apt-get install -y -q --no-install-recommends libaio-dev") < dockerfile.index(
        "pip install --no-cache-dir -c constraints.txt ."
    ) < dockerfile.index("&& python -m pipeline.setup_ops")
    # ... at the project release the `ray up` clusters install.
    for path in RAY_CLUSTER_FILES:
        assert _docker_env(_load(path))["REVCOL_VERSION"] == "v" + tag.removesuffix(f"-ray{RAY_VERSION}")


def test_kuberay_groups_land_work_on_the_right_pods() -> None:
    from ray._private.label_utils import validate_node_label_syntax

    (cluster,) = _load_all(KUBERAY_FILES["RayCluster"])
    spec = cluster["spec"]
    assert spec["authOptions"]["mode"] == "token" and spec["authOptions"]["secretName"]
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0" and head["labels"][ROLE_LABEL] == "head"
    ports = {p["name"]: p["containerPort"] for p in head["template"]["spec"]["containers"][0]["ports"]}
    assert ports["gcs-server"] == 6379 and ports["dashboard"] == 8265 and ports["client"] == 10001
    roles = {}
    for group in spec["workerGroupSpecs"]:
        validate_node_label_syntax(group["labels"])
        roles[group["groupName"]] = role = group["labels"][ROLE_LABEL]
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        pod = group["template"]["spec"]
        (container,) = pod["containers"]
        resources = container["resources"]
        assert resources["requests"] == resources["limits"], "Guaranteed QoS"
        gpus = int(resources["limits"].get("nvidia.com/gpu", 0))
        if role == "train":
            assert gpus > 0
            assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
        else:
            assert role == "data" and gpus == 0 and "tolerations" not in pod
    assert sorted(roles.values()) == ["data", "train"]


_QUANTITY = re.compile(r"(\d+(?:\.\d+)?)(m|Ki|Mi|Gi|Ti|k|M|G|T)?")
_FACTORS = {
    None: 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12,
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40,
}


def k8s_quantity(value: str | int) -> float:
    """A Kubernetes resource quantity ("500m", "1800Gi", 8) as a number (cores, bytes, devices)."""
    match = _QUANTITY.fullmatch(str(value))
    assert match, f"not a quantity: {value!r}"
    return float(match.group(1)) * _FACTORS[match.group(2)]


def test_k8s_shapes_match_clusters_yaml() -> None:
    (cluster,) = _load_all(KUBERAY_FILES["RayCluster"])
    spec = cluster["spec"]
    shapes = load_node_shapes("k8s")
    head = shapes.pop("head")
    assert head["cpus"] == int(spec["headGroupSpec"]["rayStartParams"]["num-cpus"])
    head_limits = spec["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert k8s_quantity(head_limits["memory"]) == head["ram_gib"] * 2**30
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert set(groups) == set(shapes)
    for name, shape in shapes.items():
        group = groups[name]
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert k8s_quantity(limits["cpu"]) == shape["cpus"], name
        assert k8s_quantity(limits.get("nvidia.com/gpu", 0)) == shape["gpus"], name
        assert k8s_quantity(limits["memory"]) == shape["ram_gib"] * 2**30, name
        assert (group["minReplicas"], group["maxReplicas"]) == (shape["min_nodes"], shape["max_nodes"]), name
        assert group["labels"][ROLE_LABEL] == shape["role"], name
        node_selector = group["template"]["spec"]["nodeSelector"]["node.kubernetes.io/instance-type"]
        assert node_selector == shape["instance_type"], name


def test_k8s_quantity() -> None:
    assert k8s_quantity("500m") == 0.5 and k8s_quantity(8) == 8 and k8s_quantity("2Gi") == 2 * 2**30
    with pytest.raises(AssertionError):
        k8s_quantity("lots")


_SECRETISH = re.compile(r"(?i)(secret|password|passwd|token|credential|private|_key$|key_id$|^DATABASE_URL$|_URI$)")


def _env_problems(containers: list[dict[str, Any]]) -> list[str]:
    """Inline values for secret-looking variables (they must come from a Secret)."""
    problems = []
    for container in containers:
        for var in container.get("env", []):
            if _SECRETISH.search(var["name"]) and "secretKeyRef" not in (var.get("valueFrom") or {}):
                problems.append(f"{container['name']}: {var['name']} is not read from a Secret")
    return problems


def test_ray_pods_read_settings_and_credentials_from_secrets() -> None:
    (cluster,) = _load_all(KUBERAY_FILES["RayCluster"])
    for name, container in _ray_containers(cluster["spec"]):
        env = {v["name"]: v for v in container["env"]}
        for var in ("REVCOL_STORAGE", "MLFLOW_TRACKING_URI", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            assert "value" not in env[var] and env[var]["valueFrom"]["secretKeyRef"]["key"], (name, var)
        assert container["workingDir"] == "/home/ray/revcol", name
    assert _env_problems([c for _, c in _ray_containers(cluster["spec"])]) == []
    broken = copy.deepcopy(cluster)
    _ray_containers(broken["spec"])[0][1]["env"].append({"name": "AWS_SECRET_ACCESS_KEY", "value": "x" * 40})
    assert _env_problems([c for _, c in _ray_containers(broken["spec"])])


def _shell_argv(command: str, env: dict[str, str]) -> list[str]:
    """How bash splits and expands ``command`` into arguments, in environment ``env`` only."""
    out = subprocess.run(
        ["bash", "-c", f"printf '%s\\0' {command}"], env={"PATH": "/usr/bin:/bin", **env},
        capture_output=True, text=True, check=True, timeout=30,
    ).stdout
    return out.split("\0")[:-1]


def _rayjob_driver_argv(entrypoint: str, head_env: dict[str, str]) -> list[str]:
    """The driver's argv after KubeRay's path: the submitter pod's shell runs `ray job submit ... -- ENTRYPOINT`
    (no storage/tracking variables there), `ray job submit` joins the arguments with list2cmdline, and the job
    supervisor on the head runs that string with a shell in the head's environment."""
    from subprocess import list2cmdline

    submitted = _shell_argv(entrypoint, {})
    return _shell_argv(list2cmdline(submitted), head_env)


def test_rayjob_entrypoint_runs_a_recipe_of_this_repo() -> None:
    (job,) = _load_all(KUBERAY_FILES["RayJob"])
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
    head_env = {"REVCOL_STORAGE": "s3://bucket/revcol/runs", "MLFLOW_TRACKING_URI": "http://mlflow.revcol:5000"}
    argv = _rayjob_driver_argv(spec["entrypoint"], head_env)
    assert argv[:4] == ["python", "-m", "pipeline", "run"]
    # The head's values arrive intact, although the submitter's shell saw the entrypoint first.
    assert "storage_path=s3://bucket/revcol/runs" in argv and "tracking.uri=http://mlflow.revcol:5000" in argv

    from pipeline.cli import build_parser

    args = build_parser().parse_args(argv[3:])  # the real CLI accepts the arguments
    assert re.fullmatch(r"jobs/[\w.-]+\.yaml", args.recipe)
    recipe = REPO / args.recipe
    present = sorted(p.name for p in (REPO / "jobs").glob("*.yaml"))
    assert recipe.is_file(), f"the RayJob runs {args.recipe}, which is not in jobs/ (holds {present})"
    # The recipe validates with the entrypoint's overrides (the same code `revcol run` uses).
    from pipeline.config import load_recipe

    resolved = load_recipe(recipe, args.set)
    assert resolved.storage_path == head_env["REVCOL_STORAGE"]
    assert resolved.tracking.uri == head_env["MLFLOW_TRACKING_URI"]
    # runtimeEnvYAML, when given, is a mapping of Ray runtime_env keys.
    runtime_env = yaml.safe_load(spec.get("runtimeEnvYAML", "{}"))
    assert set(runtime_env) <= {"env_vars", "pip", "working_dir", "py_modules", "excludes", "config"}


def test_rayjob_entrypoint_quoting_bites() -> None:
    # Without the single quotes the submitter's shell expands the (unset) variables: the run would get empty values.
    head_env = {"REVCOL_STORAGE": "s3://bucket/runs"}
    argv = _rayjob_driver_argv("python -m pipeline run jobs/x.yaml --set storage_path=$REVCOL_STORAGE", head_env)
    assert argv[-1] == "storage_path="
    argv = _rayjob_driver_argv("python -m pipeline run jobs/x.yaml --set 'storage_path=$REVCOL_STORAGE'", head_env)
    assert argv[-1] == "storage_path=s3://bucket/runs"


# ---------------------------------------------------------------------------------------------------------------
# MLflow server manifest
# ---------------------------------------------------------------------------------------------------------------

_API_VERSIONS = {"Service": "v1", "ServiceAccount": "v1", "Deployment": "apps/v1", "StatefulSet": "apps/v1"}


def _expand_k8s_vars(arg: str, env: dict[str, str]) -> str:
    """The kubelet's $(VAR) expansion in container args."""
    return re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), arg)


def mlflow_problems(docs: list[dict[str, Any]]) -> list[str]:
    """Structural problems of the MLflow manifest (empty when fine)."""
    problems = []
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for doc in docs:
        kind = doc.get("kind")
        by_kind.setdefault(kind, []).append(doc)
        if _API_VERSIONS.get(kind) != doc.get("apiVersion"):
            problems.append(f"{kind}: apiVersion {doc.get('apiVersion')!r}, expected {_API_VERSIONS.get(kind)!r}")
        if not doc.get("metadata", {}).get("name") or doc["metadata"].get("namespace") != "revcol":
            problems.append(f"{kind}: metadata.name and namespace revcol required")
        if kind == "Secret":
            problems.append("Secret objects do not belong in the manifest (create them with kubectl)")
    if sorted(by_kind) != ["Deployment", "Service", "StatefulSet"] or len(by_kind.get("Service", [])) != 2:
        return problems + [f"expected a Deployment, a StatefulSet and two Services, got {sorted(by_kind)}"]

    workloads = by_kind["Deployment"] + by_kind["StatefulSet"]
    services = {s["metadata"]["name"]: s for s in by_kind["Service"]}
    for wl in workloads:
        name = wl["metadata"]["name"]
        template_labels = wl["spec"]["template"]["metadata"]["labels"]
        selector = wl["spec"].get("selector", {}).get("matchLabels", {})
        if not selector or any(template_labels.get(k) != v for k, v in selector.items()):
            problems.append(f"{name}: spec.selector.matchLabels must match the pod template's labels")
        containers = wl["spec"]["template"]["spec"].get("containers", [])
        if not containers or not all(c.get("name") and c.get("image") for c in containers):
            problems.append(f"{name}: every container needs a name and an image")
        problems += [f"{name}: {p}" for p in _env_problems(containers)]
        service = services.get(name)
        if service is None or any(template_labels.get(k) != v for k, v in service["spec"]["selector"].items()):
            problems.append(f"{name}: no Service selecting its pods")
        else:
            port_names = {p.get("name") for c in containers for p in c.get("ports", [])}
            for port in service["spec"]["ports"]:
                if port["targetPort"] not in port_names:
                    problems.append(f"{name}: Service targetPort {port['targetPort']!r} is no container port")
    (postgres,) = by_kind["StatefulSet"]
    headless = services.get(postgres["spec"].get("serviceName"), {}).get("spec", {}).get("clusterIP") == "None"
    if not headless:
        problems.append("StatefulSet: serviceName must name a headless Service")

    (deployment,) = by_kind["Deployment"]
    (server,) = deployment["spec"]["template"]["spec"]["containers"]
    if server.get("command") != ["mlflow", "server"]:
        problems.append("MLflow container: command must be ['mlflow', 'server']")
    env = {v["name"]: v for v in server.get("env", [])}
    args = server.get("args", [])
    store = [a for a in args if a.startswith("--backend-store-uri")]
    if len(store) != 1 or not (m := re.fullmatch(r"--backend-store-uri=\$\((\w+)\)", store[0])):
        problems.append("--backend-store-uri must be given once, as $(VAR) from the container's env")
    elif "secretKeyRef" not in (env.get(m.group(1), {}).get("valueFrom") or {}):
        problems.append(f"--backend-store-uri: {m.group(1)} is not read from a Secret")
    dest = [a for a in args if a.startswith("--artifacts-destination")]
    if len(dest) != 1 or not dest[0].startswith("--artifacts-destination=s3://"):
        problems.append("--artifacts-destination=s3://... must be given once")
    return problems


def _mlflow_server_params(args: list[str], env: dict[str, str]) -> dict[str, Any]:
    """Parses the container args with MLflow's own `mlflow server` definition (nothing is started)."""
    from mlflow.cli import server

    return server.make_context("server", [_expand_k8s_vars(a, env) for a in args]).params


def test_mlflow_manifest_structure() -> None:
    docs = _load_all(INFRA / "k8s" / "mlflow.yaml")
    assert mlflow_problems(docs) == []
    (postgres,) = [d for d in docs if d["kind"] == "StatefulSet"]
    pg_env = {v["name"]: v for v in postgres["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert "secretKeyRef" in pg_env["POSTGRES_PASSWORD"]["valueFrom"]


def test_mlflow_server_args_and_version() -> None:
    from mlflow.server.security_utils import is_allowed_host_header

    docs = _load_all(INFRA / "k8s" / "mlflow.yaml")
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    (server,) = deployment["spec"]["template"]["spec"]["containers"]
    params = _mlflow_server_params(server["args"], {"MLFLOW_BACKEND_STORE_URI": "postgresql://u:p@db:5432/mlflow"})
    assert params["backend_store_uri"] == "postgresql://u:p@db:5432/mlflow"
    assert params["serve_artifacts"] is True and params["artifacts_destination"].startswith("s3://")
    assert params["host"] == "0.0.0.0" and params["port"] == 5000
    # MLflow 3 checks Host headers: the in-cluster names Ray pods use and the port-forwarded localhost must pass.
    allowed = params["allowed_hosts"].split(",")
    for host in ("mlflow.revcol.svc.cluster.local:5000", "mlflow:5000", "mlflow.revcol:5000", "localhost:5000"):
        assert is_allowed_host_header(allowed, host), host
    assert not is_allowed_host_header(allowed, "attacker.example.com")
    # Server and clients run the same MLflow; the image adds drivers at the pinned versions.
    mlflow_version = pinned_version("mlflow")
    assert server["image"].endswith(f":{mlflow_version}")
    dockerfile = (INFRA / "k8s" / "mlflow.Dockerfile").read_text()
    assert f"FROM ghcr.io/mlflow/mlflow:v{mlflow_version}\n" in dockerfile
    assert f"boto3=={pinned_version('boto3')}" in dockerfile and "psycopg2-binary==" in dockerfile


BROKEN_MLFLOW = {
    "inline database password": lambda docs: docs[1]["spec"]["template"]["spec"]["containers"][0]["env"].append(
        {"name": "POSTGRES_PASSWORD", "value": "hunter2hunter2"}
    ),
    "backend store URI inline": lambda docs: _server(docs)["args"].__setitem__(
        2, "--backend-store-uri=postgresql://mlflow:pw@db/mlflow"
    ),
    "artifacts on local disk": lambda docs: _server(docs)["args"].__setitem__(
        4, "--artifacts-destination=/mlartifacts"
    ),
    "selector does not match": lambda docs: docs[2]["spec"]["selector"]["matchLabels"].update(
        {"app.kubernetes.io/name": "other"}
    ),
    "Deployment on the wrong API": lambda docs: docs[2].update(apiVersion="extensions/v1beta1"),
    "a Secret in the manifest": lambda docs: docs.append(
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "mlflow-db", "namespace": "revcol"}}
    ),
    "Service port to nowhere": lambda docs: docs[3]["spec"]["ports"][0].update(targetPort="web"),
}


def _server(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    return deployment["spec"]["template"]["spec"]["containers"][0]


@pytest.mark.parametrize("case", sorted(BROKEN_MLFLOW))
def test_mlflow_checks_reject_broken_manifest(case: str) -> None:
    docs = _load_all(INFRA / "k8s" / "mlflow.yaml")
    assert [d["kind"] for d in docs] == ["Service", "StatefulSet", "Deployment", "Service"]
    assert _server(docs)["args"][2].startswith("--backend-store-uri") and _server(docs)["args"][4].startswith(
        "--artifacts-destination"
    )
    BROKEN_MLFLOW[case](docs)
    assert mlflow_problems(docs), f"{case}: not rejected"


def test_mlflow_server_parser_rejects_unknown_option() -> None:
    import click

    with pytest.raises(click.UsageError):
        _mlflow_server_params(["--artifact-destination=s3://b/x"], {})  # misspelt option


# ---------------------------------------------------------------------------------------------------------------
# Kubernetes references, documentation, credentials
# ---------------------------------------------------------------------------------------------------------------


def _secret_refs(node: Any) -> set[str]:
    if isinstance(node, dict):
        refs = {node["secretKeyRef"]["name"]} if "secretKeyRef" in node else set()
        return refs.union(*(_secret_refs(v) for v in node.values()))
    if isinstance(node, list):
        return set().union(*(_secret_refs(v) for v in node))
    return set()


def test_referenced_secrets_and_service_accounts_exist_or_are_documented() -> None:
    names = ("raycluster.yaml", "rayjob.yaml", "mlflow.yaml")
    manifests = [doc for name in names for doc in _load_all(INFRA / "k8s" / name)]
    accounts = {d["metadata"]["name"] for d in _load_all(INFRA / "k8s" / "serviceaccounts.yaml")}
    guide = (INFRA / "k8s" / "README.md").read_text()
    secrets = set().union(*(_secret_refs(d) for d in manifests))
    (cluster,) = _load_all(KUBERAY_FILES["RayCluster"])
    secrets.add(cluster["spec"]["authOptions"]["secretName"])
    for secret in secrets:
        assert re.search(rf"create secret generic {re.escape(secret)}\b", guide), f"README.md does not create {secret}"

    def service_accounts(node: Any) -> set[str]:
        if isinstance(node, dict):
            found = {node["serviceAccountName"]} if "serviceAccountName" in node else set()
            return found.union(*(service_accounts(v) for v in node.values()))
        if isinstance(node, list):
            return set().union(*(service_accounts(v) for v in node))
        return set()

    assert set().union(*(service_accounts(d) for d in manifests)) <= accounts


def test_guides_name_files_that_exist() -> None:
    for guide in (INFRA / "README.md", INFRA / "k8s" / "README.md"):
        for ref in set(re.findall(r"\binfra/[\w./-]+\w", guide.read_text())):
            assert (REPO / ref).exists(), f"{guide.relative_to(REPO)} names {ref}, which does not exist"


# Credential scan. A value is acceptable when it is a reference or a placeholder, not a literal secret.
_AWS_KEY_ID = re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b")
_PRIVATE_KEY = re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----")
_ASSIGNED = re.compile(
    r"(?i)\b(aws[-_]secret[-_]access[-_]key|aws[-_]session[-_]token|password|passwd|secret|auth[-_]token|api[-_]key)"
    r"""["']?\s*[:=]\s*["']?([^\s"',}]+)"""
)
_URL_PASSWORD = re.compile(r"://[^/\s:@]+:([^@\s/]+)@")
# moto's documented dummy credentials (infra/local, tests): accepted by the local S3 server only.
_DUMMY_VALUES = {"testing"}


def _acceptable(value: str) -> bool:
    reference = value.startswith(("$", "<", "{"))  # $VAR, $(command), <placeholder>, {templated}
    path = value.startswith(("~/", "/")) and value.count("/") >= 2  # a file holding the secret, e.g. ~/.ray/auth_token
    return reference or path or "REPLACE_ME" in value or value in _DUMMY_VALUES


def credential_findings(text: str) -> list[str]:
    """Credential-looking strings in ``text`` (empty when clean)."""
    findings = [m.group(0)[:8] + "..." for m in _AWS_KEY_ID.finditer(text)]
    findings += ["private key block" for _ in _PRIVATE_KEY.finditer(text)]
    findings += [f"{m.group(1)}={m.group(2)[:4]}..." for m in _ASSIGNED.finditer(text) if not _acceptable(m.group(2))]
    findings += [
        f"URL password {m.group(1)[:4]}..." for m in _URL_PASSWORD.finditer(text) if not _acceptable(m.group(1))
    ]
    return findings


def test_no_credentials_under_infra() -> None:
    files = [p for p in INFRA.rglob("*") if p.is_file()]
    assert len(files) >= 10
    for path in files:
        assert credential_findings(path.read_text()) == [], path.relative_to(REPO)


@pytest.mark.parametrize(
    "text",
    [
        "aws_access_key_id: " + "AKIA" + "Q" * 16,
        "aws_secret_access_key = " + "wJalrXUtnFEMI/K7MDENG/bPxRfiCY" + "EXAMPLEKEY",
        "  - --env=AWS_SECRET_ACCESS_KEY=abcdefghijklmnopqrstuvwxyz0123456789ABCD",
        "password: hunter2hunter2",
        "--from-literal=password=correcthorsebattery",
        "uri: postgresql://mlflow:s3cr3tpw@db:5432/mlflow",
        "-----BEGIN OPENSSH PRIVATE KEY-----",
    ],
)
def test_credential_scan_bites(text: str) -> None:
    assert credential_findings(text)


@pytest.mark.parametrize(
    "text",
    [
        'kubectl create secret generic x --from-literal=password="$PGPASS"',
        "secretKeyRef: {name: mlflow-postgres, key: password}",
        "- name: AWS_SECRET_ACCESS_KEY\n  valueFrom:",
        "postgresql://mlflow:<password>@mlflow-postgres:5432/mlflow",
        "export AWS_SECRET_ACCESS_KEY=testing",
    ],
)
def test_credential_scan_passes_references(text: str) -> None:
    assert credential_findings(text) == []
