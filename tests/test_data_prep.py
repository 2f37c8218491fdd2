"""data-prep on every input format and file type, and on malformed input."""

import csv
import json
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import alpaca_rows, assert_no_output, cli, make_config, preference_rows, write_jsonl
from transformers import AutoTokenizer

from tuneforge import models
from tuneforge.config import BaseModelSettings

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
    sources = [write_jsonl(tmp_path / "in.jsonl", rows)]
    if fmt == "preference":  # an SFT split is needed too
        sources.append(write_jsonl(tmp_path / "sft.jsonl", alpaca_rows(10)))
    result, out = run_prep(tmp_path, sources, sft={"loss_on": "all"} if fmt == "text" else {})
    assert result.exit_code == 0, result.stderr
    report = json.loads((out / "data_report.json").read_text())
    assert report["rows_by_format"][fmt] == len(rows)
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
        learned = tokenizer.decode([t for t, m in zip(row["input_ids"], row["assistant_masks"], strict=True) if m])
        number = row["messages"][1]["content"].split()[1].rstrip("?")
        assert learned == f"Alpha{number}<|im_end|>\nBeta{number}<|im_end|>\n"
        assert "Answer briefly" in row["text"]  # the system turn is rendered but not learned


def test_preference_answers_rendered_without_doubled_eos(tmp_path):
    sources = [write_jsonl(tmp_path / "p.jsonl", PREFERENCE_MESSAGES), write_jsonl(tmp_path / "s.jsonl", alpaca_rows(4))]
    result, out = run_prep(tmp_path, sources, data={"eval_fraction": 0})
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
    assert report["dropped"] == {"duplicate_exact": 1, "duplicate_normalized": 1, "prompt_too_long": 1}
    assert report["sources"][0]["dropped"] == report["dropped"] and report["sources"][0]["kept"] == {"sft": 20}
    assert report["malformed_skipped"] == 1 and "longer than data.max_length=64" in report["skipped_rows"][0]["reason"]
    first = [r["text"] for r in sft_rows(out, "eval")]
    again, out_again = run_prep(tmp_path, [path], data={"on_error": "skip", "max_length": 64})
    assert [r["text"] for r in sft_rows(out_again, "eval")] == first


def test_too_long_rows_are_dropped_and_counted(tmp_path):
    rows = alpaca_rows(6) + [{"instruction": "Short.", "output": "word " * 100}]
    result, out = run_prep(tmp_path, [write_jsonl(tmp_path / "in.jsonl", rows)], data={"max_length": 64})
    assert result.exit_code == 0, result.stderr
    assert json.loads((out / "data_report.json").read_text())["dropped"] == {"too_long": 1}
    # Most of a source over the limit (a limit set for other data): refused, rather than training on what is left.
    long_path = write_jsonl(tmp_path / "long.jsonl", alpaca_rows(3) + [{"instruction": f"Short {i}.", "output": "word " * 100}
                                                                      for i in range(4)])
    (tmp_path / "long").mkdir()
    result, out = run_prep(tmp_path / "long", [long_path], data={"max_length": 64})
    assert result.exit_code == 2
    assert (f"{long_path}: 4 of its 7 rows are longer than data.max_length=64 tokens and are dropped whole: raise "
            "data.max_length") in " ".join(result.stderr.split())
    assert_no_output(out)


def test_rows_past_the_model_context_are_refused_with_the_length_to_set(tmp_path):
    model = tmp_path / "short-context"
    shutil.copytree(models.resolve(BaseModelSettings(source="tiny-llama")), model)
    model_config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps(model_config | {"max_position_embeddings": 64}))
    rows = alpaca_rows(6) + [{"instruction": "Short.", "output": "word " * 100}]
    path = write_jsonl(tmp_path / "in.jsonl", rows)
    result, out = run_prep(tmp_path, [path], base_model={"source": str(model)}, data={"max_length": 256})
    assert result.exit_code == 2
    message = " ".join(result.stderr.split())
    assert "(1 of 7 over)" in message and f"base_model.source '{model}'" in message
    assert "(64 tokens, its max_position_embeddings): set data.max_length: 64" in message
    assert_no_output(out)
    result, out = run_prep(tmp_path, [path], base_model={"source": str(model)}, data={"max_length": 64})
    assert result.exit_code == 0, result.stderr
    assert json.loads((out / "data_report.json").read_text())["dropped"] == {"too_long": 1}


def test_eval_tasks_are_rendered(tmp_path):
    tasks = write_jsonl(tmp_path / "tasks.jsonl", [{"prompt": "Say hi", "expected": "hi", "metric": "contains"}])
    result, out = run_prep(tmp_path, [write_jsonl(tmp_path / "in.jsonl", alpaca_rows())], data={"eval_tasks": str(tasks)})
    assert result.exit_code == 0, result.stderr
    task = json.loads((out / "eval_tasks.jsonl").read_text())
    assert task["prompt"].endswith("<|im_start|>assistant\n") and task["metric"] == "contains"


