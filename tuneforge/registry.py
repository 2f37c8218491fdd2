"""The MLflow Model Registry: versions, the `challenger` and `champion` aliases, the promotion gate, rollback.

A version's evaluation metrics are kept as `metric.NAME` tags, so the gate can compare a candidate with the
current champion without reading its run. Aliases, not the deprecated stages.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from tuneforge.config import RegistrySettings

log = logging.getLogger(__name__)

CHAMPION, CHALLENGER = "champion", "challenger"
LOCK_SUFFIX = "promotion-lock"
LOWER_IS_BETTER = {"eval_loss", "perplexity"}


class RegistryError(RuntimeError):
    pass


def improvement(metric: str, candidate: float, reference: float) -> float:
    """How much better the candidate is, in the metric's own units (positive = better)."""
    return reference - candidate if metric in LOWER_IS_BETTER else candidate - reference


def gate(candidate: dict[str, float], base: dict[str, float], champion: dict[str, float] | None,
         settings: RegistrySettings) -> tuple[bool, list[str]]:
    """Promote only when the candidate beats the base model and the champion on the primary metric and no
    guard metric regresses past its tolerance. Returns the decision and its reasons."""
    primary = settings.primary_metric
    if primary not in candidate:
        raise RegistryError(f"registry.primary_metric {primary!r} is not among the evaluation metrics {sorted(candidate)}")
    reasons, passed = [], True
    for label, reference in (("base", base), ("champion", champion)):
        if reference is None:
            reasons.append("no current champion")
            continue
        if primary in reference:
            gain = improvement(primary, candidate[primary], reference[primary])
            ok = gain > settings.min_improvement
            passed &= ok
            reasons.append(f"{primary} {candidate[primary]:.4g} vs {label} {reference[primary]:.4g}: "
                           f"{'beats' if ok else 'does not beat'} it by more than {settings.min_improvement}")
        for metric, tolerance in settings.guards.items():
            if metric in candidate and metric in reference:
                loss = -improvement(metric, candidate[metric], reference[metric])
                if loss > tolerance:
                    passed = False
                    reasons.append(f"guard {metric} regresses by {loss:.4g} against {label} (> {tolerance})")
    return passed, reasons


def _metrics_of(version) -> dict[str, float]:
    return {k.removeprefix("metric."): float(v) for k, v in version.tags.items() if k.startswith("metric.")}


def current_champion(client: MlflowClient, name: str):
    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None


def register(client: MlflowClient, name: str, source: str, run_id: str, tags: dict[str, Any],
             candidate: dict[str, float], base: dict[str, float], settings: RegistrySettings) -> dict[str, Any]:
    try:
        client.create_registered_model(name)
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    version_tags = {**{k: str(v) for k, v in tags.items()}, **{f"metric.{k}": str(v) for k, v in candidate.items()}}
    # Every registry write of a name happens under its lock: the server's alias moves are not atomic either.
    with promotion_lock(client, name):
        version = client.create_model_version(name, source=source, run_id=run_id, tags=version_tags)
        number = str(version.version)
        client.set_registered_model_alias(name, CHALLENGER, number)
        champion = current_champion(client, name)
        passed, reasons = gate(candidate, base, _metrics_of(champion) if champion else None, settings)
        if passed:
            if champion:
                client.set_model_version_tag(name, number, "previous_champion", str(champion.version))
            client.set_registered_model_alias(name, CHAMPION, number)
        decision = {"promoted": passed, "reasons": reasons}
        client.set_model_version_tag(name, number, "gate", json.dumps(decision))
    log.info("registered %s version %s: %s", name, number, decision)
    return {"name": name, "version": number, "aliases": aliases(client, name, number), "decision": decision}


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


def promote(client: MlflowClient, name: str, version: str) -> dict[str, Any]:
    """Make `version` champion by hand, remembering who was before so rollback can return."""
    with promotion_lock(client, name):
        champion = current_champion(client, name)
        if champion and str(champion.version) == str(version):
            return {"name": name, "version": str(version), "changed": False}
        if champion:
            client.set_model_version_tag(name, str(version), "previous_champion", str(champion.version))
        client.set_registered_model_alias(name, CHAMPION, str(version))
    return {"name": name, "version": str(version), "changed": True}


def rollback(client: MlflowClient, name: str) -> dict[str, Any]:
    """Move `champion` back to the version it replaced."""
    with promotion_lock(client, name):
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
    found = client.search_model_versions(f"name = '{name}'")
    # search results carry no aliases on every store; ask each version.
    return sorted(
        ({"version": str(v.version), "aliases": aliases(client, name, str(v.version)), "metrics": _metrics_of(v),
          "source": v.source} for v in found),
        key=lambda v: int(v["version"]),
    )
