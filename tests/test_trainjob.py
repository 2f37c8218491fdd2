"""Several nodes: the Kubeflow Trainer job the pipeline creates, checked against the Kubeflow API types, and the job's
nodes run for real: two torchrun agents on this machine, started with the manifest's command and environment, meet
as two nodes, train, and publish through a real SeaweedFS and MLflow."""

import copy
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import yaml
from conftest import EXAMPLES, alpaca_rows, cli, make_config, write_jsonl

from tuneforge import storage
from tuneforge.config import load_config
from tuneforge.errors import ManifestError
from tuneforge.pipelines import trainjob
from tuneforge.pipelines.pipeline import job_image

GPU_NODES = [
    "--set", "storage.uri=s3://models/runs",
    "--set", "cluster.resources={default: {cpu: '4', memory: 16Gi}, sft: {cpu: '16', memory: 200Gi, gpus: 8, timeout_seconds: 36000}}",
    "--set", "cluster.gpu_node_selector={cloud.google.com/gke-accelerator: nvidia-h100-80gb}",
    "--set", "cluster.model_cache_pvc=model-cache",
    "--set", "sft.distributed={strategy: fsdp, nodes: 4}",
]


def manifest_for(engine: str, tmp_path: Path) -> dict:
    config = load_config(EXAMPLES / "quickstart.yaml", [arg for arg in GPU_NODES if arg != "--set"] +
                         [f"sft.distributed.engine={engine}"])
    config_json = config.model_dump_json(exclude_defaults=True)
    return trainjob.build(config, config_json, "sft", "run-1234", {"data": "s3://models/runs/q/run-1234/sft.inputs/data"},
                          "ml-team", job_image(config, "sft"))


def env_of(containers_env: list[dict]) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in containers_env}


