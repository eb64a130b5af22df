"""The cloud manifests under infra/, checked offline the way their consumers read them: Kubernetes objects against
the Kubernetes schemas (kubernetes-validate), the KubeRay resources for the fields KubeRay needs, the Prefect work
pool template through prefect-kubernetes' own job configuration, prefect.yaml through Prefect's deployment model,
ray-cluster.yaml through Ray's launcher schema, and names, image, ports and env var names against each other."""

from __future__ import annotations

import ast
import asyncio
import importlib
import inspect
import json
import re
import shlex
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import ray
import yaml
from mlflow.server.security_utils import is_allowed_host_header
from prefect.cli.deploy._models import DeploymentConfig, PrefectYamlModel, WorkPoolConfig
from prefect.client.orchestration import PrefectClient
from prefect.client.schemas.objects import FlowRun
from prefect.server.schemas.actions import WorkPoolCreate
from prefect.utilities.schema_tools import is_valid_schema, validate
from prefect_kubernetes.worker import KubernetesWorker, KubernetesWorkerJobConfiguration
from ray.autoscaler._private.util import prepare_config, validate_config

from ulcore.config import load_config
from ulcore.presets import PRESETS

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"
K8S = INFRA / "k8s"
KUBERNETES_VERSION = "1.33"  # the oldest Kubernetes the manifests are written for
# Values a deployer exports before `prefect deploy` (infra/prefect.yaml's header); stand-ins for the templates.
DEPLOY_ENV = {"UL_IMAGE_REPO": "registry.example/unified-latents", "UL_STORAGE_ROOT": "s3://ul-bucket/pipeline",
              "UL_DATA_ROOT": "s3://ul-bucket/raw/imagenet", "UL_DVC_REMOTE": "s3://ul-bucket/dvc",
              "UL_GIT_REPOSITORY": "https://git.example/org/unified-latents.git"}
GIT_SHA = "0123456789abcdef0123456789abcdef01234567"
GPU_MEMORY_GB = {"p4d.24xlarge": 40, "p4de.24xlarge": 80, "p5.48xlarge": 80, "p5e.48xlarge": 141,
                 "p5en.48xlarge": 141}
STAGE2_PEAK_GIB = 67.6  # imagenet512 stage 2 at 128 per GPU (README "On GPUs")


