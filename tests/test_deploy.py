"""Serving a registered version: `tuneforge deploy` manifests, the chart's serving section, and their commands run here
against a real SeaweedFS and MLflow, queried through the openai client."""

import json
import os
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import mlflow
import pytest
import yaml
from conftest import cli

from tuneforge import gguf_writer, models, serving, storage
from tuneforge.config import BaseModelSettings
from tuneforge.errors import ManifestError
from tuneforge.pipelines import deploy

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
            "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def registered(stack, tmp_path_factory):
    """The tiny model's q8_0 GGUF published to SeaweedFS as an export-gguf output, registered as tiny-serve@champion."""
    tmp = tmp_path_factory.mktemp("deploy")
    patch = pytest.MonkeyPatch()
    for key, value in stack.items():
        patch.setenv(key, value)
    export = tmp / "export-gguf"
    export.mkdir()
    model_dir = Path(models.resolve(BaseModelSettings(source="tiny-llama")))
    gguf_writer.write_gguf(model_dir, export / "tiny-serve-q8_0.gguf", "q8_0", name="tiny-serve", chat_template=TEMPLATE,
                           stop_tokens=["<|im_end|>"])
    storage.write_manifest(export, "export-gguf", {"gguf_files": {"q8_0": "tiny-serve-q8_0.gguf"}}, {})
    bucket = stack["TUNEFORGE_S3_BUCKET"]
    published = storage.publish(export, f"s3://{bucket}/runs/tiny-serve/r1/export-gguf")
    client = mlflow.MlflowClient(tracking_uri=stack["MLFLOW_TRACKING_URI"])
    client.create_registered_model("tiny-serve")
    version = client.create_model_version("tiny-serve", f"s3://{bucket}/runs/tiny-serve/r1/merge",
                                          tags={"gguf_files": json.dumps({"q8_0": f"{published}/tiny-serve-q8_0.gguf"})})
    client.set_registered_model_alias("tiny-serve", "champion", version.version)
    local = client.create_model_version("tiny-serve", f"s3://{bucket}/runs/tiny-serve/r0/merge",
                                        tags={"gguf_files": json.dumps({"q8_0": str(export / "tiny-serve-q8_0.gguf")})})
    client.set_registered_model_alias("tiny-serve", "local", local.version)
    yield stack, f"{published}/tiny-serve-q8_0.gguf"
    patch.undo()


def rendered(stack, *args):
    result = cli("deploy", *args, "--tracking-uri", stack["MLFLOW_TRACKING_URI"])
    assert result.exit_code == 0, (result.stderr, result.exception)
    return list(yaml.safe_load_all(result.stdout))


def chart_serving(uri: str) -> dict:
    helm = subprocess.run([sys.executable, str(ROOT / "charts" / "fetch_helm.py")], capture_output=True, text=True).stdout.strip()
    out = subprocess.run([helm, "template", "tf", str(ROOT / "charts" / "tuneforge"), "--set", "serving.enabled=true",
                          "--set", f"serving.modelUri={uri}", "--set", "serving.alias=tiny-serve"],
                         capture_output=True, text=True, check=True).stdout
    return next(o for o in yaml.safe_load_all(out) if o and o["kind"] == "Deployment" and o["metadata"]["name"].endswith("-serving"))


