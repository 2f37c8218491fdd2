"""Stage sft: supervised fine-tuning with trl's SFTTrainer (full, LoRA or QLoRA), on the hf or the Unsloth backend,
in one process or several (`sft.distributed`: the stage starts itself again under torchrun).

With task: classification it trains a sequence classifier instead (train_classifier): a classification head on the
model, in full or with LoRA (the head then trained in full), scored on validation rows after each epoch.

Inputs: data (a data-prep output).
The tokens every row of a padded batch starts with run once per batch (SharedPrefix, sft.shared_prefix).

Outputs: the adapter (LoRA/QLoRA) or full weights, with the tokenizer and the training chat template,
train_history.json, loss_curve.png and manifest.json. Checkpoints go to OUTPUT.checkpoints so that a killed
run resumes (`resume: auto`); they are removed when the stage succeeds.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import torch

from tuneforge import backends, classification, distributed, models, storage, tracking, training
from tuneforge.config import Config
from tuneforge.data import prepared
from tuneforge.errors import SetupError

log = logging.getLogger(__name__)

STAGE = "sft"


def check_loss_mask(dataset, loss_on: str, sample: int = 64) -> float:
    """The share of tokens trained on in a sample batch; fails before training when that would teach nothing, or
    teach the prompt."""
    rows = dataset.select(range(min(sample, len(dataset))))
    total = sum(len(r["labels"]) for r in rows)
    trained = sum(sum(1 for t in r["labels"] if t != -100) for r in rows)
    if trained == 0:
        raise SetupError("the loss mask is all zeros on a sample batch: no token would be trained")
    if loss_on == "assistant" and trained == total:
        raise SetupError(
            "sft.loss_on is assistant but the loss mask is all ones on a sample batch (raw text data has no "
            "prompt); set sft.loss_on: all to train on every token"
        )
    return trained / total


# Fewer tokens shared by every row of a batch are not worth a forward of their own.
SHARED_PREFIX_MINIMUM = 8


def shared_prefix_length(input_ids, attention_mask, labels) -> int:
    """The tokens every row of a batch starts with, short of the position that predicts a row's first label (that
    position must be computed for the row)."""
    same = ((input_ids == input_ids[:1]) & (attention_mask == 1)).all(0)
    common = int(same.int().cumprod(0).sum())
    labelled = labels != -100
    first = int(torch.where(labelled.any(1), labelled.int().argmax(1), labels.size(1)).min())
    return max(0, min(common, first - 1))


def active_dropout(causal_lm) -> float:
    """The largest dropout probability in the model (LoRA's included) or its attention; a prefix computed once for a
    batch would get one dropout mask for every row."""
    layers = max((m.p for m in causal_lm.modules() if isinstance(m, torch.nn.Dropout)), default=0.0)
    return max(layers, getattr(causal_lm.config.get_text_config(), "attention_dropout", 0.0) or 0.0)


def forward_after_shared_prefix(forward, shared: int, input_ids, labels, position_ids=None, **kwargs):
    """FORWARD (a causal LM's, with TRL's fused LM head) over rows whose first SHARED tokens are the same: those tokens
    go through the model once, as one row, and its KV cache is repeated for the batch (gradients from every row flow
    back through the repeat); each row's own tokens follow (KWARGS' attention mask covers the whole rows). The per-token
    outputs come back in the whole rows' layout, zero on the prefix, where nothing is labelled."""
    prefix_positions = None if position_ids is None else position_ids[:1, :shared]
    cache = forward(input_ids=input_ids[:1, :shared], position_ids=prefix_positions, use_cache=True, logits_to_keep=1).cache
    cache.batch_repeat_interleave(input_ids.size(0))
    out = forward(input_ids=input_ids[:, shared:], labels=labels[:, shared:], fused_lm_head=True, cache=cache,
                  position_ids=None if position_ids is None else position_ids[:, shared:], **kwargs)
    for name in training.FUSED_FIELDS:
        value = getattr(out, name, None)
        if value is not None:
            setattr(out, name, torch.nn.functional.pad(value, (shared, 0)))
    return out


