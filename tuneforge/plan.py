"""Memory and cost before a run: for each training stage, the GPU memory it needs (weights by precision and
quantisation, the trainable parameters' gradients and optimizer state, activations by batch and length with or without
gradient checkpointing, and the framework's overhead), whether that fits a GPU type, and the GPU-hours.

The estimate follows what the stages do: full and LoRA training load the weights in fp32 (bf16 autocast computes),
QLoRA loads the linear layers in 4-bit NF4 with double quantisation and the rest in the compute dtype; gradients and
AdamW state are fp32 for the trainable parameters (paged 8-bit AdamW, 2 bytes a parameter, for QLoRA on a GPU); DPO
runs the chosen and the rejected answer of each pair, and its reference forward stores nothing for backward.
Activations count the tensors a decoder layer keeps for backward, in bf16; with gradient checkpointing, only each
layer's input and one layer's full set. The model's shape comes from its config.json, or, for a Hub id that cannot be
read here, from a table of well-known models.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuneforge import models
from tuneforge.config import Config, TrainSettings
from tuneforge.errors import ConfigError

GIB = 2**30
# Shapes of well-known models (their config.json), for a plan without the Hub: hidden, layers, heads, kv heads,
# head dim, MLP width, vocabulary, tied embeddings.
KNOWN_SHAPES = {
    "meta-llama/llama-3.1-8b": (4096, 32, 32, 8, 128, 14336, 128256, False),
    "meta-llama/llama-3.2-1b": (2048, 16, 32, 8, 64, 8192, 128256, True),
    "meta-llama/llama-3.2-3b": (3072, 28, 24, 8, 128, 8192, 128256, True),
    "mistralai/mistral-7b-v0.3": (4096, 32, 32, 8, 128, 14336, 32768, False),
    "qwen/qwen2.5-0.5b": (896, 24, 14, 2, 64, 4864, 151936, True),
    "qwen/qwen2.5-1.5b": (1536, 28, 12, 2, 128, 8960, 151936, True),
    "qwen/qwen2.5-7b": (3584, 28, 28, 4, 128, 18944, 152064, False),
    "google/gemma-3-1b": (1152, 26, 4, 1, 256, 6912, 262144, True),
    models.GEMMA3: (640, 18, 4, 1, 256, 2048, 262144, True),
    models.SMOLLM2: (576, 30, 9, 3, 64, 1536, 49152, True),
}
# TRL scores the labelled positions in chunks (tuneforge's stages run that path on the CPU too), so at most this many
# positions' logits exist at once; a plain recipe materialises them all.
LM_HEAD_CHUNK = 1024
# GPU -> (memory GiB, dense bf16 TFLOP/s). Memory usable by a process is a little less than the card's.
GPUS = {"T4": (15, 65), "L4": (22, 121), "A10G": (22, 70), "A100-40GB": (39, 312), "A100-80GB": (79, 312),
        "H100-80GB": (79, 989), "H200": (139, 989)}
# The share of the bf16 peak a fine-tuning step reaches (what the CPU benchmark measures for tuneforge's sft, about
# 0.5 of the matmul peak, less what a GPU loses to kernels that are not matmuls). An assumption until GPU figures exist.
MODEL_FLOPS_UTILISATION = 0.4
OVERHEAD_GIB = 1.0  # CUDA context, cuBLAS workspaces, the allocator's slack
LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Shape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    mlp: int
    vocab: int
    tied: bool

    @property
    def linear(self) -> dict[str, tuple[int, int]]:
        """The decoder layer's linear modules, (in, out)."""
        h, q, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, self.mlp), "up_proj": (h, self.mlp), "down_proj": (self.mlp, h)}

    @property
    def linear_parameters(self) -> int:
        return self.layers * sum(a * b for a, b in self.linear.values())

    @property
    def embedding_parameters(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied else 2)

    @property
    def parameters(self) -> int:
        return self.linear_parameters + self.embedding_parameters + self.layers * 2 * self.hidden


def shape_of(config: Config) -> Shape:
    source = config.base_model.source
    # The tiny built-ins are built here in seconds; the plan reads their config.json like a local model's.
    folder = Path(models.resolve(config.base_model)) if source in models.TINY else Path(source)
    if (folder / "config.json").exists():
        raw = json.loads((folder / "config.json").read_text())
        raw = {**raw, **raw.get("text_config", {})}
        heads = raw["num_attention_heads"]
        return Shape(raw["hidden_size"], raw["num_hidden_layers"], heads, raw.get("num_key_value_heads", heads),
                     raw.get("head_dim") or raw["hidden_size"] // heads, raw["intermediate_size"], raw["vocab_size"],
                     bool(raw.get("tie_word_embeddings", False)))
    for key in (source.lower(), source.lower().removesuffix("-instruct").removesuffix("-it")):
        if key in KNOWN_SHAPES:
            return Shape(*KNOWN_SHAPES[key])
    raise ConfigError(f"base_model.source {source!r}: the plan needs the model's config.json (a local model directory) "
                      f"or one of the shapes it knows: {', '.join(sorted(KNOWN_SHAPES))}")


