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


@pytest.fixture
def scored_rows(monkeypatch) -> list[int]:
    """TRL as it comes (every position scored on the CPU), and how many rows each call of its fused LM head scores."""
    monkeypatch.setattr(trl_utils, "_use_triton", trl_use_triton)
    scored = []
    original_apply = trl_utils._ChunkedLogProbFunction.apply

    def counting_apply(hidden, *args):
        scored.append(hidden.shape[0])
        return original_apply(hidden, *args)

    monkeypatch.setattr(trl_utils._ChunkedLogProbFunction, "apply", counting_apply)
    return scored


def test_the_cpu_lm_head_scores_only_labelled_positions_with_the_same_loss_and_gradients(scored_rows):
    model = AutoModelForCausalLM.from_pretrained(resolve(BaseModelSettings(source="tiny-llama")), dtype=torch.float32)
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))
    input_ids, labels = tiny_batch()

    def loss_and_grads():
        model.zero_grad()
        loss = model(input_ids=input_ids, labels=labels, fused_lm_head=True).loss
        loss.backward()
        return loss.item(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    full_loss, full_grads = loss_and_grads()
    with training.labelled_positions_only():
        compact_loss, compact_grads = loss_and_grads()
    assert trl_utils._use_triton is trl_use_triton  # TRL is left as it was

    labelled = int((labels[:, 1:] != -100).sum())
    assert scored_rows == [3 * 23, labelled] and labelled < 3 * 23 / 2
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


@pytest.mark.parametrize("arch", ["tiny-llama", "tiny-gemma3"])
@pytest.mark.parametrize("attention", ["eager", "sdpa", "rowwise"])
def test_a_padding_free_batch_trains_like_the_padded_batch(arch, attention):
    """The same rows collated padded and padding-free (TRL's collator, as sft.batching padding_free uses it): equal loss
    and gradients within 1e-5. rowwise: the padding-free batch under tuneforge's rowwise attention, the padded one under
    eager; the rows reach past tiny-gemma3's sliding window (64) and rowwise's switch to SDPA (256 tokens)."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    model = AutoModelForCausalLM.from_pretrained(resolve(BaseModelSettings(source=arch)), dtype=torch.float32,
                                                 attn_implementation="eager" if attention == "rowwise" else attention)
    model.train()
    generator = torch.Generator().manual_seed(2)
    lengths = (31, 6, 300, 90, 11) if attention == "rowwise" else (31, 6, 17, 11)
    examples = [{"input_ids": torch.randint(3, 400, (n,), generator=generator).tolist()} for n in lengths]
    for example in examples:
        example["labels"] = [-100] * 4 + example["input_ids"][4:]

    def loss_and_grads(padding_free: bool):
        model.zero_grad()
        batch = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=padding_free)(examples)
        assert (batch["input_ids"].shape[0] == 1) == padding_free
        loss = model(**{k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "position_ids", "labels")},
                     use_cache=False).loss
        loss.backward()
        return loss.item(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    padded_loss, padded_grads = loss_and_grads(False)
    if attention == "rowwise":
        assert training.use_rowwise_attention(model) == model.config._attn_implementation
    free_loss, free_grads = loss_and_grads(True)
    assert free_loss == pytest.approx(padded_loss, abs=1e-5)
    for a, b in zip(padded_grads, free_grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


VARIED = [10 + (i * 37) % 200 for i in range(64)]  # random batches of these are about half padding
UNIFORM = [70 + i % 8 for i in range(64)]


ROWWISE = training.ROWWISE_ATTENTION


@pytest.mark.parametrize(("setting", "attention_setting", "attention", "lengths", "expected", "expected_attention"), [
    # tuneforge's own CPU attention: padding-free rows under rowwise attention where random batches would pad much
    ("auto", "auto", "eager", VARIED, "padding_free", ROWWISE), ("auto", "auto", "sdpa", VARIED, "padding_free", ROWWISE),
    ("padding_free", "auto", "eager", UNIFORM, "padding_free", ROWWISE),
    # rows of nearly one length: padded batches, attended in one call
    ("auto", "auto", "eager", UNIFORM, "padded", "eager"),
    # an attention set in the config is kept: grouped where random batches would pad much
    ("auto", "eager", "eager", VARIED, "grouped", "eager"), ("auto", "sdpa", "sdpa", VARIED, "grouped", "sdpa"),
    ("auto", "eager", "eager", UNIFORM, "padded", "eager"), ("padding_free", "eager", "eager", VARIED, "padding_free", "eager"),
    ("padded", "auto", "sdpa", VARIED, "padded", "sdpa"), ("grouped", "auto", "eager", UNIFORM, "grouped", "eager"),
    ("auto", "flash_attention_2", "flash_attention_2", UNIFORM, "padding_free", "flash_attention_2"),
])
def test_batching_choice(setting, attention_setting, attention, lengths, expected, expected_attention):
    model = AutoModelForCausalLM.from_pretrained(resolve(BaseModelSettings(source="tiny-llama")), attn_implementation="eager")
    settings = SftSettings(batching=setting, batch_size=8, attention=attention_setting)
    choice, reason, chosen_attention = training.choose_batching(settings, model, attention, lengths)
    assert (choice, chosen_attention) == (expected, expected_attention) and reason
    assert model.config._attn_implementation == (ROWWISE if expected_attention == ROWWISE else "eager")
    assert training.choose_batching(settings, model, attention, lengths, packing=True)[0] == "packed"
    if setting == "auto":  # a trainer without padding-free batches (DPO) groups by the padding alone
        assert training.choose_batching(settings, model, attention, lengths, padding_free=False)[:3:2] == (
            "grouped" if lengths is VARIED else "padded", attention)
    assert training.random_batch_padding(VARIED, 8) > 0.3 > 0.05 > training.random_batch_padding(UNIFORM, 8)


def test_batching_on_a_gpu_groups_rows_rather_than_attending_row_by_row(monkeypatch):
    """A small model's GPU step is bound by kernel launches, which rowwise attention multiplies: auto groups rows by
    length there; padding_free asked for still gets rows attended alone."""
    model = AutoModelForCausalLM.from_pretrained(resolve(BaseModelSettings(source="tiny-llama")), attn_implementation="eager")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    choice, reason, attention = training.choose_batching(SftSettings(batch_size=8), model, "sdpa", VARIED)
    assert (choice, attention, model.config._attn_implementation) == ("grouped", "sdpa", "eager")
    assert "kernel launches" in reason
    assert training.choose_batching(SftSettings(batch_size=8), model, "sdpa", UNIFORM)[:3:2] == ("padded", "sdpa")
    choice, _, attention = training.choose_batching(SftSettings(batching="padding_free", batch_size=8), model, "sdpa", VARIED)
    assert (choice, attention) == ("padding_free", ROWWISE)


def test_rowwise_attention_is_not_used_where_it_differs_from_the_models():
    """gpt-oss's attention has sinks (a learned extra logit per head) that rowwise attention does not compute: the
    probe sees it, and the rows are grouped, on the model's own attention, saying why."""
    from transformers import GptOssConfig

    config = GptOssConfig(vocab_size=500, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    choice, reason, attention = training.choose_batching(SftSettings(batch_size=8), model, "eager", VARIED)
    assert (choice, attention, model.config._attn_implementation) == ("grouped", "eager", "eager")
    assert "rowwise attention differs from this model's eager attention (inf)" in reason


def test_padding_free_is_refused_where_the_rows_would_see_each_other():
    model = AutoModelForCausalLM.from_pretrained(resolve(BaseModelSettings(source="tiny-llama")), attn_implementation="eager")
    original = model.forward
    model.forward = lambda *args, **kwargs: original(*args, **{**kwargs, "use_cache": True})  # leaks, as in the probe test
    with pytest.raises(SetupError, match="batching: grouped"):
        training.choose_batching(SftSettings(batching="padding_free", attention="eager"), model, "eager", VARIED)
    assert training.choose_batching(SftSettings(batching="auto"), model, "flash_attention_2", VARIED)[0] == "grouped"


def dpo_trainer(arch: str, attention: str, rows: list[dict]):
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    torch.manual_seed(0)
    path = resolve(BaseModelSettings(source=arch))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=attention)
    args = DPOConfig(output_dir="unused", per_device_train_batch_size=len(rows), use_cpu=True, report_to="none",
                     max_length=256)
    # init_lora_weights False: the policy differs from the reference, so the loss has a gradient everywhere
    lora = LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM", init_lora_weights=False)
    return DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                      processing_class=AutoTokenizer.from_pretrained(path), peft_config=lora)


