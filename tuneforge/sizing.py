"""A stage's pod on a cluster, sized from the model when the config leaves `cluster.resources` unset, and the check
that refuses explicit resources below what the stage needs.

Training stages get a GPU when the method needs CUDA (QLoRA's 4-bit weights, Unsloth) or the model is too large to
train on CPUs in reasonable time; the GPU must hold `tuneforge plan`'s estimate with a margin. Their pod's memory
holds the checkpoint while it loads (GPU) or the whole CPU plan. merge, evaluate and export-gguf load the model in fp32
(their checks compare logits in full precision), so their memory holds it in fp32; serve-check holds a GGUF file in
llama.cpp. Explicit values always win.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from tuneforge import plan, stages
from tuneforge.config import Config
from tuneforge.errors import ConfigError

# What the plan does not model (allocator caches, backward's temporaries, fragmentation). On this project's CPU
# benchmark the plan at data.max_length was 1.39x the measured peak and at the real row length 0.67x.
MARGIN = 1.25
RUNTIME_GIB = 2.0  # the interpreter, torch, transformers, the tokenizer and the data
MIN_MEMORY_GIB = 8  # never below what every stage got before sizing existed
# Above this, a CPU step of a full or LoRA fine-tune takes minutes; such models train on a GPU.
CPU_TRAINING_MAX_PARAMETERS = 1_000_000_000
# A GPU stage feeds the GPU (tokenizing, collating); a stage that runs a model over 1B parameters on CPUs uses them.
CPU_STAGE_CPUS, GPU_STAGE_CPUS = "2", "8"
HOLDS_THE_MODEL = ("merge", "evaluate", "export-gguf", "serve-check")


@dataclass(frozen=True)
class Sized:
    cpu: str
    memory: str
    gpus: int
    gpu_memory_gib: float | None  # what each GPU must hold: the plan with the margin (None: no GPU, or not sized)
    reasons: dict[str, str]  # "gpus", "memory", "cpu" -> why

    @property
    def why(self) -> str:
        return "; ".join(self.reasons.values())


def _gib(quantity: str) -> float:
    """A Kubernetes memory quantity in GiB."""
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
    for unit in sorted(units, key=len, reverse=True):
        if quantity.endswith(unit):
            return float(quantity[: -len(unit)]) * units[unit] / 2**30
    return float(quantity) / 2**30


def _quantity(gib: float) -> str:
    """Whole GiB, rounded up to a multiple of 4 (pods of odd sizes pack nodes badly)."""
    return f"{max(MIN_MEMORY_GIB, 4 * math.ceil(gib / 4))}Gi"


def needs_gpu(config: Config, stage: str, parameters: int) -> str | None:
    """Why a training stage must run on a GPU, or None when a CPU will do."""
    if config.sft.method == "qlora":
        return "QLoRA's 4-bit weights need CUDA" if stage == "sft" else "its base is sft's 4-bit model, which needs CUDA"
    if stage == "sft" and config.sft.backend == "unsloth":
        return "sft.backend unsloth needs CUDA"
    if parameters > CPU_TRAINING_MAX_PARAMETERS:
        return f"{parameters / 1e9:.2f}B parameters train too slowly on CPUs"
    return None


def needed(config: Config, stage: str) -> Sized:
    """What the stage needs, from the model's shape (raises ConfigError when the shape is unknown)."""
    if stage not in stages.TRAINING and stage not in HOLDS_THE_MODEL:
        return Sized(CPU_STAGE_CPUS, _quantity(0), 0, None, {"memory": "no model in memory"})
    shape = plan.shape_of(config)
    billions = f"{shape.parameters / 1e9:.2f}B"
    if stage in stages.TRAINING:
        gpu_reason = needs_gpu(config, stage, shape.parameters)
        if gpu_reason:
            gpu = plan.stage_memory(config, stage)["total"] * MARGIN
            # The weights pass through host memory as they load: bf16 shards quantised on the way (QLoRA), or the
            # fp32 model the stage trains.
            dtype, size = ("bf16", 2) if config.sft.method == "qlora" else ("fp32", 4)
            host = shape.parameters * size / plan.GIB * MARGIN + RUNTIME_GIB
            spread = getattr(config, stage).distributed.processes
            gpus = spread if isinstance(spread, int) else 1
            return Sized(GPU_STAGE_CPUS, _quantity(host), gpus, round(gpu, 1), {
                "gpus": f"{gpu_reason}: {gpus} GPU with at least {gpu:.1f} GiB (the plan's {gpu / MARGIN:.1f} GiB "
                        f"x {MARGIN})",
                "memory": f"memory for the {billions}-parameter model in {dtype} while it loads, x {MARGIN} + "
                          f"{RUNTIME_GIB:g} GiB"})
        host = plan.stage_memory(config, stage, gpu=False)["total"] * MARGIN + RUNTIME_GIB
        method = config.sft.method if stage == "sft" else "lora"
        return Sized(CPU_STAGE_CPUS, _quantity(host), 0, None, {
            "gpus": f"{billions} parameters, {method}: CPUs will do",
            "memory": f"memory: the CPU plan at data.max_length x {MARGIN} + {RUNTIME_GIB:g} GiB"})
    large = shape.parameters > CPU_TRAINING_MAX_PARAMETERS
    if stage == "serve-check":  # llama.cpp holds one GGUF file at a time: at most 2 bytes a weight (f16)
        host = shape.parameters * 2 / plan.GIB * MARGIN + RUNTIME_GIB
        reasons = {"memory": f"the {billions}-parameter model as a GGUF file in llama.cpp (f16 at most), x {MARGIN} + "
                             f"{RUNTIME_GIB:g} GiB"}
    else:
        host = shape.parameters * 4 / plan.GIB * MARGIN + RUNTIME_GIB
        reasons = {"memory": f"the {billions}-parameter model in fp32, x {MARGIN} + {RUNTIME_GIB:g} GiB"}
    if large:
        reasons["cpu"] = "8 CPUs: it runs the model on CPUs"
    return Sized(GPU_STAGE_CPUS if large else CPU_STAGE_CPUS, _quantity(host), 0, None, reasons)


