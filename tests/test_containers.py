"""The compiled pipeline run as a cluster runs it: every task in its image (tuneforge-cpu, tuneforge-export) through a
Docker-compatible API (podman here), as uid 10001 on a read-only root, against a real SeaweedFS and MLflow server;
and the same package run with the subprocess runner, for comparison.

Needs the images built by `images/local-build.sh cpu export` (make images-local) and a container API
(`podman system service`); `make test` provides both on a machine with podman. Where neither can start, the tests
skip and say why.
"""

import json
import os
import re
import secrets
import subprocess
import sys
import time
from pathlib import Path

import docker
import mlflow
import pytest
import yaml
from conftest import EXAMPLES
from test_services import _client, assert_secrets_nowhere

from tuneforge import sizing
from tuneforge.config import Config, load_config
from tuneforge.pipelines import container_runner

REGISTRY, TAG = "localhost/tuneforge", os.environ.get("TUNEFORGE_TEST_IMAGE_TAG", "dev")
IMAGES = [f"{REGISTRY}/tuneforge-cpu:{TAG}", f"{REGISTRY}/tuneforge-export:{TAG}"]
# The stages tiny.yaml's pipeline runs (not grpo: it takes dpo's place only when enabled).
TINY_STAGES = sizing.pipeline_stages(load_config(EXAMPLES / "tiny.yaml"))
COMPARED = ("eval_loss", "perplexity", "preference_accuracy", "task_score", "task_exact_match")


@pytest.fixture(scope="module")
def engine():
    try:
        host = container_runner.engine_host()
        client = docker.DockerClient(base_url=host)
        client.ping()
    except Exception as exc:  # noqa: BLE001 (any failure to reach the engine is a reason to skip)
        pytest.skip(f"no container API ({exc}); start one with: {container_runner.START_PODMAN}")
    missing = [image for image in IMAGES if not client.images.list(name=image)]
    if missing:
        pytest.skip(f"images not built: {', '.join(missing)} (make images-local)")
    os.environ["DOCKER_HOST"] = host
    yield client
    client.close()


