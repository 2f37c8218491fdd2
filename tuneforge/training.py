"""What the training stages share: loading the model to train, precision, trainer arguments, checkpoints and resume,
LoRA, and the end of a stage (train, save, log, manifest)."""

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

from tuneforge import distributed, env, models, plots, storage, tracking
from tuneforge.config import Config, LoraSettings, SftSettings, TrainSettings
from tuneforge.errors import SetupError

log = logging.getLogger(__name__)


def cpu_has_bf16() -> bool:
    try:
        return "avx512_bf16" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def precision(settings: TrainSettings) -> str:
    if settings.precision != "auto":
        if settings.precision == "fp16" and not torch.cuda.is_available():
            raise SetupError("precision fp16 needs a CUDA GPU; use bf16 or fp32 on the CPU")
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
            raise SetupError(f"resume: checkpoint {settings.resume} not found")
        return settings.resume
    last = last_complete_checkpoint(checkpoints)
    mirror = os.environ.get(env.CHECKPOINT_URI)
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


# Padding-free rows on the CPU: transformers' eager and SDPA attention keep a batch's rows apart with a mask over the
# batch's whole length, computing (and discarding) every row's scores against every other row's. This attention takes
# each row alone (a run of position ids from 0), with eager math up to EAGER_ATTENTION_MAX_TOKENS and SDPA's kernel
# beyond: no padding and no cross-row work. Registered with transformers' AttentionInterface under this name; the
# model then builds no mask for it.
ROWWISE_ATTENTION = "tuneforge_rowwise"


def rowwise_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask,
                      dropout: float = 0.0, scaling: float | None = None, sliding_window: int | None = None,
                      softcap: float | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    positions = kwargs.get("position_ids")
    if query.shape[0] != 1 or positions is None or attention_mask is not None or kwargs.get("s_aux") is not None:
        raise ValueError("rowwise attention takes one padding-free row of rows with their position ids, without a mask "
                         "or attention sinks")
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    starts = (positions[0] == 0).nonzero().flatten().tolist()
    if not starts or starts[0] != 0:
        raise ValueError("rowwise attention: the position ids must start each row at 0")
    outputs = []
    for start, end in zip(starts, starts[1:] + [query.shape[2]], strict=True):
        q, k, v, n = query[:, :, start:end], key[:, :, start:end], value[:, :, start:end], end - start
        windowed = sliding_window is not None and n > sliding_window
        allowed = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
        if windowed:
            allowed = allowed.triu(1 - sliding_window)
        if n > EAGER_ATTENTION_MAX_TOKENS and softcap is None:
            out = torch.nn.functional.scaled_dot_product_attention(
                q, k, v, attn_mask=allowed if windowed else None, is_causal=not windowed,
                dropout_p=dropout if module.training else 0.0, scale=scaling)
        else:
            scores = torch.matmul(q, k.transpose(2, 3)) * scaling
            if softcap is not None:
                scores = torch.tanh(scores / softcap) * softcap
            scores = scores.masked_fill(~allowed, float("-inf"))
            weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
            weights = torch.nn.functional.dropout(weights, p=dropout, training=module.training)
            out = torch.matmul(weights, v)
        outputs.append(out)
    return torch.cat(outputs, 2).transpose(1, 2).contiguous(), None


# The per-token outputs of TRL's fused LM head, one value per position of the shifted rows.
FUSED_FIELDS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1", "label_mask")


@contextlib.contextmanager
def labelled_positions_only() -> Iterator[None]:
    """While training (and in the forwards that check or evaluate it: the probes, a final evaluation), let TRL's fused
    LM head project only the positions that have labels, on the CPU too.

    It does so on Triton devices, but elsewhere scores every position (prompt and padding included, with entropy
    and top-1 over the whole vocabulary) to keep tile shapes fixed for graph compilers. Eager CPU training has no
    such constraint, and those positions were about a third of a SmolLM2 LoRA step on this CPU. The switch is TRL's
    private `_use_triton`; a TRL option to score compactly on every device would make this unnecessary.
    """
    import trl.trainer.utils as trl_utils

    use_triton = getattr(trl_utils, "_use_triton", None)
    if use_triton is None:
        yield
        return
    trl_utils._use_triton = lambda device: device.type == "cpu" or use_triton(device)
    try:
        yield
    finally:
        trl_utils._use_triton = use_triton