def trainable(shape: Shape, settings: TrainSettings, method: str) -> int:
    if method == "full":
        return shape.parameters
    modules = settings.lora.target_modules
    names = LORA_MODULES if modules in ("auto", "all-linear") else [m for m in modules if m in shape.linear]
    return shape.layers * sum(settings.lora.r * (shape.linear[m][0] + shape.linear[m][1]) for m in names)


def activation_bytes(shape: Shape, tokens: int, checkpointing: bool, element: int = 2, dropout_inputs: int = 0) -> float:
    """What the decoder keeps for backward, `element` bytes a value (bf16 on a GPU, fp32 on most CPUs): per token and
    layer, the norms' inputs and outputs, q, k, v, the attention output, the MLP's four intermediate tensors (SDPA keeps
    no score matrix), and `dropout_inputs` values that LoRA dropout copies (each adapted module's input, dropped out)."""
    per_layer = (4 * shape.hidden + (2 * shape.heads + 2 * shape.kv_heads) * shape.head_dim + 4 * shape.mlp
                 + dropout_inputs) * element
    if checkpointing:
        return tokens * (shape.layers * shape.hidden * element + per_layer)
    return tokens * shape.layers * per_layer


def _dropout_inputs(shape: Shape, settings: TrainSettings, method: str) -> int:
    if method == "full" or not settings.lora.dropout:
        return 0
    modules = settings.lora.target_modules
    names = LORA_MODULES if modules in ("auto", "all-linear") else [m for m in modules if m in shape.linear]
    return sum(shape.linear[m][0] for m in names)


def stage_memory(config: Config, stage: str, gpu: bool = True, chunked_head: bool = True) -> dict[str, float]:
    """GiB a training stage needs, by part. `chunked_head` False: the logits of every position at once, as the plain
    TRL/PEFT recipe computes them (bf16, and fp32 for the loss)."""
    shape = shape_of(config)
    settings = getattr(config, stage)
    method = config.sft.method if stage == "sft" else "lora"
    quantized = config.sft.method == "qlora"  # dpo and grpo reload the base as sft trained it
    if quantized:
        weights = shape.linear_parameters * 0.516 + (shape.parameters - shape.linear_parameters) * 2
    else:
        weights = shape.parameters * 4
    if stage in ("dpo", "grpo") and config.sft.method == "full":
        weights = shape.parameters * 4  # the full SFT model, a new adapter on top
    train = trainable(shape, settings, method)
    optimizer = 2 if quantized and gpu else 8  # paged 8-bit AdamW for QLoRA on a GPU
    tokens = settings.batch_size * config.data.max_length * (2 if stage == "dpo" else 1)
    parts = {
        "weights": weights / GIB,
        "gradients and optimizer": train * (4 + optimizer) / GIB,
        "activations": activation_bytes(shape, tokens, settings.gradient_checkpointing, 2 if gpu else 4,
                                        _dropout_inputs(shape, settings, method)) / GIB,
        # the logits and their fp32 log-softmax: bf16 plus fp32 on a GPU, fp32 twice on a CPU
        "logits": (min(tokens, LM_HEAD_CHUNK) if chunked_head else tokens) * shape.vocab * (6 if gpu else 8) / GIB,
        "overhead": OVERHEAD_GIB if gpu else 0.0,
    }
    parts["total"] = sum(parts.values())
    return {k: round(v, 2) for k, v in parts.items()} | {"parameters": shape.parameters, "trainable": train}


def tokens_to_train(config: Config, stage: str) -> int:
    """How many tokens the stage trains on: its steps times the batch times the rows' length (max_length: an upper
    bound, the rows are usually shorter)."""
    settings = getattr(config, stage)
    per_step = settings.batch_size * settings.grad_accum * config.data.max_length * (2 if stage == "dpo" else 1)
    if settings.max_steps > 0:
        return settings.max_steps * per_step
    rows = sum(_rows(source.path) for source in config.data.sources)
    return int(math.ceil(rows * settings.epochs) * config.data.max_length * (2 if stage == "dpo" else 1))


def _rows(path: str) -> int:
    try:
        return sum(1 for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip())
    except OSError:
        return 10_000  # not readable from here (S3, say): a guess, said in the plan


def plan(config: Config, gpu_type: str | None = None) -> dict[str, Any]:
    """For each training stage: memory by part, whether it fits each GPU (or the one asked for), GPU-hours."""
    gpus = {gpu_type: GPUS[gpu_type]} if gpu_type else GPUS
    found: dict[str, Any] = {"model": config.base_model.source, "stages": {}}
    for stage in ("sft", "dpo", "grpo"):
        if not getattr(config, stage).enabled:
            continue
        memory = stage_memory(config, stage)
        method = config.sft.method if stage == "sft" else "lora"
        flops_per_token = 6 * memory["parameters"] if method == "full" else 4 * memory["parameters"] + 6 * memory["trainable"]
        tokens = tokens_to_train(config, stage)
        found["stages"][stage] = {
            "method": method, "memory_gib": memory, "tokens": tokens,
            "gpus": {name: {"fits": memory["total"] <= size,
                            "hours": round(tokens * flops_per_token / (MODEL_FLOPS_UTILISATION * tflops * 1e12) / 3600, 3)}
                     for name, (size, tflops) in gpus.items()},
        }
    return found
