"""The KFP pipeline: the DAG for a config, and how it runs locally (kfp.local), compiles, is submitted and scheduled.

    data-prep -> sft -> dpo or grpo (when enabled) -> merge -> evaluate -> [beats base] -> export-gguf -> serve-check
    -> register

An exit handler closes the pipeline's MLflow run as FAILED when anything fails. Resources, retries with
backoff, timeouts, caching, secrets as env, the model-cache PVC, GPU node selectors and tolerations and a
/dev/shm emptyDir come from the config's `cluster` section; kfp.local ignores them.
"""


import json
import logging
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kfp import dsl, kubernetes

from tuneforge import env, registry, sizing, stages, tracking
from tuneforge.config import NO_GGUF_FOR_CLASSIFIERS, Config
from tuneforge.errors import ConfigError
from tuneforge.pipelines import components as c
from tuneforge.pipelines import pod, trainjob

log = logging.getLogger(__name__)

# What the task of a stage that Kubeflow Trainer runs on several nodes needs: it only creates the job and waits.
JOB_LAUNCHER = {"cpu": "1", "memory": "2Gi"}


def multi_node(config: Config, stage: str) -> bool:
    return stage in stages.TRAINING and getattr(config, stage).distributed.nodes > 1


def job_image(config: Config, stage: str) -> str:
    return c.CUDA_IMAGE if pod.for_stage(config, stage).gpus else c.CPU_IMAGE


def check_jobs(config: Config) -> None:
    """Compile-time check of the Kubeflow Trainer jobs the pipeline will create: built as they will be (run id and
    namespace stand-ins) and read into the Kubeflow API types."""
    for stage in stages.TRAINING:
        if multi_node(config, stage):
            inputs = {name: f"{config.storage.uri}/RUN/{stage}.inputs/{name}" for name in stages.get(stage).requires}
            view = config.view(stage, with_cluster=True).to_json()
            trainjob.validate(trainjob.build(config, view, stage, "compile-check", inputs, "compile-check",
                                             job_image(config, stage)))


def apply_pod(task: dsl.PipelineTask, spec: pod.PodSpec, with_gpus: bool = True) -> None:
    """The spec as kfp-kubernetes settings on a pipeline task (its cpu and memory are set by the caller)."""
    kubernetes.set_timeout(task, spec.timeout_seconds)
    if spec.why:
        kubernetes.add_pod_annotation(task, pod.SIZING_ANNOTATION, spec.why)
    if spec.gpus and with_gpus:
        task.set_accelerator_type(spec.gpu_type).set_accelerator_limit(spec.gpus)
        for key, value in spec.node_selector.items():
            kubernetes.add_node_selector(task, key, value)
        if spec.gpu_memory:
            kubernetes.add_node_affinity(task, match_expressions=pod.gpu_memory_affinity(spec))
        for toleration in spec.tolerations:
            kubernetes.add_toleration(task, **toleration)
    for secret, keys in spec.secrets.items():
        kubernetes.use_secret_as_env(task, secret, {key: key for key in keys})
    for secret, keys in spec.optional_secrets.items():
        kubernetes.use_secret_as_env(task, secret, {key: key for key in keys}, optional=True)
    if spec.model_cache_pvc:
        kubernetes.mount_pvc(task, pvc_name=spec.model_cache_pvc, mount_path=pod.CACHE_MOUNT)
    for name, value in spec.env.items():
        task.set_env_variable(name, value)
    kubernetes.empty_dir_mount(task, volume_name="dshm", mount_path="/dev/shm", medium="Memory", size_limit=spec.shm_size)


