"""The figures in the reports and MLflow: loss curves, token lengths, scores before and after, a classifier's confusion
matrix."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display: stages run headless

import matplotlib.pyplot as plt

GREY, BLUE, RED = "#8c8c8c", "#4c72b0", "#c44e52"


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _curves(ax, history: list[dict[str, Any]], labels: dict[str, str]) -> None:
    for key, label in labels.items():
        points = [(e["step"], e[key]) for e in history if key in e]
        if points:
            ax.plot(*zip(*points, strict=True), marker="o" if key == "eval_loss" else None, label=label)
    ax.set_xlabel("step")
    ax.legend()


def loss_curve(history: list[dict[str, Any]], path: Path, title: str) -> None:
    """One training stage's train and eval loss by step (from the Trainer's log history)."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    _curves(ax, history, {"loss": "train loss", "eval_loss": "eval loss"})
    ax.set_ylabel("loss")
    ax.set_title(title)
    _save(fig, path)


def rewards(history: list[dict[str, Any]], path: Path, title: str) -> None:
    """GRPO by step: the total reward and each reward's mean; the KL to the starting model and the answers' length."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.5))
    names = sorted({k for e in history for k in e if k.startswith("rewards/") and k.endswith("/mean")})
    _curves(left, history, {"reward": "total (weighted)", **{k: k.split("/")[1] for k in names}})
    left.set_ylabel("reward")
    left.set_title(f"{title} rewards")
    _curves(right, history, {"kl": "KL to the starting model"})
    right.set_ylabel("nats per token")
    lengths = right.twinx()
    points = [(e["step"], e["completions/mean_length"]) for e in history if "completions/mean_length" in e]
    if points:
        lengths.plot(*zip(*points, strict=True), color=GREY, linestyle="--", label="answer length (tokens)")
        lengths.set_ylabel("tokens")
        lengths.legend(loc="upper right")
    right.set_title(f"{title} KL and answer length")
    _save(fig, path)


def loss_curves(histories: dict[str, list[dict[str, Any]]], path: Path) -> None:
    """Several training stages' loss curves side by side."""
    fig, axes = plt.subplots(1, len(histories), figsize=(5 * len(histories), 3.5), squeeze=False)
    for ax, (stage, history) in zip(axes[0], histories.items(), strict=True):
        _curves(ax, history, {"loss": "loss", "eval_loss": "eval_loss"})
        ax.set_title(f"{stage} loss")
    _save(fig, path)


def token_lengths(lengths: list[int], limit: int, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(lengths, bins=min(50, max(5, len(set(lengths)))), color=BLUE)
    ax.axvline(limit, color=RED, linestyle="--", label=f"max_length={limit}")
    ax.set_xlabel("tokens per row")
    ax.set_ylabel("rows")
    ax.set_title("Token lengths of kept rows")
    ax.legend()
    _save(fig, path)


def scores(results: dict[str, dict[str, float]], models: tuple[str, ...], path: Path) -> None:
    """Held-out rates (0-1) and the held-out loss of each model, grouped by metric."""
    rates = [k for k in results[models[-1]] if k.startswith("task_") or k in ("preference_accuracy", "accuracy", "macro_f1")]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5), gridspec_kw={"width_ratios": [max(len(rates), 1), 1.5]})
    width = 0.8 / len(models)
    colours = [GREY, "#dd8452", BLUE, "#55a868"]
    for i, name in enumerate(models):
        offset = (i - (len(models) - 1) / 2) * width
        colour = colours[i] if len(models) > 2 else (GREY, BLUE)[i]
        axes[0].bar([j + offset for j in range(len(rates))], [results[name].get(k, 0.0) for k in rates], width,
                    label=name, color=colour)
        if "eval_loss" in results[name]:
            axes[1].bar([offset], [results[name]["eval_loss"]], width, color=colour)
    axes[0].set_xticks(range(len(rates)), rates, rotation=20, fontsize=8)
    axes[0].set_ylim(0, 1)
    axes[0].set_title("held-out scores (higher is better)")
    axes[0].legend()
    axes[1].set_xticks([0], ["eval_loss"])
    axes[1].set_title("loss (lower is better)", fontsize=9)
    _save(fig, path)


def confusion_matrix(confusion: list[list[int]], labels: list[str], path: Path, title: str) -> None:
    """Rows: the true label; columns: the predicted one; each cell its count."""
    size = max(3.5, 0.6 * len(labels) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(confusion, cmap="Blues")
    top = max(max(row) for row in confusion) or 1
    for i, row in enumerate(confusion):
        for j, count in enumerate(row):
            ax.text(j, i, str(count), ha="center", va="center", color="white" if count > top / 2 else "black")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    _save(fig, path)
