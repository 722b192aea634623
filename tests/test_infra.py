"""The cluster manifests parse, carry the fields their controllers need, and agree with the code.

No cluster and no network: the manifests are read as YAML and checked against the installed Ray,
the real recipe loader, the pipeline's metric definitions and the dry-run budget.
"""

import json
import math
import re
import shlex
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import ray
import yaml
from ray.util.metrics import Counter

from pipeline import metrics
from pipeline.budget import training_budget
from pipeline.config import available_recipes, load_recipe

INFRA = Path(__file__).parents[1] / "infra"
RAY_TOKEN_SECRET = ("ray-auth-token", "auth_token")  # KubeRay's data key for the token
GPUS_PER_POD = 8
# the series Grafana charts: Ray exports custom metrics as ray_<name>, counters with _total
PIPELINE_SERIES = {
    "ray_pipeline_samples_in_total",
    "ray_pipeline_samples_kept_total",
    "ray_pipeline_samples_dropped_total",
    "ray_pipeline_samples_failed_total",
    "ray_pipeline_stage_throughput",
}
DATACOMP_SCALES = ["small", "medium", "large", "xlarge"]


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _by_kind(path: Path) -> dict[str, dict]:
    docs = _docs(path)
    kinds = {d["kind"]: d for d in docs}
    assert len(kinds) == len(docs), f"{path.name}: one document per kind expected"
    return kinds


def _cluster() -> dict:
    (cluster,) = _docs(INFRA / "kuberay" / "raycluster.yaml")
    return cluster


def _job() -> dict:
    (job,) = _docs(INFRA / "kuberay" / "rayjob.yaml")
    return job


def _group(cluster: dict, name: str) -> dict:
    (group,) = [g for g in cluster["spec"]["workerGroupSpecs"] if g["groupName"] == name]
    return group


def _gpus(container: dict) -> int:
    resources = container.get("resources", {})
    return max(int(resources.get(k, {}).get("nvidia.com/gpu", 0)) for k in ("requests", "limits"))


def _ray_pod_specs(cluster: dict) -> dict[str, dict]:
    """Pod spec of the head and of each worker group, by name."""
    specs = {"head": cluster["spec"]["headGroupSpec"]["template"]["spec"]}
    specs.update({g["groupName"]: g["template"]["spec"] for g in cluster["spec"]["workerGroupSpecs"]})
    return specs


def _all_containers(doc: dict):
    """Every container (and init container) anywhere in a manifest, wherever it is nested."""
    if isinstance(doc, dict):
        for key, value in doc.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                yield from value
            else:
                yield from _all_containers(value)
    elif isinstance(doc, list):
        for item in doc:
            yield from _all_containers(item)


def _env_lists(doc):
    """Every `env:` list anywhere in a manifest (containers, KubeRay's autoscalerOptions)."""
    if isinstance(doc, dict):
        for key, value in doc.items():
            if key == "env" and isinstance(value, list):
                yield value
            else:
                yield from _env_lists(value)
    elif isinstance(doc, list):
        for item in doc:
            yield from _env_lists(item)


def _secret_refs(doc) -> set[tuple[str, str]]:
    refs = set()
    for env in _env_lists(doc):
        for var in env:
            ref = var.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                refs.add((ref["name"], ref["key"]))
    return refs


def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def _secret(var: dict) -> tuple[str, str]:
    assert "value" not in var, f"{var['name']} is a literal; it must come from a Secret"
    ref = var["valueFrom"]["secretKeyRef"]
    return ref["name"], ref["key"]


def _manifests() -> list[Path]:
    return sorted(p for p in INFRA.rglob("*.yaml") if p.name != "ray-cluster-aws.yaml")


# --- every file parses ---------------------------------------------------------------------


def test_every_yaml_parses_and_every_manifest_names_its_kind():
    paths = sorted(INFRA.rglob("*.yaml"))
    assert len(paths) >= 7
    for path in paths:
        docs = _docs(path)  # yaml.safe_load_all: raises on invalid YAML
        assert docs, f"{path} is empty"
        if path.name == "ray-cluster-aws.yaml":
            continue  # a Ray cluster-launcher config, not a Kubernetes manifest
        for doc in docs:
            assert doc.get("apiVersion") and doc.get("kind") and doc["metadata"].get("name"), path


