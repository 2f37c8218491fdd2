"""Stage evaluate: score the base model, the current champion and the candidate on the same held-out data.

Inputs: data (data-prep output), model (merge output); optional: champion (the registered champion's merged model, a
local folder or an s3:// URI: fetched and its checksums verified; when it cannot be read, the reason is recorded and
register falls back to the champion's stored metrics), sft_merged (with DPO after SFT: the SFT model merged; both are
scored and DPO's is the candidate unless it made the SFT model worse, see `winner`), sft and dpo outputs, whose loss
curves (and the DPO likelihood guard's report) go into the report.
Metrics, for both models: loss and perplexity on the held-out SFT rows, preference accuracy on held-out
pairs (sum log p(chosen) > sum log p(rejected)), generation tasks scored by exact match, contains and
ROUGE-L, and evaluate.lm_eval's lm-evaluation-harness tasks (lm_eval/TASK/METRIC). The chat template must be the one
data-prep recorded. The tokens all rows of a set start with (a chat template's system block, a repeated instruction)
go through each model once, their KV cache reused for every batch, where a check on one row shows the same logits
(`shared_prefix` in metrics.json says, per model, whether it did).
Outputs: metrics.json, answers.jsonl (the candidate's answer to each eval task), report.md (sample generations side
by side), before_after.png, loss_curves.png.

A classifier (task: classification) is scored on the held-out classification rows instead: accuracy, macro-F1 and
cross-entropy (eval_loss) for the base model with a new, untrained head (what the labels give without training), the
champion and the candidate; the majority label's share is recorded beside them. confusion_matrix.png and per-label F1
go into the report.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import tempfile
from pathlib import Path
from typing import Any

import mlflow
import torch

from tuneforge import advice, chat_templates, checklist, classification, models, plots, registry, scoring, storage, tracking
from tuneforge.config import Config, LmEvalSettings
from tuneforge.data import prepared, readers
from tuneforge.errors import ConfigError, SetupError, TuneforgeError

log = logging.getLogger(__name__)

STAGE = "evaluate"


def _batches(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i : i + size]


def shared_prefix(rows: list[list[int]], first_needed: list[int]) -> int:
    """How many tokens every row starts with, up to the first position whose logits some row needs. Chat templates put
    the same system block (and often the same instruction) before every row: those tokens go through the model once
    per batch set instead of once per row."""
    low, high = min(rows), max(rows)  # the prefix all rows share is the one the first and the last in sort order share
    limit, length = min(first_needed), 0
    while length < limit and low[length] == high[length]:
        length += 1
    return length


@torch.no_grad()
def prefix_cache(model, prefix: list[int]):
    """The KV cache of PREFIX, to reuse for every row that starts with it (transformers' prompt-reuse recipe)."""
    return model(input_ids=torch.tensor([prefix]), use_cache=True, logits_to_keep=1).cache if prefix else None


def batch_cache(cache, rows: int):
    """A copy of the prefix's cache for a batch of ROWS (a forward appends to the cache it is given)."""
    if cache is None:
        return None
    copied = copy.deepcopy(cache)
    copied.batch_repeat_interleave(rows)
    return copied


def attention_window(model) -> int | None:
    """The window of the model's sliding-window (or chunked) attention layers, None where every layer sees the whole
    row."""
    config = model.config.get_text_config()
    types = getattr(config, "layer_types", None)
    if types is not None and not any("sliding" in t or "chunked" in t for t in types):
        return None
    return getattr(config, "sliding_window", None) or getattr(config, "attention_chunk_size", None)


@torch.no_grad()
def check_prefix_cache(model, row: list[int], shared: int) -> str | None:
    """None where the row's logits after a reused prefix cache equal those of one forward over the whole row; else
    why not, and the rows are scored whole. A model whose cache cannot be copied or batched (recurrent or hybrid
    layers) is one."""
    whole = model(input_ids=torch.tensor([row])).logits[0, shared:].float()
    try:
        cache = batch_cache(prefix_cache(model, row[:shared]), 1)
        split = model(input_ids=torch.tensor([row[shared:]]), cache=cache).logits[0].float()
    except (AttributeError, NotImplementedError, RuntimeError, TypeError, ValueError) as exc:
        return f"its cache cannot be reused ({type(exc).__name__}: {exc})"
    difference = (whole - split).abs().max().item()
    tolerance = PREFIX_TOLERANCE[next(model.parameters()).dtype == torch.float32]
    return None if difference <= tolerance else f"its logits after the cached prefix differ by {difference:.3g}"


PREFIX_TOLERANCE = {True: 1e-3, False: 5e-2}  # fp32, 16-bit weights


@torch.no_grad()
def label_log_probs(model, ids, mask, labels, cache=None) -> torch.Tensor:
    """Per-token log-probabilities of the labels (zero where a label is -100), with logits only at the positions
    where some row of the batch has a label (transformers' logits_to_keep): the prompt's positions through a
    49k-token vocabulary were most of an evaluation's time on the CPU. CACHE: the rows' shared prefix, which IDS
    continue (MASK covers both)."""
    targets = labels[:, 1:]
    keep = (targets != -100).any(0).nonzero()[:, 0]
    reused = {"cache": cache} if cache is not None else {}
    logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=keep, **reused).logits.float()
    kept = targets[:, keep]
    picked = logits.log_softmax(-1).gather(-1, kept.clamp(min=0)[..., None])[..., 0]
    return picked.masked_fill(kept == -100, 0.0)


