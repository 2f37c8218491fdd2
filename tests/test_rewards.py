"""GRPO's built-in rewards score answers as documented, in the form TRL calls them."""

import json

import pytest

from tuneforge import rewards
from tuneforge.config import GrpoSettings, RewardSettings
from tuneforge.errors import ConfigError

ANSWER = '{"name": "Aisha", "city": "Lagos"}'


def score(reward: dict, completions: list, answers: list[str] | None = None) -> list[float]:
    functions, weights = rewards.build([RewardSettings(**reward)])
    return functions[0](prompts=["p"] * len(completions), completions=completions,
                        answer=answers or [ANSWER] * len(completions))


def test_json_rewards():
    completions = [ANSWER, '{"name": "Aisha"}', "Aisha lives in Lagos", '[1, 2]']
    assert score({"type": "json_valid"}, completions) == [1.0, 1.0, 0.0, 1.0]
    schema = {"type": "object", "required": ["name", "city"], "properties": {"city": {"type": "string"}}}
    assert score({"type": "json_schema", "json_schema": schema}, completions) == [1.0, 0.0, 0.0, 0.0]


def test_a_schema_file_is_read_and_a_broken_one_named(tmp_path):
    path = tmp_path / "schema.json"
    path.write_text(json.dumps({"type": "array"}))
    assert score({"type": "json_schema", "json_schema": str(path)}, [ANSWER, "[1]"]) == [0.0, 1.0]
    path.write_text(json.dumps({"type": 12}))
    with pytest.raises(ConfigError, match=r"grpo.rewards.0: not a valid JSON Schema"):
        rewards.build([RewardSettings(type="json_schema", json_schema=str(path))])


def test_reference_rewards_read_the_rows_answer():
    completions = [f"  {ANSWER}\n", ANSWER.replace("Lagos", "Abuja"), f"Sure: {ANSWER.upper()}"]
    assert score({"type": "exact"}, completions) == [1.0, 0.0, 0.0]
    assert score({"type": "contains"}, completions) == [1.0, 0.0, 1.0]
    # Conversational completions (a list with the assistant's message) are scored by their content.
    assert score({"type": "exact"}, [[{"role": "assistant", "content": ANSWER}]]) == [1.0]


def test_regex_and_length():
    assert score({"type": "regex", "pattern": r"^\{.*\}$"}, [ANSWER, f"x {ANSWER}"]) == [1.0, 0.0]
    # Minus the share by which an answer is longer than the limit: the reference's length, or max_chars.
    assert score({"type": "length"}, [ANSWER, ANSWER + "x" * len(ANSWER)]) == [0.0, -1.0]
    assert score({"type": "length", "max_chars": 10}, ["a" * 5, "a" * 15]) == [0.0, -0.5]


def test_functions_are_named_as_trl_logs_them():
    functions, weights = rewards.build([RewardSettings(type="exact", weight=2), RewardSettings(type="json_valid"),
                                        RewardSettings(type="regex", pattern="a"), RewardSettings(type="regex", pattern="b")])
    assert [f.__name__ for f in functions] == ["exact", "json_valid", "regex_2", "regex_3"]
    assert weights == [2, 1.0, 1.0, 1.0]


def test_a_user_function_runs_only_when_code_is_allowed(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text("def short(completions, **kwargs):\n    return [len(c) < 5 for c in completions]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ValueError, match="set grpo.allow_code: true"):
        GrpoSettings(rewards=[{"type": "python", "function": "my_rewards:short"}])
    settings = GrpoSettings(allow_code=True, rewards=[{"type": "python", "function": "my_rewards:short"}])
    functions, _ = rewards.build(settings.rewards)
    assert functions[0](prompts=["p", "p"], completions=["ok", "too long"], answer=["a", "a"]) == [1.0, 0.0]
    with pytest.raises(ConfigError, match="grpo.rewards.0.function 'my_rewards:missing' cannot be loaded"):
        rewards.build([RewardSettings(type="python", function="my_rewards:missing")])
