"""Tiny randomly initialised chat models built locally (no download): for fast tests and dry runs.

One per architecture the GGUF export supports: llama, qwen2 and qwen3 with a byte-level BPE tokenizer
trained on the spot, gemma3 with a small SentencePiece tokenizer (tokenizer.model) shipped in assets/.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from tuneforge.chat_templates import CHATML, GEMMA

ARCHITECTURES = ("llama", "qwen2", "qwen3", "gemma3")
CHATML_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
GEMMA_TOKENIZER = Path(__file__).parent / "assets" / "tiny-gemma3-tokenizer"

# Enough English for the tokenizers to learn common merges; any text still encodes through bytes.
_CORPUS = """
The quick brown fox jumps over the lazy dog. A model learns from examples and answers questions.
Extract the name and the city from the sentence and answer in JSON. {"name": "Ana", "city": "Lisbon"}
Maria moved to Paris in 2019 to work as a nurse. John lives in Berlin and works as an engineer.
You are a helpful assistant. The user asks a question and the assistant answers it clearly.
Instruction: summarise the text. Input: the weather today is sunny and warm. Output: sunny and warm.
What is the capital of France? The capital of France is Paris. What is two plus two? Four.
"""


def _lines() -> list[str]:
    return [line for line in _CORPUS.splitlines() if line] * 4


def _bpe_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512, special_tokens=CHATML_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    bpe.train_from_iterator(_lines(), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None,
        additional_special_tokens=["<|im_start|>"],
    )
    tokenizer.chat_template = CHATML
    return tokenizer, []


def _sentencepiece_tokenizer():
    """The Gemma-style SentencePiece tokenizer shipped in assets/ (made by assets/make_tiny_gemma3_tokenizer.py).
    It ships ready-made because transformers converts a bare tokenizer.model with protobuf >= 7, while kfp
    needs protobuf 6."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(GEMMA_TOKENIZER)
    tokenizer.chat_template = GEMMA
    return tokenizer, [GEMMA_TOKENIZER / "tokenizer.model"]


def _config(arch: str, tokenizer, hidden_size: int, layers: int):
    from transformers import Gemma3TextConfig, LlamaConfig, Qwen2Config, Qwen3Config

    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "qwen2":
        return Qwen2Config(**common)
    if arch == "qwen3":
        return Qwen3Config(**common, head_dim=hidden_size // 4)
    # llama.cpp scales Gemma 3 attention by 1/sqrt(head_dim), so query_pre_attn_scalar must equal head_dim.
    head_dim = hidden_size // 4
    return Gemma3TextConfig(
        **common, head_dim=head_dim, query_pre_attn_scalar=head_dim, sliding_window=64,
        layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)],
    )


def build_tiny(target: Path, arch: str = "llama", hidden_size: int = 64, layers: int = 2, seed: int = 0) -> Path:
    """Build (once) and return a directory holding a random tiny model of `arch` with a chat tokenizer."""
    target = Path(target)
    if (target / "config.json").exists():
        return target
    import torch
    from transformers import AutoModelForCausalLM

    if arch not in ARCHITECTURES:
        raise ValueError(f"tiny models exist for {', '.join(ARCHITECTURES)}, not {arch!r}")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as work:
        work = Path(work)
        tokenizer, extra_files = _sentencepiece_tokenizer() if arch == "gemma3" else _bpe_tokenizer()
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(_config(arch, tokenizer, hidden_size, layers))
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        staging = work / "model"
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        for file in extra_files:
            shutil.copy(file, staging / file.name)
        try:
            os.replace(staging, target)
        except OSError:
            if not (target / "config.json").exists():  # another process built it meanwhile otherwise
                raise
    return target
