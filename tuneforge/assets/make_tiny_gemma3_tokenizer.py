"""Regenerate assets/tiny-gemma3-tokenizer: a 512-piece Gemma-style SentencePiece tokenizer trained on the
tiny models' corpus. Needs protobuf >= 7 (for transformers' conversion of tokenizer.model to tokenizer.json),
so run it in an environment without kfp:  python make_tiny_gemma3_tokenizer.py
"""

import shutil
import tempfile
from pathlib import Path

import sentencepiece
from transformers import AutoTokenizer

from tuneforge.tiny import GEMMA_TOKENIZER, _lines

with tempfile.TemporaryDirectory() as work:
    work = Path(work)
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(_lines()), model_prefix=str(work / "spm"), vocab_size=512, model_type="bpe",
        byte_fallback=True, add_dummy_prefix=False, remove_extra_whitespaces=False, normalization_rule_name="identity",
        pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>",
        unk_piece="<unk>", user_defined_symbols=["<start_of_turn>", "<end_of_turn>"], minloglevel=2,
    )
    source = work / "tokenizer"
    source.mkdir()
    shutil.copy(work / "spm.model", source / "tokenizer.model")
    (source / "tokenizer_config.json").write_text(
        '{"tokenizer_class": "GemmaTokenizer", "bos_token": "<bos>", "eos_token": "<end_of_turn>", '
        '"pad_token": "<pad>", "unk_token": "<unk>", "add_bos_token": true}'
    )
    AutoTokenizer.from_pretrained(source).save_pretrained(GEMMA_TOKENIZER)
    shutil.copy(source / "tokenizer.model", GEMMA_TOKENIZER / "tokenizer.model")