def test_no_secret_is_written_into_a_manifest():
    for path in _manifests():
        for doc in _docs(path):
            for env in _env_lists(doc):
                for var in env:
                    if re.search(r"TOKEN|PASSWORD|SECRET|ACCESS_KEY|CREDENTIAL", var["name"]):
                        _secret(var)
            assert doc["kind"] != "Secret", f"{path}: create Secrets with kubectl (infra/README.md), not in git"


def test_secrets_the_manifests_use_are_created_by_the_readme():
    readme = (INFRA / "README.md").read_text()
    commands = [c for c in re.sub(r"\\\n\s*", " ", readme).splitlines() if "kubectl create secret generic" in c]
    created: dict[str, str] = {}
    for command in commands:
        name = command.split("kubectl create secret generic", 1)[1].split()[0]
        created[name] = command
    refs = set().union(*(_secret_refs(doc) for path in _manifests() for doc in _docs(path)))
    assert RAY_TOKEN_SECRET in refs
    for name, key in sorted(refs):
        assert name in created, f"infra/README.md never creates the Secret {name}"
        assert f"--from-literal={key}=" in created[name], f"infra/README.md's Secret {name} lacks the key {key}"


# --- Ray cluster ---------------------------------------------------------------------------


def test_raycluster_runs_the_installed_ray_with_token_auth_from_a_secret():
    cluster = _cluster()
    assert (cluster["apiVersion"], cluster["kind"]) == ("ray.io/v1", "RayCluster")
    assert cluster["spec"]["rayVersion"] == ray.__version__
    # the operator gets the same Secret, so its RayJob calls to the dashboard carry the token
    assert cluster["spec"]["authOptions"] == {"mode": "token", "secretName": RAY_TOKEN_SECRET[0]}
    containers = list(_all_containers(cluster)) + list(_all_containers(_job()))
    envs = [_env(c) for c in containers] + [_env(cluster["spec"]["autoscalerOptions"])]
    assert len(envs) == 5  # head, cpu, gpu-8x, the RayJob's submitter, the autoscaler sidecar
    for env in envs:
        assert env["RAY_AUTH_MODE"]["value"] == "token"
        assert _secret(env["RAY_AUTH_TOKEN"]) == RAY_TOKEN_SECRET


def test_head_has_no_gpu_and_the_dashboard_stays_inside_the_cluster():
    head_group = _cluster()["spec"]["headGroupSpec"]
    (head,) = head_group["template"]["spec"]["containers"]
    assert _gpus(head) == 0
    assert head_group["rayStartParams"]["num-cpus"] == "0"  # no Ray tasks next to the driver
    assert "serviceType" not in head_group or head_group["serviceType"] == "ClusterIP"
    readme = (INFRA / "README.md").read_text()
    assert "kubectl port-forward svc/clip-pipeline-head-svc 8265:8265" in readme
    assert "http://127.0.0.1:8265" in readme and "paste the token" in readme


def test_cpu_group_autoscales_and_has_no_gpus():
    cluster = _cluster()
    assert cluster["spec"]["enableInTreeAutoscaling"] is True
    group = _group(cluster, "cpu")
    (container,) = group["template"]["spec"]["containers"]
    assert _gpus(container) == 0
    assert 0 <= group["minReplicas"] < group["maxReplicas"]
    assert group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"]