# Packed examples must not attend to each other. TRL packs them into one row with position ids restarting at each
# example and calls the model without a cache; transformers' attention masks (eager, sdpa, flex) then keep them apart,
# and flash attention takes the boundaries from the same position ids. A model whose attention does neither would
# train on cross-contaminated rows, so it is probed first.
PACKING_TOLERANCE = 1e-3


@torch.no_grad()
def packing_leak(model, rowwise: bool = False) -> float:
    """The largest logit difference between two short examples run packed into one row (as TRL packs them) and run
    alone; about 1e-6 where the attention keeps them apart. `rowwise`: the packed row under rowwise attention, the
    examples alone under the model's own, so it also checks that rowwise attention computes what the model's does
    (infinite where it cannot run this model's attention)."""
    vocab = model.config.get_text_config().vocab_size
    generator = torch.Generator().manual_seed(0)
    first, second = (torch.randint(3, vocab, (1, n), generator=generator) for n in (9, 6))
    device = next(model.parameters()).device
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    own_attention = base.config._attn_implementation
    was_training = model.training
    model.eval()
    try:
        alone = [model(input_ids=x.to(device), use_cache=False).logits[0].float().cpu() for x in (first, second)]
        positions = torch.cat([torch.arange(9), torch.arange(6)])[None].to(device)
        if rowwise:
            use_rowwise_attention(model)
        packed = model(input_ids=torch.cat([first, second], 1).to(device), position_ids=positions,
                       use_cache=False).logits[0].float().cpu()
    except ValueError as exc:
        if not rowwise:
            raise
        log.info("rowwise attention cannot run this model's attention: %s", exc)
        return float("inf")
    finally:
        base.set_attn_implementation(own_attention)
        model.train(was_training)
    return max((packed[:9] - alone[0]).abs().max().item(), (packed[9:] - alone[1]).abs().max().item())


def use_rowwise_attention(model) -> str:
    from transformers import AttentionInterface

    AttentionInterface.register(ROWWISE_ATTENTION, rowwise_attention)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.set_attn_implementation(ROWWISE_ATTENTION)
    return ROWWISE_ATTENTION


# Below this share of padding in random batches, grouping rows by length saves little and costs the batches'
# randomness (rows of one length are often rows of one kind).
GROUPING_MIN_PADDING = 0.1


def random_batch_padding(lengths: list[int], batch_size: int, seed: int = 0) -> float:
    """The share of padded positions when rows of these lengths are batched in a random order."""
    order = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(seed)).tolist()
    padded = total = 0
    for start in range(0, len(order), batch_size):
        batch = [lengths[i] for i in order[start : start + batch_size]]
        total += max(batch) * len(batch)
        padded += max(batch) * len(batch) - sum(batch)
    return padded / total if total else 0.0