PAIRS = [{"prompt": [{"role": "user", "content": "word " * n}], "chosen": [{"role": "assistant", "content": "yes " * m}],
          "rejected": [{"role": "assistant", "content": "no " * k}]}
         for n, m, k in [(3, 5, 2), (19, 1, 4), (1, 7, 7), (5, 2, 12), (70, 9, 3)]]  # the last longer than tiny-gemma3's window


@pytest.mark.parametrize("arch", ["tiny-llama", "tiny-gemma3"])
@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_shared_prompt_dpo_gives_trls_loss_gradients_and_metrics(arch, attention):
    """dpo.shared_prompt (one row per pair) against TRL's DPOTrainer as it comes (two rows per pair) on the same batch:
    the loss and every LoRA gradient within 1e-5, the logged metrics within 1e-4, and fewer positions computed."""
    from tuneforge.components.dpo import share_prompts
    from tuneforge.config import DpoSettings

    results = []
    for shared in (False, True):
        trainer = dpo_trainer(arch, attention, PAIRS)
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(PAIRS))])
        if shared:
            sharing, reason = share_prompts(trainer, DpoSettings(), 256, can_probe=True)
            assert sharing is not None and reason.startswith("on:"), reason
        trainer.model.train()
        loss = trainer.compute_loss(trainer.model, batch)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
        results.append((loss.item(), grads, {k: v[0] for k, v in trainer._metrics["train"].items()}))
        if shared:
            assert sharing.total < batch["input_ids"].numel() * 0.75  # one row per pair instead of two
    (two_loss, two_grads, two_metrics), (one_loss, one_grads, one_metrics) = results
    assert one_loss == pytest.approx(two_loss, abs=1e-5)
    assert len(two_grads) > 0 and two_grads.keys() == one_grads.keys()
    for name in two_grads:
        torch.testing.assert_close(one_grads[name], two_grads[name], atol=1e-5, rtol=1e-4)
    assert one_metrics == pytest.approx(two_metrics, abs=1e-4)