class SharedPrefix:
    """Computes the tokens every row of a batch starts with once per batch. Chat templates put the same system block
    (and datasets often the same instruction) before every row; this replaces the forward of TRL's fused LM head with
    one that runs that prefix as a single row and each row's own tokens after it
    (forward_after_shared_prefix), so the loss and gradients are those of the whole rows up to rounding
    (without dropout, which would draw one mask for the prefix instead of one a row), and TRL's loss and metrics are
    unchanged. Padding-free batches, and batches whose rows share too few tokens before their first label, go through
    the model's own forward."""

    def __init__(self, causal_lm):
        self.model = causal_lm
        self.whole_rows = causal_lm.forward
        self.skipped = self.total = 0

    def install(self) -> None:
        self.model.forward = self

    @property
    def prefix_share(self) -> float:
        """The share of the training forwards' positions computed once per batch instead of once per row."""
        return self.skipped / self.total if self.total else 0.0

    def __call__(self, *args, fused_lm_head=False, labels=None, **kwargs):
        ids, mask = kwargs.get("input_ids"), kwargs.get("attention_mask")
        shared = 0
        if (fused_lm_head and labels is not None and not args and ids is not None and mask is not None and ids.size(0) > 1
                and kwargs.get("position_ids") is None and kwargs.get("cache") is None
                and not kwargs.get("output_router_logits")):
            shared = shared_prefix_length(ids, mask, labels)
        if shared < SHARED_PREFIX_MINIMUM:
            shared = 0
        if self.model.training and torch.is_grad_enabled() and ids is not None:
            self.total += ids.numel()
            self.skipped += (ids.size(0) - 1) * shared
        if not shared:
            return self.whole_rows(*args, fused_lm_head=fused_lm_head, labels=labels, **kwargs)
        kwargs = {k: v for k, v in kwargs.items() if k not in ("input_ids", "use_cache", "position_ids")}
        return forward_after_shared_prefix(self.whole_rows, shared, ids, labels, **kwargs)


def share_prefix(trainer, settings, batching: str, can_probe: bool) -> tuple[SharedPrefix | None, str]:
    """Install SharedPrefix on the trainer's model where it computes what the whole rows do: on a probe batch, the
    same per-token log-probabilities; the reason either way."""
    if not settings.shared_prefix:
        return None, "sft.shared_prefix: false"
    unwrapped = trainer.accelerator.unwrap_model(trainer.model)
    causal_lm = unwrapped.get_base_model() if hasattr(unwrapped, "get_base_model") else unwrapped
    if batching == "padding_free":
        return None, "padding-free batches: no rows to share a prefix"
    if settings.gradient_checkpointing:
        return None, "gradient checkpointing recomputes the layers without a cache"
    dropout = active_dropout(causal_lm)
    if dropout:
        return None, f"dropout {dropout:g}: the prefix would get one dropout mask for every row"
    if not can_probe:
        return None, "not probed: a 4-bit model is never run in eval mode on the CPU"
    shared = SharedPrefix(causal_lm)
    try:
        with training.labelled_positions_only():
            difference = shared_prefix_difference(causal_lm, shared)
    except (AttributeError, NotImplementedError, RuntimeError, TypeError, ValueError) as err:
        return None, f"the model's cache cannot be reused for a batch ({tracking.first_line(err)})"
    if difference > SHARED_PREFIX_TOLERANCE:
        return None, f"the shared-prefix forward differs from the whole rows' on a probe by {difference:.3g}"
    shared.install()
    return shared, f"on: the same log-probabilities as whole rows on a probe (largest difference {difference:.2g})"


SHARED_PREFIX_TOLERANCE = 1e-3


@torch.no_grad()
def shared_prefix_difference(causal_lm, shared: SharedPrefix) -> float:
    """The largest per-token log-probability difference between whole rows and the shared-prefix forward on three
    random rows that share 80 tokens (past a small sliding window) and end with labels, one of them padded."""
    vocab = causal_lm.config.get_text_config().vocab_size
    generator = torch.Generator().manual_seed(0)
    ids = torch.cat([torch.randint(3, vocab, (1, 80), generator=generator).expand(3, 80),
                     torch.randint(3, vocab, (3, 12), generator=generator)], 1)
    mask = torch.ones_like(ids)
    mask[2, -4:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :84] = -100
    device = next(causal_lm.parameters()).device
    ids, mask, labels = ids.to(device), mask.to(device), labels.to(device)
    was_training = causal_lm.training
    causal_lm.eval()
    try:
        whole = shared.whole_rows(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True).log_probs
        reused = shared(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True).log_probs
    finally:
        causal_lm.train(was_training)
    return (whole.float() - reused.float()).abs().max().item()


def _check_packing(model, method: str) -> None:
    """Refuse to pack for a model whose attention lets packed examples see each other."""
    if method == "qlora" and not torch.cuda.is_available():
        return  # no eval-mode forward of a 4-bit model on the CPU (see training.load_for_training); the families it
        # loads go through transformers' attention masks, which keep packed examples apart
    leak = training.packing_leak(model)
    log.info("packing: packed examples stay apart (max logit difference %.2g)", leak)
    if leak > training.PACKING_TOLERANCE:
        raise SetupError(f"sft.packing: this model's attention ({model.config._attn_implementation}) lets packed examples "
                         f"attend to each other (logits differ by {leak:.3g} from the examples run alone): set "
                         "sft.packing: false, or sft.attention: sdpa")


