"""Stage sft: supervised fine-tuning with trl's SFTTrainer (full, LoRA or QLoRA), on the hf or the Unsloth backend,
in one process or several (`sft.distributed`: the stage starts itself again under torchrun).

Inputs: data (a data-prep output).
Outputs: the adapter (LoRA/QLoRA) or full weights, with the tokenizer and the training chat template,
train_history.json, loss_curve.png and manifest.json. Checkpoints go to OUTPUT.checkpoints so that a killed
run resumes (`resume: auto`); they are removed when the stage succeeds.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

import mlflow
import pyarrow.parquet as pq
import torch
from datasets import Dataset

from tuneforge import backends, distributed, models, storage, tracking, training
from tuneforge.config import Config
from tuneforge.training import TrainingSetupError

log = logging.getLogger(__name__)

STAGE = "sft"


def load_split(data_dir: Path, split: str, loss_on: str) -> Dataset:
    """The pre-tokenized rows from data-prep, with labels masked to what the config trains on."""
    path = data_dir / f"sft_{split}.parquet"
    # datasets cannot read a parquet file without rows (data.eval_fraction 0 writes one).
    if pq.ParquetFile(path).metadata.num_rows == 0:
        return Dataset.from_dict({"input_ids": [], "labels": []})
    dataset = Dataset.from_parquet(str(path))

    def add_labels(row: dict[str, Any]) -> dict[str, Any]:
        if loss_on == "all":
            return {"labels": row["input_ids"]}
        return {"labels": [t if m else -100 for t, m in zip(row["input_ids"], row["assistant_masks"], strict=True)]}

    return dataset.map(add_labels, remove_columns=["messages", "text", "assistant_masks"])


def check_loss_mask(dataset: Dataset, loss_on: str, sample: int = 64) -> float:
    """Fail before training when the loss mask of a sample batch would teach nothing, or teach the prompt."""
    rows = dataset.select(range(min(sample, len(dataset))))
    total = sum(len(r["labels"]) for r in rows)
    trained = sum(sum(1 for t in r["labels"] if t != -100) for r in rows)
    if trained == 0:
        raise TrainingSetupError("the loss mask is all zeros on a sample batch: no token would be trained")
    if loss_on == "assistant" and trained == total:
        raise TrainingSetupError(
            "sft.loss_on is assistant but the loss mask is all ones on a sample batch (raw text data has no "
            "prompt); set sft.loss_on: all to train on every token"
        )
    return trained / total


def load_for_training(config: Config, model_path: str):
    settings = config.sft
    if settings.method != "qlora":
        return models.load_model(model_path, config.base_model, dtype=torch.float32)
    from peft import prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig

    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise TrainingSetupError("sft.method qlora needs bitsandbytes: pip install bitsandbytes") from None
    compute = torch.bfloat16 if training.precision(settings) == "bf16" else torch.float32
    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute,
        bnb_4bit_quant_storage=compute,
    )
    # Under torchrun each process puts its copy on its own GPU.
    placement = {"device_map": {"": int(os.environ["LOCAL_RANK"])}} if distributed.launched() and torch.cuda.is_available() else {}
    model = models.load_model(model_path, config.base_model, dtype=compute, quantization_config=quantization, **placement)
    # On CPUs with avx512_bf16 any eval-mode forward repacks the 4-bit weights in place and later training
    # silently loses its gradients, so the 4-bit model must never run in eval mode before or during training.
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=settings.gradient_checkpointing)


def run(config: Config, inputs: dict[str, Path], output: Path) -> dict[str, Any]:
    settings = config.sft
    if distributed.needs_launch(settings):
        return distributed.launch(STAGE, config, inputs, output)
    from trl import SFTConfig, SFTTrainer

    backend, why = backends.choose(settings, STAGE, distributed.world_size())
    log.info("backend: %s (%s)", backend, why)
    data_dir = Path(inputs["data"])
    data_manifest = storage.read_manifest(data_dir, "data-prep")
    train = load_split(data_dir, "train", settings.loss_on)
    evaluation = load_split(data_dir, "eval", settings.loss_on)
    if len(train) == 0:
        raise TrainingSetupError(f"{data_dir}: no SFT training rows (the data holds only preference pairs?)")
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
    if backend == "unsloth":
        model = backends.unsloth_load(model_path, config.base_model, settings, max_length=config.data.max_length,
                                      dtype=training.compute_dtype(settings), four_bit=settings.method == "qlora",
                                      full=settings.method == "full")
        if settings.method != "full":
            modules = models.target_modules(model, settings.lora.target_modules)
            model = backends.unsloth_lora(model, settings.lora, modules, settings, config.data.max_length)
        attention = "unsloth"
    else:
        model = load_for_training(config, model_path)
        if settings.method in ("lora", "qlora"):
            peft_config = training.lora_config(settings.lora, models.target_modules(model, settings.lora.target_modules))
        attention = training.choose_attention(model, settings, longest)

    args = SFTConfig(
        **training.trainer_arguments(settings, checkpoints, has_eval, quantized=settings.method == "qlora"),
        max_length=config.data.max_length,
        packing=settings.packing,
        dataset_num_proc=None,
    )
    lineage = tracking.inherit_lineage(data_manifest, config)
    lineage.update(attention=attention, backend=backend, backend_reason=why, **distributed.describe(settings))
    training.score_only_labelled_positions()
    with training.stage_outputs(config, STAGE, lineage, output) as (mlrun, out):
        trainer = SFTTrainer(
            model=model,
            args=args,
            train_dataset=train,
            eval_dataset=evaluation if has_eval else None,
            processing_class=tokenizer,
            peft_config=peft_config,
            callbacks=training.callbacks(settings, "sft/", config.storage.endpoint_url),
        )
        result = trainer.train(resume_from_checkpoint=resume)
        metrics = {"train_loss": result.training_loss, "steps": result.global_step, "trained_token_fraction": trained_fraction}
        metrics.update({k: v for k, v in result.metrics.items() if isinstance(v, (int, float))})
        if has_eval:
            metrics.update(trainer.evaluate())
        if torch.cuda.is_available():
            metrics["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        training.save_trained(trainer, out)
        if distributed.is_main_process():
            models.save_tokenizer(tokenizer, out, model_path)
            kind = "full" if settings.method == "full" else "adapter"
            if kind == "adapter":
                training.set_adapter_base(out, config.base_model.source)
            training.save_history(trainer.state.log_history, out, f"SFT ({settings.method})")
            tracking.record(f"artifact {STAGE}/loss_curve.png", mlflow.log_artifact, str(out / "loss_curve.png"),
                            artifact_path=STAGE)
            tracking.record("the final metrics", mlflow.log_metrics,
                            {f"sft/final_{k}": float(v) for k, v in metrics.items() if isinstance(v, (int, float))})
            lineage.update(kind=kind, method=settings.method, **tracking.run_record(mlrun))
            storage.write_manifest(out, STAGE, lineage, metrics)
    shutil.rmtree(checkpoints, ignore_errors=True)
    return {"status": "succeeded", "metrics": metrics, "output": str(output)}