def _padded(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows])


def labelled_rows_prefix(rows: list[tuple[list[int], list[int]]]) -> int:
    """The prefix shared_prefix allows for (input_ids, labels) rows: it stops before the position predicting a row's
    first label."""
    firsts = [next((i for i, label in enumerate(labels) if label != -100), len(labels)) - 1 for _, labels in rows]
    return shared_prefix([ids for ids, _ in rows], firsts)


@torch.no_grad()
def row_log_probs(model, rows: list[tuple[list[int], list[int]]], batch_size: int, shared: int = 0) -> list[float]:
    """Each (input_ids, labels) row's summed log-probability of its labels, in right-padded batches; the first
    SHARED tokens, the same in every row and unlabelled, through the model once."""
    cache = prefix_cache(model, rows[0][0][:shared]) if rows else None
    sums: list[float] = []
    for batch in _batches(rows, batch_size):
        ids, labels = _padded([r[shared:] for r, _ in batch], 0), _padded([labels[shared:] for _, labels in batch], -100)
        mask = _padded([[1] * len(r) for r, _ in batch], 0)
        sums += label_log_probs(model, ids, mask, labels, batch_cache(cache, len(batch))).sum(1).tolist()
    return sums


def heldout_loss(model, rows, batch_size: int, share: bool = True) -> tuple[dict[str, float], list[float]]:
    """The mean loss over every labelled token of the rows, and each row's share of it scaled by the number of rows
    (their mean is the loss), which pairs two models' losses row by row."""
    labelled = [(r["input_ids"], r["labels"]) for r in rows]
    shared = labelled_rows_prefix(labelled) if share else 0
    row_losses = [-logp for logp in row_log_probs(model, labelled, batch_size, shared)]
    count = max(sum(sum(label != -100 for label in labels[1:]) for _, labels in labelled), 1)
    mean = sum(row_losses) / count
    return {"eval_loss": mean, "perplexity": math.exp(min(mean, 50))}, [loss * len(rows) / count for loss in row_losses]


def answer_rows(tokenizer, prompts: list[str], answers: list[str]) -> list[tuple[list[int], list[int]]]:
    """Each prompt + answer as (input_ids, labels), the answer's tokens labelled."""
    rows = []
    for prompt, answer in zip(prompts, answers, strict=True):
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
        rows.append((prompt_ids + answer_ids, [-100] * len(prompt_ids) + answer_ids))
    return rows


def answer_logp(model, tokenizer, prompts: list[str], answers: list[str], batch_size: int, share: bool = True) -> list[float]:
    """Each answer's log-probability after its prompt, summed over the answer's tokens."""
    rows = answer_rows(tokenizer, prompts, answers)
    return row_log_probs(model, rows, batch_size, labelled_rows_prefix(rows) if share else 0)


