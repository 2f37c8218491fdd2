"""The cluster side of the pipeline: the compiled IR, and the KFP API calls of submit and schedule.

No KFP or Kubernetes API server can run on the test machines, so submit/schedule talk to a small local HTTP
server that records each request and answers as the KFP v2beta1 API does. That proves what tuneforge sends,
not that a real KFP backend accepts it.
"""

import json

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
    for stage in ("data-prep", "sft", "dpo", "merge", "evaluate", "export-gguf", "serve-check", "register", "start",
                  "finish-run"):
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
    # Only a candidate that beats the base is exported and registered: the SFT model or the DPO model, whichever
    # evaluate found better (both were merged and scored).
    assert {"merge", "merge-sft"} <= set(stages)
    branches = {name: dag for name, dag in dags.items() if set(dag) & {"register", "register-2"}}
    assert sorted(sorted(dag) for dag in branches.values()) == [["export-gguf", "register", "serve-check"],
                                                                ["export-gguf-2", "register-2", "serve-check-2"]]
    conditions = sorted(task["triggerPolicy"]["condition"] for dag in dags.values() for name, task in dag.items()
                        if f"comp-{name}" in branches)
    winner = "inputs.parameter_values['pipelinechannel--evaluate-Output']"
    assert conditions == [f"!({winner} == 'sft') && {winner} == 'dpo'", f"{winner} == 'sft'"]
    tasks = {**stages, **{name: task for dag in branches.values() for name, task in dag.items()}}
    assert tasks["sft"]["retryPolicy"] == {"backoffDuration": "30s", "backoffFactor": 2.0, "backoffMaxDuration": "1800s",
                                           "maxRetryCount": 3}
    # Unset retries: a training stage twice (it resumes from the S3 checkpoint mirror), the others once.
    assert tasks["dpo"]["retryPolicy"]["maxRetryCount"] == 2 and tasks["merge"]["retryPolicy"]["maxRetryCount"] == 1
    # KFP's own cache key, from the task's inputs: its view of the config, the code version, what it reads.
    assert tasks["sft"]["cachingOptions"] == {"enableCache": True}
    assert set(tasks["sft"]["inputs"]["parameters"]) == {"config_json", "code_version"}
    sft_view = json.loads(tasks["sft"]["inputs"]["parameters"]["config_json"]["runtimeValue"]["constant"])
    assert "sft" in sft_view and not {"dpo", "export", "evaluate", "merge", "cluster"} & set(sft_view)
    assert tasks["data-prep"]["inputs"]["parameters"]["data_fingerprint"]["taskOutputParameter"] == {
        "outputParameterKey": "fingerprint", "producerTask": "start"}
    assert tasks["evaluate"]["inputs"]["parameters"]["champion"]["taskOutputParameter"]["producerTask"] == "champion-to-beat"
    # The champion is not re-scored when it is one of this run's merged models, the SFT one as much as the DPO one.
    to_beat = tasks["champion-to-beat"]["inputs"]["parameters"]
    assert to_beat["champion"]["taskOutputParameter"]["producerTask"] == "start"
    assert {to_beat[k]["taskOutputParameter"]["producerTask"] for k in ("candidate", "sft_candidate")} == {"merge", "merge-sft"}
    assert not tasks["register"]["cachingOptions"].get("enableCache", False)
    assert not tasks["start"]["cachingOptions"].get("enableCache", False)

    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    sft_k8s = k8s["exec-sft"]
    secrets = [(s["secretName"], [e["envVar"] for e in s["keyToEnv"]], s.get("optional", False))
               for s in sft_k8s["secretAsEnv"]]
    # The MLflow identity (a server with authentication) is taken where the Secret has it.
    assert secrets == [("tuneforge-s3", ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"], False),
                       ("tuneforge-mlflow", ["MLFLOW_TRACKING_URI"], False),
                       ("tuneforge-mlflow", ["MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"], True)]
    assert sft_k8s["nodeSelector"]["labels"] == {"cloud.google.com/gke-accelerator": "nvidia-l4"}
    assert sft_k8s["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert sft_k8s["pvcMount"][0]["mountPath"] == "/cache"
    assert sft_k8s["emptyDirMounts"][0]["mountPath"] == "/dev/shm"
    assert str(sft_k8s["activeDeadlineSeconds"]) == "7200"
    assert "nodeSelector" not in k8s["exec-merge"]  # CPU stages stay off the GPU nodes
    # The run a task belongs to comes from its pod's label, not from an input that would change every run's keys.
    for executor in ("exec-sft", "exec-merge", "exec-start", "exec-finish-run"):
        assert k8s[executor]["fieldPathAsEnv"] == [{"fieldPath": "metadata.labels['pipeline/runid']", "name": "KFP_RUN_ID"}]
    # Secrets travel by reference only: no credential value is in the compiled pipeline.
    assert "AWS_SECRET_ACCESS_KEY=" not in compiled.read_text()


def test_compiled_pipeline_loads_back_with_kfp(compiled):
    from kfp import components

    loaded = components.load_component_from_file(str(compiled))
    assert loaded.name == "tuneforge-smollm2-extract"
    assert not loaded.component_spec.inputs  # everything it needs is compiled in; the data is fingerprinted at run time


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


def test_grpo_takes_dpos_place_after_sft(tmp_path):
    out = tmp_path / "pipeline.yaml"
    assert cli("compile", EXAMPLES / "quickstart-grpo.yaml", "-o", out).exit_code == 0
    spec = next(yaml.safe_load_all(out.read_text()))
    assert "exec-grpo" in _executors(spec) and "exec-dpo" not in _executors(spec)
    dags = {name: component["dag"]["tasks"] for name, component in spec["components"].items() if "dag" in component}
    stages = dags["comp-exit-handler-1"]
    assert stages["grpo"]["dependentTasks"] == ["data-prep", "sft"]
    assert {"merge", "merge-sft"} <= set(stages)  # the SFT model and GRPO's are both scored; the better one goes on
    evaluate = stages["evaluate"]["inputs"]["artifacts"]
    assert evaluate["grpo_model"]["taskOutputArtifact"]["producerTask"] == "grpo"
    winner = "inputs.parameter_values['pipelinechannel--evaluate-Output']"
    conditions = sorted(task["triggerPolicy"]["condition"] for dag in dags.values() for task in dag.values()
                        if "triggerPolicy" in task and "evaluate-Output" in task["triggerPolicy"].get("condition", ""))
    assert conditions == [f"!({winner} == 'sft') && {winner} == 'grpo'", f"{winner} == 'sft'"]


def test_after_a_full_sft_the_sft_model_is_scored_against_dpos_too(tmp_path):
    """DPO on a full SFT model merges onto that model; the SFT model itself is re-saved by merge-sft and scored, so a
    DPO that made it worse is not the candidate."""
    out = tmp_path / "pipeline.yaml"
    result = cli("compile", EXAMPLES / "quickstart.yaml", "-o", out, "--set", "sft.method=full")
    assert result.exit_code == 0, result.stderr
    spec = next(yaml.safe_load_all(out.read_text()))
    stages = spec["components"]["comp-exit-handler-1"]["dag"]["tasks"]
    assert stages["merge"]["inputs"]["artifacts"]["base"]["taskOutputArtifact"]["producerTask"] == "sft"
    assert stages["merge-sft"]["inputs"]["artifacts"]["adapter"]["taskOutputArtifact"]["producerTask"] == "sft"
    assert stages["evaluate"]["inputs"]["artifacts"]["sft_merged"]["taskOutputArtifact"]["producerTask"] == "merge-sft"


def test_without_sft_a_reference_free_method_starts_the_training(tmp_path):
    out = tmp_path / "pipeline.yaml"
    result = cli("compile", EXAMPLES / "quickstart.yaml", "-o", out, "--set", "sft.enabled=false",
                 "--set", "dpo.method=orpo")
    assert result.exit_code == 0, result.stderr
    spec = next(yaml.safe_load_all(out.read_text()))
    stages = spec["components"]["comp-exit-handler-1"]["dag"]["tasks"]
    assert "sft" not in stages and "merge-sft" not in stages
    assert stages["dpo"]["dependentTasks"] == ["data-prep"] and "sft_model" not in stages["dpo"]["inputs"].get("artifacts", {})
    assert stages["merge"]["inputs"]["artifacts"]["adapter"]["taskOutputArtifact"]["producerTask"] == "dpo"


def test_a_sweep_fans_out_its_trials_and_selects_one(tmp_path):
    out = tmp_path / "pipeline.yaml"
    result = cli("compile", EXAMPLES / "quickstart.yaml", "-o", out, "--set", "sweep.parallelism=3",
                 "--set", "sweep.parameters={sft.learning_rate: [1.0e-4, 3.0e-4], sft.lora.r: [8, 16]}")
    assert result.exit_code == 0, result.stderr
    spec = next(yaml.safe_load_all(out.read_text()))
    stages = spec["components"]["comp-exit-handler-1"]["dag"]["tasks"]
    loop = next(task for task in stages.values() if "parameterIterator" in task)
    assert loop["iteratorPolicy"]["parallelismLimit"] == 3
    trials = [json.loads(t) for t in json.loads(loop["parameterIterator"]["items"]["raw"])]
    assert [t["overrides"] for t in trials] == [{"sft.learning_rate": 1e-4, "sft.lora.r": 8},
                                               {"sft.learning_rate": 1e-4, "sft.lora.r": 16},
                                               {"sft.learning_rate": 3e-4, "sft.lora.r": 8},
                                               {"sft.learning_rate": 3e-4, "sft.lora.r": 16}]
    # Each trial: its config, then sft -> dpo -> merge -> evaluate; the winner is picked from all their evaluations.
    trial_tasks = spec["components"][loop["componentRef"]["name"]]["dag"]["tasks"]
    assert set(trial_tasks) == {"trial-config", "sft", "dpo", "merge", "evaluate"}
    assert trial_tasks["sft"]["inputs"]["parameters"]["config_json"]["taskOutputParameter"]["producerTask"] == "trial-config"
    select = stages["select-trial"]
    assert select["dependentTasks"] == [next(n for n, t in stages.items() if t is loop)]
    assert select["cachingOptions"] == {} or not select["cachingOptions"].get("enableCache")
    # Only the winner is evaluated against the champion, exported and registered.
    assert stages["evaluate-2"]["inputs"]["artifacts"]["model"]["taskOutputArtifact"]["producerTask"] == "select-trial"


def _task_inputs(path) -> dict[str, str]:
    spec = next(yaml.safe_load_all(path.read_text()))
    tasks = {name: task for component in spec["components"].values() for name, task in component.get("dag", {}).get("tasks", {}).items()}
    return {name: task["inputs"]["parameters"]["config_json"]["runtimeValue"]["constant"]
            for name, task in tasks.items() if name in ("data-prep", "sft", "dpo", "merge", "evaluate", "export-gguf")}


@pytest.mark.parametrize(("override", "changed"), [
    ("data.max_length=300", {"data-prep", "sft", "dpo", "merge", "evaluate", "export-gguf"}),
    ("sft.learning_rate=1e-4", {"sft", "dpo", "evaluate"}),  # dpo loads the base as sft trained it; evaluate: loss_on
    ("dpo.beta=0.3", {"dpo"}),
    ("merge.dtype=bfloat16", {"merge"}),
    ("evaluate.max_new_tokens=16", {"evaluate"}),
    ("export.types=[f16]", {"export-gguf"}),
    ("registry.min_improvement=0.1", {"evaluate"}),  # it decides whether the candidate beats the base model
    ("cluster.shm_size=4Gi", set()),
])
def test_a_stage_task_changes_only_when_a_key_it_reads_does(tmp_path, override, changed):
    """Each stage's task carries only its view of the config, so KFP's cache key of the stages before the change, and
    of the stages that do not read the changed key, stays the same."""
    before, after = tmp_path / "a.yaml", tmp_path / "b.yaml"
    assert cli("compile", EXAMPLES / "quickstart.yaml", "-o", before).exit_code == 0
    assert cli("compile", EXAMPLES / "quickstart.yaml", "-o", after, "--set", override).exit_code == 0
    a, b = _task_inputs(before), _task_inputs(after)
    assert {stage for stage in a if a[stage] != b[stage]} == changed
