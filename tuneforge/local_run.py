"""`tuneforge run`: the stages in order on this machine, under one MLflow parent run, with a JSON summary."""

from __future__ import annotations

import logging
import os
import time
import traceback
from pathlib import Path
from typing import Any

import mlflow

from tuneforge import storage, tracking
from tuneforge.components import data_prep, dpo, evaluate, export_gguf, merge, register, sft
from tuneforge.config import Config

log = logging.getLogger(__name__)

KEY_METRICS = ("eval_loss", "perplexity", "preference_accuracy", "task_score", "task_exact_match")


def plan(config: Config, run_dir: Path) -> list[tuple[str, Any, dict[str, Path], Path]]:
    """(stage, module, inputs, output) in order; each stage's inputs are earlier stages' outputs."""
    out = {name: run_dir / name for name in ("data", "sft", "dpo", "merged", "evaluation", "gguf", "registration")}
    steps = [("data-prep", data_prep, {}, out["data"]), ("sft", sft, {"data": out["data"]}, out["sft"])]
    final_model = {"model": out["sft"]}
    if config.dpo.enabled:
        steps.append(("dpo", dpo, {"data": out["data"], "model": out["sft"]}, out["dpo"]))
        final_model = {"model": out["dpo"]}
        if config.sft.method == "full":
            final_model["base"] = out["sft"]
    steps.append(("merge", merge, final_model, out["merged"]))
    curves = {k: out[k] for k in ("sft", "dpo") if k == "sft" or config.dpo.enabled}
    steps.append(("evaluate", evaluate, {"data": out["data"], "model": out["merged"], **curves}, out["evaluation"]))
    if config.export.enabled:
        steps.append(("export-gguf", export_gguf, {"model": out["merged"]}, out["gguf"]))
    if config.registry.enabled:
        inputs = {"evaluation": out["evaluation"], "model": out["merged"]}
        if config.export.enabled:
            inputs["gguf"] = out["gguf"]
        steps.append(("register", register, inputs, out["registration"]))
    return steps


def run_pipeline(config: Config, run_dir: Path | None = None) -> dict[str, Any]:
    run_dir = Path(run_dir or Path(config.workdir) / config.name / time.strftime("%Y%m%d-%H%M%S")).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    experiment_id = tracking.setup(config)
    steps = plan(config, run_dir)
    summary: dict[str, Any] = {"status": "running", "name": config.name, "run_dir": str(run_dir), "stages": {}}
    started = time.monotonic()
    with mlflow.start_run(experiment_id=experiment_id, run_name=config.name, tags={"tuneforge.stage": "pipeline"}) as parent:
        summary["mlflow"] = {"tracking_uri": mlflow.get_tracking_uri(), "run_id": parent.info.run_id}
        os.environ[tracking.PARENT_RUN_ENV] = parent.info.run_id
        # Durable outputs are published under the run's id, so concurrent runs never overwrite each other.
        os.environ[register.RUN_ID_ENV] = parent.info.run_id
        try:
            for index, (name, module, inputs, output) in enumerate(steps, start=1):
                log.info("[%d/%d] %s -> %s", index, len(steps), name, output)
                stage_started = time.monotonic()
                try:
                    result = module.run(config, inputs, output)
                    uri = register.published_uri(config, output.name)
                    published = storage.publish(output, uri, config.storage.endpoint_url) if uri else None
                except Exception as exc:
                    log.debug("stage %s failed:\n%s", name, traceback.format_exc())
                    summary["stages"][name] = {"status": "failed", "error": str(exc)}
                    summary["status"] = "failed"
                    summary["error"] = f"{name}: {exc}"
                    for later, *_ in steps[index:]:
                        summary["stages"][later] = {"status": "skipped"}
                    mlflow.set_tag("tuneforge.failed_stage", name)
                    break
                if name == "evaluate":
                    summary_metrics = result["metrics"]
                if name == "register":
                    summary["registered_model"] = {k: result["metrics"][k] for k in ("name", "version", "aliases", "decision")}
                seconds = round(time.monotonic() - stage_started, 1)
                summary["stages"][name] = {"status": "succeeded", "seconds": seconds, "output": str(output)}
                if published:
                    summary["stages"][name]["uri"] = published
                log.info("[%d/%d] %s done in %.1f s", index, len(steps), name, seconds)
            else:
                summary["status"] = "succeeded"
        finally:
            os.environ.pop(tracking.PARENT_RUN_ENV, None)
            os.environ.pop(register.RUN_ID_ENV, None)
        summary["seconds"] = round(time.monotonic() - started, 1)
        if summary["status"] == "succeeded":
            results = summary_metrics
            summary["metrics"] = {
                model: {k: round(results[model][k], 4) for k in KEY_METRICS if k in results[model]}
                for model in ("base", "candidate")
            }
            summary["artifacts"] = {
                "model": str(run_dir / "merged"),
                "adapter": str(run_dir / ("dpo" if config.dpo.enabled else "sft")),
                "report": str(run_dir / "evaluation" / "report.md"),
            }
            if config.export.enabled:
                summary["artifacts"]["gguf"] = [str(run_dir / "gguf" / f"{config.name}-{t}.gguf") for t in config.export.types]
            mlflow.log_metrics({f"candidate/{k}": v for k, v in summary["metrics"]["candidate"].items()})
        else:
            mlflow.end_run(status="FAILED")
    return summary
