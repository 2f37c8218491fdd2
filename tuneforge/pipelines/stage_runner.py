"""What the KFP components run: the pipeline's first and last tasks, and one stage as `tuneforge stage` would, inside
the pipeline's MLflow run, with its output published to S3 when the config says so. It lives apart from the KFP
decorators so that the component bodies can import it inside the executor."""

from __future__ import annotations

import atexit
import gc
import importlib
import json
import logging
import os
import uuid
from pathlib import Path
from typing import Any

import mlflow

from tuneforge import env, models, registry, stages, storage, tracking
from tuneforge.config import Config
from tuneforge.data.fingerprint import fingerprint
from tuneforge.errors import SetupError, TuneforgeError
from tuneforge.pipelines import trainjob

log = logging.getLogger(__name__)

# A task's process ends with its stage. Python's last garbage collections at exit walk every object the imports made
# (1.5-2 s of a training task, a fifth of a tiny model's task); everything is written by then, so they are skipped.
atexit.register(gc.freeze)


def _log_to_task() -> None:
    # The stage's own progress (resuming from a checkpoint, MLflow outages) belongs in the task's log.
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("tuneforge").setLevel(logging.INFO)


def run_identity(job_id: str) -> str:
    """The KFP run a task belongs to: KFP_RUN_ID where it is set (a cluster's pods, `tuneforge run`), else the job id
    KFP handed to the task."""
    return os.environ.get(env.KFP_RUN_ID) or job_id


def start_run(config_json: str, job_id: str) -> tuple[str, str, str]:
    """Open the pipeline's MLflow run (or find it, on a retry), fingerprint the data and the base model and find the
    champion; the fingerprints and what they covered are logged to the run. Returns (the data's fingerprint, the base
    model's, the champion's version, source and model_sha256 as JSON, or "")."""
    _log_to_task()
    config = Config.model_validate(json.loads(config_json))
    job = run_identity(job_id)
    run_id = tracking.pipeline_run_id(config, job)
    client = mlflow.MlflowClient()
    if run_id is None:
        run_id = client.create_run(tracking.setup(config), run_name=config.name,
                                   tags={"tuneforge.stage": "pipeline", "kfp.job_id": job}).info.run_id
    found = fingerprint(config)
    model = models.fingerprint(config.base_model)
    if model["identity"].get("files", []) is None:
        log.warning("base_model.source %s is not visible to this task: new weights there will not retrain a scheduled "
                    "run; keep base models that change on S3 or the Hub", config.base_model.source)
    name = config.registry.model_name or config.name
    champion = registry.champion_reference(client, name) if config.registry.enabled else None
    for key, value in {"data.fingerprint": found["sha256"], "data.objects": str(len(found["objects"])),
                       "base_model.fingerprint": model["sha256"],
                       "registry.champion_at_start": champion["version"] if champion else "none"}.items():
        client.set_tag(run_id, key, value)
    client.log_dict(run_id, found, "fingerprint.json")
    client.log_dict(run_id, model, "base_model_fingerprint.json")
    log.info("data fingerprint %s over %d objects; base model %s; champion %s", found["sha256"][:12],
             len(found["objects"]), model["sha256"][:12], f"version {champion['version']}" if champion else "none")
    return found["sha256"], model["sha256"], json.dumps(champion) if champion else ""


def finish_run(config_json: str, job_id: str, state: str, error: str | None) -> None:
    """Close the pipeline's MLflow run as FINISHED, or FAILED with the error when any stage failed."""
    config = Config.model_validate(json.loads(config_json))
    run_id = tracking.pipeline_run_id(config, run_identity(job_id))
    if run_id is None:
        return
    client = mlflow.MlflowClient()
    if state != "SUCCEEDED":
        client.set_tag(run_id, "tuneforge.error", (error or state)[:5000])
    client.set_terminated(run_id, "FINISHED" if state == "SUCCEEDED" else "FAILED")