def preference_accuracy(model, tokenizer, pairs: list[dict[str, str]], batch_size: int, share: bool = True) -> list[float]:
    """For each pair, 1 where the chosen answer is the more likely one. Chosen and rejected rows are scored together,
    so the prefix they all share goes through the model once."""
    prompts = [p["prompt"] for p in pairs]
    logps = answer_logp(model, tokenizer, prompts + prompts, [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs],
                        batch_size, share)
    chosen, rejected = logps[:len(pairs)], logps[len(pairs):]
    return [float(c > r) for c, r in zip(chosen, rejected, strict=True)]


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], stop_ids: list[int], max_new_tokens: int, batch_size: int,
             share: bool = True) -> list[str]:
    """Greedy answers. The prompts' shared prefix goes through the model once; after it, each row's own tokens are
    left-padded (generate counts positions over unmasked tokens only, so every row's positions are its own)."""
    rows = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    shared = shared_prefix(rows, [len(r) - 1 for r in rows]) if share and rows else 0
    window = attention_window(model)
    if window is not None and max(map(len, rows), default=0) + max_new_tokens > window:
        shared = 0  # the padding after the prefix would take places in a row's window that its own tokens had
    cache = prefix_cache(model, rows[0][:shared]) if rows else None
    outputs = []
    for batch in _batches(rows, batch_size):
        width = max(len(r) for r in batch)
        ids = torch.tensor([r[:shared] + [tokenizer.pad_token_id] * (width - len(r)) + r[shared:] for r in batch])
        mask = torch.tensor([[1] * shared + [0] * (width - len(r)) + [1] * (len(r) - shared) for r in batch])
        reused = {"cache": batch_cache(cache, len(batch))} if cache is not None else {}
        generated = model.generate(
            input_ids=ids,
            attention_mask=mask,
            **reused,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=stop_ids,
            pad_token_id=tokenizer.pad_token_id,
        )
        outputs += [t.strip() for t in tokenizer.batch_decode(generated[:, width:], skip_special_tokens=True)]
    return outputs


def lm_eval_tasks(tasks: list[str]) -> list[str | dict[str, Any]]:
    """Standard task names as they are; a task YAML file as its config, its data_files beside it."""
    return [readers.lm_eval_task(t) if t.endswith((".yaml", ".yml")) else t for t in tasks]


