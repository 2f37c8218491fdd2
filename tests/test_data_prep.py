"""data-prep on every input format and file type, and on malformed input."""

import csv
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import alpaca_rows, assert_no_output, cli, make_config, preference_rows, write_jsonl

MESSAGES = [
    {
        "messages": [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": f"Name {i}?"},
            {"role": "assistant", "content": f"Alpha{i}"},
            {"role": "user", "content": "And again?"},
            {"role": "assistant", "content": f"Beta{i}"},
        ]
    }
    for i in range(10)
]
SHAREGPT = [
    {"conversations": [{"from": "human", "value": f"Hi {i}"}, {"from": "gpt", "value": f"Hello {i}"}]} for i in range(10)
]
PROMPT_COMPLETION = [{"prompt": f"Say {i}", "completion": f"{i}"} for i in range(10)]
TEXT = [{"text": f"Plain text number {i} for pretraining."} for i in range(10)]
DOLLY = [{"instruction": f"Summarise {i}.", "context": f"Text {i} is long.", "response": f"Short {i}.", "category": "summarization"} for i in range(10)]
SHAREGPT_ROLE_CONTENT = [
    {"conversations": [{"role": "user", "content": [{"type": "text", "text": f"Hi {i}"}]}, {"role": "assistant", "content": f"Yo {i}"}]}
    for i in range(10)
]
ORCA_DPO = [{"system": "Be kind.", "question": f"Q{i}?", "chosen": f"Yes {i}.", "rejected": f"No {i}."} for i in range(10)]
PREFERENCE_MESSAGES = [
    {
        "chosen": [{"role": "user", "content": f"Q{i}"}, {"role": "assistant", "content": f"good {i}"}],
        "rejected": [{"role": "user", "content": f"Q{i}"}, {"role": "assistant", "content": f"bad {i}"}],
    }
    for i in range(10)
]


def run_prep(tmp_path, sources, **sections):
    config = make_config(tmp_path, sources, **sections)
    out = tmp_path / "data"
    return cli("stage", "data-prep", "--config", config, "--output", out), out


def manifest(out):
    return json.loads((out / "manifest.json").read_text())


def sft_rows(out, split="train"):
    return pq.read_table(out / f"sft_{split}.parquet").to_pylist()


@pytest.mark.parametrize(
    "rows, fmt",
    [
        (alpaca_rows(10), "alpaca"),
        (MESSAGES, "messages"),
        (SHAREGPT, "sharegpt"),
        (PROMPT_COMPLETION, "prompt_completion"),
        (TEXT, "text"),
        (preference_rows(10), "preference"),
        (PREFERENCE_MESSAGES, "preference"),
        (DOLLY, "alpaca"),
        (SHAREGPT_ROLE_CONTENT, "sharegpt"),
        (ORCA_DPO, "preference"),
    ],
    ids=["alpaca", "messages", "sharegpt", "prompt_completion", "text", "preference", "preference-messages",
         "dolly", "sharegpt-role-content-parts", "orca-dpo"],
)
def test_each_format_is_detected_and_normalised(tmp_path, rows, fmt):
    result, out = run_prep(tmp_path, [write_jsonl(tmp_path / "in.jsonl", rows)], sft={"loss_on": "all"} if fmt == "text" else {})
    assert result.exit_code == 0, result.stderr
    report = json.loads((out / "data_report.json").read_text())
    assert report["rows_by_format"] == {fmt: len(rows)}
    data = manifest(out)["lineage"]
    assert data["chat_template_sha256"] and data["special_tokens"]["eos"] == "<|im_end|>"
    assert (out / "token_lengths.png").stat().st_size > 1000


def test_multiturn_masks_cover_every_assistant_turn_and_nothing_else(tmp_path):
    from transformers import AutoTokenizer

    from tuneforge.config import BaseModelSettings
    from tuneforge.models import resolve

    result, out = run_prep(tmp_path, [write_jsonl(tmp_path / "chat.jsonl", MESSAGES)], data={"eval_fraction": 0})
    assert result.exit_code == 0, result.stderr
    tokenizer = AutoTokenizer.from_pretrained(resolve(BaseModelSettings(source="tiny-llama")))
    for row in sft_rows(out):
        learned = tokenizer.decode([t for t, m in zip(row["input_ids"], row["assistant_masks"]) if m])
        number = row["messages"][1]["content"].split()[1].rstrip("?")
        assert learned == f"Alpha{number}<|im_end|>\nBeta{number}<|im_end|>\n"
        assert "Answer briefly" in row["text"]  # the system turn is rendered but not learned


def test_preference_answers_rendered_without_doubled_eos(tmp_path):
    result, out = run_prep(tmp_path, [write_jsonl(tmp_path / "p.jsonl", PREFERENCE_MESSAGES)], data={"eval_fraction": 0})
    assert result.exit_code == 0, result.stderr
    pair = json.loads((out / "preference_train.jsonl").read_text().splitlines()[0])
    assert pair["prompt"].startswith("<|im_start|>user\nQ") and pair["prompt"].endswith("<|im_start|>assistant\n")
    assert pair["chosen"].startswith("good ") and pair["chosen"].endswith("<|im_end|>")


