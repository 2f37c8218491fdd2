"""Several nodes: the pipeline hands sft or dpo to Kubeflow Trainer and waits for it.

The stage's KFP task (a small CPU pod) publishes its inputs to S3, creates a TrainJob (Kubeflow Trainer v2, the
default) or a PyTorchJob (Training Operator v1), follows its status, shows node 0's log, and fetches the output the
job's main process published, so the rest of the pipeline sees an ordinary stage output.

Each node of the job runs `torchrun -m tuneforge.pipelines.trainjob_node STAGE` (that module is the node's side).
torchrun takes the node count, the node's
rank and the rendezvous from the environment the operator sets (PET_NNODES, PET_NODE_RANK, PET_MASTER_ADDR, ...);
every process fetches the inputs (once per node) and trains as `tuneforge stage` would; the main process publishes
the output. A retried KFP task finds its job by name: a running one is awaited, a failed one is replaced, and the
new one resumes from the checkpoints mirrored to S3.

Both manifests are checked against the Kubeflow API types (the kubeflow-trainer-api and kubeflow-training packages)
when the pipeline is compiled and again before they are created.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

from tuneforge import env, stages, storage
from tuneforge.config import Config
from tuneforge.errors import LaunchError, ManifestError
from tuneforge.pipelines import pod

log = logging.getLogger(__name__)

ENGINES = {
    "trainjob": {"group": "trainer.kubeflow.org", "version": "v1alpha1", "plural": "trainjobs", "kind": "TrainJob",
                 "container": "node", "done": "Complete", "node0": "batch.kubernetes.io/job-completion-index=0,"
                 "jobset.sigs.k8s.io/replicatedjob-name=node,jobset.sigs.k8s.io/jobset-name={name}"},
    "pytorchjob": {"group": "kubeflow.org", "version": "v1", "plural": "pytorchjobs", "kind": "PyTorchJob",
                   "container": "pytorch", "done": "Succeeded",
                   "node0": "training.kubeflow.org/job-name={name},training.kubeflow.org/replica-type=master"},
}
POLL_SECONDS = 15


def job_name(config: Config, stage: str, run_id: str) -> str:
    """A DNS-1123 name, the same for every attempt of one pipeline run's stage (so a retry finds its job)."""
    base = re.sub(r"[^a-z0-9-]+", "-", f"{config.name}-{stage}".lower()).strip("-")[:40].rstrip("-")
    return f"{base}-{hashlib.sha256(run_id.encode()).hexdigest()[:8]}"


def build(config: Config, config_json: str, stage: str, run_id: str, input_uris: dict[str, str], namespace: str,
          image: str) -> dict[str, Any]:
    """The TrainJob or PyTorchJob manifest for a stage."""
    settings = getattr(config, stage).distributed
    spec = pod.for_stage(config, stage)
    per_node = spec.gpus or (1 if settings.processes == "auto" else settings.processes)
    engine = ENGINES[settings.engine]
    metadata = {"name": job_name(config, stage, run_id), "namespace": namespace,
                "labels": {"app.kubernetes.io/managed-by": "tuneforge", "tuneforge.io/stage": stage}}
    command = ["torchrun", "-m", "tuneforge.pipelines.trainjob_node", stage]
    pod_spec, container = pod.pod_template(spec)
    job_env = [{"name": env.CONFIG_JSON, "value": config_json}, {"name": env.PARENT_RUN_ID, "value": run_id},
               {"name": env.INPUTS, "value": json.dumps(input_uris, sort_keys=True)}, *container["env"]]
    if settings.engine == "trainjob":
        patch_container = {"name": engine["container"], "volumeMounts": container["volumeMounts"]}
        replicated = {"name": "node", "template": {"spec": {"template": {"spec": pod_spec | {"containers": [patch_container]}}}}}
        return {
            "apiVersion": f"{engine['group']}/{engine['version']}", "kind": engine["kind"], "metadata": metadata,
            "spec": {
                "runtimeRef": {"name": settings.runtime},
                "activeDeadlineSeconds": spec.timeout_seconds,
                "trainer": {"image": image, "command": command, "numNodes": settings.nodes, "numProcPerNode": per_node,
                            "resourcesPerNode": container["resources"], "env": job_env},
                "runtimePatches": [{"manager": "tuneforge", "trainingRuntimeSpec": {
                    "template": {"spec": {"replicatedJobs": [replicated]}}}}],
            },
        }
    node = {"name": engine["container"], "image": image, "command": command, **container, "env": job_env}

    def replicas(count: int) -> dict[str, Any]:
        return {"replicas": count, "restartPolicy": "Never", "template": {"spec": pod_spec | {"containers": [node]}}}

    return {
        "apiVersion": f"{engine['group']}/{engine['version']}", "kind": engine["kind"], "metadata": metadata,
        "spec": {
            "nprocPerNode": str(per_node),
            # A failed job is not restarted by the operator: the KFP task's retry replaces it and resumes from S3.
            "runPolicy": {"cleanPodPolicy": "None", "backoffLimit": 0, "activeDeadlineSeconds": spec.timeout_seconds},
            "pytorchReplicaSpecs": {"Master": replicas(1), "Worker": replicas(settings.nodes - 1)},
        },
    }


