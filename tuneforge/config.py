"""The run config: one YAML file, validated before any work starts.

Every key documents its type and default here; `tuneforge config-schema` prints them.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tuneforge import stages
from tuneforge.errors import ConfigError


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
    format: Literal["auto", "alpaca", "messages", "sharegpt", "prompt_completion", "text", "preference", "unpaired",
                    "classification"] = Field(
        "auto", description="Row format; auto detects it from the keys of the rows (the README lists the public dataset "
        "shapes it reads); with task: classification every source is read as classification rows (text or sentence, "
        "and label)."
    )
    split: Literal["sft", "preference", "auto", "eval"] = Field(
        "auto", description="Which set the rows feed; auto: preference rows feed DPO, the rest SFT; eval: a curated "
        "held-out set, never trained on (its rows join the held-out split; data.eval_fraction still holds out a share "
        "of the other sources, 0 for none)."
    )
    max_rows: int | None = Field(
        None, gt=0, description="Take at most this many of the source's rows (a seeded random sample); null: all.")
    weight: float | None = Field(
        None, gt=0, description="This source's share of the training mix, relative to the other sources' weights (1 where "
        "unset): rows are sampled (seeded, none repeated) so the mix has these proportions and is as large as the "
        "sources allow. null on every source: no mixing, every row is used. The realised counts are in the report.")


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
    seed: int = Field(42, description="Seed of the train/eval split and of the sampling of data.sources.")
    leakage: Literal["warn", "drop", "fail"] = Field(
        "warn", description="Training rows whose prompt (case and whitespace aside) is also in the held-out split or the "
        "eval tasks: warn (counted in the report and MLflow), drop them from training, or fail.")
    num_proc: int | None = Field(
        None,
        ge=1,
        description="Processes that render and tokenize the SFT rows, in contiguous chunks; null: one. "
        "The output is the same for any number.",
    )


class LoraSettings(Strict):
    r: int = Field(16, gt=0, description="LoRA rank: the adapter's inner dimension.")
    alpha: int = Field(32, gt=0, description="LoRA scaling numerator: updates are scaled by alpha / r.")
    dropout: float = Field(
        0.0, ge=0.0, lt=1.0, description="Dropout on the LoRA inputs; drawing its masks is slow on the CPU."
    )
    target_modules: list[str] | Literal["auto", "all-linear"] = Field(
        "auto", description="auto: the attention and MLP projections of the model family."
    )
    use_dora: bool = Field(False, description="DoRA: learn the weights' magnitude apart from their direction.")
    use_rslora: bool = Field(False, description="Rank-stabilised LoRA: scale by alpha / sqrt(r) instead of alpha / r.")


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

    learning_rate: float = Field(2e-4, gt=0, description="Peak learning rate.")
    epochs: float = Field(1.0, gt=0, description="Passes over the training rows (fractions allowed).")
    max_steps: int = Field(-1, description="Stop after this many optimiser steps; -1: run the epochs.")
    batch_size: int = Field(4, gt=0, description="Per-device batch size.")
    grad_accum: int = Field(1, gt=0, description="Batches whose gradients are summed per optimiser step.")
    warmup_ratio: float = Field(0.05, ge=0.0, lt=1.0, description="Share of the steps spent warming the learning rate up.")
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = Field(
        "cosine", description="How the learning rate decays after warm-up.")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradients are clipped to this global norm.")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="auto: bf16 where the hardware computes it fast (CUDA bf16, CPU avx512_bf16), else fp32."
    )
    gradient_checkpointing: bool = Field(False, description="Trade compute for memory.")
    optimizer: Literal["auto", "adamw_torch", "adamw_torch_fused", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit"] = Field(
        "auto", description="auto: paged 8-bit AdamW (bitsandbytes) for qlora on a CUDA GPU, else AdamW. "
        "8-bit and paged optimizers need a CUDA GPU."
    )
    attention: Literal["auto", "eager", "sdpa", "flash_attention_2"] = Field(
        "auto", description="Attention kernel; auto: eager on the CPU for rows up to 256 tokens, else the model's default; "
        "for padding-free or packed sft batches on the CPU, rowwise (each row attended alone, see batching)."
    )
    batching: Literal["auto", "padded", "grouped", "padding_free"] = Field(
        "auto", description="How rows make a batch. padded: in random order, each padded to the batch's longest; "
        "grouped: rows of similar length together (transformers' length-grouped sampler), little padding left; "
        "padding_free (sft): the batch's rows in one sequence with per-row position ids, no padding at all, for an "
        "attention that keeps them apart (checked first); auto: padding_free (sft) with flash attention, and on the "
        "CPU with rowwise attention (each row attended alone; used where it gives the model's own logits, checked "
        "first, and the attention is auto), else grouped where random batches would be 10% padding or more and padded "
        "below that (on eager or SDPA attention a padding-free row attends over the whole batch's length). The choice "
        "and the padding share are recorded in the manifest."
    )
    logging_steps: int = Field(5, gt=0, description="Log the training loss every N steps.")
    eval_steps: int | None = Field(None, gt=0, description="Evaluate every N steps; null: once per epoch.")
    save_steps: int = Field(50, gt=0, description="Checkpoint every N steps.")
    save_total_limit: int = Field(2, gt=0, description="Checkpoints kept on disk; older ones are deleted.")
    early_stopping_patience: int | None = Field(
        None, gt=0, description="Stop when eval loss (classification: classification.metric_for_best) has not improved "
        "for this many evaluations. null: no early stopping (classification: 2)."
    )
    resume: Literal["auto", "never"] | str = Field(
        "auto", description="auto: continue from the latest checkpoint if one exists; never; or a checkpoint path."
    )
    seed: int = Field(42, description="Seed of the weights' initialisation and the data order.")
    lora: LoraSettings = Field(default_factory=LoraSettings, description="The adapter, for LoRA and QLoRA.")
    backend: Literal["auto", "hf", "unsloth"] = Field(
        "auto", description="unsloth: Unsloth's kernels (a CUDA GPU and the unsloth package); hf: transformers/peft; "
        "auto: unsloth where it can run, else hf (the choice and why are logged and recorded in the manifest)."
    )
    distributed: DistributedSettings = Field(
        default_factory=DistributedSettings, description="Several processes or nodes (one by default).")


class SftSettings(TrainSettings):
    enabled: bool = Field(True, description="Run SFT (stage sft). false: the stage after it starts from the base model; "
                          "only methods without a reference model can (dpo.method orpo, simpo or cpo; grpo).")
    method: Literal["full", "lora", "qlora"] = Field(
        "lora", description="full: every weight; lora: a low-rank adapter; qlora: the adapter on a 4-bit base.")
    loss_on: Literal["assistant", "all"] = Field(
        "assistant", description="assistant: only assistant/completion tokens count; all: every token."
    )
    packing: bool = Field(False, description="Pack several rows into one sequence (trl bfd packing).")
    shared_prefix: bool = Field(
        True, description="Run the tokens every row of a batch starts with (a chat template's system block, a common "
        "instruction) once per batch, its KV cache repeated for the rows, instead of once per row. Checked against "
        "whole rows on the model first; off, and recorded why, for padding-free batches, gradient checkpointing, "
        "dropout, and models whose cache cannot be repeated.")


class DpoSettings(TrainSettings):
    enabled: bool = Field(True, description="Run preference tuning after SFT (needs preference pairs in the data; "
                          "for kto, pairs or unpaired prompt/completion/label rows).")
    method: Literal["dpo", "kto", "orpo", "simpo", "cpo"] = Field(
        "dpo", description="The preference method, each by TRL's trainer. dpo and kto train against a reference (the SFT "
        "model); orpo, simpo and cpo need none. kto learns from answers labelled good or bad one at a time: the unpaired "
        "rows, and each pair as a good and a bad answer.")
    learning_rate: float = Field(5e-5, gt=0, description="Peak learning rate.")
    beta: float | None = Field(
        None, gt=0, description="dpo, kto: how far the policy may move from the reference (lower: further); orpo: the "
        "weight of the odds-ratio term (the paper's lambda); simpo, cpo: the reward scale. null: 2.0 for simpo (its "
        "paper's), 0.1 for the others (TRL's).")
    simpo_gamma: float = Field(0.5, ge=0, description="simpo: the target reward margin over beta (TRL's default).")
    loss_type: Literal["sigmoid", "ipo", "hinge", "robust", "apo_zero", "sigmoid_norm"] = Field(
        "sigmoid", description="TRL's DPO loss (method dpo): sigmoid is the DPO paper's.")
    max_chosen_logp_drop: float | None = Field(
        10.0, gt=0, description="The likelihood guard: stop when the policy's mean log-probability of the chosen answers "
        "on the held-out pairs falls more than this many nats (summed over an answer) below the reference's, and keep "
        "the last checkpoint within it. DPO can widen the reward margin while pushing the chosen answers down too "
        "(likelihood displacement) and ruin a good SFT model. null: no guard.")
    shared_prompt: bool = Field(
        True, description="Run each pair's prompt once: one forward over prompt, chosen and rejected, with an attention "
        "mask that keeps the two answers apart, instead of two rows that repeat the prompt. Checked against the two-row "
        "forward on the model first; where they differ (or for MoE models and sliding-window attention over longer "
        "rows) the stage uses TRL's two rows and records why.")
    rpo_alpha: float | None = Field(
        None, gt=0, description="Add an NLL loss on the chosen answers with this weight (RPO, TRL's 'sft' loss term): "
        "it holds the chosen answers' likelihood up; the remedy when the guard trips. null: plain DPO.")

    @field_validator("batching")
    @classmethod
    def _padding_free_is_sft_only(cls, value: str) -> str:
        if value == "padding_free":
            raise ValueError("padding_free is for sft: TRL's DPOTrainer has no padding-free batches; use grouped or "
                             "auto (dpo.shared_prompt already computes each prompt once)")
        return value

    @model_validator(mode="after")
    def _options_of_the_method(self) -> DpoSettings:
        if self.method == "dpo":
            return self
        if self.loss_type != "sigmoid":
            raise ValueError(f"dpo.loss_type is a DPO loss; dpo.method is {self.method}: remove dpo.loss_type or set "
                             "dpo.method: dpo")
        if self.rpo_alpha is not None:
            raise ValueError(f"dpo.rpo_alpha adds an NLL term to DPO; dpo.method is {self.method} (orpo and cpo have "
                             "their own NLL term): remove dpo.rpo_alpha or set dpo.method: dpo")
        if self.method == "kto" and self.batch_size < 2:
            raise ValueError("dpo.batch_size must be at least 2 for dpo.method kto: its KL estimate pairs each row with "
                             "another answer in the same batch")
        if self.batching == "grouped":
            raise ValueError(f"dpo.batching: grouped is for dpo.method dpo; TRL's {self.method} trainer batches its "
                             "rows itself: use auto or padded")
        return self

    @property
    def beta_value(self) -> float:
        return self.beta if self.beta is not None else (2.0 if self.method == "simpo" else 0.1)

    @property
    def needs_reference(self) -> bool:
        return self.method in ("dpo", "kto")


class RewardSettings(Strict):
    """One verifiable reward of GRPO: a score of each generated answer, weighted into the total."""

    type: Literal["json_valid", "json_schema", "exact", "contains", "regex", "length", "python"] = Field(
        description="json_valid: 1 if the answer parses as JSON; json_schema: 1 if it parses and matches `json_schema`; exact: "
        "1 if it equals the row's reference answer (stripped, as evaluate's exact match); contains: 1 if it contains "
        "the reference answer (case-insensitive); regex: 1 if `pattern` matches it (re.search); length: minus the "
        "share by which it is longer than `max_chars` (or than the reference answer), 0 when not longer; python: "
        "`function`, a user reward (needs grpo.allow_code).")
    weight: float = Field(1.0, description="Its weight in the total reward.")
    json_schema: dict[str, Any] | str | None = Field(
        None, description="json_schema: a JSON Schema, inline or the path of a .json file.")
    pattern: str | None = Field(None, description="regex: the pattern.")
    max_chars: int | None = Field(None, gt=0, description="length: the length in characters beyond which an answer "
                                  "loses reward; null: the row's reference answer's length.")
    function: str | None = Field(
        None, description="python: 'package.module:name', called as TRL calls reward functions: "
        "name(prompts=..., completions=..., answer=..., **kwargs) -> list[float].")

    @model_validator(mode="after")
    def _has_what_its_type_needs(self) -> RewardSettings:
        needs = {"json_schema": "json_schema", "regex": "pattern", "python": "function"}.get(self.type)
        if needs and getattr(self, needs) is None:
            raise ValueError(f"a {self.type} reward needs `{needs}`")
        if self.type == "regex":
            try:
                re.compile(self.pattern)
            except re.error as err:
                raise ValueError(f"pattern {self.pattern!r} is not a regular expression: {err}") from None
        if self.type == "python" and ":" not in self.function:
            raise ValueError(f"function {self.function!r}: expected 'package.module:name'")
        return self


class GrpoSettings(TrainSettings):
    enabled: bool = Field(False, description="Run GRPO after SFT (stage grpo), instead of dpo: the model generates "
                          "answers to the SFT rows' prompts and learns from the rewards below.")
    learning_rate: float = Field(1e-4, gt=0, description="Peak learning rate (of the LoRA adapter).")
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = Field(
        "constant", description="How the learning rate decays after warm-up.")
    warmup_ratio: float = Field(0.0, ge=0.0, lt=1.0, description="Share of the steps spent warming the learning rate up.")
    batch_size: int = Field(8, gt=0, description="Answers per step (prompts times num_generations).")
    num_generations: int = Field(4, ge=2, description="Answers generated per prompt: GRPO scores each against the "
                                 "others of its group.")
    max_completion_length: int | None = Field(
        None, gt=0, description="Tokens generated per answer; null: twice the longest reference answer (at least 16).")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature of the generated answers.")
    beta: float = Field(0.04, ge=0, description="Weight of the KL penalty to the starting model (logged as kl); 0: none.")
    rewards: list[RewardSettings] = Field(
        default_factory=lambda: [RewardSettings(type="exact")],
        description="The rewards, weighted and summed (each also logged on its own).")
    allow_code: bool = Field(False, description="Allow `python` rewards: they import and run the named function.")
    logging_steps: int = Field(1, gt=0, description="Log the rewards, KL and answer lengths every N steps.")

    @model_validator(mode="after")
    def _checks(self) -> GrpoSettings:
        if self.batch_size % self.num_generations:
            raise ValueError(f"grpo.batch_size ({self.batch_size}) must be a multiple of grpo.num_generations "
                             f"({self.num_generations}): each step takes whole groups of answers")
        for i, reward in enumerate(self.rewards):
            if reward.type == "python" and not self.allow_code:
                raise ValueError(f"grpo.rewards.{i}.function {reward.function!r} runs code from the config: set "
                                 "grpo.allow_code: true to allow it")
        if not self.rewards:
            raise ValueError("grpo.rewards is empty: GRPO needs at least one reward")
        return self


class ClassificationSettings(Strict):
    """Sequence classification (task: classification): rows of text and label, a classification head on the model."""

    labels: list[str] | None = Field(
        None, min_length=2, description="The label names, in the order of the head's outputs; integer labels in the rows "
        "index into this list, string labels must be in it. null: the labels found in the training rows, sorted "
        "(numerically when they are all integers).")
    metric_for_best: Literal["accuracy", "macro_f1", "eval_loss"] = Field(
        "accuracy", description="Decides, after each epoch on the validation rows, which checkpoint is kept and when "
        "early stopping stops.")
    validation_fraction: float = Field(
        0.1, gt=0, lt=1, description="Share of the training rows held back to score each epoch (best checkpoint, early "
        "stopping); data-prep's held-out split stays unseen until evaluate.")

    @field_validator("labels")
    @classmethod
    def _distinct(cls, labels: list[str] | None) -> list[str] | None:
        if labels is not None and len(set(labels)) != len(labels):
            raise ValueError(f"labels must be distinct: {labels}")
        return labels


class MergeSettings(Strict):
    dtype: Literal["float32", "bfloat16", "float16"] = Field("bfloat16", description="dtype of the merged weights.")
    max_shard_size: str = Field("2GB", description="safetensors shard size.")
    tolerance: float = Field(
        1e-3, gt=0, description="Max abs logit difference between the merged and the adapter model, both in fp32."
    )


class LmEvalSettings(Strict):
    tasks: list[str] = Field(default_factory=list, description=(
        "lm-evaluation-harness tasks scored on the base model, the champion and the candidate (metrics "
        "lm_eval/TASK/METRIC, usable as registry.guards): names of its standard tasks, which fetch their datasets "
        "(on a cluster: arc_easy, hellaswag, mmlu, ...), or paths of task YAML files whose data_files are beside them."))
    limit: int | None = Field(None, gt=0, description="Examples per task; null: all of them.")
    batch_size: int = Field(8, gt=0, description="Requests per forward pass.")


class EvaluateSettings(Strict):
    max_new_tokens: int = Field(64, gt=0, description="Generation length limit for the eval tasks.")
    max_examples: int = Field(200, gt=0, description="Cap on held-out rows (pairs, tasks) scored per metric: beyond it "
                              "a fixed random sample of that many, the same in evaluate and serve-check (not the first "
                              "ones: a file sorted by label would be scored on one label).")
    samples: int = Field(8, ge=0, description="Sample generations shown side by side in the report.")
    batch_size: int = Field(8, gt=0, description="Rows per forward pass (held-out loss, preference accuracy).")
    generation_batch_size: int = Field(
        32, gt=0, description="Eval-task prompts generated together. Decoding a small model reads all its weights for "
        "every token whatever the batch, so larger batches cost little more per step (on 2 CPU cores, 40 prompts: "
        "about 3x faster in one batch than in five of 8).")
    lm_eval: LmEvalSettings = Field(default_factory=LmEvalSettings,
                                    description="General ability kept through fine-tuning, by lm-evaluation-harness.")


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
    # q4_k_m: 0.10 base, 0.11-0.21 after the quickstart); a broken conversion gives several nats. Top-1 agreement over
    # the probes' hundred-odd positions flips on near-ties: 0.74-0.85 for the quickstart's q4_k_m on two machines,
    # near 0 for a broken file.
    "q5_k_m": Tolerance(max_kl=0.25, min_argmax=0.6, min_top5=0.6),
    "q4_k_m": Tolerance(max_kl=0.35, min_argmax=0.6, min_top5=0.6),
}


GgufType = Literal["f16", "bf16", "q8_0", "q4_k_m", "q5_k_m", "q6_k"]


class ExportSettings(Strict):
    enabled: bool = Field(True, description="Write GGUF files of the merged model.")
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


class ServeCheckSettings(Strict):
    enabled: bool = Field(True, description="Serve each GGUF file with llama.cpp's server and ask it the eval tasks "
                          "(stage serve-check); needs export.enabled and data.eval_tasks.")
    min_agreement: dict[str, float] = Field(
        default_factory=lambda: {"exact_match": 0.8, "contains": 0.7, "rouge_l": 0.6},
        description="Per task metric (the `metric` an eval task names): the least mean ROUGE-L between the served "
                    "answers and the merged model's answers to the same tasks.")
    max_score_drop: dict[str, float] = Field(
        default_factory=lambda: {"exact_match": 0.15, "contains": 0.15, "rouge_l": 0.15},
        description="Per task metric: how far the served task score may fall below the merged model's.")
    context_length: int = Field(2048, gt=0, description="The server's context window (n_ctx).")
    timeout_seconds: float = Field(120, gt=0, description="How long the server may take to start, and each request.")

    @field_validator("min_agreement", "max_score_drop")
    @classmethod
    def _known_metrics(cls, value: dict[str, float]) -> dict[str, float]:
        unknown = sorted(set(value) - {"exact_match", "contains", "rouge_l"})
        if unknown:
            raise ValueError(f"unknown task metric(s) {unknown}; metrics are exact_match, contains, rouge_l")
        if any(not 0 <= v <= 1 for v in value.values()):
            raise ValueError("values are shares between 0 and 1")
        return value


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


# The sections a sweep may vary: those of the stages each trial runs (its own sft, dpo or grpo, and merge).
SWEEPABLE = ("sft", "dpo", "grpo", "merge")


class SweepSettings(Strict):
    parameters: dict[str, list[Any]] = Field(
        default_factory=dict, description="Config keys (sft.*, dpo.*, grpo.*, merge.*) and the values to try, e.g. "
        "{sft.learning_rate: [1e-4, 3e-4], sft.lora.r: [8, 16]}. Empty: no sweep. Each trial trains, merges and "
        "evaluates on the same eval split; the best goes on to export and register.")
    method: Literal["grid", "random"] = Field(
        "grid", description="grid: every combination; random: `trials` combinations drawn with `seed`.")
    trials: int | None = Field(None, gt=0, description="random: how many combinations; grid: at most this many "
                               "(an error if the grid is larger). null: the whole grid.")
    seed: int = Field(0, description="The seed of random's draw.")
    parallelism: int = Field(2, gt=0, description="Trials running at once on a cluster (kfp.local runs them one after "
                             "another).")
    metric: str | None = Field(None, description="The evaluate metric that picks the winner; null: "
                               "registry.primary_metric (eval_loss and perplexity: lower is better).")

    @field_validator("parameters")
    @classmethod
    def _sweepable_keys(cls, parameters: dict[str, list[Any]]) -> dict[str, list[Any]]:
        for key, values in parameters.items():
            if key.split(".")[0] not in SWEEPABLE:
                raise ValueError(f"{key}: a sweep varies the keys of the stages each trial runs ("
                                 f"{', '.join(s + '.*' for s in SWEEPABLE)}); data and evaluation stay the same for all")
            if not values:
                raise ValueError(f"{key}: no values to try")
        return parameters

    def combinations(self) -> list[dict[str, Any]]:
        """Each trial's overrides, in a fixed order."""
        import itertools
        import random

        keys = list(self.parameters)
        grid = [dict(zip(keys, values, strict=True)) for values in itertools.product(*self.parameters.values())]
        if self.method == "random":
            return random.Random(self.seed).sample(grid, min(self.trials or len(grid), len(grid)))
        if self.trials is not None and len(grid) > self.trials:
            raise ValueError(f"the grid has {len(grid)} trials, more than sweep.trials ({self.trials}): raise it, or "
                             "set sweep.method: random to draw that many")
        return grid