def test_named_template_and_system_prompt(tmp_path):
    # The tiny model's tokenizer with Llama 3's turn markers as tokens of its own, as a Llama 3 tokenizer has them.
    model = tmp_path / "llama3-tokens"
    shutil.copytree(models.resolve(BaseModelSettings(source="tiny-llama")), model)
    tokenizer = AutoTokenizer.from_pretrained(model)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]})
    tokenizer.save_pretrained(model)
    result, out = run_prep(tmp_path, [write_jsonl(tmp_path / "in.jsonl", alpaca_rows())], base_model={"source": str(model)},
                           data={"chat_template": "llama3", "system_prompt": "Be terse.", "max_length": 512})
    assert result.exit_code == 0, result.stderr
    text = sft_rows(out)[0]["text"]
    assert text.startswith("<|start_header_id|>system<|end_header_id|>\n\nBe terse.<|eot_id|>")
    assert manifest(out)["lineage"]["special_tokens"]["stop"] == ["<|eot_id|>"]


@pytest.mark.parametrize("template", ["llama3", "gemma"])
def test_a_template_of_markers_the_tokenizer_lacks_is_refused(tmp_path, template):
    """On the tiny model's ChatML tokenizer the end of a llama3 or gemma turn is plain text: nothing to stop at."""
    result, out = run_prep(tmp_path, [write_jsonl(tmp_path / "in.jsonl", alpaca_rows())],
                           data={"chat_template": template, "max_length": 512})
    assert result.exit_code == 2
    message = " ".join(result.stderr.split())
    assert "data.chat_template: the template writes" in message and "base_model.source 'tiny-llama'" in message
    assert "never stop generating" in message and "a named template made of its tokens (chatml)" in message
    assert "data.chat_template unset" in message
    assert_no_output(out)


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
    assert "Formats considered: preference" in result.stderr
    # Where the intent is clear, precedence decides and the columns left over are listed.
    clear = write_jsonl(tmp_path / "c.jsonl", [{"text": f"a{i}", "prompt": f"b{i}", "completion": f"c{i}"} for i in range(4)])
    result, out = run_prep(tmp_path, [clear])
    assert result.exit_code == 0, result.stderr
    source = json.loads((out / "data_report.json").read_text())["sources"][0]
    assert source["format"] == "prompt_completion" and source["ignored_columns"] == ["text"]
    turns = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    ambiguous = write_jsonl(tmp_path / "a.jsonl", [{"messages": turns, "conversations": turns}])
    result, out = run_prep(tmp_path, [ambiguous])
    assert result.exit_code == 2 and "ambiguous row format" in result.stderr and "both messages and conversations" in result.stderr
    forced, out = run_prep(tmp_path, [{"path": str(ambiguous), "format": "messages"}])
    assert forced.exit_code == 0, forced.stderr


def test_bad_roles_missing_file_and_unsupported_type(tmp_path):
    rows = [{"messages": [{"role": "human", "content": "hi"}, {"role": "assistant", "content": "yo"}]}]
    result, out = run_prep(tmp_path, [write_jsonl(tmp_path / "r.jsonl", rows)])
    assert result.exit_code == 2 and "messages[0].role: 'human' is not one of system, developer, user, assistant" in result.stderr
    result, out = run_prep(tmp_path, [tmp_path / "missing.jsonl"])
    assert result.exit_code == 2 and "missing.jsonl: data file not found" in result.stderr
    (tmp_path / "x.txt").write_text("hello")
    result, out = run_prep(tmp_path, [tmp_path / "x.txt"])
    assert result.exit_code == 2 and "unsupported file type '.txt'" in result.stderr
    assert_no_output(out)


def test_everything_filtered_is_an_error(tmp_path):
    rows = [{"instruction": "Short.", "output": "word " * 100}]
    result, out = run_prep(tmp_path, [write_jsonl(tmp_path / "in.jsonl", rows)], data={"max_length": 32})
    assert result.exit_code == 2 and "no SFT training rows" in result.stderr
    assert "in.jsonl: 1 rows read (alpaca); kept: none; dropped: 1 too_long (data.max_length)" in result.stderr
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


