"""Hugging Face checkpoint -> GGUF, in Python with the `gguf` package (f16, bf16, q8_0), and llama.cpp's
quantizer for the K-quants (q4_k_m, q5_k_m, q6_k, through the optional llama-cpp-python).

Tensors stream one at a time (tensor infos first, then data), so memory stays near one tensor's size.
The tokenizer (BPE or SentencePiece), special tokens, add-BOS/EOS flags and the chat template go into the
file's metadata. What llama.cpp expects of each architecture follows its own converter (convert_hf_to_gguf).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator
from hashlib import sha256
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from safetensors import safe_open

from tuneforge.errors import ExportError
from tuneforge.models import SOURCE_TOKENIZER

log = logging.getLogger(__name__)

# HF architecture -> GGUF architecture, and whether q/k rows are permuted from HF's rotary layout to GGML's.
ARCHITECTURES = {
    "LlamaForCausalLM": (gguf.MODEL_ARCH.LLAMA, True),
    "MistralForCausalLM": (gguf.MODEL_ARCH.LLAMA, True),
    "Qwen2ForCausalLM": (gguf.MODEL_ARCH.QWEN2, False),
    "Qwen3ForCausalLM": (gguf.MODEL_ARCH.QWEN3, False),
    "Gemma3ForCausalLM": (gguf.MODEL_ARCH.GEMMA3, False),
}
PYTHON_TYPES = {
    "f16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (gguf.GGMLQuantizationType.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
}
# llama.cpp's llama_ftype values.
LLAMA_CPP_TYPES = {"q4_k_m": 15, "q5_k_m": 17, "q6_k": 18}

# The text llama.cpp's converter tokenizes to recognise a BPE pre-tokenizer, and the hashes it knows.
CHKTXT = '\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= нещо на Български \'\'\'\'\'\'```````""""......!!!!!!?????? I\'ve been \'told he\'s there, \'RE you sure? \'M not sure I\'ll make it, \'D you like some tea? We\'Ve a\'lL'  # noqa: E501
KNOWN_PRE_TOKENIZERS = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",
    "c136ed14d01c2745d4f60a9596ae66800e2b61fa45643e72436041855ad4089d": "smaug-bpe",
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",
}

# llama.cpp's split regexes, verbatim.
SPLIT_REGEXES = {
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""": "qwen2",  # noqa: E501
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""": "llama-bpe",  # noqa: E501
}


# ---------------------------------------------------------------- model metadata


def architecture(config: dict[str, Any]) -> tuple[gguf.MODEL_ARCH, bool]:
    names = config.get("architectures") or []
    for name in names:
        if name in ARCHITECTURES:
            return ARCHITECTURES[name]
    raise ExportError(
        f"GGUF export does not support architecture {', '.join(names) or config.get('model_type')!r}; "
        f"supported: {', '.join(ARCHITECTURES)}. Set export.enabled: false to fine-tune, evaluate and register the "
        "model without GGUF files"
    )


def _rope(config: dict[str, Any]) -> dict[str, Any]:
    """Rope settings in one shape, from transformers 4 (rope_theta, rope_scaling) or 5 (rope_parameters) configs."""
    params = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    params = params.get("full_attention", params)
    params.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    params.setdefault("rope_type", params.get("type", "default"))
    return params