def validate(manifest: dict[str, Any]) -> None:
    """Read the manifest into the Kubeflow API types and back; a key they drop, a value they change or a type they
    refuse is an error that names where it is."""
    try:
        if manifest["kind"] == "TrainJob":
            from kubeflow_trainer_api.models import TrainerV1alpha1TrainJob

            # from_dict, not model_validate: the latter cannot read resource quantities.
            echoed = TrainerV1alpha1TrainJob.from_dict(manifest).to_dict()
        else:
            from kubeflow.training import ApiClient

            class Response:  # what ApiClient.deserialize reads an object from
                data = json.dumps(manifest)

            api = ApiClient()
            echoed = api.sanitize_for_serialization(api.deserialize(Response(), "KubeflowOrgV1PyTorchJob"))
    except (ValueError, TypeError, KeyError) as exc:
        raise ManifestError(f"{manifest.get('kind', 'job')} manifest rejected by the Kubeflow API types: {exc}") from None
    problems = differences(manifest, echoed)
    if problems:
        raise ManifestError(f"{manifest['kind']} manifest does not match the Kubeflow API types:\n  " + "\n  ".join(problems))


def differences(sent: Any, echoed: Any, path: str = "") -> list[str]:
    if isinstance(sent, dict) and isinstance(echoed, dict):
        found = []
        for key, value in sent.items():
            where = f"{path}.{key}" if path else key
            found += [f"{where}: unknown key"] if key not in echoed else differences(value, echoed[key], where)
        # The generated types fill a missing required field with a blank instead of refusing it.
        found += [f"{path}.{key}: required, missing" for key in echoed if key not in sent]
        return found
    if isinstance(sent, list) and isinstance(echoed, list) and len(sent) == len(echoed):
        return [p for i, (a, b) in enumerate(zip(sent, echoed, strict=True)) for p in differences(a, b, f"{path}[{i}]")]
    same_number = isinstance(sent, (int, float)) and isinstance(echoed, (int, float)) and not isinstance(sent, bool)
    if sent != echoed or (type(sent) is not type(echoed) and not same_number):
        return [f"{path}: {sent!r} was read as {echoed!r}"]
    return []


def outcome(engine: str, status: dict[str, Any]) -> tuple[bool, bool, str]:
    """(finished, succeeded, message) from a job's status conditions."""
    for condition in status.get("conditions") or []:
        if condition.get("status") != "True":
            continue
        if condition.get("type") == ENGINES[engine]["done"]:
            return True, True, condition.get("message", "")
        if condition.get("type") == "Failed":
            return True, False, condition.get("message") or condition.get("reason", "failed")
    return False, False, ""


# ---------------------------------------------------------------- the KFP task's side


def current_namespace() -> str:
    path = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
    return os.environ.get("POD_NAMESPACE") or (path.read_text().strip() if path.exists() else "default")


def publish_inputs(config: Config, stage: str, inputs: dict[str, Path]) -> dict[str, str]:
    """The task's input artifacts, where the job's nodes fetch them: beside the stage's output on S3."""
    uri = storage.published_uri(config.storage.uri, config.name, stages.get(stage).folder)
    return {name: storage.publish(path, f"{uri}.inputs/{name}", config.storage.endpoint_url) for name, path in inputs.items()}


