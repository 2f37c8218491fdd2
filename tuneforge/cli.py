"""The `tuneforge` command."""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Fine-tune causal language models.")

# Stage name -> module in tuneforge.components, and the inputs it requires / accepts.
STAGES = {
    "data-prep": ("data_prep", (), ()),
    "sft": ("sft", ("data",), ()),
    "dpo": ("dpo", ("data", "model"), ()),
    "merge": ("merge", ("model",), ("base",)),
    "evaluate": ("evaluate", ("data", "model"), ("sft", "dpo")),
    "export-gguf": ("export_gguf", ("model",), ()),
    "register": ("register", ("evaluation", "model"), ("gguf",)),
}

SetOption = Annotated[list[str] | None, typer.Option("--set", help="Override a config key: a.b=value")]


def _user_errors() -> tuple[type[Exception], ...]:
    from tuneforge.chat_templates import TemplateError
    from tuneforge.components.data_prep import DataError
    from tuneforge.components.merge import MergeCheckError
    from tuneforge.config import ConfigError
    from tuneforge.distributed import LaunchError
    from tuneforge.gguf import ExportError
    from tuneforge.models import ModelLoadError
    from tuneforge.pipelines.trainjob import ManifestError
    from tuneforge.registry import RegistryError
    from tuneforge.services import ServiceError
    from tuneforge.storage import IncompleteOutputError, StorageError
    from tuneforge.tracking import TrackingError
    from tuneforge.training import TrainingSetupError

    return (ConfigError, DataError, ExportError, LaunchError, MergeCheckError, ModelLoadError, TemplateError, IncompleteOutputError,
            TrainingSetupError, TrackingError, StorageError, RegistryError, ServiceError, ManifestError)


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")


def _load(config_path: Path, overrides: list[str] | None):
    from tuneforge.config import ConfigError, load_config

    try:
        return load_config(config_path, overrides)
    except ConfigError as exc:
        _fail(str(exc))


@app.command()
def validate(config: Path, set_: SetOption = None) -> None:
    """Validate a config and print it with every default filled in."""
    import yaml

    cfg = _load(config, set_)
    typer.echo(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))


@app.command("config-schema")
def config_schema() -> None:
    """Print the JSON schema of the config: every key, its type, default and meaning."""
    from tuneforge.config import Config

    typer.echo(json.dumps(Config.model_json_schema(), indent=2))


@app.command()
def stage(
    name: Annotated[str, typer.Argument(help=f"One of: {', '.join(STAGES)}")],
    config: Annotated[Path, typer.Option(help="The run's YAML config.")],
    output: Annotated[Path, typer.Option(help="Output directory; written only when the stage succeeds.")],
    input_: Annotated[list[str] | None, typer.Option("--input", help="KEY=PATH of an earlier stage's output.")] = None,
    set_: SetOption = None,
    checkpoint_uri: Annotated[str | None, typer.Option(
        help="sft/dpo: mirror checkpoints to this S3 prefix and resume from it when there are none beside OUTPUT.",
        envvar="TUNEFORGE_CHECKPOINT_URI")] = None,
    verbose: bool = False,
) -> None:
    """Run one stage: what each pipeline container executes."""
    _setup_logging(verbose)
    if checkpoint_uri:
        if not checkpoint_uri.startswith("s3://"):
            _fail(f"--checkpoint-uri {checkpoint_uri!r}: an s3://BUCKET/PREFIX is expected")
        os.environ["TUNEFORGE_CHECKPOINT_URI"] = checkpoint_uri
    if name not in STAGES:
        _fail(f"unknown stage {name!r}; stages are {', '.join(STAGES)}")
    module_name, required, optional = STAGES[name]
    inputs: dict[str, Path] = {}
    for item in input_ or []:
        key, sep, value = item.partition("=")
        if not sep or key not in (*required, *optional):
            _fail(f"--input {item!r}: stage {name} takes {', '.join(required + optional) or 'no inputs'} as KEY=PATH")
        inputs[key] = Path(value)
    missing = [k for k in required if k not in inputs]
    if missing:
        _fail(f"stage {name} needs --input {' --input '.join(f'{k}=PATH' for k in missing)}")
    cfg = _load(config, set_)
    if name in ("sft", "dpo"):
        from tuneforge import backends

        backends.import_unsloth_first(getattr(cfg, name))
    module = importlib.import_module(f"tuneforge.components.{module_name}")
    try:
        # Libraries print progress to stdout; keep stdout for the JSON result alone.
        with contextlib.redirect_stdout(sys.stderr):
            result = module.run(cfg, inputs, output)
    except _user_errors() as exc:
        _fail(str(exc))
    from tuneforge import tracking

    if tracking.unlogged():
        result["mlflow_unlogged"] = tracking.unlogged()
    typer.echo(json.dumps(result))