def run_stage(stage: str, config_json: str, inputs: dict[str, str], output: str, job_image: str = "",
              data_fingerprint: str = "", base_model_fingerprint: str = "",
              parent_run: str | None = None) -> dict[str, Any]:
    """Run one stage under the pipeline's MLflow run (`parent_run`, or the one of the KFP run in KFP_RUN_ID) and
    publish its output to S3. sft or dpo on several nodes is handed to Kubeflow Trainer instead, in `job_image`
    (pipelines/trainjob.py)."""
    _log_to_task()
    config = Config.model_validate(json.loads(config_json))
    spec = stages.get(stage)
    job = os.environ.get(env.KFP_RUN_ID)
    parent = parent_run or (tracking.find_pipeline_run(config, job) if job else None)
    if parent is None:
        log.warning("%s: no pipeline MLflow run found (KFP_RUN_ID %s); the stage's run is not nested", stage, job or "unset")
    os.environ[env.PARENT_RUN_ID] = parent or ""
    os.environ[env.RUN_ID] = parent or f"unlinked-{uuid.uuid4().hex[:12]}"
    if data_fingerprint:
        os.environ[env.DATA_FINGERPRINT] = data_fingerprint
    if base_model_fingerprint:
        os.environ[env.BASE_MODEL_FINGERPRINT] = base_model_fingerprint
    uri = storage.published_uri(config.storage.uri, config.name, spec.folder)
    if uri:
        os.environ[env.PUBLISH_URI] = uri
    local_inputs = {k: v if storage.is_s3(v) else Path(v) for k, v in inputs.items() if v}
    main_process = True
    if spec.trains:
        # Imported here: they bring torch, which the other stages' tasks (register, say) need not load.
        from tuneforge import backends, distributed

        settings = getattr(config, stage)
        if settings.distributed.nodes > 1 and not distributed.launched():
            return trainjob.run(config, config_json, stage, parent or os.environ[env.RUN_ID], local_inputs, Path(output),
                                job_image)
        if uri:
            # A retry of this task (KFP's, on whichever node) resumes from the checkpoints mirrored here.
            os.environ[env.CHECKPOINT_URI] = f"{uri}.checkpoints"
        backends.import_unsloth_first(settings)
        main_process = distributed.is_main_process()  # under torchrun the main process alone writes the output
    earlier = _user_error(output, uri, config.storage.endpoint_url)
    if earlier:
        raise SetupError(f"not run again: an earlier attempt of this {stage} task failed with a user error, which a retry "
                         f"repeats: {earlier}")
    try:
        result = importlib.import_module(spec.module).run(config, local_inputs, Path(output))
    except TuneforgeError as exc:
        if not exc.retryable and main_process:
            _record_user_error(output, uri, config.storage.endpoint_url, str(exc))
        raise
    if uri and main_process:
        result["uri"] = storage.publish(Path(output), uri, config.storage.endpoint_url)
        if spec.trains:
            storage.delete(f"{uri}.checkpoints", config.storage.endpoint_url)
    return result


# A task that fails with a user error (bad input, config or setup) would fail the same way when KFP retries it, and KFP's
# retry policy cannot tell errors apart: the failing attempt leaves a marker, and the next attempts stop at once. Beside
# the output locally (kfp.local retries into the same folder), beside its S3 copy on a cluster (a retry is a new pod).
def _markers(output: str, uri: str | None) -> tuple[Path, str | None]:
    return Path(output).with_name(Path(output).name + ".user-error"), f"{uri}.user-error" if uri else None


def _user_error(output: str, uri: str | None, endpoint_url: str | None) -> str | None:
    local, remote = _markers(output, uri)
    if local.exists():
        return local.read_text()
    return storage.get_text(remote, endpoint_url) if remote else None


