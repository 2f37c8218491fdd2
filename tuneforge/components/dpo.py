"""Stage dpo: preference tuning with trl's DPOTrainer on top of the SFT result, with LoRA.

Inputs: data (a data-prep output with preference pairs), model (an sft output).
Reference model: after LoRA SFT, the SFT adapter itself (trl keeps a frozen copy and trains the other);
after full SFT, the SFT model with the new DPO adapter switched off. No second model is loaded either way.
Backends and processes as for sft (`dpo.backend`, `dpo.distributed`); with Unsloth, its PatchDPOTrainer step.
Outputs: a LoRA adapter, the tokenizer, train_history.json, loss_curve.png, manifest.json. An adapter trained
on top of a full SFT model records `adapter_base: sft`: merge it with `--input base=SFT_OUTPUT`.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import mlflow
import torch
from datasets import Dataset

from tuneforge import backends, distributed, models, storage, tracking, training
from tuneforge.components.sft import load_for_training
from tuneforge.config import Config
from tuneforge.training import TrainingSetupError

log = logging.getLogger(__name__)

STAGE = "dpo"


def load_pairs(data_dir: Path, split: str) -> Dataset:
    path = data_dir / f"preference_{split}.jsonl"
    if path.stat().st_size == 0:
        return Dataset.from_dict({"prompt": [], "chosen": [], "rejected": []})
    return Dataset.from_json(str(path))


def load_with_unsloth(config: Config, sft_dir: Path, sft_kind: str, quantized: bool):
    """The model to train with Unsloth: after LoRA SFT, the base with the SFT adapter's LoRA layers (Unsloth's) holding
    the SFT weights; after full SFT, the SFT model with a new adapter."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    settings = config.dpo
    dtype = training.compute_dtype(settings)
    if sft_kind == "adapter":
        model = backends.unsloth_load(models.resolve(config.base_model), config.base_model, settings,
                                      max_length=config.data.max_length, dtype=dtype, four_bit=quantized, full=False)
        adapter = json.loads((sft_dir / "adapter_config.json").read_text())
        lora = settings.lora.model_copy(update={"r": adapter["r"], "alpha": adapter["lora_alpha"],
                                                "use_rslora": adapter.get("use_rslora", False),
                                                "use_dora": adapter.get("use_dora", False)})
        model = backends.unsloth_lora(model, lora, sorted(adapter["target_modules"]), settings, config.data.max_length)
        set_peft_model_state_dict(model, load_file(sft_dir / "adapter_model.safetensors"))
        return model
    model = backends.unsloth_load(str(sft_dir), config.base_model, settings, max_length=config.data.max_length,
                                  dtype=dtype, four_bit=False, full=False)
    modules = models.target_modules(model, settings.lora.target_modules)
    return backends.unsloth_lora(model, settings.lora, modules, settings, config.data.max_length)