def _write_hparams(writer: gguf.GGUFWriter, arch: gguf.MODEL_ARCH, config: dict[str, Any]) -> None:
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    rope = _rope(config)
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config.get("max_position_embeddings", 4096))
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.get("num_key_value_heads", heads))
    writer.add_layer_norm_rms_eps(config.get("rms_norm_eps", 1e-6))
    writer.add_rope_freq_base(rope["rope_theta"])
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    if rope["rope_type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])
    elif rope["rope_type"] == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(rope["factor"])
        writer.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
    if arch == gguf.MODEL_ARCH.LLAMA:
        writer.add_vocab_size(config["vocab_size"])
        writer.add_rope_dimension_count(head_dim)
    if arch == gguf.MODEL_ARCH.GEMMA3:
        sliding = dict(config.get("rope_parameters") or {}).get("sliding_attention", {})
        writer.add_rope_freq_base_swa(sliding.get("rope_theta", config.get("rope_local_base_freq", 10000.0)))
        if config.get("sliding_window"):
            writer.add_sliding_window(config["sliding_window"])
        if config.get("layer_types"):
            # llama.cpp assumes Gemma 3's 5-local-1-global pattern unless told per layer.
            writer.add_sliding_window_pattern([t == "sliding_attention" for t in config["layer_types"]])
        if config.get("final_logit_softcapping"):
            writer.add_final_logit_softcapping(config["final_logit_softcapping"])


# ---------------------------------------------------------------- tokenizer


def _pre_tokenizer(tokenizer, tokenizer_json: dict[str, Any]) -> str:
    digest = sha256(str(tokenizer.encode(CHKTXT)).encode()).hexdigest()
    if digest in KNOWN_PRE_TOKENIZERS:
        return KNOWN_PRE_TOKENIZERS[digest]
    # A vocabulary llama.cpp has not seen can still use a split it knows: recognise the split itself.
    pre = tokenizer_json.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    splits = [p.get("pattern", {}).get("Regex") for p in pre.get("pretokenizers", []) if p.get("type") == "Split"]
    if len(splits) == 1 and splits[0] in SPLIT_REGEXES:
        return SPLIT_REGEXES[splits[0]]
    raise ExportError(
        f"unknown BPE pre-tokenizer (llama.cpp check hash {digest[:16]}…, pre_tokenizer {pre.get('type')!r}); "
        "llama.cpp would split text differently from transformers"
    )


def _write_tokenizer(writer: gguf.GGUFWriter, model_dir: Path, arch: gguf.MODEL_ARCH, vocab_size: int,
                     chat_template: str, stop_tokens: list[str]) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if (model_dir / SOURCE_TOKENIZER).exists():
        _write_source_tokenizer(writer, json.loads((model_dir / SOURCE_TOKENIZER).read_text()), vocab_size, model_dir)
    elif (model_dir / "tokenizer.model").exists():
        _write_sentencepiece(writer, model_dir / "tokenizer.model", tokenizer, vocab_size)
    elif arch == gguf.MODEL_ARCH.GEMMA3:
        raise ExportError(f"{model_dir}: a Gemma 3 tokenizer needs its SentencePiece file tokenizer.model, or the "
                          f"{SOURCE_TOKENIZER} of a model converted from GGUF, beside the weights; neither is there")
    else:
        _write_bpe(writer, model_dir, tokenizer, vocab_size)
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    for kind, token_id in (
        ("bos", tokenizer.bos_token_id),
        ("eos", tokenizer.eos_token_id),
        ("unknown", tokenizer.unk_token_id),
        ("padding", tokenizer.pad_token_id),
    ):
        if token_id is not None:
            writer.add_uint32(f"tokenizer.ggml.{kind}_token_id", token_id)
    writer.add_add_bos_token(tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id)
    writer.add_add_eos_token(tokenizer.eos_token_id is not None and ids[-1] == tokenizer.eos_token_id)
    stop_ids = [tokenizer.convert_tokens_to_ids(t) for t in stop_tokens]
    if stop_ids:
        # llama.cpp ends a chat turn at the end-of-turn token.
        writer.add_eot_token_id(stop_ids[0])
    writer.add_chat_template(chat_template)


def _write_source_tokenizer(writer: gguf.GGUFWriter, meta: dict[str, Any], vocab_size: int, model_dir: Path) -> None:
    """The tokenizer of the GGUF file the model was converted from, as it was: llama.cpp then splits text exactly as
    it did for the source. Special token ids and the add-BOS/EOS flags are the trained tokenizer's (written by the
    caller)."""
    tokens = meta.get("tokenizer.ggml.tokens") or []
    if len(tokens) != vocab_size:
        raise ExportError(f"{model_dir / SOURCE_TOKENIZER}: {len(tokens)} tokens for a vocabulary of {vocab_size}")
    writer.add_tokenizer_model(meta["tokenizer.ggml.model"])
    if "tokenizer.ggml.pre" in meta:
        writer.add_tokenizer_pre(meta["tokenizer.ggml.pre"])
    writer.add_token_list(tokens)
    if "tokenizer.ggml.scores" in meta:
        writer.add_token_scores(meta["tokenizer.ggml.scores"])
    if "tokenizer.ggml.token_type" in meta:
        writer.add_token_types(meta["tokenizer.ggml.token_type"])
    if meta.get("tokenizer.ggml.merges"):
        writer.add_token_merges(meta["tokenizer.ggml.merges"])
    if "tokenizer.ggml.add_space_prefix" in meta:
        writer.add_add_space_prefix(meta["tokenizer.ggml.add_space_prefix"])


def _token_type(token: str, token_id: int, added: dict[int, Any]) -> int:
    if token_id not in added:
        return gguf.TokenType.NORMAL
    return gguf.TokenType.CONTROL if added[token_id].special else gguf.TokenType.USER_DEFINED


def _write_bpe(writer: gguf.GGUFWriter, model_dir: Path, tokenizer, vocab_size: int) -> None:
    tokenizer_json = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    model = tokenizer_json["model"]
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise ExportError(f"{model_dir}: tokenizer is {model.get('type')} (byte_fallback={model.get('byte_fallback')}); "
                          "byte-level BPE or SentencePiece (tokenizer.model) is supported")
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        tokens.append(by_id[i])
        types.append(_token_type(by_id[i], i, added))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    if not merges:
        raise ExportError(f"{model_dir}: BPE tokenizer has no merges; llama.cpp cannot use it")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer(tokenizer, tokenizer_json))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)


