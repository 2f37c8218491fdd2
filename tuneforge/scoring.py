"""How a generated answer is scored against an eval task's expected answer, and against another model's answer.
evaluate (the merged model through transformers) and serve-check (the GGUF through llama.cpp's server) score the same
way, so their numbers compare."""

from __future__ import annotations

from typing import Any

from rouge_score import rouge_scorer

SCORES = ("exact_match", "contains", "rouge_l")
_ROUGE = rouge_scorer.RougeScorer(["rougeL"])


def final_answer(output: str) -> str:
    """The answer after a reasoning block: Qwen3, DeepSeek-R1 and their kin write `<think>...</think>` first (empty
    after fine-tuning on their own template), as plain text that decoding keeps. Scored with it, every one of their
    answers would miss an exact match."""
    return output.rsplit("</think>", 1)[-1].strip()


def score(output: str, expected: str) -> dict[str, float]:
    output = final_answer(output)
    return {
        "exact_match": float(output.strip() == expected.strip()),
        "contains": float(expected.strip().lower() in output.lower()),
        "rouge_l": _ROUGE.score(expected, output)["rougeL"].fmeasure,
    }


def task_items(outputs: list[str], tasks: list[dict[str, Any]]) -> dict[str, list[float]]:
    """Each score of each task, and task_score: the score each task names as its metric; task_metrics are their means."""
    per_task = [score(o, t["expected"]) for o, t in zip(outputs, tasks, strict=True)]
    items = {f"task_{name}": [s[name] for s in per_task] for name in SCORES}
    items["task_score"] = [s[t["metric"]] for s, t in zip(per_task, tasks, strict=True)]
    return items


def means(items: dict[str, list[float]]) -> dict[str, float]:
    return {name: sum(values) / len(values) for name, values in items.items()}


def task_metrics(outputs: list[str], tasks: list[dict[str, Any]]) -> dict[str, float]:
    """Mean of each score over the tasks, and task_score: the mean of the score each task names as its metric."""
    return means(task_items(outputs, tasks))


def by_metric(outputs: list[str], reference: list[str], tasks: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per task metric (the type each task names): its task score for OUTPUTS and for REFERENCE (another model's
    answers to the same tasks), and how far OUTPUTS agree with REFERENCE: ROUGE-L between the two answers, and the
    share of answers that are identical."""
    groups: dict[str, list[int]] = {}
    for i, task in enumerate(tasks):
        groups.setdefault(task["metric"], []).append(i)
    result = {}
    for metric, indices in sorted(groups.items()):
        n = len(indices)
        result[metric] = {
            "tasks": n,
            "score": sum(score(outputs[i], tasks[i]["expected"])[metric] for i in indices) / n,
            "reference_score": sum(score(reference[i], tasks[i]["expected"])[metric] for i in indices) / n,
            "agreement": sum(_ROUGE.score(reference[i], outputs[i])["rougeL"].fmeasure for i in indices) / n,
            "identical": sum(outputs[i].strip() == reference[i].strip() for i in indices) / n,
        }
    return result