def choose_batching(settings: TrainSettings, model, attention: str, lengths: list[int], packing: bool = False,
                    can_probe: bool = True, padding_free: bool = True) -> tuple[str, str, str]:
    """How rows make a batch (`settings.batching`) and why. Padding-free rows need an attention that keeps a batch's
    rows apart by their position ids: probed like packing (not for a 4-bit model on the CPU, see _check_packing in
    sft), refused when asked for and it leaks. `lengths`: the training rows' lengths, as batched; `padding_free`:
    whether the trainer has padding-free batches at all (TRL's DPOTrainer has not). The attention the batches get is
    the third value: rowwise for padding-free rows on the CPU where it computes what the model's attention does."""
    choice = settings.batching
    if choice in ("padded", "grouped") and not packing:
        return choice, "set in the config", attention
    rowwise_leak = None
    padding = random_batch_padding(lengths, settings.batch_size, settings.seed)
    # On rows of nearly one length, padded batches attend over each batch in one call; attending row by row costs
    # more than the little padding it saves (the quickstart's sft: about 13% slower row by row, docs/benchmarks.md).
    worth_it = packing or choice == "padding_free" or padding >= GROUPING_MIN_PADDING
    # On a GPU a small model's step is bound by launching kernels (benchmarks/gpu_step.py: SmolLM2-135M LoRA on an
    # H200, 7,446 kernels a step, the GPU busy 13% of it; 4x the rows cost 16% more time), and attending row by row
    # launches each layer's attention once per row: there auto groups rows by length, which pads on the GPU's spare time.
    launch_bound = torch.cuda.is_available() and choice == "auto" and not packing
    rowwise_fits = (padding_free and can_probe and worth_it and choice in ("auto", "padding_free")
                    and settings.attention == "auto" and attention in ("eager", "sdpa"))
    if rowwise_fits and not launch_bound:  # tuneforge's own choice on the CPU
        rowwise_leak = packing_leak(model, rowwise=True)
        if rowwise_leak <= PACKING_TOLERANCE:
            rowwise = f"rowwise attention, the same logits as {attention} attention within {rowwise_leak:.2g}"
            if packing:
                return "packed", f"sft.packing: rows packed into full sequences, each attended alone ({rowwise})", \
                    use_rowwise_attention(model)
            return ("padding_free", f"no padding, random batches: each row attended alone ({rowwise})",
                    use_rowwise_attention(model))
    if packing:
        return "packed", "sft.packing: rows packed into full sequences", attention
    if choice == "auto" and (not padding_free or not attention.startswith("flash_attention")):
        unavailable = ("" if rowwise_leak is None else
                       f"; rowwise attention differs from this model's {attention} attention ({rowwise_leak:.3g})")
        if rowwise_fits and launch_bound:
            unavailable += "; on a GPU attending row by row multiplies the kernel launches a step is bound by"
        if padding < GROUPING_MIN_PADDING:
            return "padded", (f"rows of nearly one length: random batches are {padding:.0%} padding "
                              f"(grouping them by length pays from {GROUPING_MIN_PADDING:.0%}){unavailable}"), attention
        if not padding_free:
            return "grouped", f"random batches would be {padding:.0%} padding", attention
        return "grouped", (f"random batches would be {padding:.0%} padding; on {attention} attention a padding-free "
                           "batch attends over its whole length (a mask of its rows' total squared), so rows of "
                           f"similar length are batched together instead{unavailable}"), attention
    leak = packing_leak(model) if can_probe else 0.0
    if leak > PACKING_TOLERANCE:
        if choice == "padding_free":
            raise SetupError(f"batching padding_free: this model's attention ({attention}) lets a batch's rows attend to "
                             f"each other (logits differ by {leak:.3g} from the rows run alone): set batching: grouped")
        return "grouped", f"{attention} attention lets padding-free rows see each other (logits differ by {leak:.3g})", attention
    return "padding_free", f"{attention} attention keeps a padding-free batch's rows apart (checked, {leak:.2g})", attention


class PaddingCount:
    """Wraps a data collator and counts the batches' padding: `share` is the padded positions among all positions
    the training forwards compute. Padding-free batches have none."""

    def __init__(self, collate, model):
        self.collate, self.model, self.padded, self.total = collate, model, 0, 0

    def __call__(self, examples):
        batch = self.collate(examples)
        if not self.model.training:  # an evaluation's batches
            return batch
        mask = batch.get("attention_mask")
        if mask is not None and mask.dim() == 2:
            self.padded += int((mask == 0).sum())
            self.total += mask.numel()
        elif "input_ids" in batch:
            self.total += batch["input_ids"].numel()
        return batch

    @property
    def share(self) -> float:
        return self.padded / self.total if self.total else 0.0


def optimizer(settings: TrainSettings, quantized: bool) -> str:
    """auto: paged 8-bit AdamW for a 4-bit model on a GPU (QLoRA's recipe: optimizer state in 8 bits, paged to host
    memory under pressure); AdamW otherwise. bitsandbytes' 8-bit and paged optimizers are CUDA kernels."""
    if settings.optimizer == "auto":
        return "paged_adamw_8bit" if quantized and torch.cuda.is_available() else "adamw_torch"
    if "8bit" in settings.optimizer or "paged" in settings.optimizer:
        if not torch.cuda.is_available():
            raise SetupError(f"optimizer {settings.optimizer} needs a CUDA GPU (bitsandbytes); use adamw_torch "
                                     "or auto on the CPU")
    return settings.optimizer


