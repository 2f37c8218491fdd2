"""Sweeps: trials fanned out with dsl.ParallelFor through kfp.local, the best one registered, each one an MLflow run
under the pipeline's, and each one cached on its own."""

import json
import subprocess
import sys
from pathlib import Path

import mlflow
import yaml
from conftest import EXAMPLES, cli


def run(config: Path, tmp_path: Path, *sets: str) -> dict:
    result = subprocess.run([sys.executable, "-m", "tuneforge.cli", "run", str(config), "--pipeline-root",
                             str(tmp_path / "kfp"), *sets], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def trained_trials(summary: dict) -> int:
    """Trials whose sft ran in this run (a cached task leaves no output in the run's folder)."""
    return len(list(Path(summary["run_folder"]).glob("for-loop-*-iteration-*/sft/model/manifest.json")))


def test_a_four_trial_sweep_registers_the_best_and_a_rerun_trains_only_the_new_trials(tmp_path):
    raw = yaml.safe_load((EXAMPLES / "tiny.yaml").read_text())
    for source in raw["data"]["sources"]:
        source["path"] = str(EXAMPLES / source["path"])
    raw["data"]["eval_tasks"] = str(EXAMPLES / raw["data"]["eval_tasks"])
    raw.update(workdir=str(tmp_path / "work"), dpo={**raw["dpo"], "enabled": False}, export={"enabled": False},
               sweep={"parameters": {"sft.learning_rate": [3e-4, 3e-3], "sft.max_steps": [2, 6]}, "metric": "eval_loss"})
    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump(raw))

    summary = run(config, tmp_path)
    assert trained_trials(summary) == 4
    # Trained longest at the higher rate, the model has the lowest held-out loss: the winner, and the one registered.
    assert summary["sweep_winner"]["overrides"] == {"sft.learning_rate": 3e-3, "sft.max_steps": 6}
    assert summary["registered_model"]["version"] == "1"
    # The model that went on is the winning trial's: its lineage is the trial's config.
    chosen = json.loads((Path(summary["run_folder"]) / "select-trial" / "model" / "manifest.json").read_text())
    assert (chosen["lineage"]["config"]["sft"]["learning_rate"], chosen["lineage"]["config"]["sft"]["max_steps"]) == (3e-3, 6)

    mlflow.set_tracking_uri(summary["mlflow"]["tracking_uri"])
    client = mlflow.MlflowClient()
    parent = client.get_run(summary["mlflow"]["run_id"])
    trials = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}' "
                                "and tags.`tuneforge.stage` = 'trial'")
    assert len(trials) == 4
    assert {(t.data.params["sft.learning_rate"], t.data.params["sft.max_steps"]) for t in trials} == {
        ("0.0003", "2"), ("0.0003", "6"), ("0.003", "2"), ("0.003", "6")}
    best = min(trials, key=lambda t: t.data.metrics["eval_loss"])
    assert best.data.tags["tuneforge.sweep_winner"] == "True" and best.data.params["sft.max_steps"] == "6"
    assert [t.data.tags["tuneforge.sweep_winner"] for t in trials].count("True") == 1

    # One more learning rate: only its two trials train; the four others come from KFP's cache.
    again = run(config, tmp_path, "--set", "sweep.parameters={sft.learning_rate: [3.0e-4, 3.0e-3, 1.0e-3], sft.max_steps: [2, 6]}")
    assert trained_trials(again) == 2
    assert len(again["stages"]) and again["status"] == "succeeded"


def test_a_sweep_over_an_unknown_or_unsweepable_key_is_refused(tmp_path):
    config = EXAMPLES / "tiny.yaml"
    unknown = cli("validate", config, "--set", "sweep.parameters={sft.learning_rat: [1.0e-4]}")
    assert unknown.exit_code == 2 and "sft.learning_rat: unknown key" in unknown.stderr, unknown.stderr
    data = cli("validate", config, "--set", "sweep.parameters={data.max_length: [128, 256]}")
    assert data.exit_code == 2 and "data.max_length: a sweep varies the keys of the stages each trial runs" in data.stderr
    grid = cli("validate", config, "--set", "sweep.parameters={sft.lora.r: [4, 8, 16]}", "--set", "sweep.trials=2")
    assert grid.exit_code == 2 and "the grid has 3 trials, more than sweep.trials (2)" in grid.stderr
