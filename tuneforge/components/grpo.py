"""Stage grpo: GRPO with verifiable rewards (TRL's GRPOTrainer, LoRA) on the SFT rows' prompts.

For each prompt the model generates grpo.num_generations answers; each answer is scored by the rewards of grpo.rewards
(rewards.py: valid JSON, a JSON Schema, exact or contained reference answer, a regex, a length penalty, a user function
with grpo.allow_code), and the model learns to prefer the answers that score above their group's mean. The reference
answer of a prompt is its row's last assistant turn.

Inputs: data (a data-prep output), optional model (an sft output; without it GRPO starts from the base model).
The KL penalty (grpo.beta) is to the starting model: after LoRA SFT a frozen copy of the SFT adapter (TRL keeps it),
after full SFT or from the base, the model with the new adapter switched off.
Outputs: a LoRA adapter, the tokenizer, train_history.json (rewards, KL and answer lengths per step), loss_curve.png,
rewards.png, manifest.json. An adapter trained on a full SFT model records `adapter_base: sft`.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import torch

from tuneforge import distributed, models, rewards, storage, tracking, training
from tuneforge.config import Config
from tuneforge.errors import SetupError

log = logging.getLogger(__name__)

STAGE = "grpo"


def prompts_and_answers(data_dir: Path, system_prompt: str | None):
    """The GRPO dataset: each SFT training row's turns before its last assistant turn as the prompt (with the system
    turn data-prep adds), that turn's content as the reference answer. Raw-text rows have no prompt and are left out."""
    from datasets import Dataset

    rows = []
    for messages in pq.read_table(Path(data_dir) / "sft_train.parquet", columns=["messages"]).column("messages").to_pylist():
        if not messages or messages[-1]["role"] != "assistant" or len(messages) < 2:
            continue
        prompt = messages[:-1]
        if system_prompt and prompt[0]["role"] != "system":
            prompt = [{"role": "system", "content": system_prompt}, *prompt]
        rows.append({"prompt": prompt, "answer": messages[-1]["content"]})
    return Dataset.from_list(rows)


def run(config: Config, inputs: dict[str, Path], output: Path) -> dict[str, Any]:
    settings = config.grpo
    if distributed.needs_launch(settings):
        return distributed.launch(STAGE, config, inputs, output)
    from peft import PeftModel
    from trl import GRPOConfig, GRPOTrainer

    if settings.backend == "unsloth":
        raise SetupError("grpo.backend: unsloth is not wired for GRPO here; set grpo.backend: hf (or auto)")
    backend, why = "hf", "GRPO trains with transformers/peft"
    functions, weights = rewards.build(settings.rewards)  # a reward that cannot be built fails before any work
    data_dir = Path(inputs["data"])
    data_manifest = storage.read_manifest(data_dir, "data-prep")
    sft_dir = Path(inputs["model"]) if inputs.get("model") else None
    sft_manifest = storage.read_manifest(sft_dir, "sft") if sft_dir else None
    if sft_manifest and sft_manifest["lineage"]["chat_template_sha256"] != data_manifest["lineage"]["chat_template_sha256"]:
        raise SetupError(f"{sft_dir} was trained with another chat template than {data_dir} records")
    train = prompts_and_answers(data_dir, config.data.system_prompt)
    if len(train) == 0:
        raise SetupError(f"{data_dir}: no prompts to train GRPO on; it takes chat rows (alpaca, messages, "
                         "prompt/completion) whose last turn is the assistant's reference answer")

    base_path = models.resolve(config.base_model)
    if sft_dir:
        tokenizer = models.load_tokenizer(str(sft_dir), config.base_model)
    else:  # from the base model: the chat template data-prep rendered the rows with, as sft would set it
        tokenizer = models.load_tokenizer(base_path, config.base_model)
        tokenizer.chat_template = data_manifest["lineage"]["chat_template"]
    answer_tokens = [len(ids) for ids in tokenizer(list(train["answer"]), add_special_tokens=False)["input_ids"]]
    max_completion = settings.max_completion_length or max(16, 2 * max(answer_tokens))
    checkpoints = training.checkpoint_dir(output)
    with training.main_process_first():
        resume = training.resume_from(settings, checkpoints, config.storage.endpoint_url)
    torch.manual_seed(settings.seed)
    peft_config = None
    adapter_base = "base_model"
    if sft_manifest and sft_manifest["lineage"]["kind"] == "adapter":
        # The SFT adapter goes on training; TRL keeps a frozen copy of it for the KL penalty.
        model = PeftModel.from_pretrained(training.load_for_training(config, base_path), str(sft_dir), is_trainable=True)
        model.peft_config["default"].base_model_name_or_path = base_path
    else:
        if sft_manifest:
            model, adapter_base = models.load_model(str(sft_dir), config.base_model), "sft"
        else:
            model = models.load_model(base_path, config.base_model, dtype=torch.float32)
        peft_config = training.lora_config(settings.lora, models.target_modules(model, settings.lora.target_modules))

    args = GRPOConfig(
        **training.trainer_arguments(settings, checkpoints, has_eval=False),
        num_generations=settings.num_generations,
        max_completion_length=max_completion,
        temperature=settings.temperature,
        beta=settings.beta,
        reward_weights=weights,
        log_completions=False,
    )
    lineage = tracking.inherit_lineage(sft_manifest or data_manifest, config, inputs)
    lineage.update(backend=backend, backend_reason=why, method="lora", adapter_base=adapter_base,
                   rewards=[r.model_dump(exclude_defaults=True) for r in settings.rewards],
                   max_completion_length=max_completion, prompts=len(train), starting_model="sft" if sft_dir else "base",
                   **distributed.describe(settings))
    with training.stage_outputs(config, STAGE, lineage, output) as (tracker, out):
        trainer = GRPOTrainer(
            model=model,
            args=args,
            train_dataset=train,
            processing_class=tokenizer,
            reward_funcs=functions,
            peft_config=peft_config,
            callbacks=training.callbacks(settings, "grpo/", tracker, config.storage.endpoint_url),
        )
        prompts = tokenizer.apply_chat_template(list(train["prompt"]), add_generation_prompt=True, return_dict=True)
        lineage["attention"] = training.choose_attention(
            trainer.model, settings, max_completion + max(len(ids) for ids in prompts["input_ids"]))
        metrics = training.train_and_save(
            trainer, stage=STAGE, title="GRPO", tracker=tracker, out=out, lineage=lineage, resume=resume,
            has_eval=False, tokenizer=tokenizer, tokenizer_source=sft_dir or base_path,
            adapter_base=config.base_model.source if adapter_base == "base_model" else "sft",
            trained_token_fraction=1.0, selected_adapters=["default"])
    shutil.rmtree(checkpoints, ignore_errors=True)
    return tracker.result(metrics, output)
