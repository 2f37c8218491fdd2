import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import mlflow
import pytest
import torch
import yaml
from typer.testing import CliRunner

from tuneforge import services
from tuneforge.cli import app

torch.set_num_threads(2)
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
# The files that take longest (minutes each on 2 CPUs). Under pytest-xdist (`make test`: --dist loadfile
# --no-loadscope-reorder) each file goes to one worker whole, in collection order: these first, so that no worker is
# left running one of them alone at the end while the others wait.
LONGEST_FILES = ["test_gemma.py", "test_smollm2.py", "test_stages.py", "test_sweep.py", "test_schedule.py",
                 "test_services.py", "test_containers.py", "test_tracking_faults.py", "test_faults.py"]


def pytest_configure(config):
    """An xdist worker keeps to its share of the CPUs, and so do the stages, servers and llama.cpp it starts: torch's
    threads (and llama.cpp's, which busy-wait) from two workers on the same CPUs would stall each other."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if not worker:
        return
    cpus = sorted(os.sched_getaffinity(0))
    share = cpus[int(worker.removeprefix("gw")) :: int(os.environ["PYTEST_XDIST_WORKER_COUNT"])] or cpus
    os.sched_setaffinity(0, share)
    os.environ["OMP_NUM_THREADS"] = str(len(share))
    torch.set_num_threads(len(share))


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


@pytest.fixture(autouse=True)
def _isolated_tracking(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("TUNEFORGE_PARENT_RUN_ID", raising=False)
    yield
    # mlflow.set_tracking_uri (a test's, or a stage's run in this process) also exports MLFLOW_TRACKING_URI, which
    # monkeypatch does not undo when it was unset before: the next module's fixtures would log into this test's folder,
    # removed once the test passed.
    mlflow.set_tracking_uri(None)
    os.environ.pop("MLFLOW_TRACKING_URI", None)


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def alpaca_rows(n: int = 24):
    return [
        {"instruction": "Extract the name as JSON.", "input": f"Person{i} lives in City{i}.", "output": json.dumps({"name": f"Person{i}"})}
        for i in range(n)
    ]


def preference_rows(n: int = 12):
    return [
        {"prompt": f"Extract the name as JSON.\n\nPerson{i} lives in City{i}.", "chosen": json.dumps({"name": f"Person{i}"}), "rejected": f"The name is Person{i}."}
        for i in range(n)
    ]


def make_config(tmp_path: Path, sources, **sections) -> Path:
    """A tiny-model config whose data are `sources` (paths or dicts), written next to tmp_path."""
    config = {
        "name": "test",
        "workdir": str(tmp_path / "work"),
        "base_model": {"source": "tiny-llama"},
        "data": {"sources": [s if isinstance(s, dict) else {"path": str(s)} for s in sources], "max_length": 128},
        "sft": {"method": "full", "max_steps": 4, "batch_size": 4, "save_steps": 2, "precision": "fp32", "learning_rate": 3e-3},
        "dpo": {"enabled": False, "max_steps": 2, "batch_size": 2, "save_steps": 2, "precision": "fp32"},
        "merge": {"dtype": "float32"},
        "evaluate": {"max_new_tokens": 8, "max_examples": 4, "samples": 2},
        "export": {"types": ["q8_0"]},
        "registry": {"primary_metric": "eval_loss"},
        # A failing stage in a test should fail at once, not after KFP's retries and their backoff.
        "cluster": {"resources": {"default": {"retries": 0}}},
    }
    for key, value in sections.items():
        config.setdefault(key, {}).update(value) if isinstance(value, dict) else config.__setitem__(key, value)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def cli(*args: str):
    """Run the tuneforge command in-process; returns the click Result (exit_code, stdout, stderr)."""
    return CliRunner().invoke(app, [str(a) for a in args])


def assert_no_output(path: Path) -> None:
    """Nothing that looks like a finished (or half-written) stage output is left behind."""
    leftovers = [p for p in path.parent.glob(path.name + "*") if not p.name.endswith(".checkpoints")]
    assert leftovers == [], f"left behind: {leftovers}"


# A stand-in for the KFP API (no KFP server can run on the test machines): it records each request and answers as the
# KFP v2beta1 API does. It proves what tuneforge sends, not that a real KFP backend accepts it.
class Recorder(BaseHTTPRequestHandler):
    requests: list = []

    def _reply(self, body):
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _record(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length) or b"null") if length else None
        Recorder.requests.append({"method": self.command, "path": self.path, "body": body,
                                  "auth": self.headers.get("Authorization")})
        return body

    def do_GET(self):
        self._record()
        if self.path.startswith("/apis/v2beta1/recurringruns"):
            return self._reply({"recurringRuns": [{"recurring_run_id": "rr-1", "display_name": "smollm2-extract-retrain",
                                                    "status": "ENABLED", "trigger": {"cron_schedule": {"cron": "0 0 3 * * *"}}}]})
        if self.path.startswith("/apis/v2beta1/experiments"):
            return self._reply({"experiments": [{"experiment_id": "exp-1", "display_name": "tuneforge"}]})
        return self._reply({})

    def do_POST(self):
        body = self._record()
        if self.path == "/apis/v2beta1/experiments":
            return self._reply({"experiment_id": "exp-1", "display_name": body["display_name"]})
        if self.path == "/apis/v2beta1/runs":
            return self._reply({"run_id": "run-1", "display_name": body["display_name"], "experiment_id": "exp-1"})
        if self.path == "/apis/v2beta1/recurringruns":
            return self._reply({"recurring_run_id": "rr-1", "display_name": body["display_name"]})
        return self._reply({})

    def log_message(self, *args):
        pass


@pytest.fixture
def kfp_api():
    Recorder.requests = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}", Recorder.requests
    server.shutdown()


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """A SeaweedFS and an MLflow server for the tests of one module; their environment (AWS_*, MLFLOW_TRACKING_URI)."""
    folder = tmp_path_factory.mktemp("services")
    env = services.up(folder)
    # The MLflow clients a test makes in this process authenticate as the pipeline, as the runs do.
    identity = {k: env[k] for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")}
    os.environ.update(identity)
    yield env
    for key in identity:
        os.environ.pop(key, None)
    services.down(folder)