def _configure(task: dsl.PipelineTask, stage: str, config: Config, local: bool) -> dsl.PipelineTask:
    spec = pod.for_stage(config, stage, size=not local)
    task.set_display_name(stage)
    launcher = multi_node(config, stage)
    # The nodes of a multi-node job get the stage's resources; its task only creates the job and waits for it.
    cpu, memory = (JOB_LAUNCHER["cpu"], JOB_LAUNCHER["memory"]) if launcher else (spec.cpu, spec.memory)
    task.set_cpu_request(cpu).set_cpu_limit(cpu).set_memory_request(memory).set_memory_limit(memory)
    retries = config.cluster.for_stage(stage).retries
    if retries is None:  # locally a retry only waits; on a cluster a training stage's retry resumes from S3
        retries = 0 if local else 2 if stages.get(stage).trains else 1
    backoff = config.cluster.for_stage(stage).retry_backoff_seconds
    task.set_retry(num_retries=retries, backoff_duration=f"{backoff}s", backoff_factor=2.0, backoff_max_duration="1800s")
    # KFP's own key: the task's inputs (its view of the config, the code version, the outputs it reads, the data
    # fingerprint), so a change reruns exactly the stages that read what changed.
    task.set_caching_options(True)
    _run_identity(task)
    apply_pod(task, spec, with_gpus=not launcher)
    if spec.gpus and not launcher:
        task.set_container_image(c.CUDA_IMAGE)
    return task


def _run_identity(task: dsl.PipelineTask) -> None:
    """The run a task belongs to, from its pod's label rather than as an input, which would break its cache key."""
    kubernetes.use_field_path_as_env(task, env.KFP_RUN_ID, "metadata.labels['pipeline/runid']")


def serve_checked(config: Config) -> bool:
    """Whether the run serves its GGUF files: they are exported, and there are eval tasks to ask them."""
    return "serve-check" in sizing.pipeline_stages(config)