def _record_user_error(output: str, uri: str | None, endpoint_url: str | None, message: str) -> None:
    local, remote = _markers(output, uri)
    local.parent.mkdir(parents=True, exist_ok=True)
    local.write_text(message)
    if remote:
        try:
            storage.put_text(remote, message, endpoint_url)
        except TuneforgeError as exc:  # the marker only saves a retry's time; the stage's own error is what matters
            log.warning("could not leave the user-error marker at %s: %s", remote, exc)


def record_metrics(artifact, values: dict[str, Any]) -> None:
    """Log numeric values on a KFP Metrics artifact and also write them to its file: the UI reads the logged
    values, and an artifact with no file on disk is treated as missing by kfp.local's cache."""
    numbers = {k: float(v) for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    for key, value in numbers.items():
        artifact.log_metric(key, value)
    Path(artifact.path).parent.mkdir(parents=True, exist_ok=True)
    Path(artifact.path).write_text(json.dumps(numbers))


def trial_config(config_json: str, trial: str) -> str:
    """A sweep trial's config: the pipeline's with the trial's overrides (config.with_overrides)."""
    from tuneforge.config import with_overrides

    return with_overrides(Config.model_validate(json.loads(config_json)), json.loads(trial)["overrides"]).to_json()


def select_trial(config_json: str, trials: list[str], evaluations: list[str], models: list[str], digests: list[str],
                 best: str) -> tuple[str, str]:
    """The sweep's winner by sweep.metric (or registry.primary_metric) on the same eval split: its merged model is
    copied to BEST. Each trial becomes an MLflow run under the pipeline's run, with its overrides as parameters and
    its evaluation as metrics, so MLflow's compare and parallel-coordinates views show the sweep. Returns the winner
    (trial, overrides and score, as JSON) and its merged model's digest."""
    import shutil
    import time

    from mlflow.entities import Metric, Param

    _log_to_task()
    config = Config.model_validate(json.loads(config_json))
    metric = config.sweep.metric or config.registry.primary_metric
    scores = [json.loads((Path(evaluation) / "metrics.json").read_text())["candidate"] for evaluation in evaluations]
    if len(scores) != len(trials):
        raise SetupError(f"{len(trials)} sweep trials but {len(scores)} evaluations came back")
    if metric not in scores[0]:
        raise SetupError(f"sweep.metric {metric!r} is not among evaluate's metrics: {', '.join(sorted(scores[0]))}")
    lower = metric in registry.LOWER_IS_BETTER
    winner = min(range(len(trials)), key=lambda i: scores[i][metric] if lower else -scores[i][metric])
    for i, trial in enumerate(trials):
        log.info("trial %d %s: %s %.4g%s", i, json.loads(trial)["overrides"], metric, scores[i][metric],
                 " (the winner)" if i == winner else "")

    experiment = tracking.setup(config)
    job = os.environ.get(env.KFP_RUN_ID)
    parent = tracking.find_pipeline_run(config, job) if job else None
    client = mlflow.MlflowClient()
    now = int(time.time() * 1000)
    for i, (trial, candidate) in enumerate(zip(trials, scores, strict=True)):
        tags = {"tuneforge.stage": "trial", "tuneforge.sweep_metric": metric, "tuneforge.sweep_winner": str(i == winner)}
        if parent:
            tags["mlflow.parentRunId"] = parent
        run = client.create_run(experiment, run_name=f"{config.name}/trial-{i}", tags=tags)
        overrides = json.loads(trial)["overrides"]
        client.log_batch(run.info.run_id, metrics=[Metric(k, float(v), now, 0) for k, v in candidate.items()],
                         params=[Param(k, str(v)) for k, v in overrides.items()])
        client.set_terminated(run.info.run_id)
    shutil.copytree(models[winner], best, dirs_exist_ok=True)
    chosen = {"trial": winner, "overrides": json.loads(trials[winner])["overrides"], metric: scores[winner][metric]}
    return json.dumps(chosen), digests[winner]
