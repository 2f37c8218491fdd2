"""The KFP pipeline: the DAG for a config, and how it runs locally (kfp.local), compiles, is submitted and scheduled.

    data-prep -> sft -> dpo (when enabled) -> merge -> evaluate -> [beats base] -> export-gguf -> register

An exit handler closes the pipeline's MLflow run as FAILED when anything fails. Resources, retries with
backoff, timeouts, caching, secrets as env, the model-cache PVC, GPU node selectors and tolerations and a
/dev/shm emptyDir come from the config's `cluster` section; kfp.local ignores them.
"""


import hashlib
import json
from pathlib import Path
from typing import Any

from kfp import dsl, kubernetes

from tuneforge import tracking
from tuneforge.config import Config
from tuneforge.pipelines import components as c

GPU_STAGES = ("sft", "dpo")
# What the task of a stage that Kubeflow Trainer runs on several nodes needs: it only creates the job and waits.
JOB_LAUNCHER = {"cpu": "1", "memory": "2Gi"}


def multi_node(config: Config, stage: str) -> bool:
    return stage in GPU_STAGES and getattr(config, stage).distributed.nodes > 1


def job_image(config: Config, stage: str) -> str:
    return c.CUDA_IMAGE if config.cluster.for_stage(stage).gpus else c.CPU_IMAGE


def check_jobs(config: Config, config_json: str) -> None:
    """Compile-time check of the Kubeflow Trainer jobs the pipeline will create: built as they will be (run id and
    namespace stand-ins) and read into the Kubeflow API types."""
    from tuneforge.pipelines import trainjob

    for stage in GPU_STAGES:
        if multi_node(config, stage):
            inputs = {name: f"{config.storage.uri}/RUN/{stage}.inputs/{name}" for name in ("data", "model")[: 1 + (stage == "dpo")]}
            trainjob.validate(trainjob.build(config, config_json, stage, "compile-check", inputs, "compile-check",
                                             job_image(config, stage)))


def data_fingerprint(config: Config) -> str:
    """sha256 over the data files' contents, so a rerun on changed data misses the cache."""
    digest = hashlib.sha256()
    for path in [s.path for s in config.data.sources] + ([config.data.eval_tasks] if config.data.eval_tasks else []):
        if "://" in path:
            digest.update(path.encode())
            continue
        with open(path, "rb") as f:
            digest.update(hashlib.file_digest(f, "sha256").digest())
    return digest.hexdigest()


def _configure(task: dsl.PipelineTask, stage: str, config: Config, fingerprint: str) -> dsl.PipelineTask:
    cluster = config.cluster
    resources = cluster.for_stage(stage)
    task.set_display_name(stage)
    if multi_node(config, stage):
        # The job's nodes get the stage's resources; this task only creates the job and waits for it.
        task.set_cpu_request(JOB_LAUNCHER["cpu"]).set_cpu_limit(JOB_LAUNCHER["cpu"])
        task.set_memory_request(JOB_LAUNCHER["memory"]).set_memory_limit(JOB_LAUNCHER["memory"])
    else:
        task.set_cpu_request(resources.cpu).set_cpu_limit(resources.cpu)
        task.set_memory_request(resources.memory).set_memory_limit(resources.memory)
    task.set_retry(num_retries=resources.retries, backoff_duration="30s", backoff_factor=2.0, backoff_max_duration="1800s")
    # Keyed on what decides the result (config, data, code), not on the run's MLflow id, which every run changes.
    task.set_caching_options(True, cache_key=f"tuneforge-{stage}-{config.hash()}-{fingerprint[:16]}-{tracking.code_version()}")
    kubernetes.set_timeout(task, resources.timeout_seconds)
    if resources.gpus and not multi_node(config, stage):
        task.set_accelerator_type(resources.gpu_type).set_accelerator_limit(resources.gpus)
        if stage in GPU_STAGES:
            task.set_container_image(c.CUDA_IMAGE)
        for key, value in cluster.gpu_node_selector.items():
            kubernetes.add_node_selector(task, key, value)
        for toleration in cluster.gpu_tolerations:
            kubernetes.add_toleration(task, **toleration)
    if cluster.s3_secret:
        kubernetes.use_secret_as_env(task, cluster.s3_secret, {
            "AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY",
            "AWS_ENDPOINT_URL": "AWS_ENDPOINT_URL"})
    if cluster.mlflow_secret:
        kubernetes.use_secret_as_env(task, cluster.mlflow_secret, {"MLFLOW_TRACKING_URI": "MLFLOW_TRACKING_URI"})
    if cluster.model_cache_pvc:
        kubernetes.mount_pvc(task, pvc_name=cluster.model_cache_pvc, mount_path="/cache")
        task.set_env_variable("TUNEFORGE_CACHE", "/cache")
    kubernetes.empty_dir_mount(task, volume_name="dshm", mount_path="/dev/shm", medium="Memory", size_limit=cluster.shm_size)
    return task


