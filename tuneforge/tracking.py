"""MLflow tracking for stages: one MLflow run per stage, nested under the pipeline's run when there is one."""

from __future__ import annotations

import logging
import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
import requests

import tuneforge
from tuneforge import env
from tuneforge.config import Config
from tuneforge.errors import ConfigError, TrackingError

log = logging.getLogger(__name__)


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
    sha = sha or os.environ.get(env.CODE_REVISION, "").replace("unknown", "")
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
    exported = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    # set_tracking_uri also exports the URI to the environment, where tracking_uri would then find it first: a later
    # config in this process (another stage, another workdir) would log into this one's store.
    if exported is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = exported
    try:
        experiment = mlflow.get_experiment_by_name(config.tracking.experiment)
    except mlflow.exceptions.MlflowException as err:
        if err.get_http_status_code() != 401:
            raise
        raise ConfigError(env.mlflow_credentials_refused(uri)) from None
    if experiment is not None:
        return experiment.experiment_id
    artifact_location = None
    if uri.startswith("sqlite:"):
        # Without a server, artifacts go next to the database rather than into ./mlruns of whatever cwd.
        artifact_location = (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri()
    try:
        # Tagged as model training, so the MLflow UI opens the experiment on its runs rather than on GenAI traces.
        return mlflow.create_experiment(config.tracking.experiment, artifact_location=artifact_location,
                                        tags={"mlflow.experimentKind": "custom_model_development"})
    except mlflow.exceptions.MlflowException:
        # Another stage created it meanwhile.
        return mlflow.get_experiment_by_name(config.tracking.experiment).experiment_id


# MLflow's client retries each request 7 times over about 4 minutes; a stage does its own waiting
# (tracking.retry_seconds), so each request gives up sooner. Set variables win.
CLIENT_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                   "MLFLOW_HTTP_REQUEST_TIMEOUT": "60"}


def _unreachable(err: Exception) -> bool:
    """An error that says MLflow could not be reached or was briefly unable to answer, not that the call was wrong."""
    if isinstance(err, requests.RequestException):
        return True
    return isinstance(err, mlflow.exceptions.MlflowException) and (
        err.get_http_status_code() >= 500 or err.get_http_status_code() == 429
    )


def first_line(err: Exception) -> str:
    return str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__


class StageTracker:
    """One stage's MLflow run, and what it could not log. While the server is unreachable, calls are retried until
    `retry_seconds` have passed since the outage began; after that the stage stops calling MLflow and notes what
    went unlogged (the result, manifest and run summary list it)."""

    def __init__(self, retry_seconds: float):
        self.retry_seconds = retry_seconds
        self.run: mlflow.ActiveRun | None = None
        self.unlogged: list[str] = []
        self._give_up_at: float | None = None
        self._gave_up = False

    @property
    def run_id(self) -> str | None:
        return self.run.info.run_id if self.run else None

    def retrying(self, what: str, call, *args, **kwargs):
        """Call MLflow; while it is unreachable, retry until retry_seconds have passed since this outage began."""
        while True:
            try:
                result = call(*args, **kwargs)
                self._give_up_at = None
                return result
            except Exception as err:
                if not _unreachable(err):
                    raise
                now = time.monotonic()
                if self._give_up_at is None:
                    self._give_up_at = now + self.retry_seconds
                if now >= self._give_up_at:
                    self._gave_up = True
                    raise
                log.warning("MLflow: %s failed (%s); retrying for up to %.0f s", what, first_line(err), self._give_up_at - now)
                time.sleep(min(5.0, self._give_up_at - now))

    def record(self, what: str, call, *args, **kwargs) -> bool:
        """Log something without letting an unreachable server fail the stage: retried within the budget, then
        noted as not logged. Returns whether it was logged."""
        if self._gave_up:
            self.unlogged.append(what)
            return False
        try:
            self.retrying(what, call, *args, **kwargs)
            return True
        except Exception as err:
            if not _unreachable(err):
                raise
            log.error("MLflow: could not log %s: %s", what, first_line(err))
            self.unlogged.append(what)
            return False

    def run_record(self) -> dict[str, Any]:
        """What a manifest's lineage says about the stage's MLflow run: its id and, if any, what could not be logged."""
        return {"mlflow_run_id": self.run_id, **({"mlflow_unlogged": list(self.unlogged)} if self.unlogged else {})}

    def result(self, metrics: dict[str, Any], output: Path) -> dict[str, Any]:
        """A stage's result (the JSON `tuneforge stage` prints), once its run has ended."""
        found = {"status": "succeeded", "metrics": metrics, "output": str(output)}
        if self.unlogged:
            found["mlflow_unlogged"] = list(self.unlogged)
        return found

    def end_run(self, status: str) -> None:
        if self.record(f"the run's end ({status})", mlflow.MlflowClient().set_terminated, self.run_id, status):
            mlflow.end_run(status)
            return
        # Leave the run without the server, which cannot be reached (it keeps the run RUNNING): end_run forgets the
        # active run before it calls the server.
        try:
            mlflow.end_run(status)
        except Exception as err:
            if not _unreachable(err):
                raise


