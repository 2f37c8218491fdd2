"""What each KFP component runs: one stage, as `tuneforge stage` would, inside the pipeline's MLflow run."""

import os
from pathlib import Path
from typing import Any

# The folder each stage's output is published under, the same names `tuneforge run` uses.
FOLDERS = {"data-prep": "data", "sft": "sft", "dpo": "dpo", "merge": "merged", "evaluate": "evaluation",
           "export-gguf": "gguf", "register": "registration"}


def run_stage(stage: str, config_json: str, parent_run: str, inputs: dict[str, str], output: str,
              job_image: str = "") -> dict[str, Any]:
    """Run one stage as `tuneforge stage` would, under the pipeline's MLflow run, and publish its output to S3.
    sft or dpo on several nodes is handed to Kubeflow Trainer instead, in `job_image` (pipelines/trainjob.py)."""
    import importlib
    import json
    import logging

    from tuneforge import storage, tracking
    from tuneforge.cli import STAGES
    from tuneforge.components import register
    from tuneforge.config import Config

    # The stage's own progress (resuming from a checkpoint, MLflow outages) belongs in the task's log.
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("tuneforge").setLevel(logging.INFO)
    config = Config.model_validate(json.loads(config_json))
    os.environ[tracking.PARENT_RUN_ENV] = parent_run
    os.environ[register.RUN_ID_ENV] = parent_run
    uri = register.published_uri(config, FOLDERS[stage])
    main_process = True
    if stage in ("sft", "dpo"):
        # These imports bring torch: only for the training stages.
        from tuneforge import backends, distributed
        from tuneforge.training import CHECKPOINT_URI_ENV

        if getattr(config, stage).distributed.nodes > 1 and not distributed.launched():
            from tuneforge.pipelines import trainjob

            local = {k: Path(v) for k, v in inputs.items() if v}
            return trainjob.run(config, config_json, stage, parent_run, local, Path(output), job_image)
        if uri:
            # A retry of this task (KFP's, on whichever node) resumes from the checkpoints mirrored here.
            os.environ[CHECKPOINT_URI_ENV] = f"{uri}.checkpoints"
        backends.import_unsloth_first(getattr(config, stage))
        main_process = distributed.is_main_process()  # under torchrun the main process alone writes the output
    module = importlib.import_module(f"tuneforge.components.{STAGES[stage][0]}")
    result = module.run(config, {k: Path(v) for k, v in inputs.items() if v}, Path(output))
    if tracking.unlogged():
        result["mlflow_unlogged"] = tracking.unlogged()
    if uri and main_process:
        result["uri"] = storage.publish(Path(output), uri, config.storage.endpoint_url)
        if stage in ("sft", "dpo"):
            storage.delete(f"{uri}.checkpoints", config.storage.endpoint_url)
    return result



def record_metrics(artifact, values: dict[str, Any]) -> None:
    """Log numeric values on a KFP Metrics artifact and also write them to its file: the UI reads the logged
    values, and an artifact with no file on disk is treated as missing by kfp.local's cache."""
    import json

    numbers = {k: float(v) for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    for key, value in numbers.items():
        artifact.log_metric(key, value)
    Path(artifact.path).parent.mkdir(parents=True, exist_ok=True)
    Path(artifact.path).write_text(json.dumps(numbers))
