"""Stage dpo: preference tuning on top of the SFT result, with LoRA, by one of TRL's trainers (`dpo.method`):
dpo (DPOTrainer), kto (KTOTrainer: answers labelled good or bad one at a time), orpo (ORPOTrainer), simpo and cpo
(CPOTrainer). orpo, simpo and cpo have no reference model.

Inputs: data (a data-prep output with preference pairs, or for kto pairs or unpaired rows), model (an sft output).
Reference model (dpo, kto): after LoRA SFT, the SFT adapter itself (trl keeps a frozen copy and trains the other);
after full SFT, the SFT model with the new adapter switched off. No second model is loaded either way.
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


class SharedPrompt:
    """Computes each pair's prompt once. TRL's DPOTrainer scores a batch of pairs as 2 x pairs rows, [prompt + chosen]
    then [prompt + rejected], so every prompt goes through the model twice (and twice more for the reference). This
    replaces the forward of TRL's fused LM head with one over a row per pair, prompt + chosen + rejected, where the
    rejected answer follows a copy of the prompt's last token at that token's position, and a 4-D attention mask lets
    the chosen answer (with the prompt's last token) and the copy with the rejected answer each see the prompt and
    themselves but never each other. Every token then sees what it sees in TRL's rows, at the same positions, so the
    log-probabilities are those of the two-row forward (up to rounding); they are put back in TRL's [chosen; rejected]
    layout, so its losses and metrics are unchanged. Batches that do not share their prompts (truncated from the
    left) go through TRL's forward."""

    def __init__(self, causal_lm, sliding_window: int | None = None):
        self.model = causal_lm
        self.two_rows = causal_lm.forward
        self.eager = causal_lm.config._attn_implementation == "eager"
        # Models that mix full and sliding-window layers take one mask per layer type; the window is kept by position.
        self.sliding_window = sliding_window
        self.padded = self.total = 0

    def install(self) -> None:
        self.model.forward = self

    @property
    def share(self) -> float:
        """Padded positions among those the training forwards computed."""
        return self.padded / self.total if self.total else 0.0

    def __call__(self, *args, fused_lm_head=False, labels=None, **kwargs):
        layout = None
        if fused_lm_head and labels is not None and not args and not kwargs.get("output_router_logits"):
            layout = self.layout(kwargs["input_ids"], kwargs["attention_mask"], labels)
        if layout is None:
            return self.two_rows(*args, fused_lm_head=fused_lm_head, labels=labels, **kwargs)
        shape = kwargs.pop("input_ids").shape
        kwargs.pop("attention_mask")
        kwargs.pop("position_ids", None)
        ids, positions, targets, mask, (dst, src) = layout
        if self.model.training and torch.is_grad_enabled():
            self.padded += int((positions < 0).sum())
            self.total += ids.numel()
        out = self.two_rows(input_ids=ids, position_ids=positions.clamp(min=0), attention_mask=mask, labels=targets,
                            fused_lm_head=True, **kwargs)
        for name in training.FUSED_FIELDS:
            value = getattr(out, name, None)
            if value is not None:
                spread = value.new_zeros(shape[0], shape[1] - 1)
                spread[dst] = value[src]
                setattr(out, name, spread)
        return out

    def layout(self, input_ids, attention_mask, labels):
        """The shared rows of a [chosen; rejected] batch: ids, position ids (-1 on padding), labels, the 4-D mask, and
        where each scored position goes back to in TRL's layout (destination and source indices). None when a pair's
        two rows do not start with the same prompt."""
        pairs = input_ids.size(0) // 2
        rows, positions, targets, branches = [], [], [], []
        dst_rows, dst_cols, src_rows, src_cols = [], [], [], []
        for i in range(pairs):
            c_len, r_len = int(attention_mask[i].sum()), int(attention_mask[pairs + i].sum())
            c_ids, r_ids = input_ids[i, :c_len], input_ids[pairs + i, :r_len]
            c_lab, r_lab = labels[i, :c_len], labels[pairs + i, :r_len]
            p = _first_label(c_lab)
            if p == 0 or p != _first_label(r_lab) or not torch.equal(c_ids[:p], r_ids[:p]):
                return None
            c, r = c_len - p, r_len - p
            rows.append(torch.cat([c_ids, r_ids[p - 1:]]))
            positions.append(torch.cat([torch.arange(c_len), torch.arange(p - 1, r_len)]))
            targets.append(torch.cat([c_lab, c_lab.new_full((1,), -100), r_lab[p:]]))
            # 0: the prompt but its last token; 1: that token and the chosen answer; 2: its copy and the rejected one
            branches.append(torch.cat([torch.zeros(p - 1), torch.ones(c + 1), torch.full((r + 1,), 2.0)]))
            # output position t scores token t + 1
            dst_rows += [i] * c + [pairs + i] * r
            dst_cols += list(range(p - 1, p - 1 + c)) + list(range(p - 1, p - 1 + r))
            src_rows += [i] * (c + r)
            src_cols += list(range(p - 1, p - 1 + c)) + list(range(p + c, p + c + r))
        width = max(len(row) for row in rows)
        device = input_ids.device

        def padded(parts, value):
            return torch.stack([torch.nn.functional.pad(x, (0, width - len(x)), value=value) for x in parts]).to(device)

        ids, position_ids = padded(rows, 0), padded(positions, -1)
        branch = padded(branches, -1)
        index = torch.arange(width, device=device)
        allowed = (index[None, :] <= index[:, None])[None] & (
            (branch[:, None, :] == 0) | (branch[:, None, :] == branch[:, :, None])) & (branch[:, None, :] >= 0)
        diagonal = torch.eye(width, dtype=torch.bool, device=device)  # padding rows see themselves: no empty softmax
        mask = self.attention_mask(allowed | diagonal)
        if self.sliding_window:
            near = position_ids[:, None, :] > position_ids[:, :, None] - self.sliding_window
            mask = {"full_attention": mask, "sliding_attention": self.attention_mask((allowed & near) | diagonal)}
        index_pairs = ((torch.tensor(dst_rows, dtype=torch.long), torch.tensor(dst_cols, dtype=torch.long)),
                       (torch.tensor(src_rows, dtype=torch.long), torch.tensor(src_cols, dtype=torch.long)))
        return ids, position_ids, padded(targets, -100), mask, index_pairs

    def attention_mask(self, allowed):
        if self.eager:  # eager attention adds its mask to the scores
            return torch.zeros(allowed[:, None].shape, device=allowed.device).masked_fill(
                ~allowed[:, None], torch.finfo(torch.float32).min)
        return allowed[:, None]


def _pair_lengths(dataset) -> list[tuple[int, int, int]]:
    """Prompt, chosen and rejected token counts of each pair of a tokenized DPO dataset."""
    return [(len(p), len(c), len(r))
            for p, c, r in zip(dataset["prompt_ids"], dataset["chosen_ids"], dataset["rejected_ids"], strict=True)]


def _first_label(labels) -> int:
    scored = (labels != -100).nonzero()
    return int(scored[0]) if len(scored) else len(labels)


def share_prompts(trainer, settings, max_length: int, can_probe: bool) -> tuple[SharedPrompt | None, str]:
    """Install SharedPrompt on the trainer's model when dpo.shared_prompt allows and the model gives the same
    log-probabilities both ways on a probe batch; the reason either way."""
    if not settings.shared_prompt:
        return None, "dpo.shared_prompt: false"
    unwrapped = trainer.accelerator.unwrap_model(trainer.model)
    causal_lm = unwrapped.get_base_model() if hasattr(unwrapped, "get_base_model") else unwrapped
    text = causal_lm.config.get_text_config()
    attention = causal_lm.config._attn_implementation
    if attention not in ("eager", "sdpa"):
        return None, f"{attention} attention takes no 4-D attention mask"
    if getattr(text, "num_experts", None) or getattr(text, "num_local_experts", None):
        return None, "a mixture-of-experts model: its load-balancing loss reads a 2-D attention mask"
    window = getattr(text, "sliding_window", None)
    layer_types = set(getattr(text, "layer_types", None) or [])
    if window and layer_types - {"full_attention", "sliding_attention"}:
        return None, f"attention layers of types {sorted(layer_types)}: one mask cannot stand for them all"
    mixed = bool(window) and "sliding_attention" in layer_types
    if window and not mixed and 2 * max_length + 1 > window:
        return None, (f"sliding-window attention ({window} tokens) over shared rows of up to {2 * max_length + 1} "
                      "tokens: a 4-D mask would replace the window")
    shared = SharedPrompt(causal_lm, window if mixed else None)
    if not can_probe:
        shared.install()
        return shared, "on (not probed: a 4-bit model is never run in eval mode on the CPU)"
    try:
        with training.labelled_positions_only():
            difference = shared_prompt_difference(causal_lm, shared, trainer.processing_class.pad_token_id or 0)
    except Exception as err:  # a model that does not take 4-D masks or per-layer-type masks
        return None, f"the model's forward does not take the shared rows' attention mask ({tracking.first_line(err)})"
    if difference > SHARED_PROMPT_TOLERANCE:
        return None, f"the shared-prompt forward differs from TRL's two rows on a probe by {difference:.3g}"
    shared.install()
    return shared, f"on: the same log-probabilities as TRL's two rows on a probe (largest difference {difference:.2g})"


# Log-probabilities summed over an answer in fp32: the two layouts differ by rounding only (about 1e-5).
SHARED_PROMPT_TOLERANCE = 1e-3


@torch.no_grad()
def shared_prompt_difference(causal_lm, shared: SharedPrompt, pad_id: int) -> float:
    """The largest per-token log-probability difference between TRL's two rows and the shared row on two random pairs
    of different lengths, the model in eval mode and fp32. With a sliding window of up to 1024 tokens, one prompt is
    longer than the window, so that the window is checked too."""
    from trl.trainer.utils import pad

    vocab = causal_lm.config.get_text_config().vocab_size
    generator = torch.Generator().manual_seed(0)
    device = next(causal_lm.parameters()).device
    window = shared.sliding_window or 0
    long_prompt = window + 3 if window <= 1024 else 7
    pairs = [[torch.randint(3, vocab, (n,), generator=generator) for n in lengths]
             for lengths in ((long_prompt, 5, 3), (4, 2, 6))]
    sequences = [torch.cat([p, c]) for p, c, _ in pairs] + [torch.cat([p, r]) for p, _, r in pairs]
    prompts = [len(p) for p, _, _ in pairs] * 2
    ids = pad(sequences, padding_value=pad_id, padding_side="right").to(device)
    mask = pad([torch.ones(len(s), dtype=torch.long) for s in sequences], padding_value=0, padding_side="right").to(device)
    labels = ids.masked_fill(mask == 0, -100)
    for row, prompt in enumerate(prompts):
        labels[row, :prompt] = -100
    was_training = causal_lm.training
    causal_lm.eval()
    try:
        two = shared.two_rows(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True, use_cache=False)
        one = shared(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True, use_cache=False)
    finally:
        causal_lm.train(was_training)
    return (two.log_probs.float() - one.log_probs.float()).abs().max().item()


# dpo.method: where TRL keeps its trainer and config (ORPO and CPO live in trl.experimental since TRL 1.0).
TRAINERS = {
    "dpo": ("trl", "DPOConfig", "DPOTrainer"),
    "kto": ("trl", "KTOConfig", "KTOTrainer"),
    "orpo": ("trl.experimental.orpo", "ORPOConfig", "ORPOTrainer"),
    "simpo": ("trl.experimental.cpo", "CPOConfig", "CPOTrainer"),
    "cpo": ("trl.experimental.cpo", "CPOConfig", "CPOTrainer"),
}


def trl_classes(method: str):
    import importlib
    import warnings

    module, config_class, trainer_class = TRAINERS[method]
    with warnings.catch_warnings():  # trl.experimental warns on import that its API may change: pinned here
        warnings.simplefilter("ignore")
        loaded = importlib.import_module(module)
    return getattr(loaded, config_class), getattr(loaded, trainer_class)


def method_options(settings, train) -> tuple[dict[str, Any], dict[str, Any]]:
    """The method's own TRL config options, and what of them goes into the lineage."""
    beta = settings.beta_value
    if settings.method == "simpo":  # TRL's recipe for SimPO: CPO's trainer, its simpo loss, no BC term
        return {"beta": beta, "loss_type": "simpo", "cpo_alpha": 0.0, "simpo_gamma": settings.simpo_gamma}, \
            {"beta": beta, "simpo_gamma": settings.simpo_gamma}
    if settings.method == "kto":
        # KTO's paper: the weighted good and bad answers should be about equally many (TRL warns otherwise), so the
        # rarer kind gets the larger weight.
        good = sum(train["label"])
        bad = len(train) - good
        weights = {"desirable_weight": max(1.0, bad / good) if good else 1.0,
                   "undesirable_weight": max(1.0, good / bad) if bad else 1.0}
        # TRL's KL estimate pairs each row with its neighbours in a fixed-order batch: the rows are shuffled once here
        # (unpaired_split lists each pair's two answers together) and then read in order.
        return {"beta": beta, "train_sampling_strategy": "sequential", **weights}, \
            {"beta": beta, "kto_good_answers": good, "kto_bad_answers": bad, **weights}
    return {"beta": beta}, {"beta": beta}


def answer_lengths(dataset, tokenizer, method: str) -> list[tuple[int, ...]]:
    """Token counts of each row: (prompt, completion) for kto, (prompt, chosen, rejected) otherwise."""
    columns = ("prompt", "completion") if method == "kto" else ("prompt", "chosen", "rejected")

    def count(texts):
        return [len(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]] if len(texts) else []

    return list(zip(*(count(dataset[c]) for c in columns), strict=True))


def configure_dpo(trainer, settings, lineage: dict[str, Any], backend: str, max_length: int, quantized: bool,
                  has_eval: bool):
    """DPO's own speed-ups on a built DPOTrainer: the shared prompt (when the probe allows) and the batching choice,
    recorded in the lineage. Returns what counts the padding, and the share of tokens trained on."""
    lengths = _pair_lengths(trainer.train_dataset)
    shared = None
    if backend == "unsloth":
        lineage["attention"] = "unsloth"
        lineage["shared_prompt"] = "off: Unsloth's DPO step has its own forward"
    else:
        # The shared row of a pair is prompt + chosen + rejected + 1 tokens long.
        longest = max((p + c + r + 1) if settings.shared_prompt else p + max(c, r) for p, c, r in lengths)
        lineage["attention"] = training.choose_attention(trainer.model, settings, longest)
        shared, lineage["shared_prompt"] = share_prompts(trainer, settings, max_length,
                                                         can_probe=not (quantized and not torch.cuda.is_available()))
    log.info("prompt computed once per pair: %s", lineage["shared_prompt"])

    def row_length(p: int, c: int, r: int) -> int:  # of a pair's shared row, or of its longer TRL row
        return p + c + r + 1 if shared else p + max(c, r)

    batched_lengths = [row_length(*pair) for pair in lengths]
    # TRL's DPO has no padding-free batches: auto groups rows by length where random batches would pad much.
    batching, lineage["batching_reason"], _ = training.choose_batching(
        settings, trainer.model, lineage["attention"], batched_lengths, padding_free=False)
    lineage["batching"] = batching
    log.info("batching: %s (%s)", batching, lineage["batching_reason"])
    if batching == "grouped":
        trainer.args.train_sampling_strategy = "group_by_length"
        trainer.train_dataset = trainer.train_dataset.add_column("length", batched_lengths)
        if has_eval:
            trainer.eval_dataset = trainer.eval_dataset.add_column(
                "length", [row_length(*pair) for pair in _pair_lengths(trainer.eval_dataset)])
    # With the shared prompt, the padding of the rows actually computed is counted by SharedPrompt.
    padding = shared
    if padding is None:
        trainer.data_collator = padding = training.PaddingCount(trainer.data_collator, trainer.model)
    # Both answers are trained on; their prompt is not.
    answer_tokens = sum(c + r for _, c, r in lengths)
    return padding, answer_tokens / (answer_tokens + sum(2 * p for p, _, _ in lengths))


def run(config: Config, inputs: dict[str, Path], output: Path) -> dict[str, Any]:
    settings = config.dpo
    method = settings.method
    if distributed.needs_launch(settings):
        return distributed.launch(STAGE, config, inputs, output)
    from peft import PeftModel

    backend, why = backends.choose(settings, STAGE, distributed.world_size())
    log.info("backend: %s (%s)", backend, why)
    if backend == "unsloth":  # Unsloth's patch serves all of TRL's preference trainers
        backends.patch_dpo_trainer()
    method_config, method_trainer = trl_classes(method)

    data_dir = Path(inputs["data"])
    data_manifest = storage.read_manifest(data_dir, "data-prep")
    sft_dir = Path(inputs["model"]) if inputs.get("model") else None
    if sft_dir is None and settings.needs_reference:
        raise SetupError(f"dpo.method {method} scores against the SFT model: give it the sft output (--input model=...), "
                         "or pick a method without a reference model (orpo, simpo, cpo)")
    if sft_dir is None and backend == "unsloth":
        raise SetupError("dpo.backend unsloth loads the model from the sft output; without sft, set dpo.backend: hf")
    sft_manifest = storage.read_manifest(sft_dir, "sft") if sft_dir else None
    if sft_manifest and sft_manifest["lineage"]["chat_template_sha256"] != data_manifest["lineage"]["chat_template_sha256"]:
        raise SetupError(f"{sft_dir} was trained with another chat template than {data_dir} records")
    split = prepared.unpaired_split if method == "kto" else prepared.preference_split
    train, evaluation = split(data_dir, "train"), split(data_dir, "eval")
    if method == "kto":
        train = train.shuffle(seed=settings.seed)
    if len(train) == 0:
        wanted = "preference pairs or unpaired prompt/completion/label rows" if method == "kto" else \
            "preference pairs (prompt/chosen/rejected)"
        raise SetupError(f"{data_dir}: nothing to train dpo.method {method} on; add {wanted} or set dpo.enabled: false")
    has_eval = len(evaluation) > 0
    quantized = bool(sft_manifest) and sft_manifest["lineage"]["method"] == "qlora"
    if quantized and has_eval and not torch.cuda.is_available():
        log.warning("qlora on CPU: evaluation during training is off (eval-mode forwards corrupt 4-bit weights)")
        has_eval = False

    base_path = models.resolve(config.base_model)
    if sft_dir:
        tokenizer = models.load_tokenizer(str(sft_dir), config.base_model)
    else:  # from the base model: the chat template data-prep rendered the rows with, as sft would set it
        tokenizer = models.load_tokenizer(base_path, config.base_model)
        tokenizer.chat_template = data_manifest["lineage"]["chat_template"]
    checkpoints = training.checkpoint_dir(output)
    with training.main_process_first():
        resume = training.resume_from(settings, checkpoints, config.storage.endpoint_url)
    torch.manual_seed(settings.seed)
    peft_config = None
    sft_kind = sft_manifest["lineage"]["kind"] if sft_manifest else "none"
    adapter_base = "sft" if sft_kind == "full" else "base_model"
    if backend == "unsloth":
        model = load_with_unsloth(config, sft_dir, sft_kind, quantized)
    elif sft_kind == "none":
        model = models.load_model(base_path, config.base_model)
        peft_config = training.lora_config(settings.lora, models.target_modules(model, settings.lora.target_modules))
    elif sft_kind == "adapter":
        # After QLoRA SFT the base is loaded in 4 bits again, as it was trained.
        model = PeftModel.from_pretrained(training.load_for_training(config, base_path), str(sft_dir), is_trainable=True)
        # The adapter names the base portably; peft looks that name up when saving, so give it the local path.
        model.peft_config["default"].base_model_name_or_path = base_path
    else:
        model = models.load_model(str(sft_dir), config.base_model)
        peft_config = training.lora_config(settings.lora, models.target_modules(model, settings.lora.target_modules))

    guard = None
    if settings.max_chosen_logp_drop is not None and settings.needs_reference:
        if has_eval:
            guard = training.LikelihoodGuard(settings.max_chosen_logp_drop, settings.beta_value)
        else:
            log.warning("the likelihood guard is off: there are no held-out pairs to watch (data.eval_fraction 0?)")
    options, method_lineage = method_options(settings, train)
    if method == "dpo":
        # RPO: TRL's NLL term on the chosen answers, next to the DPO loss.
        options.update({"loss_type": [settings.loss_type, "sft"], "loss_weights": [1.0, settings.rpo_alpha]}
                       if settings.rpo_alpha else {"loss_type": [settings.loss_type]})
        options["remove_unused_columns"] = False  # keeps the length column the length-grouped sampler reads

    # The reference's log-probabilities of a pair do not change: when the run passes over the pairs more than once,
    # TRL computes them once before training instead of in every step.
    steps = settings.max_steps if settings.max_steps > 0 else math.ceil(len(train) / settings.batch_size) * settings.epochs
    passes = steps * settings.batch_size * settings.grad_accum / len(train)
    precompute = passes > 1 and backend == "hf" and method == "dpo"
    if method == "dpo":
        options["precompute_ref_log_probs"] = precompute
    args = method_config(**{
        **training.trainer_arguments(settings, checkpoints, has_eval, quantized=quantized,
                                     guard_every=_guard_every(settings, len(train)) if guard else None),
        "max_length": config.data.max_length, **options})
    lineage = tracking.inherit_lineage(sft_manifest or data_manifest, config, inputs)
    reference = ("once, before training" if precompute else "in every step") if settings.needs_reference else \
        f"none: {method} has no reference model"
    lineage.update(backend=backend, backend_reason=why, method="lora", adapter_base=adapter_base,
                   preference_method=method, **method_lineage, reference_logps=reference,
                   **distributed.describe(settings))
    with training.stage_outputs(config, STAGE, lineage, output) as (tracker, out):
        trainer = method_trainer(
            model=model,
            args=args,
            train_dataset=train,
            eval_dataset=evaluation if has_eval else None,
            processing_class=tokenizer,
            peft_config=peft_config,
            callbacks=training.callbacks(settings, "dpo/", tracker, config.storage.endpoint_url) + ([guard] if guard else []),
        )
        if method == "dpo":
            padding, trained_fraction = configure_dpo(trainer, settings, lineage, backend, config.data.max_length,
                                                      quantized, has_eval)
        else:
            lengths = answer_lengths(train, tokenizer, method)
            lineage["attention"] = "unsloth" if backend == "unsloth" else training.choose_attention(
                trainer.model, settings, max(p + max(answers) for p, *answers in lengths))
            lineage["shared_prompt"] = f"off: TRL's {method} trainer has its own forward"
            lineage["batching"], lineage["batching_reason"] = "padded", f"TRL's {method} trainer batches its rows itself"
            answer_tokens = sum(sum(answers) for _, *answers in lengths)
            padding, trained_fraction = None, answer_tokens / (answer_tokens + sum(p * len(a) for p, *a in lengths))
        metrics = training.train_and_save(
            trainer, stage=STAGE, title=method.upper(), tracker=tracker, out=out, lineage=lineage, resume=resume,
            has_eval=has_eval, tokenizer=tokenizer, tokenizer_source=sft_dir or base_path,
            adapter_base=config.base_model.source if adapter_base == "base_model" else "sft",
            trained_token_fraction=trained_fraction, guard=guard, padding=padding, selected_adapters=["default"])
    shutil.rmtree(checkpoints, ignore_errors=True)
    return tracker.result(metrics, output)
