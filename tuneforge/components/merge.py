"""Stage merge: fold a LoRA adapter into its base weights and prove the merge.

Inputs: model (an sft or dpo output); base (optional: the full SFT model a DPO adapter was trained on;
otherwise the config's base model).
Proof: on probe prompts, the merged model's logits match the adapter model's within merge.tolerance (both in
fp32), or the stage fails. The cast to merge.dtype is measured too (max logit change, argmax agreement).
Outputs: sharded safetensors in merge.dtype, the tokenizer with the training chat template, manifest.json.
A full-weight input is only cast and re-saved. A classifier (task: classification) is merged the same way, its head
read from the adapter, and checked on its class logits.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import mlflow
import torch

from tuneforge import classification, models, storage, tracking
from tuneforge.config import Config
from tuneforge.errors import MergeCheckError, SetupError

log = logging.getLogger(__name__)

STAGE = "merge"
PROBES = [
    "Hello! Who are you?",
    "Write one sentence about the sea.",
    "List three colours.",
    "What is 12 plus 30?",
]


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@torch.no_grad()
def probe_logits(model, tokenizer) -> torch.Tensor:
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
             for p in PROBES] if tokenizer.chat_template else PROBES
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    logits = model(**batch).logits.float()
    if logits.dim() == 2:  # a classifier: one row of class logits per prompt
        return logits
    return logits[batch["attention_mask"].bool()]


def run(config: Config, inputs: dict[str, Path], output: Path) -> dict[str, Any]:
    from peft import PeftModel

    model_dir = Path(inputs["model"])
    manifest = storage.read_manifest(model_dir, ("sft", "dpo", "grpo"))
    lineage_in = manifest["lineage"]
    tokenizer = models.load_tokenizer(str(model_dir), config.base_model)
    tokenizer.padding_side = "left"
    metrics: dict[str, Any] = {}
    labels = lineage_in.get("labels") if lineage_in.get("task") == "classification" else None

    def load(path: str):
        if labels:
            return classification.load(path, config.base_model, labels, tokenizer.pad_token_id)
        return models.load_model(path, config.base_model)

    if lineage_in["kind"] == "full":
        merged = load(str(model_dir))
    else:
        if lineage_in.get("adapter_base") == "sft":
            if "base" not in inputs:
                raise SetupError(
                    f"{model_dir} is a DPO adapter on a full SFT model: pass that model with --input base=SFT_OUTPUT"
                )
            storage.read_manifest(Path(inputs["base"]), "sft")
            base_path = str(inputs["base"])
        else:
            base_path = models.resolve(config.base_model)
        base = load(base_path)
        adapted = PeftModel.from_pretrained(base, str(model_dir))
        adapted.eval()
        before = probe_logits(adapted, tokenizer)
        merged = adapted.merge_and_unload()
        after = probe_logits(merged, tokenizer)
        diff = (before - after).abs().max().item()
        metrics["merge_max_abs_logit_diff"] = diff
        if diff > config.merge.tolerance:
            raise MergeCheckError(
                f"merge check failed: merged logits differ from the adapter model's by {diff:.3g} "
                f"(> merge.tolerance={config.merge.tolerance})"
            )
        log.info("merge verified: max abs logit diff %.3g", diff)

    merged.eval()
    reference = probe_logits(merged, tokenizer)
    merged = merged.to(DTYPES[config.merge.dtype])
    cast = probe_logits(merged, tokenizer)
    metrics["cast_max_abs_logit_diff"] = (reference - cast).abs().max().item()
    metrics["cast_argmax_agreement"] = (reference.argmax(-1) == cast.argmax(-1)).float().mean().item()

    stop_ids = tokenizer.convert_tokens_to_ids(lineage_in.get("special_tokens", {}).get("stop", []))
    if stop_ids and not labels:
        merged.generation_config.eos_token_id = sorted(set(stop_ids))
    if not labels:
        merged.generation_config.pad_token_id = tokenizer.pad_token_id
    lineage = tracking.inherit_lineage(manifest, config, inputs)
    lineage.pop("adapter_base", None)
    lineage.update(kind="full", dtype=config.merge.dtype)
    with tracking.stage_run(config, STAGE, lineage) as tracker, storage.staged_output(output) as out:
        merged.save_pretrained(out, max_shard_size=config.merge.max_shard_size, safe_serialization=True)
        tokenizer.padding_side = "right"
        models.save_tokenizer(tokenizer, out, model_dir)
        tracker.record("the merge metrics", mlflow.log_metrics, metrics)
        lineage.update(tracker.run_record())
        storage.write_manifest(out, STAGE, lineage, metrics)
    return tracker.result(metrics, output)
