"""Training speed settings that must not change what is learned."""

import pytest
import torch
import trl.trainer.utils as trl_utils
from transformers import AutoModelForCausalLM
from trl.kernels.chunked_logprob import _use_triton as trl_use_triton
from trl.trainer.utils import add_fused_lm_head

from tuneforge import training
from tuneforge.config import BaseModelSettings, SftSettings
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
    training.score_only_labelled_positions()
    compact_loss, compact_grads = loss_and_grads()

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
    with pytest.raises(training.TrainingSetupError, match=f"optimizer {setting} needs a CUDA GPU.*adamw_torch"):
        training.optimizer(SftSettings(optimizer=setting), quantized=True)


def test_auto_backend_takes_hf_here_and_says_why():
    from tuneforge import backends

    assert backends.choose(SftSettings(), "sft", processes=1)[0] == "hf"
    assert backends.choose(SftSettings(), "sft", processes=2) == (
        "hf", "auto: Unsloth trains on one GPU and this stage runs 2 processes")
    assert backends.choose(SftSettings(backend="hf"), "sft", processes=1) == ("hf", "set in the config")
