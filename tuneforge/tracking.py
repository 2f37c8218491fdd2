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


class TrackingError(RuntimeError):
    """MLflow could not be reached when a stage started; nothing was done."""


# What this stage could not send to MLflow; until when it keeps trying while MLflow is unreachable, and whether an
# outage has outlasted that (then the stage stops calling MLflow).
_unlogged: list[str] = []
_give_up_at: float | None = None
_gave_up = False
_retry_seconds = 120.0

# MLflow's client retries each request 7 times over about 4 minutes; a stage does its own waiting
# (tracking.retry_seconds), so each request gives up sooner. Set variables win.
CLIENT_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                   "MLFLOW_HTTP_REQUEST_TIMEOUT": "60"}


def unlogged() -> list[str]:
    return list(_unlogged)


def _unreachable(err: Exception) -> bool:
    """An error that says MLflow could not be reached or was briefly unable to answer, not that the call was wrong."""
    if isinstance(err, requests.RequestException):
        return True
    return isinstance(err, mlflow.exceptions.MlflowException) and (
        err.get_http_status_code() >= 500 or err.get_http_status_code() == 429
    )


def first_line(err: Exception) -> str:
    return str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__


def _retrying(what: str, call, *args, **kwargs):
    """Call MLflow; while it is unreachable, retry until retry_seconds have passed since this outage began."""
    global _give_up_at, _gave_up
    while True:
        try:
            result = call(*args, **kwargs)
            _give_up_at = None
            return result
        except Exception as err:
            if not _unreachable(err):
                raise
            now = time.monotonic()
            if _give_up_at is None:
                _give_up_at = now + _retry_seconds
            if now >= _give_up_at:
                _gave_up = True
                raise
            log.warning("MLflow: %s failed (%s); retrying for up to %.0f s", what, first_line(err), _give_up_at - now)
            time.sleep(min(5.0, _give_up_at - now))


def record(what: str, call, *args, **kwargs) -> bool:
    """Log something to MLflow without letting an unreachable server fail the stage: retried within the budget,
    then noted in the stage's result as not logged. Returns whether it was logged."""
    if _gave_up:
        _unlogged.append(what)
        return False
    try:
        _retrying(what, call, *args, **kwargs)
        return True
    except Exception as err:
        if not _unreachable(err):
            raise
        log.error("MLflow: could not log %s: %s", what, first_line(err))
        _unlogged.append(what)
        return False


@contextmanager
def stage_run(config: Config, stage: str, lineage: dict[str, Any]) -> Iterator[mlflow.ActiveRun]:
    """The stage's MLflow run. MLflow must answer (within retry_seconds) for the stage to start; once it has,
    an unreachable server no longer fails the stage (see record)."""
    global _give_up_at, _gave_up, _retry_seconds
    for key, value in CLIENT_DEFAULTS.items():
        os.environ.setdefault(key, value)
    _unlogged.clear()
    _give_up_at, _gave_up, _retry_seconds = None, False, config.tracking.retry_seconds
    parent = os.environ.get(PARENT_RUN_ENV)
    run = None
    try:
        experiment_id = _retrying("experiment lookup", setup, config)
        run = _retrying("run start", mlflow.start_run, experiment_id=experiment_id, run_name=f"{config.name}/{stage}",
                        parent_run_id=parent or None, nested=bool(parent),
                        tags={"tuneforge.stage": stage, "tuneforge.code_version": code_version()})
        _retrying("params", mlflow.log_params,
                  {k: str(v)[:6000] for k, v in flatten(config.model_dump(mode="json")).items()})
        _retrying("lineage tags", set_lineage, lineage)
    except Exception as err:
        if run is not None:
            _end(run, "FAILED")
        if _unreachable(err):
            raise TrackingError(
                f"MLflow at {tracking_uri(config)} did not answer for {_retry_seconds:.0f} s (tracking.retry_seconds): "
                f"{first_line(err)}; the {stage} stage did not start"
            ) from None
        raise
    status = "FAILED"
    try:
        yield run
        status = "FINISHED"
    finally:
        _end(run, status)


def _end(run: mlflow.ActiveRun, status: str) -> None:
    if record(f"the run's end ({status})", mlflow.MlflowClient().set_terminated, run.info.run_id, status):
        mlflow.end_run(status)
        return
    # Leave the run without the server, which cannot be reached (it keeps the run RUNNING): end_run forgets the
    # active run before it calls the server.
    try:
        mlflow.end_run(status)
    except Exception as err:
        if not _unreachable(err):
            raise


def run_record(run: mlflow.ActiveRun) -> dict[str, Any]:
    """What a manifest's lineage says about the stage's MLflow run: its id and, if any, what could not be logged."""
    return {"mlflow_run_id": run.info.run_id, **({"mlflow_unlogged": unlogged()} if _unlogged else {})}


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
