"""The MLflow server app `tuneforge-auth` (`mlflow server --app-name tuneforge-auth`): MLflow's basic-auth app with the
rules promotion needs that MLflow's permissions (READ < EDIT < MANAGE per registered model) do not draw themselves.

- Moving or removing a registered model's `champion` alias takes MANAGE on the model. EDIT (registering versions,
  setting `challenger` and `approved-pending`) no longer does.
- A model's approval mode is its tag `tuneforge.approval`, which the register stage sets from registry.approval. Under
  `manual` the identity that registers holds EDIT only: the creator of a model tagged manual gets EDIT instead of
  basic-auth's MANAGE, and who tags a model manual gives up its own MANAGE. Tagging a model `auto` (or removing the tag)
  takes MANAGE: under auto the pipeline identity keeps MANAGE on the models it created, and promotes them itself.
- The users named in TUNEFORGE_APPROVERS (the server's environment, comma-separated) get MANAGE on every registered
  model when it is created: they promote and roll back any model.
"""

from __future__ import annotations

import os

from flask import Response, make_response, request
from mlflow.server import app as mlflow_app
from mlflow.server import auth

from tuneforge.registry import APPROVAL_TAG, CHAMPION

APPROVERS = "TUNEFORGE_APPROVERS"


def _is(route: str, *methods: str) -> bool:
    return request.method in methods and request.path.endswith(f"/mlflow/registered-models/{route}")


def _param(name: str) -> str | None:
    try:
        return auth._get_request_param(name)
    except Exception:  # noqa: BLE001 (a malformed request: the registry's own handler answers it)
        return None


def _approvers() -> set[str]:
    return {user.strip() for user in os.environ.get(APPROVERS, "").split(",") if user.strip()}


def _refused(message: str) -> Response:
    refused = make_response(f"Permission denied: {message}")
    refused.status_code = 403
    return refused


def needs_manage() -> Response | None:
    """Moving `champion`, and tagging a model anything but approval manual, take MANAGE on the model."""
    if _is("alias", "POST", "DELETE") and _param("alias") == CHAMPION:
        what = f"moving the {CHAMPION} alias"
    elif (_is("set-tag", "POST") and _param("key") == APPROVAL_TAG and _param("value") != "manual") or (
            _is("delete-tag", "DELETE") and _param("key") == APPROVAL_TAG):
        what = f"allowing the registering identity to promote (tag {APPROVAL_TAG} other than manual)"
    else:
        return None
    if auth.sender_is_admin() or auth._get_permission_from_registered_model_name().can_manage:
        return None
    user = auth.authenticate_request().username
    return _refused(f"{what} of {_param('name')!r} takes MANAGE on the model; user {user!r} has less (an approver "
                    "promotes: tuneforge promote)")


def manual_approval_leaves_edit(response: Response) -> Response:
    """After a model is created tagged manual, or tagged manual: its creator or tagger holds EDIT, not MANAGE."""
    if response.status_code != 200:
        return response
    if _is("create", "POST"):
        tags = {t.get("key"): t.get("value") for t in (request.get_json(silent=True) or {}).get("tags", [])}
        name = (response.get_json(silent=True) or {}).get("registered_model", {}).get("name")
        manual = tags.get(APPROVAL_TAG) == "manual"
    elif _is("set-tag", "POST") and _param("key") == APPROVAL_TAG:
        name, manual = _param("name"), _param("value") == "manual"
    else:
        return response
    user = auth.authenticate_request().username
    if name and manual and user not in _approvers() and not auth.store.get_user(user).is_admin:
        auth.store.grant_user_permission(user, "registered_model", name, "EDIT")
    if name and _is("create", "POST"):
        for approver in _approvers() - {user}:
            auth.store.grant_user_permission(approver, "registered_model", name, "MANAGE")
    return response


def create_app(app=mlflow_app):
    # Flask runs after-request hooks in the reverse order of registration: this one runs after basic-auth's, which
    # gives a model's creator MANAGE.
    app.after_request(manual_approval_leaves_edit)
    created = auth.create_app(app)
    # Before-request hooks run in order: basic-auth's authentication and permission checks come first.
    app.before_request(needs_manage)
    return created