def test_llamacpp_manifests_run_here_and_answer_a_chat_request(registered, tmp_path):
    stack, uri = registered
    objects = rendered(stack, "tiny-serve", "--target", "llamacpp")
    for obj in objects:
        kubernetes_validate.validate(obj, kubernetes_validate.utils.latest_version(), strict=True)
    deployment = next(o for o in objects if o["kind"] == "Deployment")
    assert deployment["metadata"]["annotations"]["tuneforge.io/gguf"] == uri
    pod = deployment["spec"]["template"]["spec"]
    init, server = pod["initContainers"][0], pod["containers"][0]
    assert server["image"].rsplit("/", 1)[1].startswith("tuneforge-export:") and pod["securityContext"]["runAsNonRoot"]
    # The chart's serving section runs the same two commands.
    chart = chart_serving(uri)["spec"]["template"]["spec"]
    assert chart["initContainers"][0]["command"] == init["command"]
    assert chart["containers"][0]["command"] == server["command"]

    # Both commands, here: the init container's against SeaweedFS, then the server's on what it fetched.
    models_dir = tmp_path / "models"
    # The image has tuneforge on its PATH, this machine in the test's environment; /models is a folder here.
    here = lambda command: [str(Path(sys.executable).parent / "tuneforge")] + [  # noqa: E731
        str(models_dir) if part == "/models" else part.replace("/models/", f"{models_dir}/") for part in command[1:]]
    fetched = subprocess.run(here(init["command"]), capture_output=True, text=True, env=os.environ | stack)
    assert fetched.returncode == 0, fetched.stderr[-2000:]
    assert Path(fetched.stdout.strip()) == models_dir / "tiny-serve-q8_0.gguf"
    port = serving.free_port()
    command = here(server["command"])
    command[command.index("--host") + 1], command[command.index("--port") + 1] = "127.0.0.1", str(port)
    log = tmp_path / "server.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        serving.wait_ready(f"http://127.0.0.1:{port}", process, 120, log, "the deployed file")
        from openai import OpenAI

        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["tiny-serve"]
        reply = client.chat.completions.create(model="tiny-serve", messages=[{"role": "user", "content": "Hello"}],
                                               max_tokens=8, temperature=0)
        assert reply.choices[0].message.content is not None and reply.usage.prompt_tokens > 3
    finally:
        serving.stop(process)


def test_a_tampered_file_is_not_served(registered, tmp_path):
    stack, uri = registered
    bucket, key = storage.split_s3(uri)
    original = storage.s3_client().get_object(Bucket=bucket, Key=key)["Body"].read()
    storage.s3_client().put_object(Bucket=bucket, Key=key, Body=original[:-16] + bytes(16))
    try:
        result = cli("serve", uri, "--models-dir", tmp_path / "models", "--fetch-only")
        assert result.exit_code == 2 and "checksum mismatch with its manifest" in result.stderr
        assert list((tmp_path / "models").glob("*.gguf")) == []
    finally:
        storage.s3_client().put_object(Bucket=bucket, Key=key, Body=original)


def test_kserve_manifests_read_back_through_the_kserve_types(registered):
    stack, uri = registered
    objects = rendered(stack, "tiny-serve@champion", "--target", "kserve")
    kinds = [(o["kind"], o["metadata"]["name"]) for o in objects]
    assert kinds == [("ServingRuntime", "tuneforge-llamacpp"), ("InferenceService", "tiny-serve-gguf"),
                     ("InferenceService", "tiny-serve-vllm")]
    gguf_service = objects[1]["spec"]["predictor"]["model"]
    assert gguf_service["storageUri"] == uri and gguf_service["runtime"] == "tuneforge-llamacpp"
    assert objects[0]["spec"]["containers"][0]["command"][:3] == ["tuneforge", "serve", "/mnt/models/tiny-serve-q8_0.gguf"]
    vllm = objects[2]["spec"]["predictor"]["model"]
    assert vllm["modelFormat"]["name"] == "huggingface" and vllm["resources"]["limits"]["nvidia.com/gpu"] == "1"
    # A key the KServe types do not have is refused, naming it.
    objects[1]["spec"]["predictor"]["model"]["storageURI"] = uri
    with pytest.raises(ManifestError, match=r"spec.predictor.model.storageURI: unknown key"):
        deploy.validate_kserve(objects[1])


@pytest.mark.parametrize("reference, message", [
    ("tiny-serve@nightly", "no version of 'tiny-serve' has the alias 'nightly'"),
    ("tiny-serve@local", "which no cluster can read: register it from a run with storage.uri set"),
])
def test_deploy_says_what_to_change(registered, reference, message):
    stack, _ = registered
    result = cli("deploy", reference, "--tracking-uri", stack["MLFLOW_TRACKING_URI"])
    assert result.exit_code == 2 and message in result.stderr, (result.stderr, result.exception)