@app.command()
def run(
    config: Path,
    set_: SetOption = None,
    pipeline_root: Annotated[Path | None, typer.Option(help="Where kfp.local keeps task outputs; default WORKDIR/kfp.")] = None,
    verbose: bool = False,
) -> None:
    """Run the whole KFP pipeline on this machine (kfp.local); the last stdout line is a JSON summary."""
    _setup_logging(verbose)
    from tuneforge.pipelines.pipeline import run_locally

    cfg = _load(config, set_)
    cfg.workdir = str(Path(cfg.workdir).resolve())
    try:
        with contextlib.redirect_stdout(sys.stderr):
            summary = run_locally(cfg, pipeline_root or Path(cfg.workdir) / "kfp")
    except _user_errors() as exc:
        _fail(str(exc))
    typer.echo(json.dumps(summary))
    if summary["status"] != "succeeded":
        raise typer.Exit(1)


@app.command("compile")
def compile_(
    config: Path,
    output: Annotated[Path, typer.Option("-o", "--output", help="Where to write the pipeline IR YAML.")] = Path("pipeline.yaml"),
    set_: SetOption = None,
) -> None:
    """Compile the pipeline for a config to KFP IR YAML (upload it to any KFP v2 server)."""
    from tuneforge.pipelines.pipeline import compile_pipeline

    cfg = _load(config, set_)
    try:
        typer.echo(str(compile_pipeline(cfg, output)))
    except _user_errors() as exc:
        _fail(str(exc))


HostOption = Annotated[str | None, typer.Option(envvar="KFP_HOST", help="KFP API endpoint; omit inside the cluster (service account).")]
TokenOption = Annotated[str | None, typer.Option(help="Bearer token for the KFP API; default $KFP_TOKEN.")]
ExperimentOption = Annotated[str, typer.Option(help="KFP experiment.")]


@app.command()
def submit(config: Path, host: HostOption = None, token: TokenOption = None, experiment: ExperimentOption = "tuneforge",
           set_: SetOption = None) -> None:
    """Compile and submit one run to a Kubeflow Pipelines server."""
    import tempfile

    from tuneforge.pipelines.pipeline import submit as submit_run

    cfg = _load(config, set_)
    # kfp.Client prints links to stdout; stdout is for the JSON result.
    with tempfile.TemporaryDirectory() as folder, contextlib.redirect_stdout(sys.stderr):
        try:
            result = submit_run(cfg, host, token, experiment, Path(folder) / "pipeline.yaml")
        except _user_errors() as exc:
            _fail(str(exc))
    typer.echo(json.dumps(result))


@app.command()
def schedule(
    config: Path,
    cron: Annotated[str, typer.Option(help="When to retrain: 5-field cron (UTC), or KFP's 6 fields with seconds first.")],
    host: HostOption = None,
    token: TokenOption = None,
    experiment: ExperimentOption = "tuneforge",
    max_concurrency: Annotated[int, typer.Option(min=1)] = 1,
    set_: SetOption = None,
) -> None:
    """Create a KFP recurring run that retrains on a schedule (unchanged data and config come from cache)."""
    import tempfile

    from tuneforge.pipelines.pipeline import schedule as schedule_run

    cfg = _load(config, set_)
    with tempfile.TemporaryDirectory() as folder, contextlib.redirect_stdout(sys.stderr):
        try:
            result = schedule_run(cfg, host, token, experiment, cron, max_concurrency, Path(folder) / "pipeline.yaml")
        except ValueError as exc:
            _fail(str(exc))
    typer.echo(json.dumps(result))


schedules_app = typer.Typer(no_args_is_help=True, help="List, pause and resume KFP recurring runs.")
app.add_typer(schedules_app, name="schedules")


