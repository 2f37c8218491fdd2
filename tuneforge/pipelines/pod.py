"""What a stage's pod gets on Kubernetes: resources, credentials from Secrets, /dev/shm, the model cache, GPU node
selectors and tolerations. One description, rendered two ways: as kfp-kubernetes settings on a pipeline task
(pipeline.py), and as the pod template of a Kubeflow Trainer job (trainjob.py). No KFP import here: the task runner
imports this module inside KFP's executor, where kfp.kubernetes cannot be imported."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tuneforge import env, sizing
from tuneforge.config import Config

# Each Secret's keys become environment variables of the same name.
SECRET_KEYS = {"s3_secret": ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"),
               "mlflow_secret": ("MLFLOW_TRACKING_URI",)}
# Taken when the Secret has them: the MLflow identity of a server with authentication (the chart's is on).
OPTIONAL_SECRET_KEYS = {"mlflow_secret": ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")}
CACHE_MOUNT = "/cache"
SIZING_ANNOTATION = "tuneforge.io/resources"  # why the pod got its resources, readable with kubectl describe


@dataclass(frozen=True)
class PodSpec:
    cpu: str
    memory: str
    gpus: int
    gpu_type: str
    timeout_seconds: int
    shm_size: str
    secrets: dict[str, tuple[str, ...]] = field(default_factory=dict)  # Secret name -> keys taken as env variables
    optional_secrets: dict[str, tuple[str, ...]] = field(default_factory=dict)  # the same, where the Secret has them
    model_cache_pvc: str | None = None
    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: tuple[dict[str, str], ...] = ()
    # A node label and the GPU memory (MiB) it must exceed: scheduled only where the GPU holds the plan.
    gpu_memory: tuple[str, int] | None = None
    why: str = ""

    @property
    def env(self) -> dict[str, str]:
        return {env.CACHE: CACHE_MOUNT} if self.model_cache_pvc else {}


def for_stage(config: Config, stage: str, size: bool = True) -> PodSpec:
    """`size` False: no sizing from the model (a local run, where the cluster's resources do not apply)."""
    cluster, resources = config.cluster, config.cluster.for_stage(stage)
    sized = sizing.resolve(config, stage, size)
    secrets = {getattr(cluster, field_name): keys for field_name, keys in SECRET_KEYS.items() if getattr(cluster, field_name)}
    optional = {getattr(cluster, name): keys for name, keys in OPTIONAL_SECRET_KEYS.items() if getattr(cluster, name)}
    gpu_memory = None
    if sized.gpus and sized.gpu_memory_gib and cluster.gpu_memory_label:
        gpu_memory = (cluster.gpu_memory_label, int(sized.gpu_memory_gib * 1024))
    return PodSpec(
        cpu=sized.cpu, memory=sized.memory, gpus=sized.gpus, gpu_type=resources.gpu_type,
        timeout_seconds=resources.timeout_seconds, shm_size=cluster.shm_size, secrets=secrets,
        optional_secrets=optional,
        model_cache_pvc=cluster.model_cache_pvc,
        node_selector=dict(cluster.gpu_node_selector) if sized.gpus else {},
        tolerations=tuple(dict(t) for t in cluster.gpu_tolerations) if sized.gpus else (),
        gpu_memory=gpu_memory, why=sized.why,
    )


def gpu_memory_affinity(spec: PodSpec) -> list[dict[str, Any]]:
    """The node affinity's match expressions: a node whose GPU memory label exceeds what the stage needs."""
    if not spec.gpu_memory:
        return []
    label, mib = spec.gpu_memory
    return [{"key": label, "operator": "Gt", "values": [str(mib)]}]


def pod_template(spec: PodSpec) -> tuple[dict[str, Any], dict[str, Any]]:
    """The spec as Kubernetes objects: the pod's spec (volumes, tolerations, node selector) and what its container
    adds (env from Secrets, volume mounts, resources)."""
    volumes = [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": spec.shm_size}}]
    mounts = [{"name": "dshm", "mountPath": "/dev/shm"}]
    if spec.model_cache_pvc:
        volumes.append({"name": "model-cache", "persistentVolumeClaim": {"claimName": spec.model_cache_pvc}})
        mounts.append({"name": "model-cache", "mountPath": CACHE_MOUNT})
    pod: dict[str, Any] = {"volumes": volumes}
    if spec.tolerations:
        pod["tolerations"] = [dict(t) for t in spec.tolerations]
    if spec.node_selector:
        pod["nodeSelector"] = dict(spec.node_selector)
    if spec.gpu_memory:
        pod["affinity"] = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [{"matchExpressions": gpu_memory_affinity(spec)}]}}}
    quantities = {"cpu": spec.cpu, "memory": spec.memory}
    if spec.gpus:
        quantities[spec.gpu_type] = str(spec.gpus)
    container_env = [{"name": key, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}
                     for secret, keys in spec.secrets.items() for key in keys]
    container_env += [{"name": key, "valueFrom": {"secretKeyRef": {"name": secret, "key": key, "optional": True}}}
                      for secret, keys in spec.optional_secrets.items() for key in keys]
    container_env += [{"name": k, "value": v} for k, v in spec.env.items()]
    container = {"env": container_env, "volumeMounts": mounts, "resources": {"requests": quantities, "limits": quantities}}
    return pod, container
