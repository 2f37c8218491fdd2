"""How to batch rows of different lengths on the CPU: a bare LoRA training loop (SmolLM2-135M-Instruct, r=16 on
all linear layers, bf16 autocast, batches of 8) over the same 64 random rows whose lengths are log-normal (median
110 tokens, 20 to 300), batched five ways. What sft.batching: auto picks on the CPU comes from this.

    python benchmarks/batching_cpu.py [random:eager grouped:eager grouped:sdpa free:eager free:sdpa free:rowwise]

random: padded batches in the rows' order; grouped: padded batches of rows sorted by length; free: each batch's
rows in one padding-free row with per-row position ids (transformers builds the block-diagonal mask from them
on eager and SDPA attention; tuneforge's rowwise attention takes each row alone). Prints trained tokens per second
after one warm-up step.
"""

from __future__ import annotations

import math
import sys
import time

import torch

ROWS, BATCH = 64, 8


def batches(kind: str, rows: list[torch.Tensor]):
    lengths = [len(r) for r in rows]
    order = sorted(range(ROWS), key=lambda i: lengths[i]) if kind == "grouped" else list(range(ROWS))
    for start in range(0, ROWS, BATCH):
        chosen = order[start : start + BATCH]
        if kind == "free":
            ids = torch.cat([rows[i] for i in chosen])[None]
            positions = torch.cat([torch.arange(lengths[i]) for i in chosen])[None]
            labels = ids.masked_fill(positions == 0, -100)
            yield {"input_ids": ids, "position_ids": positions, "labels": labels}
        else:
            width = max(lengths[i] for i in chosen)
            ids = torch.zeros(BATCH, width, dtype=torch.long)
            mask = torch.zeros(BATCH, width, dtype=torch.long)
            for j, i in enumerate(chosen):
                ids[j, : lengths[i]], mask[j, : lengths[i]] = rows[i], 1
            yield {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def main() -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tuneforge.config import BaseModelSettings
    from tuneforge.models import resolve
    from tuneforge.training import use_rowwise_attention

    path = resolve(BaseModelSettings(source="smollm2-135m-instruct"))
    generator = torch.Generator().manual_seed(0)
    lengths = [min(300, max(20, int(math.exp(torch.randn(1, generator=generator).item() * 0.55 + math.log(110)))))
               for _ in range(ROWS)]
    rows = [torch.randint(3, 40000, (n,), generator=generator) for n in lengths]
    print(f"{ROWS} rows: mean {sum(lengths) / ROWS:.0f} tokens, longest {max(lengths)}")
    for choice in sys.argv[1:] or ["random:eager", "grouped:eager", "grouped:sdpa", "free:eager", "free:sdpa",
                                   "free:rowwise"]:
        kind, attention = choice.split(":")
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                     attn_implementation="eager" if attention == "rowwise" else attention)
        if attention == "rowwise":
            use_rowwise_attention(model)
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        started, tokens = None, 0
        for step, batch in enumerate(batches(kind, rows)):
            if step == 1:
                started = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(**batch, use_cache=False).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            if step:
                tokens += int((batch["labels"] != -100).sum())
        seconds = time.perf_counter() - started
        print(f"{kind:8} {attention:6} {seconds:5.1f} s {tokens / seconds:5.0f} tokens/s", flush=True)


if __name__ == "__main__":
    main()