def resolve(config: Config, stage: str, size: bool = True) -> Sized:
    """The stage's resources: explicit values from cluster.resources, the rest sized from the model (`size` False:
    the fixed defaults, for local runs where the cluster's sizes do not apply)."""
    explicit = config.cluster.for_stage(stage)
    if not size:
        return Sized(explicit.cpu or CPU_STAGE_CPUS, explicit.memory or _quantity(0), explicit.gpus or 0, None,
                     {"memory": "not sized (a local run)"})
    try:
        auto = needed(config, stage)
    except ConfigError as exc:
        if explicit.cpu is not None and explicit.memory is not None and explicit.gpus is not None:
            return Sized(explicit.cpu, explicit.memory, explicit.gpus, None,
                         {"memory": f"cluster.resources as set (not checked: {exc})"})
        raise ConfigError(f"cannot size cluster.resources.{stage}: {exc}. Set cluster.resources.{stage}.gpus, .memory "
                          "and .cpu (or cluster.resources.default)") from None
    gpus = auto.gpus if explicit.gpus is None else explicit.gpus
    taken = [key for key in ("cpu", "memory", "gpus") if getattr(explicit, key) is not None]
    reasons = dict(auto.reasons)
    if taken:
        reasons["explicit"] = f"{', '.join(taken)} as set in cluster.resources"
    return Sized(explicit.cpu or auto.cpu, explicit.memory or auto.memory, gpus,
                 auto.gpu_memory_gib if gpus else None, reasons)


def pipeline_stages(config: Config) -> list[str]:
    skipped = {"sft": not config.sft.enabled, "dpo": not config.dpo.enabled, "grpo": not config.grpo.enabled,
               "export-gguf": not config.exports_gguf,
               "serve-check": not (config.exports_gguf and config.serve_check.enabled and config.data.eval_tasks),
               "register": not config.registry.enabled}
    return [name for name in stages.NAMES if not skipped.get(name)]


def refusals(config: Config) -> list[str]:
    """Each explicit value below what its stage needs, naming the stage, what was asked, what is needed and the key."""
    found = []
    for stage in pipeline_stages(config):
        explicit = config.cluster.for_stage(stage)
        if explicit.gpus is None and explicit.memory is None:
            continue
        try:
            auto = needed(config, stage)
        except ConfigError:
            continue  # nothing to check against; resolve says what to set when something is left to size
        key = f"cluster.resources.{stage}"
        if explicit.gpus == 0 and auto.gpus:
            found.append(f"{stage} asks for 0 GPUs ({key}.gpus, or cluster.resources.default) and needs "
                         f"{auto.gpus}: {auto.reasons['gpus']}; set {key}.gpus: {auto.gpus} (or leave it out to "
                         "size it from the model)")
        if explicit.memory is not None and _gib(explicit.memory) < _gib(auto.memory):
            found.append(f"{stage} asks for memory {explicit.memory} ({key}.memory, or cluster.resources.default) "
                         f"and needs {auto.memory}: {auto.reasons['memory']}; set {key}.memory: {auto.memory} "
                         "(or leave it out to size it from the model)")
    return found