def build(config: Config):
    """The pipeline function for this config (the DAG's shape follows dpo.enabled, export.enabled, registry.enabled)."""
    # One line (KFP writes parameter defaults into a YAML comment), and only what differs from the defaults.
    config_json = json.dumps(config.model_dump(mode="json", exclude_defaults=True), sort_keys=True)
    fingerprint = data_fingerprint(config)
    check_jobs(config, config_json)
    jobs = {stage: {"job_image": job_image(config, stage)} for stage in GPU_STAGES if multi_node(config, stage)}

    @dsl.pipeline(name=f"tuneforge-{config.name}", description=f"Fine-tune {config.base_model.source}")
    def pipeline(config_json: str = config_json, data_fingerprint: str = fingerprint):
        job_id = dsl.PIPELINE_JOB_ID_PLACEHOLDER
        finish = c.finish_run(config_json=config_json, job_id=job_id)
        finish.set_display_name("close MLflow run").set_caching_options(False)
        with dsl.ExitHandler(finish, name="stages"):
            start = c.start_run(config_json=config_json, job_id=job_id).set_display_name("open MLflow run")
            start.set_caching_options(False)
            parent = start.output
            prep = _configure(c.data_prep(config_json=config_json, data_fingerprint=data_fingerprint, parent_run=parent), "data-prep", config, fingerprint)
            tuned = _configure(c.sft(config_json=config_json, parent_run=parent, data=prep.outputs["data"], **jobs.get("sft", {})), "sft", config, fingerprint)
            adapter, base = tuned.outputs["model"], None
            if config.dpo.enabled:
                preferred = _configure(c.dpo(config_json=config_json, parent_run=parent, data=prep.outputs["data"],
                                             sft_model=tuned.outputs["model"], **jobs.get("dpo", {})), "dpo", config, fingerprint)
                adapter = preferred.outputs["model"]
                base = tuned.outputs["model"] if config.sft.method == "full" else None
            merge_args = {"base": base} if base is not None else {}
            merged = _configure(c.merge(config_json=config_json, parent_run=parent, adapter=adapter, **merge_args), "merge", config, fingerprint)
            curves = {"sft_model": tuned.outputs["model"], **({"dpo_model": preferred.outputs["model"]} if config.dpo.enabled else {})}
            evaluated = _configure(c.evaluate(config_json=config_json, parent_run=parent, data=prep.outputs["data"],
                                              model=merged.outputs["model"], **curves), "evaluate", config, fingerprint)
            with dsl.If(evaluated.outputs["Output"] == True, name="beats-base"):  # noqa: E712 (a KFP condition)
                extra = {}
                if config.export.enabled:
                    exported = _configure(c.export_gguf(config_json=config_json, parent_run=parent,
                                                        model=merged.outputs["model"]), "export-gguf", config, fingerprint)
                    extra["gguf"] = exported.outputs["gguf"]
                if config.registry.enabled:
                    registered = c.register(config_json=config_json, parent_run=parent, evaluation=evaluated.outputs["evaluation"],
                                            model=merged.outputs["model"], **extra)
                    # Registration decides against the live champion: never reuse a cached decision.
                    _configure(registered, "register", config, fingerprint).set_caching_options(False)

    return pipeline


def compile_pipeline(config: Config, path: Path) -> Path:
    from kfp import compiler

    compiler.Compiler().compile(build(config), str(path))
    return path


def run_locally(config: Config, pipeline_root: Path) -> dict[str, Any]:
    """Run the pipeline with kfp.local's subprocess runner (the stages run in this Python environment) and
    return a summary read from the task outputs."""
    from kfp import local

    from tuneforge.config import ConfigError

    for stage in GPU_STAGES:
        if multi_node(config, stage):
            raise ConfigError(f"{stage}.distributed.nodes is {getattr(config, stage).distributed.nodes}: several nodes "
                              "need a cluster with Kubeflow Trainer (tuneforge submit), and tuneforge run trains on this "
                              f"machine; set {stage}.distributed.nodes: 1 (distributed.processes spreads a stage over "
                              "this machine's GPUs)")
    pipeline_root = Path(pipeline_root).resolve()
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(pipeline_root),
               enable_caching=True, raise_on_error=False)
    before = set(pipeline_root.glob("*")) if pipeline_root.exists() else set()
    build(config)()
    created = sorted(set(pipeline_root.glob(f"tuneforge-{config.name}-*")) - before)
    if not created:
        raise RuntimeError(f"kfp.local produced no run folder under {pipeline_root}")
    return summarize(config, created[-1])


