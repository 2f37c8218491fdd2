"""A tiny Llama-architecture chat model built locally (no download): for fast tests and dry runs."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from tuneforge.chat_templates import CHATML

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# Enough English for byte-level BPE to learn common merges; any text still encodes through bytes.
_CORPUS = """
The quick brown fox jumps over the lazy dog. A model learns from examples and answers questions.
Extract the name and the city from the sentence and answer in JSON. {"name": "Ana", "city": "Lisbon"}
Maria moved to Paris in 2019 to work as a nurse. John lives in Berlin and works as an engineer.
You are a helpful assistant. The user asks a question and the assistant answers it clearly.
Instruction: summarise the text. Input: the weather today is sunny and warm. Output: sunny and warm.
What is the capital of France? The capital of France is Paris. What is two plus two? Four.
"""


def build_tiny_llama(target: Path, hidden_size: int = 64, layers: int = 2, seed: int = 0) -> Path:
    """Build (once) and return a directory holding a random tiny LlamaForCausalLM with a chat tokenizer."""
    target = Path(target)
    if (target / "config.json").exists():
        return target
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator([line for line in _CORPUS.splitlines() if line] * 4, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        additional_special_tokens=["<|im_start|>"],
    )
    tokenizer.chat_template = CHATML

    torch.manual_seed(seed)
    config = LlamaConfig(
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
        bos_token_id=None,
    )
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(staging, target)
    return target