def run(config: Config, inputs: dict[str, Path], output: Path) -> dict[str, Any]:
    settings = config.dpo
    if distributed.needs_launch(settings):
        return distributed.launch(STAGE, config, inputs, output)
    from peft import PeftModel

    backend, why = backends.choose(settings, STAGE, distributed.world_size())
    log.info("backend: %s (%s)", backend, why)
    if backend == "unsloth":
        backends.patch_dpo_trainer()
    from trl import DPOConfig, DPOTrainer

    data_dir, sft_dir = Path(inputs["data"]), Path(inputs["model"])
    data_manifest = storage.read_manifest(data_dir, "data-prep")
    sft_manifest = storage.read_manifest(sft_dir, "sft")
    if sft_manifest["lineage"]["chat_template_sha256"] != data_manifest["lineage"]["chat_template_sha256"]:
        raise TrainingSetupError(f"{sft_dir} was trained with another chat template than {data_dir} records")
    train, evaluation = load_pairs(data_dir, "train"), load_pairs(data_dir, "eval")
    if len(train) == 0:
        raise TrainingSetupError(
            f"{data_dir}: no preference pairs to train on; add prompt/chosen/rejected data or set dpo.enabled: false"
        )
    has_eval = len(evaluation) > 0
    quantized = sft_manifest["lineage"]["method"] == "qlora"
    if quantized and has_eval and not torch.cuda.is_available():
        log.warning("qlora on CPU: evaluation during training is off (eval-mode forwards corrupt 4-bit weights)")
        has_eval = False

    tokenizer = models.load_tokenizer(str(sft_dir), config.base_model)
    checkpoints = training.checkpoint_dir(output)
    with training.main_process_first():
        resume = training.resume_from(settings, checkpoints, config.storage.endpoint_url)
    torch.manual_seed(settings.seed)
    peft_config = None
    sft_kind = sft_manifest["lineage"]["kind"]
    adapter_base = "base_model" if sft_kind == "adapter" else "sft"
    if backend == "unsloth":
        model = load_with_unsloth(config, sft_dir, sft_kind, quantized)
    elif sft_kind == "adapter":
        # After QLoRA SFT the base is loaded in 4 bits again, as it was trained.
        base_path = models.resolve(config.base_model)
        model = PeftModel.from_pretrained(load_for_training(config, base_path), str(sft_dir), is_trainable=True)
        # The adapter names the base portably; peft looks that name up when saving, so give it the local path.
        model.peft_config["default"].base_model_name_or_path = base_path
    else:
        model = models.load_model(str(sft_dir), config.base_model)
        peft_config = training.lora_config(settings.lora, models.target_modules(model, settings.lora.target_modules))

    args = DPOConfig(
        **training.trainer_arguments(settings, checkpoints, has_eval, quantized=quantized),
        beta=settings.beta,
        loss_type=[settings.loss_type],
        max_length=config.data.max_length,
    )
    lineage = tracking.inherit_lineage(sft_manifest, config)
    lineage.update(backend=backend, backend_reason=why, **distributed.describe(settings))
    training.score_only_labelled_positions()
    with training.stage_outputs(config, STAGE, lineage, output) as (mlrun, out):
        trainer = DPOTrainer(
            model=model,
            args=args,
            train_dataset=train,
            eval_dataset=evaluation if has_eval else None,
            processing_class=tokenizer,
            peft_config=peft_config,
            callbacks=training.callbacks(settings, "dpo/", config.storage.endpoint_url),
        )
        if backend == "unsloth":
            lineage["attention"] = "unsloth"
        else:
            rows = trainer.train_dataset
            longest = max(len(p) + max(len(c), len(r)) for p, c, r in zip(rows["prompt_ids"], rows["chosen_ids"], rows["rejected_ids"]))
            lineage["attention"] = training.choose_attention(trainer.model, settings, longest)
        result = trainer.train(resume_from_checkpoint=resume)
        metrics = {"train_loss": result.training_loss, "steps": result.global_step}
        if has_eval:
            metrics.update(trainer.evaluate())
        if torch.cuda.is_available():
            metrics["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        training.save_trained(trainer, out, selected_adapters=["default"])
        if distributed.is_main_process():
            models.save_tokenizer(tokenizer, out, sft_dir)
            training.set_adapter_base(out, config.base_model.source if adapter_base == "base_model" else "sft")
            training.save_history(trainer.state.log_history, out, "DPO")
            tracking.record(f"artifact {STAGE}/loss_curve.png", mlflow.log_artifact, str(out / "loss_curve.png"),
                            artifact_path=STAGE)
            tracking.record("the final metrics", mlflow.log_metrics,
                            {f"dpo/final_{k}": float(v) for k, v in metrics.items() if isinstance(v, (int, float))})
            lineage.update(kind="adapter", method="lora", adapter_base=adapter_base, **tracking.run_record(mlrun))
            storage.write_manifest(out, STAGE, lineage, metrics)
    shutil.rmtree(checkpoints, ignore_errors=True)
    return {"status": "succeeded", "metrics": metrics, "output": str(output)}