def build(config: Config, local: bool = False):
    """The pipeline function for this config (the DAG's shape follows dpo.enabled, grpo.enabled, export.enabled,
    registry.enabled).
    `local`: for kfp.local on this machine (no retries unless the config sets them)."""
    config_json = config.to_json()
    code_version = tracking.code_version()
    check_jobs(config)
    jobs = {stage: {"job_image": job_image(config, stage)} for stage in stages.TRAINING if multi_node(config, stage)}

    @dsl.pipeline(name=f"tuneforge-{config.name}", description=f"Fine-tune {config.base_model.source}")
    def pipeline():
        job_id = dsl.PIPELINE_JOB_ID_PLACEHOLDER
        finish = c.finish_run(config_json=config_json, job_id=job_id)
        finish.set_display_name("close MLflow run").set_caching_options(False)
        _run_identity(finish)
        with dsl.ExitHandler(finish, name="stages"):
            started = c.start(config_json=config_json, job_id=job_id).set_display_name("start")
            started.set_caching_options(False)
            _run_identity(started)

            def stage(name: str, component, **inputs) -> dsl.PipelineTask:
                view = config.view(name, with_cluster=multi_node(config, name)).to_json()
                return _configure(component(config_json=view, code_version=code_version, **inputs), name, config, local)

            prep = stage("data-prep", c.data_prep, data_fingerprint=started.outputs["fingerprint"],
                         base_model_fingerprint=started.outputs["base_model"])
            data = prep.outputs["data"]
            after_sft = "dpo" if config.dpo.enabled else "grpo" if config.grpo.enabled else None
            after_component = {"dpo": c.dpo, "grpo": c.grpo}.get(after_sft)
            inputs, candidates = {}, {}
            if config.sweep.parameters:
                # Each trial trains, merges and evaluates with its own config; the best one's merged model goes on.
                trials = [json.dumps({"trial": i, "overrides": overrides}, sort_keys=True)
                          for i, overrides in enumerate(config.sweep.combinations())]
                # kfp.local runs the trials one after another: on one machine they would only compete for its cores.
                with dsl.ParallelFor(trials, parallelism=1 if local else config.sweep.parallelism, name="trials") as trial:
                    trial_config = c.trial_config(config_json=config_json, trial=trial).set_display_name("trial config")

                    def trial_stage(name: str, component, **stage_inputs) -> dsl.PipelineTask:
                        task = component(config_json=trial_config.output, code_version=code_version, **stage_inputs)
                        return _configure(task, name, config, local)

                    sft_model = trial_stage("sft", c.sft, data=data).outputs["model"] if config.sft.enabled else None
                    adapter, merge_args = sft_model, {}
                    if after_sft:
                        adapter = trial_stage(after_sft, after_component, data=data,
                                              **({"sft_model": sft_model} if sft_model else {})).outputs["model"]
                        if sft_model and config.sft.method == "full":
                            merge_args["base"] = sft_model
                    trial_merged = trial_stage("merge", c.merge, adapter=adapter, **merge_args)
                    trial_evaluated = trial_stage("evaluate", c.evaluate, data=data, champion="",
                                                  model=trial_merged.outputs["model"])
                selected = c.select_trial(config_json=config_json, trials=trials,
                                          evaluations=dsl.Collected(trial_evaluated.outputs["evaluation"]),
                                          models=dsl.Collected(trial_merged.outputs["model"]),
                                          digests=dsl.Collected(trial_merged.outputs["Output"]))
                selected.set_display_name("select best trial").set_caching_options(False)
                _run_identity(selected)
                candidate, candidates["candidate"] = selected.outputs["model"], selected.outputs["digest"]
            else:
                sft_model = stage("sft", c.sft, data=data, **jobs.get("sft", {})).outputs["model"] \
                    if config.sft.enabled else None
                adapter, merge_args = sft_model, {}
                if sft_model:
                    inputs["sft_model"] = sft_model
                if after_sft:
                    tuned_after = stage(after_sft, after_component, data=data, **jobs.get(after_sft, {}),
                                        **({"sft_model": sft_model} if sft_model else {}))
                    adapter = inputs[f"{after_sft}_model"] = tuned_after.outputs["model"]
                    if sft_model and config.sft.method == "full":  # the adapter was trained on the full SFT model
                        merge_args["base"] = sft_model
                    if sft_model:  # both are scored and the better one goes on (a full SFT model is only re-saved)
                        merged_sft = stage("merge", c.merge_sft, adapter=sft_model)
                        inputs["sft_merged"] = merged_sft.outputs["model"]
                        candidates["sft_candidate"] = merged_sft.outputs["Output"]
                merged = stage("merge", c.merge, adapter=adapter, **merge_args)
                candidate, candidates["candidate"] = merged.outputs["model"], merged.outputs["Output"]
            to_beat = c.champion_to_beat(champion=started.outputs["champion"], **candidates)
            to_beat.set_display_name("champion to beat").set_caching_options(False)
            _run_identity(to_beat)
            evaluated = stage("evaluate", c.evaluate, data=data, model=candidate, champion=to_beat.output, **inputs)

            def publish(model) -> None:
                extra = {}
                if config.exports_gguf:
                    extra["gguf"] = stage("export-gguf", c.export_gguf, model=model).outputs["gguf"]
                    if serve_checked(config):
                        extra["serving"] = stage("serve-check", c.serve_check, data=data, gguf=extra["gguf"],
                                                 evaluation=evaluated.outputs["evaluation"]).outputs["serving"]
                if config.registry.enabled:
                    registered = stage("register", c.register, evaluation=evaluated.outputs["evaluation"], model=model,
                                       **extra)
                    # Registration decides against the live champion: never reuse a cached decision.
                    registered.set_caching_options(False)

            # Only a candidate that beats the base model goes on: the SFT or the DPO model, whichever evaluate found better.
            if "sft_merged" in inputs:
                with dsl.If(evaluated.outputs["Output"] == "sft", name="sft-beats-base"):
                    publish(inputs["sft_merged"])
                with dsl.Elif(evaluated.outputs["Output"] == after_sft, name=f"{after_sft}-beats-base"):
                    publish(candidate)
            else:
                with dsl.If(evaluated.outputs["Output"] != "", name="beats-base"):
                    publish(candidate)

    return pipeline


def compile_pipeline(config: Config, path: Path, force: bool = False, warn: Callable[[str], None] = log.warning) -> Path:
    """Compile for a cluster. Explicit resources below what a stage needs are refused (`force`: a `warn`ing)."""
    from kfp import compiler

    problems = sizing.refusals(config)
    if problems and not force:
        raise ConfigError("this pipeline would not run on a cluster:\n  " + "\n  ".join(problems)
                          + "\n(--force compiles it anyway)")
    for problem in problems:
        warn(f"compiled with --force: {problem}")
    compiler.Compiler().compile(build(config), str(path))
    return path