def lm_eval_scores(model, tokenizer, settings: LmEvalSettings) -> dict[str, float]:
    """lm-evaluation-harness on the loaded model, through its Hugging Face backend: lm_eval/TASK/METRIC."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError:
        raise SetupError("evaluate.lm_eval needs lm-evaluation-harness: pip install 'tuneforge[lm-eval]'") from None
    results = lm_eval.simple_evaluate(model=HFLM(pretrained=model, tokenizer=tokenizer, batch_size=settings.batch_size),
                                      tasks=lm_eval_tasks(settings.tasks), limit=settings.limit, log_samples=False,
                                      bootstrap_iters=0, verbosity="ERROR")
    scores = {}
    for task, values in results["results"].items():
        for key, value in values.items():
            metric = key.split(",")[0]
            if isinstance(value, (int, float)) and not isinstance(value, bool) and "stderr" not in metric:
                scores[f"lm_eval/{task}/{metric}"] = float(value)
    return scores


def prefix_sharing(model, tokenizer, data: dict[str, Any]) -> str | None:
    """None where the model can reuse a shared prefix's cache (checked on one held-out row split in half), else why
    not."""
    if data["sft"]:
        row = data["sft"][0]["input_ids"]
    elif data["pairs"]:
        row = tokenizer(data["pairs"][0]["prompt"] + data["pairs"][0]["chosen"], add_special_tokens=False)["input_ids"]
    else:
        row = tokenizer(data["tasks"][0]["prompt"], add_special_tokens=False)["input_ids"]
    return check_prefix_cache(model, row, len(row) // 2) if len(row) > 1 else "a one-token row"


def evaluate_model(model, tokenizer, data: dict[str, Any], config: Config, stop_ids: list[int],
                   share: bool = True) -> tuple[dict[str, float], dict[str, list[float]], list[str]]:
    """The model's metrics; for those that are a mean over held-out rows, pairs or tasks, each item's value (so two
    models can be compared item by item); its answers to the eval tasks. SHARE: whether the prefix the rows of each
    set share goes through the model once (see prefix_sharing)."""
    settings = config.evaluate
    model.eval()
    metrics: dict[str, float] = {}
    items: dict[str, list[float]] = {}
    if data["sft"]:
        loss, items["eval_loss"] = heldout_loss(model, data["sft"], settings.batch_size, share)
        metrics.update(loss)
    if data["pairs"]:
        items["preference_accuracy"] = preference_accuracy(model, tokenizer, data["pairs"], settings.batch_size, share)
        metrics["preference_accuracy"] = sum(items["preference_accuracy"]) / len(data["pairs"])
    outputs: list[str] = []
    if data["tasks"]:
        prompts = [t["prompt"] for t in data["tasks"]]
        outputs = generate(model, tokenizer, prompts, stop_ids, settings.max_new_tokens, settings.generation_batch_size,
                           share)
        scored = scoring.task_items(outputs, data["tasks"])  # each answer scored once, ROUGE-L included
        items.update(scored)
        metrics.update(scoring.means(scored))
    if settings.lm_eval.tasks:
        metrics.update(lm_eval_scores(model, tokenizer, settings.lm_eval))
    return metrics, items, outputs


def load_heldout(data_dir: Path, config: Config) -> dict[str, Any]:
    limit = config.evaluate.max_examples
    sft = prepared.sft_split(data_dir, "eval", config.sft.loss_on)
    pairs = prepared.read_jsonl(data_dir / "preference_eval.jsonl")
    tasks = prepared.read_jsonl(data_dir / "eval_tasks.jsonl")
    return {"sft": sft.select(prepared.sample(len(sft), limit, "rows")).to_list(),
            "pairs": [pairs[i] for i in prepared.sample(len(pairs), limit, "pairs")],
            "tasks": [tasks[i] for i in prepared.sample(len(tasks), limit, "eval tasks")]}


def beats_base(results: dict[str, Any], config: Config) -> dict[str, Any]:
    """Whether the candidate goes on to export and registration: the registry's gate against the base model alone
    (the champion is decided on at register), with its reasons, which the run summary shows when it does not."""
    passed, reasons = registry.gate(results["candidate"], results["base"], None, config.registry,
                                    noise=results.get("noise"))
    return {"passed": passed, "reasons": [r for r in reasons if r != "no current champion"]}


def only_label(confusion: list[list[int]], labels: list[str]) -> str | None:
    """The label a classifier gave every row, where it gave one label only (confusion[true][predicted]); on imbalanced
    data such a classifier scores the majority label's share and can look better than an untrained head."""
    predicted = [label for j, label in enumerate(labels) if any(row[j] for row in confusion)]
    return predicted[0] if len(predicted) == 1 and len(labels) > 1 else None


def check_answer_room(tasks: list[dict[str, Any]], tokenizer, config: Config, data_dir: Path) -> None:
    """Generation stops at evaluate.max_new_tokens: an eval task whose expected answer is longer could never be
    matched, and every model's score would be capped without a word."""
    limit = config.evaluate.max_new_tokens
    needed = [len(tokenizer(t["expected"], add_special_tokens=False)["input_ids"]) for t in tasks]
    if needed and max(needed) > limit:
        source = config.data.eval_tasks or data_dir / "eval_tasks.jsonl"
        raise ConfigError(f"evaluate.max_new_tokens is {limit}, and {sum(n > limit for n in needed)} of the {len(tasks)} "
                          f"eval tasks of {source} expect a longer answer (the longest {max(needed)} tokens): no "
                          f"generation could match them; set evaluate.max_new_tokens: {max(needed)} or more")


