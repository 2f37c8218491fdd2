"""The `tuneforge` command.

Every command that meets a TuneforgeError (bad input, config or setup) prints it as one `error:` line on stderr and
exits 2, without a traceback. Commands import what they need when they run, so `tuneforge --help` and the light
commands do not load torch.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import importlib
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from typer.core import TyperGroup

from tuneforge import env, stages, storage
from tuneforge.errors import ConfigError, TuneforgeError


class _UserErrorsExit2(TyperGroup):
    """The one place user errors become exit 2: every command, sub-commands included, runs inside this invoke."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except TuneforgeError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None


app = typer.Typer(cls=_UserErrorsExit2, add_completion=False, no_args_is_help=True,
                  help="Fine-tune causal language models.")

SetOption = Annotated[list[str] | None, typer.Option("--set", help="Override a config key: a.b=value")]


def _fail(message: str) -> None:
    raise ConfigError(message)


def _warn(message: str) -> None:
    typer.echo(f"warning: {message}", err=True)


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")


def _load(config_path: Path, overrides: list[str] | None):
    from tuneforge.config import load_config

    return load_config(config_path, overrides)


@app.command()
def validate(config: Path, set_: SetOption = None) -> None:
    """Validate a config and print it with every default filled in; warn (on stderr) about values outside the fine-tuning
    guide's hyperparameter table."""
    import yaml

    from tuneforge.advice import hyperparameter_warnings

    cfg = _load(config, set_)
    typer.echo(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    for warning in hyperparameter_warnings(cfg):
        typer.echo(f"warning: {warning}", err=True)


@app.command()
def plan(
    config: Path,
    gpu: Annotated[str | None, typer.Option(help="One GPU type to check; default every type the plan knows.")] = None,
    set_: SetOption = None,
) -> None:
    """Estimate each training stage's GPU memory (by part) and GPU-hours before a run; the last stdout line is JSON."""
    import dataclasses

    from tuneforge import plan as planning
    from tuneforge import sizing
    from tuneforge.advice import hyperparameter_warnings

    cfg = _load(config, set_)
    if gpu is not None and gpu not in planning.GPUS:
        _fail(f"--gpu {gpu!r}: the plan knows {', '.join(planning.GPUS)}")
    found = planning.plan(cfg, gpu)
    for stage, estimate in found["stages"].items():
        memory = estimate["memory_gib"]
        parts = ", ".join(f"{k} {v:.2f}" for k, v in memory.items() if k not in ("total", "parameters", "trainable"))
        typer.echo(f"{stage} ({estimate['method']}, {memory['parameters'] / 1e9:.2f}B parameters, "
                   f"{memory['trainable'] / 1e6:.1f}M trained): {memory['total']:.1f} GiB ({parts}); "
                   f"{estimate['tokens']:,} tokens")
        for name, fit in estimate["gpus"].items():
            typer.echo(f"  {name:<10} {'fits' if fit['fits'] else 'does not fit':<13} {fit['hours'] * 60:8.1f} GPU-minutes")
    found["cluster"] = {}
    typer.echo("on a cluster (tuneforge compile):")
    for stage in sizing.pipeline_stages(cfg):
        sized = sizing.resolve(cfg, stage)
        found["cluster"][stage] = {**dataclasses.asdict(sized), "why": sized.why}
        gpus = f", {sized.gpus} GPU" + (f" >= {sized.gpu_memory_gib} GiB" if sized.gpu_memory_gib else "") if sized.gpus else ""
        typer.echo(f"  {stage:<12} cpu {sized.cpu}, memory {sized.memory}{gpus}  ({sized.why})")
    for problem in sizing.refusals(cfg):
        typer.echo(f"warning: compile will refuse this: {problem}", err=True)
    for warning in hyperparameter_warnings(cfg):
        typer.echo(f"warning: {warning}", err=True)
    typer.echo(json.dumps(found))


@app.command("config-schema")
def config_schema() -> None:
    """Print the JSON schema of the config: every key, its type, default and meaning."""
    from tuneforge.config import Config

    typer.echo(json.dumps(Config.model_json_schema(), indent=2))


@app.command()
def stage(
    name: Annotated[str, typer.Argument(help=f"One of: {', '.join(stages.NAMES)}")],
    config: Annotated[Path, typer.Option(help="The run's YAML config.")],
    output: Annotated[Path, typer.Option(help="Output directory; written only when the stage succeeds.")],
    input_: Annotated[list[str] | None, typer.Option("--input", help="KEY=PATH of an earlier stage's output.")] = None,
    set_: SetOption = None,
    checkpoint_uri: Annotated[str | None, typer.Option(
        help="sft/dpo: mirror checkpoints to this S3 prefix and resume from it when there are none beside OUTPUT.",
        envvar=env.CHECKPOINT_URI)] = None,
    verbose: bool = False,
) -> None:
    """Run one stage: what each pipeline container executes."""
    _setup_logging(verbose)
    if checkpoint_uri:
        if not storage.is_s3(checkpoint_uri):
            _fail(f"--checkpoint-uri {checkpoint_uri!r}: an s3://BUCKET/PREFIX is expected")
        os.environ[env.CHECKPOINT_URI] = checkpoint_uri
    try:
        spec = stages.get(name)
    except KeyError as exc:
        _fail(exc.args[0])
    inputs: dict[str, Path | str] = {}
    for item in input_ or []:
        key, sep, value = item.partition("=")
        if not sep or key not in spec.inputs:
            _fail(f"--input {item!r}: stage {name} takes {', '.join(spec.inputs) or 'no inputs'} as KEY=PATH")
        inputs[key] = value if storage.is_s3(value) else Path(value)
    missing = [k for k in spec.requires if k not in inputs]
    if missing:
        _fail(f"stage {name} needs --input {' --input '.join(f'{k}=PATH' for k in missing)}")
    cfg = _load(config, set_)
    if spec.trains:
        from tuneforge import backends

        backends.import_unsloth_first(getattr(cfg, name))
    module = importlib.import_module(spec.module)
    # Libraries print progress to stdout; keep stdout for the JSON result alone.
    with contextlib.redirect_stdout(sys.stderr):
        result = module.run(cfg, inputs, output)
    typer.echo(json.dumps(result))


@app.command()
def run(
    config: Annotated[Path | None, typer.Argument(help="The run's YAML config (not with --package).")] = None,
    set_: SetOption = None,
    package: Annotated[Path | None, typer.Option(
        help="Run a compiled pipeline (the output of tuneforge compile, what submit and schedule upload) instead of "
        "building one from CONFIG.")] = None,
    pipeline_root: Annotated[Path | None, typer.Option(
        help="Where kfp.local keeps task outputs; default WORKDIR/kfp.")] = None,
    verbose: Annotated[bool, typer.Option(help="Stream every task's raw output instead of one line per task.")] = False,
    runner: Annotated[str, typer.Option(
        help="subprocess: the tasks run in this Python environment; container: each in the image the pipeline names, "
        "as uid 10001 on a read-only root, through a Docker-compatible API (Docker, or podman system service).")
    ] = "subprocess",
) -> None:
    """Run the whole KFP pipeline on this machine (kfp.local); the last stdout line is a JSON summary."""
    _setup_logging(verbose)
    from tuneforge.pipelines.pipeline import config_of_package, refuse_multi_node, run_locally

    if (config is None) == (package is None):
        _fail("give a CONFIG or --package PIPELINE.yaml (one of them)")
    if package is not None:
        if set_:
            _fail("--set changes a config; a compiled package is run as it was compiled (compile it again to change it)")
        cfg = config_of_package(package)
    else:
        cfg = _load(config, set_)
        cfg.workdir = str(Path(cfg.workdir).resolve())
    refuse_multi_node(cfg)
    if runner not in ("subprocess", "container"):
        _fail(f"--runner {runner!r}: use subprocess or container")
    if runner == "container":
        from tuneforge.pipelines import container_runner

        container_runner.preflight(cfg)
    from tuneforge.pipelines import console

    root = (pipeline_root or Path(cfg.workdir) / "kfp").resolve()
    log = root / f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}.log"
    with console.captured(log, verbose) as shown, contextlib.redirect_stdout(sys.stderr):
        summary = run_locally(cfg, root, package, runner)
    if shown:  # the raw task logs go beside the run's outputs
        kept = Path(summary["run_folder"]) / "tasks.log"
        log.replace(kept)
        summary["log"] = str(kept)
        shown.table(summary)
        typer.echo(f"task logs: {kept}", err=True)
    typer.echo(json.dumps(summary))
    if summary["status"] != "succeeded":
        raise typer.Exit(1)