def pipeline_run_id(config: Config, job_id: str) -> str | None:
    """The MLflow run of the pipeline run `job_id` (opened by its first task), if there is one."""
    experiment_id = setup(config)
    found = mlflow.search_runs([experiment_id], f"tags.`kfp.job_id` = '{job_id}'", output_format="list", max_results=1)
    return found[0].info.run_id if found else None


def find_pipeline_run(config: Config, job_id: str) -> str | None:
    """pipeline_run_id, waiting up to tracking.retry_seconds for an unreachable MLflow."""
    for key, value in CLIENT_DEFAULTS.items():
        os.environ.setdefault(key, value)
    try:
        return StageTracker(config.tracking.retry_seconds).retrying("pipeline run lookup", pipeline_run_id, config, job_id)
    except Exception as err:
        if _unreachable(err):
            raise TrackingError(f"MLflow at {tracking_uri(config)} did not answer for {config.tracking.retry_seconds:.0f} s "
                                f"(tracking.retry_seconds): {first_line(err)}; the stage did not start") from None
        raise


@contextmanager
def stage_run(config: Config, stage: str, lineage: dict[str, Any]) -> Iterator[StageTracker]:
    """The stage's MLflow run, as a tracker. MLflow must answer (within retry_seconds) for the stage to start; once it
    has, an unreachable server no longer fails the stage (see StageTracker.record)."""
    for key, value in CLIENT_DEFAULTS.items():
        os.environ.setdefault(key, value)
    tracker = StageTracker(config.tracking.retry_seconds)
    parent = os.environ.get(env.PARENT_RUN_ID)
    try:
        experiment_id = tracker.retrying("experiment lookup", setup, config)
        tracker.run = tracker.retrying(
            "run start", mlflow.start_run, experiment_id=experiment_id, run_name=f"{config.name}/{stage}",
            parent_run_id=parent or None, nested=bool(parent),
            tags={"tuneforge.stage": stage, "tuneforge.code_version": code_version()})
        tracker.retrying("params", mlflow.log_params,
                         {k: str(v)[:6000] for k, v in flatten(config.model_dump(mode="json")).items()})
        tracker.retrying("lineage tags", set_lineage, lineage)
    except Exception as err:
        if tracker.run is not None:
            tracker.end_run("FAILED")
        if _unreachable(err):
            raise TrackingError(
                f"MLflow at {tracking_uri(config)} did not answer for {tracker.retry_seconds:.0f} s "
                f"(tracking.retry_seconds): {first_line(err)}; the {stage} stage did not start"
            ) from None
        raise
    status = "FAILED"
    try:
        yield tracker
        status = "FINISHED"
    finally:
        tracker.end_run(status)


# What a stage's lineage says about the stage itself, not inherited by the stages after it.
OWN_LINEAGE = ("mlflow_run_id", "mlflow_unlogged", "published_uri", "inputs")


def new_lineage(config: Config, inputs: dict[str, Any]) -> dict[str, Any]:
    """The lineage a stage starts from: the settings it ran with (config_hash is the hash of the stage's view of the
    config; `config` accumulates every stage's non-default settings along the chain), the code version, the inputs it
    read (paths or URIs) and where the pipeline publishes its output."""
    lineage: dict[str, Any] = {"base_model": config.base_model.source, "config_hash": config.hash(),
                               "config": config.model_dump(mode="json", exclude_defaults=True),
                               "code_version": code_version(), "inputs": {k: str(v) for k, v in inputs.items()}}
    if os.environ.get(env.PUBLISH_URI):
        lineage["published_uri"] = os.environ[env.PUBLISH_URI]
    return lineage


def inherit_lineage(parent_manifest: dict[str, Any], config: Config, inputs: dict[str, Any]) -> dict[str, Any]:
    """A stage's lineage: its input's (base model, data and template hashes, template, special tokens, settings),
    pointing at the input's MLflow run as its parent, and its own (see new_lineage)."""
    inherited = {k: v for k, v in parent_manifest["lineage"].items() if k not in OWN_LINEAGE}
    own = new_lineage(config, inputs)
    own["config"] = {**inherited.get("config", {}), **own["config"]}
    return {**inherited, **own, "parent_run": parent_manifest["lineage"].get("mlflow_run_id")}


def set_lineage(lineage: dict[str, Any]) -> None:
    # The template and the settings travel in the manifests (and the params); their hashes are tags.
    skip = ("chat_template", "config", "special_tokens", "data_objects", "inputs")
    mlflow.set_tags({f"lineage.{k}": str(v)[:5000] for k, v in lineage.items() if v is not None and k not in skip})