def run(config: Config, inputs: dict[str, Path], output: Path) -> dict[str, Any]:
    data_dir, model_dir = Path(inputs["data"]), Path(inputs["model"])
    data_manifest = storage.read_manifest(data_dir, "data-prep")
    model_manifest = storage.read_manifest(model_dir, "merge")
    recorded = data_manifest["lineage"]["chat_template_sha256"]
    tokenizer = models.load_tokenizer(str(model_dir), config.base_model)
    carried = chat_templates.template_hash(tokenizer.chat_template or "")
    if recorded != model_manifest["lineage"]["chat_template_sha256"] or carried != recorded:
        raise SetupError(
            f"chat template mismatch: data-prep recorded {recorded[:12]}, the model at {model_dir} carries "
            f"{carried[:12]}; evaluate the model with the data it was trained on"
        )
    if config.task == "classification":
        return evaluate_classifier(config, inputs, output, data_manifest, model_manifest, tokenizer)
    data = load_heldout(data_dir, config)
    if not any(data.values()):
        raise SetupError(f"{data_dir}: nothing held out to evaluate (no eval rows, pairs or tasks)")
    stop_ids = sorted(set(tokenizer.convert_tokens_to_ids(data_manifest["lineage"]["special_tokens"]["stop"])))
    check_answer_room(data["tasks"], tokenizer, config, data_dir)

    results: dict[str, Any] = {}
    generations: dict[str, list[str]] = {}
    items: dict[str, dict[str, list[float]]] = {}
    with tempfile.TemporaryDirectory(prefix="tuneforge-champion-") as scratch:
        scored = {"base": models.resolve(config.base_model)}
        if "champion" in inputs:
            champion_dir, results["champion_model_sha256"], error = _champion(inputs["champion"], recorded, Path(scratch),
                                                                              config.storage.endpoint_url)
            if error:
                log.warning("the champion is not re-scored: %s", error)
                results["champion_error"] = error
            else:
                scored["champion"] = champion_dir
        # With DPO after SFT both trained models are scored, and the better one is the candidate.
        after_sft = "dpo" if "dpo" in inputs else "grpo" if "grpo" in inputs else "sft"
        contenders = {model_manifest["lineage"].get("trained_by", after_sft): str(model_dir)}
        if "sft_merged" in inputs:
            sft_manifest = storage.read_manifest(Path(inputs["sft_merged"]), "merge")
            if sft_manifest["lineage"]["chat_template_sha256"] != recorded:
                raise SetupError(f"{inputs['sft_merged']} was trained with another chat template than {data_dir} records")
            contenders["sft"] = str(inputs["sft_merged"])
        scored.update(contenders if len(contenders) > 1 else {"candidate": str(model_dir)})
        for name, path in scored.items():
            log.info("evaluating the %s model", name)
            model = models.load_model(path, config.base_model).eval()
            why_not = prefix_sharing(model, tokenizer, data)
            if why_not:
                log.warning("the %s model scores every row whole: %s", name, why_not)
            results.setdefault("shared_prefix", {})[name] = why_not or "reused"
            results[name], items[name], generations[name] = evaluate_model(model, tokenizer, data, config, stop_ids,
                                                                           share=not why_not)
            del model
    results["trained_by"] = next(iter(contenders))
    if len(contenders) > 1:
        trained = next(iter(contenders))
        results["winner"], results["winner_reason"] = _better(trained, results[trained], results["sft"], config)
        log.info("the %s model is the candidate: %s", results["winner"], results["winner_reason"])
        results["candidate"], results["trained_by"] = results[results["winner"]], results["winner"]
        generations["candidate"], items["candidate"] = generations[results["winner"]], items[results["winner"]]
    results["delta"] = {k: results["candidate"][k] - results["base"][k] for k in results["candidate"]}
    results["noise"] = {reference: registry.paired_noise(items["candidate"], items[reference])
                        for reference in ("base", "champion") if reference in items}
    results["beats_base"] = beats_base(results, config)
    models_scored = tuple(scored)

    histories = {k: Path(inputs[k]) / "train_history.json" for k in ("sft", "dpo", "grpo") if k in inputs}
    histories = {k: json.loads(v.read_text()) for k, v in histories.items() if v.exists()}
    trained = {k: storage.read_manifest(Path(inputs[k]), k) for k in ("sft", "dpo", "grpo") if k in inputs}
    guard = trained["dpo"]["lineage"].get("likelihood_guard") if "dpo" in trained else None
    candidate_merge = (storage.read_manifest(Path(inputs["sft_merged"]), "merge")
                       if results.get("winner") == "sft" else model_manifest)
    results["checklist"] = checklist.from_training(config, results, data_manifest, trained, candidate_merge, histories)
    results["hyperparameter_warnings"] = advice.hyperparameter_warnings(config)

    lineage = tracking.inherit_lineage(model_manifest, config, inputs)
    with tracking.stage_run(config, STAGE, lineage) as tracker, storage.staged_output(output) as out:
        (out / "metrics.json").write_text(json.dumps(results, indent=2))
        # The candidate's answer to each eval task, and how many tokens its prompt was: serve-check compares the
        # served GGUF's answers and prompt lengths with them.
        prompt_tokens = [len(tokenizer(t["prompt"], add_special_tokens=False)["input_ids"]) for t in data["tasks"]]
        (out / "answers.jsonl").write_text("".join(
            json.dumps({"task": i, "answer": a, "prompt_tokens": n}) + "\n"
            for i, (a, n) in enumerate(zip(generations.get("candidate", []), prompt_tokens, strict=False))))
        samples = [{"prompt": t["messages"][-1]["content"], "expected": t["expected"],
                    **{name: generations[name][i] for name in models_scored}}
                   for i, t in enumerate(data["tasks"][: config.evaluate.samples])]
        plots.scores(results, models_scored, out / "before_after.png")
        if histories:
            plots.loss_curves(histories, out / "loss_curves.png")
        (out / "report.md").write_text(_report(results, models_scored, samples, bool(histories), guard))
        _record(tracker, out, lineage, results, models_scored)
    return tracker.result(results, output)