def with_overrides(config: Config, overrides: dict[str, Any]) -> Config:
    """The config with dotted keys set to values (a sweep trial's), validated again."""
    raw = config.model_dump(mode="json", exclude_defaults=True)
    for key, value in overrides.items():
        node = raw
        *sections, last = key.split(".")
        for section in sections:
            node = node.setdefault(section, {})
        node[last] = value
    raw.pop("sweep", None)  # a trial is one run, not a sweep of its own
    return Config.model_validate(raw)


CLASSIFICATION_METRICS = ("accuracy", "macro_f1", "eval_loss")
NO_GGUF_FOR_CLASSIFIERS = ("task classification: llama.cpp and Ollama run generative models, and its GGUF converter has "
                           "no sequence-classification head for these architectures; serve the merged model with "
                           "transformers (the registered version's source)")


class RegistrySettings(Strict):
    enabled: bool = Field(True, description="Register the candidate in the MLflow Model Registry.")
    model_name: str | None = Field(None, description="Registered model name; null: the run name.")
    primary_metric: str = Field("task_score", description="Evaluation metric that decides promotion (without "
                                "data.eval_tasks: eval_loss unless set; task classification: accuracy unless set, also "
                                "macro_f1 or eval_loss).")
    min_improvement: float = Field(0.0, ge=0, description="How much the candidate must beat base and champion by.")
    confidence: float = Field(
        0.95, ge=0, lt=1, description="A win must be larger than the noise of the eval split: the gain's confidence "
        "interval at this level, from the item-by-item differences (held-out rows, pairs or tasks) between the "
        "candidate and the model it is compared with on the same items, must clear min_improvement. 0: the means "
        "alone decide.")
    guards: dict[str, float] = Field(
        default_factory=lambda: {"eval_loss": 0.05},
        description="Metric -> the regression allowed against base and champion (absolute units).",
    )
    approval: Literal["auto", "manual"] = Field(
        "auto", description="auto: a candidate that passes the gate becomes champion; manual: it gets the alias "
        "approved-pending, and `tuneforge promote NAME VERSION` (a person's approval) makes it champion.")


