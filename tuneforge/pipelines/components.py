"""KFP components: thin wrappers that run a stage from tuneforge/components inside its image.

Each wrapper receives the run's config as JSON text (so KFP's cache key covers it), the pipeline's MLflow
run id, and typed artifacts; `stage_runner.run_stage` does the rest (it lives in a module without KFP
decorators, which the component bodies can import inside the executor). Images come from TUNEFORGE_REGISTRY and
TUNEFORGE_IMAGE_TAG at compile time, the same variables the image build uses.
"""


import os

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Markdown, Metrics, Model, Output

from tuneforge import __version__

# Defaults shared with images/build.sh and the Helm chart's `images` values.
REGISTRY = os.environ.get("TUNEFORGE_REGISTRY", "ghcr.io/tuneforge")
TAG = os.environ.get("TUNEFORGE_IMAGE_TAG", __version__)
CPU_IMAGE = f"{REGISTRY}/tuneforge-cpu:{TAG}"
CUDA_IMAGE = f"{REGISTRY}/tuneforge-cuda:{TAG}"
EXPORT_IMAGE = f"{REGISTRY}/tuneforge-export:{TAG}"


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def start_run(config_json: str, job_id: str) -> str:
    """Open (or, on a retry, find) the pipeline's MLflow run; its id ties every stage's run to it."""
    import mlflow
    import json

    from tuneforge import tracking
    from tuneforge.config import Config

    config = Config.model_validate(json.loads(config_json))
    experiment_id = tracking.setup(config)
    found = mlflow.search_runs([experiment_id], f"tags.`kfp.job_id` = '{job_id}'", output_format="list")
    if found:
        return found[0].info.run_id
    run = mlflow.MlflowClient().create_run(
        experiment_id, run_name=config.name, tags={"tuneforge.stage": "pipeline", "kfp.job_id": job_id}
    )
    return run.info.run_id


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def finish_run(config_json: str, job_id: str, status: dsl.PipelineTaskFinalStatus):
    """Exit handler: close the pipeline's MLflow run as FINISHED, or FAILED when any stage failed."""
    import mlflow
    import json

    from tuneforge import tracking
    from tuneforge.config import Config

    config = Config.model_validate(json.loads(config_json))
    experiment_id = tracking.setup(config)
    for run in mlflow.search_runs([experiment_id], f"tags.`kfp.job_id` = '{job_id}'", output_format="list"):
        client = mlflow.MlflowClient()
        if status.state != "SUCCEEDED":
            client.set_tag(run.info.run_id, "tuneforge.error", (status.error_message or status.state)[:5000])
        client.set_terminated(run.info.run_id, "FINISHED" if status.state == "SUCCEEDED" else "FAILED")


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def data_prep(config_json: str, data_fingerprint: str, parent_run: str, data: Output[Dataset], report: Output[Markdown]):
    """data_fingerprint (sha256 of the source files) is an input only so that changed data misses the cache."""
    import shutil

    from tuneforge.pipelines.stage_runner import record_metrics, run_stage

    run_stage("data-prep", config_json, parent_run, {}, data.path)
    shutil.copy(f"{data.path}/report.md", report.path)


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def sft(config_json: str, parent_run: str, data: Input[Dataset], model: Output[Model], metrics: Output[Metrics],
        job_image: str = ""):
    """job_image: where sft runs on several nodes, the image of the Kubeflow Trainer job this task creates."""
    from tuneforge.pipelines.stage_runner import record_metrics, run_stage

    result = run_stage("sft", config_json, parent_run, {"data": data.path}, model.path, job_image)
    record_metrics(metrics, result["metrics"])


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def dpo(config_json: str, parent_run: str, data: Input[Dataset], sft_model: Input[Model], model: Output[Model],
        metrics: Output[Metrics], job_image: str = ""):
    from tuneforge.pipelines.stage_runner import record_metrics, run_stage

    result = run_stage("dpo", config_json, parent_run, {"data": data.path, "model": sft_model.path}, model.path, job_image)
    record_metrics(metrics, result["metrics"])


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def merge(config_json: str, parent_run: str, adapter: Input[Model], model: Output[Model], base: Input[Model] = None):
    """base: the full SFT model a DPO adapter was trained on; absent for the config's base model."""
    from tuneforge.pipelines.stage_runner import record_metrics, run_stage

    run_stage("merge", config_json, parent_run, {"model": adapter.path, "base": base.path if base else ""}, model.path)


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def evaluate(config_json: str, parent_run: str, data: Input[Dataset], model: Input[Model], evaluation: Output[Artifact],
             metrics: Output[Metrics], report: Output[Markdown], sft_model: Input[Model] = None,
             dpo_model: Input[Model] = None) -> bool:
    """Returns whether the candidate passes the gate against the base model (the champion is checked at register)."""
    import json
    import shutil

    from tuneforge import registry
    from tuneforge.config import Config
    from tuneforge.pipelines.stage_runner import record_metrics, run_stage

    # The training stages' outputs are read only for their loss curves.
    inputs = {"data": data.path, "model": model.path, "sft": sft_model.path if sft_model else "",
              "dpo": dpo_model.path if dpo_model else ""}
    result = run_stage("evaluate", config_json, parent_run, inputs, evaluation.path)
    shutil.copy(f"{evaluation.path}/report.md", report.path)
    record_metrics(metrics, {f"{m}_{k}": v for m in ("base", "candidate") for k, v in result["metrics"][m].items()})
    settings = Config.model_validate(json.loads(config_json)).registry
    passed, _ = registry.gate(result["metrics"]["candidate"], result["metrics"]["base"], None, settings)
    return passed


@dsl.component(base_image=EXPORT_IMAGE, install_kfp_package=False)
def export_gguf(config_json: str, parent_run: str, model: Input[Model], gguf: Output[Artifact], metrics: Output[Metrics]):
    from tuneforge.pipelines.stage_runner import record_metrics, run_stage

    result = run_stage("export-gguf", config_json, parent_run, {"model": model.path}, gguf.path)
    record_metrics(metrics, {f"{t}_{k}": v for t, check in result["metrics"]["types"].items() for k, v in check.items()})


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def register(config_json: str, parent_run: str, evaluation: Input[Artifact], model: Input[Model],
             registration: Output[Artifact], gguf: Input[Artifact] = None) -> str:
    import json

    from tuneforge.pipelines.stage_runner import record_metrics, run_stage

    inputs = {"evaluation": evaluation.path, "model": model.path, "gguf": gguf.path if gguf else ""}
    result = run_stage("register", config_json, parent_run, inputs, registration.path)
    return json.dumps(result["metrics"])