def trainer_arguments(settings: TrainSettings, checkpoints: Path, has_eval: bool, quantized: bool = False,
                      guard_every: int | None = None, batching: str = "padded") -> dict[str, Any]:
    """Keyword arguments shared by SFTConfig and DPOConfig. `guard_every`: a LikelihoodGuard watches the evaluations,
    held every that many steps (eval_steps when set), each with a checkpoint it can go back to."""
    mode = precision(settings)
    eval_steps = settings.eval_steps or settings.save_steps
    save_steps = settings.save_steps
    early_stopping = settings.early_stopping_patience is not None
    if early_stopping and not has_eval:
        raise SetupError("early_stopping_patience needs held-out rows: set data.eval_fraction above 0")
    if early_stopping and settings.save_steps % eval_steps:
        raise SetupError("early stopping needs save_steps to be a multiple of eval_steps")
    best: dict[str, Any] = {"metric_for_best_model": "eval_loss"} if early_stopping else {}
    if guard_every:
        if early_stopping:
            raise SetupError("early_stopping_patience and the likelihood guard would both pick the checkpoint to keep; "
                             "set dpo.max_chosen_logp_drop: null to stop on eval loss instead")
        # An evaluation at least every guard_every steps (or every eval_steps), each with a checkpoint to go back to.
        eval_steps = save_steps = settings.eval_steps or min(settings.save_steps, guard_every)
        best = {"metric_for_best_model": LikelihoodGuard.METRIC, "greater_is_better": True}
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
        save_steps=save_steps,
        save_total_limit=settings.save_total_limit,
        load_best_model_at_end=bool(best),
        **best,
        seed=settings.seed,
        data_seed=settings.seed,
        train_sampling_strategy="group_by_length" if batching == "grouped" else "random",
        report_to="none",
    ) | distributed.sharding_arguments(settings)


def lora_config(settings: LoraSettings, modules: list[str] | str, task_type: str = "CAUSAL_LM"):
    from peft import LoraConfig

    return LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=modules,
        use_dora=settings.use_dora,
        use_rslora=settings.use_rslora,
        bias="none",
        task_type=task_type,
    )


def callbacks(settings: TrainSettings, prefix: str, tracker: tracking.StageTracker,
              endpoint_url: str | None = None) -> list:
    from transformers import EarlyStoppingCallback

    found = [MlflowMetrics(prefix, tracker)]
    if os.environ.get(env.CHECKPOINT_URI):
        found.append(MirrorCheckpoints(os.environ[env.CHECKPOINT_URI], endpoint_url))
    if settings.early_stopping_patience:
        found.append(EarlyStoppingCallback(early_stopping_patience=settings.early_stopping_patience))
    return found


class LikelihoodGuard(TrainerCallback):
    """Watches preference training for likelihood displacement: the policy's log-probability of the chosen answers on
    the held-out pairs falling far below the reference's while the reward margin still grows. TRL logs the chosen
    reward, beta * (log p_policy - log p_ref), so the fall is -reward / beta nats per answer. When it passes
    `max_drop`, training stops, and the Trainer goes back to the newest checkpoint still within it: that checkpoint's
    step is its best metric (METRIC), every evaluation past the margin scores -1."""

    METRIC = "guard_score"

    def __init__(self, max_drop: float, beta: float):
        self.max_drop, self.beta = max_drop, beta
        self.drops: list[tuple[int, float]] = []
        self.tripped: dict[str, float] | None = None
        self.done = False

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if self.done or metrics is None or "eval_rewards/chosen" not in metrics:
            return
        drop = -metrics["eval_rewards/chosen"] / self.beta
        metrics["eval_chosen_logp_drop"] = drop
        within = drop <= self.max_drop
        metrics[f"eval_{self.METRIC}"] = float(state.global_step) if within else -1.0
        self.drops.append((state.global_step, drop))
        if not within and self.tripped is None:
            self.tripped = {"step": state.global_step, "drop": drop}
            log.warning("likelihood guard: at step %d the chosen answers' log-probability is %.1f nats below the "
                        "reference's (> %.1f): stopping, and keeping the last checkpoint within the margin",
                        state.global_step, drop, self.max_drop)
            control.should_training_stop = True

    def on_train_end(self, args, state, control, **kwargs):
        self.done = True  # the evaluation after training scores the kept model; it decides nothing

    def report(self, state) -> dict[str, Any]:
        """What happened, for the lineage and MLflow: every evaluation's drop, where it tripped, what was kept."""
        kept = None
        if self.tripped is None:
            summary = f"held: the chosen answers stayed within {self.max_drop} nats of the reference"
        else:
            summary = (f"tripped at step {self.tripped['step']}: the chosen answers' log-probability fell "
                       f"{self.tripped['drop']:.1f} nats below the reference's (> {self.max_drop}); ")
            if state.best_metric is not None and state.best_metric >= 0:
                kept = state.best_global_step
                summary += f"kept the checkpoint of step {kept}"
            else:
                summary += "no evaluation was within the margin, so the last weights are kept"
        return {"max_drop": self.max_drop, "drops": self.drops, "tripped": self.tripped, "kept_step": kept,
                "summary": summary}