class StageResources(Strict):
    cpu: str | None = Field(None, description="CPU request and limit, Kubernetes units; null: sized from the model "
                            "(2, or 8 for a stage on a GPU).")
    memory: str | None = Field(None, description="Memory request and limit, Kubernetes units; null: sized from the "
                               "model (`tuneforge plan` shows the sizes and why; at least 8Gi).")
    gpus: int | None = Field(None, ge=0, description="GPUs for the stage; null: sized from the model (training stages "
                             "get one when the method needs CUDA or the model is over 1B parameters).")
    gpu_type: str = Field("nvidia.com/gpu", description="Accelerator resource name.")
    timeout_seconds: int = Field(6 * 3600, gt=0, description="The stage's task is stopped after this long.")
    retry_backoff_seconds: int = Field(30, ge=0, description="Wait before the first retry; doubled for each next one.")
    retries: int | None = Field(
        None, ge=0, description="Retries of a failed stage on a cluster, with exponential backoff; a user error (exit 2) "
        "is never retried. null: 2 for training stages (a retry resumes from the S3 checkpoint mirror) and 1 for the "
        "others on a cluster, 0 for `tuneforge run`, where a retry only waits.")


class ClusterSettings(Strict):
    """How the stages run on Kubernetes (ignored by local runs)."""

    resources: dict[Literal[("default", *stages.NAMES)], StageResources] = Field(
        default_factory=dict,
        description="Per-stage resources; what a stage does not set comes from `default`, and what neither sets is "
        "sized from the model. `tuneforge compile` refuses values below what a stage needs (--force overrides).",
    )
    gpu_memory_label: str | None = Field(
        "nvidia.com/gpu.memory", description="Node label with each node's GPU memory in MiB (NVIDIA GPU Feature "
        "Discovery sets it): a stage on a GPU is scheduled only where the GPU holds what the plan needs. null: no such "
        "constraint (clusters without the label).")
    s3_secret: str | None = Field(
        "tuneforge-s3", description="Kubernetes Secret with AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL."
    )
    mlflow_secret: str | None = Field(
        "tuneforge-mlflow", description="Kubernetes Secret with MLFLOW_TRACKING_URI and, for a server with "
        "authentication, MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (the pipeline identity's).",
    )
    model_cache_pvc: str | None = Field(None, description="PVC mounted at /cache for base models (TUNEFORGE_CACHE).")
    gpu_node_selector: dict[str, str] = Field(default_factory=dict, description="Node labels for GPU stages.")
    gpu_tolerations: list[dict[str, str]] = Field(
        default_factory=lambda: [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        description="Kubernetes tolerations for GPU stages (GPU nodes are usually tainted).",
    )
    shm_size: str = Field("8Gi", description="Size of the /dev/shm emptyDir (PyTorch data loaders need it).")

    def for_stage(self, stage: str) -> StageResources:
        """The stage's entry, its unset cpu, memory and gpus taken from `default` (None where neither sets them)."""
        default = self.resources.get("default", StageResources())
        own = self.resources.get(stage, default)
        return own.model_copy(update={key: getattr(default, key) for key in ("cpu", "memory", "gpus")
                                      if getattr(own, key) is None})


class TrackingSettings(Strict):
    uri: str | None = Field(
        None, description="MLflow tracking URI; null: $MLFLOW_TRACKING_URI, else sqlite in the work dir."
    )
    experiment: str = Field("tuneforge", description="MLflow experiment the runs are logged under.")
    retry_seconds: float = Field(
        120, ge=0, description="How long a stage waits for an unreachable MLflow server before it goes on without it "
        "(at its start it then fails, before any work; later it finishes and reports what could not be logged)."
    )


class Config(Strict):
    name: str = Field(description="Run name; also the registered model name later.")
    task: Literal["generation", "classification"] = Field(
        "generation", description="generation: a chat or completion model (sft, then dpo or grpo); classification: a "
        "sequence classifier trained by the sft stage on rows of text and label (full or LoRA with the head trained), "
        "scored by accuracy and macro-F1; no GGUF export (llama.cpp runs generative models).")
    workdir: str = Field("runs", description="Where local runs, caches and the embedded MLflow store live.")
    base_model: BaseModelSettings = Field(description="The model to fine-tune.")
    data: DataSettings = Field(description="Training data, eval tasks and how rows are rendered (stage data-prep).")
    sft: SftSettings = Field(default_factory=SftSettings, description="Supervised fine-tuning (stage sft).")
    dpo: DpoSettings = Field(default_factory=lambda: DpoSettings(enabled=False),
                             description="Preference tuning after SFT (stage dpo); off unless enabled.")
    grpo: GrpoSettings = Field(default_factory=GrpoSettings,
                               description="GRPO with verifiable rewards after SFT (stage grpo); off unless enabled.")
    merge: MergeSettings = Field(default_factory=MergeSettings, description="Folding the adapter in (stage merge).")
    evaluate: EvaluateSettings = Field(default_factory=EvaluateSettings,
                                       description="Scoring base and candidate (stage evaluate).")
    export: ExportSettings = Field(default_factory=ExportSettings, description="GGUF files (stage export-gguf).")
    serve_check: ServeCheckSettings = Field(default_factory=ServeCheckSettings,
                                            description="The GGUF files served and asked the eval tasks (stage serve-check).")
    storage: StorageSettings = Field(default_factory=StorageSettings, description="Where stage outputs are published.")
    registry: RegistrySettings = Field(default_factory=RegistrySettings,
                                       description="Registration and promotion (stage register).")
    cluster: ClusterSettings = Field(default_factory=ClusterSettings, description="Pods on Kubernetes.")
    tracking: TrackingSettings = Field(default_factory=TrackingSettings, description="MLflow tracking.")
    sweep: SweepSettings = Field(default_factory=SweepSettings,
                                 description="Several trials of the training stages; the best one is registered.")
    classification: ClassificationSettings = Field(default_factory=ClassificationSettings,
                                                   description="Labels and checkpoint choice for task: classification.")

    @model_validator(mode="after")
    def _check_combinations(self) -> Config:
        if self.sft.method == "qlora" and self.sft.precision == "fp16":
            raise ValueError("sft.precision: fp16 with qlora is unstable; use bf16 or auto")
        if self.task == "classification":
            self._check_classification()
        elif not self.data.eval_tasks and self.registry.primary_metric.startswith("task_"):
            if "primary_metric" in self.registry.model_fields_set:
                raise ValueError(f"registry.primary_metric {self.registry.primary_metric!r} scores the answers to "
                                 "data.eval_tasks, and there are none: set data.eval_tasks to a file of tasks, or "
                                 "registry.primary_metric: eval_loss")
            self.registry.primary_metric = "eval_loss"  # what held-out rows give without eval tasks
        if self.dpo.enabled and self.grpo.enabled:
            raise ValueError("dpo.enabled and grpo.enabled: a pipeline runs one of them after sft; run GRPO in a second "
                             "pipeline whose base_model is the first one's merged model")
        if self.sweep.parameters:
            for trial in self.sweep.combinations():
                try:
                    with_overrides(self, trial)
                except ValidationError as err:
                    raise ValueError(f"sweep trial {trial}: {_describe(err.errors()[0])}") from None
        for stage in stages.TRAINING:
            settings: TrainSettings = getattr(self, stage)
            if settings.distributed.nodes > 1 and not self.storage.uri:
                raise ValueError(f"{stage}.distributed.nodes > 1 needs storage.uri: the nodes exchange inputs "
                                 "and outputs through S3")
            if settings.distributed.nodes > 1 and settings.backend == "unsloth":
                raise ValueError(f"{stage}.backend: unsloth trains on one GPU; set {stage}.backend: hf for several nodes")
        return self

    def _check_classification(self) -> None:
        for stage in ("dpo", "grpo"):
            if getattr(self, stage).enabled:
                raise ValueError(f"{stage}.enabled: task classification trains a classifier in the sft stage; set "
                                 f"{stage}.enabled: false")
        if not self.sft.enabled:
            raise ValueError("sft.enabled: false: task classification trains the classifier in the sft stage")
        if self.sft.method == "qlora":
            raise ValueError("sft.method qlora: task classification trains full or lora (the head is trained in full "
                             "either way)")
        if self.sft.packing or self.sft.batching == "padding_free":
            raise ValueError("sft.packing / sft.batching padding_free: a classifier scores each row at its last "
                             "token, so rows are never packed; use sft.batching auto, padded or grouped")
        if self.sft.backend == "unsloth":
            raise ValueError("sft.backend unsloth: task classification trains on the hf backend")
        if self.data.eval_tasks:
            raise ValueError("data.eval_tasks: generation tasks; task classification is evaluated on held-out labelled "
                             "rows (data.eval_fraction, or a source with split: eval)")
        if self.sft.distributed.nodes > 1 or self.sft.distributed.processes not in ("auto", 1):
            raise ValueError("sft.distributed: task classification trains in one process")
        if "primary_metric" not in self.registry.model_fields_set:
            self.registry.primary_metric = "accuracy"
        if self.registry.primary_metric not in CLASSIFICATION_METRICS:
            raise ValueError(f"registry.primary_metric {self.registry.primary_metric!r}: task classification is scored "
                             f"by {', '.join(CLASSIFICATION_METRICS)}")
        unknown = sorted(set(self.registry.guards) - set(CLASSIFICATION_METRICS))
        if unknown:
            raise ValueError(f"registry.guards {unknown}: task classification is scored by "
                             f"{', '.join(CLASSIFICATION_METRICS)}")

    @property
    def early_stopping_patience(self) -> int | None:
        """sft's early stopping: sft.early_stopping_patience; a classifier always stops early (2 epochs when unset)."""
        return self.sft.early_stopping_patience or (2 if self.task == "classification" else None)

    @property
    def exports_gguf(self) -> bool:
        """Whether the pipeline exports GGUF files (export-gguf): not for a classifier, see NO_GGUF_FOR_CLASSIFIERS."""
        return self.export.enabled and self.task == "generation"

    def hash(self) -> str:
        return hashlib.sha256(json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()[:16]

    def view(self, stage: str, with_cluster: bool = False) -> Config:
        """The config as `stage` sees it: the sections it reads (stages.py), every other one at its default. A stage's
        task gets this view, so its cache key changes only when something the stage reads does (`dpo.beta` reruns dpo
        and what follows, not data-prep and sft). `with_cluster` keeps the cluster section, for a stage whose task
        starts a Kubeflow Trainer job."""
        reads = (*stages.COMMON_SECTIONS, *stages.get(stage).reads, *(("cluster",) if with_cluster else ()))
        full = self.model_dump(mode="json")
        view: dict[str, Any] = {}
        for read in reads:
            section, _, key = read.partition(".")
            if key:  # one key of a section: the section's other keys keep their defaults
                view.setdefault(section, {})[key] = full[section][key]
            else:
                view[section] = full[section]
        return Config.model_validate(view)

    def to_json(self) -> str:
        """One line, keys sorted, only what differs from the defaults (KFP writes parameter defaults into YAML)."""
        return json.dumps(self.model_dump(mode="json", exclude_defaults=True), sort_keys=True)


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
    # Checked on the whole config only: a stage's view (Config.view) keeps the sft section and not dpo's.
    if not config.sft.enabled and not (config.grpo.enabled or (config.dpo.enabled and not config.dpo.needs_reference)):
        raise ConfigError(f"{path}: invalid config:\n  - sft.enabled: false leaves only a reference-free method to train "
                          "from the base model: set dpo.enabled with dpo.method orpo, simpo or cpo (dpo and kto score "
                          "against the SFT model), or grpo.enabled")
    # Relative data paths are relative to the config file, so examples run from any directory.
    base = path.resolve().parent
    for source in config.data.sources:
        source.path = _resolve_relative(source.path, base)
    if config.data.eval_tasks:
        config.data.eval_tasks = _resolve_relative(config.data.eval_tasks, base)
    config.evaluate.lm_eval.tasks = [_resolve_relative(t, base) if t.endswith((".yaml", ".yml")) else t
                                     for t in config.evaluate.lm_eval.tasks]
    if (base / config.base_model.source).exists():
        config.base_model.source = str((base / config.base_model.source).resolve())
    return config


def _resolve_relative(value: str, base: Path) -> str:
    if "://" in value or Path(value).is_absolute():
        return value
    return str((base / value).resolve())
