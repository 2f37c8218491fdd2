"""Stage sft: supervised fine-tuning with trl's SFTTrainer (full, LoRA or QLoRA), on the hf or the Unsloth backend,
in one process or several (`sft.distributed`: the stage starts itself again under torchrun).

With task: classification it trains a sequence classifier instead (train_classifier): a classification head on the
model, in full or with LoRA (the head then trained in full), scored on validation rows after each epoch.

Inputs: data (a data-prep output).
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
        metrics = training.train_and_save(
            trainer, stage=STAGE, title=f"SFT ({settings.method})", tracker=tracker, out=out, lineage=lineage,
            resume=resume, has_eval=has_eval, tokenizer=tokenizer, tokenizer_source=model_path,
            adapter_base=None if settings.method == "full" else config.base_model.source,
            trained_token_fraction=trained_fraction, padding=padding)
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