def compute_dtype(settings: TrainSettings) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision(settings)]


@contextlib.contextmanager
def stage_outputs(config: Config, stage: str, lineage: dict[str, Any],
                  output: Path) -> Iterator[tuple[tracking.StageTracker, Path]]:
    """The stage's MLflow tracker and its staged output folder. Under torchrun only the main process has them; the
    others get a tracker with no run and a scratch folder, and the main process alone writes the output."""
    if distributed.is_main_process():
        with tracking.stage_run(config, stage, lineage) as tracker, storage.staged_output(output) as out:
            yield tracker, out
    else:
        with tempfile.TemporaryDirectory(prefix=f"tuneforge-{stage}-rank-") as scratch:
            yield tracking.StageTracker(config.tracking.retry_seconds), Path(scratch)


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


def load_for_training(config: Config, model_path: str):
    """The model to train as sft.method says: full precision for full and LoRA (mixed precision autocasts), 4 bits
    for QLoRA. dpo after QLoRA SFT loads the base this way too, as it was trained."""
    settings: SftSettings = config.sft
    if settings.method != "qlora":
        return models.load_model(model_path, config.base_model, dtype=torch.float32)
    from peft import prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig

    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise SetupError("sft.method qlora needs bitsandbytes: pip install bitsandbytes") from None
    compute = torch.bfloat16 if precision(settings) == "bf16" else torch.float32
    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute,
        bnb_4bit_quant_storage=compute,
    )
    # Under torchrun each process puts its copy on its own GPU.
    on_own_gpu = distributed.launched() and torch.cuda.is_available()
    placement = {"device_map": {"": int(os.environ["LOCAL_RANK"])}} if on_own_gpu else {}
    model = models.load_model(model_path, config.base_model, dtype=compute, quantization_config=quantization, **placement)
    # On CPUs with avx512_bf16 any eval-mode forward repacks the 4-bit weights in place and later training
    # silently loses its gradients, so the 4-bit model must never run in eval mode before or during training.
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=settings.gradient_checkpointing)


