"""The `tuneforge` command."""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
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
}

SetOption = Annotated[list[str] | None, typer.Option("--set", help="Override a config key: a.b=value")]


def _user_errors() -> tuple[type[Exception], ...]:
    from tuneforge.chat_templates import TemplateError
    from tuneforge.components.data_prep import DataError
    from tuneforge.components.merge import MergeCheckError
    from tuneforge.config import ConfigError
    from tuneforge.gguf import ExportError
    from tuneforge.models import ModelLoadError
    from tuneforge.storage import IncompleteOutputError
    from tuneforge.training import TrainingSetupError

    return ConfigError, DataError, ExportError, MergeCheckError, ModelLoadError, TemplateError, IncompleteOutputError, TrainingSetupError


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
    verbose: bool = False,
) -> None:
    """Run one stage: what each pipeline container executes."""
    _setup_logging(verbose)
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
    module = importlib.import_module(f"tuneforge.components.{module_name}")
    try:
        # Libraries print progress to stdout; keep stdout for the JSON result alone.
        with contextlib.redirect_stdout(sys.stderr):
            result = module.run(cfg, inputs, output)
    except _user_errors() as exc:
        _fail(str(exc))
    typer.echo(json.dumps(result))


@app.command()
def run(
    config: Path,
    set_: SetOption = None,
    run_dir: Annotated[Path | None, typer.Option(help="Where stage outputs go; default WORKDIR/NAME/TIMESTAMP.")] = None,
    verbose: bool = False,
) -> None:
    """Run the whole pipeline locally; the last stdout line is a JSON summary."""
    _setup_logging(verbose)
    from tuneforge.local_run import run_pipeline

    cfg = _load(config, set_)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            summary = run_pipeline(cfg, run_dir)
    except _user_errors() as exc:
        _fail(str(exc))
    typer.echo(json.dumps(summary))
    if summary["status"] != "succeeded":
        raise typer.Exit(1)


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
