"""The cluster side of the pipeline: the compiled IR, and the KFP API calls of submit and schedule.

No KFP or Kubernetes API server can run on the test machines, so submit/schedule talk to a small local HTTP
server that records each request and answers as the KFP v2beta1 API does. That proves what tuneforge sends,
not that a real KFP backend accepts it.
"""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import yaml

from conftest import EXAMPLES, cli


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    out = tmp_path_factory.mktemp("compiled") / "pipeline.yaml"
    overrides = [
        "--set", "cluster.resources={default: {cpu: '4', memory: 16Gi}, sft: {cpu: '8', memory: 64Gi, gpus: 1, gpu_type: nvidia.com/gpu, retries: 3, timeout_seconds: 7200}}",
        "--set", "cluster.gpu_node_selector={cloud.google.com/gke-accelerator: nvidia-l4}",
        "--set", "cluster.model_cache_pvc=model-cache",
    ]
    result = cli("compile", EXAMPLES / "quickstart.yaml", "-o", out, *overrides)
    assert result.exit_code == 0, result.stderr or result.exception
    return out


def _executors(spec):
    return spec["deploymentSpec"]["executors"]


def test_compiled_pipeline_has_every_stage_with_image_resources_retries_and_caching(compiled):
    documents = list(yaml.safe_load_all(compiled.read_text()))
    spec, platform = documents[0], documents[1]
    executors = _executors(spec)
    for stage in ("data-prep", "sft", "dpo", "merge", "evaluate", "export-gguf", "register", "start-run", "finish-run"):
        assert f"exec-{stage}" in executors, stage
    assert executors["exec-sft"]["container"]["image"] == "ghcr.io/tuneforge/tuneforge-cuda:0.1.0"
    assert executors["exec-merge"]["container"]["image"] == "ghcr.io/tuneforge/tuneforge-cpu:0.1.0"
    assert executors["exec-export-gguf"]["container"]["image"] == "ghcr.io/tuneforge/tuneforge-export:0.1.0"
    sft = executors["exec-sft"]["container"]["resources"]
    assert sft["resourceCpuLimit"] == "8" and sft["resourceMemoryLimit"] == "64Gi"
    assert sft["accelerator"]["resourceType"] == "nvidia.com/gpu" and str(sft["accelerator"]["resourceCount"]) == "1"
    assert executors["exec-merge"]["container"]["resources"]["resourceMemoryLimit"] == "16Gi"

    dags = {name: component["dag"]["tasks"] for name, component in spec["components"].items() if "dag" in component}
    assert set(spec["root"]["dag"]["tasks"]) == {"exit-handler-1", "finish-run"}
    assert spec["root"]["dag"]["tasks"]["finish-run"]["triggerPolicy"]["strategy"] == "ALL_UPSTREAM_TASKS_COMPLETED"
    stages = dags["comp-exit-handler-1"]
    gate = next(name for name in dags if name.startswith("comp-condition"))
    condition = stages[gate.removeprefix("comp-")]["triggerPolicy"]["condition"]
    assert condition == "inputs.parameter_values['pipelinechannel--evaluate-Output'] == true"
    assert set(dags[gate]) == {"export-gguf", "register"}  # only a candidate that beats the base is exported
    tasks = {**stages, **dags[gate]}
    assert tasks["sft"]["retryPolicy"] == {"backoffDuration": "30s", "backoffFactor": 2.0, "backoffMaxDuration": "1800s",
                                           "maxRetryCount": 3}
    assert tasks["merge"]["retryPolicy"]["maxRetryCount"] == 2 and tasks["merge"]["retryPolicy"]["backoffFactor"] == 2.0
    assert tasks["sft"]["cachingOptions"]["enableCache"] and tasks["sft"]["cachingOptions"]["cacheKey"].startswith("tuneforge-sft-")
    assert not tasks["register"]["cachingOptions"].get("enableCache", False)

    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    sft_k8s = k8s["exec-sft"]
    secrets = {s["secretName"]: [e["envVar"] for e in s["keyToEnv"]] for s in sft_k8s["secretAsEnv"]}
    assert secrets == {"tuneforge-s3": ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"],
                       "tuneforge-mlflow": ["MLFLOW_TRACKING_URI"]}
    assert sft_k8s["nodeSelector"]["labels"] == {"cloud.google.com/gke-accelerator": "nvidia-l4"}
    assert sft_k8s["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert sft_k8s["pvcMount"][0]["mountPath"] == "/cache"
    assert sft_k8s["emptyDirMounts"][0]["mountPath"] == "/dev/shm"
    assert str(sft_k8s["activeDeadlineSeconds"]) == "7200"
    assert "nodeSelector" not in k8s["exec-merge"]  # CPU stages stay off the GPU nodes
    # Secrets travel by reference only: no credential value is in the compiled pipeline.
    assert "AWS_SECRET_ACCESS_KEY=" not in compiled.read_text()


def test_compiled_pipeline_loads_back_with_kfp(compiled):
    from kfp import components

    loaded = components.load_component_from_file(str(compiled))
    assert loaded.name == "tuneforge-smollm2-extract"
    assert set(loaded.component_spec.inputs) == {"config_json", "data_fingerprint"}


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


def test_submit_sends_the_compiled_pipeline_with_the_token(kfp_api):
    host, requests = kfp_api
    result = cli("submit", EXAMPLES / "quickstart.yaml", "--host", host, "--token", "t0ken", "--experiment", "tuneforge")
    assert result.exit_code == 0, result.stderr or result.exception
    assert json.loads(result.stdout.splitlines()[-1])["run_id"] == "run-1"
    run = next(r for r in requests if r["method"] == "POST" and r["path"] == "/apis/v2beta1/runs")
    assert run["auth"] == "Bearer t0ken"
    # With Kubernetes settings, KFP sends the pipeline and its platform spec together.
    assert run["body"]["pipeline_spec"]["pipeline_spec"]["pipelineInfo"]["name"] == "tuneforge-smollm2-extract"
    assert "exec-sft" in run["body"]["pipeline_spec"]["platform_spec"]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert run["body"]["experiment_id"] == "exp-1"


def test_schedule_creates_a_recurring_run_with_kfp_cron(kfp_api):
    host, requests = kfp_api
    result = cli("schedule", EXAMPLES / "quickstart.yaml", "--host", host, "--cron", "0 3 * * *", "--max-concurrency", "2")
    assert result.exit_code == 0, result.stderr or result.exception
    recurring = next(r for r in requests if r["method"] == "POST" and r["path"] == "/apis/v2beta1/recurringruns")["body"]
    assert recurring["trigger"]["cron_schedule"]["cron"] == "0 0 3 * * *"  # seconds first
    assert recurring["max_concurrency"] == "2" or recurring["max_concurrency"] == 2
    assert recurring["no_catchup"] is True and recurring["experiment_id"] == "exp-1"
    assert recurring["pipeline_spec"]["pipeline_spec"]["pipelineInfo"]["name"] == "tuneforge-smollm2-extract"

    listed = cli("schedules", "list", "--host", host)
    assert json.loads(listed.stdout)[0] == {"id": "rr-1", "name": "smollm2-extract-retrain", "status": "ENABLED", "cron": "0 0 3 * * *"}
    assert cli("schedules", "pause", "rr-1", "--host", host).exit_code == 0
    assert any(r["path"] == "/apis/v2beta1/recurringruns/rr-1:disable" for r in requests)
    bad = cli("schedule", EXAMPLES / "quickstart.yaml", "--host", host, "--cron", "every day")
    assert bad.exit_code == 2 and "expected 5 fields" in bad.stderr
