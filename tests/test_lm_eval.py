"""evaluate.lm_eval: lm-evaluation-harness tasks scored on base, champion and candidate, and a registry guard on them."""

import json

import pytest
import yaml
from conftest import EXAMPLES, cli

from tuneforge.components.evaluate import lm_eval_tasks
from tuneforge.config import load_config
from tuneforge.data import fingerprint

NAMES = ["Alma", "Idris", "Keiko", "Tomas", "Priya", "Noor", "Lena", "Omar", "Sven", "Ada", "Mira", "Jonas"]
CITIES = ["Ghent", "Montreal", "Manila", "Lisbon", "Pune", "Oslo", "Graz", "Cairo", "Bergen", "Lyon", "Porto", "Riga"]


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """The tiny example's SFT model merged, and two lm-eval tasks: the shipped general facts, and one whose right
    answers are in prose, which a model that learned to answer in JSON forgets."""
    tmp = tmp_path_factory.mktemp("lm_eval")
    rows = [{"question": f"Where does {n} live, in a sentence? {n} lives in {c}.",
             "choices": [f"{n} lives in {c}.", json.dumps({"name": n, "city": c})], "answer": 0}
            for n, c in zip(NAMES, CITIES, strict=True)]
    (tmp / "prose.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = yaml.safe_load((EXAMPLES / "lm_eval" / "general_facts.yaml").read_text())
    task.update(task="prose_answers", dataset_kwargs={"data_files": {"test": "prose.jsonl"}})
    (tmp / "prose.yaml").write_text(yaml.safe_dump(task))
    raw = yaml.safe_load((EXAMPLES / "tiny.yaml").read_text())
    raw.update(workdir=str(tmp / "work"), dpo={**raw["dpo"], "enabled": False})
    for source in raw["data"]["sources"]:
        source["path"] = str(EXAMPLES / source["path"])
    raw["data"]["eval_tasks"] = str(EXAMPLES / raw["data"]["eval_tasks"])
    raw["evaluate"]["lm_eval"] = {"tasks": [str(EXAMPLES / "lm_eval" / "general_facts.yaml"), "prose.yaml"], "limit": 12}
    config = tmp / "tiny.yaml"
    config.write_text(yaml.safe_dump(raw))
    for name, inputs in [("data-prep", {}), ("sft", {"data": "data-prep"}), ("merge", {"model": "sft"})]:
        result = cli("stage", name, "--config", config, "--output", tmp / name,
                     *[f"--input={key}={tmp / folder}" for key, folder in inputs.items()])
        assert result.exit_code == 0, (name, result.stderr[-2000:])
    return config, tmp


def test_lm_eval_scores_base_champion_and_candidate_and_a_guard_blocks_forgetting(chain):
    config, tmp = chain
    # The champion is the same merged model: its scores must equal the candidate's.
    result = cli("stage", "evaluate", "--config", config, "--output", tmp / "evaluate", f"--input=data={tmp / 'data-prep'}",
                 f"--input=model={tmp / 'merge'}", f"--input=champion={tmp / 'merge'}")
    assert result.exit_code == 0, result.stderr[-3000:]
    metrics = json.loads(result.stdout)["metrics"]
    for model in ("base", "champion", "candidate"):
        assert 0 <= metrics[model]["lm_eval/general_facts/acc"] <= 1
        assert 0 <= metrics[model]["lm_eval/prose_answers/acc"] <= 1
    assert metrics["champion"]["lm_eval/prose_answers/acc"] == metrics["candidate"]["lm_eval/prose_answers/acc"]
    forgot = metrics["base"]["lm_eval/prose_answers/acc"] - metrics["candidate"]["lm_eval/prose_answers/acc"]
    assert forgot >= 0.25, metrics  # it learned to answer in JSON, and prefers JSON where prose is right
    assert "lm_eval/prose_answers/acc" in (tmp / "evaluate" / "report.md").read_text()

    guarded = ["--set", "registry.guards={eval_loss: 0.05, lm_eval/prose_answers/acc: 0.1}"]
    registered = cli("stage", "register", "--config", config, "--output", tmp / "register", *guarded,
                     f"--input=evaluation={tmp / 'evaluate'}", f"--input=model={tmp / 'merge'}")
    assert registered.exit_code == 0, registered.stderr[-3000:]
    decision = json.loads(registered.stdout)["metrics"]["decision"]
    assert decision["promoted"] is False
    assert any(r.startswith("guard lm_eval/prose_answers/acc regresses by") and "against base (> 0.1)" in r
               for r in decision["reasons"]), decision


def test_a_task_file_reads_its_data_beside_it(tmp_path):
    spec = lm_eval_tasks([str(EXAMPLES / "lm_eval" / "general_facts.yaml"), "arc_easy"])
    assert spec[0]["dataset_kwargs"]["data_files"]["test"] == str(EXAMPLES / "lm_eval" / "general_facts.jsonl")
    assert spec[1] == "arc_easy"


def test_an_edited_task_file_changes_the_run_fingerprint(tmp_path):
    """A scheduled run re-evaluates when the lm-eval task or its data changes under the same name."""
    for name in ("general_facts.yaml", "general_facts.jsonl"):
        (tmp_path / name).write_bytes((EXAMPLES / "lm_eval" / name).read_bytes())
    raw = yaml.safe_load((EXAMPLES / "tiny.yaml").read_text())
    raw["evaluate"]["lm_eval"] = {"tasks": ["general_facts.yaml"]}
    for source in raw["data"]["sources"]:
        source["path"] = str(EXAMPLES / source["path"])
    raw["data"]["eval_tasks"] = str(EXAMPLES / raw["data"]["eval_tasks"])
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    config = load_config(tmp_path / "c.yaml")
    before = fingerprint.fingerprint(config)
    assert {o["source"] for o in before["objects"]} >= {str(tmp_path / "general_facts.yaml"), str(tmp_path / "general_facts.jsonl")}
    with open(tmp_path / "general_facts.jsonl", "a") as data:
        data.write(json.dumps({"question": "What is 1 + 1?", "choices": ["2", "3"], "answer": 0}) + "\n")
    assert fingerprint.fingerprint(config)["sha256"] != before["sha256"]