def _yaml_docs(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _kustomization() -> dict[str, Any]:
    return yaml.safe_load((K8S / "kustomization.yaml").read_text())


def _k8s_objects() -> list[dict[str, Any]]:
    """Every object of infra/k8s: what `kubectl apply -k` applies, then the RayJob applied on its own."""
    paths = [K8S / name for name in _kustomization()["resources"]] + [K8S / "rayjob.yaml"]
    return [doc for path in paths for doc in _yaml_docs(path)]


def _one(kind: str) -> dict[str, Any]:
    found = [o for o in _k8s_objects() if o["kind"] == kind]
    assert len(found) == 1, f"expected one {kind} in infra/k8s, found {len(found)}"
    return found[0]


def _pod_templates(obj: dict[str, Any]) -> list[dict[str, Any]]:
    if obj["kind"] == "RayCluster":
        groups = [obj["spec"]["headGroupSpec"], *obj["spec"]["workerGroupSpecs"]]
        return [g["template"] for g in groups]
    if obj["kind"] == "Deployment":
        return [obj["spec"]["template"]]
    return []


def _containers() -> list[dict[str, Any]]:
    return [c for o in _k8s_objects() for t in _pod_templates(o) for c in t["spec"]["containers"]]


def _work_pool_template() -> dict[str, Any]:
    return json.loads((K8S / "prefect-work-pool.json").read_text())


def _prefect_yaml() -> dict[str, Any]:
    return yaml.safe_load((INFRA / "prefect.yaml").read_text())


def _deployments(pool: str) -> list[dict[str, Any]]:
    return [d for d in _prefect_yaml()["deployments"] if d["work_pool"]["name"] == pool]


def _fill(value: Any) -> Any:
    """A prefect.yaml value as `prefect deploy` makes it: {{ $VAR }} from DEPLOY_ENV, {{ git-sha.stdout }} the
    commit."""
    if isinstance(value, str):
        value = re.sub(r"\{\{\s*\$(\w+)\s*\}\}", lambda m: DEPLOY_ENV[m.group(1)], value)
        return re.sub(r"\{\{\s*git-sha\.stdout\s*\}\}", GIT_SHA, value)
    if isinstance(value, list):
        return [_fill(v) for v in value]
    if isinstance(value, dict):
        return {k: _fill(v) for k, v in value.items()}
    return value


def _overrides(deployment: dict[str, Any]) -> dict[str, str]:
    return dict(o.split("=", 1) for o in _fill(deployment["parameters"]["overrides"]))


def _env(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


# ------------------------------------------------------------------------------------------ Kubernetes schemas


def test_every_kubernetes_object_validates_against_the_kubernetes_schemas():
    listed = set(_kustomization()["resources"]) | {"rayjob.yaml", "kustomization.yaml"}
    on_disk = {p.name for p in K8S.glob("*.yaml")}
    assert on_disk == listed, f"infra/k8s files not in kustomization.yaml resources: {sorted(on_disk - listed)}"
    builtin = [o for o in _k8s_objects() if not o["apiVersion"].startswith("ray.io/")]
    assert {o["kind"] for o in builtin} >= {"Namespace", "ServiceAccount", "Deployment", "Service"}
    for obj in builtin:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


def test_kuberay_resources_have_what_kuberay_needs_and_valid_pod_templates():
    cluster, job = _one("RayCluster"), _one("RayJob")
    spec = cluster["spec"]
    assert spec["rayVersion"] == ray.__version__, "rayVersion must be the Ray the image installs (requirements.lock)"
    head = spec["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict) and head["rayStartParams"]["num-cpus"] == "0"
    assert spec["workerGroupSpecs"], "RayCluster needs workerGroupSpecs"
    for group in spec["workerGroupSpecs"]:
        for key in ("groupName", "minReplicas", "maxReplicas", "rayStartParams", "template"):
            assert key in group, f"worker group {group.get('groupName')!r} lacks {key}"
        assert group["minReplicas"] <= group.get("replicas", group["minReplicas"]) <= group["maxReplicas"]
        assert all(isinstance(v, str) for v in group["rayStartParams"].values()), "rayStartParams values are strings"
    for template in _pod_templates(cluster):  # KubeRay embeds plain pod templates: validate them as such
        kubernetes_validate.validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"},
                                      "template": template}, KUBERNETES_VERSION, strict=True)
    ports = {p["name"]: p["containerPort"] for p in head["template"]["spec"]["containers"][0]["ports"]}
    assert ports == {"gcs-server": 6379, "dashboard": 8265}
    probe = head["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]
    assert (probe["path"], probe["port"]) == ("/api/gcs_healthz", "dashboard"), "head Ready = the Jobs API answers"

    gpu = next(g for g in spec["workerGroupSpecs"] if "nvidia.com/gpu" in
               g["template"]["spec"]["containers"][0]["resources"]["limits"])
    resources = gpu["template"]["spec"]["containers"][0]["resources"]
    assert resources["requests"] == resources["limits"]
    gpus, cpus = int(resources["limits"]["nvidia.com/gpu"]), int(resources["limits"]["cpu"])
    for name in ("imagenet512", "kinetics600"):
        preset = PRESETS[name]["ray"]
        assert preset["num_workers"] <= gpus * gpu["maxReplicas"]
        assert preset["num_workers"] % gpus == 0 and cpus >= gpus * preset["cpus_per_worker"], \
            f"{name}: one GPU pod must hold {gpus} workers of {preset['cpus_per_worker']} CPUs"
    terms = gpu["template"]["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    expressions = [e for term in terms["nodeSelectorTerms"] for e in term["matchExpressions"]]
    for e in expressions:
        if e["key"] == "node.kubernetes.io/instance-type":
            assert all(GPU_MEMORY_GB[t] > STAGE2_PEAK_GIB * 1.074 for t in e["values"]), e["values"]
        else:
            assert (e["key"], e["operator"]) == ("nvidia.com/gpu.memory", "Gt")
            assert int(e["values"][0]) > STAGE2_PEAK_GIB * 1024, "GPU memory label is in MiB"

    assert job["spec"]["clusterSelector"] == {"ray.io/cluster": cluster["metadata"]["name"]}
    assert job["spec"]["entrypoint"].strip()


def test_rayjob_entrypoint_is_a_valid_pipeline_command_on_the_head():
    cluster, job = _one("RayCluster"), _one("RayJob")
    head_env = _env(cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0])
    command = job["spec"]["entrypoint"].split("&&")[-1]
    used = set(re.findall(r"\$(\w+)", command))
    assert used <= set(head_env), f"entrypoint uses {sorted(used - set(head_env))}, not set on the head"
    values = {**DEPLOY_ENV, "MLFLOW_TRACKING_URI": "http://ul-mlflow.ul.svc:5000"}
    words = shlex.split(re.sub(r"\$(\w+)", lambda m: values[m.group(1)], command))
    assert words[:3] == ["python", "-m", "flows.pipeline"]
    assert (REPO / "flows" / "pipeline.py").is_file()
    overrides = [f"preset={v}" if flag == "--preset" else v for flag, v in zip(words[3::2], words[4::2])
                 if flag in ("--preset", "--set")]
    cfg = load_config(REPO / words[words.index("--params") + 1], overrides)
    assert cfg.storage.root.startswith("s3://") and cfg.ray.use_gpu


# ------------------------------------------------------------------------------------------- Prefect


def _render_flow_run_job(job_variables: dict[str, Any]) -> dict[str, Any]:
    """The Job the Kubernetes worker would create for a flow run of a deployment with these job variables."""
    async def render():
        # The template has no block or variable references, so this client is never contacted.
        async with PrefectClient(api="http://127.0.0.1:9/api") as client:
            return await KubernetesWorkerJobConfiguration.from_template_and_values(
                _work_pool_template(), job_variables, client=client)

    configuration = asyncio.run(render())
    configuration.prepare_for_flow_run(FlowRun(flow_id=uuid.uuid4(), name="tidy-otter"))
    return configuration.job_manifest


def test_work_pool_template_validates_with_prefect_kubernetes():
    template = _work_pool_template()
    WorkPoolCreate(name="ul-k8s", type="kubernetes", base_job_template=template)  # what the server checks
    is_valid_schema(template["variables"], preprocess=False)
    default = KubernetesWorker.get_default_base_job_template()
    assert set(template["job_configuration"]) == set(default["job_configuration"])
    assert set(template["variables"]["properties"]) >= set(default["variables"]["properties"])
    with pytest.raises(Exception, match="'image' is a required property"):  # no flow run without our image
        validate({}, template["variables"], raise_on_error=True, ignore_required=False)

    for deployment in _deployments("ul-k8s"):
        job_variables = _fill(deployment["work_pool"]["job_variables"])
        validate(job_variables, template["variables"], raise_on_error=True, preprocess=True,
                 ignore_required=False, allow_none_with_default=True)
        job = _render_flow_run_job(job_variables)
        pod = job["spec"]["template"]["spec"]
        # prefect-kubernetes insists on these two Job fields inside the pod spec (its own validator requires
        # them there); the API server drops them, so they are left out of the schema check.
        assert (pod.pop("parallelism"), pod.pop("completions")) == (1, 1)
        kubernetes_validate.validate(job, KUBERNETES_VERSION, strict=True)
        container = pod["containers"][0]
        assert container["image"] == f"{DEPLOY_ENV['UL_IMAGE_REPO']}:{GIT_SHA}"
        env = _env(container)
        assert {k: env[k]["value"] for k in job_variables["env"]} == job_variables["env"]
        assert "PREFECT__FLOW_RUN_ID" in env and env["RAY_AUTH_MODE"]["value"] == "token"


def test_prefect_yaml_loads_with_prefects_deployment_model():
    raw = _prefect_yaml()
    model = PrefectYamlModel.model_validate(raw)
    assert [d.name for d in model.deployments] == [d["name"] for d in raw["deployments"]]
    for d in raw["deployments"]:  # the model ignores unknown keys; a misspelt key would be silently dropped
        unknown = set(d) - set(DeploymentConfig.model_fields)
        assert not unknown, f"{d['name']}: unknown keys {sorted(unknown)}"
        assert set(d["work_pool"]) <= set(WorkPoolConfig.model_fields), d["name"]
        path, function = d["entrypoint"].split(":")
        tree = ast.parse((REPO / path).read_text())
        assert function in {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}, d["entrypoint"]
        flow = getattr(importlib.import_module(path.removesuffix(".py").replace("/", ".")), function)
        inspect.signature(flow.fn).bind(**d["parameters"])  # every parameter is one the flow takes
        for section in ("build", "pull"):
            for step in d.get(section) or raw.get(section) or []:
                (name, kwargs), = step.items()
                module, attr = name.rsplit(".", 1)
                signature = inspect.signature(getattr(importlib.import_module(module), attr))
                signature.bind(**{k: v for k, v in kwargs.items() if k not in ("id", "requires")})
        load_config(REPO / d["parameters"]["params"], _fill(d["parameters"]["overrides"]))
    local_pool = re.search(r"^POOL=(\S+)$", (INFRA / "stack.sh").read_text(), re.M).group(1)
    assert {d["name"] for d in _deployments(local_pool)} == {"full-pipeline", "scheduled-retrain"}
    assert {d["name"] for d in _deployments("ul-k8s")} == {"full-pipeline-k8s", "scheduled-retrain-k8s"}


def test_retrain_deployments_run_one_at_a_time_and_drop_triggers_meanwhile():
    from prefect.client.schemas.objects import ConcurrencyLimitConfig

    retrains = [d for d in _prefect_yaml()["deployments"] if d["name"].startswith("scheduled-retrain")]
    assert len(retrains) == 2
    for d in retrains:
        assert d["entrypoint"] == "flows/retrain.py:retrain"
        limit = ConcurrencyLimitConfig.model_validate(d["concurrency_limit"])
        assert (limit.limit, limit.collision_strategy.value) == (1, "CANCEL_NEW"), d["name"]
        assert d["parameters"]["force"] is False and d["parameters"]["infra_retries"] >= 1


def test_kubernetes_deployments_pin_image_and_clone_to_the_deploying_commit():
    for d in _deployments("ul-k8s"):
        steps = {s_name: kw for step in d["build"] for s_name, kw in step.items()}
        sha_step = steps["prefect.deployments.steps.run_shell_script"]
        assert sha_step["id"] == "git-sha" and sha_step["script"].rstrip("'").endswith("git rev-parse HEAD")
        for var in DEPLOY_ENV:  # each deploy-time variable is checked by name before anything is registered
            assert f"${{{var}:?set {var}" in sha_step["script"]
        used = set(re.findall(r"\{\{\s*\$(\w+)\s*\}\}", json.dumps(d)))
        assert used == set(DEPLOY_ENV), used
        image = d["work_pool"]["job_variables"]["image"]
        assert re.fullmatch(r"\{\{ \$UL_IMAGE_REPO \}\}:\{\{ git-sha\.stdout \}\}", image), image
        clone = next(kw for step in d["pull"] for name, kw in step.items() if name.endswith(".git_clone"))
        assert clone["commit_sha"] == "{{ git-sha.stdout }}"
        assert DEPLOY_ENV["UL_IMAGE_REPO"].endswith("/" + _kustomization()["images"][0]["name"])


# ------------------------------------------------------------------------------------------ agreement


def test_names_image_ports_and_env_agree_across_infra_files():
    kustomization, cluster = _kustomization(), _one("RayCluster")
    namespace = kustomization["namespace"]
    service = _one("Service")
    image_name = kustomization["images"][0]["name"]
    dockerfile = (INFRA / "Dockerfile").read_text()

    # The Ray Jobs API and MLflow as the flow pods, the RayCluster and the deployments' overrides name them.
    head_port = {p["name"]: p["containerPort"] for p in
                 cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"]}
    ray_address = f"http://{cluster['metadata']['name']}-head-svc.{namespace}.svc:{head_port['dashboard']}"
    mlflow_uri = f"http://{service['metadata']['name']}.{namespace}.svc:{service['spec']['ports'][0]['port']}"
    for d in _deployments("ul-k8s"):
        env = d["work_pool"]["job_variables"]["env"]
        overrides = _overrides(d)
        assert env["RAY_ADDRESS"] == overrides["ray.address"] == ray_address
        assert env["MLFLOW_TRACKING_URI"] == overrides["tracking.uri"] == mlflow_uri
        assert overrides["storage.root"] == DEPLOY_ENV["UL_STORAGE_ROOT"]
        assert overrides["data.root"] == DEPLOY_ENV["UL_DATA_ROOT"]
        assert env["UL_DVC_REMOTE"] == "{{ $UL_DVC_REMOTE }}"
        assert any("$UL_DVC_REMOTE" in json.dumps(step) for step in d["pull"])
    for group in [cluster["spec"]["headGroupSpec"], *cluster["spec"]["workerGroupSpecs"]]:
        assert _env(group["template"]["spec"]["containers"][0])["MLFLOW_TRACKING_URI"]["value"] == mlflow_uri
    mlflow = _env(_one("Deployment")["spec"]["template"]["spec"]["containers"][0])
    allowed = mlflow["MLFLOW_SERVER_ALLOWED_HOSTS"]["value"].split(",")
    assert is_allowed_host_header(allowed, urlsplit(mlflow_uri).netloc), "MLflow would refuse the tracking URI"

    # Ports: what the image exposes is what the pods declare, and the launcher's head listens on the same ones.
    exposed = {int(p) for line in re.findall(r"^EXPOSE (.+)$", dockerfile, re.M) for p in line.split()}
    declared = {p["containerPort"] for c in _containers() for p in c.get("ports", [])}
    assert exposed == declared
    assert service["spec"]["ports"][0]["targetPort"] in {p["name"] for c in _containers() for p in c.get("ports", [])}
    launcher = yaml.safe_load((INFRA / "ray-cluster.yaml").read_text())
    start = " ".join(launcher["head_start_ray_commands"])
    assert f"--port={head_port['gcs-server']}" in start and f"--dashboard-port={head_port['dashboard']}" in start
    assert "--dashboard-host=0.0.0.0" in start and "ray-client-server-port" not in start

    # Image: one name everywhere, tagged by commit, never latest.
    assert f'org.opencontainers.image.title="{image_name}"' in dockerfile
    assert 'org.opencontainers.image.revision="$GIT_SHA"' in dockerfile and "ARG GIT_SHA" in dockerfile
    for container in _containers():
        name, _, tag = container["image"].partition(":")
        assert name == image_name and tag and tag != "latest", container["image"]
    assert kustomization["images"][0]["newTag"] not in ("", "latest")
    launcher_image = launcher["docker"]["image"]
    assert launcher_image.rsplit(":", 1)[0].endswith("/" + image_name)
    assert launcher_image.rsplit(":", 1)[1] not in ("", "latest")

    # Identities and users: the service accounts the pods run as exist; the image's user is the pods' user.
    accounts = {o["metadata"]["name"] for o in _k8s_objects() if o["kind"] == "ServiceAccount"}
    pool_defaults = _work_pool_template()["variables"]["properties"]
    assert pool_defaults["namespace"]["default"] == namespace
    used_accounts = {pool_defaults["service_account_name"]["default"]} | {
        t["spec"]["serviceAccountName"] for o in _k8s_objects() for t in _pod_templates(o)}
    assert used_accounts == accounts
    uid = int(re.search(r"useradd .*--uid (\d+)", dockerfile).group(1))
    assert re.search(rf"^USER {uid}$", dockerfile, re.M)
    assert {t["spec"]["securityContext"]["runAsUser"] for o in _k8s_objects() for t in _pod_templates(o)} == {uid}

    # Ray's token: the Secret KubeRay hands the Ray pods is the one the flow pods read.
    token_ref = _env(_work_pool_template()["job_configuration"]["job_manifest"]["spec"]["template"]["spec"][
        "containers"][0])["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert cluster["spec"]["authOptions"] == {"mode": "token", "secretName": token_ref["name"]}
    assert token_ref["key"] == "auth_token"  # the key KubeRay reads from authOptions.secretName


def _references(node: Any) -> set[tuple[str, str, str]]:
    """(kind, name, key) of every ConfigMap / Secret a manifest refers to; key "" for a whole envFrom source."""
    found = set()
    if isinstance(node, dict):
        for ref, kind in (("configMapKeyRef", "ConfigMap"), ("secretKeyRef", "Secret")):
            if ref in node:
                found.add((kind, node[ref]["name"], node[ref]["key"]))
        for ref, kind in (("configMapRef", "ConfigMap"), ("secretRef", "Secret")):
            if isinstance(node.get(ref), dict) and "name" in node[ref]:
                found.add((kind, node[ref]["name"], ""))
        if node.get("authOptions", {}).get("secretName"):
            found.add(("Secret", node["authOptions"]["secretName"], "auth_token"))
        for value in node.values():
            found |= _references(value)
    elif isinstance(node, list):
        for value in node:
            found |= _references(value)
    return found


def test_every_configmap_and_secret_referenced_is_documented_and_none_is_shipped():
    references = _references(_k8s_objects()) | _references(_work_pool_template())
    assert {kind for kind, _, _ in references} == {"ConfigMap", "Secret"}
    shipped = {o["kind"] for o in _k8s_objects()}
    assert not shipped & {"ConfigMap", "Secret"}, "values of ConfigMaps and Secrets are created by kubectl, not shipped"
    header = (K8S / "kustomization.yaml").read_text()
    readme = (INFRA / "README.md").read_text()
    for kind, name, key in references:
        assert re.search(rf"{kind} {name}\b", header), f"kustomization.yaml does not document {kind} {name}"
        assert name in readme, f"infra/README.md does not say how to create {kind} {name}"
        if key:
            assert key in header, f"kustomization.yaml does not document key {key} of {kind} {name}"


def test_dockerignore_keeps_local_state_out_and_lets_in_what_the_image_copies():
    patterns = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]

    def ignored(path: str) -> bool:  # Docker's rule: the last matching pattern wins; "!" re-includes
        result = False
        for pattern in patterns:
            negate, pattern = pattern.startswith("!"), pattern.lstrip("!")
            regex = re.escape(pattern).replace(r"\*\*/", "(.*/)?").replace(r"\*", "[^/]*")
            if any(re.fullmatch(regex, "/".join(path.split("/")[:i])) for i in range(1, path.count("/") + 2)):
                result = not negate
        return result

    copied = [src for line in re.findall(r"^COPY (.+)$", (INFRA / "Dockerfile").read_text(), re.M)
              for src in line.split()[:-1]]
    assert copied, "no COPY in infra/Dockerfile"
    for src in copied:
        assert not ignored(src), f".dockerignore keeps out {src}, which infra/Dockerfile copies"
    for path in (".git/config", ".venv/bin/python", "data/raw/x.jpg", "outputs/grid.png", "mlruns/0/meta.yaml",
                 "mlflow.db", ".cluster/pg-secret", ".stack/env", "checkpoints/stage1/state.pt", "tests/conftest.py",
                 "ulcore/__pycache__/config.cpython-311.pyc"):
        assert ignored(path), f".dockerignore lets {path} into the build context"


def test_ray_cluster_yaml_validates_against_the_schema_shipped_in_ray():
    raw = yaml.safe_load((INFRA / "ray-cluster.yaml").read_text())
    validate_config(prepare_config(raw))  # jsonschema against ray/autoscaler/ray-schema.json, then Ray's checks
    types = raw["available_node_types"]
    gpu_type = types["gpu-8x"]["node_config"]["InstanceType"]
    assert GPU_MEMORY_GB[gpu_type] > STAGE2_PEAK_GIB * 1.074, f"{gpu_type}: GPUs smaller than stage 2's peak"
    for name, node_type in types.items():
        config = node_type["node_config"]
        assert config["ImageId"] != "latest_dlami", f"{name}: Ray's latest_dlami is a CUDA 11.2 image"
        assert config["SecurityGroupIds"], f"{name}: no security group (Ray's default opens SSH to the world)"
        assert config["IamInstanceProfile"]["Name"]
    text = (INFRA / "ray-cluster.yaml").read_text()
    for need in ("ec2:RunInstances", "ec2:TerminateInstances", "iam:PassRole"):
        assert need in text, f"ray-cluster.yaml does not state the instance profile's {need}"


# ----------------------------------------------------------------------------------------- credentials

CREDENTIAL_PATTERNS = {
    "AWS access key id": re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),
    "AWS secret access key": re.compile(r"(?i)aws_?secret_?access_?key\W{1,4}(?![$<{])([A-Za-z0-9/+=-]{8,})"),
    "private key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    "password in a URI": re.compile(r"://[^/\s:@'\"]+:(?![$<{])[^@\s/'\"]+@"),
    "password literal": re.compile(r"(?i)\b(password|passwd|pwd)\b\s*[:=]\s*(?![$<{\s])['\"]?[^\s'\"]{4,}"),
    "token literal": re.compile(r"(?i)\b(auth_token|api_token|access_token|RAY_AUTH_TOKEN)\b\s*[:=]\s*"
                                r"(?![$<{\s])['\"]?[A-Za-z0-9_\-]{12,}"),
}
# The one literal allowed: the dummy credentials cluster.sh gives the loopback moto S3 server (it accepts any).
LOCAL_DUMMY = "ul-cluster-local"


def _credential_findings(path: Path) -> list[str]:
    text = path.read_text(errors="replace").replace(LOCAL_DUMMY, "$LOCAL_DUMMY")
    return [f"{path}:{text[:m.start()].count(chr(10)) + 1}: {what}"
            for what, pattern in CREDENTIAL_PATTERNS.items() for m in pattern.finditer(text)]


def test_no_file_under_infra_holds_a_credential():
    files = [p for p in INFRA.rglob("*") if p.is_file() and "__pycache__" not in p.parts] + [REPO / ".dockerignore"]
    assert len(files) > 10
    assert [f for p in files for f in _credential_findings(p)] == []
    for obj in _k8s_objects():  # secret-looking env vars only ever come from a Secret
        for template in _pod_templates(obj):
            for container in template["spec"]["containers"]:
                for name, entry in _env(container).items():
                    if re.search(r"PASSWORD|SECRET|TOKEN|BACKEND_STORE_URI|ACCESS_KEY", name):
                        assert "secretKeyRef" in entry.get("valueFrom", {}), f"{name} is not from a Secret"


def test_the_credential_scan_finds_what_it_looks_for(tmp_path):
    planted = tmp_path / "leak.yaml"
    planted.write_text("aws_access_key_id: AKIAABCDEFGHIJKLMNOP\nAWS_SECRET_ACCESS_KEY=abcdEFGH1234abcdEFGH1234\n"
                       "uri: postgresql+psycopg://ul:hunter22@db:5432/mlflow\npassword: hunter22\n"
                       "RAY_AUTH_TOKEN: 0123456789abcdef0123\n-----BEGIN RSA PRIVATE KEY-----\n")
    assert {f.split(": ", 1)[1] for f in _credential_findings(planted)} == set(CREDENTIAL_PATTERNS)
