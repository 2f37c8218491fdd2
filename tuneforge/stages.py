"""The stages of the pipeline, in one place: the CLI, the pipeline, the task runner, the register stage and the
config read them from here; nothing else lists stages.

A stage has one name everywhere: `tuneforge stage NAME`, the KFP task, its output folder (locally and under
storage.uri), its MLflow run (`RUN/NAME`) and the `stage` of its manifest. Its code is the module
tuneforge/components/NAME.py (hyphens as underscores), with `run(config, inputs, output) -> result`.
An input is named after the KFP output it receives (`data`, `model`, ...).

Adding a stage: write its module, add its entry here, and wire it into the DAG in pipelines/pipeline.py.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Stage:
    name: str
    requires: tuple[str, ...] = ()  # inputs it cannot run without
    accepts: tuple[str, ...] = ()  # inputs it uses when given
    output: str = "output"  # its KFP output artifact, which later stages take as an input of that name
    trains: bool = False  # runs a Trainer: GPUs, checkpoints and their S3 mirror, backends, torchrun
    # Config sections (or section.key) it reads besides COMMON_SECTIONS: its task, and cache key, has only these.
    reads: tuple[str, ...] = ()

    @property
    def module(self) -> str:
        return "tuneforge.components." + self.name.replace("-", "_")

    @property
    def folder(self) -> str:
        """Its output folder, locally and under storage.uri/NAME/RUN_ID/."""
        return self.name

    @property
    def inputs(self) -> tuple[str, ...]:
        return self.requires + self.accepts


# What every stage reads: who it is, where it logs and publishes, the base model, the task. `data` is here too: a
# change to it reruns data-prep, whose new output reruns everything after it anyway.
COMMON_SECTIONS = ("name", "workdir", "task", "classification", "base_model", "data", "tracking", "storage")

STAGES = (
    # dpo.enabled, dpo.method: which rows are needed (preference pairs; for kto, pairs or unpaired rows).
    # export.enabled: a base model whose architecture GGUF export cannot write is refused before any training.
    Stage("data-prep", output="data",
          reads=("sft.enabled", "dpo.enabled", "dpo.method", "grpo.enabled", "export.enabled")),
    Stage("sft", requires=("data",), output="model", trains=True, reads=("sft",)),
    # dpo reloads the base as sft.method trained it (4 bits after QLoRA).
    # model: the sft output; without it (sft.enabled false, a reference-free method) dpo starts from the base model.
    Stage("dpo", requires=("data",), accepts=("model",), output="model", trains=True, reads=("sft", "dpo")),
    # grpo: after sft (model), or from the base model without it; it reloads the base as sft.method trained it.
    Stage("grpo", requires=("data",), accepts=("model",), output="model", trains=True, reads=("sft", "grpo")),
    Stage("merge", requires=("model",), accepts=("base",), output="model", reads=("merge",)),
    # champion: the registered champion's merged model, re-scored on the same data. sft_merged: the SFT model, scored
    # against DPO's. sft and dpo: the training stages' outputs, read for their loss curves. sft.loss_on decides the
    # held-out loss;
    # registry, whether the candidate beats the base model.
    Stage("evaluate", requires=("data", "model"), accepts=("champion", "sft_merged", "sft", "dpo", "grpo"), output="evaluation",
          reads=("sft", "evaluate", "registry")),
    Stage("export-gguf", requires=("model",), output="gguf", reads=("export",)),
    # evaluation: the merged model's answers, which the served GGUF's are compared with.
    Stage("serve-check", requires=("data", "gguf", "evaluation"), output="serving", reads=("evaluate", "serve_check")),
    Stage("register", requires=("evaluation", "model"), accepts=("gguf", "serving"), output="registration",
          reads=("registry",)),
)
BY_NAME = {stage.name: stage for stage in STAGES}
NAMES = tuple(BY_NAME)
TRAINING = tuple(stage.name for stage in STAGES if stage.trains)


def get(name: str) -> Stage:
    """The stage called `name`; a KeyError names the stages there are."""
    try:
        return BY_NAME[name]
    except KeyError:
        raise KeyError(f"unknown stage {name!r}; stages are {', '.join(NAMES)}") from None
