"""Training in several processes on this CPU: torchrun with the gloo backend, started by the stage itself."""

import json

import pytest
import torch
from conftest import alpaca_rows, assert_no_output, cli, make_config, preference_rows, write_jsonl
from safetensors.torch import load_file


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("distributed")
    sources = [write_jsonl(tmp / "sft.jsonl", alpaca_rows(40)), write_jsonl(tmp / "pref.jsonl", preference_rows(16))]
    # Every step logged, no checkpoint inside the run: the curves are compared step by step.
    config = make_config(tmp, sources, sft={"logging_steps": 1, "max_steps": 6, "save_steps": 100},
                         dpo={"enabled": True, "logging_steps": 1, "max_steps": 3, "save_steps": 100, "batch_size": 4})
    assert cli("stage", "data-prep", "--config", config, "--output", tmp / "data").exit_code == 0
    return config, tmp / "data"


def losses(folder):
    return [entry["loss"] for entry in json.loads((folder / "train_history.json").read_text()) if "loss" in entry]


def run_both(stage, config, inputs, tmp_path, batch_size):
    """The stage in one process at `batch_size`, and in two processes at half of it: the same global batch."""
    one = cli("stage", stage, "--config", config, *inputs, "--output", tmp_path / "one")
    assert one.exit_code == 0, one.stderr or one.exception
    two = cli("stage", stage, "--config", config, *inputs, "--output", tmp_path / "two",
              "--set", f"{stage}.distributed.processes=2", "--set", f"{stage}.batch_size={batch_size // 2}")
    assert two.exit_code == 0, two.stderr or two.exception
    assert json.loads(two.stdout)["processes"] == 2
    lineage = json.loads((tmp_path / "two" / "manifest.json").read_text())["lineage"]
    assert (lineage["world_size"], lineage["strategy"]) == (2, "ddp")
    return tmp_path / "one", tmp_path / "two"


def test_ddp_sft_in_two_processes_matches_one_process(prepared, tmp_path):
    config, data = prepared
    one, two = run_both("sft", config, ["--input", f"data={data}"], tmp_path, batch_size=4)
    assert len(losses(one)) == 6 and losses(one)[-1] < losses(one)[0] - 1  # it learned, so the comparison means something
    assert losses(two) == pytest.approx(losses(one), abs=1e-4)
    # A full fine-tune: every weight of the two-process result equals the one-process result.
    single, double = load_file(one / "model.safetensors"), load_file(two / "model.safetensors")
    assert single.keys() == double.keys()
    assert max((single[k] - double[k]).abs().max().item() for k in single) < 1e-4
    assert not (tmp_path / "two.checkpoints").exists()


def test_ddp_dpo_in_two_processes_matches_one_process(prepared, tmp_path):
    config, data = prepared
    sft = cli("stage", "sft", "--config", config, "--input", f"data={data}", "--output", tmp_path / "sft",
              "--set", "sft.method=lora", "--set", "sft.max_steps=2")
    assert sft.exit_code == 0, sft.stderr or sft.exception
    one, two = run_both("dpo", config, ["--input", f"data={data}", "--input", f"model={tmp_path / 'sft'}"], tmp_path,
                        batch_size=4)
    # Three steps of four pairs stay inside the first epoch (14 pairs): the epoch's short last batch is filled up
    # differently by two processes (each needs a batch), so it is not a like-for-like comparison.
    assert len(losses(one)) == 3 and losses(one)[-1] < losses(one)[0]
    assert losses(two) == pytest.approx(losses(one), abs=1e-4)
    single, double = load_file(one / "adapter_model.safetensors"), load_file(two / "adapter_model.safetensors")
    assert single.keys() == double.keys() and all(torch.allclose(single[k], double[k], atol=1e-5) for k in single)


@pytest.mark.parametrize("strategy", ["fsdp", "deepspeed_zero3"])
def test_sharded_strategies_are_refused_on_the_cpu_before_any_process_starts(prepared, tmp_path, strategy):
    config, data = prepared
    result = cli("stage", "sft", "--config", config, "--input", f"data={data}", "--output", tmp_path / "sft",
                 "--set", "sft.distributed.processes=2", "--set", f"sft.distributed.strategy={strategy}")
    assert result.exit_code == 2
    assert f"distributed.strategy {strategy} shards across GPUs and none is visible" in result.stderr
    assert "torchrun" not in result.stderr
    assert_no_output(tmp_path / "sft")


def test_a_failing_process_fails_the_stage_and_leaves_no_output(prepared, tmp_path):
    config, data = prepared
    # Unsloth on two processes is refused inside each process: the launcher must report it and leave nothing.
    result = cli("stage", "sft", "--config", config, "--input", f"data={data}", "--output", tmp_path / "sft",
                 "--set", "sft.distributed.processes=2", "--set", "sft.backend=unsloth")
    assert result.exit_code == 2
    assert "torchrun with 2 processes failed" in result.stderr
    assert_no_output(tmp_path / "sft")


def test_one_process_ignores_the_strategy_so_a_gpu_config_runs_on_a_laptop(prepared, tmp_path):
    config, data = prepared
    result = cli("stage", "sft", "--config", config, "--input", f"data={data}", "--output", tmp_path / "sft",
                 "--set", "sft.distributed.strategy=fsdp", "--set", "sft.max_steps=1")
    assert result.exit_code == 0, result.stderr or result.exception
    lineage = json.loads((tmp_path / "sft" / "manifest.json").read_text())["lineage"]
    assert (lineage["world_size"], lineage["strategy"]) == (1, "none")