def run(config: Config, inputs: dict[str, Path], output: Path) -> dict[str, Any]:
    settings = config.sft
    if config.task == "classification":
        return train_classifier(config, inputs, output)
    if distributed.needs_launch(settings):
        return distributed.launch(STAGE, config, inputs, output)
    from trl import SFTConfig, SFTTrainer

    backend, why = backends.choose(settings, STAGE, distributed.world_size())
    log.info("backend: %s (%s)", backend, why)
    data_dir = Path(inputs["data"])
    data_manifest = storage.read_manifest(data_dir, "data-prep")
    train = prepared.sft_split(data_dir, "train", settings.loss_on)
    evaluation = prepared.sft_split(data_dir, "eval", settings.loss_on)
    if len(train) == 0:
        raise SetupError(f"{data_dir}: no SFT training rows (the data holds only preference pairs?)")
    trained_fraction = check_loss_mask(train, settings.loss_on)
    has_eval = len(evaluation) > 0
    on_cpu_qlora = settings.method == "qlora" and not torch.cuda.is_available()
    if on_cpu_qlora and has_eval:
        log.warning("qlora on CPU: evaluation during training is off (eval-mode forwards corrupt 4-bit weights)")
        has_eval = False

    model_path = models.resolve(config.base_model)
    tokenizer = models.load_tokenizer(model_path, config.base_model)
    tokenizer.chat_template = data_manifest["lineage"]["chat_template"]
    checkpoints = training.checkpoint_dir(output)
    with training.main_process_first():
        resume = training.resume_from(settings, checkpoints, config.storage.endpoint_url)
    torch.manual_seed(settings.seed)
    longest = config.data.max_length if settings.packing else data_manifest["metrics"]["token_length_max"]
    peft_config = None
    if backend == "unsloth" and settings.packing:
        raise SetupError("sft.packing with backend unsloth: Unsloth's kernels are not checked here to keep packed examples "
                         "apart; set sft.backend: hf to pack, or sft.packing: false")
    if backend == "unsloth" and settings.batching == "padding_free":
        raise SetupError("sft.batching padding_free with backend unsloth: Unsloth's kernels are not checked here to keep "
                         "a batch's rows apart; set sft.backend: hf, or sft.batching: grouped")
    if backend == "unsloth":
        model = backends.unsloth_load(model_path, config.base_model, settings, max_length=config.data.max_length,
                                      dtype=training.compute_dtype(settings), four_bit=settings.method == "qlora",
                                      full=settings.method == "full")
        if settings.method != "full":
            modules = models.target_modules(model, settings.lora.target_modules)
            model = backends.unsloth_lora(model, settings.lora, modules, settings, config.data.max_length)
        attention = "unsloth"
    else:
        model = training.load_for_training(config, model_path)
        if settings.packing:
            _check_packing(model, settings.method)
        if settings.method in ("lora", "qlora"):
            peft_config = training.lora_config(settings.lora, models.target_modules(model, settings.lora.target_modules))
        attention = training.choose_attention(model, settings, longest)
    batching, batching_reason, attention = training.choose_batching(
        settings, model, attention, [len(r) for r in train["input_ids"]], settings.packing, can_probe=not on_cpu_qlora)
    log.info("batching: %s (%s)", batching, batching_reason)

    args = SFTConfig(
        **training.trainer_arguments(settings, checkpoints, has_eval, quantized=settings.method == "qlora",
                                     batching=batching),
        # data-prep already dropped or failed rows over data.max_length; TRL refuses a limit on padding-free rows
        max_length=None if batching == "padding_free" else config.data.max_length,
        packing=settings.packing,
        padding_free=batching == "padding_free",
        dataset_num_proc=None,
    )
    lineage = tracking.inherit_lineage(data_manifest, config, inputs)
    lineage.update(attention=attention, backend=backend, backend_reason=why, method=settings.method,
                   batching=batching, batching_reason=batching_reason, **distributed.describe(settings))
    with training.stage_outputs(config, STAGE, lineage, output) as (tracker, out):
        trainer = SFTTrainer(
            model=model,
            args=args,
            train_dataset=train,
            eval_dataset=evaluation if has_eval else None,
            processing_class=tokenizer,
            peft_config=peft_config,
            callbacks=training.callbacks(settings, "sft/", tracker, config.storage.endpoint_url),
        )
        trainer.data_collator = padding = training.PaddingCount(trainer.data_collator, trainer.model)
        shared, lineage["shared_prefix"] = (None, "off: Unsloth's step has its own forward") if backend == "unsloth" else \
            share_prefix(trainer, settings, batching, can_probe=not on_cpu_qlora)
        log.info("prefix computed once per batch: %s", lineage["shared_prefix"])
        metrics = training.train_and_save(
            trainer, stage=STAGE, title=f"SFT ({settings.method})", tracker=tracker, out=out, lineage=lineage,
            resume=resume, has_eval=has_eval, tokenizer=tokenizer, tokenizer_source=model_path,
            adapter_base=None if settings.method == "full" else config.base_model.source,
            trained_token_fraction=trained_fraction, padding=padding, shared_prefix=shared)
    shutil.rmtree(checkpoints, ignore_errors=True)
    return tracker.result(metrics, output)


