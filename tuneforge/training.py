"""What the sft and dpo stages share: precision, trainer arguments, checkpoints and resume, LoRA, loss plots."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import torch
from mlflow.entities import Metric
from transformers import TrainerCallback

from tuneforge import storage, tracking
from tuneforge.config import Config, LoraSettings, TrainSettings

log = logging.getLogger(__name__)

# Where a stage mirrors its checkpoints (an S3 prefix); set by the pipeline when it publishes to S3.
CHECKPOINT_URI_ENV = "TUNEFORGE_CHECKPOINT_URI"


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


def checkpoint_dir(output: Path) -> Path:
    """Checkpoints live beside the output, so they survive a killed stage and never look like a finished one."""
    output = Path(output).resolve()
    return output.with_name(output.name + ".checkpoints")


def resume_from(settings: TrainSettings, checkpoints: Path, endpoint_url: str | None = None) -> str | None:
    """The checkpoint to resume from: the newest beside the output or, when there is none (a retry on another
    machine), the newest complete one mirrored to S3."""
    if settings.resume == "never":
        shutil.rmtree(checkpoints, ignore_errors=True)
        return None
    if settings.resume != "auto":
        if not Path(settings.resume).is_dir():
            raise TrainingSetupError(f"resume: checkpoint {settings.resume} not found")
        return settings.resume
    last = last_complete_checkpoint(checkpoints)
    mirror = os.environ.get(CHECKPOINT_URI_ENV)
    if last is None and mirror:
        last = _fetch_mirrored(mirror, checkpoints, endpoint_url)
    if last:
        log.info("resuming from %s", last)
    return last


def last_complete_checkpoint(checkpoints: Path) -> str | None:
    """The newest checkpoint the Trainer finished writing (trainer_state.json is its last file). One cut off by a
    kill is removed: resuming from it would load half a state."""
    found = sorted(checkpoints.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]) if p.name[11:].isdigit() else -1)
    for folder in reversed(found):
        try:
            json.loads((folder / "trainer_state.json").read_text())
            return str(folder)
        except (OSError, ValueError):
            log.warning("%s was cut off while being written; removing it", folder)
            shutil.rmtree(folder, ignore_errors=True)
    return None


def _fetch_mirrored(mirror: str, checkpoints: Path, endpoint_url: str | None) -> str | None:
    names = [n for n in storage.subfolders(mirror, endpoint_url) if re.fullmatch(r"checkpoint-\d+", n)]
    for name in sorted(names, key=lambda n: int(n.split("-")[1]), reverse=True):
        try:
            return str(storage.fetch(f"{mirror}/{name}", checkpoints / name, endpoint_url))
        except storage.IncompleteOutputError:
            log.warning("%s/%s is incomplete (its upload was cut off); trying an older one", mirror, name)
    return None


class MirrorCheckpoints(TrainerCallback):
    """Copy each checkpoint to S3 when it is saved (its manifest last) and keep only the newest there, so a retry
    of the stage on another machine resumes from it. The upload holds training up for its duration."""

    def __init__(self, uri: str, endpoint_url: str | None):
        self.uri, self.endpoint_url = uri.rstrip("/"), endpoint_url

    def on_save(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        name = f"checkpoint-{state.global_step}"
        folder = Path(args.output_dir) / name
        storage.write_manifest(folder, "checkpoint", {}, {"step": state.global_step})
        storage.publish(folder, f"{self.uri}/{name}", self.endpoint_url)
        for older in storage.subfolders(self.uri, self.endpoint_url):
            if older != name:
                storage.delete(f"{self.uri}/{older}", self.endpoint_url)


# Up to this many tokens per row, eager attention is faster than SDPA on the CPU (SmolLM2-135M LoRA step: 1.2x
# at 82 tokens, 1.13x at 256, 0.8x at 512, 0.4x at 1024); SDPA's CPU flash kernel wins on longer rows.
EAGER_ATTENTION_MAX_TOKENS = 256


def choose_attention(model, settings: TrainSettings, longest_row: int) -> str:
    """Set the attention kernel from `settings.attention`; auto picks eager for short rows on the CPU."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    choice = settings.attention
    if choice == "auto":
        if torch.cuda.is_available():
            return base.config._attn_implementation
        choice = "eager" if longest_row <= EAGER_ATTENTION_MAX_TOKENS else "sdpa"
    base.set_attn_implementation(choice)
    log.info("attention: %s (longest training row %d tokens)", choice, longest_row)
    return choice


def score_only_labelled_positions() -> None:
    """Let TRL's fused LM head project only the positions that have labels, on the CPU too.

    It does so on Triton devices, but elsewhere scores every position (prompt and padding included, with entropy
    and top-1 over the whole vocabulary) to keep tile shapes fixed for graph compilers. Eager CPU training has no
    such constraint, and those positions were about a third of a SmolLM2 LoRA step on this CPU.
    """
    import trl.trainer.utils as trl_utils

    use_triton = getattr(trl_utils, "_use_triton", None)
    if use_triton is None or getattr(use_triton, "tuneforge_cpu", False):
        return

    def compact_on_cpu(device: torch.device) -> bool:
        return device.type == "cpu" or use_triton(device)

    compact_on_cpu.tuneforge_cpu = True
    trl_utils._use_triton = compact_on_cpu


