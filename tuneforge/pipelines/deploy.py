"""Manifests that serve a registered model version, the one an alias points at (champion by default).

llamacpp: a Deployment and a Service running llama.cpp's OpenAI-compatible server on the version's GGUF file in the
export image, as the chart's `serving` section does: an init container fetches the file from S3 and checks its
sha256 (`tuneforge serve URI --fetch-only`), the server container runs `tuneforge serve FILE`, the command serve-check
ran, with probes on /v1/models, non-root and a read-only root filesystem.
kserve: a ServingRuntime for that same server and an InferenceService on the GGUF file (CPU), and an InferenceService
with KServe's Hugging Face runtime (vLLM) on the merged model for GPU clusters; each is read through the KServe API
types, and a key they do not have is an error that names it.
"""

from __future__ import annotations

import json
from typing import Any

from tuneforge import serving, storage
from tuneforge.errors import ConfigError, ManifestError
from tuneforge.pipelines import components

USER = 10001
HARDENED = {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]}}
POD_SECURITY = {"runAsNonRoot": True, "runAsUser": USER, "runAsGroup": USER, "fsGroup": USER,
                "seccompProfile": {"type": "RuntimeDefault"}}
KSERVE_RUNTIME = "tuneforge-llamacpp"


def resolve(client, reference: str) -> dict[str, Any]:
    """NAME[@ALIAS] (alias default champion): the version, its GGUF files and merged model, from the registry."""
    name, _, alias = reference.partition("@")
    alias = alias or "champion"
    try:
        version = client.get_model_version_by_alias(name, alias)
    except Exception as exc:  # mlflow raises its own RestException / MlflowException for a missing name or alias
        raise ConfigError(f"{reference}: no version of {name!r} has the alias {alias!r} ({str(exc).splitlines()[0]})") from None
    tags = version.tags
    return {"name": name, "alias": alias, "version": str(version.version), "source": version.source,
            "gguf_files": json.loads(tags.get("gguf_files", "{}"))}


def gguf_uri(model: dict[str, Any], gguf_type: str | None) -> tuple[str, str]:
    files = model["gguf_files"]
    if not files:
        raise ConfigError(f"{model['name']} version {model['version']} has no GGUF files: it was registered with "
                          "export.enabled false, or it is a classifier (task classification)")
    gguf_type = gguf_type or next(iter(files))
    if gguf_type not in files:
        raise ConfigError(f"--gguf-type {gguf_type}: version {model['version']} has {', '.join(files)}")
    uri = files[gguf_type]
    if not storage.is_s3(uri):
        raise ConfigError(f"version {model['version']}'s GGUF file is a local path ({uri}), which no cluster can read: "
                          "register it from a run with storage.uri set to an s3:// prefix")
    return gguf_type, uri


