"""The MLflow Model Registry: versions, the `challenger`, `champion` and `approved-pending` aliases, the promotion
gate, approval and rollback. Aliases, not the deprecated stages.

The gate compares the candidate with the champion on the numbers evaluate measured in the same run, on the same eval
split (evaluate re-scores the champion's registered files), and asks for a win larger than the noise of that split: the
paired differences item by item (held-out row, pair, task) give the standard error of the gain, and a gain inside
`registry.confidence`'s interval is not a win (retraining on a schedule would otherwise swap champions on noise).
A version's own metrics are also kept as `metric.NAME` tags; they are the fallback when the champion could not be
re-scored, and the decision then says so (no noise is measured then: they come from another split). A version's
`model_sha256` (a digest of its merged files) tells a retrained model from one the registry already holds.
"""

from __future__ import annotations

import json
import logging
import random
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from tuneforge import env
from tuneforge.config import RegistrySettings
from tuneforge.errors import RegistryError

log = logging.getLogger(__name__)

CHAMPION, CHALLENGER, PENDING = "champion", "challenger", "approved-pending"
LOCK_SUFFIX = "promotion-lock"
# A registered model's approval mode (registry.approval); on a server with tuneforge-auth it decides who may promote.
APPROVAL_TAG = "tuneforge.approval"
LOWER_IS_BETTER = {"eval_loss", "perplexity"}


def improvement(metric: str, candidate: float, reference: float) -> float:
    """How much better the candidate is, in the metric's own units (positive = better)."""
    return reference - candidate if metric in LOWER_IS_BETTER else candidate - reference


