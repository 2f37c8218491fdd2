"""Who may promote, against a real MLflow server with authentication (tuneforge services up: the tuneforge-auth app,
users pipeline and approver): the pipeline registers and sets challenger, the server refuses it the champion under
manual approval, the approver promotes and rolls back, wrong credentials fail cleanly, and no password leaks."""

import json
import os
import subprocess
import sys

import mlflow
import pytest
import requests
from conftest import EXAMPLES
from mlflow.exceptions import MlflowException
from mlflow.server.auth.client import AuthServiceClient

from tuneforge import registry, services
from tuneforge.config import RegistrySettings
from tuneforge.errors import RegistryError


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    folder = tmp_path_factory.mktemp("services")
    env = services.up(folder)
    yield folder, env, services.Stack(folder).state()["identities"]
    services.down(folder)


@pytest.fixture
def as_user(stack, monkeypatch):
    """Switch this process's MLflow identity: as_user('pipeline'), as_user('approver')."""
    folder, env, identities = stack
    for key, value in env.items():
        monkeypatch.setenv(key, value)

    def switch(user):
        for key, value in identities[user].items():
            monkeypatch.setenv(key, value)
        return mlflow.MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])

    return switch


def tuneforge(*args, env):
    return subprocess.run([sys.executable, "-m", "tuneforge.cli", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, **env})


def register(client, name, score, approval):
    settings = RegistrySettings(primary_metric="task_score", guards={}, approval=approval)
    return registry.register(client, name, f"s3://tuneforge/auth/{name}/{score}", None, {},
                             {"base": {"task_score": 0.0}, "candidate": {"task_score": score}}, f"{name}-{score}", settings)


def test_services_up_starts_mlflow_with_two_identities_and_keeps_secrets_in_mode_600_files(stack):
    folder, env, identities = stack
    assert env["MLFLOW_TRACKING_USERNAME"] == "pipeline"  # what runs log and register as
    assert set(identities) == {"pipeline", "approver", "admin"}
    for name in ("env", "approver.env", "admin.env", "auth.ini", "credentials.json", "state.json"):
        assert (folder / name).stat().st_mode & 0o777 == 0o600, name
    assert "MLFLOW_TRACKING_USERNAME=approver" in (folder / "approver.env").read_text()
    status = subprocess.run([sys.executable, "-m", "tuneforge.cli", "services", "status", "--folder", folder],
                            capture_output=True, text=True)
    assert "authentication" in status.stdout and "on: users pipeline, approver, admin" in status.stdout
    for user in identities.values():  # never printed
        assert user["MLFLOW_TRACKING_PASSWORD"] not in status.stdout + status.stderr
    # Nobody without a password gets in.
    url = env["MLFLOW_TRACKING_URI"] + "/api/2.0/mlflow/registered-models/search"
    assert requests.get(url, timeout=10).status_code == 401
    assert requests.get(url, timeout=10, auth=("pipeline", identities["pipeline"]["MLFLOW_TRACKING_PASSWORD"])).ok


