"""The real small model learns the example task, and its GGUF files answer it in llama.cpp (minutes on 2 cores)."""

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
def test_exported_gguf_answers_with_its_own_chat_template(smollm2_run, gguf_type):
    from llama_cpp import Llama

    path = f"{smollm2_run['artifacts']['export-gguf']}/smollm2-extract-{gguf_type}.gguf"
    llm = Llama(model_path=path, n_ctx=512, n_threads=2, verbose=False)
    tasks = [json.loads(line) for line in (EXAMPLES / "data" / "extract_eval.jsonl").read_text().splitlines()][:5]
    answers = []
    for task in tasks:
        # create_chat_completion renders the template stored in the GGUF metadata and stops at its end-of-turn token.
        reply = llm.create_chat_completion(messages=[{"role": "user", "content": task["prompt"]}], temperature=0, max_tokens=32)
        answers.append(reply["choices"][0]["message"]["content"].strip())
    llm.close()
    # Every answer is the learned format; most are exactly right (copying slips remain at 30 steps and 4 bits).
    assert all(set(json.loads(a)) == {"name", "city"} for a in answers), answers
    assert sum(a == t["expected"] for a, t in zip(answers, tasks, strict=True)) >= 2, answers
