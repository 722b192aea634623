"""The cluster manifests parse, carry the fields their controllers need, and agree with the code."""

import shlex
from pathlib import Path

import ray
import yaml

from pipeline.config import available_recipes, load_recipe

INFRA = Path(__file__).parents[1] / "infra"


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _containers(pod_template: dict) -> list[dict]:
    return pod_template["spec"]["containers"]


def test_raycluster_has_head_gpu_workers_shared_storage_and_mlflow():
    (cluster,) = _docs(INFRA / "kuberay" / "raycluster.yaml")
    assert (cluster["apiVersion"], cluster["kind"]) == ("ray.io/v1", "RayCluster")
    assert cluster["spec"]["rayVersion"] == ray.__version__
    head = _containers(cluster["spec"]["headGroupSpec"]["template"])[0]
    workers = cluster["spec"]["workerGroupSpecs"]
    assert workers and all(
        _containers(g["template"])[0]["resources"]["limits"]["nvidia.com/gpu"] == "1" for g in workers
    )
    for container in [head] + [_containers(g["template"])[0] for g in workers]:
        env = {e["name"]: e for e in container["env"]}
        assert env["MLFLOW_TRACKING_URI"]["value"] == "http://mlflow:5000"
        assert env["RAY_AUTH_MODE"]["value"] == "token"
        assert any(m["mountPath"] == "/data" for m in container["volumeMounts"])
    (volume,) = _docs(INFRA / "kuberay" / "data-volume.yaml")
    assert volume["spec"]["accessModes"] == ["ReadWriteMany"]
    assert (
        volume["metadata"]["name"]
        == cluster["spec"]["headGroupSpec"]["template"]["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"]
    )


def test_rayjob_runs_a_real_recipe_with_valid_overrides():
    (job,) = _docs(INFRA / "kuberay" / "rayjob.yaml")
    (cluster,) = _docs(INFRA / "kuberay" / "raycluster.yaml")
    assert job["kind"] == "RayJob"
    assert job["spec"]["clusterSelector"]["ray.io/cluster"] == cluster["metadata"]["name"]
    words = shlex.split(job["spec"]["entrypoint"])
    assert words[:4] == ["python", "-m", "pipeline", "run"]
    assert words[4] in available_recipes()
    overrides = [words[i + 1] for i, w in enumerate(words) if w == "--set"]
    recipe = load_recipe(words[4], overrides)  # raises on any key or type the code would reject
    assert recipe.output_dir.startswith("/data/")


def test_mlflow_server_deployment_and_service_agree():
    docs = {d["kind"]: d for d in _docs(INFRA / "mlflow" / "mlflow.yaml")}
    container = _containers(docs["Deployment"]["spec"]["template"])[0]
    assert container["command"] == ["mlflow"] and container["args"][0] == "server"
    assert "--serve-artifacts" in container["args"]
    assert any(a.startswith("--backend-store-uri=") for a in container["args"])
    port = container["ports"][0]["containerPort"]
    assert docs["Service"]["spec"]["ports"][0]["targetPort"] == port == 5000
    assert docs["Service"]["metadata"]["name"] == "mlflow"
    assert docs["Service"]["spec"]["type"] == "ClusterIP"
    assert docs["Deployment"]["spec"]["selector"]["matchLabels"] == docs["Service"]["spec"]["selector"]


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
