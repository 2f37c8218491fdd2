"""The files of a data-prep output, written by data-prep and read by the stages after it.

    sft_{train,eval}.parquet        messages or text, the rendered text, input_ids, assistant_masks
    preference_{train,eval}.jsonl   rendered prompt, chosen, rejected
    unpaired_{train,eval}.jsonl     rendered prompt, completion, label (KTO-style rows)
    eval_tasks.jsonl                messages, the rendered prompt, expected, metric
    classification_{train,eval}.parquet   text, input_ids, label (the index of the label in the manifest's labels)
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

log = logging.getLogger(__name__)

SFT_SCHEMA = pa.schema(
    [
        ("messages", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
        ("text", pa.string()),
        ("input_ids", pa.list_(pa.int32())),
        ("assistant_masks", pa.list_(pa.int8())),
    ]
)


def sample(count: int, limit: int, what: str) -> list[int]:
    """Which of `count` held-out items evaluate.max_examples lets evaluate and serve-check score: all of them, or the
    same fixed random `limit` of them in file order. The first `limit` would score a file sorted by label, or the
    random share of the split without the curated rows data-prep puts after it, as if it were the whole."""
    if count <= limit:
        return list(range(count))
    log.warning("evaluate.max_examples is %d: scoring a fixed random %d of the %d held-out %s", limit, limit, count, what)
    return sorted(random.Random(0).sample(range(count), limit))


CLASSIFICATION_SCHEMA = pa.schema([("text", pa.string()), ("input_ids", pa.list_(pa.int32())), ("label", pa.int32())])


def write_classification(path: Path, rows: list[dict[str, Any]]) -> None:
    pq.write_table(pa.Table.from_pylist(rows, schema=CLASSIFICATION_SCHEMA), path)


def classification_split(data_dir: Path, split: str):
    """The tokenized rows of a classification split as a datasets.Dataset (input_ids, label)."""
    from datasets import Dataset

    table = pq.read_table(Path(data_dir) / f"classification_{split}.parquet", columns=["input_ids", "label"])
    return Dataset(table)


def write_sft(path: Path, rows: list[dict[str, Any]]) -> None:
    pq.write_table(pa.Table.from_pylist(rows, schema=SFT_SCHEMA), path)


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line]


def sft_split(data_dir: Path, split: str, loss_on: str):
    """The pre-tokenized SFT rows of a split as a datasets.Dataset of input_ids and labels, the labels masked to what
    sft.loss_on trains on (-100 elsewhere)."""
    from datasets import Dataset

    path = Path(data_dir) / f"sft_{split}.parquet"
    # datasets cannot read a parquet file without rows (data.eval_fraction 0 writes one).
    if pq.ParquetFile(path).metadata.num_rows == 0:
        return Dataset.from_dict({"input_ids": [], "labels": []})
    dataset = Dataset.from_parquet(str(path))

    def add_labels(row: dict[str, Any]) -> dict[str, Any]:
        if loss_on == "all":
            return {"labels": row["input_ids"]}
        return {"labels": [t if m else -100 for t, m in zip(row["input_ids"], row["assistant_masks"], strict=True)]}

    return dataset.map(add_labels, remove_columns=["messages", "text", "assistant_masks"])


def preference_split(data_dir: Path, split: str):
    """The rendered preference pairs of a split as a datasets.Dataset (prompt, chosen, rejected)."""
    from datasets import Dataset

    path = Path(data_dir) / f"preference_{split}.jsonl"
    if path.stat().st_size == 0:
        return Dataset.from_dict({"prompt": [], "chosen": [], "rejected": []})
    return Dataset.from_json(str(path))


def unpaired_split(data_dir: Path, split: str):
    """The rows of a split that KTO learns from, as a datasets.Dataset (prompt, completion, label): the unpaired rows,
    and each preference pair as its chosen answer (label true) and its rejected one (label false)."""
    from datasets import Dataset

    rows = [{"prompt": r["prompt"], "completion": r["completion"], "label": bool(r["label"])}
            for r in read_jsonl(Path(data_dir) / f"unpaired_{split}.jsonl")]
    for pair in read_jsonl(Path(data_dir) / f"preference_{split}.jsonl"):
        rows += [{"prompt": pair["prompt"], "completion": pair["chosen"], "label": True},
                 {"prompt": pair["prompt"], "completion": pair["rejected"], "label": False}]
    return Dataset.from_dict({key: [r[key] for r in rows] for key in ("prompt", "completion", "label")})
