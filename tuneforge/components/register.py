"""Stage register: the evaluated candidate becomes a new version of the registered model, unless the registry
already holds the same model.

Inputs: evaluation (an evaluate output), model (the merge output it evaluated), gguf (optional export output),
serving (optional serve-check output: its agreement figures become a tag and a checklist item).
A model whose merged files equal a registered version's (`model_sha256`) registers nothing: the result says
"unchanged: version N". Otherwise the version gets the `challenger` alias, lineage tags (run ids, base model, data and
template hashes, evaluation metrics, GGUF files) and a model card as its description; the gate compares it with the
base model and the champion on evaluate's same-split numbers, and `champion` (or, under registry.approval: manual,
`approved-pending`) moves to it when it passes. The decision and its reasons are logged.
Outputs: registration.json, model_card.md, manifest.json.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlflow

from tuneforge import checklist, model_card, registry, storage, tracking
from tuneforge.config import Config
from tuneforge.errors import SetupError

STAGE = "register"


def _published(manifest: dict[str, Any], folder: Path) -> str:
    """Where a stage output is kept for good: its S3 copy when the pipeline published it, else the local folder."""
    return manifest["lineage"].get("published_uri") or str(folder.resolve())


def run(config: Config, inputs: dict[str, Path], output: Path) -> dict[str, Any]:
    evaluation = storage.read_manifest(Path(inputs["evaluation"]), "evaluate")
    model_dir = Path(inputs["model"])
    model = storage.read_manifest(model_dir, "merge")
    winner, trained_by = evaluation["metrics"].get("winner"), model["lineage"].get("trained_by")
    if winner and trained_by and winner != trained_by:
        raise SetupError(f"{model_dir} holds the {trained_by} model, but evaluate chose the {winner} model as the candidate")
    lineage = tracking.inherit_lineage(evaluation, config, inputs)
    model_sha256 = storage.content_digest(model)
    tags = {
        "base_model": lineage.get("base_model"),
        "data_sha256": lineage.get("data_sha256"),
        "data_fingerprint": lineage.get("data_fingerprint"),
        "base_model_fingerprint": lineage.get("base_model_fingerprint"),
        "chat_template_sha256": lineage.get("chat_template_sha256"),
        "config_hash": config.hash(),
        "code_version": tracking.code_version(),
        "evaluate_run": evaluation["lineage"].get("mlflow_run_id"),
        "merge_run": model["lineage"].get("mlflow_run_id"),
        "trained_by": trained_by,
        "winner_reason": evaluation["metrics"].get("winner_reason"),
    }
    if lineage.get("base_model_commit"):
        tags["base_model_commit"] = lineage["base_model_commit"]
    gguf_files: dict[str, str] = {}
    gguf = None
    if "gguf" in inputs:
        gguf = storage.read_manifest(Path(inputs["gguf"]), "export-gguf")
        base = _published(gguf, Path(inputs["gguf"]))
        gguf_files = {t: f"{base}/{name}" for t, name in gguf["lineage"]["gguf_files"].items()}
        tags["gguf_files"] = json.dumps(gguf_files)
    items = checklist.from_export(evaluation["metrics"].get("checklist", []), lineage["chat_template_sha256"], gguf,
                                  gguf["lineage"].get("gguf_chat_template_sha256", {}) if gguf else {})
    serving = storage.read_manifest(Path(inputs["serving"]), "serve-check") if "serving" in inputs else None
    if serving:
        tags["serve_check"] = json.dumps({t: {m: round(c["agreement"], 4) for m, c in r["by_metric"].items()}
                                          for t, r in serving["metrics"]["types"].items()})
    items = checklist.from_serving(items, serving)
    statuses = [i["status"] for i in items]
    tags["checklist"] = ", ".join(f"{statuses.count(s)} {s}" for s in ("pass", "fail", "n/a") if s in statuses)
    name = config.registry.model_name or config.name

    source = _published(model, model_dir)

    def card(result: dict[str, Any]) -> str:
        return model_card.render(result, lineage, evaluation["metrics"], source, gguf_files, config.registry.primary_metric,
                                 items)

    with tracking.stage_run(config, STAGE, lineage) as tracker, storage.staged_output(output) as out:
        result = registry.register(mlflow.MlflowClient(), name, source, tracker.run_id,
                                   {k: v for k, v in tags.items() if v}, evaluation["metrics"], model_sha256,
                                   config.registry, card)
        decision = result["decision"]
        tracker.record("the registry tags", mlflow.set_tags, {
            "registry.version": result["version"], "registry.promoted": str(decision["promoted"]),
            "registry.outcome": registry.outcome(result)})
        result["checklist"] = items
        (out / "registration.json").write_text(json.dumps(result, indent=2))
        (out / "model_card.md").write_text(card(result))
        (out / "checklist.md").write_text("# The guide's checklist\n\n" + checklist.markdown(items))
        tracker.record("the checklist", mlflow.set_tags, {f"checklist.{i['key']}": i["status"] for i in items})
        for file in ("registration.json", "model_card.md", "checklist.md"):
            tracker.record(f"artifact {STAGE}/{file}", mlflow.log_artifact, str(out / file), artifact_path=STAGE)
        lineage.update(tracker.run_record(), model_sha256=model_sha256)
        storage.write_manifest(out, STAGE, lineage, result)
    return tracker.result(result, output)

