"""Sequence classification (task: classification): the label set, the model with its classification head, and its
scores (accuracy, macro-F1, the confusion matrix). data-prep, sft, merge and evaluate share these.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from tuneforge.config import BaseModelSettings
from tuneforge.data.formats import RowError
from tuneforge.errors import ModelError

log = logging.getLogger(__name__)


def _integer(value: int | str) -> int | None:
    if isinstance(value, int):
        return value
    return int(value) if value.lstrip("-").isdigit() else None


def label_names(values: list[int | str], configured: list[str] | None) -> list[str]:
    """The labels in the order of the head's outputs: the configured ones, else those found, sorted (numerically when
    they are all integers, as most public datasets give them)."""
    if configured is not None:
        return list(configured)
    found = {str(v) for v in values}
    if all(_integer(v) is not None for v in found):
        return sorted(found, key=int)
    return sorted(found)


def label_index(value: int | str, names: list[str], configured: bool) -> int:
    """The head output a row's label is; with configured names an integer label indexes into them."""
    if str(value) in names:
        return names.index(str(value))
    number = _integer(value) if configured else None
    if number is not None and 0 <= number < len(names):
        return number
    raise RowError(f"label {value!r} is not one of classification.labels ({', '.join(names)}): add it there, or fix "
                   "the row")


def load(path: str, settings: BaseModelSettings, labels: list[str], pad_token_id: int,
         dtype: torch.dtype = torch.float32):
    """The model with a classification head of len(labels) outputs (AutoModelForSequenceClassification). A causal LM's
    head is new and initialised from the current torch seed; a saved classifier's is read back."""
    from transformers import AutoModelForSequenceClassification

    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            path,
            revision=settings.revision,
            trust_remote_code=settings.trust_remote_code,
            use_safetensors=None if settings.allow_pickle else True,
            dtype=dtype,
            num_labels=len(labels),
            id2label=dict(enumerate(labels)),
            label2id={name: i for i, name in enumerate(labels)},
        )
    except ValueError as exc:  # transformers: no sequence-classification class for this model type
        raise ModelError(f"cannot load {path!r} as a sequence classifier: {exc}") from None
    except OSError as exc:
        raise ModelError(f"cannot load model {path!r}: {exc}") from None
    # Decoder classifiers score each row at its last token that is not padding, and need to know which that is.
    model.config.pad_token_id = pad_token_id
    return model


def metrics(predictions: list[int], truth: list[int], n_labels: int) -> dict[str, Any]:
    """Accuracy, macro-F1 (the mean F1 of the labels that occur in the truth or the predictions, as scikit-learn's) and
    the confusion matrix (rows: true label, columns: predicted)."""
    confusion = torch.zeros(n_labels, n_labels, dtype=torch.long)
    for true, predicted in zip(truth, predictions, strict=True):
        confusion[true, predicted] += 1
    hits = confusion.diag().double()
    predicted_total, true_total = confusion.sum(0).double(), confusion.sum(1).double()
    f1 = torch.where(predicted_total + true_total > 0, 2 * hits / (predicted_total + true_total).clamp(min=1), 0.0)
    occurring = (predicted_total + true_total) > 0
    return {"accuracy": (hits.sum() / max(len(truth), 1)).item(),
            "macro_f1": f1[occurring].mean().item() if occurring.any() else 0.0,
            "f1_per_label": f1.tolist(), "confusion": confusion.tolist()}


def trainer_metrics(prediction) -> dict[str, float]:
    """compute_metrics for the Trainer: accuracy and macro-F1 of an evaluation (logged as eval_accuracy, eval_macro_f1)."""
    logits, truth = prediction.predictions, prediction.label_ids
    found = metrics(logits.argmax(-1).tolist(), truth.tolist(), logits.shape[-1])
    return {"accuracy": found["accuracy"], "macro_f1": found["macro_f1"]}


@torch.no_grad()
def score(model, rows: list[dict[str, Any]], pad_token_id: int, batch_size: int, n_labels: int) -> dict[str, Any]:
    """The model on labelled rows (input_ids, label): cross-entropy (eval_loss), accuracy, macro-F1, the confusion
    matrix and each row's predicted label."""
    model.eval()
    predictions, loss_sum = [], 0.0
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        width = max(len(r["input_ids"]) for r in batch)
        ids = torch.tensor([r["input_ids"] + [pad_token_id] * (width - len(r["input_ids"])) for r in batch])
        mask = torch.tensor([[1] * len(r["input_ids"]) + [0] * (width - len(r["input_ids"])) for r in batch])
        labels = torch.tensor([r["label"] for r in batch])
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
        loss_sum += torch.nn.functional.cross_entropy(logits, labels, reduction="sum").item()
        predictions += logits.argmax(-1).tolist()
    found = metrics(predictions, [r["label"] for r in rows], n_labels)
    return {"eval_loss": loss_sum / max(len(rows), 1), **found, "predictions": predictions}
