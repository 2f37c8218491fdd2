"""Stage evaluate: score the base model and the candidate on the same held-out data.

Inputs: data (data-prep output), model (merge output); optional sft and dpo outputs, whose loss curves go
into the report.
Metrics, for both models: loss and perplexity on the held-out SFT rows, preference accuracy on held-out
pairs (sum log p(chosen) > sum log p(rejected)), and generation tasks scored by exact match, contains and
ROUGE-L. The chat template must be the one data-prep recorded.
Outputs: metrics.json, report.md (sample generations side by side), before_after.png, loss_curves.png.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import mlflow
import torch
from rouge_score import rouge_scorer

from tuneforge import chat_templates, models, storage, tracking
from tuneforge.components.sft import load_split
from tuneforge.config import Config
from tuneforge.training import TrainingSetupError

log = logging.getLogger(__name__)

STAGE = "evaluate"
SCORES = ("exact_match", "contains", "rouge_l")


def _batches(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i : i + size]


@torch.no_grad()
def heldout_loss(model, rows, pad_id: int, batch_size: int) -> dict[str, float]:
    total, count = 0.0, 0
    for batch in _batches(rows, batch_size):
        width = max(len(r["input_ids"]) for r in batch)
        ids = torch.tensor([r["input_ids"] + [pad_id] * (width - len(r["input_ids"])) for r in batch])
        labels = torch.tensor([r["labels"] + [-100] * (width - len(r["labels"])) for r in batch])
        mask = torch.tensor([[1] * len(r["input_ids"]) + [0] * (width - len(r["input_ids"])) for r in batch])
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        target = labels[:, 1:]
        loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, ignore_index=-100, reduction="sum")
        total += loss.item()
        count += int((target != -100).sum())
    mean = total / max(count, 1)
    return {"eval_loss": mean, "perplexity": math.exp(min(mean, 50))}


@torch.no_grad()
def answer_logp(model, tokenizer, prompts: list[str], answers: list[str]) -> list[float]:
    results = []
    for prompt, answer in zip(prompts, answers, strict=True):
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([prompt_ids + answer_ids])
        logps = model(input_ids=ids).logits[0, :-1].float().log_softmax(-1)
        targets = ids[0, 1:]
        picked = logps.gather(-1, targets[:, None])[:, 0]
        results.append(picked[len(prompt_ids) - 1 :].sum().item())
    return results


def preference_accuracy(model, tokenizer, pairs: list[dict[str, str]]) -> float:
    prompts = [p["prompt"] for p in pairs]
    chosen = answer_logp(model, tokenizer, prompts, [p["chosen"] for p in pairs])
    rejected = answer_logp(model, tokenizer, prompts, [p["rejected"] for p in pairs])
    return sum(c > r for c, r in zip(chosen, rejected, strict=True)) / len(pairs)


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], stop_ids: list[int], max_new_tokens: int, batch_size: int) -> list[str]:
    tokenizer.padding_side = "left"
    outputs = []
    for batch in _batches(prompts, batch_size):
        encoded = tokenizer(batch, return_tensors="pt", padding=True, add_special_tokens=False)
        generated = model.generate(
            **encoded,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=stop_ids,
            pad_token_id=tokenizer.pad_token_id,
        )
        new = generated[:, encoded["input_ids"].shape[1] :]
        outputs += [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]
    return outputs


def score(output: str, expected: str, scorer) -> dict[str, float]:
    return {
        "exact_match": float(output.strip() == expected.strip()),
        "contains": float(expected.strip().lower() in output.lower()),
        "rouge_l": scorer.score(expected, output)["rougeL"].fmeasure,
    }


def evaluate_model(model, tokenizer, data: dict[str, Any], config: Config, stop_ids: list[int]) -> tuple[dict, list[str]]:
    settings = config.evaluate
    model.eval()
    metrics: dict[str, float] = {}
    if data["sft"]:
        metrics.update(heldout_loss(model, data["sft"], tokenizer.pad_token_id, settings.batch_size))
    if data["pairs"]:
        metrics["preference_accuracy"] = preference_accuracy(model, tokenizer, data["pairs"])
    outputs: list[str] = []
    if data["tasks"]:
        outputs = generate(model, tokenizer, [t["prompt"] for t in data["tasks"]], stop_ids, settings.max_new_tokens, settings.batch_size)
        scorer = rouge_scorer.RougeScorer(["rougeL"])
        per_task = [score(o, t["expected"], scorer) for o, t in zip(outputs, data["tasks"], strict=True)]
        for name in SCORES:
            metrics[f"task_{name}"] = sum(s[name] for s in per_task) / len(per_task)
        # Each task names the metric that decides it; task_score averages those.
        metrics["task_score"] = sum(s[t["metric"]] for s, t in zip(per_task, data["tasks"], strict=True)) / len(per_task)
    return metrics, outputs


def load_heldout(data_dir: Path, config: Config) -> dict[str, Any]:
    limit = config.evaluate.max_examples
    sft = load_split(data_dir, "eval", config.sft.loss_on)
    pairs = [json.loads(line) for line in (data_dir / "preference_eval.jsonl").read_text().splitlines() if line]
    tasks = [json.loads(line) for line in (data_dir / "eval_tasks.jsonl").read_text().splitlines() if line]
    return {"sft": sft.select(range(min(limit, len(sft)))).to_list(), "pairs": pairs[:limit], "tasks": tasks[:limit]}


def run(config: Config, inputs: dict[str, Path], output: Path) -> dict[str, Any]:
    data_dir, model_dir = Path(inputs["data"]), Path(inputs["model"])
    data_manifest = storage.read_manifest(data_dir, "data-prep")
    model_manifest = storage.read_manifest(model_dir, "merge")
    recorded = data_manifest["lineage"]["chat_template_sha256"]
    tokenizer = models.load_tokenizer(str(model_dir), config.base_model)
    carried = chat_templates.template_hash(tokenizer.chat_template or "")
    if recorded != model_manifest["lineage"]["chat_template_sha256"] or carried != recorded:
        raise TrainingSetupError(
            f"chat template mismatch: data-prep recorded {recorded[:12]}, the model at {model_dir} carries "
            f"{carried[:12]}; evaluate the model with the data it was trained on"
        )
    data = load_heldout(data_dir, config)
    if not any(data.values()):
        raise TrainingSetupError(f"{data_dir}: nothing held out to evaluate (no eval rows, pairs or tasks)")
    stop_ids = sorted(set(tokenizer.convert_tokens_to_ids(data_manifest["lineage"]["special_tokens"]["stop"])))

    results, generations = {}, {}
    base_path = models.resolve(config.base_model)
    for name, path in (("base", base_path), ("candidate", str(model_dir))):
        log.info("evaluating %s model", name)
        model = models.load_model(path, config.base_model)
        results[name], generations[name] = evaluate_model(model, tokenizer, data, config, stop_ids)
        del model
    results["delta"] = {k: results["candidate"][k] - results["base"][k] for k in results["candidate"]}

    lineage = tracking.inherit_lineage(model_manifest, config)
    with tracking.stage_run(config, STAGE, lineage) as mlrun, storage.staged_output(output) as out:
        (out / "metrics.json").write_text(json.dumps(results, indent=2))
        samples = [
            {"prompt": t["messages"][-1]["content"], "expected": t["expected"], "base": b, "candidate": c}
            for t, b, c in zip(data["tasks"], generations["base"], generations["candidate"], strict=False)
        ][: config.evaluate.samples]
        _plot_before_after(results, out / "before_after.png")
        curves = _plot_loss_curves({k: inputs[k] for k in ("sft", "dpo") if k in inputs}, out / "loss_curves.png")
        (out / "report.md").write_text(_report(results, samples, curves))
        for model_name in ("base", "candidate"):
            tracking.record(f"the {model_name} metrics", mlflow.log_metrics,
                            {f"{model_name}/{k}": v for k, v in results[model_name].items()})
        tracking.record(f"the {STAGE} artifacts", mlflow.log_artifacts, str(out), artifact_path=STAGE)
        lineage.update(tracking.run_record(mlrun))
        storage.write_manifest(out, STAGE, lineage, results)
    return {"status": "succeeded", "metrics": results, "output": str(output)}


def _plot_before_after(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = [k for k in results["candidate"] if k.startswith("task_") or k == "preference_accuracy"]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5), gridspec_kw={"width_ratios": [max(len(rates), 1), 1.5]})
    width = 0.38
    for offset, name, colour in ((-width / 2, "base", "#8c8c8c"), (width / 2, "candidate", "#4c72b0")):
        axes[0].bar([i + offset for i in range(len(rates))], [results[name][k] for k in rates], width, label=name, color=colour)
        if "eval_loss" in results[name]:
            axes[1].bar([offset], [results[name]["eval_loss"]], width, color=colour)
    axes[0].set_xticks(range(len(rates)), rates, rotation=20, fontsize=8)
    axes[0].set_ylim(0, 1)
    axes[0].set_title("held-out scores (higher is better)")
    axes[0].legend()
    axes[1].set_xticks([0], ["eval_loss"])
    axes[1].set_title("loss (lower is better)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_loss_curves(stage_dirs: dict[str, Path], path: Path) -> bool:
    histories = {k: Path(v) / "train_history.json" for k, v in stage_dirs.items()}
    histories = {k: json.loads(v.read_text()) for k, v in histories.items() if v.exists()}
    if not histories:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(histories), figsize=(5 * len(histories), 3.5), squeeze=False)
    for ax, (stage, history) in zip(axes[0], histories.items(), strict=True):
        for key in ("loss", "eval_loss"):
            points = [(e["step"], e[key]) for e in history if key in e]
            if points:
                ax.plot(*zip(*points, strict=True), label=key, marker="o" if key == "eval_loss" else None)
        ax.set_title(f"{stage} loss")
        ax.set_xlabel("step")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _report(results: dict[str, Any], samples: list[dict[str, str]], curves: bool) -> str:
    lines = ["# Evaluation", "", "| metric | base | candidate | delta |", "|---|---|---|---|"]
    for key, value in results["candidate"].items():
        lines.append(f"| {key} | {results['base'][key]:.4f} | {value:.4f} | {results['delta'][key]:+.4f} |")
    lines += ["", "![before and after](before_after.png)", ""]
    if curves:
        lines += ["![loss curves](loss_curves.png)", ""]
    if samples:
        lines += ["## Sample generations", "", "| prompt | expected | base | candidate |", "|---|---|---|---|"]
        cell = lambda s: s.replace("|", "\\|").replace("\n", " ")[:200]  # noqa: E731
        lines += [f"| {cell(s['prompt'])} | {cell(s['expected'])} | {cell(s['base'])} | {cell(s['candidate'])} |" for s in samples]
    return "\n".join(lines) + "\n"
