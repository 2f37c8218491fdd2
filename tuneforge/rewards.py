"""GRPO's verifiable rewards: functions that score generated answers, built from `grpo.rewards`, in the form TRL's
GRPOTrainer calls them (prompts, completions and the dataset's other columns as keyword lists; one float per answer).
The row's reference answer is the `answer` column."""

from __future__ import annotations

import importlib
import json
import logging
import re
from collections.abc import Callable
from pathlib import Path

import jsonschema

from tuneforge.config import RewardSettings
from tuneforge.errors import ConfigError

log = logging.getLogger(__name__)


def _text(completion) -> str:
    """A completion's text: TRL passes conversational completions as a list with one assistant message."""
    return completion[0]["content"] if isinstance(completion, list) else completion


def _parses(text: str):
    try:
        return True, json.loads(text)
    except ValueError:
        return False, None


def _schema(setting: dict | str, key: str) -> dict:
    if isinstance(setting, dict):
        schema = setting
    else:
        try:
            schema = json.loads(Path(setting).read_text())
        except (OSError, ValueError) as err:
            raise ConfigError(f"{key}: cannot read the JSON Schema {setting}: {err}") from None
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as err:
        raise ConfigError(f"{key}: not a valid JSON Schema: {err.message}") from None
    return schema


def build(rewards: list[RewardSettings]) -> tuple[list[Callable], list[float]]:
    """The reward functions and their weights. Each function is named for its type (and position when a type repeats),
    which is how TRL names its metrics: rewards/NAME/mean."""
    functions, names = [], []
    for i, reward in enumerate(rewards):
        key = f"grpo.rewards.{i}"
        function = _function(reward, key)
        name = reward.type if [r.type for r in rewards].count(reward.type) == 1 else f"{reward.type}_{i}"
        function.__name__ = name
        functions.append(function)
        names.append(name)
    return functions, [r.weight for r in rewards]


def _function(reward: RewardSettings, key: str) -> Callable:
    kind = reward.type
    if kind == "json_valid":
        def score(completions, **_):
            return [float(_parses(_text(c))[0]) for c in completions]
    elif kind == "json_schema":
        validator = jsonschema.validators.validator_for(schema := _schema(reward.json_schema, key))(schema)

        def score(completions, **_):
            results = []
            for c in completions:
                ok, value = _parses(_text(c))
                results.append(float(ok and validator.is_valid(value)))
            return results
    elif kind == "exact":  # as evaluate's exact match, so the reward is the metric the run is judged by
        def score(completions, answer, **_):
            return [float(_text(c).strip() == a.strip()) for c, a in zip(completions, answer, strict=True)]
    elif kind == "contains":
        def score(completions, answer, **_):
            return [float(a.strip().lower() in _text(c).lower()) for c, a in zip(completions, answer, strict=True)]
    elif kind == "regex":
        pattern = re.compile(reward.pattern)

        def score(completions, **_):
            return [float(pattern.search(_text(c)) is not None) for c in completions]
    elif kind == "length":
        def score(completions, answer, **_):
            results = []
            for c, a in zip(completions, answer, strict=True):
                limit = reward.max_chars or max(len(a.strip()), 1)
                results.append(-max(0, len(_text(c).strip()) - limit) / limit)
            return results
    else:
        return _user_function(reward.function, key)
    return score


def _user_function(dotted: str, key: str) -> Callable:
    module_name, _, attribute = dotted.partition(":")
    try:
        user = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"{key}.function {dotted!r} cannot be loaded: {err}") from None
    if not callable(user):
        raise ConfigError(f"{key}.function {dotted!r} is not callable")
    log.warning("grpo: running the reward function %s from the config (grpo.allow_code is true)", dotted)

    def score(**kwargs):
        return [float(x) for x in user(**kwargs)]
    return score
