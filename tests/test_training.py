"""Training speed settings that must not change what is learned."""

import pytest
import torch
import trl.trainer.utils as trl_utils
from transformers import AutoModelForCausalLM
from trl.kernels.chunked_logprob import _use_triton as trl_use_triton
from trl.trainer.utils import add_fused_lm_head

from tuneforge import training
from tuneforge.config import BaseModelSettings, SftSettings
from tuneforge.errors import SetupError
from tuneforge.models import resolve


def tiny_batch():
    torch.manual_seed(0)
    input_ids = torch.randint(3, 200, (3, 24))
    labels = input_ids.clone()
    labels[:, :15] = -100  # the prompt
    labels[2, 20:] = -100  # padding
    return input_ids, labels


def test_the_cpu_lm_head_scores_only_labelled_positions_with_the_same_loss_and_gradients(monkeypatch):
    model = AutoModelForCausalLM.from_pretrained(resolve(BaseModelSettings(source="tiny-llama")), dtype=torch.float32)
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))
    input_ids, labels = tiny_batch()
    scored = []
    original_apply = trl_utils._ChunkedLogProbFunction.apply

    def counting_apply(hidden, *args):
        scored.append(hidden.shape[0])
        return original_apply(hidden, *args)

    monkeypatch.setattr(trl_utils._ChunkedLogProbFunction, "apply", counting_apply)

    def loss_and_grads():
        model.zero_grad()
        loss = model(input_ids=input_ids, labels=labels, fused_lm_head=True).loss
        loss.backward()
        return loss.item(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    monkeypatch.setattr(trl_utils, "_use_triton", trl_use_triton)  # TRL as it comes: every position on the CPU
    full_loss, full_grads = loss_and_grads()
    with training.labelled_positions_only():
        compact_loss, compact_grads = loss_and_grads()
    assert trl_utils._use_triton is trl_use_triton  # TRL is left as it was

    labelled = int((labels[:, 1:] != -100).sum())
    assert scored == [3 * 23, labelled] and labelled < 3 * 23 / 2
    reference = model(input_ids=input_ids, labels=labels).loss.item()  # transformers' own loss over full logits
    assert compact_loss == pytest.approx(full_loss, abs=1e-5) and compact_loss == pytest.approx(reference, abs=1e-5)
    for a, b in zip(full_grads, compact_grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(("setting", "longest", "expected"), [
    ("auto", 82, "eager"), ("auto", 256, "eager"), ("auto", 1024, "sdpa"), ("sdpa", 82, "sdpa"), ("eager", 4096, "eager"),
])
def test_attention_follows_the_setting_and_the_row_length_on_the_cpu(setting, longest, expected):
    model = AutoModelForCausalLM.from_pretrained(resolve(BaseModelSettings(source="tiny-llama")))
    assert training.choose_attention(model, SftSettings(attention=setting), longest) == expected
    assert model.config._attn_implementation == expected
    input_ids, labels = tiny_batch()
    assert torch.isfinite(model(input_ids=input_ids, labels=labels).loss)


@pytest.mark.parametrize(("setting", "quantized", "expected"), [
    ("auto", False, "adamw_torch"),
    ("auto", True, "adamw_torch"),  # QLoRA's paged 8-bit AdamW is a CUDA kernel; on the CPU it stays AdamW
    ("adamw_torch_fused", True, "adamw_torch_fused"),
])
def test_optimizer_choice_on_the_cpu(setting, quantized, expected):
    assert training.optimizer(SftSettings(optimizer=setting), quantized) == expected


@pytest.mark.parametrize("setting", ["paged_adamw_8bit", "adamw_8bit", "paged_adamw_32bit"])
def test_bitsandbytes_optimizers_are_refused_on_the_cpu_with_the_way_out(setting):
    with pytest.raises(SetupError, match=f"optimizer {setting} needs a CUDA GPU.*adamw_torch"):
        training.optimizer(SftSettings(optimizer=setting), quantized=True)


def test_auto_backend_takes_hf_here_and_says_why():
    from tuneforge import backends

    assert backends.choose(SftSettings(), "sft", processes=1)[0] == "hf"
    assert backends.choose(SftSettings(), "sft", processes=2) == (
        "hf", "auto: Unsloth trains on one GPU and this stage runs 2 processes")
    assert backends.choose(SftSettings(backend="hf"), "sft", processes=1) == ("hf", "set in the config")


@pytest.mark.parametrize("arch", ["tiny-llama", "tiny-gemma3"])
@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_packed_examples_do_not_attend_to_each_other(arch, attention):
    """A batch packed the way SFTTrainer packs (TRL's padding-free collator, no cache): each example's loss equals its
    loss alone, within 1e-4; and the probe the sft stage runs before it packs agrees."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    model = AutoModelForCausalLM.from_pretrained(resolve(BaseModelSettings(source=arch)), attn_implementation=attention)
    model.train()  # as in training; the tiny models have no dropout
    generator = torch.Generator().manual_seed(1)
    examples = [{"input_ids": torch.randint(3, 400, (n,), generator=generator).tolist()} for n in (13, 7, 10)]
    for example in examples:
        example["labels"] = [-100] * 3 + example["input_ids"][3:]  # a prompt the loss skips

    def per_example_loss(logits, labels):
        return torch.nn.functional.cross_entropy(logits[:-1].float(), torch.tensor(labels[1:]), ignore_index=-100).item()

    with torch.no_grad():
        alone = [per_example_loss(model(input_ids=torch.tensor([e["input_ids"]]), use_cache=False).logits[0], e["labels"])
                 for e in examples]
        batch = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(examples)
        assert batch["input_ids"].shape[0] == 1 and "attention_mask" not in batch
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
    start, packed = 0, []
    for example in examples:
        end = start + len(example["input_ids"])
        packed.append(per_example_loss(logits[start:end], example["labels"]))
        start = end
    assert packed == pytest.approx(alone, abs=1e-4)
    assert training.packing_leak(model) < training.PACKING_TOLERANCE


def test_the_packing_probe_catches_attention_that_leaks():
    """With a cache (as in generation) transformers does not split packed rows: the probe sees the leak."""
    model = AutoModelForCausalLM.from_pretrained(resolve(BaseModelSettings(source="tiny-llama")), attn_implementation="eager")
    original = model.forward

    def leaky(*args, **kwargs):
        kwargs["use_cache"] = True
        return original(*args, **kwargs)

    model.forward = leaky
    assert training.packing_leak(model) > 0.1