def train_classifier(config: Config, inputs: dict[str, Path], output: Path) -> dict[str, Any]:
    """The classifier of task: classification. Each epoch is scored on validation rows split from the training rows
    (classification.validation_fraction) by accuracy and macro-F1; the checkpoint best by
    classification.metric_for_best is the one kept, and training stops after early_stopping_patience epochs (2 when
    unset) without improvement."""
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    settings = config.sft
    data_dir = Path(inputs["data"])
    data_manifest = storage.read_manifest(data_dir, "data-prep")
    labels = data_manifest["lineage"].get("labels")
    if not labels:
        raise SetupError(f"{data_dir}: data-prep wrote no classification rows (it ran for task generation?); run "
                         "data-prep with task: classification")
    rows = prepared.classification_split(data_dir, "train")
    if len(rows) < 2:
        raise SetupError(f"{data_dir}: {len(rows)} classification training row(s): too few to hold validation rows out")
    parts = rows.train_test_split(test_size=config.classification.validation_fraction, seed=settings.seed)
    train, validation = parts["train"], parts["test"]
    log.info("classifier: %d training rows, %d validation rows, labels %s", len(train), len(validation), labels)

    model_path = models.resolve(config.base_model)
    tokenizer = models.load_tokenizer(model_path, config.base_model)
    tokenizer.chat_template = data_manifest["lineage"]["chat_template"]
    checkpoints = training.checkpoint_dir(output)
    resume = training.resume_from(settings, checkpoints, config.storage.endpoint_url)
    torch.manual_seed(settings.seed)  # the new head's initial weights
    model = classification.load(model_path, config.base_model, labels, tokenizer.pad_token_id)
    peft_config = None
    if settings.method == "lora":
        peft_config = training.lora_config(settings.lora, models.target_modules(model, settings.lora.target_modules),
                                           task_type="SEQ_CLS")  # peft trains and saves the head in full
    lengths = [len(ids) for ids in train["input_ids"]]
    attention = training.choose_attention(model, settings, max(lengths))
    batching, batching_reason, _ = training.choose_batching(settings, model, attention, lengths, padding_free=False)
    log.info("batching: %s (%s)", batching, batching_reason)

    patience = config.early_stopping_patience
    metric = config.classification.metric_for_best
    every = {"eval_strategy": "steps", "eval_steps": settings.eval_steps, "save_strategy": "steps",
             "save_steps": settings.eval_steps} if settings.eval_steps else {"eval_strategy": "epoch",
                                                                             "save_strategy": "epoch"}
    args = TrainingArguments(**{
        **training.trainer_arguments(settings, checkpoints, has_eval=True, batching=batching),
        **every, "load_best_model_at_end": True, "metric_for_best_model": metric,
        "greater_is_better": metric != "eval_loss"})
    lineage = tracking.inherit_lineage(data_manifest, config, inputs)
    lineage.update(task="classification", labels=labels, attention=attention, backend="hf", method=settings.method,
                   batching=batching, batching_reason=batching_reason, validation_rows=len(validation),
                   metric_for_best=metric, early_stopping_patience=patience)
    with training.stage_outputs(config, STAGE, lineage, output) as (tracker, out):
        if peft_config is not None:
            from peft import get_peft_model

            model = get_peft_model(model, peft_config)
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=train,
            eval_dataset=validation,
            data_collator=DataCollatorWithPadding(tokenizer),
            processing_class=tokenizer,
            compute_metrics=classification.trainer_metrics,
            callbacks=training.callbacks(settings.model_copy(update={"early_stopping_patience": patience}), "sft/",
                                         tracker, config.storage.endpoint_url),
        )
        trainer.data_collator = padding = training.PaddingCount(trainer.data_collator, trainer.model)
        metrics = training.train_and_save(
            trainer, stage=STAGE, title=f"classifier ({settings.method})", tracker=tracker, out=out, lineage=lineage,
            resume=resume, has_eval=True, tokenizer=tokenizer, tokenizer_source=model_path,
            adapter_base=None if settings.method == "full" else config.base_model.source,
            trained_token_fraction=None, padding=padding)
    shutil.rmtree(checkpoints, ignore_errors=True)
    return tracker.result(metrics, output)
