"""`backend: unsloth` against the real Unsloth, in its own dependency set (.venv-unsloth, `make setup-unsloth`:
transformers 5.17, trl 1.15, datasets 4.x). Without a GPU Unsloth runs in its CPU mode: stock transformers and peft
under its FastLanguageModel API. So this proves the stages' Unsloth calls, that they run on Unsloth's pinned
dependency set, and that the outputs have the hf backend's form and go through merge; not Unsloth's GPU kernels."""

import json
import subprocess
from pathlib import Path

import pytest
from conftest import alpaca_rows, cli, make_config, preference_rows, write_jsonl
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
UNSLOTH_TUNEFORGE = ROOT / ".venv-unsloth" / "bin" / "tuneforge"

pytestmark = pytest.mark.slow


def in_unsloth_env(*args) -> subprocess.CompletedProcess:
    assert UNSLOTH_TUNEFORGE.exists(), "no .venv-unsloth: run `make setup-unsloth` (make test does)"
    return subprocess.run([str(UNSLOTH_TUNEFORGE), *map(str, args)], capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("unsloth")
    sources = [write_jsonl(tmp / "sft.jsonl", alpaca_rows(40)), write_jsonl(tmp / "pref.jsonl", preference_rows(16))]
    config = make_config(tmp, sources, sft={"method": "lora", "logging_steps": 1},
                         dpo={"enabled": True, "logging_steps": 1})
    assert cli("stage", "data-prep", "--config", config, "--output", tmp / "data").exit_code == 0
    return config, tmp / "data"


def test_unsloth_sft_and_dpo_give_outputs_of_the_hf_form_that_merge(prepared, tmp_path):
    config, data = prepared
    versions = subprocess.run([str(UNSLOTH_TUNEFORGE.parent / "python"), "-c",
                               "import transformers, trl; print(transformers.__version__, trl.__version__)"],
                              capture_output=True, text=True, check=True).stdout.split()
    assert versions == ["5.17.0", "1.15.0"]  # Unsloth's pins, not the CPU environment's

    sft = in_unsloth_env("stage", "sft", "--config", config, "--input", f"data={data}", "--output", tmp_path / "sft",
                         "--set", "sft.backend=unsloth")
    assert sft.returncode == 0, sft.stderr[-3000:]
    assert json.loads(sft.stdout)["status"] == "succeeded"  # Unsloth's banner stays off stdout
    lineage = json.loads((tmp_path / "sft" / "manifest.json").read_text())["lineage"]
    assert (lineage["backend"], lineage["backend_reason"]) == ("unsloth", "set in the config")

    reference = cli("stage", "sft", "--config", config, "--input", f"data={data}", "--output", tmp_path / "hf")
    assert reference.exit_code == 0, reference.stderr
    unsloth_weights, hf_weights = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("sft", "hf"))
    assert unsloth_weights.keys() == hf_weights.keys()
    assert all(unsloth_weights[k].shape == hf_weights[k].shape for k in hf_weights)
    assert any(w.abs().sum() > 0 for k, w in unsloth_weights.items() if "lora_B" in k)  # it trained
    adapters = [json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in ("sft", "hf")]
    for key in ("base_model_name_or_path", "r", "lora_alpha", "peft_type"):
        assert adapters[0][key] == adapters[1][key], key
    assert sorted(adapters[0]["target_modules"]) == sorted(adapters[1]["target_modules"])
    assert {p.name for p in (tmp_path / "sft").iterdir()} == {p.name for p in (tmp_path / "hf").iterdir()}

    dpo = in_unsloth_env("stage", "dpo", "--config", config, "--input", f"data={data}", "--input",
                         f"model={tmp_path / 'sft'}", "--output", tmp_path / "dpo", "--set", "dpo.backend=unsloth")
    assert dpo.returncode == 0, dpo.stderr[-3000:]
    dpo_manifest = json.loads((tmp_path / "dpo" / "manifest.json").read_text())
    assert dpo_manifest["lineage"]["backend"] == "unsloth" and "eval_rewards/margins" in dpo_manifest["metrics"]
    assert not (tmp_path / "dpo" / "ref").exists()

    # The CPU environment's merge takes the Unsloth adapters like any other.
    for stage in ("sft", "dpo"):
        merged = cli("stage", "merge", "--config", config, "--input", f"model={tmp_path / stage}", "--output",
                     tmp_path / f"merged-{stage}")
        assert merged.exit_code == 0, merged.stderr or merged.exception
        metrics = json.loads((tmp_path / f"merged-{stage}" / "manifest.json").read_text())["metrics"]
        assert metrics["merge_max_abs_logit_diff"] < 1e-3


def test_hf_backend_on_unsloths_trl_without_triton_says_what_to_do(prepared, tmp_path):
    """trl 1.15 has its LM head only as a Triton kernel: on a CPU the hf backend cannot train in this environment."""
    config, data = prepared
    result = in_unsloth_env("stage", "sft", "--config", config, "--input", f"data={data}", "--output", tmp_path / "sft",
                            "--set", "sft.backend=hf")
    assert result.returncode == 2
    assert "trl 1.15.0 needs Triton for its LM head" in result.stderr and "backend: unsloth" in result.stderr
    assert not (tmp_path / "sft").exists() and not (tmp_path / "sft.partial").exists()


def test_auto_in_the_unsloth_environment_takes_unsloth_where_hf_cannot_train_and_says_why(prepared, tmp_path):
    config, data = prepared
    result = in_unsloth_env("stage", "sft", "--config", config, "--input", f"data={data}", "--output", tmp_path / "sft",
                            "--set", "sft.max_steps=1")
    assert result.returncode == 0, result.stderr[-3000:]
    lineage = json.loads((tmp_path / "sft" / "manifest.json").read_text())["lineage"]
    assert lineage["backend"] == "unsloth"
    assert lineage["backend_reason"] == ("auto: trl 1.15.0 here runs its LM head only as a Triton (GPU) kernel; "
                                         "Unsloth's CPU mode trains instead")
