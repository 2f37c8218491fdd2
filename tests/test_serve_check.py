"""serve-check: the exported GGUF served by llama.cpp's real server, asked through the openai client."""

import json
import os
import shutil
import subprocess
import sys

import mlflow
import pytest
import yaml
from conftest import EXAMPLES, assert_no_output, cli

from tuneforge import gguf_writer, serving, storage
from tuneforge.config import load_config
from tuneforge.pipelines import pipeline

# A template that renders the roles but drops what they said: a file that loads and answers, but not the question.
BROKEN_TEMPLATE = "{% for message in messages %}<|im_start|>{{ message['role'] }}\n<|im_end|>\n{% endfor %}<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """The tiny example's stages up to export-gguf, one by one as a pipeline's tasks run them."""
    tmp = tmp_path_factory.mktemp("serve")
    raw = yaml.safe_load((EXAMPLES / "tiny.yaml").read_text())
    raw.update(workdir=str(tmp / "work"), dpo={**raw["dpo"], "enabled": False})
    for source in raw["data"]["sources"]:
        source["path"] = str(EXAMPLES / source["path"])
    raw["data"]["eval_tasks"] = str(EXAMPLES / raw["data"]["eval_tasks"])
    config = tmp / "tiny.yaml"
    config.write_text(yaml.safe_dump(raw))
    steps = [("data-prep", {}), ("sft", {"data": "data-prep"}), ("merge", {"model": "sft"}),
             ("evaluate", {"data": "data-prep", "model": "merge"}), ("export-gguf", {"model": "merge"})]
    for name, inputs in steps:
        args = [f"--input={key}={tmp / folder}" for key, folder in inputs.items()]
        result = cli("stage", name, "--config", config, "--output", tmp / name, *args)
        assert result.exit_code == 0, (name, result.stderr[-2000:])
    return config, tmp


def serve(config, tmp, gguf, output, *settings):
    return cli("stage", "serve-check", "--config", config, "--output", output, f"--input=data={tmp / 'data-prep'}",
               f"--input=gguf={gguf}", f"--input=evaluation={tmp / 'evaluate'}", *settings)


def test_the_served_gguf_answers_like_the_merged_model(chain):
    config, tmp = chain
    result = serve(config, tmp, tmp / "export-gguf", tmp / "serving")
    assert result.exit_code == 0, result.stderr[-3000:]
    served = json.loads(result.stdout)["metrics"]
    q8 = served["types"]["q8_0"]
    # The tiny eval tasks are scored by exact match: served answers are the merged model's, token for token, nearly.
    assert q8["by_metric"]["exact_match"]["tasks"] == 16
    assert q8["same_prompt_tokens"] == 1.0 and q8["by_metric"]["exact_match"]["agreement"] >= 0.5
    assert served["passed"] and served["failures"] == []
    assert q8["tokens_per_second"] > 0 and q8["latency_mean_s"] > 0 and q8["completion_tokens"] > 0
    report = (tmp / "serving" / "report.md").read_text()
    assert "| q8_0 | exact_match | 16 |" in report and "## Sample answers" in report
    storage.read_manifest(tmp / "serving", "serve-check", verify=True)
    # The server is gone once the stage ends.
    assert "llama_cpp.server" not in subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout


def test_a_gguf_with_a_broken_template_fails_and_leaves_nothing(chain):
    config, tmp = chain
    broken = tmp / "broken-gguf"
    broken.mkdir()
    lineage = storage.read_manifest(tmp / "merge", "merge")["lineage"]
    gguf_writer.write_gguf(tmp / "merge", broken / "tiny-extract-q8_0.gguf", "q8_0", name="tiny-extract",
                           chat_template=BROKEN_TEMPLATE, stop_tokens=lineage["special_tokens"]["stop"])
    storage.write_manifest(broken, "export-gguf", {"gguf_files": {"q8_0": "tiny-extract-q8_0.gguf"}}, {})
    result = serve(config, tmp, broken, tmp / "broken-serving")
    assert result.exit_code == 2, result.stderr[-3000:]
    assert "q8_0: llama.cpp's server rendered 16 of 16 eval prompts to another number of tokens" in result.stderr
    assert "chat template, BOS or special tokens in the file are not the ones trained with" in result.stderr
    assert_no_output(tmp / "broken-serving")
    assert "llama_cpp.server" not in subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout


def test_a_server_that_cannot_start_says_why_and_is_not_left_running(chain, tmp_path):
    config, tmp = chain
    damaged = tmp_path / "damaged"
    shutil.copytree(tmp / "export-gguf", damaged)
    path = damaged / "tiny-extract-q8_0.gguf"
    path.write_bytes(path.read_bytes()[: os.path.getsize(path) // 2])  # cut in half: llama.cpp cannot load it
    result = serve(config, tmp, damaged, tmp_path / "out")
    assert result.exit_code == 2 and "llama.cpp's server did not start on tiny-extract-q8_0.gguf" in result.stderr
    assert_no_output(tmp_path / "out")


def test_a_failed_serve_check_leaves_the_model_unregistered(tmp_path):
    """The tiny pipeline with a limit its served answers cannot meet (the chain above, the same settings, agrees at
    0.785): serve-check fails, register never runs, the registry holds nothing, and the run says which stage failed
    and why."""
    result = subprocess.run([sys.executable, "-m", "tuneforge.cli", "run", EXAMPLES / "tiny.yaml", "--set",
                             f"workdir={tmp_path / 'work'}", "--pipeline-root", tmp_path / "kfp", "--set", "dpo.enabled=false",
                             "--set", "serve_check.min_agreement={exact_match: 1.0}",
                             "--set", "cluster.resources={default: {retries: 0}}"], capture_output=True, text=True)
    assert result.returncode == 1, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["stages"]["serve-check"]["status"] == "failed" and "register" not in summary["stages"]
    assert "serve_check.min_agreement.exact_match" in result.stderr
    client = mlflow.MlflowClient(summary["mlflow"]["tracking_uri"])
    assert client.search_registered_models() == []


def test_register_waits_for_serve_check_in_the_pipeline(tmp_path):
    """A failed serve-check fails its task, and register, which takes its output, never runs: nothing is promoted."""
    package = tmp_path / "pipeline.yaml"
    result = cli("compile", EXAMPLES / "quickstart.yaml", "-o", package)
    assert result.exit_code == 0, result.stderr or result.exception
    spec = next(yaml.safe_load_all(package.read_text()))
    assert spec["deploymentSpec"]["executors"]["exec-serve-check"]["container"]["image"].endswith("tuneforge-export:0.1.0")
    register = _find_task(spec, "register")
    assert "serve-check" in register["dependentTasks"]
    assert register["inputs"]["artifacts"]["serving"]["taskOutputArtifact"]["producerTask"] == "serve-check"
    config = load_config(EXAMPLES / "quickstart.yaml")
    assert pipeline.serve_checked(config)
    assert not pipeline.serve_checked(config.model_copy(update={"data": config.data.model_copy(update={"eval_tasks": None})}))


def _find_task(spec, name):
    for component in spec["components"].values():
        found = component.get("dag", {}).get("tasks", {}).get(name)
        if found:
            return found
    raise AssertionError(f"no task {name} in the compiled pipeline")


def test_serve_check_limits_name_unknown_metrics(tmp_path):
    config = tmp_path / "c.yaml"
    raw = yaml.safe_load((EXAMPLES / "tiny.yaml").read_text())
    raw["serve_check"] = {"min_agreement": {"bleu": 0.5}}
    config.write_text(yaml.safe_dump(raw))
    result = cli("plan", config)
    assert result.exit_code == 2 and "serve_check.min_agreement" in result.stderr and "bleu" in result.stderr


def test_server_command_uses_the_files_own_template(tmp_path):
    command = serving.server_command(tmp_path / "m.gguf", 8080, 2048)
    assert "--chat_format" not in command and command[1:3] == ["-m", "llama_cpp.server"]
