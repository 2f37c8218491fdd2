"""The real small model learns the example task, and its GGUF files, served by llama.cpp, answer it (minutes on 2 cores)."""

import json
import subprocess
import sys

import pytest
from conftest import EXAMPLES


@pytest.fixture(scope="module")
def smollm2_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("smollm2")
    overrides = ["sft.max_steps=30", "dpo.enabled=false", "evaluate.max_examples=20", f"workdir={tmp}", "export.types=[q8_0,q4_k_m]"]
    command = [sys.executable, "-m", "tuneforge.cli", "run", str(EXAMPLES / "quickstart.yaml"), "--pipeline-root", str(tmp / "kfp")]
    for item in overrides:
        command += ["--set", item]
    result = subprocess.run(command, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_smollm2_lora_learns_the_extraction_task(smollm2_run):
    base, candidate = smollm2_run["metrics"]["base"], smollm2_run["metrics"]["candidate"]
    assert candidate["task_exact_match"] >= base["task_exact_match"] + 0.3
    assert candidate["eval_loss"] < base["eval_loss"]


@pytest.mark.slow
@pytest.mark.parametrize("gguf_type", ["q8_0", "q4_k_m"])
def test_served_gguf_answers_like_the_merged_model(smollm2_run, gguf_type):
    """serve-check served each file with llama.cpp's server (the template and end-of-turn token the file carries) and
    asked the eval tasks through the openai client: the answers are the merged model's, nearly all of them."""
    served = smollm2_run["serving"][gguf_type]
    assert served["agreement"]["exact_match"] >= 0.8, served
    assert served["task_score"] >= smollm2_run["metrics"]["candidate"]["task_score"] - 0.15, served
    assert served["tokens_per_second"] > 1
    assert smollm2_run["stages"]["serve-check"]["status"] == "succeeded"
