"""The fine-tuning guide's hyperparameter table, as advice: a value far outside the usual range is worth a second look,
not an error (a small model, a short run or a task the table was not written for can need it). `tuneforge validate`
and the evaluation report show these warnings; each names the key, the value and the range."""

from __future__ import annotations

from tuneforge.config import Config, TrainSettings

# method -> (low, high) learning rate. The table's LoRA range applies to QLoRA too (the adapter is what trains).
LEARNING_RATES = {"full": (1e-5, 5e-5), "lora": (1e-5, 3e-4), "qlora": (1e-5, 3e-4)}
RANK = (8, 128)
EFFECTIVE_BATCH = (8, 128)
EPOCHS = (1, 5)
WARMUP = (0.03, 0.10)
DPO_BETA = (0.01, 0.5)


def _outside(key: str, value: float, low: float, high: float, what: str) -> str | None:
    if low <= value <= high:
        return None
    return f"{key} is {value:g}, outside the guide's range for {what} ({low:g} to {high:g})"


def _training(section: str, settings: TrainSettings, method: str, processes: int) -> list[str | None]:
    lora = method in ("lora", "qlora")
    found = [
        _outside(f"{section}.learning_rate", settings.learning_rate, *LEARNING_RATES[method], f"{method} fine-tuning"),
        _outside(f"{section}.batch_size x grad_accum x processes", settings.batch_size * settings.grad_accum * processes,
                 *EFFECTIVE_BATCH, "the effective batch"),
        _outside(f"{section}.warmup_ratio", settings.warmup_ratio, *WARMUP, "warm-up (share of the steps)"),
    ]
    if settings.max_steps <= 0:  # the epochs decide the length only without max_steps
        found.append(_outside(f"{section}.epochs", settings.epochs, *EPOCHS, "epochs"))
    if lora:
        found.append(_outside(f"{section}.lora.r", settings.lora.r, *RANK, "the LoRA rank"))
        found.append(_outside(f"{section}.lora.alpha", settings.lora.alpha, settings.lora.r, 2 * settings.lora.r,
                              "the LoRA alpha (r to 2r)"))
    return found


def _processes(config: Config, stage: str) -> int:
    """Processes training the stage together: per node (as set, or one per GPU the pod asks for) times nodes."""
    spread = getattr(config, stage).distributed
    per_node = spread.processes if isinstance(spread.processes, int) else max(config.cluster.for_stage(stage).gpus or 0, 1)
    return per_node * spread.nodes


def hyperparameter_warnings(config: Config) -> list[str]:
    """Every value outside the guide's table, for the stages this config runs."""
    found = _training("sft", config.sft, config.sft.method, _processes(config, "sft"))
    if config.dpo.enabled:
        # DPO trains a LoRA adapter whatever sft.method was; the table gives its beta, not its learning rate.
        found += [w for w in _training("dpo", config.dpo, "lora", _processes(config, "dpo"))
                  if w and not w.startswith("dpo.learning_rate")]
        if config.dpo.method == "dpo":  # the table's beta range is DPO's; the other methods' betas scale otherwise
            found.append(_outside("dpo.beta", config.dpo.beta_value, *DPO_BETA, "DPO's beta"))
    return [w for w in found if w]