def test_manual_approval_the_pipeline_registers_and_cannot_promote_the_approver_can(as_user, stack):
    pipeline = as_user("pipeline")
    first = register(pipeline, "auth-manual", 0.5, "manual")
    assert first["aliases"] == ["approved-pending", "challenger"] and first["decision"]["approval_pending"]
    # The server refuses the pipeline's identity the champion, even called directly: it holds EDIT on the model.
    with pytest.raises(MlflowException) as refused:
        pipeline.set_registered_model_alias("auth-manual", "champion", first["version"])
    assert refused.value.get_http_status_code() == 403 and "takes MANAGE on the model" in str(refused.value)
    permission = AuthServiceClient(stack[1]["MLFLOW_TRACKING_URI"]).get_user_permission(
        "pipeline", "registered_model", "auth-manual")
    assert permission.permission == "EDIT"
    # Nor may it switch the model to auto approval to promote itself.
    with pytest.raises(RegistryError, match="only an approver allow this identity to promote"):
        register(pipeline, "auth-manual", 0.6, "auto")

    approver_env = {**stack[1], **stack[2]["approver"]}
    typed = tuneforge("promote", "auth-manual", first["version"], "--by", "mallory", env=approver_env)
    assert typed.returncode == 2 and "authenticates this command as 'approver'" in typed.stderr
    approved = tuneforge("promote", "auth-manual", first["version"], env=approver_env)
    assert approved.returncode == 0, approved.stderr
    assert json.loads(approved.stdout)["approved_by"] == "approver"  # the authenticated user, not a typed name
    as_pipeline_cli = tuneforge("promote", "auth-manual", first["version"], env={**stack[1]})
    assert as_pipeline_cli.returncode == 0  # unchanged: already champion, nothing to move

    second = register(pipeline, "auth-manual", 0.8, "manual")
    refused = tuneforge("promote", "auth-manual", second["version"], env={**stack[1]})
    assert refused.returncode == 2 and "403" in refused.stderr and "takes MANAGE" in refused.stderr
    assert tuneforge("promote", "auth-manual", second["version"], env=approver_env).returncode == 0
    rolled = tuneforge("registry", "rollback", "auth-manual", env=approver_env)
    assert rolled.returncode == 0, rolled.stderr
    assert json.loads(rolled.stdout) == {"name": "auth-manual", "from": second["version"], "to": first["version"]}
    assert tuneforge("registry", "rollback", "auth-manual", env={**stack[1]}).returncode == 2


def test_auto_approval_lets_the_pipeline_promote_its_own_model_only(as_user, stack):
    pipeline = as_user("pipeline")
    result = register(pipeline, "auth-auto", 0.5, "auto")
    assert result["decision"]["promoted"] and "champion" in result["aliases"]
    # A model it did not create under auto stays out of its reach.
    approver = as_user("approver")
    approver.create_registered_model("auth-someone-elses", tags={registry.APPROVAL_TAG: "auto"})
    version = approver.create_model_version("auth-someone-elses", "s3://tuneforge/x").version
    pipeline = as_user("pipeline")
    with pytest.raises(MlflowException) as refused:
        pipeline.set_registered_model_alias("auth-someone-elses", "champion", version)
    assert refused.value.get_http_status_code() == 403
    # The approver can hand a model to auto approval: then the pipeline promotes it.
    switched = tuneforge("registry", "approval", "auth-someone-elses", "auto", env={**stack[1], **stack[2]["approver"]})
    assert switched.returncode == 0, switched.stderr
    pipeline.set_registered_model_alias("auth-someone-elses", "champion", version)


def test_wrong_or_missing_credentials_exit_2_with_the_servers_answer_and_no_secret(stack, tmp_path):
    folder, env, identities = stack
    wrong = {**env, "MLFLOW_TRACKING_PASSWORD": "not-the-password-canary"}
    listed = tuneforge("registry", "list", "auth-manual", env=wrong)
    assert listed.returncode == 2 and "401 Unauthorized" in listed.stderr and "'pipeline'" in listed.stderr
    assert "Traceback" not in listed.stderr and "not-the-password-canary" not in listed.stderr
    # A stage: refused when it starts, before any work, naming where the credentials come from.
    stage = tuneforge("stage", "data-prep", "--config", EXAMPLES / "tiny.yaml", "--output", tmp_path / "data", env=wrong)
    assert stage.returncode == 2 and "refused the credentials of user 'pipeline'" in stage.stderr, stage.stderr[-2000:]
    assert not (tmp_path / "data").exists()
    for user in identities.values():
        assert user["MLFLOW_TRACKING_PASSWORD"] not in listed.stdout + listed.stderr + stage.stdout + stage.stderr


def test_no_password_in_the_compiled_pipeline(stack, tmp_path):
    folder, env, identities = stack
    out = tmp_path / "pipeline.yaml"
    compiled = tuneforge("compile", EXAMPLES / "quickstart.yaml", "-o", out, env=env)
    assert compiled.returncode == 0, compiled.stderr
    text = out.read_text()
    assert "MLFLOW_TRACKING_PASSWORD" in text  # by name, from the Secret
    for user in identities.values():
        assert user["MLFLOW_TRACKING_PASSWORD"] not in text
