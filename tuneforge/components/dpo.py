"""Stage dpo: preference tuning with trl's DPOTrainer on top of the SFT result, with LoRA.

Inputs: data (a data-prep output with preference pairs), model (an sft output).
Reference model: after LoRA SFT, the SFT adapter itself (trl keeps a frozen copy and trains the other);
after full SFT, the SFT model with the new DPO adapter switched off. No second model is loaded either way.
Backends and processes as for sft (`dpo.backend`, `dpo.distributed`); with Unsloth, its PatchDPOTrainer step.
The likelihood guard (`dpo.max_chosen_logp_drop`, training.LikelihoodGuard) stops a run that pushes the chosen answers'
log-probability far below the reference's and keeps the last checkpoint within the margin; `dpo.rpo_alpha` adds
TRL's NLL term on the chosen answers (RPO), which holds them up.
Outputs: a LoRA adapter, the tokenizer, train_history.json, loss_curve.png, manifest.json. An adapter trained
on top of a full SFT model records `adapter_base: sft`: merge it with `--input base=SFT_OUTPUT`.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path
from typing import Any

import torch

from tuneforge import backends, distributed, models, storage, tracking, training
from tuneforge.config import Config
from tuneforge.data import prepared
from tuneforge.errors import SetupError

log = logging.getLogger(__name__)

STAGE = "dpo"


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


def _guard_every(settings, pairs: int) -> int:
    """How often the likelihood guard looks when dpo.eval_steps is not set: about five times over the run."""
    steps = settings.max_steps
    if steps <= 0:
        steps = math.ceil(math.ceil(pairs / (settings.batch_size * settings.grad_accum)) * settings.epochs)
    return max(1, steps // 5)


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
        raise SetupError(f"{sft_dir} was trained with another chat template than {data_dir} records")
    train, evaluation = prepared.preference_split(data_dir, "train"), prepared.preference_split(data_dir, "eval")
    if len(train) == 0:
        raise SetupError(
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
        model = PeftModel.from_pretrained(training.load_for_training(config, base_path), str(sft_dir), is_trainable=True)
        # The adapter names the base portably; peft looks that name up when saving, so give it the local path.
        model.peft_config["default"].base_model_name_or_path = base_path
    else:
        model = models.load_model(str(sft_dir), config.base_model)
        peft_config = training.lora_config(settings.lora, models.target_modules(model, settings.lora.target_modules))

    guard = None
    if settings.max_chosen_logp_drop is not None:
        if has_eval:
            guard = training.LikelihoodGuard(settings.max_chosen_logp_drop, settings.beta)
        else:
            log.warning("the likelihood guard is off: there are no held-out pairs to watch (data.eval_fraction 0?)")
    # RPO: TRL's NLL term on the chosen answers, next to the DPO loss.
    losses = {"loss_type": [settings.loss_type, "sft"], "loss_weights": [1.0, settings.rpo_alpha]} if settings.rpo_alpha \
        else {"loss_type": [settings.loss_type]}
    args = DPOConfig(
        **training.trainer_arguments(settings, checkpoints, has_eval, quantized=quantized,
                                     guard_every=_guard_every(settings, len(train)) if guard else None),
        beta=settings.beta,
        max_length=config.data.max_length,
        **losses,
    )
    lineage = tracking.inherit_lineage(sft_manifest, config, inputs)
    lineage.update(backend=backend, backend_reason=why, method="lora", adapter_base=adapter_base,
                   **distributed.describe(settings))
    with training.stage_outputs(config, STAGE, lineage, output) as (tracker, out):
        trainer = DPOTrainer(
            model=model,
            args=args,
            train_dataset=train,
            eval_dataset=evaluation if has_eval else None,
            processing_class=tokenizer,
            peft_config=peft_config,
            callbacks=training.callbacks(settings, "dpo/", tracker, config.storage.endpoint_url) + ([guard] if guard else []),
        )
        rows = trainer.train_dataset
        lengths = [(len(p), len(c), len(r))
                   for p, c, r in zip(rows["prompt_ids"], rows["chosen_ids"], rows["rejected_ids"], strict=True)]
        if backend == "unsloth":
            lineage["attention"] = "unsloth"
        else:
            longest = max(p + max(c, r) for p, c, r in lengths)
            lineage["attention"] = training.choose_attention(trainer.model, settings, longest)
        # Both answers are trained on; their prompt is not.
        answer_tokens = sum(c + r for _, c, r in lengths)
        metrics = training.train_and_save(
            trainer, stage=STAGE, title="DPO", tracker=tracker, out=out, lineage=lineage, resume=resume,
            has_eval=has_eval, tokenizer=tokenizer, tokenizer_source=sft_dir,
            adapter_base=config.base_model.source if adapter_base == "base_model" else "sft",
            trained_token_fraction=answer_tokens / (answer_tokens + sum(2 * p for p, _, _ in lengths)), guard=guard,
            selected_adapters=["default"])
    shutil.rmtree(checkpoints, ignore_errors=True)
    return tracker.result(metrics, output)
