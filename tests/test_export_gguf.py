"""GGUF export on a tiny model of every supported architecture, every type, verified by llama.cpp."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import alpaca_rows, assert_no_output, cli, make_config, write_jsonl
from gguf import GGUFReader

from tuneforge import gguf_writer, models
from tuneforge.config import BaseModelSettings

ALL_TYPES = ["f16", "bf16", "q8_0", "q4_k_m", "q5_k_m", "q6_k"]


def merged_model(tmp_path, source, **sections):
    config = make_config(tmp_path, [write_jsonl(tmp_path / "d.jsonl", alpaca_rows(16))], base_model={"source": source}, **sections)
    for stage, inputs, out in (
        ("data-prep", [], "data"),
        ("sft", ["--input", f"data={tmp_path / 'data'}"], "sft"),
        ("merge", ["--input", f"model={tmp_path / 'sft'}"], "merged"),
    ):
        result = cli("stage", stage, "--config", config, *inputs, "--output", tmp_path / out, "--set", "sft.max_steps=2")
        assert result.exit_code == 0, result.stderr or result.exception
    return config, tmp_path / "merged"


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "gemma3"])
def test_every_type_loads_in_llama_cpp_and_passes_verification(tmp_path, arch):
    config, merged = merged_model(tmp_path, f"tiny-{arch}", data={"chat_template": "gemma"} if arch == "gemma3" else {})
    out = tmp_path / "gguf"
    result = cli("stage", "export-gguf", "--config", config, "--input", f"model={merged}", "--output", out,
                 "--set", f"export.types={json.dumps(ALL_TYPES)}")
    assert result.exit_code == 0, result.stderr or result.exception
    verification = json.loads((out / "verification.json").read_text())
    assert verification["verifier"] == "llama_cpp"
    for gguf_type in ALL_TYPES:
        check = verification["types"][gguf_type]
        assert check["tokenizer_agreement"] == 1.0 and check["argmax_agreement"] >= 0.75, (gguf_type, check)
        reader = GGUFReader(out / f"test-{gguf_type}.gguf")
        fields = {name: field for name, field in reader.fields.items()}
        assert bytes(fields["general.architecture"].parts[-1]).decode() == gguf_writer.ARCHITECTURES[
            {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "gemma3": "Gemma3ForCausalLM"}[arch]][0].name.lower()
        assert "tokenizer.chat_template" in fields and "tokenizer.ggml.eot_token_id" in fields
        assert (out / f"Modelfile.{gguf_type}").read_text().startswith(f"FROM ./test-{gguf_type}.gguf")
    k_types = verification["types"]["q4_k_m"]["tensor_types"]
    assert "Q4_K" in k_types  # rows of 256 let llama.cpp use the K-quant itself
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["files"]) >= {f"test-{t}.gguf" for t in ALL_TYPES}


def test_unsupported_architecture_is_refused_with_the_list(tmp_path):
    config, merged = merged_model(tmp_path, "tiny-llama")
    model_config = json.loads((merged / "config.json").read_text())
    model_config["architectures"] = ["GPT2LMHeadModel"]
    (merged / "config.json").write_text(json.dumps(model_config))
    result = cli("stage", "export-gguf", "--config", config, "--input", f"model={merged}", "--output", tmp_path / "gguf")
    assert result.exit_code == 2
    assert "does not support architecture 'GPT2LMHeadModel'" in result.stderr and "Qwen3ForCausalLM" in result.stderr
    assert_no_output(tmp_path / "gguf")


def tiny_phi3(folder):
    """A random two-layer Phi-3 (fused qkv_proj and gate_up_proj), an architecture GGUF export cannot write."""
    from transformers import AutoTokenizer, Phi3Config, Phi3ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(models.resolve(BaseModelSettings(source="tiny-llama")))
    torch.manual_seed(0)
    model = Phi3ForCausalLM(Phi3Config(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=256, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_a_model_export_cannot_write_is_refused_before_training_and_trains_with_export_off(tmp_path):
    config = make_config(tmp_path, [write_jsonl(tmp_path / "d.jsonl", alpaca_rows(40))],
                         base_model={"source": str(tiny_phi3(tmp_path / "phi3"))})

    def run(*options):
        result = subprocess.run([sys.executable, "-m", "tuneforge.cli", "run", str(config), "--pipeline-root",
                                 str(tmp_path / "kfp"), *options], capture_output=True, text=True)
        return result, json.loads(result.stdout.strip().splitlines()[-1]) if result.stdout.strip() else {}

    refused, summary = run()
    assert refused.returncode != 0
    assert {k: v["status"] for k, v in summary["stages"].items()} == {"data-prep": "failed"}  # nothing trained
    message = " ".join(refused.stderr.split())
    assert f"base_model.source '{tmp_path / 'phi3'}'" in message and "'Phi3ForCausalLM'" in message
    assert "Set export.enabled: false" in message

    trained, summary = run("--set", "export.enabled=false")
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert {k: v["status"] for k, v in summary["stages"].items()} == dict.fromkeys(
        ["data-prep", "sft", "merge", "evaluate", "register"], "succeeded")
    assert summary["registered_model"]["aliases"] == ["challenger", "champion"]


def test_k_quants_without_the_extra_name_it(tmp_path, monkeypatch):
    config, merged = merged_model(tmp_path, "tiny-llama")
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # as if llama-cpp-python were not installed
    result = cli("stage", "export-gguf", "--config", config, "--input", f"model={merged}", "--output", tmp_path / "gguf",
                 "--set", "export.types=[q4_k_m]")
    assert result.exit_code == 2 and "gguf extra" in result.stderr and "f16, bf16 or q8_0" in result.stderr
    assert_no_output(tmp_path / "gguf")
    # The Python types still export, verified by transformers' GGUF reader instead.
    result = cli("stage", "export-gguf", "--config", config, "--input", f"model={merged}", "--output", tmp_path / "gguf",
                 "--set", "export.types=[q8_0]")
    assert result.exit_code == 0, result.stderr or result.exception
    assert json.loads((tmp_path / "gguf" / "verification.json").read_text())["verifier"] == "transformers"


def test_out_of_tolerance_fails_and_leaves_nothing(tmp_path):
    config, merged = merged_model(tmp_path, "tiny-llama")
    result = cli("stage", "export-gguf", "--config", config, "--input", f"model={merged}", "--output", tmp_path / "gguf",
                 "--set", "export.types=[q8_0]", "--set", "export.tolerances={q8_0: {max_kl: 1.0e-12, min_argmax: 0.5, min_top5: 0.5}}")
    assert result.exit_code == 2 and "GGUF verification failed: q8_0: mean KL" in result.stderr
    assert_no_output(tmp_path / "gguf")