def optimizer(settings: TrainSettings, quantized: bool) -> str:
    """auto: paged 8-bit AdamW for a 4-bit model on a GPU (QLoRA's recipe: optimizer state in 8 bits, paged to host
    memory under pressure); AdamW otherwise. bitsandbytes' 8-bit and paged optimizers are CUDA kernels."""
    if settings.optimizer == "auto":
        return "paged_adamw_8bit" if quantized and torch.cuda.is_available() else "adamw_torch"
    if "8bit" in settings.optimizer or "paged" in settings.optimizer:
        if not torch.cuda.is_available():
            raise TrainingSetupError(f"optimizer {settings.optimizer} needs a CUDA GPU (bitsandbytes); use adamw_torch "
                                     "or auto on the CPU")
    return settings.optimizer


def trainer_arguments(settings: TrainSettings, checkpoints: Path, has_eval: bool, quantized: bool = False) -> dict[str, Any]:
    """Keyword arguments shared by SFTConfig and DPOConfig."""
    from tuneforge import distributed

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
        optim=optimizer(settings, quantized),
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
    ) | distributed.sharding_arguments(settings)


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


def callbacks(settings: TrainSettings, prefix: str, endpoint_url: str | None = None) -> list:
    from transformers import EarlyStoppingCallback

    found = [MlflowMetrics(prefix)]
    if os.environ.get(CHECKPOINT_URI_ENV):
        found.append(MirrorCheckpoints(os.environ[CHECKPOINT_URI_ENV], endpoint_url))
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


def compute_dtype(settings: TrainSettings) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision(settings)]


@contextlib.contextmanager
def stage_outputs(config: Config, stage: str, lineage: dict[str, Any], output: Path) -> Iterator[tuple[Any, Path]]:
    """The stage's MLflow run and its staged output folder. Under torchrun only the main process has them; the others
    get no run and a scratch folder, and the main process alone writes the output."""
    from tuneforge import distributed

    if distributed.is_main_process():
        with tracking.stage_run(config, stage, lineage) as mlrun, storage.staged_output(output) as out:
            yield mlrun, out
    else:
        with tempfile.TemporaryDirectory(prefix=f"tuneforge-{stage}-rank-") as scratch:
            yield None, Path(scratch)


def main_process_first():
    """For work on this node's disk that all processes need (fetching mirrored checkpoints): the first does it."""
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available()).local_main_process_first()


def save_trained(trainer, folder: Path, **save_options) -> None:
    """Save the trained weights; every process calls this. Under FSDP or DeepSpeed ZeRO-3 the full weights are
    gathered from all processes first; only the main process writes."""
    state_dict = trainer.accelerator.get_state_dict(trainer.model)
    if trainer.accelerator.is_main_process:
        model = trainer.accelerator.unwrap_model(trainer.model)
        model.save_pretrained(folder, state_dict=state_dict, safe_serialization=True, **save_options)


def set_adapter_base(folder: Path, base: str) -> None:
    """peft records the base model as the absolute path it was loaded from; record a portable name instead."""
    path = folder / "adapter_config.json"
    adapter = json.loads(path.read_text())
    adapter["base_model_name_or_path"] = base
    path.write_text(json.dumps(adapter, indent=2))


class MlflowMetrics(TrainerCallback):
    """Send the Trainer's logs to the stage's MLflow run from a background thread, so a slow or unreachable server
    never holds up training: values that cannot be sent are kept and sent later; what is still unsent when training
    ends is retried within tracking.retry_seconds and then reported as unlogged (train_history.json has it all)."""

    def __init__(self, prefix: str = ""):
        self.prefix = prefix
        self.run_id: str | None = None
        self.pending: list[Metric] = []
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.stopped = threading.Event()
        self.sender: threading.Thread | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero and mlflow.active_run() and self.sender is None:
            self.run_id = mlflow.active_run().info.run_id
            self.sender = threading.Thread(target=self._send_loop, name="mlflow-metrics", daemon=True)
            self.sender.start()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.run_id is None:
            return
        now = int(time.time() * 1000)
        numbers = [Metric(f"{self.prefix}{k}", float(v), now, state.global_step)
                   for k, v in (logs or {}).items() if isinstance(v, (int, float))]
        with self.lock:
            self.pending.extend(numbers)
        if self.stopped.is_set():  # trainer.evaluate() after training: no sender any more
            self.flush()
        else:
            self.wake.set()

    def on_train_end(self, args, state, control, **kwargs):
        if self.sender is not None:
            self.stopped.set()
            self.wake.set()
            self.sender.join()
            self.flush()

    def flush(self) -> None:
        while self.pending:
            with self.lock:
                steps = sorted({m.step for m in self.pending})
                what = f"{len(self.pending)} metric values of steps {steps[0]}-{steps[-1]}"
            if not tracking.record(what, self._send_some):
                with self.lock:
                    self.pending.clear()
                return

    def _send_some(self) -> None:
        with self.lock:
            batch = self.pending[:1000]  # MLflow's log_batch limit
        mlflow.MlflowClient().log_batch(self.run_id, metrics=batch, synchronous=True)
        with self.lock:
            del self.pending[: len(batch)]

    def _send_loop(self) -> None:
        failing = False
        while not self.stopped.is_set():
            self.wake.wait(timeout=10)
            self.wake.clear()
            try:
                while self.pending and not self.stopped.is_set():
                    self._send_some()
                if failing:
                    log.info("MLflow answers again; the metrics kept meanwhile are sent")
                failing = False
            except Exception as err:
                if not failing:
                    log.warning("MLflow: sending metrics failed (%s); training goes on, they are kept and sent later",
                                tracking.first_line(err))
                failing = True
                self.stopped.wait(10)