def test_trainjob_manifest_carries_image_resources_env_and_secrets_and_validates(tmp_path):
    manifest = manifest_for("trainjob", tmp_path)
    trainjob.validate(manifest)
    assert (manifest["apiVersion"], manifest["kind"]) == ("trainer.kubeflow.org/v1alpha1", "TrainJob")
    assert manifest["metadata"]["namespace"] == "ml-team" and len(manifest["metadata"]["name"]) <= 63
    spec = manifest["spec"]
    assert spec["runtimeRef"] == {"name": "torch-distributed"} and spec["activeDeadlineSeconds"] == 36000
    trainer = spec["trainer"]
    assert trainer["image"] == "ghcr.io/tuneforge/tuneforge-cuda:0.1.0"
    assert trainer["command"] == ["torchrun", "-m", "tuneforge.pipelines.trainjob_node", "sft"]
    assert (trainer["numNodes"], trainer["numProcPerNode"]) == (4, 8)
    assert trainer["resourcesPerNode"]["limits"] == {"cpu": "16", "memory": "200Gi", "nvidia.com/gpu": "8"}
    env = env_of(trainer["env"])
    assert env["AWS_SECRET_ACCESS_KEY"] == {"secretKeyRef": {"name": "tuneforge-s3", "key": "AWS_SECRET_ACCESS_KEY"}}
    assert env["MLFLOW_TRACKING_URI"] == {"secretKeyRef": {"name": "tuneforge-mlflow", "key": "MLFLOW_TRACKING_URI"}}
    # The MLflow identity, where the Secret has one (a server with authentication).
    assert env["MLFLOW_TRACKING_PASSWORD"] == {"secretKeyRef": {"name": "tuneforge-mlflow", "key": "MLFLOW_TRACKING_PASSWORD",
                                                                "optional": True}}
    assert json.loads(env["TUNEFORGE_CONFIG_JSON"])["sft"]["distributed"] == {"strategy": "fsdp", "nodes": 4}
    assert json.loads(env["TUNEFORGE_INPUTS"]) == {"data": "s3://models/runs/q/run-1234/sft.inputs/data"}
    assert env["TUNEFORGE_PARENT_RUN_ID"] == "run-1234" and env["TUNEFORGE_CACHE"] == "/cache"
    pod = spec["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert {v["name"] for v in pod["volumes"]} == {"dshm", "model-cache"}
    assert {m["mountPath"] for m in pod["containers"][0]["volumeMounts"]} == {"/dev/shm", "/cache"}
    # The same run's stage always gets the same job name: a retried task finds its job.
    assert manifest_for("trainjob", tmp_path)["metadata"]["name"] == manifest["metadata"]["name"]


def test_pytorchjob_manifest_has_a_master_and_workers_and_validates(tmp_path):
    manifest = manifest_for("pytorchjob", tmp_path)
    trainjob.validate(manifest)
    assert (manifest["apiVersion"], manifest["kind"]) == ("kubeflow.org/v1", "PyTorchJob")
    spec = manifest["spec"]
    assert spec["nprocPerNode"] == "8" and spec["runPolicy"]["backoffLimit"] == 0
    replicas = spec["pytorchReplicaSpecs"]
    assert (replicas["Master"]["replicas"], replicas["Worker"]["replicas"]) == (1, 3)
    container = replicas["Worker"]["template"]["spec"]["containers"][0]
    assert container["name"] == "pytorch" and container["image"] == "ghcr.io/tuneforge/tuneforge-cuda:0.1.0"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "8"
    assert env_of(container["env"])["AWS_ACCESS_KEY_ID"]["secretKeyRef"]["name"] == "tuneforge-s3"


@pytest.mark.parametrize("engine, damage, complaint", [
    ("trainjob", lambda m: m["spec"]["trainer"].update(numNode=4), "spec.trainer.numNode: unknown key"),
    ("trainjob", lambda m: m["spec"]["trainer"].update(numNodes="4"), "rejected by the Kubeflow API types"),
    ("trainjob", lambda m: m["spec"].pop("runtimeRef"), "rejected by the Kubeflow API types"),
    ("trainjob", lambda m: m["spec"]["trainer"]["env"].append({"value": "x"}), "spec.trainer.env[10].name: required, missing"),
    ("pytorchjob", lambda m: m["spec"].update(pytorchReplicaSpec={}), "spec.pytorchReplicaSpec: unknown key"),
    ("pytorchjob", lambda m: m["spec"]["pytorchReplicaSpecs"]["Worker"].update(replicas="3"), "Worker.replicas: '3' was read as 3"),
    ("pytorchjob", lambda m: m["spec"].pop("runPolicy"), "rejected by the Kubeflow API types"),
])
def test_a_manifest_the_api_types_do_not_accept_is_refused_with_where(tmp_path, engine, damage, complaint):
    manifest = copy.deepcopy(manifest_for(engine, tmp_path))
    damage(manifest)
    with pytest.raises(ManifestError, match=complaint.replace("[", r"\[").replace("]", r"\]")):
        trainjob.validate(manifest)


def test_compiled_pipeline_hands_sft_to_the_job_and_keeps_its_own_task_small(tmp_path):
    out = tmp_path / "pipeline.yaml"
    result = cli("compile", EXAMPLES / "quickstart.yaml", "-o", out, *GPU_NODES)
    assert result.exit_code == 0, result.stderr or result.exception
    spec = next(yaml.safe_load_all(out.read_text()))
    sft = spec["deploymentSpec"]["executors"]["exec-sft"]["container"]
    # The task only creates the job and waits: CPU image, no GPU, small; the job's nodes get the stage's resources.
    assert sft["image"] == "ghcr.io/tuneforge/tuneforge-cpu:0.1.0" and "accelerator" not in sft["resources"]
    assert sft["resources"]["resourceMemoryLimit"] == "2Gi"
    tasks = spec["components"]["comp-exit-handler-1"]["dag"]["tasks"]
    image = tasks["sft"]["inputs"]["parameters"]["job_image"]["runtimeValue"]["constant"]
    assert image == "ghcr.io/tuneforge/tuneforge-cuda:0.1.0"


def test_several_nodes_without_storage_are_refused_naming_the_keys(tmp_path):
    result = cli("compile", EXAMPLES / "quickstart.yaml", "-o", tmp_path / "p.yaml", "--set", "dpo.distributed.nodes=2")
    assert result.exit_code == 2
    assert "dpo.distributed.nodes > 1 needs storage.uri" in result.stderr
    assert not (tmp_path / "p.yaml").exists()


def test_a_local_run_of_a_multi_node_config_says_where_it_belongs(tmp_path):
    result = cli("run", EXAMPLES / "tiny.yaml", "--set", "storage.uri=s3://models/runs", "--set", "sft.distributed.nodes=2",
                 "--set", f"workdir={tmp_path}")
    assert result.exit_code == 2
    assert "sft.distributed.nodes is 2: several nodes need a cluster with Kubeflow Trainer" in result.stderr
    assert not (tmp_path / "kfp").exists()


@pytest.mark.parametrize("engine, status, expected", [
    ("trainjob", {"conditions": [{"type": "Created", "status": "True"}]}, (False, False, "")),
    ("trainjob", {"conditions": [{"type": "Complete", "status": "True", "message": "done"}]}, (True, True, "done")),
    ("trainjob", {"conditions": [{"type": "Failed", "status": "True", "message": "node 1 OOMKilled"}]},
     (True, False, "node 1 OOMKilled")),
    ("pytorchjob", {"conditions": [{"type": "Running", "status": "False"}, {"type": "Succeeded", "status": "True"}]},
     (True, True, "")),
    ("pytorchjob", {}, (False, False, "")),
])
def test_job_outcome_from_its_status_conditions(engine, status, expected):
    assert trainjob.outcome(engine, status) == expected


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_run_from_the_manifest_train_like_one_process_and_publish(stack, tmp_path, monkeypatch):
    """Each node is what a Kubeflow Trainer pod runs: the manifest's command, its environment (secrets resolved as
    Kubernetes would, from the services' credentials), the PET_* variables the operator sets, a disk of its own."""
    for key, value in stack.items():
        monkeypatch.setenv(key, value)
    bucket = stack["TUNEFORGE_S3_BUCKET"]
    config_path = make_config(tmp_path, [write_jsonl(tmp_path / "sft.jsonl", alpaca_rows(40))],
                              storage={"uri": f"s3://{bucket}/runs"},
                              sft={"logging_steps": 1, "max_steps": 6, "save_steps": 100, "batch_size": 2,
                                   "distributed": {"nodes": 2, "processes": 1}})
    assert cli("stage", "data-prep", "--config", config_path, "--output", tmp_path / "data").exit_code == 0
    config = load_config(config_path)
    config_json = config.model_dump_json(exclude_defaults=True)
    parent = mlflow.MlflowClient().create_run(mlflow.MlflowClient().create_experiment("multi-node")).info.run_id
    monkeypatch.setenv("TUNEFORGE_RUN_ID", parent)
    inputs = trainjob.publish_inputs(config, "sft", {"data": tmp_path / "data"})
    manifest = trainjob.build(config, config_json, "sft", parent, inputs, "default", "unused")
    trainjob.validate(manifest)
    trainer = manifest["spec"]["trainer"]
    env = {e["name"]: e["value"] if "value" in e else stack[e["valueFrom"]["secretKeyRef"]["key"]] for e in trainer["env"]}
    port = free_port()
    nodes = []
    for rank in range(trainer["numNodes"]):
        node_env = {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "HOME": os.environ["HOME"],
                    "TUNEFORGE_CACHE": os.environ.get("TUNEFORGE_CACHE", str(Path.home() / ".cache" / "tuneforge")),
                    **env, "TUNEFORGE_JOB_DIR": str(tmp_path / f"node-{rank}"),
                    "PET_NNODES": str(trainer["numNodes"]), "PET_NPROC_PER_NODE": str(trainer["numProcPerNode"]),
                    "PET_NODE_RANK": str(rank), "PET_MASTER_ADDR": "127.0.0.1", "PET_MASTER_PORT": str(port)}
        nodes.append(subprocess.Popen(trainer["command"], env=node_env, cwd=tmp_path, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    logs = [node.communicate(timeout=600)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(log[-3000:] for log in logs)

    # What the KFP task does next: fetch the output the job published.
    uri = f"s3://{bucket}/runs/test/{parent}/sft"
    fetched = storage.fetch(uri, tmp_path / "fetched")
    lineage = json.loads((fetched / "manifest.json").read_text())["lineage"]
    assert (lineage["world_size"], lineage["nodes"], lineage["strategy"]) == (2, 2, "ddp")
    two_nodes = [e["loss"] for e in json.loads((fetched / "train_history.json").read_text()) if "loss" in e]
    # The same global batch in one process.
    one = cli("stage", "sft", "--config", config_path, "--input", f"data={tmp_path / 'data'}", "--output", tmp_path / "one",
              "--set", "sft.distributed.nodes=1", "--set", "sft.batch_size=4", "--set", "storage.uri=null")
    assert one.exit_code == 0, one.stderr or one.exception
    single = [e["loss"] for e in json.loads((tmp_path / "one" / "train_history.json").read_text()) if "loss" in e]
    assert len(two_nodes) == 6 and two_nodes == pytest.approx(single, abs=1e-4)
    # One MLflow run for the stage, under the pipeline's run, logged by the main process only.
    runs = mlflow.search_runs(search_all_experiments=True, filter_string=f"tags.mlflow.parentRunId = '{parent}'",
                              output_format="list")
    assert [r.data.tags["tuneforge.stage"] for r in runs] == ["sft"]
    # Only node 0 published; both fetched the inputs onto their own disks.
    assert all((tmp_path / f"node-{rank}" / "inputs" / "data" / "manifest.json").exists() for rank in range(2))


def test_the_multinode_example_compiles_with_its_trainjob_checked(tmp_path):
    result = cli("compile", EXAMPLES / "llama3-8b-multinode.yaml", "-o", tmp_path / "pipeline.yaml")
    assert result.exit_code == 0, result.stderr or result.exception
    spec = next(yaml.safe_load_all((tmp_path / "pipeline.yaml").read_text()))
    tasks = spec["components"]["comp-exit-handler-1"]["dag"]["tasks"]
    assert "job_image" in tasks["sft"]["inputs"]["parameters"]  # sft: 2 nodes through Kubeflow Trainer
    assert "job_image" not in tasks["dpo"]["inputs"].get("parameters", {})  # dpo: one node, torchrun in its pod
    dpo = spec["deploymentSpec"]["executors"]["exec-dpo"]["container"]
    assert dpo["image"] == "ghcr.io/tuneforge/tuneforge-cuda:0.1.0" and str(dpo["resources"]["accelerator"]["resourceCount"]) == "8"
