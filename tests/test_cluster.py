"""Cluster configs (ray up, KubeRay, Dockerfile, runtime env) and Ray token auth on real local clusters.

Static checks are fast. The ``slow`` tests start real ``ray start`` clusters through
``tests/cluster_utils.py`` (own temp dirs, free ports, teardown that never runs ``ray stop``).
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
import yaml

try:
    from cluster_utils import _clean_env, free_ports, local_ray_cluster
except ImportError:  # tests/ imported as a package
    from tests.cluster_utils import _clean_env, free_ports, local_ray_cluster

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
KUBERAY = CLUSTER / "kuberay"
RAY_UP_CONFIGS = {"aws": CLUSTER / "aws-gpu.yaml", "gcp": CLUSTER / "gcp-gpu.yaml"}
RAYJOBS = {name: KUBERAY / f"rayjob-{name}.yaml" for name in ("train", "tune", "score")}
SECRET_NAME = "koa-ray-auth-token"
STORAGE_MOUNT = "/mnt/cluster_storage"
PY_TAG = "py311"


# --------------------------------------------------------------------------- #
# helpers
# --------------------------------------------------------------------------- #
def _installed_ray_version() -> str:
    import ray

    return ray.__version__


def _pyproject_ray_pin() -> str:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    for dep in deps:
        m = re.fullmatch(r"\s*ray(\[[^\]]*\])?\s*==\s*([0-9][^\s;,]*)\s*", dep)
        if m:
            return m.group(2)
    raise AssertionError(f"no exact ray==X pin in pyproject dependencies: {deps}")


@pytest.fixture(scope="module")
def ray_version() -> str:
    return _installed_ray_version()


def _docs(path: Path) -> list[Any]:
    with path.open() as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def _one(path: Path) -> dict:
    docs = _docs(path)
    assert len(docs) == 1, f"{path.name}: expected one YAML document, got {len(docs)}"
    return docs[0]


def _all_yaml_files() -> list[Path]:
    return sorted(p for p in CLUSTER.rglob("*") if p.suffix in (".yaml", ".yml"))


def _kuberay_objects() -> Iterator[tuple[Path, dict]]:
    for path in sorted(KUBERAY.glob("*.y*ml")):
        for doc in _docs(path):
            yield path, doc


def _cluster_spec(obj: dict) -> dict:
    if obj["kind"] == "RayCluster":
        return obj["spec"]
    if obj["kind"] == "RayJob":
        return obj["spec"]["rayClusterSpec"]
    raise AssertionError(obj["kind"])


def _ray_container(pod_template: dict) -> dict:
    # KubeRay treats containers[0] as the Ray container.
    return pod_template["spec"]["containers"][0]


def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def _assert_token_env(container: dict, where: str) -> None:
    env = _env(container)
    assert env.get("RAY_AUTH_MODE", {}).get("value") == "token", f"{where}: RAY_AUTH_MODE=token missing"
    tok = env.get("RAY_AUTH_TOKEN", {})
    assert "value" not in tok, f"{where}: RAY_AUTH_TOKEN must come from a Secret, not a literal"
    ref = tok.get("valueFrom", {}).get("secretKeyRef", {})
    assert ref == {"name": SECRET_NAME, "key": "auth_token"}, f"{where}: RAY_AUTH_TOKEN secretKeyRef {ref}"


def _all_containers(obj: Any) -> Iterator[dict]:
    """Every dict that has an 'image' and a 'name' (containers anywhere in a manifest)."""
    if isinstance(obj, dict):
        if "image" in obj and "name" in obj:
            yield obj
        for v in obj.values():
            yield from _all_containers(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _all_containers(v)


def _check_image(image: str, ver: str, where: str) -> None:
    repo, _, tag = image.rpartition(":")
    assert repo and tag, f"{where}: image {image!r} has no tag"
    if repo in ("rayproject/ray", "docker.io/rayproject/ray"):
        assert re.fullmatch(rf"{re.escape(ver)}-{PY_TAG}-(gpu|cu\d+)", tag), f"{where}: {image}"
    else:  # our own build of cluster/Dockerfile: the tag records the Ray version
        assert f"ray{ver}" in tag and PY_TAG in tag, f"{where}: {image} tag must contain ray{ver} and {PY_TAG}"


def _non_comment_lines(path: Path) -> list[str]:
    return [ln for ln in path.read_text().splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


# --------------------------------------------------------------------------- #
# versions / parsing
# --------------------------------------------------------------------------- #
def test_ray_version_pins_agree(ray_version):
    assert _pyproject_ray_pin() == ray_version == "2.60.0"


def test_expected_files_exist():
    for rel in (
        "README.md", "Dockerfile", "runtime_env.yaml", "local_cluster.sh", "aws-gpu.yaml", "gcp-gpu.yaml",
        "kuberay/raycluster.yaml", "kuberay/rayjob-train.yaml", "kuberay/rayjob-tune.yaml",
        "kuberay/rayjob-score.yaml", "kuberay/secret-ray-token.example.yaml",
    ):
        assert (CLUSTER / rel).is_file(), rel


@pytest.mark.parametrize("path", _all_yaml_files(), ids=lambda p: str(p.relative_to(CLUSTER)))
def test_every_yaml_parses(path):
    docs = _docs(path)
    assert docs, f"{path} is empty"
    assert all(isinstance(d, dict) for d in docs)


def test_every_ray_version_string_matches(ray_version):
    """Any `rayVersion`, `ray==X`, `rayproject/ray:X` or `ray[...]==X` in cluster/ equals the installed Ray."""
    patterns = [
        r"rayVersion:\s*[\"']?([0-9][0-9.]*)",
        r"rayproject/ray:([0-9][0-9.]*[0-9])",
        r"\bray(?:\[[^\]]*\])?==([0-9][0-9.]*[0-9])",
        r"ray\.__version__ == '([0-9.]+)'",
    ]
    found = 0
    for path in sorted(CLUSTER.rglob("*")):
        if not path.is_file():
            continue
        text = path.read_text(errors="replace")
        for pat in patterns:
            for m in re.finditer(pat, text):
                found += 1
                assert m.group(1) == ray_version, f"{path.relative_to(REPO)}: {m.group(0)!r}"
    assert found >= 15


# --------------------------------------------------------------------------- #
# ray up
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("cloud", sorted(RAY_UP_CONFIGS))
def test_ray_up_required_fields(cloud, ray_version):
    cfg = _one(RAY_UP_CONFIGS[cloud])
    for key in ("cluster_name", "provider", "available_node_types", "head_node_type", "docker",
                "setup_commands", "head_start_ray_commands", "worker_start_ray_commands"):
        assert cfg.get(key), f"{cloud}: missing {key}"
    assert cfg["provider"]["type"] == cloud
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0, "head must be CPU-only"

    gpu_groups = {n: t for n, t in types.items() if n != cfg["head_node_type"] and t["resources"].get("GPU", 0) >= 1}
    assert gpu_groups, "no GPU worker group"
    for name, t in gpu_groups.items():
        assert t["min_workers"] == 0 and t["max_workers"] >= 1, f"{name} must autoscale from 0"
        if cloud == "aws":
            family = t["node_config"]["InstanceType"].split(".")[0]
            assert family in {"g5", "g6", "g6e", "p4d", "p4de", "p5", "p5e", "p5en"}, name
        else:
            machine = t["node_config"]["machineType"]
            assert machine.split("-")[0] in {"g2", "a2", "a3"}, name
            assert {"onHostMaintenance": "TERMINATE"} in t["node_config"]["scheduling"], name

    _check_image(cfg["docker"]["image"], ray_version, f"{cloud} docker.image")
    setup = "\n".join(cfg["setup_commands"])
    assert f'"ray[default,data,train,tune]=={ray_version}"' in setup
    assert "pip install" in setup and "~/koa-ray" in setup, "setup must install this package"
    assert cfg["file_mounts"]["~/koa-ray"] == "."


@pytest.mark.parametrize("cloud", sorted(RAY_UP_CONFIGS))
def test_ray_up_validates_against_ray_schema(cloud):
    import jsonschema
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(_one(RAY_UP_CONFIGS[cloud]), schema)


@pytest.mark.parametrize("cloud", sorted(RAY_UP_CONFIGS))
def test_ray_up_token_auth_and_private_dashboard(cloud):
    cfg = _one(RAY_UP_CONFIGS[cloud])
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        cmds = "\n".join(cfg[key])
        start = [c for c in cfg[key] if "ray start" in c]
        assert start, key
        for c in start:
            assert re.search(r"\bexport RAY_AUTH_MODE=token\b", c), f"{key}: {c}"
            assert "RAY_AUTH_TOKEN_PATH=$HOME/.ray/auth_token" in c, f"{key}: {c}"
        assert "0.0.0.0" not in cmds
    head = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head
    # the token file is shipped to every node and its absence stops setup
    assert cfg["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert any("test -s ~/.ray/auth_token" in c for c in cfg["setup_commands"])


# --------------------------------------------------------------------------- #
# KubeRay
# --------------------------------------------------------------------------- #
def _ray_objects() -> list[tuple[Path, dict]]:
    return [(p, d) for p, d in _kuberay_objects() if d.get("apiVersion", "").startswith("ray.io/")]


def test_kuberay_kinds():
    kinds = {p.name: d["kind"] for p, d in _ray_objects()}
    assert kinds == {
        "raycluster.yaml": "RayCluster",
        "rayjob-train.yaml": "RayJob",
        "rayjob-tune.yaml": "RayJob",
        "rayjob-score.yaml": "RayJob",
    }
    assert all(d["apiVersion"] == "ray.io/v1" for _, d in _ray_objects())


@pytest.mark.parametrize("path", [KUBERAY / "raycluster.yaml", *RAYJOBS.values()], ids=lambda p: p.name)
def test_kuberay_cluster_spec(path, ray_version):
    obj = _one(path)
    spec = _cluster_spec(obj)
    assert str(spec["rayVersion"]) == ray_version
    assert spec["authOptions"] == {"mode": "token", "secretName": SECRET_NAME}
    assert spec.get("enableInTreeAutoscaling") is True

    head = spec["headGroupSpec"]
    assert head.get("serviceType", "ClusterIP") == "ClusterIP"
    assert head.get("enableIngress", False) is False
    head_c = _ray_container(head["template"])
    _assert_token_env(head_c, f"{path.name} head")
    assert head_c.get("workingDir") == "/app"
    assert "nvidia.com/gpu" not in head_c["resources"].get("limits", {}), "head must be CPU-only"

    workers = spec["workerGroupSpecs"]
    gpu_groups = [w for w in workers if int(_ray_container(w["template"])["resources"]["limits"].get("nvidia.com/gpu", 0)) >= 1]
    assert gpu_groups, f"{path.name}: no GPU worker group"
    for w in workers:
        c = _ray_container(w["template"])
        _assert_token_env(c, f"{path.name} worker group {w['groupName']}")
        assert c.get("workingDir") == "/app"
        assert w["minReplicas"] == 0 and w["maxReplicas"] >= 1 and w["maxReplicas"] >= w["replicas"]
        assert any(t.get("key") == "nvidia.com/gpu" for t in w["template"]["spec"].get("tolerations", []))

    # shared storage: the PVC mounted at /mnt/cluster_storage on head and every worker
    for tmpl in [head["template"], *(w["template"] for w in workers)]:
        c = _ray_container(tmpl)
        mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
        assert STORAGE_MOUNT in mounts
        vols = {v["name"]: v for v in tmpl["spec"]["volumes"]}
        assert vols[mounts[STORAGE_MOUNT]]["persistentVolumeClaim"]["claimName"] == "koa-ray-cluster-storage"

    for c in _all_containers(obj):
        _check_image(c["image"], ray_version, f"{path.name} container {c['name']}")


@pytest.mark.parametrize("job", sorted(RAYJOBS))
def test_rayjob_entrypoint_and_submitter(job):
    obj = _one(RAYJOBS[job])
    spec = obj["spec"]
    entry = " ".join(spec["entrypoint"].split())
    assert entry.startswith(f"python jobs/{job}.py "), entry
    # every path the job reads or writes is on the shared volume (pods are ephemeral)
    paths = re.findall(r"\s(/\S+)", entry)
    assert paths and all(p.startswith(STORAGE_MOUNT + "/") for p in paths), entry
    if job == "train":
        assert re.search(rf"--storage-path {re.escape(STORAGE_MOUNT)}/\S+", entry), entry
    if job in ("train", "tune"):  # a sweep's folder (Tune experiment + every trial's Train run) is its --out
        assert re.search(rf"--out {re.escape(STORAGE_MOUNT)}/\S+", entry), "run dir must be shared"
        assert ("--gpu" if job == "train" else "--gpus-per-trial") in entry
    else:  # jobs/score.py: no --storage-path; reads the train run dir from shared storage
        assert re.search(rf"--checkpoint {re.escape(STORAGE_MOUNT)}/runs/koa-train\b", entry), entry
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec.get("submissionMode", "K8sJobMode") == "K8sJobMode"
    _assert_token_env(_ray_container(spec["submitterPodTemplate"]), f"{job} submitter")
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert "RAY_AUTH_TOKEN" not in json.dumps(runtime_env)
    # the object-storage alternative is documented next to the PVC default
    text = RAYJOBS[job].read_text()
    assert "s3://" in text and "gs://" in text


def _job_help(script: Path) -> str:
    env = _clean_env()
    env["PYTHONPATH"] = str(REPO)
    proc = subprocess.run([sys.executable, str(script), "--help"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, f"{script.name} --help failed:\n{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.mark.parametrize("job", sorted(RAYJOBS))
def test_rayjob_flags_exist_in_job_script(job):
    """Once jobs/<job>.py exists, every flag the RayJob passes must appear in its --help."""
    script = REPO / "jobs" / f"{job}.py"
    if not script.exists():
        pytest.skip(f"{script.relative_to(REPO)} not written yet")
    flags = re.findall(r"(--[a-z][a-z0-9-]*)", _one(RAYJOBS[job])["spec"]["entrypoint"])
    help_text = _job_help(script)
    missing = [f for f in flags if f not in help_text]
    assert not missing, f"rayjob-{job}.yaml passes flags unknown to jobs/{job}.py: {missing}"


def test_secret_example_and_no_committed_tokens():
    secret = _one(KUBERAY / "secret-ray-token.example.yaml")
    assert secret["kind"] == "Secret" and secret["metadata"]["name"] == SECRET_NAME
    assert set(secret["stringData"]) == {"auth_token"}
    assert "REPLACE_ME" in secret["stringData"]["auth_token"]
    # no real-looking token (ray get-auth-token / openssl rand -hex 32 format) anywhere in cluster/
    for path in CLUSTER.rglob("*"):
        if path.is_file():
            assert not re.search(r"\b[0-9a-f]{64}\b", path.read_text(errors="replace")), path
    ignored = (CLUSTER / ".gitignore").read_text()
    assert "secret-ray-token.yaml" in ignored and ".secrets/" in ignored


def test_pvc_is_read_write_many():
    pvc = _one(KUBERAY / "pvc-cluster-storage.yaml")
    assert pvc["kind"] == "PersistentVolumeClaim" and pvc["metadata"]["name"] == "koa-ray-cluster-storage"
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]


def test_no_public_exposure():
    """No LoadBalancer/NodePort Service, no Ingress/Route/Gateway, no enableIngress anywhere."""
    def walk(o: Any, path: str = "") -> Iterator[tuple[str, Any]]:
        if isinstance(o, dict):
            for k, v in o.items():
                yield f"{path}.{k}", v
                yield from walk(v, f"{path}.{k}")
        elif isinstance(o, list):
            for i, v in enumerate(o):
                yield from walk(v, f"{path}[{i}]")

    for path, doc in _kuberay_objects():
        assert doc["kind"] not in {"Ingress", "Route", "Gateway", "HTTPRoute", "IngressRoute"}, path
        if doc["kind"] == "Service":
            assert doc["spec"].get("type", "ClusterIP") == "ClusterIP", path
        for key, value in walk(doc):
            if key.endswith((".serviceType", ".type")) and isinstance(value, str):
                assert value not in {"LoadBalancer", "NodePort"}, f"{path.name}: {key}={value}"
            if key.endswith(".enableIngress"):
                assert value is False, f"{path.name}: {key}"
    for path in [*RAY_UP_CONFIGS.values(), *sorted(KUBERAY.glob("*.yaml"))]:
        for line in _non_comment_lines(path):
            assert "LoadBalancer" not in line and "NodePort" not in line, f"{path.name}: {line}"


# --------------------------------------------------------------------------- #
# Dockerfile / runtime env / helper script / README
# --------------------------------------------------------------------------- #
def test_dockerfile(ray_version):
    text = (CLUSTER / "Dockerfile").read_text()
    froms = re.findall(r"^FROM\s+(\S+)", text, flags=re.M)
    assert froms == [f"rayproject/ray:{ray_version}-{PY_TAG}-gpu"], froms
    assert f'"ray[default,data,train,tune]=={ray_version}"' in text
    assert re.search(r"pip install .*\"/app\"", text), "Dockerfile must install this package"
    assert re.search(r"^WORKDIR /app\s*$", text, flags=re.M)
    assert not re.search(r"^(ENV|ARG)\s.*RAY_AUTH_TOKEN", text, flags=re.M), "no token baked into the image"


def test_runtime_env():
    from ray._private.thirdparty.pathspec import PathSpec

    renv = _one(CLUSTER / "runtime_env.yaml")
    assert renv["working_dir"] == "."
    assert "RAY_AUTH_TOKEN" not in json.dumps(renv)
    assert not ({"pip", "uv", "conda"} & set(renv)), "dependencies come from the image, not per job"
    spec = PathSpec.from_lines("gitwildmatch", renv["excludes"])
    excluded = {p: spec.match_file(p) for p in (
        ".venv/bin/python", ".git/HEAD", "data/img.png", "runs/x/ckpt.pt", "koa_ray/__pycache__/a.pyc",
        "koa_ray/data/__init__.py", "koa_ray/data/ingest.py", "jobs/train.py", "koa_ray/__init__.py",
    )}
    assert all(excluded[p] for p in (".venv/bin/python", ".git/HEAD", "data/img.png", "runs/x/ckpt.pt",
                                      "koa_ray/__pycache__/a.pyc")), excluded
    assert not any(excluded[p] for p in ("koa_ray/data/__init__.py", "koa_ray/data/ingest.py",
                                         "jobs/train.py", "koa_ray/__init__.py")), excluded


def test_local_cluster_script_static():
    script = CLUSTER / "local_cluster.sh"
    assert script.stat().st_mode & stat.S_IXUSR, "local_cluster.sh must be executable"
    subprocess.run(["bash", "-n", str(script)], check=True)
    code = "\n".join(_non_comment_lines(script))
    assert "--dashboard-host 127.0.0.1" in code and "--node-ip-address 127.0.0.1" in code
    assert "RAY_AUTH_MODE=token" in code and "RAY_AUTH_TOKEN_PATH=" in code
    assert not re.search(r"(ray|\"\$RAY\")\s+stop\b", code), "must not use the machine-wide `ray stop`"
    usage = subprocess.run(["bash", str(script)], capture_output=True, text=True)
    assert usage.returncode == 2 and "start|stop" in usage.stderr


def test_readme_documents_the_commands():
    text = (CLUSTER / "README.md").read_text()
    for needle in (
        "# Running on a cluster",
        "ray start --head --node-ip-address 127.0.0.1 --dashboard-host 127.0.0.1",
        "ray job submit --address http://127.0.0.1:8265 --working-dir .",
        "ray get-auth-token --generate",
        "RAY_AUTH_MODE=token", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_TOKEN",
        "ray up cluster/aws-gpu.yaml", "cluster/gcp-gpu.yaml",
        "helm install kuberay-operator", "kubectl apply -f cluster/kuberay/",
        "kubectl port-forward svc/koa-ray-head-svc 8265:8265",
        "kubectl create secret generic koa-ray-auth-token",
        "--storage-path", "s3://", "gs://", "shared storage",
        "cluster/local_cluster.sh start",
    ):
        assert needle in text, needle


# --------------------------------------------------------------------------- #
# cluster_utils (no Ray processes)
# --------------------------------------------------------------------------- #
def test_free_ports_distinct():
    ports = free_ports(6)
    assert len(set(ports)) == 6 and all(1024 < p < 65536 for p in ports)


def test_clean_env_strips_auth_and_address(monkeypatch):
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("RAY_AUTH_TOKEN", "x")
    monkeypatch.setenv("RAY_ADDRESS", "1.2.3.4:6379")
    env = _clean_env()
    assert not {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_ADDRESS"} & set(env)
    assert env["PATH"] == os.environ["PATH"]


# --------------------------------------------------------------------------- #
# real clusters
# --------------------------------------------------------------------------- #
def _gone(pid: int) -> bool:
    """True if the process no longer exists (or is a zombie)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def _get(url: str, token: str | None) -> int:
    req = urllib.request.Request(url)
    if token is not None:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_node_cluster_auth_jobs_and_isolated_teardown(ray_session, prepared, synth_dir, tmp_path):
    """2-node `ray start` cluster with token auth on 127.0.0.1: the dashboard, the Jobs CLI and the GCS refuse
    clients without the token; `jobs/train.py` runs DDP with one Train worker per node (STRICT_SPREAD) and checkpoints
    in a folder both nodes see; `ray job submit -- python jobs/score.py` scores with the best checkpoint; teardown
    kills every process of this cluster and leaves another Ray instance on the machine (this test session's) alone.
    (Resume and checkpoint reload are tested on the session's Ray in tests/test_train.py: a job here costs ~2x.)"""
    t0 = time.monotonic()
    shared = tmp_path / "cluster_storage"
    train = (f"python jobs/train.py --data {prepared} --out {tmp_path / 'runs'} --storage-path {shared} "
             "--name two-node --workers 2 --epochs 1 --arch densenet_tiny --image-size 64 --batch-size 32 "
             "--set placement_strategy=STRICT_SPREAD --set cpus_per_worker=0.5 --set patience=0")
    score = ["python", "jobs/score.py", "--checkpoint", str(shared / "two-node"), "--input", str(synth_dir / "test"),
             "--out", str(shared / "scores.csv"), "--concurrency", "2", "--batch-size", "16"]
    bystander = ray_session.get_runtime_context().gcs_address
    with local_ray_cluster(num_nodes=2, num_cpus_per_node=2, token=True,
                           resources_per_node=[{"node_a": 1}, {"node_b": 1}], cwd=REPO) as c:
        t_up = time.monotonic() - t0
        assert c.address.startswith("http://127.0.0.1:") and c.gcs_address != bystander

        # dashboard HTTP: no token -> 401, wrong token -> 403, right token -> 200; health stays public
        assert _get(c.address + "/api/jobs/", None) == 401
        assert _get(c.address + "/api/jobs/", "0" * 64) == 403
        assert _get(c.address + "/api/jobs/", c.token) == 200
        assert _get(c.address + "/api/gcs_healthz", None) == 200
        # Jobs CLI without a token (no RAY_AUTH_*, empty HOME): refused
        denied = c.ray_cli("job", "submit", "--address", c.address, "--", "python", "-c", "print(1)",
                           with_token=False)
        out = denied.stdout + denied.stderr
        assert denied.returncode != 0, out
        assert "AuthenticationError" in out and "Missing authentication token" in out, out[-2000:]
        # a driver without the token cannot even connect to the GCS (gRPC is authenticated too);
        # RAY_NUM_REDIS_GET_RETRIES=2 shortens ray.init()'s ~20 s GCS connect retry loop
        denied = c.run_driver("import ray; ray.init(); print('connected')", with_token=False, timeout=90,
                              extra_env={"RAY_NUM_REDIS_GET_RETRIES": "2"})
        assert denied.returncode != 0 and "connected" not in denied.stdout
        assert "InvalidAuthToken" in denied.stderr, denied.stderr[-2000:]

        # with the token: a driver sees both nodes
        probe = (
            "import json, ray; ray.init();"
            "print('NODES=' + json.dumps([{k: v for k, v in n['Resources'].items() if k.startswith('node_')}"
            " for n in ray.nodes() if n['Alive']]))"
        )
        r = c.run_driver(probe)
        assert r.returncode == 0, r.stderr[-3000:]
        nodes = json.loads(r.stdout.split("NODES=", 1)[1].splitlines()[0])
        assert sorted(nodes, key=json.dumps) == [{"node_a": 1.0}, {"node_b": 1.0}]

        status, logs = c.submit(train, working_dir=REPO, timeout=360,
                                submission_id="koa-two-node-train")
        assert status == "SUCCEEDED", logs[-4000:]
        workers = dict(re.findall(r"\[koa\] worker (\d)/2 on node ([0-9a-f]+)", logs))
        assert set(workers) == {"0", "1"} and len(set(workers.values())) == 2, logs[-4000:]
        assert "resuming" not in logs
        assert "Found multiple active Ray instances" not in logs  # State API pinned to this cluster's dashboard
        status, body = c.http_get("/api/jobs/koa-two-node-train")
        assert status == 200 and json.loads(body)["status"] == "SUCCEEDED"
        t_train1 = time.monotonic() - t0

        # the Jobs CLI with the token, as the README runs it (it waits and exits 0 only if the job succeeded)
        ok = c.ray_cli("job", "submit", "--address", c.address, "--submission-id", "koa-two-node-score",
                       "--working-dir", str(REPO), "--", *score, with_token=True, timeout=300)
        assert ok.returncode == 0, (ok.stdout + ok.stderr)[-4000:]
        assert "succeeded" in (ok.stdout + ok.stderr).lower()
        pids = [n.pid for n in c.nodes]
        t_checks = time.monotonic() - t0 - t_up
        t_down = time.monotonic()
    t_down = time.monotonic() - t_down
    # ours is gone, the bystander (this session's Ray) is untouched
    assert c.leftover_pids() == []
    assert all(_gone(p) for p in pids)
    assert not c.root.exists()
    assert ray_session.is_initialized()
    assert ray_session.get(ray_session.remote(lambda: 41 + 1).remote(), timeout=60) == 42
    assert sum(n["Alive"] for n in ray_session.nodes()) == 1
    import pandas as pd

    run = shared / "two-node"
    for f in ("config.yaml", "metrics.csv", "curves.png", "best.json"):
        assert (run / f).is_file(), f
    best = json.loads((run / "best.json").read_text())
    assert best["epochs_run"] == 1 and (run / best["checkpoint"] / "model.pt").is_file()

    scores = pd.read_csv(shared / "scores.csv")
    n_images = sum(1 for p in (synth_dir / "test").rglob("*") if p.is_file())
    assert len(scores) == n_images and (scores["status"] == "ok").all()
    assert scores["grade"].between(0, 4).all()
    assert np.allclose(scores[[f"p{g}" for g in range(5)]].sum(axis=1), 1, atol=1e-4)
    print(f"\n[timing] 2-node test: up {t_up:.1f}s, train job done at {t_train1:.1f}s, "
          f"checks {t_checks:.1f}s, teardown {t_down:.1f}s, total {time.monotonic() - t0:.1f}s")

