"""`tuneforge plan` against what training measures: the plan's memory for a stage next to the peak memory of that stage
run on this CPU, and the 8B QLoRA example against the figure the fine-tuning guide gives for 7B QLoRA on plain PEFT.

    python benchmarks/plan_memory.py [--config examples/quickstart.yaml] [--steps 5]

The CPU figure is the sft process's peak resident memory (wait4's ru_maxrss) less the peak of a process that only
imports what the stage imports: what loading the model, the data and training added. The plan is set to the CPU
(no CUDA overhead, AdamW in fp32) and computed twice: at data.max_length (what `tuneforge plan` assumes, an upper bound)
and at the longest prepared row (what the batches held: each is padded to its longest row).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tuneforge import plan  # noqa: E402
from tuneforge.config import load_config  # noqa: E402

GIB = 2**30
# The guide: "7B QLoRA on plain PEFT needs about 16 GB".
GUIDE_7B_QLORA_GB = 16


def peak_rss_gib(command: list[str]) -> float:
    """The child's own peak resident memory (Linux reports ru_maxrss in KiB)."""
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(process.pid, 0)
    if status:
        sys.exit(f"{' '.join(command)} failed:\n{process.stderr.read()[-3000:]}")
    return usage.ru_maxrss * 1024 / GIB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=ROOT / "examples" / "quickstart.yaml")
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="plan-bench-"))
    cli = [sys.executable, "-m", "tuneforge.cli", "stage"]
    peak_rss_gib([*cli, "data-prep", "--config", str(args.config), "--output", str(work / "data")])
    imports = peak_rss_gib([sys.executable, "-c", "import tuneforge.components.sft, trl, peft, transformers, datasets"])
    sft = peak_rss_gib([*cli, "sft", "--config", str(args.config), "--input", f"data={work / 'data'}",
                        "--output", str(work / "sft"), "--set", f"sft.max_steps={args.steps}", "--set", "sft.eval_steps=1000"])
    measured = sft - imports
    config = load_config(args.config)
    longest = json.loads((work / "data" / "manifest.json").read_text())["metrics"]["token_length_max"]
    at_max = plan.stage_memory(config, "sft", gpu=False)["total"]
    at_longest = plan.stage_memory(config.model_copy(update={"data": config.data.model_copy(update={"max_length": longest})}),
                                   "sft", gpu=False)["total"]
    print(f"quickstart sft on this CPU ({args.steps} steps): peak RSS {sft:.2f} GiB, imports alone {imports:.2f} GiB, "
          f"training added {measured:.2f} GiB")
    print(f"  plan at data.max_length {config.data.max_length}: {at_max:.2f} GiB ({at_max / measured:.2f}x measured)")
    print(f"  plan at the longest row ({longest} tokens): {at_longest:.2f} GiB ({at_longest / measured:.2f}x measured)")

    big = load_config(ROOT / "examples" / "llama3-8b-qlora.yaml")
    ours = plan.stage_memory(big, "sft")["total"]
    plain = plan.stage_memory(big, "sft", chunked_head=False)["total"]
    print(f"llama3-8b-qlora sft: tuneforge {ours:.1f} GiB; the plain PEFT recipe (all logits at once) {plain:.1f} GiB = "
          f"{plain * GIB / 1e9:.1f} GB, {plain * GIB / 1e9 / GUIDE_7B_QLORA_GB:.2f}x the guide's ~{GUIDE_7B_QLORA_GB} GB for 7B")


if __name__ == "__main__":
    main()