def run(config: Config, config_json: str, stage: str, run_id: str, inputs: dict[str, Path], output: Path,
        image: str) -> dict[str, Any]:
    """Publish the inputs, create (or find) the job, wait for it, fetch its output into `output`."""
    from kubernetes import client
    from kubernetes import config as kube_config

    endpoint = config.storage.endpoint_url
    uri = storage.published_uri(config.storage.uri, config.name, stages.get(stage).folder)
    manifest = build(config, config_json, stage, run_id, publish_inputs(config, stage, inputs), current_namespace(), image)
    validate(manifest)
    try:
        kube_config.load_incluster_config()
    except kube_config.ConfigException:
        kube_config.load_kube_config()
    spread = getattr(config, stage).distributed
    engine = ENGINES[spread.engine]
    api = client.CustomObjectsApi()
    name, namespace = manifest["metadata"]["name"], manifest["metadata"]["namespace"]
    where = (engine["group"], engine["version"], namespace, engine["plural"])
    try:
        api.create_namespaced_custom_object(*where, manifest)
        log.info("created %s %s/%s (%d nodes)", engine["kind"], namespace, name, spread.nodes)
    except client.ApiException as exc:
        if exc.status != 409:
            raise
        existing = api.get_namespaced_custom_object(*where, name)
        finished, succeeded, _ = outcome(spread.engine, existing.get("status") or {})
        if finished and not succeeded:
            log.info("%s %s failed in an earlier attempt; replacing it (it resumes from the S3 checkpoints)",
                     engine["kind"], name)
            api.delete_namespaced_custom_object(*where, name, propagation_policy="Foreground")
            while _exists(api, where, name):
                time.sleep(2)
            api.create_namespaced_custom_object(*where, manifest)
        else:
            log.info("%s %s exists from an earlier attempt; waiting for it", engine["kind"], name)
    succeeded, message = _wait(api, where, name, spread.engine,
                               config.cluster.for_stage(stage).timeout_seconds)
    sys.stderr.write(_node0_log(namespace, engine, name))
    if not succeeded:
        raise LaunchError(f"{engine['kind']} {namespace}/{name} failed: {message}; node 0's log is above")
    storage.fetch(uri, output, endpoint)
    storage.delete(f"{uri}.inputs", endpoint)
    result = storage.read_manifest(output, stage)
    return {"status": "succeeded", "metrics": result["metrics"], "output": str(output), "uri": uri,
            "job": f"{engine['kind']}/{namespace}/{name}"}


def _exists(api, where, name) -> bool:
    from kubernetes import client

    try:
        api.get_namespaced_custom_object(*where, name)
        return True
    except client.ApiException as exc:
        if exc.status == 404:
            return False
        raise


def _wait(api, where, name, engine: str, timeout: int) -> tuple[bool, str]:
    deadline, seen = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        status = api.get_namespaced_custom_object(*where, name).get("status") or {}
        conditions = ", ".join(f"{c.get('type')}={c.get('status')}" for c in status.get("conditions") or []) or "pending"
        if conditions != seen:
            log.info("%s: %s", name, conditions)
            seen = conditions
        finished, succeeded, message = outcome(engine, status)
        if finished:
            return succeeded, message
        time.sleep(POLL_SECONDS)
    return False, f"not finished after {timeout} s (cluster.resources timeout_seconds)"


def _node0_log(namespace: str, engine: dict[str, str], name: str, lines: int = 200) -> str:
    from kubernetes import client

    core = client.CoreV1Api()
    try:
        pods = core.list_namespaced_pod(namespace, label_selector=engine["node0"].format(name=name)).items
        if not pods:
            return f"(no pod of node 0 of {name} found)\n"
        text = core.read_namespaced_pod_log(pods[0].metadata.name, namespace, container=engine["container"],
                                            tail_lines=lines)
        return f"--- last {lines} lines of {pods[0].metadata.name} ---\n{text}\n"
    except client.ApiException as exc:
        return f"(node 0's log could not be read: {exc.reason})\n"