def tuneforge(*args, env, timeout=1800):
    return subprocess.run([sys.executable, "-m", "tuneforge.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.fixture(scope="module")
def package(tmp_path_factory, stack):
    folder = tmp_path_factory.mktemp("package")
    # A bearer token the MLflow server ignores, to check it travels nowhere but the HTTP header.
    env = {**os.environ, **stack, "TUNEFORGE_REGISTRY": REGISTRY, "TUNEFORGE_IMAGE_TAG": TAG,
           "MLFLOW_TRACKING_TOKEN": "tok-" + secrets.token_hex(16)}
    result = tuneforge("compile", EXAMPLES / "tiny.yaml", "-o", folder / "pipeline.yaml",
                       "--set", "storage.uri=s3://tuneforge/runs", "--set", f"workdir={folder}",
                       # a failed task is not retried: the broken-image test waits for nothing
                       "--set", "cluster.resources={default: {retries: 0}}", env=env)
    assert result.returncode == 0, result.stderr
    spec = next(yaml.safe_load_all((folder / "pipeline.yaml").read_text()))
    images = {e["container"]["image"] for e in spec["deploymentSpec"]["executors"].values()}
    assert images == set(IMAGES), images
    return folder / "pipeline.yaml", env


def run_package(package, root, runner):
    path, env = package
    started = time.monotonic()
    result = tuneforge("run", "--package", path, "--runner", runner, "--pipeline-root", root, env=env)
    assert result.returncode == 0, f"{runner}:\n{result.stderr[-4000:]}"
    return json.loads(result.stdout.strip().splitlines()[-1]), time.monotonic() - started, result


@pytest.fixture(scope="module")
def subprocess_run(package, tmp_path_factory):
    """The package run with the subprocess runner: what the container run is compared with."""
    root = tmp_path_factory.mktemp("subprocess")
    return (*run_package(package, root / "kfp", "subprocess"), root)


def manifests(summary):
    return {stage: json.loads(Path(info["output"], "manifest.json").read_text())
            for stage, info in summary["stages"].items() if info.get("output")}


def test_the_compiled_package_with_real_s3_and_mlflow_publishes_registers_and_leaks_no_secret(subprocess_run, stack,
                                                                                                package):
    summary, _, result, root = subprocess_run
    run_id = summary["mlflow"]["run_id"]
    assert summary["mlflow"]["tracking_uri"] == stack["MLFLOW_TRACKING_URI"]
    prefix = f"runs/tiny-extract/{run_id}/"
    keys = {o["Key"] for o in _client(stack).list_objects_v2(Bucket="tuneforge", Prefix=prefix)["Contents"]}
    for folder in TINY_STAGES:
        assert f"{prefix}{folder}/manifest.json" in keys
    assert f"{prefix}export-gguf/tiny-extract-q8_0.gguf" in keys

    registered = summary["registered_model"]
    client = mlflow.MlflowClient(tracking_uri=stack["MLFLOW_TRACKING_URI"])
    assert client.get_run(run_id).info.status == "FINISHED"
    version = client.get_model_version("tiny-extract", registered["version"])
    assert version.source == f"s3://tuneforge/{prefix}merge"
    assert "challenger" in registered["aliases"] and registered["decision"]["promoted"] == ("champion" in registered["aliases"])
    assert json.loads(version.tags["gguf_files"])["q8_0"] == f"s3://tuneforge/{prefix}export-gguf/tiny-extract-q8_0.gguf"
    assert version.tags["data_sha256"] and version.tags["metric.eval_loss"]
    # MLflow's artifacts went through the server into the bucket too.
    assert _client(stack).list_objects_v2(Bucket="tuneforge", Prefix="mlflow-artifacts/").get("KeyCount", 0) > 0
    assert_secrets_nowhere([stack["AWS_SECRET_ACCESS_KEY"], stack["MLFLOW_TRACKING_PASSWORD"],
                            package[1]["MLFLOW_TRACKING_TOKEN"]], stack, result, root,
                           client, run_id, package[1])


def test_the_compiled_package_runs_in_its_images_as_a_cluster_would_and_matches_the_subprocess_run(
        engine, package, subprocess_run, tmp_path, stack):
    outside, outside_s, _, _ = subprocess_run
    inside, inside_s, inside_result = run_package(package, tmp_path / "kfp", "container")
    print(f"tiny pipeline from one package: container runner {inside_s:.0f} s, subprocess runner {outside_s:.0f} s")
    assert inside["status"] == outside["status"] == "succeeded"
    assert set(inside["stages"]) == set(outside["stages"])
    for model, scores in outside["metrics"].items():
        for key in COMPARED:
            if key in scores:
                assert inside["metrics"][model][key] == pytest.approx(scores[key], abs=1e-4), (model, key)

    ran_inside, ran_outside = manifests(inside), manifests(outside)
    for stage, manifest in ran_inside.items():
        assert manifest["lineage"]["runtime"]["uid"] == 10001, stage
        assert manifest["lineage"]["runtime"]["root_writable"] is False, stage
        assert manifest["lineage"]["runtime"]["image_version"], stage
        assert ran_outside[stage]["lineage"]["runtime"]["uid"] == os.getuid()
    # The same GGUF tensors, bit for bit: same seeds, same code, same wheels.
    for name, entry in ran_outside["export-gguf"]["files"].items():
        if name.endswith(".gguf"):
            assert ran_inside["export-gguf"]["files"][name]["sha256"] == entry["sha256"], name
    # The lineage is the same but for where and when it ran.
    for key, value in ran_outside["merge"]["lineage"].items():
        if key not in ("runtime", "inputs") and "run" not in key and "publish" not in key:
            assert ran_inside["merge"]["lineage"].get(key) == value, key
    # Each stage's MLflow run is a child of the pipeline's: the run id reached the containers.
    tracking = mlflow.MlflowClient(tracking_uri=stack["MLFLOW_TRACKING_URI"])
    parent = tracking.get_run(inside["mlflow"]["run_id"])
    children = tracking.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert {r.data.tags["tuneforge.stage"] for r in children} == set(TINY_STAGES)
    # The same merged weights: the registry sees nothing new.
    assert inside["registered_model"]["outcome"].startswith("unchanged"), inside["registered_model"]

    client = mlflow.MlflowClient(tracking_uri=stack["MLFLOW_TRACKING_URI"])
    assert_secrets_nowhere([stack["AWS_SECRET_ACCESS_KEY"], stack["MLFLOW_TRACKING_PASSWORD"],
                            package[1]["MLFLOW_TRACKING_TOKEN"]], stack, inside_result,
                           tmp_path, client, inside["mlflow"]["run_id"], package[1])


def test_a_broken_image_fails_its_task_with_the_import_error_and_publishes_nothing(engine, package, tmp_path, stack):
    path, env = package
    broken = f"{REGISTRY}/tuneforge-cpu:broken"
    # trl removed from the CPU image: data-prep still runs, sft cannot import it.
    built = subprocess.run(["podman", "build", "-t", broken, "-f", "-", str(tmp_path)], capture_output=True, text=True,
                           input=f"FROM {IMAGES[0]}\nUSER 0\nRUN /opt/venv/bin/pip uninstall -y trl\nUSER 10001\n")
    assert built.returncode == 0, built.stderr[-2000:]
    text = path.read_text().replace(IMAGES[0], broken)
    (tmp_path / "broken.yaml").write_text(text)
    result = tuneforge("run", "--package", tmp_path / "broken.yaml", "--runner", "container", "--pipeline-root",
                       tmp_path / "kfp", env=env)
    assert result.returncode == 1
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["stages"]["sft"]["status"] == "failed" and "register" not in summary["stages"]
    log = Path(summary["log"]).read_text()
    assert re.search(r"No module named 'trl'|No package metadata was found for trl", log), log[-3000:]
    assert "registered_model" not in summary
    prefix = f"runs/tiny-extract/{summary['mlflow']['run_id']}/"
    published = {o["Key"].removeprefix(prefix).split("/")[0]
                 for o in _client(stack).list_objects_v2(Bucket="tuneforge", Prefix=prefix).get("Contents", [])}
    assert published <= {"data-prep"}, published


def test_a_task_that_writes_outside_its_declared_paths_fails_and_the_host_is_untouched(engine, tmp_path, stack):
    config = Config.model_validate({"name": "x", "base_model": {"source": "tiny-llama"},
                                    "data": {"sources": [{"path": "/nonexistent"}]}, "storage": {"uri": "s3://tuneforge/x"},
                                    "tracking": {"uri": stack["MLFLOW_TRACKING_URI"]}})
    runner = container_runner.docker_runner(config, tmp_path / "kfp")
    arguments = dict(runner.container_run_args)
    script = ("import os\nfor p in ('/tmp/ok', '/cache/ok', '/workspace/ok'): open(p, 'w').write('x')\n"
              "open('/opt/venv/escape', 'w').write('x')")
    container = engine.containers.run(IMAGES[0], ["python", "-c", script], detach=True, **arguments)
    status = container.wait()
    logs = container.logs().decode()
    container.remove()
    assert status["StatusCode"] != 0 and "Read-only file system: '/opt/venv/escape'" in logs, logs
    assert not Path("/opt/venv/escape").exists()


def test_a_run_kept_to_some_cpus_keeps_its_containers_on_them(engine, tmp_path, stack):
    """`taskset -c 1 tuneforge run --runner container` (or a test worker's share of the CPUs): the tasks in containers
    run on the same CPUs as the subprocess runner's would, with as many torch threads, so both train the same weights."""
    if (os.cpu_count() or 1) < 2:
        pytest.skip("one CPU: nothing to keep a run to")
    config = Config.model_validate({"name": "x", "base_model": {"source": "tiny-llama"},
                                    "data": {"sources": [{"path": "/nonexistent"}]}, "storage": {"uri": "s3://tuneforge/x"},
                                    "tracking": {"uri": stack["MLFLOW_TRACKING_URI"]}})
    before = os.sched_getaffinity(0)

    def container_arguments(cpus) -> dict:
        os.sched_setaffinity(0, cpus)
        try:
            return dict(container_runner.docker_runner(config, tmp_path / "kfp").container_run_args)
        finally:
            os.sched_setaffinity(0, before)

    cpu = max(before)
    probe = "import os, torch; print(sorted(os.sched_getaffinity(0)), torch.get_num_threads())"
    output = engine.containers.run(IMAGES[0], ["python", "-c", probe], remove=True, **container_arguments({cpu}))
    assert output.decode().strip() == f"[{cpu}] 1"
    # A run on every CPU: its containers get what the engine gives them, as before.
    assert "cpuset_cpus" not in container_arguments(range(os.cpu_count()))


def test_without_a_container_api_the_runner_says_how_to_start_one(tmp_path, monkeypatch):
    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent/docker.sock")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    result = subprocess.run([sys.executable, "-m", "tuneforge.cli", "run", str(EXAMPLES / "tiny.yaml"), "--runner",
                             "container", "--set", "storage.uri=s3://tuneforge/x", "--set", f"workdir={tmp_path}"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert "the container API at unix:///nonexistent/docker.sock does not answer" in result.stderr
    assert "podman system service" in result.stderr
    assert not (tmp_path / "kfp").exists()  # refused before anything was written
