"""The training backend of sft and dpo: transformers + peft (`hf`) or Unsloth's kernels (`unsloth`).

Both hand their model to the same TRL trainers and save through the same code, so the outputs (a peft adapter or
full weights, the tokenizer, the manifest) have the same form and merge, evaluate and export-gguf take either.
Unsloth patches transformers, peft and trl when it is imported, so it is imported before them
(`import_unsloth_first`, called by the CLI and the pipeline before a training stage's module is loaded).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import sys
from typing import Any

import torch

from tuneforge.config import BaseModelSettings, LoraSettings, TrainSettings
from tuneforge.errors import SetupError

log = logging.getLogger(__name__)


def unsloth_missing() -> str | None:
    """Why Unsloth cannot run in this process, or None when it can."""
    if importlib.util.find_spec("unsloth") is None:
        return ("the unsloth package is not installed (pip install 'tuneforge[unsloth]' in a separate environment: it "
                "pins older transformers and trl; the tuneforge-cuda image has it)")
    return None


def hf_cannot_train() -> str | None:
    """Why the hf backend cannot train in this environment: trl before 1.16 (Unsloth's pin) runs its LM head only as
    a Triton kernel, which has no CPU version."""
    from importlib.metadata import version

    from packaging.version import Version

    if Version(version("trl")) < Version("1.16") and not torch.cuda.is_available():
        return f"trl {version('trl')} here runs its LM head only as a Triton (GPU) kernel"
    return None


def import_unsloth_first(settings: TrainSettings) -> None:
    """Only where choose() can pick it: importing Unsloth patches transformers and trl for the whole process."""
    wanted = settings.backend == "unsloth" or (
        settings.backend == "auto" and (torch.cuda.is_available() or hf_cannot_train() is not None))
    if wanted and unsloth_missing() is None:
        with contextlib.redirect_stdout(sys.stderr):  # its banner; stdout is for the stage's JSON result
            import unsloth  # noqa: F401


def choose(settings: TrainSettings, stage: str, processes: int) -> tuple[str, str]:
    """The backend to train with and why; a backend that cannot train here (set, or left to auto) is an error.

    auto takes Unsloth only on a CUDA GPU, where its kernels are. Set explicitly, it also runs on the CPU, in Unsloth's
    own CPU mode (stock transformers and peft underneath: no faster than hf, but the same code path of this stage)."""
    why_not = unsloth_missing()
    if processes > 1:
        why_not = f"Unsloth trains on one GPU and this stage runs {processes} processes"
    if settings.backend == "auto" and why_not is None and not torch.cuda.is_available():
        hf_blocked = hf_cannot_train()
        if hf_blocked:
            return "unsloth", f"auto: {hf_blocked}; Unsloth's CPU mode trains instead"
        why_not = "no CUDA GPU is visible (Unsloth's kernels are CUDA kernels)"
    if settings.backend == "unsloth":
        if why_not:
            raise SetupError(f"{stage}.backend: unsloth cannot run here: {why_not}; set {stage}.backend: hf "
                                     "(or auto, which picks unsloth where it can run)")
        return "unsloth", "set in the config"
    if settings.backend == "auto" and why_not is None:
        return "unsloth", "auto: a CUDA GPU and the unsloth package are present"
    if hf_cannot_train():
        from importlib.metadata import version

        raise SetupError(f"trl {version('trl')} needs Triton for its LM head and none is installed here (a CPU "
                                 "machine): train with backend: unsloth in this environment, or with trl 1.16 "
                                 "(the CPU environment, make setup)")
    return "hf", "set in the config" if settings.backend == "hf" else f"auto: {why_not}"


def unsloth_load(path: str, model: BaseModelSettings, settings: TrainSettings, *, max_length: int, dtype: torch.dtype,
                 four_bit: bool, full: bool):
    """FastLanguageModel.from_pretrained; a model Unsloth cannot take is refused with its reason."""
    from unsloth import FastLanguageModel

    try:
        loaded, _tokenizer = FastLanguageModel.from_pretrained(
            model_name=path,
            max_seq_length=max_length,
            dtype=dtype,
            load_in_4bit=four_bit,
            full_finetuning=full,
            revision=model.revision,
            trust_remote_code=model.trust_remote_code,
        )
    except (NotImplementedError, ValueError, KeyError, RuntimeError) as exc:
        raise SetupError(f"Unsloth cannot load {path}: {exc}; set backend: hf to train it with transformers") from None
    return loaded


def unsloth_lora(model, lora: LoraSettings, modules: list[str] | str, settings: TrainSettings, max_length: int):
    """Unsloth's get_peft_model: its fused LoRA kernels, and its gradient checkpointing, which offloads activations
    to host memory (Unsloth's default; long rows fit in much less VRAM for a few percent of speed)."""
    from unsloth import FastLanguageModel

    options: dict[str, Any] = dict(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=modules,
        bias="none",
        use_gradient_checkpointing="unsloth",
        random_state=settings.seed,
        use_rslora=lora.use_rslora,
        max_seq_length=max_length,
    )
    if lora.use_dora:
        options["use_dora"] = True
    return FastLanguageModel.get_peft_model(model, **options)


def patch_dpo_trainer() -> None:
    """Unsloth's faster DPO step; applied before trl's DPOTrainer is used."""
    import unsloth

    patch = getattr(unsloth, "PatchDPOTrainer", None)
    if patch is not None:
        patch()
    else:
        log.warning("this unsloth build has no PatchDPOTrainer; DPO runs with trl's own step on Unsloth's model")