ForceOption = Annotated[bool, typer.Option(
    "--force", help="Compile even when cluster.resources are below what a stage needs (a warning instead of exit 2).")]


@app.command("compile")
def compile_(
    config: Path,
    output: Annotated[Path, typer.Option("-o", "--output", help="Where to write the pipeline IR YAML.")] = Path("pipeline.yaml"),
    set_: SetOption = None,
    force: ForceOption = False,
) -> None:
    """Compile the pipeline for a config to KFP IR YAML (upload it to any KFP v2 server). Each stage's resources come
    from cluster.resources or are sized from the model; resources below what a stage needs are refused."""
    from tuneforge.pipelines.pipeline import compile_pipeline

    cfg = _load(config, set_)
    typer.echo(str(compile_pipeline(cfg, output, force, _warn)))


HostOption = Annotated[str | None, typer.Option(
    envvar="KFP_HOST", help="KFP API endpoint; omit inside the cluster (service account).")]
TokenOption = Annotated[str | None, typer.Option(help="Bearer token for the KFP API; default $KFP_TOKEN.")]
ExperimentOption = Annotated[str, typer.Option(help="KFP experiment.")]


@app.command()
def submit(config: Path, host: HostOption = None, token: TokenOption = None, experiment: ExperimentOption = "tuneforge",
           set_: SetOption = None, force: ForceOption = False) -> None:
    """Compile and submit one run to a Kubeflow Pipelines server."""
    import tempfile

    from tuneforge.pipelines.pipeline import submit as submit_run

    cfg = _load(config, set_)
    # kfp.Client prints links to stdout; stdout is for the JSON result.
    with tempfile.TemporaryDirectory() as folder, contextlib.redirect_stdout(sys.stderr):
        result = submit_run(cfg, host, token, experiment, Path(folder) / "pipeline.yaml", force, _warn)
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
    force: ForceOption = False,
) -> None:
    """Create a KFP recurring run that retrains on a schedule (unchanged data and config come from cache)."""
    import tempfile

    from tuneforge.pipelines.pipeline import schedule as schedule_run

    cfg = _load(config, set_)
    with tempfile.TemporaryDirectory() as folder, contextlib.redirect_stdout(sys.stderr):
        result = schedule_run(cfg, host, token, experiment, cron, max_concurrency, Path(folder) / "pipeline.yaml", force, _warn)
    typer.echo(json.dumps(result))


