"""The real small model learns the example task (minutes on a 2-core CPU)."""

import json
import subprocess
import sys

import pytest

from conftest import EXAMPLES


@pytest.mark.slow
def test_smollm2_lora_learns_the_extraction_task(tmp_path):
    overrides = ["sft.max_steps=30", "dpo.enabled=false", "evaluate.max_examples=20", f"workdir={tmp_path}"]
    command = [sys.executable, "-m", "tuneforge.cli", "run", str(EXAMPLES / "quickstart.yaml"), "--run-dir", str(tmp_path / "run")]
    for item in overrides:
        command += ["--set", item]
    result = subprocess.run(command, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads(result.stdout.strip().splitlines()[-1])["metrics"]
    base, candidate = metrics["base"], metrics["candidate"]
    assert candidate["task_exact_match"] >= base["task_exact_match"] + 0.3
    assert candidate["eval_loss"] < base["eval_loss"]
