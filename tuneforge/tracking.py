"""MLflow tracking for stages: one MLflow run per stage, nested under the pipeline's run when there is one."""

from __future__ import annotations

import logging
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
from transformers import TrainerCallback

import tuneforge
from tuneforge.config import Config

log = logging.getLogger(__name__)

PARENT_RUN_ENV = "TUNEFORGE_PARENT_RUN_ID"


def tracking_uri(config: Config) -> str:
    if config.tracking.uri:
        return config.tracking.uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    workdir = Path(config.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{workdir / 'mlflow.db'}"


def code_version() -> str:
    package_dir = Path(tuneforge.__file__).parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=package_dir, capture_output=True, text=True, timeout=5
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        sha = ""
    return f"{tuneforge.__version__}+{sha}" if sha else tuneforge.__version__


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def setup(config: Config) -> str:
    """Point MLflow at the configured store and make sure the experiment exists; return its id."""
    uri = tracking_uri(config)
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.get_experiment_by_name(config.tracking.experiment)
    if experiment is not None:
        return experiment.experiment_id
    artifact_location = None
    if uri.startswith("sqlite:"):
        # Without a server, artifacts go next to the database rather than into ./mlruns of whatever cwd.
        artifact_location = (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri()
    try:
        return mlflow.create_experiment(config.tracking.experiment, artifact_location=artifact_location)
    except mlflow.exceptions.MlflowException:
        # Another stage created it meanwhile.
        return mlflow.get_experiment_by_name(config.tracking.experiment).experiment_id


@contextmanager
def stage_run(config: Config, stage: str, lineage: dict[str, Any]) -> Iterator[mlflow.ActiveRun]:
    experiment_id = setup(config)
    parent = os.environ.get(PARENT_RUN_ENV)
    with mlflow.start_run(
        experiment_id=experiment_id,
        run_name=f"{config.name}/{stage}",
        parent_run_id=parent or None,
        nested=bool(parent),
        tags={"tuneforge.stage": stage, "tuneforge.code_version": code_version()},
    ) as run:
        mlflow.log_params({k: str(v)[:6000] for k, v in flatten(config.model_dump(mode="json")).items()})
        set_lineage(lineage)
        yield run


def inherit_lineage(parent_manifest: dict[str, Any], config: Config) -> dict[str, Any]:
    """A stage's lineage: its input's (base model, data and template hashes, template, special tokens),
    pointing at the input's MLflow run as its parent."""
    lineage = {k: v for k, v in parent_manifest["lineage"].items() if k != "mlflow_run_id"}
    lineage.update(parent_run=parent_manifest["lineage"].get("mlflow_run_id"), config_hash=config.hash())
    return lineage


def set_lineage(lineage: dict[str, Any]) -> None:
    # The template itself travels in the manifests; its hash is the tag.
    tags = {f"lineage.{k}": str(v) for k, v in lineage.items() if v is not None and k != "chat_template"}
    mlflow.set_tags({k: v for k, v in tags.items() if not k.startswith("lineage.special_tokens")})


class MlflowMetrics(TrainerCallback):
    """Send the Trainer's logs to the active MLflow run at every logging step."""

    def __init__(self, prefix: str = ""):
        self.prefix = prefix

    def on_log(self, args, state, control, logs=None, **kwargs):
        numbers = {f"{self.prefix}{k}": float(v) for k, v in (logs or {}).items() if isinstance(v, (int, float))}
        if numbers and state.is_world_process_zero:
            mlflow.log_metrics(numbers, step=state.global_step)