schedules_app = typer.Typer(no_args_is_help=True, help="List, pause and resume KFP recurring runs.")
app.add_typer(schedules_app, name="schedules")


@schedules_app.command("list")
def schedules_list(host: HostOption = None, token: TokenOption = None, experiment: ExperimentOption = "tuneforge") -> None:
    from tuneforge.pipelines.pipeline import experiment_id, kfp_client

    client = kfp_client(host, token)
    with contextlib.redirect_stdout(sys.stderr):
        found = client.list_recurring_runs(experiment_id=experiment_id(client, experiment), page_size=100)
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
def services_up(folder: FolderOption = Path("runs/services"),
                auth: Annotated[bool, typer.Option(help="MLflow with users and permissions (tuneforge-auth); --no-auth: "
                                                        "anyone who reaches it may use it.")] = True) -> None:
    """Start both services (or report the running ones); prints how to point tuneforge at them."""
    from tuneforge import services

    found = services.up(folder, auth=auth)
    typer.echo(f"S3 (SeaweedFS): {found['AWS_ENDPOINT_URL']}, bucket {found[env.S3_BUCKET]}")
    typer.echo(f"MLflow:         {found['MLFLOW_TRACKING_URI']}")
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

    typer.echo(json.dumps(registry.rollback(_client(tracking_uri), name)))


@registry_app.command("approval")
def registry_approval(name: str, mode: Annotated[str, typer.Argument(help="manual or auto")],
                      user: Annotated[str, typer.Option(help="The identity that registers (the pipeline's).")] = "pipeline",
                      tracking_uri: TrackingOption = None) -> None:
    """As an approver: set NAME's approval mode on a server with authentication. auto gives USER MANAGE on NAME (it
    promotes what passes the gate); manual leaves it EDIT (it registers; an approver promotes)."""
    from tuneforge import registry

    if mode not in ("manual", "auto"):
        _fail(f"mode {mode!r}: manual or auto")
    typer.echo(json.dumps(registry.set_approval_as_approver(_client(tracking_uri), name, mode, user)))


