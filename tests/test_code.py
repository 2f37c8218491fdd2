"""The code's own rules: style, one-way imports, one registry of stages, self-documenting config, one way to fail."""

import importlib
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import cli

from tuneforge import stages
from tuneforge.config import Config

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def test_ruff_is_clean():
    result = subprocess.run([BIN / "ruff", "check", "."], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:]


def test_imports_point_one_way_without_cycles():
    result = subprocess.run([BIN / "lint-imports", "--no-logo", "--no-cache"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:]
    assert "3 kept, 0 broken" in result.stdout


def test_tasks_that_only_talk_to_mlflow_do_not_load_torch():
    """start, finish-run and register run in processes of their own: importing torch would be most of their time."""
    probe = ("import sys\nfrom tuneforge.pipelines import stage_runner\nfrom tuneforge.components import register\n"
             "import tuneforge.cli\nprint(sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"


def test_every_stage_has_one_module_with_run():
    for spec in stages.STAGES:
        module = importlib.import_module(spec.module)
        assert module.STAGE == spec.name and callable(module.run)
    assert stages.TRAINING == ("sft", "dpo", "grpo")


def test_every_config_key_is_described():
    schema = Config.model_json_schema()
    sections = [("Config", schema), *schema["$defs"].items()]
    undocumented = [f"{name}.{key}" for name, section in sections for key, field in section.get("properties", {}).items()
                    if not field.get("description")]
    assert undocumented == []
    result = cli("config-schema")
    assert result.exit_code == 0 and '"description"' in result.stdout


@pytest.mark.parametrize("args", [
    ["stage", "nope", "--config", "x.yaml", "--output", "out"],
    ["registry", "list", "no-such-model", "--tracking-uri", "sqlite:///{tmp}/mlflow.db"],
    ["promote", "no-such-model", "3", "--tracking-uri", "sqlite:///{tmp}/mlflow.db"],
    ["registry", "rollback", "no-such-model", "--tracking-uri", "sqlite:///{tmp}/mlflow.db"],
    ["schedule", "{config}", "--cron", "every day"],
])
def test_user_errors_exit_2_with_one_line_and_no_traceback(tmp_path, args):
    config = ROOT / "examples" / "tiny.yaml"
    result = cli(*[a.format(tmp=tmp_path, config=config) for a in args])
    assert result.exit_code == 2, (result.stdout, result.stderr, result.exception)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