def config_of_package(package: Path) -> Config:
    """The config a compiled pipeline (the output of `tuneforge compile`) was built from: its first task's input."""
    import yaml

    try:
        spec = next(yaml.safe_load_all(Path(package).read_text()))
        tasks = [task for component in spec["components"].values() for task in component.get("dag", {}).get("tasks", {}).items()]
        start = next(task for name, task in tasks if name == "start")
        return Config.model_validate(json.loads(start["inputs"]["parameters"]["config_json"]["runtimeValue"]["constant"]))
    except (OSError, yaml.YAMLError, StopIteration, KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"{package}: not a pipeline compiled by tuneforge compile ({type(exc).__name__}: {exc})") from None


def refuse_multi_node(config: Config) -> None:
    """Several nodes need a cluster; say so before a local run creates anything."""
    for stage in stages.TRAINING:
        if multi_node(config, stage):
            raise ConfigError(f"{stage}.distributed.nodes is {getattr(config, stage).distributed.nodes}: several nodes "
                              "need a cluster with Kubeflow Trainer (tuneforge submit), and tuneforge run trains on this "
                              f"machine; set {stage}.distributed.nodes: 1 (distributed.processes spreads a stage over "
                              "this machine's GPUs)")


def run_locally(config: Config | None, pipeline_root: Path, package: Path | None = None,
                runner: str = "subprocess") -> dict[str, Any]:
    """Run the pipeline with kfp.local on this machine: the one built from `config`, or the compiled `package` as a
    cluster would get it. `runner` subprocess: the stages run in this Python environment; container: each in the
    image the pipeline names (container_runner.py). Returns a summary read from the task outputs."""
    from kfp import components, local

    if package is not None:
        config = config_of_package(package)
    refuse_multi_node(config)
    pipeline_root = Path(pipeline_root).resolve()
    # What a cluster's pods read from their `pipeline/runid` label; the tasks inherit it (containers: see
    # container_runner.PASSED).
    os.environ[env.KFP_RUN_ID] = f"local-{uuid.uuid4().hex}"
    if runner == "container":
        from tuneforge.pipelines import container_runner

        chosen = container_runner.docker_runner(config, pipeline_root)
    else:
        chosen = local.SubprocessRunner(use_venv=False)
    local.init(runner=chosen, pipeline_root=str(pipeline_root), enable_caching=True, raise_on_error=False)
    before = set(pipeline_root.glob("*")) if pipeline_root.exists() else set()
    pipeline = components.load_component_from_file(str(package)) if package else build(config, local=True)
    # The tasks of the container runner run as the images' user: the folders kfp.local creates here must admit it.
    umask = os.umask(0o000) if runner == "container" else None
    try:
        pipeline()
    finally:
        if umask is not None:
            os.umask(umask)
    created = sorted(set(pipeline_root.glob(f"tuneforge-{config.name}-*")) - before)
    if not created:
        raise ConfigError(f"kfp.local produced no run folder under {pipeline_root}; is --pipeline-root writable?")
    return summarize(config, created[-1])


# The pipeline's stage tasks in order, as (task, stage): merge-sft is the merge stage for the SFT model when DPO follows.
TASKS = [(spec.name, spec) for spec in stages.STAGES]
TASKS.insert([t for t, _ in TASKS].index("merge"), ("merge-sft", stages.get("merge")))


def _task_folder(run: Path, task: str, output: str) -> Path | None:
    """A task's output in a run folder. KFP names a task again in another branch `TASK-2` (export-gguf and register
    after an If/Else on the winning model); at most one of them runs."""
    for folder in (run / task, *sorted(run.glob(f"{task}-[0-9]*"))):
        if folder.is_dir():
            return folder / output
    return None