@schedules_app.command("list")
def schedules_list(host: HostOption = None, token: TokenOption = None, experiment: ExperimentOption = "tuneforge") -> None:
    from tuneforge.pipelines.pipeline import _experiment_id, kfp_client

    client = kfp_client(host, token)
    with contextlib.redirect_stdout(sys.stderr):
        found = client.list_recurring_runs(experiment_id=_experiment_id(client, experiment), page_size=100)
    rows = [{"id": r.recurring_run_id, "name": r.display_name, "status": r.status,
             "cron": r.trigger.cron_schedule.cron if r.trigger and r.trigger.cron_schedule else None}
            for r in (found.recurring_runs or [])]
    typer.echo(json.dumps(rows, indent=2))


@schedules_app.command("pause")
def schedules_pause(recurring_run_id: str, host: HostOption = None, token: TokenOption = None) -> None:
    from tuneforge.pipelines.pipeline import kfp_client

    kfp_client(host, token).disable_recurring_run(recurring_run_id)
    typer.echo(json.dumps({"id": recurring_run_id, "status": "paused"}))


@schedules_app.command("resume")
def schedules_resume(recurring_run_id: str, host: HostOption = None, token: TokenOption = None) -> None:
    from tuneforge.pipelines.pipeline import kfp_client

    kfp_client(host, token).enable_recurring_run(recurring_run_id)
    typer.echo(json.dumps({"id": recurring_run_id, "status": "resumed"}))


services_app = typer.Typer(no_args_is_help=True, help="A local SeaweedFS (S3) and MLflow server on 127.0.0.1.")
app.add_typer(services_app, name="services")
FolderOption = Annotated[Path, typer.Option(help="Where the services keep data, logs and their env file.")]


@services_app.command("up")
def services_up(folder: FolderOption = Path("runs/services")) -> None:
    """Start both services (or report the running ones); prints how to point tuneforge at them."""
    from tuneforge import services

    try:
        env = services.up(folder)
    except services.ServiceError as exc:
        _fail(str(exc))
    typer.echo(f"S3 (SeaweedFS): {env['AWS_ENDPOINT_URL']}, bucket {env['TUNEFORGE_S3_BUCKET']}")
    typer.echo(f"MLflow:         {env['MLFLOW_TRACKING_URI']}")
    typer.echo(f"Credentials and endpoints: source {services.Stack(folder.resolve()).env_file}")


@services_app.command("down")
def services_down(folder: FolderOption = Path("runs/services")) -> None:
    """Stop both services; their data stays for the next `up`."""
    from tuneforge import services

    stopped = services.down(folder)
    typer.echo(f"stopped: {', '.join(stopped) or 'nothing was running'}")


@services_app.command("status")
def services_status(folder: FolderOption = Path("runs/services")) -> None:
    from tuneforge import services

    typer.echo(json.dumps(services.status(folder), indent=2))


registry_app = typer.Typer(no_args_is_help=True, help="Registered models: versions, aliases, rollback.")
app.add_typer(registry_app, name="registry")
TrackingOption = Annotated[str | None, typer.Option(help="MLflow tracking URI; default $MLFLOW_TRACKING_URI.")]


def _client(tracking_uri: str | None):
    import os

    from mlflow import MlflowClient

    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        _fail("no MLflow tracking URI: pass --tracking-uri or set MLFLOW_TRACKING_URI (e.g. sqlite:///runs/mlflow.db)")
    return MlflowClient(tracking_uri=uri)


@registry_app.command("list")
def registry_list(name: str, tracking_uri: TrackingOption = None) -> None:
    """Every version of a registered model with its aliases and evaluation metrics."""
    from tuneforge import registry

    typer.echo(json.dumps(registry.versions(_client(tracking_uri), name), indent=2))


@registry_app.command("rollback")
def registry_rollback(name: str, tracking_uri: TrackingOption = None) -> None:
    """Move `champion` back to the version it replaced."""
    from tuneforge import registry

    try:
        typer.echo(json.dumps(registry.rollback(_client(tracking_uri), name)))
    except registry.RegistryError as exc:
        _fail(str(exc))


@app.command()
def promote(name: str, version: str, tracking_uri: TrackingOption = None) -> None:
    """Make a version champion by hand (the gate does it automatically in a run)."""
    from tuneforge import registry

    typer.echo(json.dumps(registry.promote(_client(tracking_uri), name, version)))


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