def test_the_shared_prompt_and_prefix_probes_score_only_labelled_positions(scored_rows):
    """The probes run outside training, where TRL's fused LM head scores every position on the CPU (prompt and padding
    through the whole vocabulary: most of a Gemma 3 dpo stage's probe): they score the labelled ones only."""
    from types import SimpleNamespace

    from tuneforge.components.dpo import share_prompts
    from tuneforge.components.sft import share_prefix
    from tuneforge.config import DpoSettings

    sharing, reason = share_prompts(dpo_trainer("tiny-llama", "eager", PAIRS), DpoSettings(), 256, can_probe=True)
    assert sharing is not None and reason.startswith("on:"), reason

    from peft import LoraConfig, get_peft_model

    model = AutoModelForCausalLM.from_pretrained(resolve(BaseModelSettings(source="tiny-llama")), dtype=torch.float32)
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear"))
    sft_trainer = SimpleNamespace(accelerator=SimpleNamespace(unwrap_model=lambda m: m), model=model)
    prefix, reason = share_prefix(sft_trainer, SftSettings(), "padded", can_probe=True)
    assert prefix is not None and reason.startswith("on:"), reason
    # dpo's probe: answers of 5 + 3 and 2 + 6 tokens, in TRL's four rows and in two shared rows; sft's: three rows
    # labelled on their last 8 tokens, the padded one on 4 of them
    assert scored_rows == [16, 16, 20, 20]


def test_shared_prompt_keeps_trls_rows_for_a_batch_whose_prompts_differ():
    from tuneforge.components.dpo import SharedPrompt

    trainer = dpo_trainer("tiny-llama", "eager", PAIRS[:2])
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    shared = SharedPrompt(trainer.model.get_base_model())
    assert shared.layout(batch["input_ids"], batch["attention_mask"], labels) is not None
    batch["input_ids"][2, 0] += 1  # the first pair's rejected row starts with another prompt
    assert shared.layout(batch["input_ids"], batch["attention_mask"], labels) is None


