"""Stage register: the evaluated candidate becomes a new version of the registered model.

Inputs: evaluation (an evaluate output), model (the merge output it evaluated), gguf (optional export output).
Every version gets the `challenger` alias and lineage tags (run ids, base model, data and template hashes,
evaluation metrics, GGUF files); `champion` moves to it only when the gate passes (registry.primary_metric
beats the base model and the current champion, no guard regresses). The decision and its reasons are logged.
Outputs: registration.json, manifest.json.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import mlflow

from tuneforge import registry, storage, tracking
from tuneforge.config import Config

STAGE = "register"
RUN_ID_ENV = "TUNEFORGE_RUN_ID"


def published_uri(config: Config, folder_name: str) -> str | None:
    """Where the pipeline published a stage output, when it publishes to S3."""
    run_id = os.environ.get(RUN_ID_ENV)
    if not config.storage.uri or not run_id:
        return None
    return f"{config.storage.uri.rstrip('/')}/{config.name}/{run_id}/{folder_name}"


def run(config: Config, inputs: dict[str, Path], output: Path) -> dict[str, Any]:
    evaluation = storage.read_manifest(Path(inputs["evaluation"]), "evaluate")
    model_dir = Path(inputs["model"])
    model = storage.read_manifest(model_dir, "merge")
    lineage = tracking.inherit_lineage(evaluation, config)
    results = evaluation["metrics"]
    tags = {
        "base_model": lineage.get("base_model"),
        "data_sha256": lineage.get("data_sha256"),
        "chat_template_sha256": lineage.get("chat_template_sha256"),
        "config_hash": config.hash(),
        "code_version": tracking.code_version(),
        "evaluate_run": evaluation["lineage"].get("mlflow_run_id"),
        "merge_run": model["lineage"].get("mlflow_run_id"),
    }
    source = published_uri(config, "merged") or str(model_dir.resolve())
    if "gguf" in inputs:
        gguf = storage.read_manifest(Path(inputs["gguf"]), "export-gguf")
        base = published_uri(config, "gguf") or str(Path(inputs["gguf"]).resolve())
        tags["gguf_files"] = json.dumps({t: f"{base}/{name}" for t, name in gguf["lineage"]["gguf_files"].items()})
    name = config.registry.model_name or config.name
    with tracking.stage_run(config, STAGE, lineage) as mlrun, storage.staged_output(output) as out:
        client = mlflow.MlflowClient()
        result = registry.register(client, name, source, mlrun.info.run_id, {k: v for k, v in tags.items() if v},
                                   results["candidate"], results["base"], config.registry)
        tracking.record("the registry tags", mlflow.set_tags,
                        {"registry.version": result["version"], "registry.promoted": str(result["decision"]["promoted"])})
        (out / "registration.json").write_text(json.dumps(result, indent=2))
        tracking.record(f"artifact {STAGE}/registration.json", mlflow.log_artifact, str(out / "registration.json"),
                        artifact_path=STAGE)
        lineage.update(tracking.run_record(mlrun))
        storage.write_manifest(out, STAGE, lineage, result)
    return {"status": "succeeded", "metrics": result, "output": str(output)}
