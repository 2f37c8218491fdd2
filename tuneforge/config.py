"""The run config: one YAML file, validated before any work starts.

Every key documents its type and default here; `tuneforge config-schema` prints them.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A config that cannot be used; the message names the file, the key and what was expected."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class BaseModelSettings(Strict):
    source: str = Field(
        description="A built-in name (smollm2-135m-instruct; tiny-llama, tiny-qwen2, tiny-qwen3, tiny-gemma3: random, "
        "built locally), a local Hugging Face "
        "directory, a .gguf file (dequantized on load) or a Hugging Face Hub id."
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) for hub ids.")
    trust_remote_code: bool = Field(False, description="Run model code shipped with the checkpoint.")
    allow_pickle: bool = Field(
        False, description="Load pickle (.bin/.pt) weights; only safetensors are loaded otherwise."
    )


class DataSource(Strict):
    path: str = Field(description="A local file (.jsonl, .json, .parquet, .csv); s3:// and hf:// come with storage.")
    format: Literal["auto", "alpaca", "messages", "sharegpt", "prompt_completion", "text", "preference"] = Field(
        "auto", description="Row format; auto detects it from the keys of the rows."
    )
    split: Literal["sft", "preference", "auto"] = Field(
        "auto", description="Which training set the rows feed; auto: preference rows feed DPO, the rest SFT."
    )


class DataSettings(Strict):
    sources: list[DataSource] = Field(min_length=1, description="Training data files.")
    eval_tasks: str | None = Field(
        None, description="JSONL of generation tasks (prompt or messages, expected[, metric]) for evaluate."
    )
    chat_template: str | None = Field(
        None,
        description="null: the model's own template; a named one (chatml, llama3, gemma); or a Jinja string.",
    )
    system_prompt: str | None = Field(None, description="A system turn added to chat rows that have none.")
    max_length: int = Field(512, gt=8, description="Rows longer than this many tokens are dropped.")
    min_length: int = Field(2, ge=1, description="Rows shorter than this many tokens are dropped.")
    eval_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="Share of rows held out for evaluation.")
    dedupe: bool = Field(True, description="Drop exact and whitespace/case-normalised duplicate rows.")
    on_error: Literal["fail", "skip"] = Field(
        "fail", description="fail: a malformed row stops data-prep; skip: it is dropped and reported."
    )
    seed: int = 42
    num_proc: int | None = Field(
        None,
        ge=1,
        description="Processes that render and tokenize the SFT rows, in contiguous chunks; null: one. "
        "The output is the same for any number.",
    )


class LoraSettings(Strict):
    r: int = Field(16, gt=0)
    alpha: int = Field(32, gt=0)
    dropout: float = Field(
        0.0, ge=0.0, lt=1.0, description="Dropout on the LoRA inputs; drawing its masks is slow on the CPU."
    )
    target_modules: list[str] | Literal["auto", "all-linear"] = Field(
        "auto", description="auto: the attention and MLP projections of the model family."
    )
    use_dora: bool = False
    use_rslora: bool = False


class DistributedSettings(Strict):
    """Training on several processes: GPUs of one node, or several nodes through Kubeflow Trainer."""

    strategy: Literal["ddp", "fsdp", "deepspeed_zero3"] = Field(
        "ddp", description="ddp: a full copy per process; fsdp: parameters, gradients and optimizer state sharded "
        "(PyTorch FSDP); deepspeed_zero3: the same with DeepSpeed ZeRO stage 3 (needs deepspeed installed)."
    )
    processes: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        "auto", description="Processes per node, started with torchrun; auto: one per GPU the stage's pod has "
        "(cluster.resources.STAGE.gpus), one on a machine without GPUs."
    )
    nodes: int = Field(
        1, ge=1, description="Nodes; above 1 the pipeline hands the stage to Kubeflow Trainer as a TrainJob "
        "(or a PyTorchJob, see engine) and waits for it. Needs storage.uri."
    )
    engine: Literal["trainjob", "pytorchjob"] = Field(
        "trainjob", description="For nodes > 1: trainjob (Kubeflow Trainer v2, trainer.kubeflow.org) or pytorchjob "
        "(Training Operator v1, kubeflow.org)."
    )
    runtime: str = Field("torch-distributed", description="The ClusterTrainingRuntime a TrainJob refers to.")
    options: dict[str, Any] = Field(
        default_factory=dict, description="Merged over the built-in fsdp_config (fsdp) or DeepSpeed config "
        "(deepspeed_zero3), e.g. {offload_optimizer: {device: cpu}}."
    )


class TrainSettings(Strict):
    """What SFT and DPO share: the optimisation loop."""

    learning_rate: float = Field(2e-4, gt=0)
    epochs: float = Field(1.0, gt=0)
    max_steps: int = Field(-1, description="Stop after this many optimiser steps; -1: run the epochs.")
    batch_size: int = Field(4, gt=0, description="Per-device batch size.")
    grad_accum: int = Field(1, gt=0)
    warmup_ratio: float = Field(0.05, ge=0.0, lt=1.0)
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "cosine"
    weight_decay: float = Field(0.0, ge=0.0)
    max_grad_norm: float = Field(1.0, gt=0)
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="auto: bf16 where the hardware computes it fast (CUDA bf16, CPU avx512_bf16), else fp32."
    )
    gradient_checkpointing: bool = Field(False, description="Trade compute for memory.")
    optimizer: Literal["auto", "adamw_torch", "adamw_torch_fused", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit"] = Field(
        "auto", description="auto: paged 8-bit AdamW (bitsandbytes) for qlora on a CUDA GPU, else AdamW. "
        "8-bit and paged optimizers need a CUDA GPU."
    )
    attention: Literal["auto", "eager", "sdpa", "flash_attention_2"] = Field(
        "auto", description="Attention kernel; auto: eager on the CPU for rows up to 256 tokens, else the model's default."
    )
    logging_steps: int = Field(5, gt=0)
    eval_steps: int | None = Field(None, gt=0, description="Evaluate every N steps; null: once per epoch.")
    save_steps: int = Field(50, gt=0, description="Checkpoint every N steps.")
    save_total_limit: int = Field(2, gt=0)
    early_stopping_patience: int | None = Field(
        None, gt=0, description="Stop when eval loss has not improved for this many evaluations."
    )
    resume: Literal["auto", "never"] | str = Field(
        "auto", description="auto: continue from the latest checkpoint if one exists; never; or a checkpoint path."
    )
    seed: int = 42
    lora: LoraSettings = Field(default_factory=LoraSettings)
    backend: Literal["auto", "hf", "unsloth"] = Field(
        "auto", description="unsloth: Unsloth's kernels (a CUDA GPU and the unsloth package); hf: transformers/peft; "
        "auto: unsloth where it can run, else hf (the choice and why are logged and recorded in the manifest)."
    )
    distributed: DistributedSettings = Field(default_factory=DistributedSettings)


class SftSettings(TrainSettings):
    method: Literal["full", "lora", "qlora"] = "lora"
    loss_on: Literal["assistant", "all"] = Field(
        "assistant", description="assistant: only assistant/completion tokens count; all: every token."
    )
    packing: bool = Field(False, description="Pack several rows into one sequence (trl bfd packing).")


class DpoSettings(TrainSettings):
    enabled: bool = True
    learning_rate: float = Field(5e-5, gt=0)
    beta: float = Field(0.1, gt=0)
    loss_type: Literal["sigmoid", "ipo", "hinge", "robust", "apo_zero", "sigmoid_norm"] = "sigmoid"


class MergeSettings(Strict):
    dtype: Literal["float32", "bfloat16", "float16"] = Field("bfloat16", description="dtype of the merged weights.")
    max_shard_size: str = Field("2GB", description="safetensors shard size.")
    tolerance: float = Field(
        1e-3, gt=0, description="Max abs logit difference between the merged and the adapter model, both in fp32."
    )


class EvaluateSettings(Strict):
    max_new_tokens: int = Field(64, gt=0)
    max_examples: int = Field(200, gt=0, description="Cap on held-out rows scored per metric.")
    samples: int = Field(8, ge=0, description="Sample generations shown side by side in the report.")
    batch_size: int = Field(8, gt=0)


class Tolerance(Strict):
    max_kl: float = Field(gt=0, description="Mean KL divergence (reference || GGUF) per position, in nats.")
    min_argmax: float = Field(ge=0, le=1, description="Share of positions whose top token agrees.")
    min_top5: float = Field(ge=0, le=1, description="Mean overlap of the top-5 tokens.")


GGUF_TOLERANCES = {
    "f16": Tolerance(max_kl=0.002, min_argmax=0.98, min_top5=0.95),
    "bf16": Tolerance(max_kl=0.01, min_argmax=0.95, min_top5=0.9),
    "q8_0": Tolerance(max_kl=0.05, min_argmax=0.9, min_top5=0.85),
    "q6_k": Tolerance(max_kl=0.05, min_argmax=0.85, min_top5=0.8),
    # Small models lose more to 4-5 bit rounding, and a sharply fine-tuned one more than its base (SmolLM2-135M
    # q4_k_m: 0.10 base, 0.17-0.21 after the quickstart); a broken conversion gives several nats.
    "q5_k_m": Tolerance(max_kl=0.25, min_argmax=0.75, min_top5=0.7),
    "q4_k_m": Tolerance(max_kl=0.35, min_argmax=0.75, min_top5=0.7),
}


GgufType = Literal["f16", "bf16", "q8_0", "q4_k_m", "q5_k_m", "q6_k"]


class ExportSettings(Strict):
    enabled: bool = True
    types: list[GgufType] = Field(
        default_factory=lambda: ["q8_0"],
        min_length=1,
        description="GGUF types to write; q4_k_m, q5_k_m and q6_k use llama.cpp's quantizer (the gguf extra).",
    )
    verifier: Literal["auto", "llama_cpp", "transformers"] = Field(
        "auto", description="Who loads each file to check it: llama.cpp where installed (auto), else transformers."
    )
    tolerances: dict[GgufType, Tolerance] = Field(
        default_factory=dict, description="Per-type overrides of the verification limits (defaults per type)."
    )
    probes: list[str] = Field(
        default_factory=lambda: [
            "Hello! Who are you?",
            "Write one sentence about the sea.",
            "Explain in two sentences why the sky is blue.",
        ],
        min_length=1,
        description="User messages rendered with the chat template and scored by both models.",
    )
    temperature: float = Field(0.2, ge=0, description="Ollama Modelfile default temperature.")
    num_ctx: int = Field(2048, gt=0, description="Ollama Modelfile context length.")

    def tolerance(self, gguf_type: str) -> Tolerance:
        return self.tolerances.get(gguf_type, GGUF_TOLERANCES[gguf_type])


class StorageSettings(Strict):
    uri: str | None = Field(
        None, description="s3://bucket/prefix where stage outputs are published (under NAME/RUN_ID/STAGE); null: local only."
    )
    endpoint_url: str | None = Field(None, description="S3 endpoint; null: $AWS_ENDPOINT_URL or AWS itself.")

    @model_validator(mode="after")
    def _s3_only(self) -> StorageSettings:
        if self.uri is not None and not self.uri.startswith("s3://"):
            raise ValueError(f"storage.uri must start with s3://, got {self.uri!r}")
        return self


class RegistrySettings(Strict):
    enabled: bool = True
    model_name: str | None = Field(None, description="Registered model name; null: the run name.")
    primary_metric: str = Field("task_score", description="Evaluation metric that decides promotion.")
    min_improvement: float = Field(0.0, ge=0, description="How much the candidate must beat base and champion by.")
    guards: dict[str, float] = Field(
        default_factory=lambda: {"eval_loss": 0.05},
        description="Metric -> the regression allowed against base and champion (absolute units).",
    )


class StageResources(Strict):
    cpu: str = Field("2", description="CPU request and limit, Kubernetes units.")
    memory: str = Field("8Gi", description="Memory request and limit, Kubernetes units.")
    gpus: int = Field(0, ge=0, description="GPUs for the stage.")
    gpu_type: str = Field("nvidia.com/gpu", description="Accelerator resource name.")
    timeout_seconds: int = Field(6 * 3600, gt=0)
    retries: int = Field(2, ge=0, description="Retries of a failed stage, with exponential backoff.")


class ClusterSettings(Strict):
    """How the stages run on Kubernetes (ignored by local runs)."""

    resources: dict[Literal["default", "data-prep", "sft", "dpo", "merge", "evaluate", "export-gguf", "register"], StageResources] = Field(
        default_factory=lambda: {"default": StageResources()},
        description="Per-stage resources; stages not listed use `default`.",
    )
    s3_secret: str | None = Field(
        "tuneforge-s3", description="Kubernetes Secret with AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL."
    )
    mlflow_secret: str | None = Field(
        "tuneforge-mlflow", description="Kubernetes Secret with MLFLOW_TRACKING_URI (and MLFLOW_TRACKING_TOKEN if any)."
    )
    model_cache_pvc: str | None = Field(None, description="PVC mounted at /cache for base models (TUNEFORGE_CACHE).")
    gpu_node_selector: dict[str, str] = Field(default_factory=dict, description="Node labels for GPU stages.")
    gpu_tolerations: list[dict[str, str]] = Field(
        default_factory=lambda: [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    )
    shm_size: str = Field("8Gi", description="Size of the /dev/shm emptyDir (PyTorch data loaders need it).")

    def for_stage(self, stage: str) -> StageResources:
        return self.resources.get(stage, self.resources.get("default", StageResources()))


class TrackingSettings(Strict):
    uri: str | None = Field(
        None, description="MLflow tracking URI; null: $MLFLOW_TRACKING_URI, else sqlite in the work dir."
    )
    experiment: str = "tuneforge"
    retry_seconds: float = Field(
        120, ge=0, description="How long a stage waits for an unreachable MLflow server before it goes on without it "
        "(at its start it then fails, before any work; later it finishes and reports what could not be logged)."
    )


class Config(Strict):
    name: str = Field(description="Run name; also the registered model name later.")
    workdir: str = Field("runs", description="Where local runs, caches and the embedded MLflow store live.")
    base_model: BaseModelSettings
    data: DataSettings
    sft: SftSettings = Field(default_factory=SftSettings)
    dpo: DpoSettings = Field(default_factory=lambda: DpoSettings(enabled=False))
    merge: MergeSettings = Field(default_factory=MergeSettings)
    evaluate: EvaluateSettings = Field(default_factory=EvaluateSettings)
    export: ExportSettings = Field(default_factory=ExportSettings)
    storage: StorageSettings = Field(default_factory=StorageSettings)
    registry: RegistrySettings = Field(default_factory=RegistrySettings)
    cluster: ClusterSettings = Field(default_factory=ClusterSettings)
    tracking: TrackingSettings = Field(default_factory=TrackingSettings)

    @model_validator(mode="after")
    def _check_combinations(self) -> Config:
        if self.sft.method == "qlora" and self.sft.precision == "fp16":
            raise ValueError("sft.precision: fp16 with qlora is unstable; use bf16 or auto")
        for stage in ("sft", "dpo"):
            settings: TrainSettings = getattr(self, stage)
            if settings.distributed.nodes > 1 and not self.storage.uri:
                raise ValueError(f"{stage}.distributed.nodes > 1 needs storage.uri: the nodes exchange inputs "
                                 "and outputs through S3")
            if settings.distributed.nodes > 1 and settings.backend == "unsloth":
                raise ValueError(f"{stage}.backend: unsloth trains on one GPU; set {stage}.backend: hf for several nodes")
        return self

    def hash(self) -> str:
        return hashlib.sha256(json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()[:16]


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` strings; values are parsed as YAML so numbers and lists keep their types."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. sft.learning_rate=1e-4")
        node = raw
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item!r}: {part!r} is a value, not a section")
            node = child
        node[parts[-1]] = yaml.safe_load(value) if value else ""
    return raw


def _describe(error: dict[str, Any]) -> str:
    key = ".".join(str(p) for p in error["loc"]) or "(top level)"
    if error["type"] == "extra_forbidden":
        return f"{key}: unknown key"
    if error["type"] == "missing":
        return f"{key}: required key is missing"
    return f"{key}: got {error['input']!r}: {error['msg']}"


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except (UnicodeDecodeError, IsADirectoryError, PermissionError) as exc:
        raise ConfigError(f"{path}: cannot read config: {exc}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of keys at the top level, got {type(raw).__name__}")
    raw = apply_overrides(raw, overrides or [])
    try:
        config = Config.model_validate(raw)
    except ValidationError as exc:
        lines = "\n".join(f"  - {_describe(e)}" for e in exc.errors())
        raise ConfigError(f"{path}: invalid config:\n{lines}") from None
    # Relative data paths are relative to the config file, so examples run from any directory.
    base = path.resolve().parent
    for source in config.data.sources:
        source.path = _resolve_relative(source.path, base)
    if config.data.eval_tasks:
        config.data.eval_tasks = _resolve_relative(config.data.eval_tasks, base)
    if (base / config.base_model.source).exists():
        config.base_model.source = str((base / config.base_model.source).resolve())
    return config


def _resolve_relative(value: str, base: Path) -> str:
    if "://" in value or Path(value).is_absolute():
        return value
    return str((base / value).resolve())