def evaluate_classifier(config: Config, inputs: dict[str, Path], output: Path, data_manifest: dict[str, Any],
                        model_manifest: dict[str, Any], tokenizer) -> dict[str, Any]:
    data_dir, model_dir = Path(inputs["data"]), Path(inputs["model"])
    labels = model_manifest["lineage"].get("labels")
    if labels != data_manifest["lineage"].get("labels"):
        raise SetupError(f"{model_dir} classifies into {labels}, {data_dir} holds the labels "
                         f"{data_manifest['lineage'].get('labels')}; evaluate the model with the data it was trained on")
    heldout = prepared.classification_split(data_dir, "eval")
    rows = heldout.select(prepared.sample(len(heldout), config.evaluate.max_examples, "rows")).to_list()
    if not rows:
        raise SetupError(f"{data_dir}: no held-out classification rows to evaluate (data.eval_fraction above 0, or a "
                         "source with split: eval)")
    results: dict[str, Any] = {}
    scored = {"base": models.resolve(config.base_model)}
    with tempfile.TemporaryDirectory(prefix="tuneforge-champion-") as scratch:
        if "champion" in inputs:
            template = data_manifest["lineage"]["chat_template_sha256"]
            champion_dir, results["champion_model_sha256"], error = _champion(inputs["champion"], template, Path(scratch),
                                                                              config.storage.endpoint_url)
            if not error and storage.read_manifest(Path(champion_dir), "merge")["lineage"].get("labels") != labels:
                error = "it classifies into other labels than this run's"
            if error:
                log.warning("the champion is not re-scored: %s", error)
                results["champion_error"] = error
            else:
                scored["champion"] = champion_dir
        scored["candidate"] = str(model_dir)
        confusions, per_label, items = {}, {}, {}
        for name, path in scored.items():
            log.info("evaluating the %s model", name)
            torch.manual_seed(config.sft.seed)  # the base model's untrained head, the same in every run
            model = classification.load(path, config.base_model, labels, tokenizer.pad_token_id)
            found = classification.score(model, rows, tokenizer.pad_token_id, config.evaluate.batch_size, len(labels))
            del model
            results[name] = {k: found[k] for k in ("accuracy", "macro_f1", "eval_loss")}
            confusions[name], per_label[name] = found["confusion"], dict(zip(labels, found["f1_per_label"], strict=True))
            items[name] = {"accuracy": [float(p == r["label"]) for p, r in zip(found["predictions"], rows, strict=True)]}
    counts = [sum(r["label"] == i for r in rows) for i in range(len(labels))]
    results.update(trained_by="sft", labels=labels, heldout_rows=len(rows), label_counts=dict(zip(labels, counts, strict=True)),
                   majority_accuracy=max(counts) / len(rows), confusion=confusions, f1_per_label=per_label)
    results["delta"] = {k: results["candidate"][k] - results["base"][k] for k in results["candidate"]}
    results["noise"] = {reference: registry.paired_noise(items["candidate"], items[reference])
                        for reference in ("base", "champion") if reference in items}
    results["beats_base"] = beats_base(results, config)
    constant = only_label(confusions["candidate"], labels)
    if constant is not None:
        results["beats_base"] = {"passed": False, "reasons": [
            f"the candidate answers {constant} for every one of the {len(rows)} held-out rows (accuracy "
            f"{results['candidate']['accuracy']:.3f}, the majority label's share {results['majority_accuracy']:.3f}): "
            "it has not learned the labels; more steps, a higher sft.learning_rate or balanced data may help"]}
    history_file = Path(inputs["sft"]) / "train_history.json" if "sft" in inputs else None
    histories = {"sft": json.loads(history_file.read_text())} if history_file and history_file.exists() else {}
    trained = {"sft": storage.read_manifest(Path(inputs["sft"]), "sft")} if "sft" in inputs else {}
    results["checklist"] = checklist.from_training(config, results, data_manifest, trained, model_manifest, histories)
    results["hyperparameter_warnings"] = advice.hyperparameter_warnings(config)
    models_scored = tuple(scored)

    lineage = tracking.inherit_lineage(model_manifest, config, inputs)
    with tracking.stage_run(config, STAGE, lineage) as tracker, storage.staged_output(output) as out:
        (out / "metrics.json").write_text(json.dumps(results, indent=2))
        plots.scores(results, models_scored, out / "before_after.png")
        plots.confusion_matrix(confusions["candidate"], labels, out / "confusion_matrix.png",
                               f"candidate on {len(rows)} held-out rows (accuracy {results['candidate']['accuracy']:.3f})")
        if histories:
            plots.loss_curves(histories, out / "loss_curves.png")
        (out / "report.md").write_text(_classifier_report(results, models_scored, bool(histories)))
        tracker.record("the majority label's share", mlflow.log_metric, "majority_accuracy", results["majority_accuracy"])
        _record(tracker, out, lineage, results, models_scored)
    return tracker.result(results, output)


