"""Unit tests of the data package: formats and loss masks, with a tokenizer built on the spot (no MLflow, no model)."""

import pytest

from tuneforge.chat_templates import CHATML
from tuneforge.data import prepared
from tuneforge.data.formats import Row, RowError, detect_format, eval_task, normalize
from tuneforge.data.render import Renderer, _mask, tokenize_with_masks
from tuneforge.errors import DataError
from tuneforge.tiny import _bpe_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return _bpe_tokenizer()[0]


@pytest.mark.parametrize(("keys", "expected"), [
    ({"instruction", "input", "output"}, "alpaca"),
    ({"instruction", "context", "response"}, "alpaca"),
    ({"messages"}, "messages"),
    ({"conversations"}, "sharegpt"),
    ({"prompt", "completion"}, "prompt_completion"),
    ({"text"}, "text"),
    ({"prompt", "chosen", "rejected"}, "preference"),
])
def test_formats_are_detected_from_the_keys(keys, expected):
    assert detect_format(keys, "f.jsonl") == expected


def test_unknown_keys_name_what_was_found_and_considered():
    with pytest.raises(DataError, match="f.jsonl: unknown row format; keys found: a, b.*preference.*alpaca"):
        detect_format({"a", "b"}, "f.jsonl")


@pytest.mark.parametrize(("record", "fmt", "messages"), [
    ({"instruction": "Do", "input": "this", "output": "done"}, "alpaca",
     [{"role": "user", "content": "Do\n\nthis"}, {"role": "assistant", "content": "done"}]),
    ({"instruction": "Do", "context": "", "response": "done", "system": "Be brief."}, "alpaca",
     [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Do"}, {"role": "assistant", "content": "done"}]),
    ({"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}, "sharegpt",
     [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}, {"role": "assistant", "content": "Yo"}]},
     "messages", [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]),
    ({"prompt": "Q", "completion": "A"}, "prompt_completion",
     [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]),
])
def test_rows_normalise_to_messages(record, fmt, messages):
    row = normalize(record, fmt, "f.jsonl:1")
    assert row.kind == "sft" and row.messages == messages and row.where == "f.jsonl:1"


def test_preference_rows_take_the_prompt_from_shared_turns():
    turns = [{"role": "user", "content": "Q"}]
    row = normalize({"chosen": [*turns, {"role": "assistant", "content": "good"}],
                     "rejected": [*turns, {"role": "assistant", "content": "bad"}]}, "preference", "f:1")
    assert (row.kind, row.messages, row.chosen, row.rejected) == ("preference", turns, "good", "bad")


@pytest.mark.parametrize(("record", "fmt", "reason"), [
    ({"messages": [{"role": "user", "content": "Hi"}]}, "messages", "no assistant turn"),
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "tool_calls": [{"id": "1"}]}]}, "messages",
     "tool calls and tool results are not supported"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, "messages",
     "content parts of type image_url are not supported"),
    ({"messages": [{"role": "robot", "content": "Hi"}]}, "messages", "messages[0].role: 'robot'"),
    ({"prompt": "Q", "chosen": "same", "rejected": "same"}, "preference", "identical"),
    (["not", "an", "object"], "text", "expected an object"),
    # a ShareGPT export that marks an answer not to train on: refused, not trained on without a word
    ({"conversations": [{"from": "human", "value": "Hi", "weight": 0}, {"from": "gpt", "value": "Bad", "weight": 0},
                        {"from": "human", "value": "Again"}, {"from": "gpt", "value": "Good", "weight": 1}]},
     "sharegpt", "conversations[1].weight is 0"),
])
def test_bad_rows_say_why(record, fmt, reason):
    with pytest.raises(RowError, match=reason.replace("[", r"\[").replace("]", r"\]")):
        normalize(record, fmt, "f:1")


def test_eval_tasks_default_to_exact_match_and_refuse_unknown_metrics():
    assert eval_task({"prompt": "Q", "expected": "A"})["metric"] == "exact_match"
    with pytest.raises(RowError, match="metric 'bleu'"):
        eval_task({"prompt": "Q", "expected": "A", "metric": "bleu"})


@pytest.mark.parametrize(("offsets", "spans", "mask"), [
    ([(0, 2), (2, 4), (4, 6)], [(2, 6)], [0, 1, 1]),
    ([(0, 2), (2, 4), (4, 6), (6, 8)], [(0, 2), (4, 6)], [1, 0, 1, 0]),
    ([(0, 2), (2, 4), (4, 4)], [(0, 4)], [1, 1, 0]),  # an empty token is never learned
    ([(0, 3), (3, 6)], [(2, 6)], [0, 1]),  # a token straddling the span's start is not inside it
    ([(0, 2), (2, 4)], [(2, 4), (0, 3)], [1, 1]),  # unsorted spans
])
def test_masks_cover_the_tokens_wholly_inside_a_span(offsets, spans, mask):
    assert _mask(offsets, spans) == mask


def test_assistant_turns_and_their_end_token_are_learned_and_nothing_else(tokenizer):
    renderer = Renderer(tokenizer, CHATML, system_prompt="Be brief.")
    row = Row("f:1", "sft", messages=[{"role": "user", "content": "Name?"}, {"role": "assistant", "content": "Ana"},
                                      {"role": "user", "content": "City?"}, {"role": "assistant", "content": "Lisbon"}])
    text, spans = renderer.sft(row)
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>")
    (ids,), (mask,) = tokenize_with_masks(tokenizer, [text], [spans])
    learned = tokenizer.decode([t for t, m in zip(ids, mask, strict=True) if m])
    assert learned == "Ana<|im_end|>\nLisbon<|im_end|>\n"
    assert "<|im_end|>" in renderer.stop_tokens


def test_raw_text_is_learned_whole_with_its_end_token(tokenizer):
    text, spans = Renderer(tokenizer, CHATML, None).sft(Row("f:1", "sft", text="plain words"))
    (ids,), (mask,) = tokenize_with_masks(tokenizer, [text], [spans])
    assert text == "plain words<|im_end|>" and all(mask)


def test_max_examples_scores_a_spread_of_the_held_out_rows_not_the_first():
    """An eval file sorted by label (IMDB's test split: the negatives, then the positives) is scored on both labels, the
    same rows every time; a file within the cap is scored whole."""
    picked = prepared.sample(400, 200, "rows")
    assert picked == prepared.sample(400, 200, "rows") and picked == sorted(set(picked)) and len(picked) == 200
    assert 80 <= sum(i < 200 for i in picked) <= 120
    assert prepared.sample(30, 200, "rows") == list(range(30))