@pytest.mark.parametrize("arch", ["tiny-llama", "tiny-gemma3"])
def test_sft_computes_the_prefix_its_rows_share_once_with_the_same_loss_and_gradients(arch):
    """sft's SharedPrefix runs the tokens every row starts with once per batch: TRL's loss and every LoRA gradient
    equal those of the whole rows within 1e-5, for fewer positions; the prefix (80 tokens) is longer than tiny-gemma3's
    sliding window (64), and a padded row is in the batch."""
    from peft import LoraConfig, get_peft_model

    from tuneforge.components.sft import SharedPrefix, shared_prefix_length

    model = AutoModelForCausalLM.from_pretrained(resolve(BaseModelSettings(source=arch)), dtype=torch.float32)
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear"))
    for name, param in model.named_parameters():
        if "lora_B" in name:  # non-zero B, so every adapter's gradient depends on the prefix
            torch.nn.init.normal_(param, std=0.02)
    generator = torch.Generator().manual_seed(1)
    ids = torch.cat([torch.randint(3, 400, (1, 80), generator=generator).expand(3, 80),
                     torch.randint(3, 400, (3, 20), generator=generator)], 1)
    mask = torch.ones_like(ids)
    mask[1, -7:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :88] = -100
    causal_lm = model.get_base_model()
    shared = SharedPrefix(causal_lm)
    embedded = []
    causal_lm.get_input_embeddings().register_forward_hook(lambda module, args, out: embedded.append(args[0].numel()))

    def loss_and_grads():
        model.zero_grad()
        embedded.clear()
        out = model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True, use_cache=False)
        loss = -out.log_probs.sum() / out.label_mask.sum()
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        return loss.item(), grads, out.entropy.sum().item(), sum(embedded)

    model.train()
    whole_loss, whole_grads, whole_entropy, whole_positions = loss_and_grads()
    shared.install()
    loss, grads, entropy, positions = loss_and_grads()
    assert shared_prefix_length(ids, mask, labels) == 80
    assert positions == whole_positions - 2 * 80
    assert loss == pytest.approx(whole_loss, abs=1e-5)
    assert entropy == pytest.approx(whole_entropy, abs=1e-4)
    assert grads.keys() == whole_grads.keys()
    for name, grad in grads.items():
        assert torch.allclose(grad, whole_grads[name], atol=1e-5), name
    assert shared.prefix_share == pytest.approx(2 * 80 / ids.numel())


def test_a_prefix_is_not_shared_past_a_rows_first_label():
    """The position that predicts a row's first label must be computed for that row: the prefix stops before it."""
    from tuneforge.components.sft import shared_prefix_length

    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [5, 6, 7, 8, 11, 12]])
    mask = torch.ones_like(ids)
    labels = ids.clone()
    labels[:, :4] = -100
    assert shared_prefix_length(ids, mask, labels) == 3  # shared 4 tokens; the 4th predicts the first label
    labels[1, :2] = -100
    labels[1, 2:] = ids[1, 2:]
    assert shared_prefix_length(ids, mask, labels) == 1


def test_batched_answer_log_probabilities_equal_one_at_a_time():
    """evaluate scores preference pairs in right-padded batches: each answer's log-probability equals its own
    unpadded forward's, within 1e-4."""
    from transformers import AutoTokenizer

    from tuneforge.components.evaluate import answer_logp

    path = resolve(BaseModelSettings(source="tiny-llama"))
    model, tokenizer = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(path)
    prompts = ["Extract the name.\n\nAnna lives in Rome.", "Hi", "Count to three, slowly and carefully please."]
    answers = ['{"name": "Anna"}', "Hello there, how are you today?", "one"]
    batched = answer_logp(model, tokenizer, prompts, answers, batch_size=3)
    alone = [answer_logp(model, tokenizer, [p], [a], batch_size=1)[0] for p, a in zip(prompts, answers, strict=True)]
    with torch.no_grad():
        prompt_ids = tokenizer(prompts[0], add_special_tokens=False)["input_ids"]
        ids = torch.tensor([prompt_ids + tokenizer(answers[0], add_special_tokens=False)["input_ids"]])
        logps = model(input_ids=ids).logits[0, :-1].log_softmax(-1).gather(-1, ids[0, 1:, None])[:, 0]
    assert alone[0] == pytest.approx(logps[len(prompt_ids) - 1:].sum().item(), abs=1e-4)
    assert batched == pytest.approx(alone, abs=1e-4)


