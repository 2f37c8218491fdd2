"""Tracking faults: a real MLflow server that the tests kill (and start again on the same port) while a stage trains.
Training is never lost: metrics are kept and sent when the server is back, and what could not be logged is
reported in the stage's result and manifest."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
from conftest import alpaca_rows, assert_no_output, cli, make_config, write_jsonl

from tuneforge import services


class Mlflow:
    """One MLflow tracking server with a fixed port and store, so a restart is the same server again."""

    def __init__(self, folder: Path):
        self.folder, self.port = folder, services.free_port_pair()
        self.process, self.url = None, None

    def start(self):
        self.process, self.url = services.start_mlflow(self.folder, self.port, (self.folder / "artifacts").as_uri(), {})

    def kill(self):
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()


@pytest.fixture
def server(tmp_path):
    (tmp_path / "mlflow").mkdir()
    server = Mlflow(tmp_path / "mlflow")
    server.start()
    yield server
    if server.process.poll() is None:
        server.kill()


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("prepared")
    config = make_config(tmp, [write_jsonl(tmp / "sft.jsonl", alpaca_rows(40))])
    assert cli("stage", "data-prep", "--config", config, "--output", tmp / "data").exit_code == 0
    return config, tmp / "data"


def start_sft(prepared, tmp_path, server, steps, *extra, env=None):
    config, data = prepared
    args = ["stage", "sft", "--config", config, "--input", f"data={data}", "--output", tmp_path / "sft",
            "--set", f"sft.max_steps={steps}", "--set", "sft.logging_steps=1", "--set", "sft.save_steps=1000",
            "--set", "sft.batch_size=2", *extra]
    env = {**os.environ, "MLFLOW_TRACKING_URI": server.url, **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "tuneforge.cli", *map(str, args)], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def kill_once_training_logs(server, process):
    """Kill the server as soon as the stage's run has its first loss: training has started and is logging."""
    client = mlflow.MlflowClient(server.url)
    deadline = time.monotonic() + 120
    while True:
        assert process.poll() is None and time.monotonic() < deadline, "the stage ended before it logged a loss"
        experiment = client.get_experiment_by_name("tuneforge")
        runs = client.search_runs([experiment.experiment_id]) if experiment else []
        if runs and client.get_metric_history(runs[0].info.run_id, "sft/loss"):
            server.kill()
            return runs[0].info.run_id
        time.sleep(0.05)


def test_metrics_logged_during_an_outage_reach_mlflow_when_it_returns(prepared, tmp_path, server):
    steps = 400
    # The client's own retries span about as long as this outage, so one request could outlast it and the stage
    # would never meet it: without them, every send during the outage fails.
    process = start_sft(prepared, tmp_path, server, steps, env={"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"})
    run_id = kill_once_training_logs(server, process)
    time.sleep(5)
    server.start()
    assert process.poll() is None, "training ended before MLflow was back: train longer"
    stdout, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr[-3000:]
    result = json.loads(stdout.strip().splitlines()[-1])
    assert "mlflow_unlogged" not in result
    assert "MLflow: sending metrics failed" in stderr  # the stage did meet the outage (the error text varies)

    client = mlflow.MlflowClient(server.url)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(run_id, "sft/loss")) == list(range(1, steps + 1))
    assert run.data.metrics["sft/final_steps"] == steps
    assert [a.path for a in client.list_artifacts(run_id, "sft")] == ["sft/loss_curve.png"]
    assert "mlflow_unlogged" not in json.loads((tmp_path / "sft" / "manifest.json").read_text())["lineage"]


def test_mlflow_gone_for_good_loses_no_training_and_says_what_was_not_logged(prepared, tmp_path, server):
    steps = 60
    process = start_sft(prepared, tmp_path, server, steps, "--set", "tracking.retry_seconds=3")
    kill_once_training_logs(server, process)
    killed = time.monotonic()
    stdout, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr[-3000:]
    result = json.loads(stdout.strip().splitlines()[-1])
    assert result["metrics"]["steps"] == steps
    unlogged = result["mlflow_unlogged"]
    assert any("metric values of steps" in u and u.endswith(f"-{steps}") for u in unlogged), unlogged
    assert {"artifact sft/loss_curve.png", "the final metrics", "the run's end (FINISHED)"} <= set(unlogged)
    manifest = json.loads((tmp_path / "sft" / "manifest.json").read_text())
    assert manifest["lineage"]["mlflow_unlogged"] == unlogged[:-1]  # the run's end comes after the manifest
    # Everything MLflow missed is in the output itself.
    history = json.loads((tmp_path / "sft" / "train_history.json").read_text())
    assert [e["step"] for e in history if "loss" in e] == list(range(1, steps + 1))
    print(f"stage ended {time.monotonic() - killed:.1f} s after MLflow was killed")


def test_mlflow_unreachable_at_the_start_fails_before_any_work(prepared, tmp_path):
    config, data = prepared
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{services.free_port_pair()}"}
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "tuneforge.cli", "stage", "sft", "--config", str(config), "--input", f"data={data}",
         "--output", str(tmp_path / "sft"), "--set", "tracking.retry_seconds=2"],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert "did not answer for 2 s (tracking.retry_seconds)" in result.stderr and "the sft stage did not start" in result.stderr
    assert "Traceback" not in result.stderr
    assert time.monotonic() - started < 90
    assert_no_output(tmp_path / "sft")
    assert not (tmp_path / "sft.checkpoints").exists()
