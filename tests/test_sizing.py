"""Cluster resources sized from the model, read from the compiled IR a cluster would get, and the compile that refuses
resources a stage cannot run with."""

import json

import pytest
import yaml
from conftest import EXAMPLES, cli

GIB = 2**30
STAGES = ("data-prep", "sft", "dpo", "merge", "evaluate", "export-gguf", "serve-check", "register")


def compiled_stages(path):
    """stage -> (image, cpu, memory GiB, gpus, GPU-memory affinity in MiB, the sizing annotation), from the IR."""
    spec, platform = list(yaml.safe_load_all(path.read_text()))[:2]
    executors = spec["deploymentSpec"]["executors"]
    kubernetes = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    found = {}
    for stage in STAGES:
        name = f"exec-{stage}"
        if name not in executors:
            continue
        container = executors[name]["container"]
        resources = container["resources"]
        extra = kubernetes.get(name, {})
        affinity = [e for term in extra.get("nodeAffinity", []) for e in term.get("matchExpressions", [])]
        found[stage] = {
            "image": container["image"].split("/")[-1].split(":")[0],
            "cpu": resources["cpuLimit"],
            "memory_gib": round(resources["memoryLimit"] * 1e9 / GIB, 2),  # KFP stores memory in GB
            "gpus": int(resources.get("accelerator", {}).get("resourceCount", 0)),
            "gpu_memory_mib": {e["key"]: int(e["values"][0]) for e in affinity if e["operator"] == "Gt"},
            "why": extra.get("podMetadata", {}).get("annotations", {}).get("tuneforge.io/resources", ""),
        }
    return found


def compile_(tmp_path, example, *overrides):
    out = tmp_path / "pipeline.yaml"
    result = cli("compile", EXAMPLES / example, "-o", out, *overrides)
    return result, out


def without_resources(tmp_path, example):
    """The example with its cluster.resources left out: everything sized from the model."""
    config = yaml.safe_load((EXAMPLES / example).read_text())
    config.get("cluster", {}).pop("resources", None)
    for source in config["data"]["sources"]:
        source["path"] = str(EXAMPLES / source["path"])
    config["data"]["eval_tasks"] = str(EXAMPLES / config["data"]["eval_tasks"])
    path = tmp_path / example
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize("written_out", [True, False], ids=["as-written", "sized"])
def test_the_8b_qlora_example_trains_on_a_gpu_and_merges_with_room_for_the_model(tmp_path, written_out):
    config = EXAMPLES / "llama3-8b-qlora.yaml" if written_out else without_resources(tmp_path, "llama3-8b-qlora.yaml")
    out = tmp_path / "p.yaml"
    result = cli("compile", config, "-o", out)
    assert result.exit_code == 0, result.stderr or result.exception
    found = compiled_stages(out)
    for stage in ("sft", "dpo"):
        assert found[stage]["image"] == "tuneforge-cuda" and found[stage]["gpus"] == 1, found[stage]
        assert found[stage]["gpu_memory_mib"]["nvidia.com/gpu.memory"] > 13 * 1024  # the plan (10.6-11.4 GiB) x 1.25
        assert "CUDA" in found[stage]["why"]
    for stage in ("merge", "evaluate", "export-gguf"):
        # 8.03B parameters in fp32 are 29.9 GiB; 16 GiB (the bf16 size) would be OOM-killed.
        assert found[stage]["memory_gib"] >= 37.4 and found[stage]["gpus"] == 0, found[stage]
        assert "8.03B-parameter model in fp32" in found[stage]["why"]
    # One GGUF file in llama.cpp: 8.03B weights at f16 at most are 15 GiB.
    assert found["serve-check"]["memory_gib"] >= 20.7 and found["serve-check"]["image"] == "tuneforge-export"
    assert found["data-prep"] == found["register"] | {"why": found["data-prep"]["why"]}
    assert found["data-prep"]["gpus"] == 0 and found["data-prep"]["memory_gib"] == 8.0


def test_the_sizes_are_the_ones_tuneforge_plan_shows(tmp_path):
    config = without_resources(tmp_path, "llama3-8b-qlora.yaml")
    result, out = compile_(tmp_path, config)
    assert result.exit_code == 0, result.stderr
    planned = cli("plan", config)
    assert planned.exit_code == 0, planned.stderr
    report = json.loads(planned.stdout.strip().splitlines()[-1])
    found = compiled_stages(out)
    assert set(found) == set(report["cluster"])
    for stage, sized in report["cluster"].items():
        assert found[stage]["memory_gib"] == float(sized["memory"].removesuffix("Gi")), stage
        assert found[stage]["cpu"] == float(sized["cpu"]) and found[stage]["gpus"] == sized["gpus"], stage
        assert found[stage]["why"] == sized["why"], stage
    for stage in ("sft", "dpo"):
        gpu = report["stages"][stage]["memory_gib"]["total"] * 1.25
        assert report["cluster"][stage]["gpu_memory_gib"] == pytest.approx(gpu, abs=0.05)
        assert found[stage]["gpu_memory_mib"]["nvidia.com/gpu.memory"] == int(report["cluster"][stage]["gpu_memory_gib"] * 1024)
    assert f"1 GPU >= {report['cluster']['sft']['gpu_memory_gib']} GiB" in planned.stdout


