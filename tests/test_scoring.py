"""How generated answers are scored: the same function for evaluate and serve-check."""

import pytest

from tuneforge import scoring

EXPECTED = '{"name": "Ana", "city": "Lisbon"}'


@pytest.mark.parametrize("output", [
    EXPECTED,
    f"  {EXPECTED}\n",
    f"<think>\n\n</think>\n\n{EXPECTED}",  # Qwen3 fine-tuned on its own template: an empty reasoning block first
    f"<think>\nThe sentence names Ana, in Lisbon.\n</think>\n\n{EXPECTED}",
])
def test_an_answer_after_a_reasoning_block_scores_as_the_answer(output):
    assert scoring.score(output, EXPECTED) == {"exact_match": 1.0, "contains": 1.0, "rouge_l": 1.0}


def test_reasoning_cut_off_before_its_answer_scores_nothing_exact():
    found = scoring.score(f"<think>\nThe answer is {EXPECTED} or", EXPECTED)
    assert found["exact_match"] == 0.0 and found["rouge_l"] < 1.0


def test_task_score_takes_each_task_metric():
    tasks = [{"expected": "Paris", "metric": "exact_match"}, {"expected": "blue", "metric": "contains"}]
    metrics = scoring.task_metrics(["<think>\n\n</think>\n\nParis", "It is blue."], tasks)
    assert metrics["task_score"] == 1.0 and metrics["task_exact_match"] == 0.5