def train_and_save(trainer, *, stage: str, title: str, tracker: tracking.StageTracker, out: Path,
                   lineage: dict[str, Any], resume: str | None, has_eval: bool, tokenizer, tokenizer_source: str | Path,
                   adapter_base: str | None, trained_token_fraction: float | None, guard: LikelihoodGuard | None = None,
                   padding: PaddingCount | None = None, shared_prefix=None, **save_options) -> dict[str, Any]:
    """How every training stage ends: train, evaluate, save the weights (all processes) and, in the main process, the
    tokenizer, the adapter's base name, the loss history and curve, the MLflow metrics and the manifest (last).
    `adapter_base` is what the saved adapter names as its base; None for full weights. A guard's report goes into the
    lineage (`likelihood_guard`) and MLflow."""
    with labelled_positions_only():
        result = trainer.train(resume_from_checkpoint=resume)
        final = final_evaluation(trainer) if has_eval else {}
    if guard is not None:
        lineage["likelihood_guard"] = guard.report(trainer.state)
    metrics = {"train_loss": result.training_loss, "steps": result.global_step}
    if trained_token_fraction is not None:
        metrics["trained_token_fraction"] = trained_token_fraction
    if trainer.args.load_best_model_at_end and trainer.state.best_global_step is not None:
        metrics.update(kept_step=trainer.state.best_global_step, kept_metric=trainer.state.best_metric)
    if padding is not None:
        metrics["padding_share"] = padding.share
    if shared_prefix is not None and shared_prefix.prefix_share:  # positions computed once per batch, not once a row
        metrics["shared_prefix_share"] = shared_prefix.prefix_share
    metrics.update({k: v for k, v in result.metrics.items() if isinstance(v, (int, float))})
    metrics.update(final)
    if torch.cuda.is_available():
        metrics["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        metrics["gpu_memory_gib"] = torch.cuda.get_device_properties(0).total_memory / 2**30
    save_trained(trainer, out, **save_options)
    if not distributed.is_main_process():
        return metrics
    if adapter_base is not None and distributed.world_size() == 1:
        metrics["adapter_reload_max_abs_diff"] = adapter_reload_difference(trainer, out)
    models.save_tokenizer(tokenizer, out, tokenizer_source)
    if adapter_base is not None:
        set_adapter_base(out, adapter_base)
    history = trainer.state.log_history
    (out / "train_history.json").write_text(json.dumps(history, indent=1))
    plots.loss_curve(history, out / "loss_curve.png", title)
    tracker.record(f"artifact {stage}/loss_curve.png", mlflow.log_artifact, str(out / "loss_curve.png"), artifact_path=stage)
    rewarded = [e for e in history if "reward" in e]  # GRPO: its rewards, not its loss, show what it learned
    if rewarded:
        metrics.update(reward_first_step=rewarded[0]["reward"], reward_last_step=rewarded[-1]["reward"])
        plots.rewards(rewarded, out / "rewards.png", title)
        tracker.record(f"artifact {stage}/rewards.png", mlflow.log_artifact, str(out / "rewards.png"), artifact_path=stage)
    tracker.record("the final metrics", mlflow.log_metrics,
                   {f"{stage}/final_{k}": float(v) for k, v in metrics.items() if isinstance(v, (int, float))})
    if guard is not None:
        tracker.record("the likelihood guard", mlflow.set_tags,
                       {f"{stage}.likelihood_guard": lineage["likelihood_guard"]["summary"]})
    lineage.update(kind="adapter" if adapter_base is not None else "full", trained_by=stage, **tracker.run_record())
    storage.write_manifest(out, stage, lineage, metrics)
    return metrics


def final_evaluation(trainer) -> dict[str, float]:
    """The held-out metrics of the trained weights: those of the evaluation at the last step when there was one and
    the weights were not replaced by an earlier checkpoint (the guard, early stopping), else a new evaluation."""
    state = trainer.state
    last = next((e for e in reversed(state.log_history) if "eval_loss" in e), None)
    kept_last = not trainer.args.load_best_model_at_end or state.best_global_step in (None, state.global_step)
    if last is None or last.get("step") != state.global_step or not kept_last:
        return trainer.evaluate()
    return {k: v for k, v in last.items() if k.startswith("eval_") and k != f"eval_{LikelihoodGuard.METRIC}"}


def adapter_reload_difference(trainer, out: Path) -> float:
    """The saved adapter read back from disk against the trained one in memory: every tensor, largest difference
    (0.0 when they are the same; infinite when a tensor is missing on either side)."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file

    model = trainer.accelerator.unwrap_model(trainer.model)
    trained = get_peft_model_state_dict(model, adapter_name="default")
    saved = load_file(out / "adapter_model.safetensors")
    if set(trained) != set(saved):
        return float("inf")
    return max((saved[k].float() - trained[k].detach().float().cpu()).abs().max().item() for k in saved)


class MlflowMetrics(TrainerCallback):
    """Send the Trainer's logs to the stage's MLflow run from a background thread, so a slow or unreachable server
    never holds up training: values that cannot be sent are kept and sent later; what is still unsent when training
    ends is retried within tracking.retry_seconds and then reported as unlogged (train_history.json has it all)."""

    def __init__(self, prefix: str, tracker: tracking.StageTracker):
        self.prefix, self.tracker = prefix, tracker
        self.run_id: str | None = None
        self.pending: list[Metric] = []
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.stopped = threading.Event()
        self.sender: threading.Thread | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero and self.tracker.run and self.sender is None:
            self.run_id = self.tracker.run_id
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
            if not self.tracker.record(what, self._send_some):
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