def _record(tracker, out: Path, lineage: dict[str, Any], results: dict[str, Any], models_scored: tuple[str, ...]) -> None:
    """How an evaluation ends: each model's metrics and the checklist in MLflow, the output's files as artifacts, the
    manifest last."""
    for model_name in models_scored:
        tracker.record(f"the {model_name} metrics", mlflow.log_metrics,
                       {f"{model_name}/{k}": v for k, v in results[model_name].items()})
    tracker.record("the checklist", mlflow.set_tags, {f"checklist.{i['key']}": i["status"] for i in results["checklist"]})
    tracker.record(f"the {STAGE} artifacts", mlflow.log_artifacts, str(out), artifact_path=STAGE)
    lineage.update(tracker.run_record())
    storage.write_manifest(out, STAGE, lineage, results)


def _classifier_report(results: dict[str, Any], models_scored: tuple[str, ...], curves: bool) -> str:
    lines = ["# Evaluation: classifier", "",
             f"All models on the same {results['heldout_rows']} held-out rows. The base model has a new, untrained "
             f"head; the majority label ({max(results['label_counts'], key=results['label_counts'].get)}) is "
             f"{results['majority_accuracy']:.3f} of the rows.", "",
             "## The guide's checklist", "", checklist.markdown(results["checklist"]),
             "| metric | " + " | ".join(models_scored) + " | candidate - base |", "|---" * (len(models_scored) + 2) + "|"]
    for key in results["candidate"]:
        cells = [f"{results[m][key]:.4f}" for m in models_scored]
        lines.append(f"| {key} | " + " | ".join(cells) + f" | {results['delta'][key]:+.4f} |")
    if results.get("champion_error"):
        lines += ["", f"The champion is not re-scored: {results['champion_error']}."]
    lines += ["", "## F1 per label", "", "| label | held-out rows | " + " | ".join(models_scored) + " |",
              "|---" * (len(models_scored) + 2) + "|"]
    for label in results["labels"]:
        cells = [f"{results['f1_per_label'][m][label]:.3f}" for m in models_scored]
        lines.append(f"| {label} | {results['label_counts'][label]} | " + " | ".join(cells) + " |")
    lines += ["", "![confusion matrix](confusion_matrix.png)", "", "![scores](before_after.png)", ""]
    if curves:
        lines += ["![loss curves](loss_curves.png)", ""]
    return "\n".join(lines) + "\n"