def test_gpu_group_has_8_gpus_per_pod_guaranteed_resources_and_shm():
    group = _group(_cluster(), "gpu-8x")
    spec = group["template"]["spec"]
    (container,) = spec["containers"]
    resources = container["resources"]
    assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"] == str(GPUS_PER_POD)
    for kind in ("cpu", "memory"):
        assert resources["requests"][kind] == resources["limits"][kind], f"gpu-8x {kind}: requests != limits"
    (shm,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/dev/shm"]
    (volume,) = [v for v in spec["volumes"] if v["name"] == shm["name"]]
    assert volume["emptyDir"]["medium"] == "Memory"
    assert 0 <= group["minReplicas"] < group["maxReplicas"]


def test_gpu_group_is_sized_to_the_largest_datacomp_recipe():
    group = _group(_cluster(), "gpu-8x")
    for scale in DATACOMP_SCALES:
        train = load_recipe(f"datacomp_{scale}").train
        assert train.use_gpu
        pods = math.ceil(train.workers / GPUS_PER_POD)
        assert pods <= group["maxReplicas"], f"datacomp_{scale} needs {pods} gpu-8x pods"


def test_ray_pods_mount_the_shared_volume_the_code_still_needs():
    (volume,) = _docs(INFRA / "kuberay" / "data-volume.yaml")
    assert volume["kind"] == "PersistentVolumeClaim"
    assert volume["spec"]["accessModes"] == ["ReadWriteMany"]
    for name, spec in _ray_pod_specs(_cluster()).items():
        (container,) = spec["containers"]
        (data,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/data"]
        (source,) = [v for v in spec["volumes"] if v["name"] == data["name"]]
        assert source["persistentVolumeClaim"]["claimName"] == volume["metadata"]["name"], name


# --- RayJob --------------------------------------------------------------------------------


def test_rayjob_runs_a_real_recipe_with_valid_overrides():
    job, cluster = _job(), _cluster()
    assert job["kind"] == "RayJob"
    assert job["spec"]["clusterSelector"]["ray.io/cluster"] == cluster["metadata"]["name"]
    words = shlex.split(job["spec"]["entrypoint"])
    assert words[:4] == ["python", "-m", "pipeline", "run"]
    assert words[4] in available_recipes()
    overrides = [words[i + 1] for i, w in enumerate(words) if w == "--set"]
    assert len(overrides) == words.count("--set") and len(words) == 5 + 2 * len(overrides)
    recipe = load_recipe(words[4], overrides)  # raises on any key or type the code would reject
    # the code writes the run folder, shards and checkpoints with pathlib: a URL would become a
    # local folder named "s3:", so output_dir must be on the shared volume
    assert "://" not in recipe.output_dir and recipe.output_dir.startswith("/data/")
    # the source table is read through fsspec: a URL needs its backend in the image
    scheme = urlsplit(recipe.source.path).scheme
    backends = {"": None, "s3": "s3fs", "gs": "gcsfs", "gcs": "gcsfs"}
    assert scheme in backends, f"source.path scheme {scheme!r}"
    if backends[scheme]:
        assert backends[scheme] in (INFRA / "Dockerfile").read_text()
    else:
        assert recipe.source.path.startswith("/data/")


def test_rayjob_training_fits_the_gpu_pods():
    (words, cluster) = (shlex.split(_job()["spec"]["entrypoint"]), _cluster())
    recipe = load_recipe(words[4], [words[i + 1] for i, w in enumerate(words) if w == "--set"])
    (container,) = _group(cluster, "gpu-8x")["template"]["spec"]["containers"]
    pod_cpus = int(container["resources"]["limits"]["cpu"])
    workers_per_pod = min(recipe.train.workers, GPUS_PER_POD)
    assert workers_per_pod * recipe.train.threads_per_worker <= pod_cpus


# --- MLflow --------------------------------------------------------------------------------


def test_mlflow_uses_postgres_from_a_secret_basic_auth_and_serves_artifacts():
    docs = _by_kind(INFRA / "mlflow" / "mlflow.yaml")
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = _env(container)
    assert container["command"] == ["mlflow"] and container["args"][0] == "server"
    args = dict(a.split("=", 1) for a in container["args"][1:] if "=" in a)
    assert args["--app-name"] == "basic-auth"
    assert "--serve-artifacts" in container["args"]
    assert urlsplit(args["--artifacts-destination"]).scheme in {"s3", "gs"}
    # postgresql://$(DB_USER):$(DB_PASSWORD)@host:5432/db, each $(VAR) from a Secret
    backend = urlsplit(args["--backend-store-uri"])
    assert backend.scheme == "postgresql"
    placeholders = re.findall(r"\$\((\w+)\)", args["--backend-store-uri"])
    assert len(placeholders) == 2
    db_secrets = {_secret(env[name]) for name in placeholders}
    # basic-auth: admin login from a Secret, user store in PostgreSQL via the init container's ini
    for name in ("MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"):
        _secret(env[name])
    (init,) = pod["initContainers"]
    script = init["args"][0]
    ini_path = env["MLFLOW_AUTH_CONFIG_PATH"]["value"]
    assert f"cat > {ini_path} <<EOF" in script
    assert re.search(r"^database_uri = postgresql://", script, re.M)
    assert {_secret(v) for v in _env(init).values()} == db_secrets
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    init_mounts = {m["mountPath"]: m["name"] for m in init["volumeMounts"]}
    assert mounts[str(Path(ini_path).parent)] == init_mounts[str(Path(ini_path).parent)]
    # the database host is the PostgreSQL Service, logging in with the same Secret it was created with
    pg = _by_kind(INFRA / "mlflow" / "postgres.yaml")
    assert backend.hostname == pg["Service"]["metadata"]["name"] and backend.port == 5432
    (postgres,) = pg["StatefulSet"]["spec"]["template"]["spec"]["containers"]
    pg_env = _env(postgres)
    assert {_secret(pg_env["POSTGRES_USER"]), _secret(pg_env["POSTGRES_PASSWORD"])} == db_secrets
    assert pg["StatefulSet"]["spec"]["selector"]["matchLabels"] == pg["Service"]["spec"]["selector"]


def test_mlflow_service_is_cluster_internal_and_the_ray_pods_log_in_to_it():
    docs = _by_kind(INFRA / "mlflow" / "mlflow.yaml")
    (container,) = docs["Deployment"]["spec"]["template"]["spec"]["containers"]
    service = docs["Service"]
    port = container["ports"][0]["containerPort"]
    assert service["spec"]["type"] == "ClusterIP"
    assert service["spec"]["ports"][0]["targetPort"] == port == 5000
    assert docs["Deployment"]["spec"]["selector"]["matchLabels"] == service["spec"]["selector"]
    allowed = next(a.split("=", 1)[1] for a in container["args"] if a.startswith("--allowed-hosts=")).split(",")
    for name, spec in _ray_pod_specs(_cluster()).items():
        (ray_container,) = spec["containers"]
        env = _env(ray_container)
        uri = urlsplit(env["MLFLOW_TRACKING_URI"]["value"])
        assert (uri.hostname, uri.port) == (service["metadata"]["name"], service["spec"]["ports"][0]["port"]), name
        assert uri.netloc in allowed, f"MLflow would reject the Host header {uri.netloc}"
        _secret(env["MLFLOW_TRACKING_USERNAME"])
        _secret(env["MLFLOW_TRACKING_PASSWORD"])


# --- monitoring ----------------------------------------------------------------------------


def test_podmonitors_scrape_ports_the_ray_pods_name():
    cluster = _cluster()
    specs = _ray_pod_specs(cluster)
    ports = {
        "head": {p["name"]: p["containerPort"] for p in specs["head"]["containers"][0]["ports"]},
        "worker": {
            name: {p["name"]: p["containerPort"] for p in spec["containers"][0]["ports"]}
            for name, spec in specs.items()
            if name != "head"
        },
    }
    monitors = _docs(INFRA / "monitoring" / "podmonitors.yaml")
    assert {m["kind"] for m in monitors} == {"PodMonitor"}
    seen = set()
    for monitor in monitors:
        labels = monitor["spec"]["selector"]["matchLabels"]
        assert labels["ray.io/cluster"] == cluster["metadata"]["name"]
        node_type = labels["ray.io/node-type"]
        seen.add(node_type)
        for endpoint in monitor["spec"]["podMetricsEndpoints"]:
            groups = [ports["head"]] if node_type == "head" else list(ports["worker"].values())
            assert all(endpoint["port"] in g for g in groups), f"{node_type} pods lack port {endpoint['port']}"
    assert seen == {"head", "worker"}
    # the head's `metrics` port is where Ray's metrics agent (and the driver's counters) export
    head_params = cluster["spec"]["headGroupSpec"]["rayStartParams"]
    assert int(head_params["metrics-export-port"]) == ports["head"]["metrics"]
    for group in cluster["spec"]["workerGroupSpecs"]:
        assert int(group["rayStartParams"]["metrics-export-port"]) == ports["worker"][group["groupName"]]["metrics"]


_PROMQL_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset"}
_PROMQL_KEYWORDS |= {"and", "or", "unless"}


def _promql_metric_names(expr: str) -> set[str]:
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # range selectors
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    names = set()
    for match in re.finditer(r"(?<![\w:.$])[A-Za-z_:][\w:]*", text):
        if match.group() in _PROMQL_KEYWORDS or re.match(r"\s*\(", text[match.end() :]):
            continue  # a keyword, or a function / aggregation being called
        names.add(match.group())
    return names


def _promql_labels(expr: str) -> set[str]:
    grouped = re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr)
    matched = [m for sel in re.findall(r"\{([^}]*)\}", expr) for m in re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", sel)]
    return {label.strip() for group in grouped for label in group.split(",") if label.strip()} | set(matched)


def _dashboard_queries(dashboard: dict) -> list[str]:
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    for var in dashboard["templating"]["list"]:
        if var["type"] != "query":
            continue
        query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", query.strip())
        assert match, f"unexpected variable query {query!r}"
        exprs.append(match.group(1))
    return exprs


def _code_series() -> dict[str, tuple[str, ...]]:
    """The Prometheus series pipeline/metrics.py defines, with their tag keys."""
    make = getattr(metrics._instruments, "__wrapped__", metrics._instruments)  # uncached: a fresh set
    series = {}
    for instrument in make().values():
        info = instrument.info
        suffix = "_total" if isinstance(instrument, Counter) else ""
        series[f"ray_{info['name']}{suffix}"] = tuple(info["tag_keys"])
    return series


def test_grafana_dashboard_charts_the_pipeline_metrics_the_code_exports():
    assert set(_code_series()) == PIPELINE_SERIES
    (path,) = sorted((INFRA / "grafana").glob("*.json"))
    dashboard = json.loads(path.read_text())
    queried = set()
    for expr in _dashboard_queries(dashboard):
        names = _promql_metric_names(expr)
        assert names and names <= PIPELINE_SERIES, f"{expr!r} queries {sorted(names - PIPELINE_SERIES)}"
        queried |= names
        tags = set.intersection(*(set(_code_series()[n]) for n in names))
        extra = _promql_labels(expr) - tags - {"ray_io_cluster"}  # ray_io_cluster: the PodMonitors add it
        assert not extra, f"{expr!r} uses labels {sorted(extra)} that {sorted(names)} do not have"
    assert queried == PIPELINE_SERIES
    readme = (INFRA / "README.md").read_text()
    assert f"--from-file={path.name}=infra/grafana/{path.name}" in readme


def test_promql_metric_name_extraction():
    expr = 'sum by (stage) (rate(ray_a_total{x=~"$c"}[5m])) / ignoring(reason) ray_b + 1e3 * on (x) up'
    assert _promql_metric_names(expr) == {"ray_a_total", "ray_b", "up"}
    assert _promql_labels(expr) == {"stage", "x"}


# --- README sizing table ------------------------------------------------------------------


def _readme_rows() -> dict[str, list[str]]:
    rows = {}
    for line in (INFRA / "README.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells and cells[0] in DATACOMP_SCALES:
            rows[cells[0]] = cells
    return rows


def _number(text: str) -> float:
    return float(re.search(r"[\d,]+(?:\.\d+)?", text).group().replace(",", ""))


@pytest.mark.parametrize("scale", DATACOMP_SCALES)
def test_readme_sizing_table_follows_the_dry_run_budget(scale):
    """The README's per-scale figures are the dry run's (pipeline/budget.py), wall time = A100-hours / GPUs."""
    cells = _readme_rows()[scale]
    recipe = load_recipe(f"datacomp_{scale}")
    budget = training_budget(recipe.train.model, recipe.train.samples_seen)
    assert cells[1] == f"`python -m pipeline run datacomp_{scale} --dry-run`"
    assert cells[3] == recipe.train.model
    assert int(_number(cells[4])) == recipe.train.workers
    assert int(_number(cells[5])) == math.ceil(recipe.train.workers / GPUS_PER_POD)
    assert float(cells[6]) == pytest.approx(budget.macs, rel=0.06)  # printed with 2 significant digits
    assert _number(cells[7]) == round(budget.reference_gpu_hours, 1)
    wall = float(re.search(r"~([\d.]+) h", cells[8]).group(1))
    assert wall == pytest.approx(budget.reference_gpu_hours / recipe.train.workers, abs=0.05)


# --- the rest ------------------------------------------------------------------------------


def test_cluster_launcher_config_is_complete():
    (config,) = _docs(INFRA / "ray-cluster-aws.yaml")
    for key in ["cluster_name", "provider", "available_node_types", "head_node_type", "head_start_ray_commands"]:
        assert key in config
    assert config["head_node_type"] in config["available_node_types"]
    assert any("--dashboard-host=127.0.0.1" in c for c in config["head_start_ray_commands"])


def test_dockerfile_uses_the_pinned_ray_and_installs_the_packages():
    text = (INFRA / "Dockerfile").read_text()
    assert f"FROM rayproject/ray:{ray.__version__}-py311" in text
    for package in ["pipeline", "stages", "filters"]:
        assert f"COPY {package} ./{package}" in text
    assert "pip install --no-cache-dir ." in text
    # fsspec backends; MLflow's PostgreSQL driver; Flask-WTF for the basic-auth app mlflow.yaml runs
    for extra in ["s3fs", "gcsfs", "psycopg2-binary", "mlflow[auth]"]:
        assert extra in text