def paired_noise(candidate: dict[str, list[float]], reference: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    """For each metric scored item by item on both models (the same items): how many, and the standard error of the
    mean of their differences, which is the difference of the two means."""
    noise = {}
    for metric, values in candidate.items():
        other = reference.get(metric)
        if other is not None and len(other) == len(values) >= 2:
            differences = [a - b for a, b in zip(values, other, strict=True)]
            noise[metric] = {"n": len(values), "stderr": statistics.stdev(differences) / len(values) ** 0.5}
    return noise


def gate(candidate: dict[str, float], base: dict[str, float], champion: dict[str, float] | None,
         settings: RegistrySettings, champion_label: str = "champion",
         noise: dict[str, dict[str, dict[str, float]] | None] | None = None) -> tuple[bool, list[str]]:
    """Promote only when the candidate beats the base model and the champion on the primary metric by more than
    min_improvement plus the noise of the comparison, and no guard metric regresses past its tolerance. `noise`:
    "base" / "champion" -> paired_noise against that model, where it was measured on the same items. Returns the
    decision and its reasons."""
    primary = settings.primary_metric
    if primary not in candidate:
        raise RegistryError(f"registry.primary_metric {primary!r} is not among the evaluation metrics {sorted(candidate)}")
    noise = noise or {}
    z = statistics.NormalDist().inv_cdf(0.5 + settings.confidence / 2) if settings.confidence else 0.0
    reasons, passed = [], True
    for key, label, reference in (("base", "base", base), ("champion", champion_label, champion)):
        if reference is None:
            reasons.append(f"no current {label}")
            continue
        if primary in reference:
            gain = improvement(primary, candidate[primary], reference[primary])
            measured = (noise.get(key) or {}).get(primary)
            margin = z * measured["stderr"] if measured else 0.0
            ok = gain - margin > settings.min_improvement
            passed &= ok
            compared = f"{primary} {candidate[primary]:.4g} vs {label} {reference[primary]:.4g}"
            if measured and settings.confidence and gain > settings.min_improvement and not ok:
                reasons.append(f"{compared}: the gain {gain:.4g} is within the noise of {measured['n']} paired items "
                               f"(±{margin:.3g} at {settings.confidence:.0%} confidence): not a clear win. More eval rows "
                               "or tasks narrow it; registry.confidence: 0 decides on the means alone")
            else:
                noted = (f" plus the noise of {measured['n']} paired items (±{margin:.3g} at {settings.confidence:.0%})"
                         if measured and settings.confidence else "")
                reasons.append(f"{compared}: {'beats' if ok else 'does not beat'} it by more than "
                               f"{settings.min_improvement}{noted}")
        for metric, tolerance in settings.guards.items():
            if metric in candidate and metric in reference:
                loss = -improvement(metric, candidate[metric], reference[metric])
                if loss > tolerance:
                    passed = False
                    reasons.append(f"guard {metric} regresses by {loss:.4g} against {label} (> {tolerance})")
    return passed, reasons


def not_worse(candidate: dict[str, float], reference: dict[str, float], settings: RegistrySettings) -> tuple[bool, list[str]]:
    """Whether `candidate` is at least as good as `reference` on the primary metric and no guard metric regresses past
    its tolerance (a comparison of two models of the same run, where a tie keeps the candidate)."""
    primary = settings.primary_metric
    gain = improvement(primary, candidate[primary], reference[primary])
    kept = gain >= 0
    reasons = [f"{primary} {candidate[primary]:.4g} vs {reference[primary]:.4g}"]
    for metric, tolerance in settings.guards.items():
        if metric in candidate and metric in reference:
            loss = -improvement(metric, candidate[metric], reference[metric])
            if loss > tolerance:
                kept = False
                reasons.append(f"guard {metric} {candidate[metric]:.4g} vs {reference[metric]:.4g} regresses by {loss:.4g} "
                               f"(> {tolerance})")
    return kept, reasons


def _metrics_of(version) -> dict[str, float]:
    return {k.removeprefix("metric."): float(v) for k, v in version.tags.items() if k.startswith("metric.")}


def current_champion(client: MlflowClient, name: str):
    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None


def champion_reference(client: MlflowClient, name: str) -> dict[str, str] | None:
    """The current champion's version, where its merged model is kept and its digest: what evaluate re-scores."""
    try:
        champion = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None
    return {"version": str(champion.version), "source": champion.source,
            "model_sha256": champion.tags.get("model_sha256", "")}


def _same_model(client: MlflowClient, name: str, model_sha256: str):
    for version in client.search_model_versions(f"name = '{name}'"):
        if version.tags.get("model_sha256") == model_sha256:
            return version
    return None


def _champion_numbers(evaluation: dict[str, Any], champion) -> tuple[dict[str, float] | None, str]:
    """The champion's metrics to gate on, and how they were measured (they are evaluation["champion"] itself when it
    was re-scored in this run)."""
    if champion is None:
        return None, "champion"
    version = f"champion v{champion.version}"
    rescored = evaluation.get("champion")
    if rescored and evaluation.get("champion_model_sha256") == champion.tags.get("model_sha256"):
        return rescored, f"{version} (re-scored on this run's eval split)"
    why = evaluation.get("champion_error") or (
        "it was not re-scored in this run" if not rescored else "another version became champion during this run")
    return _metrics_of(champion), f"{version} (its stored metrics, from its own eval split: {why})"


def register(client: MlflowClient, name: str, source: str, run_id: str, tags: dict[str, Any], evaluation: dict[str, Any],
             model_sha256: str, settings: RegistrySettings,
             card: Callable[[dict[str, Any]], str] | None = None) -> dict[str, Any]:
    """Register the candidate unless the registry already holds the same model, decide on promotion, and describe the
    version with `card(result)` (Markdown). `evaluation` is evaluate's metrics: base, candidate and, when it re-scored
    the champion, champion with champion_model_sha256."""
    set_approval(client, name, settings.approval)
    candidate = evaluation["candidate"]
    version_tags = {**{k: str(v) for k, v in tags.items()}, **{f"metric.{k}": str(v) for k, v in candidate.items()},
                    "model_sha256": model_sha256}
    # Every registry write of a name happens under its lock: the server's alias moves are not atomic either.
    with promotion_lock(client, name):
        same = _same_model(client, name, model_sha256)
        if same is not None:
            number = str(same.version)
            decision = {"promoted": False, "unchanged": True,
                        "reasons": [f"unchanged: version {number} holds this model (model_sha256 {model_sha256[:12]}); "
                                    "nothing registered"]}
            log.info("%s: %s", name, decision["reasons"][0])
            return {"name": name, "version": number, "aliases": aliases(client, name, number), "decision": decision}
        version = client.create_model_version(name, source=source, run_id=run_id, tags=version_tags)
        number = str(version.version)
        client.set_registered_model_alias(name, CHALLENGER, number)
        champion = current_champion(client, name)
        champion_metrics, label = _champion_numbers(evaluation, champion)
        noise = dict(evaluation.get("noise", {}))
        if champion_metrics is not evaluation.get("champion"):  # stored metrics, from another split: nothing paired
            noise.pop("champion", None)
        passed, reasons = gate(candidate, evaluation["base"], champion_metrics, settings, label, noise)
        pending = passed and settings.approval == "manual"
        if pending:
            client.set_registered_model_alias(name, PENDING, number)
            reasons.append(f"passes the gate; waits for approval (registry.approval: manual): tuneforge promote {name} {number}")
        elif passed:
            if champion:
                client.set_model_version_tag(name, number, "previous_champion", str(champion.version))
            client.set_registered_model_alias(name, CHAMPION, number)
        decision = {"promoted": passed and not pending, "approval_pending": pending, "reasons": reasons}
        client.set_model_version_tag(name, number, "gate", json.dumps(decision))
        result = {"name": name, "version": number, "aliases": aliases(client, name, number), "decision": decision}
        if card:
            client.update_model_version(name, number, description=card(result))
    log.info("registered %s version %s: %s", name, number, decision)
    return result


def set_approval(client: MlflowClient, name: str, approval: str) -> None:
    """Create NAME if new, tagged with its approval mode (APPROVAL_TAG), or retag it when registry.approval changed. On a
    server with tuneforge-auth the tag decides who may move champion: under manual the registering identity holds EDIT
    only, and only an approver (MANAGE) may set auto."""
    try:
        client.create_registered_model(name, tags={APPROVAL_TAG: approval})
        return
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    if client.get_registered_model(name).tags.get(APPROVAL_TAG) == approval:
        return
    try:
        client.set_registered_model_tag(name, APPROVAL_TAG, approval)
    except MlflowException as err:
        if err.get_http_status_code() != 403:
            raise
        raise RegistryError(f"{name} is registered under manual approval, and registry.approval is auto: the server lets "
                            f"only an approver allow this identity to promote (as the approver: tuneforge registry "
                            f"approval {name} auto), or set registry.approval: manual") from None


def set_approval_as_approver(client: MlflowClient, name: str, approval: str, user: str) -> dict[str, str]:
    """An approver's decision on NAME: its approval tag, and USER's permission on it (MANAGE under auto, EDIT under
    manual), through the basic-auth app's permission API."""
    from mlflow.server.auth.client import AuthServiceClient

    with _refusals(f"setting the approval of {name}"):
        client.get_registered_model(name)
        client.set_registered_model_tag(name, APPROVAL_TAG, approval)
        permissions = AuthServiceClient(client.tracking_uri)
        try:
            permissions.revoke_user_permission(user, "registered_model", name)
        except MlflowException as err:
            if err.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
        permissions.grant_user_permission(user, "registered_model", name, "MANAGE" if approval == "auto" else "EDIT")
    return {"name": name, "approval": approval, "user": user, "permission": "MANAGE" if approval == "auto" else "EDIT"}


def outcome(result: dict[str, Any]) -> str:
    """A registration in a few words: `unchanged: version 3`, `version 4 champion`, ..."""
    decision = result["decision"]
    if decision.get("unchanged"):
        return f"unchanged: version {result['version']}"
    if decision.get("approval_pending"):
        return f"version {result['version']} approved-pending"
    return f"version {result['version']} {'champion' if decision['promoted'] else 'challenger'}"


@contextmanager
def promotion_lock(client: MlflowClient, name: str, wait: float = 600, stale_after: float = 900) -> Iterator[None]:
    """Hold NAME's lock while registering a version, deciding against the champion and moving the aliases, so
    that runs finishing at once go one after the other. MLflow has no compare-and-set for aliases, but creating a registered model
    is atomic (names are unique), so a registered model named NAME.promotion-lock is the lock. A lock left by a
    killed run is broken after `stale_after` seconds."""
    lock = f"{name}.{LOCK_SUFFIX}"
    deadline = time.monotonic() + wait
    while True:
        try:
            client.create_registered_model(lock, description="held while a run decides on promotion; safe to delete "
                                                             "if no run of this model is registering")
            break
        except MlflowException as err:
            # MLflow words a refused create by reading the existing model back, so a create that meets the holder's
            # release half-way is answered RESOURCE_DOES_NOT_EXIST: the lock is free, try again.
            if err.error_code == "RESOURCE_DOES_NOT_EXIST":
                continue
            if err.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        try:
            held_for = time.time() - client.get_registered_model(lock).creation_timestamp / 1000
        except MlflowException:
            continue  # released meanwhile
        if held_for > stale_after:
            log.warning("breaking the promotion lock of %s, held for %.0f s", name, held_for)
            _release(client, lock)
        elif time.monotonic() > deadline:
            raise RegistryError(f"{name}: another run has held the promotion lock for {held_for:.0f} s; "
                                f"if no run is registering, delete the registered model {lock}")
        else:
            time.sleep(random.uniform(0.2, 1.0))
    try:
        yield
    finally:
        _release(client, lock)


def _release(client: MlflowClient, lock: str) -> None:
    try:
        client.delete_registered_model(lock)
    except MlflowException as err:
        if err.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise


def aliases(client: MlflowClient, name: str, version: str) -> list[str]:
    return sorted(client.get_model_version(name, version).aliases)


@contextmanager
def _refusals(what: str) -> Iterator[None]:
    """The registry's answers to a person's command (no such model or version, no access) as RegistryErrors."""
    try:
        yield
    except MlflowException as err:
        if err.get_http_status_code() == 401:
            raise RegistryError(env.mlflow_credentials_refused()) from None
        raise RegistryError(f"{what}: the registry answered {err.error_code}: {str(err).splitlines()[0][:300]}") from None



def authenticated_user(tracking_uri: str) -> str | None:
    """Who the tracking server says the caller is (its basic-auth app), or None where it authenticates no one."""
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    if not tracking_uri.startswith(("http://", "https://")):
        return None
    response = http_request(get_default_host_creds(tracking_uri), "/api/2.0/mlflow/users/current", "GET",
                            max_retries=0)
    if response.status_code == 401:
        raise RegistryError(env.mlflow_credentials_refused(tracking_uri))
    if response.status_code != 200:
        return None  # a server without the auth app: no such route
    return response.json().get("user", {}).get("username")


def _existing_version(client: MlflowClient, name: str, version: str):
    with _refusals(f"{name} version {version}"):
        return client.get_model_version(name, str(version))


def promote(client: MlflowClient, name: str, version: str, by: str) -> dict[str, Any]:
    """Make `version` champion by hand (a person's approval under registry.approval: manual), recording who and when,
    and remembering who was champion before so rollback can return."""
    version = str(version)
    _existing_version(client, name, version)
    with _refusals(f"promoting {name} version {version}"), promotion_lock(client, name):
        champion = current_champion(client, name)
        if champion and str(champion.version) == version:
            return {"name": name, "version": version, "changed": False}
        if champion:
            client.set_model_version_tag(name, version, "previous_champion", str(champion.version))
        client.set_registered_model_alias(name, CHAMPION, version)
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        client.set_model_version_tag(name, version, "approved_by", by)
        client.set_model_version_tag(name, version, "approved_at", when)
        if PENDING in aliases(client, name, version):
            client.delete_registered_model_alias(name, PENDING)
    return {"name": name, "version": version, "changed": True, "approved_by": by, "approved_at": when}


def rollback(client: MlflowClient, name: str) -> dict[str, Any]:
    """Move `champion` back to the version it replaced."""
    with _refusals(f"registered model {name}"):
        client.get_registered_model(name)
    with _refusals(f"rolling back {name}"), promotion_lock(client, name):
        champion = current_champion(client, name)
        if champion is None:
            raise RegistryError(f"{name} has no champion to roll back")
        previous = champion.tags.get("previous_champion")
        if not previous:
            raise RegistryError(f"{name} version {champion.version} replaced no earlier champion; nothing to roll back to")
        client.set_model_version_tag(name, str(champion.version), "rolled_back", "true")
        client.set_registered_model_alias(name, CHAMPION, previous)
    return {"name": name, "from": str(champion.version), "to": previous}


def versions(client: MlflowClient, name: str) -> list[dict[str, Any]]:
    with _refusals(f"registered model {name}"):
        client.get_registered_model(name)
        found = client.search_model_versions(f"name = '{name}'")
    # search results carry no aliases on every store; ask each version.
    return sorted(
        ({"version": str(v.version), "aliases": aliases(client, name, str(v.version)), "metrics": _metrics_of(v),
          "source": v.source} for v in found),
        key=lambda v: int(v["version"]),
    )
