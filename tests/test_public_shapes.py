"""The shapes of well-known public datasets, read by data-prep without a `format:` key, from JSONL, JSON, CSV and
Parquet files (samples in tests/shapes.py)."""

import csv
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import alpaca_rows, cli, make_config, write_jsonl
from shapes import SHAPES

FILE_TYPES = ["json", "csv", "parquet"]


def write(path, rows):
    if path.suffix == ".jsonl":
        return write_jsonl(path, rows)
    if path.suffix == ".json":
        path.write_text(json.dumps(rows))
    elif path.suffix == ".csv":  # nested values as JSON text, the way CSV exports of these datasets carry them
        keys = sorted({k for r in rows for k in r})
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, keys)
            writer.writeheader()
            writer.writerows({k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in r.items()} for r in rows)
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


CASES = [(name, suffix) for i, name in enumerate(SHAPES) for suffix in ("jsonl", FILE_TYPES[i % 3])]


@pytest.mark.parametrize(("name", "suffix"), CASES, ids=[f"{n}-{s}" for n, s in CASES])
def test_public_dataset_shapes_are_read_without_configuration(tmp_path, name, suffix):
    fmt, rows = SHAPES[name]
    sources = [write(tmp_path / f"{name}.{suffix}", rows)]
    if fmt in ("preference", "unpaired"):
        sources.append(write_jsonl(tmp_path / "sft.jsonl", alpaca_rows(8)))  # the SFT split the pipeline needs
    sections = {"sft": {"loss_on": "all"}} if fmt == "text" else {}
    config = make_config(tmp_path, sources, data={"eval_fraction": 0, "max_length": 128}, **sections)
    result = cli("stage", "data-prep", "--config", config, "--output", tmp_path / "out")
    assert result.exit_code == 0, result.stderr
    report = json.loads((tmp_path / "out" / "data_report.json").read_text())
    source = report["sources"][0]
    kind = {"preference": "preference", "unpaired": "unpaired"}.get(fmt, "sft")
    assert source["format"] == fmt and source["kept"] == {kind: len(rows)} and source["dropped"] == {}, source
    read = set().union(*rows) - set(source["ignored_columns"])
    assert read and all(key not in read for key in source["ignored_columns"])
    if name == "ultrafeedback-binarized":
        assert {"messages", "prompt_id", "score_chosen", "score_rejected"} <= set(source["ignored_columns"])
    if kind != "sft":
        written = [json.loads(line) for line in (tmp_path / "out" / f"{kind}_train.jsonl").read_text().splitlines()]
        first = next(r for r in written if " 0" in r["prompt"] or "Go away." in r.get("completion", ""))
        if name == "hh-rlhf":  # the shared turns are the prompt; the last assistant turns are the answers
            assert "Hello 0" in first["prompt"] and "Help me." in first["prompt"] and first["prompt"].endswith("assistant\n")
            assert first["chosen"].startswith("Sure, 0.") and first["rejected"].startswith("No.")
        if name == "argilla-orca-pairs":
            assert first["prompt"].startswith("<|im_start|>system\nYou are an AI assistant.") and "Translate word 0." in first["prompt"]
        if kind == "unpaired":
            assert isinstance(first["label"], bool) and "completion" in first


def test_tool_calls_and_images_are_refused_clearly_or_skipped(tmp_path):
    rows = [{"messages": [{"role": "user", "content": "Weather?"},
                          {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function"}]},
                          {"role": "tool", "content": "sunny"}, {"role": "assistant", "content": "Sunny."}]},
            *[{"messages": [{"role": "user", "content": f"Hi {i}"}, {"role": "assistant", "content": "Hello."}]}
              for i in range(4)]]
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    config = make_config(tmp_path, [path])
    refused = cli("stage", "data-prep", "--config", config, "--output", tmp_path / "out")
    assert refused.exit_code == 2
    assert f"{path}:1: messages[1]: tool calls and tool results are not supported" in refused.stderr
    config = make_config(tmp_path, [path], data={"on_error": "skip"})
    skipped = cli("stage", "data-prep", "--config", config, "--output", tmp_path / "out")
    assert skipped.exit_code == 0, skipped.stderr
    report = json.loads((tmp_path / "out" / "data_report.json").read_text())
    assert report["sources"][0]["dropped"] == {"malformed": 1} and report["sources"][0]["kept"] == {"sft": 4}