def test_an_empty_split_the_run_needs_is_an_error_per_source(tmp_path):
    """Every SFT row too long while the preference pairs survive: data-prep fails, naming per source file what was
    read and dropped by which reason and the key that would change it; the same for DPO without pairs."""
    long_sft = [{"instruction": f"Item {i}.", "output": "word " * 80} for i in range(6)]
    sources = [write_jsonl(tmp_path / "sft.jsonl", long_sft), write_jsonl(tmp_path / "pref.jsonl", preference_rows(6))]
    result, out = run_prep(tmp_path, sources, data={"max_length": 48})
    assert result.exit_code == 2
    assert "no SFT training rows after reading and filtering" in result.stderr
    assert f"{tmp_path / 'sft.jsonl'}: 6 rows read (alpaca); kept: none; dropped: 6 too_long (data.max_length)" in result.stderr
    assert f"{tmp_path / 'pref.jsonl'}: 6 rows read (preference); kept: 6 preference" in result.stderr
    assert_no_output(out)

    only_sft = [write_jsonl(tmp_path / "only.jsonl", alpaca_rows(8))]
    result, out = run_prep(tmp_path, only_sft, dpo={"enabled": True})
    assert result.exit_code == 2 and "no preference pairs to train DPO on (dpo.enabled is true)" in result.stderr
    assert_no_output(out)


def test_empty_answers_are_dropped_and_counted(tmp_path):
    rows = [*alpaca_rows(6),
            {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "  "}]},
            {"instruction": "Say nothing.", "output": "\n"},
            {"prompt": "Q", "completion": ""}]
    sources = [write_jsonl(tmp_path / "a.jsonl", rows[:6]), write_jsonl(tmp_path / "m.jsonl", rows[6:7])]
    # A source whose every row is dropped is an error that names it.
    result, out = run_prep(tmp_path, sources)
    assert result.exit_code == 2 and f"{tmp_path / 'm.jsonl'}: every one of its 1 rows was dropped: 1 empty_answer" in result.stderr
    mixed = write_jsonl(tmp_path / "mixed.jsonl", [rows[7], {"instruction": "Also nothing.", "output": " "}, *alpaca_rows(6)])
    result, out = run_prep(tmp_path, [mixed])
    assert result.exit_code == 0, result.stderr
    report = json.loads((out / "data_report.json").read_text())
    assert report["dropped"] == {"empty_answer": 2} and report["sources"][0]["kept"] == {"sft": 6}
    assert "empty_answer 2" in (out / "report.md").read_text()


@pytest.mark.parametrize("action", ["warn", "drop", "fail"])
def test_prompts_leaking_into_the_held_out_data(tmp_path, action):
    train = alpaca_rows(12)
    tasks = [{"prompt": f"{train[0]['instruction']}\n\n{train[0]['input']}", "expected": train[0]["output"]}]
    curated = [{**train[1], "output": "another answer"}]  # the same prompt as a training row, in a held-out source
    sources = [write_jsonl(tmp_path / "train.jsonl", train),
               {"path": str(write_jsonl(tmp_path / "heldout.jsonl", curated)), "split": "eval"}]
    config = make_config(tmp_path, sources, data={"eval_fraction": 0, "leakage": action,
                                                   "eval_tasks": str(write_jsonl(tmp_path / "tasks.jsonl", tasks))})
    result = cli("stage", "data-prep", "--config", config, "--output", tmp_path / "out")
    if action == "fail":
        assert result.exit_code == 2 and "2 training rows have a prompt that is also in the held-out split or the eval tasks" in result.stderr
        assert "data.leakage" in result.stderr
        return
    assert result.exit_code == 0, result.stderr
    report = json.loads((tmp_path / "out" / "data_report.json").read_text())
    assert report["leakage_rows"] == 2
    assert report["sft_train"] == (10 if action == "drop" else 12) and report["sft_eval"] == 1


def test_sources_mixed_by_weight_and_capped_by_max_rows(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", alpaca_rows(40))
    b = write_jsonl(tmp_path / "b.jsonl", [{"prompt": f"Q{i}", "completion": f"A{i}"} for i in range(20)])
    c = write_jsonl(tmp_path / "c.jsonl", [{"text": f"Line {i} of text."} for i in range(30)])
    sources = [{"path": str(a), "weight": 1}, {"path": str(b), "weight": 1}, {"path": str(c), "max_rows": 5, "weight": 0.5}]
    result, out = run_prep(tmp_path, sources, data={"eval_fraction": 0})
    assert result.exit_code == 0, result.stderr
    report = json.loads((out / "data_report.json").read_text())
    used = {s["path"]: s["kept"]["sft"] for s in report["sources"]}
    # c has 5 rows after max_rows, at half the weight: the mix is 10 : 10 : 5.
    assert used == {str(a): 10, str(b): 10, str(c): 5}
    assert manifest(out)["lineage"]["data_mix"] == {str(a): {"sft": 10}, str(b): {"sft": 10}, str(c): {"sft": 5}}
    again, out2 = run_prep(tmp_path, sources, data={"eval_fraction": 0})  # seeded: the same rows
    assert sft_rows(out2) == sft_rows(out)
