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
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from dockerfile_parse import DockerfileParser
from packaging.requirements import Requirement

from tuneforge import __version__
from tuneforge.config import ClusterSettings, Config

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
        "StatefulSet/tf-tuneforge-seaweedfs"])
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
]


@pytest.mark.parametrize("args,message", BAD_VALUES, ids=[" ".join(a[1::2]) for a, _ in BAD_VALUES])
def test_bad_values_fail_at_install_time(helm, args, message):
    error = helm_fails(helm, *args)
    assert message in error, error