def _outputs(config: Config, run_folder: Path) -> dict[str, tuple[Path | None, str]]:
    """Where each stage task's output is for this run: in the run's folder, or, for a cache hit, the earlier output KFP
    reused. That one is found by what decided it: the stage's view of the config, and inputs that are this run's
    outputs (or what its uncached tasks measured: the data fingerprint, the champion)."""
    measured: set[str] = set()
    for task in ("start", "champion-to-beat"):  # uncached: always in this run's folder
        if (run_folder / task / "executor_output.json").exists():
            measured |= set(json.loads((run_folder / task / "executor_output.json").read_text())["parameterValues"].values())
    earlier = sorted((r for r in run_folder.parent.glob(f"tuneforge-{config.name}-*") if r != run_folder), reverse=True)
    found: dict[str, tuple[Path | None, str]] = {}
    known: set[str] = set()
    for task, spec in TASKS:
        here = _task_folder(run_folder, task, spec.output)
        if here is not None:
            # A task can fail after its stage wrote the output (kfp.local writes executor_output.json on success only).
            complete = (here / "manifest.json").exists() and (here.parent / "executor_output.json").exists()
            found[task] = (here, "succeeded") if complete else (None, "failed")
            known |= {str(here)} if complete else set()
            continue
        view_hash = config.view(spec.name).hash()
        for folder in (f for f in (_task_folder(r, task, spec.output) for r in earlier) if f is not None):
            if not ((folder / "manifest.json").exists() and (folder.parent / "executor_output.json").exists()):
                continue
            lineage = json.loads((folder / "manifest.json").read_text())["lineage"]
            inputs = set(lineage.get("inputs", {}).values())
            if spec.name == "data-prep":
                inputs |= {lineage.get("data_fingerprint"), lineage.get("base_model_fingerprint")}
            if lineage.get("config_hash") == view_hash and inputs <= known | measured:
                found[task] = (folder, "cached")
                known.add(str(folder))
                break
    return found


def summarize(config: Config, run_folder: Path) -> dict[str, Any]:
    """The JSON summary of a local run: each stage's status, key metrics, artifact paths, the registered version."""
    by_stage: dict[str, Any] = {}
    outputs: dict[str, Path] = {}
    for stage, (folder, status) in _outputs(config, run_folder).items():
        by_stage[stage] = {"status": status, **({"output": str(folder)} if folder else {})}
        if folder:
            outputs[stage] = folder
            unlogged = json.loads((folder / "manifest.json").read_text())["lineage"].get("mlflow_unlogged")
            if unlogged:
                by_stage[stage]["mlflow_unlogged"] = unlogged
    summary: dict[str, Any] = {"name": config.name, "run_folder": str(run_folder), "stages": by_stage,
                               "mlflow": {"tracking_uri": tracking.tracking_uri(config)}}
    failed = [s for s, v in by_stage.items() if v["status"] == "failed"]
    summary["status"] = "failed" if failed or "evaluate" not in outputs else "succeeded"
    if failed:
        summary["error"] = f"stage {failed[0]} failed; its log is above"
    job = os.environ.get(env.KFP_RUN_ID)
    if job:
        summary["mlflow"]["run_id"] = tracking.pipeline_run_id(config, job)
        uri = summary["mlflow"]["tracking_uri"]
        if uri.startswith(("http://", "https://")) and summary["mlflow"]["run_id"]:
            # MLflow's UI opens on GenAI pages unless asked for the training view.
            summary["mlflow"]["ui"] = (f"{uri.rstrip('/')}/#/experiments/{tracking.setup(config)}/runs/"
                                       f"{summary['mlflow']['run_id']}?workflowType=machine_learning")
    if "evaluate" in outputs:
        results = json.loads((outputs["evaluate"] / "manifest.json").read_text())["metrics"]
        keys = ("eval_loss", "perplexity", "preference_accuracy", "task_score", "task_exact_match", "accuracy", "macro_f1")
        scored = [m for m in ("base", "champion", "sft", "dpo", "grpo", "candidate") if m in results]
        summary["metrics"] = {m: {k: round(results[m][k], 4) for k in keys if k in results[m]} for m in scored}
        if results.get("champion_error"):
            summary["metrics"]["champion_error"] = results["champion_error"]
    if "register" in outputs:
        result = json.loads((outputs["register"] / "manifest.json").read_text())["metrics"]
        summary["registered_model"] = {k: result[k] for k in ("name", "version", "aliases", "decision")}
        summary["registered_model"]["outcome"] = registry.outcome(result)
        summary["checklist"] = result.get("checklist", [])
    elif "evaluate" in outputs:
        summary["checklist"] = results.get("checklist", [])
    selected = run_folder / "select-trial" / "executor_output.json"
    if selected.exists():
        summary["sweep_winner"] = json.loads(json.loads(selected.read_text())["parameterValues"]["winner"])
    if "evaluate" in outputs and results.get("winner"):
        summary["winner"] = {"model": results["winner"], "why": results["winner_reason"]}
        if results["winner"] == "sft" and "merge-sft" in outputs:
            outputs["merge"] = outputs["merge-sft"]
    if "serve-check" in outputs:
        served = json.loads((outputs["serve-check"] / "manifest.json").read_text())["metrics"]["types"]
        summary["serving"] = {t: {"task_score": round(r["task_score"], 4), "same_prompt_tokens": r["same_prompt_tokens"],
                                  "tokens_per_second": round(r["tokens_per_second"], 1),
                                  "agreement": {m: round(c["agreement"], 4) for m, c in r["by_metric"].items()}}
                              for t, r in served.items()}
    skipped: dict[str, str] = {}
    if config.task == "classification" and config.export.enabled:
        skipped = {"export-gguf": NO_GGUF_FOR_CLASSIFIERS, "serve-check": "no GGUF files to serve"}
    beats = results.get("beats_base") if "evaluate" in outputs else None
    if beats and not beats["passed"]:
        why = "the candidate does not beat the base model: " + "; ".join(beats["reasons"])
        summary["not_registered"] = why
        following = [s for s, on in (("export-gguf", config.exports_gguf), ("serve-check", serve_checked(config)),
                                     ("register", config.registry.enabled)) if on and s not in skipped]
        skipped.update(dict.fromkeys(following, why))
    if skipped:
        summary["skipped"] = skipped
    summary["artifacts"] = {k: str(outputs[k]) for k in ("merge", "evaluate", "export-gguf", "serve-check") if k in outputs}
    return summary


