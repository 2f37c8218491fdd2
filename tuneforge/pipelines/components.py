"""KFP components: thin wrappers that run a stage from tuneforge/components inside its image.

A stage's task gets its view of the config (the sections it reads, as JSON), the code version, the outputs of the
stages before it and, where a stage depends on the world as the run found it, a value the run's first task measured
(the data fingerprint, the champion). Those are all its inputs, so KFP's cache key of a task is exactly what decides
its result. The run it belongs to is not an input: the task reads it from KFP_RUN_ID (the pod's `pipeline/runid`
label), so it does not break the cache. `stage_runner.run_stage` does the rest (it lives in a module without KFP
decorators, which the component bodies can import inside the executor). Images come from TUNEFORGE_REGISTRY and
TUNEFORGE_IMAGE_TAG at compile time, the same variables the image build uses.

A component is named after its stage (KFP names the task data-prep for data_prep), and its output artifact is the
one stages.py names.
"""

import os
from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Markdown, Metrics, Model, Output

from tuneforge import __version__, env

# Defaults shared with images/build.sh and the Helm chart's `images` values.
REGISTRY = os.environ.get(env.REGISTRY, "ghcr.io/tuneforge")
TAG = os.environ.get(env.IMAGE_TAG, __version__)
CPU_IMAGE = f"{REGISTRY}/tuneforge-cpu:{TAG}"
CUDA_IMAGE = f"{REGISTRY}/tuneforge-cuda:{TAG}"
EXPORT_IMAGE = f"{REGISTRY}/tuneforge-export:{TAG}"


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def start(config_json: str, job_id: str) -> NamedTuple("Started", [("fingerprint", str), ("base_model", str),
                                                                    ("champion", str)]):
    """Never cached: open (or, on a retry, find) the pipeline's MLflow run, fingerprint the data and the base model as
    they are now, and find the champion (its registered version as JSON, empty when there is none)."""
    from tuneforge.pipelines.stage_runner import start_run

    return start_run(config_json, job_id)


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def finish_run(config_json: str, job_id: str, status: dsl.PipelineTaskFinalStatus):
    """Exit handler: close the pipeline's MLflow run as FINISHED, or FAILED when any stage failed."""
    from tuneforge.pipelines.stage_runner import finish_run as finish

    finish(config_json, job_id, status.state, status.error_message)


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def data_prep(config_json: str, code_version: str, data_fingerprint: str, base_model_fingerprint: str,
              data: Output[Dataset], report: Output[Markdown]):
    """data_fingerprint: the data as the run's first task found it; data-prep checks it still is.
    base_model_fingerprint: the base model as that task found it; a change reruns every stage, as a change to the data
    does."""
    import shutil

    from tuneforge.pipelines.stage_runner import run_stage

    run_stage("data-prep", config_json, {}, data.path, data_fingerprint=data_fingerprint,
              base_model_fingerprint=base_model_fingerprint)
    shutil.copy(f"{data.path}/report.md", report.path)


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def sft(config_json: str, code_version: str, data: Input[Dataset], model: Output[Model], metrics: Output[Metrics],
        job_image: str = ""):
    """job_image: where sft runs on several nodes, the image of the Kubeflow Trainer job this task creates."""
    from tuneforge.pipelines.stage_runner import record_metrics, run_stage

    result = run_stage("sft", config_json, {"data": data.path}, model.path, job_image=job_image)
    record_metrics(metrics, result["metrics"])


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def dpo(config_json: str, code_version: str, data: Input[Dataset], model: Output[Model], metrics: Output[Metrics],
        sft_model: Input[Model] = None, job_image: str = ""):
    """sft_model: absent with sft.enabled false (a reference-free method, from the base model)."""
    from tuneforge.pipelines.stage_runner import record_metrics, run_stage

    inputs = {"data": data.path, "model": sft_model.path if sft_model else ""}
    result = run_stage("dpo", config_json, inputs, model.path, job_image=job_image)
    record_metrics(metrics, result["metrics"])


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def grpo(config_json: str, code_version: str, data: Input[Dataset], model: Output[Model], metrics: Output[Metrics],
         sft_model: Input[Model] = None, job_image: str = ""):
    """sft_model: absent with sft.enabled false (GRPO from the base model)."""
    from tuneforge.pipelines.stage_runner import record_metrics, run_stage

    inputs = {"data": data.path, "model": sft_model.path if sft_model else ""}
    result = run_stage("grpo", config_json, inputs, model.path, job_image=job_image)
    record_metrics(metrics, result["metrics"])


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def merge(config_json: str, code_version: str, adapter: Input[Model], model: Output[Model],
          base: Input[Model] = None) -> str:
    """base: the full SFT model a DPO adapter was trained on; absent for the config's base model. Returns the merged
    files' digest (what the registry knows a model by)."""
    from tuneforge import storage
    from tuneforge.pipelines.stage_runner import run_stage

    run_stage("merge", config_json, {"model": adapter.path, "base": base.path if base else ""}, model.path)
    return storage.content_digest(storage.read_manifest(model.path, "merge"))


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def merge_sft(config_json: str, code_version: str, adapter: Input[Model], model: Output[Model]) -> str:
    """The merge stage for the SFT model when DPO follows it: evaluate scores both, and the better one goes on. Returns
    the merged files' digest, as merge does."""
    from tuneforge import storage
    from tuneforge.pipelines.stage_runner import run_stage

    run_stage("merge", config_json, {"model": adapter.path}, model.path)
    return storage.content_digest(storage.read_manifest(model.path, "merge"))


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def trial_config(config_json: str, trial: str) -> str:
    """A sweep trial's config, which its stages get in place of their views: a trial reruns whole when it changes."""
    from tuneforge.pipelines.stage_runner import trial_config as config_of

    return config_of(config_json, trial)


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def select_trial(config_json: str, trials: list, evaluations: Input[list[Artifact]], models: Input[list[Model]],
                 digests: list, model: Output[Model]) -> NamedTuple("Selected", [("winner", str), ("digest", str)]):
    """Never cached: the sweep's best trial by its evaluation; its merged model goes on. Each trial is logged as an
    MLflow run under the pipeline's."""
    from tuneforge.pipelines.stage_runner import select_trial as select

    return select(config_json, trials, [e.path for e in evaluations], [m.path for m in models], digests, model.path)


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def champion_to_beat(champion: str, candidate: str, sft_candidate: str = "") -> str:
    """Never cached: where the champion's files are for evaluate to re-score, or empty when there is no champion or it
    is one of the models this run merged (a rerun of unchanged data, whichever of SFT and DPO won): then evaluate's
    inputs, and its cache key, stay the same. sft_candidate: the SFT model's digest where DPO or GRPO follows SFT."""
    import json

    if not champion or json.loads(champion)["model_sha256"] in (candidate, sft_candidate):
        return ""
    return json.loads(champion)["source"]


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def evaluate(config_json: str, code_version: str, champion: str, data: Input[Dataset], model: Input[Model],
             evaluation: Output[Artifact], metrics: Output[Metrics], report: Output[Markdown],
             sft_merged: Input[Model] = None, sft_model: Input[Model] = None,
             dpo_model: Input[Model] = None, grpo_model: Input[Model] = None) -> str:
    """champion: where the champion's registered model is (empty: none); re-scored on the same data. sft_merged: with
    DPO or GRPO after SFT, the SFT model, scored too. Returns which trained model is the candidate (sft, dpo or grpo)
    when it beats the base model, else "" (the champion is decided on at register). One string: kfp.local cannot read
    a named output in a condition."""
    import shutil

    from tuneforge.pipelines.stage_runner import record_metrics, run_stage

    # The training stages' outputs are read only for their loss curves.
    inputs = {"data": data.path, "model": model.path, "champion": champion,
              "sft_merged": sft_merged.path if sft_merged else "",
              "sft": sft_model.path if sft_model else "", "dpo": dpo_model.path if dpo_model else "",
              "grpo": grpo_model.path if grpo_model else ""}
    result = run_stage("evaluate", config_json, inputs, evaluation.path)
    shutil.copy(f"{evaluation.path}/report.md", report.path)
    scored = [m for m in ("base", "champion", "candidate") if m in result["metrics"]]
    record_metrics(metrics, {f"{m}_{k}": v for m in scored for k, v in result["metrics"][m].items()})
    return result["metrics"]["trained_by"] if result["metrics"]["beats_base"]["passed"] else ""