def test_num_proc_gives_the_same_output_as_one_process(tmp_path):
    sources = [write_jsonl(tmp_path / "a.jsonl", alpaca_rows(30)), write_jsonl(tmp_path / "m.jsonl", MESSAGES),
               write_jsonl(tmp_path / "t.jsonl", TEXT)]
    config, outputs = make_config(tmp_path, sources), {1: tmp_path / "one", 2: tmp_path / "two"}
    for procs, out in outputs.items():
        result = cli("stage", "data-prep", "--config", config, "--output", out, "--set", f"data.num_proc={procs}")
        assert result.exit_code == 0, result.stderr
    for name in ("sft_train.parquet", "sft_eval.parquet"):
        assert (outputs[2] / name).read_bytes() == (outputs[1] / name).read_bytes()
    assert manifest(outputs[2])["lineage"]["special_tokens"] == manifest(outputs[1])["lineage"]["special_tokens"]


def test_json_parquet_csv_files(tmp_path):
    rows = alpaca_rows(12)
    (tmp_path / "a.json").write_text(json.dumps({"data": rows[:4]}))
    pq.write_table(pa.Table.from_pylist(rows[4:8]), tmp_path / "b.parquet")
    with open(tmp_path / "c.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["instruction", "input", "output"])
        writer.writeheader()
        writer.writerows(rows[8:])
    result, out = run_prep(tmp_path, [tmp_path / "a.json", tmp_path / "b.parquet", tmp_path / "c.csv"], data={"eval_fraction": 0.25})
    assert result.exit_code == 0, result.stderr
    assert len(sft_rows(out)) + len(sft_rows(out, "eval")) == 12
    assert len(sft_rows(out, "eval")) == 3


def test_duplicates_length_filter_and_seeded_split(tmp_path):
    rows = alpaca_rows(20)
    rows.append(dict(rows[0]))  # exact duplicate
    rows.append({**rows[1], "output": rows[1]["output"].upper()})  # differs only in case
    rows.append({"instruction": "long " * 200, "output": "x"})  # prompt longer than the limit
    path = write_jsonl(tmp_path / "in.jsonl", rows)
    result, out = run_prep(tmp_path, [path], data={"on_error": "skip", "max_length": 64})
    assert result.exit_code == 0, result.stderr
    report = json.loads((out / "data_report.json").read_text())
    assert report["dropped"] == {"duplicate_exact": 1, "duplicate_normalized": 1}
    assert report["malformed_skipped"] == 1 and "longer than data.max_length=64" in report["skipped_rows"][0]["reason"]
    first = [r["text"] for r in sft_rows(out, "eval")]
    again, out_again = run_prep(tmp_path, [path], data={"on_error": "skip", "max_length": 64})
    assert [r["text"] for r in sft_rows(out_again, "eval")] == first


def test_too_long_rows_are_dropped_and_counted(tmp_path):
    rows = alpaca_rows(6) + [{"instruction": "Short.", "output": "word " * 100}]
    result, out = run_prep(tmp_path, [write_jsonl(tmp_path / "in.jsonl", rows)], data={"max_length": 64})
    assert result.exit_code == 0, result.stderr
    assert json.loads((out / "data_report.json").read_text())["dropped"] == {"too_long": 1}


def test_eval_tasks_are_rendered(tmp_path):
    tasks = write_jsonl(tmp_path / "tasks.jsonl", [{"prompt": "Say hi", "expected": "hi", "metric": "contains"}])
    result, out = run_prep(tmp_path, [write_jsonl(tmp_path / "in.jsonl", alpaca_rows())], data={"eval_tasks": str(tasks)})
    assert result.exit_code == 0, result.stderr
    task = json.loads((out / "eval_tasks.jsonl").read_text())
    assert task["prompt"].endswith("<|im_start|>assistant\n") and task["metric"] == "contains"


def test_named_template_and_system_prompt(tmp_path):
    result, out = run_prep(tmp_path, [write_jsonl(tmp_path / "in.jsonl", alpaca_rows())], data={"chat_template": "llama3", "system_prompt": "Be terse.", "max_length": 512})
    assert result.exit_code == 0, result.stderr
    text = sft_rows(out)[0]["text"]
    assert text.startswith("<|start_header_id|>system<|end_header_id|>\n\nBe terse.<|eot_id|>")


# ------------------------------------------------------------- malformed input


def bad_jsonl(tmp_path, line3: str):
    lines = [json.dumps(r) for r in alpaca_rows(4)]
    lines.insert(2, line3)
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize(
    "line3, reason",
    [
        ('{"instruction": "x", "output": ', "invalid JSON"),
        ('{"instruction": "Do it."}', "missing field 'output'"),
        ('{"instruction": "Do it.", "output": 42}', "field 'output' must be a string, got int"),
        ('["not", "an", "object"]', "expected an object with named fields, got list"),
        ('{"instruction": "Do it.", "output": "   "}', "field 'output' is empty"),
    ],
)
def test_malformed_row_names_file_line_and_reason(tmp_path, line3, reason):
    path = bad_jsonl(tmp_path, line3)
    result, out = run_prep(tmp_path, [path])
    assert result.exit_code == 2
    assert f"{path}:3: " in result.stderr and reason in result.stderr and "on_error: skip" in result.stderr
    assert_no_output(out)


def test_on_error_skip_reports_which_rows(tmp_path):
    path = bad_jsonl(tmp_path, '{"instruction": "Do it."}')
    result, out = run_prep(tmp_path, [path], data={"on_error": "skip"})
    assert result.exit_code == 0, result.stderr
    report = json.loads((out / "data_report.json").read_text())
    assert report["malformed_skipped"] == 1 and report["skipped_rows"][0]["where"] == f"{path}:3"
    assert f"{path}:3: missing field 'output'" in (out / "report.md").read_text()


def test_empty_file(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n")
    result, out = run_prep(tmp_path, [path])
    assert result.exit_code == 2 and f"{path}: file holds no rows" in result.stderr
    assert_no_output(out)


def test_wrong_encoding(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"text": "ok"}\n' + '{"text": "caf\u00e9"}\n'.encode("latin-1"))
    result, out = run_prep(tmp_path, [path])
    assert result.exit_code == 2 and f"{path}:2: not UTF-8 text (byte 0xe9" in result.stderr
    assert_no_output(out)


def test_prompt_longer_than_limit(tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", alpaca_rows(3) + [{"instruction": "word " * 300, "output": "x"}])
    result, out = run_prep(tmp_path, [path], data={"max_length": 64})
    assert result.exit_code == 2
    assert f"{path}:4: the prompt is" in result.stderr and "longer than data.max_length=64" in result.stderr
    assert_no_output(out)


def test_unknown_and_ambiguous_formats(tmp_path):
    unknown = write_jsonl(tmp_path / "u.jsonl", [{"question": "a", "answer": "b"}])
    result, out = run_prep(tmp_path, [unknown])
    assert result.exit_code == 2 and "unknown row format; keys found: answer, question" in result.stderr
    assert "Formats considered: alpaca" in result.stderr
    ambiguous = write_jsonl(tmp_path / "a.jsonl", [{"text": "a", "prompt": "b", "completion": "c"}])
    result, out = run_prep(tmp_path, [ambiguous])
    assert result.exit_code == 2 and "match prompt_completion, text" in result.stderr
    forced, out = run_prep(tmp_path, [{"path": str(ambiguous), "format": "text"}], sft={"loss_on": "all"})
    assert forced.exit_code == 0, forced.stderr


def test_bad_roles_missing_file_and_unsupported_type(tmp_path):
    rows = [{"messages": [{"role": "human", "content": "hi"}, {"role": "assistant", "content": "yo"}]}]
    result, out = run_prep(tmp_path, [write_jsonl(tmp_path / "r.jsonl", rows)])
    assert result.exit_code == 2 and "messages[0].role: 'human' is not one of system, user, assistant" in result.stderr
    result, out = run_prep(tmp_path, [tmp_path / "missing.jsonl"])
    assert result.exit_code == 2 and "missing.jsonl: data file not found" in result.stderr
    (tmp_path / "x.txt").write_text("hello")
    result, out = run_prep(tmp_path, [tmp_path / "x.txt"])
    assert result.exit_code == 2 and "unsupported file type '.txt'" in result.stderr
    assert_no_output(out)


def test_everything_filtered_is_an_error(tmp_path):
    rows = [{"instruction": "Short.", "output": "word " * 100}]
    result, out = run_prep(tmp_path, [write_jsonl(tmp_path / "in.jsonl", rows)], data={"max_length": 32})
    assert result.exit_code == 2 and "data-prep produced no rows: 1 too_long" in result.stderr
    assert_no_output(out)


def test_broken_parquet_and_csv(tmp_path):
    (tmp_path / "b.parquet").write_bytes(b"PAR1 this is not parquet")
    result, out = run_prep(tmp_path, [tmp_path / "b.parquet"])
    assert result.exit_code == 2 and "not a readable Parquet file" in result.stderr
    (tmp_path / "c.csv").write_text("instruction,output\nDo it.,done,extra\n")
    result, out = run_prep(tmp_path, [tmp_path / "c.csv"])
    assert result.exit_code == 2 and f"{tmp_path / 'c.csv'}:2: more fields than the header names" in result.stderr
    assert_no_output(out)


def test_public_dataset_variants_keep_their_content(tmp_path):
    result, out = run_prep(tmp_path, [write_jsonl(tmp_path / "dolly.jsonl", DOLLY), write_jsonl(tmp_path / "orca.jsonl", ORCA_DPO)],
                           data={"eval_fraction": 0})
    assert result.exit_code == 0, result.stderr
    texts = {r["text"] for r in sft_rows(out)}
    assert any("Summarise 0.\n\nText 0 is long.<|im_end|>" in t and "Short 0.<|im_end|>" in t for t in texts)
    pairs = [json.loads(line) for line in (out / "preference_train.jsonl").read_text().splitlines()]
    assert all(p["prompt"].startswith("<|im_start|>system\nBe kind.<|im_end|>\n<|im_start|>user\nQ") for p in pairs)