# ---------------------------------------------------------------- a KFP server


def kfp_client(host: str | None, token: str | None):
    """A kfp.Client: with --host and a bearer token (or $KFP_TOKEN), or, inside a cluster with no host, the
    pod's service account, as kfp.Client finds it. Constructing it contacts nothing."""
    import os

    import kfp

    return kfp.Client(host=host, existing_token=token or os.environ.get("KFP_TOKEN"))


def kfp_cron(expression: str) -> str:
    """KFP's cron has six fields, seconds first; accept the usual five and add the seconds."""
    fields = expression.split()
    if len(fields) == 5:
        return "0 " + expression.strip()
    if len(fields) == 6:
        return expression.strip()
    raise ConfigError(f"cron expression {expression!r}: expected 5 fields (minute hour day month weekday) or KFP's 6")


def experiment_id(client, name: str) -> str:
    return client.create_experiment(name).experiment_id  # returns the existing one when the name is taken


def submit(config: Config, host: str | None, token: str | None, experiment: str, package: Path,
           force: bool = False, warn: Callable[[str], None] = log.warning) -> dict[str, str]:
    compile_pipeline(config, package, force, warn)
    client = kfp_client(host, token)
    result = client.create_run_from_pipeline_package(
        str(package), arguments={}, run_name=f"{config.name}-{config.hash()[:8]}", experiment_name=experiment
    )
    return {"run_id": result.run_id, "experiment": experiment, "host": host or "in-cluster"}


def schedule(config: Config, host: str | None, token: str | None, experiment: str, cron: str, max_concurrency: int,
             package: Path, force: bool = False, warn: Callable[[str], None] = log.warning) -> dict[str, str]:
    cron_expression = kfp_cron(cron)  # a bad expression fails here, before compiling or contacting KFP
    compile_pipeline(config, package, force, warn)
    client = kfp_client(host, token)
    recurring = client.create_recurring_run(
        experiment_id=experiment_id(client, experiment),
        job_name=f"{config.name}-retrain",
        description=f"Scheduled retraining of {config.name}",
        cron_expression=cron_expression,
        max_concurrency=max_concurrency,
        no_catchup=True,
        enabled=True,
        pipeline_package_path=str(package),
    )
    return {"recurring_run_id": recurring.recurring_run_id, "cron": cron_expression, "experiment": experiment}