@dsl.component(base_image=EXPORT_IMAGE, install_kfp_package=False)
def export_gguf(config_json: str, code_version: str, model: Input[Model], gguf: Output[Artifact],
                metrics: Output[Metrics]):
    from tuneforge.pipelines.stage_runner import record_metrics, run_stage

    result = run_stage("export-gguf", config_json, {"model": model.path}, gguf.path)
    record_metrics(metrics, {f"{t}_{k}": v for t, check in result["metrics"]["types"].items() for k, v in check.items()})


@dsl.component(base_image=EXPORT_IMAGE, install_kfp_package=False)
def serve_check(config_json: str, code_version: str, data: Input[Dataset], gguf: Input[Artifact],
                evaluation: Input[Artifact], serving: Output[Artifact], metrics: Output[Metrics],
                report: Output[Markdown]):
    import shutil

    from tuneforge.pipelines.stage_runner import record_metrics, run_stage

    result = run_stage("serve-check", config_json, {"data": data.path, "gguf": gguf.path, "evaluation": evaluation.path},
                       serving.path)
    shutil.copy(f"{serving.path}/report.md", report.path)
    record_metrics(metrics, {f"{t}_{k}": v for t, r in result["metrics"]["types"].items() for k, v in r.items()
                             if isinstance(v, (int, float))})


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def register(config_json: str, code_version: str, evaluation: Input[Artifact], model: Input[Model],
             registration: Output[Artifact], gguf: Input[Artifact] = None, serving: Input[Artifact] = None) -> str:
    import json

    from tuneforge.pipelines.stage_runner import run_stage

    inputs = {"evaluation": evaluation.path, "model": model.path, "gguf": gguf.path if gguf else "",
              "serving": serving.path if serving else ""}
    result = run_stage("register", config_json, inputs, registration.path)
    return json.dumps(result["metrics"])