def _memory(size_bytes: int | None) -> str:
    """The file, its KV cache and the server: the file's size and 1 GiB more, in whole GiB, at least 2."""
    gib = -(-(size_bytes or 0) // 2**30) + 1
    return f"{max(2, gib)}Gi"


def _labels(model: dict[str, Any]) -> dict[str, str]:
    return {"app.kubernetes.io/name": "tuneforge-serving", "app.kubernetes.io/instance": model["name"],
            "tuneforge.io/model-version": model["version"]}


def llamacpp(model: dict[str, Any], gguf_type: str | None, s3_secret: str, size_bytes: int | None = None,
             image: str = components.EXPORT_IMAGE, context_length: int = 2048) -> list[dict[str, Any]]:
    gguf_type, uri = gguf_uri(model, gguf_type)
    file = uri.rsplit("/", 1)[1]
    name = f"{model['name']}-llamacpp"
    labels = _labels(model)
    mounts = [{"name": "models", "mountPath": "/models"}, {"name": "tmp", "mountPath": "/tmp"}]
    probe = {"httpGet": {"path": "/v1/models", "port": "http"}, "periodSeconds": 10}
    memory = _memory(size_bytes)
    deployment = {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name, "labels": labels,
                     "annotations": {"tuneforge.io/model": f"{model['name']}@{model['alias']}", "tuneforge.io/gguf": uri}},
        "spec": {"replicas": 1, "selector": {"matchLabels": labels}, "template": {
            "metadata": {"labels": labels},
            "spec": {
                "securityContext": POD_SECURITY,
                "initContainers": [{
                    "name": "fetch-model", "image": image,
                    "command": ["tuneforge", "serve", uri, "--models-dir", "/models", "--fetch-only"],
                    "envFrom": [{"secretRef": {"name": s3_secret}}], "volumeMounts": mounts, "securityContext": HARDENED,
                    "resources": {"requests": {"cpu": "250m", "memory": "512Mi"}, "limits": {"memory": "1Gi"}}}],
                "containers": [{
                    "name": "llamacpp", "image": image,
                    "command": ["tuneforge", "serve", f"/models/{file}", "--host", "0.0.0.0", "--port", str(serving.PORT),
                                "--alias", model["name"], "--context-length", str(context_length)],
                    "ports": [{"name": "http", "containerPort": serving.PORT}],
                    "readinessProbe": probe, "livenessProbe": {**probe, "initialDelaySeconds": 30, "failureThreshold": 6},
                    "volumeMounts": [{**mounts[0], "readOnly": True}, mounts[1]], "securityContext": HARDENED,
                    "resources": {"requests": {"cpu": "2", "memory": memory}, "limits": {"memory": memory}}}],
                "volumes": [{"name": "models", "emptyDir": {}}, {"name": "tmp", "emptyDir": {}}],
            }}},
    }
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "labels": labels},
               "spec": {"selector": labels, "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}}
    return [deployment, service]


def kserve(model: dict[str, Any], gguf_type: str | None, service_account: str, size_bytes: int | None = None,
           image: str = components.EXPORT_IMAGE, gpus: int = 1) -> list[dict[str, Any]]:
    gguf_type, uri = gguf_uri(model, gguf_type)
    file = uri.rsplit("/", 1)[1]
    memory = _memory(size_bytes)
    runtime = {
        "apiVersion": "serving.kserve.io/v1alpha1", "kind": "ServingRuntime",
        "metadata": {"name": KSERVE_RUNTIME},
        "spec": {
            "supportedModelFormats": [{"name": "gguf", "version": "1", "autoSelect": True}],
            "containers": [{
                "name": "kserve-container", "image": image,
                # KServe's storage initializer puts storageUri's file in /mnt/models.
                "command": ["tuneforge", "serve", f"/mnt/models/{file}", "--host", "0.0.0.0", "--port", str(serving.PORT),
                            "--alias", model["name"]],
                "ports": [{"containerPort": serving.PORT, "protocol": "TCP"}],
                "securityContext": HARDENED,
                "resources": {"requests": {"cpu": "2", "memory": memory}, "limits": {"memory": memory}}}],
        },
    }
    labels = _labels(model)
    gguf_service = {
        "apiVersion": "serving.kserve.io/v1beta1", "kind": "InferenceService",
        "metadata": {"name": f"{model['name']}-gguf", "labels": labels},
        "spec": {"predictor": {"serviceAccountName": service_account, "model": {
            "modelFormat": {"name": "gguf"}, "runtime": KSERVE_RUNTIME, "storageUri": uri}}},
    }
    services = [runtime, gguf_service]
    if storage.is_s3(model["source"]):
        services.append({
            "apiVersion": "serving.kserve.io/v1beta1", "kind": "InferenceService",
            "metadata": {"name": f"{model['name']}-vllm", "labels": labels},
            "spec": {"predictor": {"serviceAccountName": service_account, "model": {
                "modelFormat": {"name": "huggingface"}, "storageUri": model["source"],
                "args": [f"--model_name={model['name']}"],
                "resources": {"requests": {"cpu": "4", "memory": "16Gi", "nvidia.com/gpu": str(gpus)},
                              "limits": {"memory": "16Gi", "nvidia.com/gpu": str(gpus)}}}}},
        })
    return services


def kserve_sdk_available() -> bool:
    try:
        import kserve  # noqa: F401
    except ImportError:
        return False
    return True


def validate_kserve(manifest: dict[str, Any]) -> None:
    """Read a KServe manifest through the kserve SDK's API types (and Kubernetes' for the pod parts they use): a key
    they do not have, or a value of another shape, is an error that names where it is. The SDK's own deserializer
    cannot do this: it looks the Kubernetes types up among its own models."""
    import kserve.models
    from kubernetes.client import models as kubernetes_models

    def problems(value: Any, kind: str, where: str) -> list[str]:
        if kind.startswith("list["):
            if not isinstance(value, list):
                return [f"{where}: a list is expected, got {value!r}"]
            return [p for i, item in enumerate(value) for p in problems(item, kind[5:-1], f"{where}[{i}]")]
        if kind.startswith("dict("):
            if not isinstance(value, dict):
                return [f"{where}: a mapping is expected, got {value!r}"]
            inner = kind[5:-1].split(", ", 1)[1]
            return [p for key, item in value.items() for p in problems(item, inner, f"{where}.{key}")]
        if kind in ("str", "int", "float", "bool", "object", "datetime", "date"):
            expected = {"str": str, "int": int, "float": (int, float), "bool": bool}.get(kind, object)
            return [] if isinstance(value, expected) else [f"{where}: {value!r} is not a {kind}"]
        cls = getattr(kserve.models, kind, None) or getattr(kubernetes_models, kind)
        if not isinstance(value, dict):
            return [f"{where}: a {kind} mapping is expected, got {value!r}"]
        attributes = {json_key: name for name, json_key in cls.attribute_map.items()}
        found = []
        for key, item in value.items():
            here = f"{where}.{key}" if where else key
            found += ([f"{here}: unknown key"] if key not in attributes
                      else problems(item, cls.openapi_types[attributes[key]], here))
        return found

    kind = {"InferenceService": "V1beta1InferenceService", "ServingRuntime": "V1alpha1ServingRuntime"}[manifest["kind"]]
    found = problems(manifest, kind, "")
    if found:
        raise ManifestError(f"{manifest['kind']} manifest does not match the KServe API types:\n  " + "\n  ".join(found))
