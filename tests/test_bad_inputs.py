"""The bad-input corpus: every case must fail fast with a message naming the file, line or key, exit 2
(a user error, not a crash), and leave no output that looks complete.

Each case is a function that writes its broken input under `tmp` and returns the tuneforge command line
and the fragments its error must contain. Data cases run data-prep, the first stage, so they show the
error comes before any training; model cases run data-prep too (it loads the tokenizer) or sft where only
loading the weights can tell.
"""

import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from conftest import EXAMPLES, assert_no_output, cli, make_config

GOOD_ROW = {"instruction": "Say hi.", "input": "", "output": "hi"}
# Data cases fail before the model is even loaded or right after the tokenizer: a few seconds at most,
# the first one paying for building the tiny model.
LIMIT_SECONDS = 20


def data_case(tmp: Path, name: str, content: bytes | str, fmt: dict | None = None):
    path = tmp / name
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    config = make_config(tmp, [{"path": str(path), **(fmt or {})}])
    return ["stage", "data-prep", "--config", config, "--output", tmp / "out"], path


def lines(*rows) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)


def parquet_bytes(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()


# ------------------------------------------------------------------------------------------ data files

def case_jsonl_bad_json(tmp):
    args, path = data_case(tmp, "d.jsonl", lines(GOOD_ROW, GOOD_ROW, '{"instruction": "x", "output": }'))
    return args, [f"{path}:3", "invalid JSON"]


def case_jsonl_truncated(tmp):
    args, path = data_case(tmp, "d.jsonl", lines(GOOD_ROW, GOOD_ROW) + '{"instruction": "Say', )
    return args, [f"{path}:3", "invalid JSON"]


def case_jsonl_wrong_type(tmp):
    args, path = data_case(tmp, "d.jsonl", lines(GOOD_ROW, {"instruction": 7, "output": "x"}))
    return args, [f"{path}:2", "instruction"]


def case_jsonl_missing_field(tmp):
    args, path = data_case(tmp, "d.jsonl", lines(GOOD_ROW, {"instruction": "Say hi."}))
    return args, [f"{path}:2"]


def case_jsonl_not_an_object(tmp):
    args, path = data_case(tmp, "d.jsonl", lines(GOOD_ROW, ["a", "list"]))
    return args, [f"{path}:2", "object"]


def case_jsonl_every_answer_empty(tmp):
    # One empty answer is a drop that the data report counts; when every answer is empty nothing is left to train on.
    args, path = data_case(tmp, "d.jsonl", lines(*[{"instruction": f"Say hi {i}.", "input": "", "output": "  "}
                                                   for i in range(3)]))
    return args, [str(path), "no SFT training rows", "3 empty_answer"]


def case_jsonl_empty_file(tmp):
    args, path = data_case(tmp, "d.jsonl", "")
    return args, [str(path), "no rows"]


def case_jsonl_only_blank_lines(tmp):
    args, path = data_case(tmp, "d.jsonl", "\n\n   \n")
    return args, [str(path), "no rows"]


def case_jsonl_latin1(tmp):
    args, path = data_case(tmp, "d.jsonl", lines(GOOD_ROW).encode() + '{"instruction": "café", "output": "x"}\n'.encode("latin-1"))
    return args, [f"{path}:2", "not UTF-8", "0xe9"]


def case_jsonl_utf16(tmp):
    args, path = data_case(tmp, "d.jsonl", lines(GOOD_ROW).encode("utf-16"))
    return args, [f"{path}:1", "not UTF-8"]


def case_jsonl_binary_garbage(tmp):
    args, path = data_case(tmp, "d.jsonl", os.urandom(64) + b"\n")
    return args, [f"{path}:1"]


def case_jsonl_huge_line(tmp):
    # 8 MB in one prompt: refused by its size before the tokenizer spends minutes on it.
    args, path = data_case(tmp, "d.jsonl", lines(GOOD_ROW, {"instruction": "word " * 1_600_000, "output": "x"}))
    return args, [f"{path}:2", "max_length"]


def case_messages_bad_role(tmp):
    args, path = data_case(tmp, "d.jsonl", lines({"messages": [{"role": "wizard", "content": "hi"}, {"role": "assistant", "content": "x"}]}))
    return args, [f"{path}:1", "wizard"]


def case_messages_empty(tmp):
    args, path = data_case(tmp, "d.jsonl", lines({"messages": []}))
    return args, [f"{path}:1"]


def case_messages_no_assistant(tmp):
    args, path = data_case(tmp, "d.jsonl", lines({"messages": [{"role": "user", "content": "hi"}]}))
    return args, [f"{path}:1", "assistant"]


def case_sharegpt_unknown_speaker(tmp):
    args, path = data_case(tmp, "d.jsonl", lines({"conversations": [{"from": "narrator", "value": "hi"}, {"from": "gpt", "value": "x"}]}))
    return args, [f"{path}:1", "narrator"]


def case_preference_missing_rejected(tmp):
    args, path = data_case(tmp, "d.jsonl", lines({"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "p2", "chosen": "a"}))
    return args, [f"{path}:2"]


def case_orpo_without_pairs(tmp):
    (tmp / "sft.jsonl").write_text(lines(*[GOOD_ROW] * 4))
    path = tmp / "unpaired.jsonl"
    path.write_text(lines(*[{"prompt": f"p{i}", "completion": "a", "label": i % 2 == 0} for i in range(4)]))
    config = make_config(tmp, [tmp / "sft.jsonl", path], dpo={"enabled": True, "method": "orpo"})
    return ["stage", "data-prep", "--config", config, "--output", tmp / "out"], [
        str(path), "no preference pairs to train ORPO on", "unpaired rows train dpo.method: kto only"]


def case_unknown_format(tmp):
    args, path = data_case(tmp, "d.jsonl", lines({"foo": 1, "bar": 2}))
    return args, [str(path), "unknown row format", "bar, foo"]


def case_format_forced_but_wrong(tmp):
    args, path = data_case(tmp, "d.jsonl", lines(GOOD_ROW), {"format": "messages"})
    return args, [f"{path}:1", "messages"]


def case_json_malformed(tmp):
    args, path = data_case(tmp, "d.json", '[{"instruction": "x", "output": "y"},\n {"instruction": ')
    return args, [f"{path}:2", "invalid JSON"]


def case_json_not_a_list(tmp):
    args, path = data_case(tmp, "d.json", '"just a string"')
    return args, [str(path), "JSON list"]


def case_parquet_truncated(tmp):
    data = parquet_bytes(pa.table({"instruction": ["a", "b"], "output": ["c", "d"]}))
    args, path = data_case(tmp, "d.parquet", data[: len(data) // 2])
    return args, [str(path), "Parquet"]


def case_parquet_wrong_columns(tmp):
    args, path = data_case(tmp, "d.parquet", parquet_bytes(pa.table({"question": ["a"], "label": [1]})))
    return args, [str(path), "format"]


def case_csv_unbalanced_quote(tmp):
    args, path = data_case(tmp, "d.csv", 'instruction,output\n"Say hi,hi\n')
    return args, [str(path)]


def case_csv_missing_column(tmp):
    args, path = data_case(tmp, "d.csv", "instruction\nSay hi.\n")
    return args, [str(path)]


def case_data_missing_file(tmp):
    config = make_config(tmp, [tmp / "nope.jsonl"])
    return ["stage", "data-prep", "--config", config, "--output", tmp / "out"], [f"{tmp / 'nope.jsonl'}", "not found"]


def case_data_is_a_directory(tmp):
    (tmp / "dir.jsonl").mkdir()
    config = make_config(tmp, [tmp / "dir.jsonl"])
    return ["stage", "data-prep", "--config", config, "--output", tmp / "out"], [str(tmp / "dir.jsonl")]


def case_data_unsupported_type(tmp):
    args, path = data_case(tmp, "d.txt", "hello\n")
    return args, [str(path), ".txt"]


def case_everything_too_long(tmp):
    row = {"instruction": "Say hi.", "input": "", "output": "word " * 400}
    args, path = data_case(tmp, "d.jsonl", lines(*[dict(row, instruction=f"Say hi {i}.") for i in range(4)]))
    return args, [str(path), "no SFT training rows", "4 too_long (data.max_length)"]


def case_template_renders_nothing_to_learn(tmp):
    # A custom template that drops assistant turns: there is nothing to train on.
    args, path = data_case(tmp, "d.jsonl", lines(GOOD_ROW))
    config = yaml.safe_load(Path(args[3]).read_text())
    config["data"]["chat_template"] = "{% for m in messages %}{% if m.role != 'assistant' %}{{ m.content }}\n{% endif %}{% endfor %}"
    Path(args[3]).write_text(yaml.safe_dump(config))
    return args, [f"{path}:1", "no assistant tokens"]


def case_s3_data_bad_uri(tmp):
    config = make_config(tmp, ["s3:///no-bucket.jsonl"])
    return ["stage", "data-prep", "--config", config, "--output", tmp / "out"], ["s3:///no-bucket.jsonl", "bucket"]


def case_data_other_scheme(tmp):
    config = make_config(tmp, ["hf://datasets/x/y.jsonl"])
    return ["stage", "data-prep", "--config", config, "--output", tmp / "out"], ["hf://datasets/x/y.jsonl", "s3://"]


# ---------------------------------------------------------------------------------------------- configs

def write(tmp: Path, name: str, text: str | bytes) -> Path:
    path = tmp / name
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return path


def good_config(tmp) -> dict:
    return yaml.safe_load(make_config(tmp, [EXAMPLES / "data" / "extract_train.jsonl"]).read_text())


def case_config_yaml_syntax(tmp):
    path = write(tmp, "c.yaml", "name: x\nbase_model:\n  source: tiny-llama\n data: [\n")
    return ["validate", path], [str(path), "line 4"]


def edited_config(tmp, edit) -> Path:
    config = good_config(tmp)
    edit(config)
    return write(tmp, "c.yaml", yaml.safe_dump(config))


def case_config_unknown_key(tmp):
    path = edited_config(tmp, lambda c: c["sft"].update(learning_rte=1e-4))
    return ["validate", path], [str(path), "sft.learning_rte"]


def case_config_wrong_type(tmp):
    path = edited_config(tmp, lambda c: c["sft"].update(max_steps="ten"))
    return ["validate", path], [str(path), "sft.max_steps", "ten"]


def case_config_missing_required(tmp):
    path = edited_config(tmp, lambda c: c.pop("base_model"))
    return ["validate", path], [str(path), "base_model"]


def case_config_bad_choice(tmp):
    path = edited_config(tmp, lambda c: c["sft"].update(method="qlora2"))
    return ["validate", path], [str(path), "sft.method", "qlora"]


def case_config_negative_rate(tmp):
    path = edited_config(tmp, lambda c: c["sft"].update(learning_rate=-1))
    return ["validate", path], [str(path), "sft.learning_rate"]


def case_config_missing_file(tmp):
    return ["validate", tmp / "absent.yaml"], [str(tmp / "absent.yaml")]


def case_config_empty_file(tmp):
    path = write(tmp, "c.yaml", "")
    return ["validate", path], [str(path)]


def case_config_top_level_list(tmp):
    path = write(tmp, "c.yaml", "- name: x\n")
    return ["validate", path], [str(path), "mapping"]


def case_config_not_utf8(tmp):
    path = write(tmp, "c.yaml", "name: caf\xe9\n".encode("latin-1"))
    return ["validate", path], [str(path)]


def case_config_storage_not_s3(tmp):
    path = edited_config(tmp, lambda c: c.update(storage={"uri": "gs://bucket/runs"}))
    return ["validate", path], [str(path), "storage", "s3://"]


def case_config_zero_processes(tmp):
    path = edited_config(tmp, lambda c: c["sft"].update(distributed={"processes": 0}))
    return ["validate", path], [str(path), "sft.distributed.processes", "greater than or equal to 1"]


def case_config_unknown_strategy(tmp):
    path = edited_config(tmp, lambda c: c["dpo"].update(distributed={"strategy": "zero2"}))
    return ["validate", path], [str(path), "dpo.distributed.strategy", "'zero2'", "deepspeed_zero3"]


def case_config_nodes_without_storage(tmp):
    path = edited_config(tmp, lambda c: c["sft"].update(distributed={"nodes": 4}))
    return ["validate", path], [str(path), "sft.distributed.nodes > 1 needs storage.uri"]


def case_config_unknown_backend(tmp):
    path = edited_config(tmp, lambda c: c["sft"].update(backend="vllm"))
    return ["validate", path], [str(path), "sft.backend", "'vllm'", "unsloth"]


def case_config_padding_free_dpo(tmp):
    path = edited_config(tmp, lambda c: c["dpo"].update(batching="padding_free"))
    return ["validate", path], [str(path), "dpo.batching", "use grouped or auto"]


def case_config_dpo_loss_with_another_method(tmp):
    path = edited_config(tmp, lambda c: c["dpo"].update(method="orpo", loss_type="ipo"))
    return ["validate", path], [str(path), "dpo.loss_type is a DPO loss; dpo.method is orpo"]


def case_config_unknown_preference_method(tmp):
    path = edited_config(tmp, lambda c: c["dpo"].update(method="ppo"))
    return ["validate", path], [str(path), "dpo.method", "'ppo'", "simpo"]


def case_config_kto_batch_of_one(tmp):
    path = edited_config(tmp, lambda c: c["dpo"].update(method="kto", batch_size=1))
    return ["validate", path], [str(path), "dpo.batch_size must be at least 2 for dpo.method kto"]


def case_config_unknown_reward(tmp):
    path = edited_config(tmp, lambda c: c.update(grpo={"enabled": True, "rewards": [{"type": "bleu"}]}))
    return ["validate", path], [str(path), "grpo.rewards.0.type", "'bleu'", "json_valid"]


def case_config_reward_code_not_allowed(tmp):
    path = edited_config(tmp, lambda c: c.update(grpo={"enabled": True, "rewards": [
        {"type": "exact"}, {"type": "python", "function": "my_rewards:score"}]}))
    return ["validate", path], [str(path), "grpo.rewards.1.function 'my_rewards:score' runs code from the config",
                                "grpo.allow_code: true"]


def case_config_reward_bad_regex(tmp):
    path = edited_config(tmp, lambda c: c.update(grpo={"enabled": True, "rewards": [{"type": "regex", "pattern": "(a"}]}))
    return ["validate", path], [str(path), "grpo.rewards.0", "'(a' is not a regular expression"]


def case_config_schema_reward_without_schema(tmp):
    path = edited_config(tmp, lambda c: c.update(grpo={"enabled": True, "rewards": [{"type": "json_schema"}]}))
    return ["validate", path], [str(path), "grpo.rewards.0", "a json_schema reward needs `json_schema`"]


def case_config_grpo_batch_not_whole_groups(tmp):
    path = edited_config(tmp, lambda c: c.update(grpo={"enabled": True, "batch_size": 6, "num_generations": 4}))
    return ["validate", path], [str(path), "grpo.batch_size (6) must be a multiple of grpo.num_generations (4)"]


def case_config_dpo_and_grpo(tmp):
    path = edited_config(tmp, lambda c: (c["dpo"].update(enabled=True), c.update(grpo={"enabled": True})))
    return ["validate", path], [str(path), "dpo.enabled and grpo.enabled"]


def case_grpo_reward_function_missing(tmp):
    config = make_config(tmp, [EXAMPLES / "data" / "extract_train.jsonl"], grpo={
        "enabled": True, "allow_code": True, "rewards": [{"type": "python", "function": "no_such_module:f"}]})
    return ["stage", "grpo", "--config", config, "--input", f"data={tmp / 'data'}", "--output", tmp / "out"], [
        "grpo.rewards.0.function 'no_such_module:f' cannot be loaded", "No module named 'no_such_module'"]


def case_config_no_sft_for_dpo(tmp):
    path = edited_config(tmp, lambda c: (c["sft"].update(enabled=False), c["dpo"].update(enabled=True)))
    return ["validate", path], [str(path), "sft.enabled: false", "dpo.method orpo, simpo or cpo"]


def case_config_unknown_batching(tmp):
    path = edited_config(tmp, lambda c: c["sft"].update(batching="sorted"))
    return ["validate", path], [str(path), "sft.batching", "'sorted'", "padding_free"]


def case_set_without_equals(tmp):
    path = write(tmp, "c.yaml", yaml.safe_dump(good_config(tmp)))
    return ["validate", path, "--set", "sft.max_steps"], ["--set", "sft.max_steps"]


def case_set_unknown_key(tmp):
    path = write(tmp, "c.yaml", yaml.safe_dump(good_config(tmp)))
    return ["validate", path, "--set", "sft.nope=1"], ["sft.nope"]


# ----------------------------------------------------------------------------------------- model dirs

def model_case(tmp: Path, files: dict[str, bytes], stage: str = "data-prep"):
    model = tmp / "model"
    model.mkdir()
    for name, content in files.items():
        (model / name).write_bytes(content)
    config = make_config(tmp, [EXAMPLES / "data" / "extract_train.jsonl"], base_model={"source": str(model)})
    return ["stage", stage, "--config", config, "--output", tmp / "out"], model


def tiny_files() -> dict[str, bytes]:
    from tuneforge import models
    from tuneforge.config import BaseModelSettings

    folder = Path(models.resolve(BaseModelSettings(source="tiny-llama")))
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def case_model_pickle_only(tmp):
    files = {k: v for k, v in tiny_files().items() if not k.endswith(".safetensors")}
    buffer = io.BytesIO()
    torch.save({"w": torch.zeros(1)}, buffer)
    args, model = model_case(tmp, files | {"pytorch_model.bin": buffer.getvalue()})
    return args, [str(model), "pickle", "allow_pickle"]


def case_model_no_config(tmp):
    files = {k: v for k, v in tiny_files().items() if k != "config.json"}
    args, model = model_case(tmp, files)
    return args, [str(model), "config.json"]


def case_model_no_weights(tmp):
    files = {k: v for k, v in tiny_files().items() if not k.endswith(".safetensors")}
    args, model = model_case(tmp, files)
    return args, [str(model), "no weights"]


def case_model_truncated_safetensors(tmp):
    files = tiny_files()
    name = next(k for k in files if k.endswith(".safetensors"))
    files[name] = files[name][: len(files[name]) // 2]
    args, model = model_case(tmp, files)
    return args, [str(model / name), "truncated"]


def case_model_garbage_safetensors(tmp):
    files = tiny_files()
    name = next(k for k in files if k.endswith(".safetensors"))
    files[name] = b"\xff" * 64
    args, model = model_case(tmp, files)
    return args, [str(model / name), "safetensors"]


def case_model_config_malformed(tmp):
    args, model = model_case(tmp, tiny_files() | {"config.json": b'{"model_type": "llama",'})
    return args, [str(model / "config.json")]


def case_model_path_missing(tmp):
    config = make_config(tmp, [EXAMPLES / "data" / "extract_train.jsonl"], base_model={"source": "./no/such/model"})
    return ["stage", "data-prep", "--config", config, "--output", tmp / "out"], ["./no/such/model", "neither an existing path"]


def case_model_gguf_truncated(tmp):
    path = write(tmp, "m.gguf", b"GGUF\x03\x00\x00\x00" + b"\x00" * 8)
    config = make_config(tmp, [EXAMPLES / "data" / "extract_train.jsonl"], base_model={"source": str(path)})
    return ["stage", "data-prep", "--config", config, "--output", tmp / "out"], [str(path)]


# ---------------------------------------------------------------------------------------- CLI arguments

def case_cli_unknown_stage(tmp):
    config = make_config(tmp, [EXAMPLES / "data" / "extract_train.jsonl"])
    return ["stage", "train", "--config", config, "--output", tmp / "out"], ["unknown stage 'train'"]


def case_cli_missing_input(tmp):
    config = make_config(tmp, [EXAMPLES / "data" / "extract_train.jsonl"])
    return ["stage", "sft", "--config", config, "--output", tmp / "out"], ["--input data=PATH"]


def case_cli_input_without_key(tmp):
    config = make_config(tmp, [EXAMPLES / "data" / "extract_train.jsonl"])
    return ["stage", "sft", "--config", config, "--output", tmp / "out", "--input", str(tmp)], ["KEY=PATH"]


def case_cli_input_not_a_stage_output(tmp):
    config = make_config(tmp, [EXAMPLES / "data" / "extract_train.jsonl"])
    (tmp / "random").mkdir()
    return ["stage", "sft", "--config", config, "--output", tmp / "out", "--input", f"data={tmp / 'random'}"], [str(tmp / "random"), "manifest"]


def case_cli_schedule_bad_cron(tmp):
    config = make_config(tmp, [EXAMPLES / "data" / "extract_train.jsonl"])
    return ["schedule", config, "--cron", "every day", "--host", "http://127.0.0.1:9"], ["every day"]


CASES = {name.removeprefix("case_"): fn for name, fn in sorted(globals().items()) if name.startswith("case_")}


def test_corpus_is_large_enough():
    assert len(CASES) >= 40


@pytest.mark.parametrize("name", CASES)
def test_bad_input_fails_clearly(tmp_path, name):
    args, fragments = CASES[name](tmp_path)
    start = time.monotonic()
    result = cli(*args)
    elapsed = time.monotonic() - start
    message = result.stderr if hasattr(result, "stderr") else result.output
    assert result.exit_code == 2, f"exit {result.exit_code}: {message}{result.exception!r}"
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in: {message}"
    assert "Traceback" not in message
    assert elapsed < LIMIT_SECONDS, f"took {elapsed:.1f}s"
    if "--output" in args:
        assert_no_output(Path(args[args.index("--output") + 1]))


def test_unreadable_file_names_it(tmp_path):
    """Permissions, through the real command; as root (who reads anything) without its capabilities."""
    config = write(tmp_path, "c.yaml", yaml.safe_dump(good_config(tmp_path)))
    config.chmod(0o000)
    tmp_path.chmod(0o755)
    drop_root = ["setpriv", "--bounding-set=-all"] if os.geteuid() == 0 else []
    result = subprocess.run([*drop_root, sys.executable, "-m", "tuneforge.cli", "validate", str(config)],
                            capture_output=True, text=True, env={**os.environ, "COLUMNS": "400"})
    assert result.returncode == 2, result.stderr
    assert str(config) in result.stderr and "not readable" in result.stderr