def _write_sentencepiece(writer: gguf.GGUFWriter, path: Path, tokenizer, vocab_size: int) -> None:
    from sentencepiece import SentencePieceProcessor

    processor = SentencePieceProcessor()
    processor.LoadFromFile(str(path))
    tokens = [f"[PAD{i}]".encode() for i in range(vocab_size)]
    scores = [-10000.0] * vocab_size
    types = [gguf.TokenType.UNUSED] * vocab_size
    for i in range(min(processor.vocab_size(), vocab_size)):
        tokens[i] = processor.IdToPiece(i).encode("utf-8")
        scores[i] = processor.GetScore(i)
        if processor.IsUnknown(i):
            types[i] = gguf.TokenType.UNKNOWN
        elif processor.IsControl(i):
            types[i] = gguf.TokenType.CONTROL
        elif processor.IsUnused(i):
            types[i] = gguf.TokenType.UNUSED
        elif processor.IsByte(i):
            types[i] = gguf.TokenType.BYTE
        else:
            types[i] = gguf.TokenType.NORMAL
    # Chat markers such as <start_of_turn> must stay whole tokens in llama.cpp too.
    for token_id, token in tokenizer.added_tokens_decoder.items():
        if token_id < vocab_size:
            tokens[token_id] = token.content.encode("utf-8")
            scores[token_id] = -1000.0
            types[token_id] = gguf.TokenType.CONTROL if token.special else gguf.TokenType.USER_DEFINED
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_add_space_prefix(False)


# ---------------------------------------------------------------- tensors


def _permute(weights: np.ndarray, heads: int) -> np.ndarray:
    """HF stores rotary q/k rows as two halves per head; GGML interleaves them."""
    return weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