@pytest.mark.parametrize("arch", ["tiny-llama", "tiny-gemma3"])
def test_a_prefix_every_row_shares_goes_through_the_model_once_with_the_same_scores_and_answers(arch):
    """evaluate computes the prefix all rows share (a chat template's system block, a common instruction) once and
    reuses its cache: the same log-probabilities within 1e-4 and the same greedy answers as whole rows, for fewer
    positions; the prefix is longer than tiny-gemma3's sliding window (64). Generation pads each row after the prefix,
    which would take places in a sliding window: there tiny-gemma3's rows are generated whole."""
    from transformers import AutoTokenizer

    from tuneforge.components import evaluate

    path = resolve(BaseModelSettings(source=arch))
    model, tokenizer = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(path)
    tokenizer.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    instruction = "Extract the person's name and the city from the sentence, and answer with JSON only. " * 4
    prompts = [instruction + s for s in ("Anna lives in Rome.", "Bo met Cy in Oslo on a rainy Monday in May.", "Hi")]
    answers = ['{"name": "Anna"}', "Hello there, how are you today?", "one"]
    rows = evaluate.answer_rows(tokenizer, prompts, answers)
    shared = evaluate.labelled_rows_prefix(rows)
    assert shared > 64
    assert evaluate.check_prefix_cache(model, rows[1][0], shared) is None
    embedded = []
    model.get_input_embeddings().register_forward_hook(lambda module, args, out: embedded.append(args[0].numel()))

    def scored(share):
        embedded.clear()
        return evaluate.answer_logp(model, tokenizer, prompts, answers, batch_size=2, share=share), sum(embedded)

    (whole, whole_positions), (reused, reused_positions) = scored(False), scored(True)
    assert reused == pytest.approx(whole, abs=1e-4)
    assert reused_positions < whole_positions - shared
    stop = [tokenizer.eos_token_id]

    def answered(share):
        embedded.clear()
        return evaluate.generate(model, tokenizer, prompts, stop, 12, 2, share=share), sum(embedded)

    (whole, whole_positions), (reused, reused_positions) = answered(False), answered(True)
    assert reused == whole
    assert (reused_positions < whole_positions) == (arch == "tiny-llama")


def test_a_model_whose_cache_cannot_be_reused_is_scored_whole():
    """A recurrent model's cache cannot be copied per batch: the check says why, and evaluate scores its rows whole."""
    from transformers import MambaConfig, MambaForCausalLM

    from tuneforge.components.evaluate import check_prefix_cache

    model = MambaForCausalLM(MambaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, state_size=4)).eval()
    assert "cannot be reused" in check_prefix_cache(model, list(range(3, 20)), 8)


def test_heldout_loss_equals_the_cross_entropy_over_full_logits():
    from tuneforge.components.evaluate import heldout_loss

    model = AutoModelForCausalLM.from_pretrained(resolve(BaseModelSettings(source="tiny-llama")), dtype=torch.float32).eval()
    generator = torch.Generator().manual_seed(3)
    rows = []
    for length, prompt in ((20, 12), (9, 4), (15, 14)):
        ids = torch.randint(3, 400, (length,), generator=generator).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    with torch.no_grad():
        total = sum(torch.nn.functional.cross_entropy(model(input_ids=torch.tensor([r["input_ids"]])).logits[0, :-1],
                                                      torch.tensor(r["labels"][1:]), reduction="sum").item() for r in rows)
    expected = total / sum(len(r["input_ids"]) - p for r, p in zip(rows, (12, 4, 14), strict=True))
    metrics, items = heldout_loss(model, rows, batch_size=3)
    assert metrics["eval_loss"] == pytest.approx(expected, abs=1e-4)
    assert sum(items) / len(items) == pytest.approx(expected, abs=1e-4)  # each row's share: their mean is the loss