def _better(stage: str, tuned: dict[str, float], sft: dict[str, float], config: Config) -> tuple[str, str]:
    """Which trained model goes on, and why: the one STAGE (dpo or grpo) tuned after SFT, unless it made the primary
    metric worse than SFT's or broke a registry guard against it."""
    kept, reasons = registry.not_worse(tuned, sft, config.registry)
    if kept:
        return stage, f"{stage} is not worse than sft: " + "; ".join(reasons)
    return "sft", f"{stage} made the sft model worse: " + "; ".join(reasons)


def _champion(reference: str | Path, template_sha256: str, scratch: Path,
              endpoint_url: str | None) -> tuple[str | None, str | None, str | None]:
    """The champion's merged model as a verified local folder, its digest, or why it cannot be read."""
    try:
        if storage.is_s3(reference):
            folder = storage.fetch(str(reference), scratch / "champion", endpoint_url)  # checks every file's sha256
        else:
            folder = Path(reference)
        manifest = storage.read_manifest(folder, "merge", verify=True)
    except TuneforgeError as exc:
        return None, None, f"its files at {reference} cannot be read: {exc}"
    if manifest["lineage"].get("chat_template_sha256") != template_sha256:
        return None, storage.content_digest(manifest), "it was trained with another chat template than this run's data"
    return str(folder), storage.content_digest(manifest), None


def _report(results: dict[str, Any], models_scored: tuple[str, ...], samples: list[dict[str, str]], curves: bool,
            guard: dict[str, Any] | None) -> str:
    lines = ["# Evaluation", "", "All models on the same held-out data.", ""]
    if "winner" in results:
        lines += [f"**Candidate: the {results['winner']} model.** {results['winner_reason']}.", ""]
    if guard:
        lines += [f"DPO likelihood guard: {guard['summary']}.", ""]
    lines += ["## The guide's checklist", "", checklist.markdown(results["checklist"])]
    if results["hyperparameter_warnings"]:
        lines += ["## Settings outside the guide's hyperparameter table", "",
                  *[f"- {w}" for w in results["hyperparameter_warnings"]], ""]
    lines += ["| metric | " + " | ".join(models_scored) + " | candidate - base |", "|---" * (len(models_scored) + 2) + "|"]
    noise = results.get("noise", {}).get("base", {})
    for key in results["candidate"]:
        cells = [f"{results[m][key]:.4f}" for m in models_scored]
        spread = f" ± {noise[key]['stderr']:.4f}" if key in noise else ""
        lines.append(f"| {key} | " + " | ".join(cells) + f" | {results['delta'][key]:+.4f}{spread} |")
    if noise:
        lines += ["", "± is the standard error of the difference, paired item by item (held-out row, pair or task); "
                  "the registry's gate counts a gain smaller than its confidence interval as noise "
                  "(`registry.confidence`)."]
    if results.get("champion_error"):
        lines += ["", f"The champion is not re-scored: {results['champion_error']}."]
    lines += ["", "![scores](before_after.png)", ""]
    if curves:
        lines += ["![loss curves](loss_curves.png)", ""]
    if samples:
        lines += ["## Sample generations", "", "| prompt | expected | " + " | ".join(models_scored) + " |",
                  "|---" * (len(models_scored) + 2) + "|"]
        cell = lambda s: s.replace("|", "\\|").replace("\n", " ")[:200]  # noqa: E731
        lines += ["| " + " | ".join(cell(s[k]) for k in ("prompt", "expected", *models_scored)) + " |" for s in samples]
    return "\n".join(lines) + "\n"