def _llama3_rope_freqs(config: dict[str, Any]) -> np.ndarray:
    rope = _rope(config)
    dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    freqs = 1.0 / (rope["rope_theta"] ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    factor, low, high = rope.get("factor", 8.0), rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_context = rope.get("original_max_position_embeddings", 8192)
    low_wavelen, high_wavelen = old_context / low, old_context / high
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(factor)
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


def _source_tensors(model_dir: Path) -> Iterator[tuple[str, tuple[int, ...], Any]]:
    """(name, shape, lazy loader) for every tensor of a safetensors checkpoint, sharded or not."""
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ExportError(f"{model_dir}: no safetensors weights to export")
    for file in files:
        with safe_open(file, framework="pt") as f:
            shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
        for name, shape in shapes.items():
            yield name, shape, (lambda file=file, name=name: _load(file, name))


def _load(file: Path, name: str) -> np.ndarray:
    with safe_open(file, framework="pt") as f:
        return f.get_tensor(name).to(torch.float32).numpy()


def _plan(model_dir: Path, config: dict[str, Any], arch: gguf.MODEL_ARCH, permute: bool, out_type: gguf.GGMLQuantizationType):
    """For each output tensor: its GGUF name, shape, storage type and a function producing its data."""
    name_map = gguf.get_tensor_name_map(arch, config["num_hidden_layers"])
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads", heads)
    plan = []
    for name, shape, load in _source_tensors(model_dir):
        if name.endswith(("rotary_emb.inv_freq", ".attention.masked_bias")):
            continue
        name = name.removeprefix("language_model.")
        new_name = name_map.get_name(name, try_suffixes=(".weight", ".bias"))
        if new_name is None:
            raise ExportError(f"{model_dir}: tensor {name!r} has no GGUF name for architecture {arch.name.lower()}")

        def produce(load=load, name=name):
            data = load()
            if permute and name.endswith(("q_proj.weight", "q_proj.bias")):
                data = _permute(data, heads)
            if permute and name.endswith(("k_proj.weight", "k_proj.bias")):
                data = _permute(data, kv_heads)
            if arch == gguf.MODEL_ARCH.GEMMA3 and name.endswith("norm.weight"):
                data = data + 1.0  # Gemma's RMSNorm multiplies by (1 + weight); llama.cpp by weight
            return data

        plan.append((new_name, shape, _storage_type(new_name, shape, out_type), produce))
    if arch == gguf.MODEL_ARCH.LLAMA and _rope(config)["rope_type"] == "llama3":
        freqs = _llama3_rope_freqs(config)
        plan.append(("rope_freqs.weight", freqs.shape, gguf.GGMLQuantizationType.F32, lambda: freqs))
    return plan


def _storage_type(new_name: str, shape: tuple[int, ...], out_type: gguf.GGMLQuantizationType) -> gguf.GGMLQuantizationType:
    # llama.cpp computes norms and biases in f32 only.
    if len(shape) <= 1 or new_name.endswith("_norm.weight") or not new_name.endswith(".weight"):
        return gguf.GGMLQuantizationType.F32
    block = gguf.GGML_QUANT_SIZES[out_type][0]
    if shape[-1] % block:
        return gguf.GGMLQuantizationType.F16
    return out_type


def write_gguf(model_dir: Path, path: Path, out_type: str, *, name: str, chat_template: str,
               stop_tokens: list[str]) -> dict[str, Any]:
    """Write `path` from the checkpoint in `model_dir` with tensors in `out_type` (f16, bf16 or q8_0)."""
    model_dir = Path(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    config = {**config, **config.get("text_config", {})}
    arch, permute = architecture(config)
    qtype, file_type = PYTHON_TYPES[out_type]
    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[arch])
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _write_hparams(writer, arch, config)
    _write_tokenizer(writer, model_dir, arch, config["vocab_size"], chat_template, stop_tokens)
    plan = _plan(model_dir, config, arch, permute, qtype)
    for new_name, shape, storage, _ in plan:
        byte_shape = gguf.quants.quant_shape_to_byte_shape(shape, storage) if storage not in (
            gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16) else shape
        dtype = {gguf.GGMLQuantizationType.F32: np.float32, gguf.GGMLQuantizationType.F16: np.float16}.get(storage, np.uint8)
        nbytes = int(np.prod(byte_shape)) * np.dtype(dtype).itemsize
        writer.add_tensor_info(new_name, byte_shape, np.dtype(dtype), nbytes, raw_dtype=storage)
    writer.write_header_to_file(path)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for _, _, storage, produce in plan:
        writer.write_tensor_data(gguf.quants.quantize(produce(), storage))
    writer.close()
    return {"architecture": gguf.MODEL_ARCH_NAMES[arch], "tensors": len(plan)}


def llama_cpp_available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


def require_quantizer(types: list[str]) -> None:
    """K-quant types need llama.cpp's quantizer; say which extra brings it before any work starts."""
    if types and not llama_cpp_available():
        raise ExportError(
            f"export types {', '.join(types)} need llama.cpp's quantizer: install the gguf extra "
            "(pip install 'tuneforge[gguf]', which builds llama-cpp-python), or export f16, bf16 or q8_0"
        )


def quantize_with_llama_cpp(source: Path, target: Path, out_type: str, threads: int = 0) -> None:
    import ctypes

    require_quantizer([out_type])
    import llama_cpp

    llama_cpp.llama_backend_init()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = LLAMA_CPP_TYPES[out_type]
    params.nthread = threads
    code = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params))
    if code != 0:
        raise ExportError(f"llama.cpp failed to quantize {source} to {out_type} (code {code})")