def _output_of(config: Config, run_folder: Path, task: str, output: str) -> tuple[Path | None, str]:
    """Where a stage's output is for this run: in the run's folder, or, for a cache hit, the newest earlier output
    of the same config (the cache key covers config, data and code)."""
    here = run_folder / task / output
    if (here / "manifest.json").exists():
        return here, "succeeded"
    if (run_folder / task).exists():
        return None, "failed"
    for folder in sorted(run_folder.parent.glob(f"tuneforge-{config.name}-*/{task}/{output}"), reverse=True):
        manifest = folder / "manifest.json"
        if manifest.exists() and json.loads(manifest.read_text())["lineage"].get("config_hash") == config.hash():
            return folder, "cached"
    return None, "not run"


def summarize(config: Config, run_folder: Path) -> dict[str, Any]:
    """The JSON summary of a local run: each stage's status, key metrics, artifact paths, the registered version."""
    stages: dict[str, Any] = {}
    outputs: dict[str, Path] = {}
    for stage, (task, output) in TASK_OUTPUTS.items():
        folder, status = _output_of(config, run_folder, task, output)
        if status == "not run":
            continue
        stages[stage] = {"status": status, **({"output": str(folder)} if folder else {})}
        if folder:
            outputs[stage] = folder
            unlogged = json.loads((folder / "manifest.json").read_text())["lineage"].get("mlflow_unlogged")
            if unlogged:
                stages[stage]["mlflow_unlogged"] = unlogged
    summary: dict[str, Any] = {"name": config.name, "run_folder": str(run_folder), "stages": stages,
                               "mlflow": {"tracking_uri": tracking.tracking_uri(config)}}
    failed = [s for s, v in stages.items() if v["status"] == "failed"]
    summary["status"] = "failed" if failed or "evaluate" not in outputs else "succeeded"
    if failed:
        summary["error"] = f"stage {failed[0]} failed; its log is above"
    start = run_folder / "start-run" / "executor_output.json"
    if start.exists():
        summary["mlflow"]["run_id"] = json.loads(start.read_text())["parameterValues"]["Output"]
    if "evaluate" in outputs:
        results = json.loads((outputs["evaluate"] / "manifest.json").read_text())["metrics"]
        keys = ("eval_loss", "perplexity", "preference_accuracy", "task_score", "task_exact_match")
        summary["metrics"] = {m: {k: round(results[m][k], 4) for k in keys if k in results[m]} for m in ("base", "candidate")}
    if "register" in outputs:
        result = json.loads((outputs["register"] / "manifest.json").read_text())["metrics"]
        summary["registered_model"] = {k: result[k] for k in ("name", "version", "aliases", "decision")}
    summary["artifacts"] = {k: str(outputs[k]) for k in ("merge", "export-gguf") if k in outputs}
    return summary


# stage -> (KFP task folder, output artifact name)
TASK_OUTPUTS = {
    "data-prep": ("data-prep", "data"), "sft": ("sft", "model"), "dpo": ("dpo", "model"), "merge": ("merge", "model"),
    "evaluate": ("evaluate", "evaluation"), "export-gguf": ("export-gguf", "gguf"), "register": ("register", "registration"),
}


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
    raise ValueError(f"cron expression {expression!r}: expected 5 fields (minute hour day month weekday) or KFP's 6")


def _experiment_id(client, name: str) -> str:
    return client.create_experiment(name).experiment_id  # returns the existing one when the name is taken


def submit(config: Config, host: str | None, token: str | None, experiment: str, package: Path) -> dict[str, str]:
    compile_pipeline(config, package)
    client = kfp_client(host, token)
    result = client.create_run_from_pipeline_package(
        str(package), arguments={}, run_name=f"{config.name}-{config.hash()[:8]}", experiment_name=experiment
    )
    return {"run_id": result.run_id, "experiment": experiment, "host": host or "in-cluster"}


def schedule(config: Config, host: str | None, token: str | None, experiment: str, cron: str, max_concurrency: int,
             package: Path) -> dict[str, str]:
    cron_expression = kfp_cron(cron)  # a bad expression fails here, before compiling or contacting KFP
    compile_pipeline(config, package)
    client = kfp_client(host, token)
    recurring = client.create_recurring_run(
        experiment_id=_experiment_id(client, experiment),
        job_name=f"{config.name}-retrain",
        description=f"Scheduled retraining of {config.name}",
        cron_expression=cron_expression,
        max_concurrency=max_concurrency,
        no_catchup=True,
        enabled=True,
        pipeline_package_path=str(package),
    )
    return {"recurring_run_id": recurring.recurring_run_id, "cron": cron_expression, "experiment": experiment}