def test_zero_gpus_for_8b_qlora_is_refused_naming_the_stage_the_need_and_the_key(tmp_path):
    result, out = compile_(tmp_path, "llama3-8b-qlora.yaml", "--set", "cluster.resources.sft.gpus=0")
    assert result.exit_code == 2
    assert ("sft asks for 0 GPUs (cluster.resources.sft.gpus, or cluster.resources.default) and needs 1: QLoRA's "
            "4-bit weights need CUDA") in result.stderr
    assert "set cluster.resources.sft.gpus: 1" in result.stderr and "--force" in result.stderr
    assert not out.exists()

    forced, out = compile_(tmp_path, "llama3-8b-qlora.yaml", "--set", "cluster.resources.sft.gpus=0", "--force")
    assert forced.exit_code == 0, forced.stderr
    assert "compiled with --force: sft asks for 0 GPUs" in forced.stderr
    assert compiled_stages(out)["sft"]["gpus"] == 0


def test_an_8b_merge_under_the_fp32_model_is_refused(tmp_path):
    result, out = compile_(tmp_path, "llama3-8b-qlora.yaml", "--set", "cluster.resources.merge.memory=16Gi")
    assert result.exit_code == 2
    assert ("merge asks for memory 16Gi (cluster.resources.merge.memory, or cluster.resources.default) and needs 40Gi: "
            "the 8.03B-parameter model in fp32") in result.stderr
    assert "set cluster.resources.merge.memory: 40Gi" in result.stderr and not out.exists()
    # A default for every stage is checked against each one, and the message names each stage's own key.
    result, out = compile_(tmp_path, "llama3-8b-qlora.yaml", "--set", "cluster.resources={default: {memory: 16Gi}}")
    assert result.exit_code == 2
    for stage in ("merge", "evaluate", "export-gguf"):
        assert f"set cluster.resources.{stage}.memory: 40Gi" in result.stderr
    assert "set cluster.resources.sft.memory: 24Gi" in result.stderr  # the bf16 checkpoint while it loads
    assert "data-prep asks" not in result.stderr and "register asks" not in result.stderr


def test_the_quickstart_still_compiles_to_cpu_only_stages(tmp_path):
    result, out = compile_(tmp_path, "quickstart.yaml")
    assert result.exit_code == 0, result.stderr
    found = compiled_stages(out)
    assert set(found) == set(STAGES)
    for stage, pod in found.items():
        assert pod["gpus"] == 0 and not pod["gpu_memory_mib"], stage
        assert pod["image"] == ("tuneforge-export" if stage in ("export-gguf", "serve-check") else "tuneforge-cpu"), stage
        assert pod["cpu"] == 2.0 and pod["memory_gib"] == 8.0, (stage, pod)
    assert "CPUs will do" in found["sft"]["why"]


def test_the_1b_full_example_gets_a_gpu_that_holds_its_optimizer_state(tmp_path):
    result, out = compile_(tmp_path, "llama-1b-full.yaml")
    assert result.exit_code == 0, result.stderr
    sft = compiled_stages(out)["sft"]
    assert sft["image"] == "tuneforge-cuda" and sft["gpus"] == 1
    assert sft["gpu_memory_mib"]["nvidia.com/gpu.memory"] > 24 * 1024  # a 24 GB card is too small for this plan
    assert "1.24B parameters train too slowly on CPUs" in sft["why"]


def test_a_model_the_plan_cannot_read_must_be_sized_by_hand(tmp_path):
    result, out = compile_(tmp_path, "quickstart.yaml", "--set", "base_model.source=acme/unknown-7b")
    assert result.exit_code == 2
    assert "cannot size cluster.resources.sft: base_model.source 'acme/unknown-7b'" in result.stderr
    assert "Set cluster.resources.sft.gpus, .memory and .cpu (or cluster.resources.default)" in result.stderr
    result, out = compile_(tmp_path, "quickstart.yaml", "--set", "base_model.source=acme/unknown-7b",
                           "--set", "cluster.resources={default: {cpu: '4', memory: 64Gi, gpus: 1}}")
    assert result.exit_code == 0, result.stderr
    sft = compiled_stages(out)["sft"]
    assert sft["gpus"] == 1 and sft["memory_gib"] == 64.0 and "not checked" in sft["why"]


def test_no_gpu_memory_constraint_where_the_cluster_has_no_such_label(tmp_path):
    result, out = compile_(tmp_path, "llama3-8b-qlora.yaml", "--set", "cluster.gpu_memory_label=null")
    assert result.exit_code == 0, result.stderr
    sft = compiled_stages(out)["sft"]
    assert sft["gpus"] == 1 and sft["gpu_memory_mib"] == {}
