"""What the sft and dpo stages share: precision, trainer arguments, checkpoints and resume, LoRA, loss plots."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch

from tuneforge.config import LoraSettings, TrainSettings

log = logging.getLogger(__name__)


class TrainingSetupError(RuntimeError):
    """A training setting that cannot work here; raised before any training starts."""


def cpu_has_bf16() -> bool:
    try:
        return "avx512_bf16" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def precision(settings: TrainSettings) -> str:
    if settings.precision != "auto":
        if settings.precision == "fp16" and not torch.cuda.is_available():
            raise TrainingSetupError("precision fp16 needs a CUDA GPU; use bf16 or fp32 on the CPU")
        return settings.precision
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_has_bf16() else "fp32"


def require_backend(backend: str, stage: str) -> None:
    """Unsloth only runs on CUDA GPUs; say so instead of quietly training with the hf backend."""
    if backend == "hf":
        return
    if not torch.cuda.is_available():
        raise TrainingSetupError(
            f"{stage}.backend: unsloth needs a CUDA GPU and none is visible (torch.cuda.is_available() is False); "
            f"set {stage}.backend: hf to train on this machine"
        )
    raise TrainingSetupError(
        f"{stage}.backend: unsloth is not available in this version of tuneforge; set {stage}.backend: hf"
    )


def checkpoint_dir(output: Path) -> Path:
    """Checkpoints live beside the output, so they survive a killed stage and never look like a finished one."""
    output = Path(output).resolve()
    return output.with_name(output.name + ".checkpoints")


def resume_from(settings: TrainSettings, checkpoints: Path) -> str | None:
    from transformers.trainer_utils import get_last_checkpoint

    if settings.resume == "never":
        shutil.rmtree(checkpoints, ignore_errors=True)
        return None
    if settings.resume != "auto":
        if not Path(settings.resume).is_dir():
            raise TrainingSetupError(f"resume: checkpoint {settings.resume} not found")
        return settings.resume
    last = get_last_checkpoint(str(checkpoints)) if checkpoints.is_dir() else None
    if last:
        log.info("resuming from %s", last)
    return last


def trainer_arguments(settings: TrainSettings, checkpoints: Path, has_eval: bool) -> dict[str, Any]:
    """Keyword arguments shared by SFTConfig and DPOConfig."""
    mode = precision(settings)
    eval_steps = settings.eval_steps or settings.save_steps
    early_stopping = settings.early_stopping_patience is not None
    if early_stopping and not has_eval:
        raise TrainingSetupError("early_stopping_patience needs held-out rows: set data.eval_fraction above 0")
    if early_stopping and settings.save_steps % eval_steps:
        raise TrainingSetupError("early stopping needs save_steps to be a multiple of eval_steps")
    return dict(
        output_dir=str(checkpoints),
        learning_rate=settings.learning_rate,
        num_train_epochs=settings.epochs,
        max_steps=settings.max_steps,
        per_device_train_batch_size=settings.batch_size,
        per_device_eval_batch_size=settings.batch_size,
        gradient_accumulation_steps=settings.grad_accum,
        warmup_steps=settings.warmup_ratio,
        lr_scheduler_type=settings.lr_scheduler,
        weight_decay=settings.weight_decay,
        max_grad_norm=settings.max_grad_norm,
        bf16=mode == "bf16",
        fp16=mode == "fp16",
        use_cpu=not torch.cuda.is_available(),
        gradient_checkpointing=settings.gradient_checkpointing,
        logging_steps=settings.logging_steps,
        logging_first_step=True,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=eval_steps,
        save_strategy="steps",
        save_steps=settings.save_steps,
        save_total_limit=settings.save_total_limit,
        load_best_model_at_end=early_stopping,
        metric_for_best_model="eval_loss" if early_stopping else None,
        seed=settings.seed,
        data_seed=settings.seed,
        report_to="none",
    )


def lora_config(settings: LoraSettings, modules: list[str] | str):
    from peft import LoraConfig

    return LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=modules,
        use_dora=settings.use_dora,
        use_rslora=settings.use_rslora,
        bias="none",
        task_type="CAUSAL_LM",
    )


def callbacks(settings: TrainSettings, prefix: str) -> list:
    from transformers import EarlyStoppingCallback

    from tuneforge.tracking import MlflowMetrics

    found = [MlflowMetrics(prefix)]
    if settings.early_stopping_patience:
        found.append(EarlyStoppingCallback(early_stopping_patience=settings.early_stopping_patience))
    return found


def save_history(log_history: list[dict[str, Any]], folder: Path, title: str) -> None:
    """Write the trainer's log history as JSON and draw its loss curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    (folder / "train_history.json").write_text(json.dumps(log_history, indent=1))
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for key, label in (("loss", "train loss"), ("eval_loss", "eval loss")):
        points = [(e["step"], e[key]) for e in log_history if key in e]
        if points:
            ax.plot(*zip(*points, strict=True), marker="o" if key == "eval_loss" else None, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(folder / "loss_curve.png", dpi=100)
    plt.close(fig)


def set_adapter_base(folder: Path, base: str) -> None:
    """peft records the base model as the absolute path it was loaded from; record a portable name instead."""
    path = folder / "adapter_config.json"
    adapter = json.loads(path.read_text())
    adapter["base_model_name_or_path"] = base
    path.write_text(json.dumps(adapter, indent=2))