@app.command()
def promote(name: str, version: str, tracking_uri: TrackingOption = None,
            by: Annotated[str | None, typer.Option(help="Who approves; default $USER.")] = None) -> None:
    """Make a version champion by hand: the approval of a candidate waiting as approved-pending
    (registry.approval: manual), or any version. Records who and when."""
    from tuneforge import registry

    client = _client(tracking_uri)
    # Where the server authenticates its callers, the approval records who it authenticated, not a typed name.
    who = registry.authenticated_user(client.tracking_uri)
    if who and by and by != who:
        _fail(f"--by {by}: the MLflow server authenticates this command as {who!r}, and an approval records who the "
              "server authenticated; drop --by, or use the approver's credentials")
    who = who or by or os.environ.get("USER") or os.environ.get("LOGNAME")
    if not who:
        _fail("who approves? pass --by NAME (USER is not set)")
    typer.echo(json.dumps(registry.promote(client, name, version, who)))


@app.command()
def serve(
    source: Annotated[str, typer.Argument(help="A GGUF file: a local path, or the s3:// URI of one an export-gguf "
                                               "output published (registry tag gguf_files).")],
    models_dir: Annotated[Path, typer.Option(help="Where an s3:// file is fetched to.")] = Path("models"),
    fetch_only: Annotated[bool, typer.Option(help="Fetch and check the file, then exit (a pod's init container).")] = False,
    host: str = "127.0.0.1",
    port: int = 8080,
    alias: Annotated[str, typer.Option(help="The model name clients ask for.")] = "served",
    context_length: int = 2048,
) -> None:
    """Serve a GGUF file with llama.cpp's OpenAI-compatible server, as serve-check did: the chat template, BOS and EOS
    the file carries. An s3:// file is fetched first and its sha256 checked against its manifest."""
    from tuneforge import serving

    _setup_logging(False)
    path = serving.fetch_gguf(source, models_dir) if storage.is_s3(source) else Path(source)
    if not path.is_file():
        _fail(f"{path}: no such GGUF file")
    if fetch_only:
        typer.echo(str(path))
        return
    serving.require_server()
    command = serving.server_command(path, port, context_length, host=host, alias=alias)
    sys.stdout.flush()
    os.execv(command[0], command)  # the server becomes the container's process and gets its signals


@app.command()
def deploy(
    model: Annotated[str, typer.Argument(help="NAME[@ALIAS] of a registered model; the alias defaults to champion.")],
    target: Annotated[str, typer.Option(help="llamacpp (Deployment + Service) or kserve (ServingRuntime + "
                                             "InferenceServices).")] = "llamacpp",
    gguf_type: Annotated[str | None, typer.Option(help="Which of the version's GGUF files; default its first.")] = None,
    s3_secret: Annotated[str, typer.Option(help="llamacpp: the Secret with the AWS_* keys the init container reads.")
                         ] = "tuneforge-s3",
    service_account: Annotated[str, typer.Option(help="kserve: the service account whose S3 credentials KServe's "
                                                      "storage initializer uses.")] = "tuneforge-serving",
    output: Annotated[Path | None, typer.Option("-o", "--output", help="Write the manifests here; default stdout.")] = None,
    tracking_uri: TrackingOption = None,
) -> None:
    """Kubernetes manifests that serve the version an alias points at, checked against the API types."""
    import yaml

    from tuneforge import serving
    from tuneforge.pipelines import deploy as manifests

    if target not in ("llamacpp", "kserve"):
        _fail(f"--target {target!r}: llamacpp or kserve")
    found = manifests.resolve(_client(tracking_uri), model)
    gguf_type, uri = manifests.gguf_uri(found, gguf_type)
    size = int(serving.published_entry(uri)["size"])
    if target == "llamacpp":
        rendered = manifests.llamacpp(found, gguf_type, s3_secret, size)
    else:
        rendered = manifests.kserve(found, gguf_type, service_account, size)
        if manifests.kserve_sdk_available():
            for manifest in rendered:
                manifests.validate_kserve(manifest)
        else:
            _warn("the kserve SDK is not installed: the KServe manifests are not checked against its API types "
                  "(pip install kserve)")
    text = yaml.safe_dump_all(rendered, sort_keys=False)
    if output:
        output.write_text(text)
    else:
        typer.echo(text)


def main() -> None:
    # As in a pipeline task (stage_runner): the last garbage collections at exit cost seconds after torch's imports.
    atexit.register(gc.freeze)
    app()


if __name__ == "__main__":
    sys.exit(main())
