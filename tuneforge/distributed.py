"""Training on several processes of one node: the sft and dpo stages start themselves again under torchrun, one
process per GPU (or as many CPU processes as asked for), with DDP, FSDP or DeepSpeed ZeRO-3 set up by the
Trainer from `STAGE.distributed`. Several nodes are Kubeflow Trainer's job (tuneforge/pipelines/trainjob.py); its
pods start the same stage under torchrun, so the code below is what runs there too.
"""

from __future__ import annotations

import copy
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from tuneforge import storage
from tuneforge.config import Config, TrainSettings
from tuneforge.errors import LaunchError, SetupError

log = logging.getLogger(__name__)


def processes_per_node(settings: TrainSettings) -> int:
    wanted = settings.distributed.processes
    if wanted == "auto":
        return max(torch.cuda.device_count(), 1)
    return wanted


def launched() -> bool:
    """Whether this process was started by torchrun (or a Kubeflow Trainer pod, which runs torchrun)."""
    return "LOCAL_RANK" in os.environ


def needs_launch(settings: TrainSettings) -> bool:
    return not launched() and processes_per_node(settings) > 1


def world_size() -> int:
    """Processes training this stage together (1 outside torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def launch(stage: str, config: Config, inputs: dict[str, Path], output: Path) -> dict[str, Any]:
    """Run the stage under torchrun on this node and return the main process's result (from its manifest)."""
    settings = getattr(config, stage)
    count = processes_per_node(settings)
    check_strategy(settings)
    with tempfile.TemporaryDirectory(prefix="tuneforge-launch-") as folder:
        config_file = Path(folder) / "config.json"
        config_file.write_text(config.model_dump_json())
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={count}",
                   "-m", "tuneforge.cli", "stage", stage, "--config", str(config_file), "--output", str(output),
                   *[f"--input={key}={path}" for key, path in inputs.items()]]
        log.info("%s: starting %d processes with torchrun (%s)", stage, count, settings.distributed.strategy)
        # Their output goes to this process's log as it comes (stdout included: each prints its JSON result there,
        # and the one that counts is read from the manifest).
        with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as processes:
            for line in processes.stdout:
                sys.stderr.write(line)
    if processes.returncode != 0:
        raise LaunchError(f"{stage}: torchrun with {count} processes failed (exit code {processes.returncode}); "
                          "the failing process's error is in the log above")
    manifest = storage.read_manifest(Path(output), stage)
    return {"status": "succeeded", "metrics": manifest["metrics"], "output": str(output), "processes": count}


FSDP_DEFAULTS: dict[str, Any] = {
    "version": 2,
    "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",  # one FSDP unit per decoder layer (the model's _no_split_modules)
    "state_dict_type": "FULL_STATE_DICT",  # saved weights are ordinary, unsharded safetensors
    "reshard_after_forward": True,
}

DEEPSPEED_ZERO3_DEFAULTS: dict[str, Any] = {
    "zero_optimization": {
        "stage": 3,
        "overlap_comm": True,
        "contiguous_gradients": True,
        # Gathers the full weights when saving, so the output is ordinary safetensors like the other strategies'.
        "stage3_gather_16bit_weights_on_model_save": True,
    },
    # "auto": the Trainer fills these in from the stage's own settings, so they cannot disagree.
    "bf16": {"enabled": "auto"},
    "fp16": {"enabled": "auto"},
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "train_batch_size": "auto",
    "gradient_clipping": "auto",
}


def merged(defaults: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    result = copy.deepcopy(defaults)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(result.get(key), dict):
            result[key] = merged(result[key], value)
        else:
            result[key] = value
    return result


def check_strategy(settings: TrainSettings) -> None:
    strategy = settings.distributed.strategy
    if strategy != "ddp" and not torch.cuda.is_available():
        # accelerate shards with FSDP or DeepSpeed on accelerators only; on CPUs it would quietly fall back to DDP.
        raise SetupError(f"distributed.strategy {strategy} shards across GPUs and none is visible; "
                                 "use distributed.strategy: ddp on the CPU")


def sharding_arguments(settings: TrainSettings) -> dict[str, Any]:
    """TrainingArguments for the chosen strategy when the stage runs in several processes (one process ignores it, so
    a config written for a GPU node also runs on a laptop)."""
    chosen = settings.distributed
    if world_size() == 1:
        return {}
    check_strategy(settings)
    if chosen.strategy == "fsdp":
        # FSDP's own activation checkpointing: the Trainer's would add an all-gather to every backward pass.
        fsdp_config = merged(FSDP_DEFAULTS | {"activation_checkpointing": settings.gradient_checkpointing}, chosen.options)
        return {"fsdp": "full_shard auto_wrap", "fsdp_config": fsdp_config, "gradient_checkpointing": False}
    if chosen.strategy == "deepspeed_zero3":
        try:
            import deepspeed  # noqa: F401
        except ImportError:
            raise SetupError("distributed.strategy deepspeed_zero3 needs DeepSpeed: pip install deepspeed "
                                     "(the tuneforge-cuda image has it)") from None
        return {"deepspeed": merged(DEEPSPEED_ZERO3_DEFAULTS, chosen.options)}
    # Every trainable parameter takes part in every step (frozen base weights are not DDP's to sync).
    return {"ddp_find_unused_parameters": False}


def describe(settings: TrainSettings) -> dict[str, Any]:
    """What the manifest records about how the stage was spread out."""
    world = world_size()
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return {"world_size": world, "nodes": world // per_node,
            "strategy": settings.distributed.strategy if world > 1 else "none"}
