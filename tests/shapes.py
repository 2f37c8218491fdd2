"""Small samples in the shapes of public datasets, written from their published schemas (column names and nesting as
the dataset cards give them; the values are made up, nothing is downloaded). tests/test_public_shapes.py reads each
one with data-prep and no `format:` key."""

TURNS = [{"role": "user", "content": "Name a prime."}, {"role": "assistant", "content": "Seven."}]


def _n(i: int) -> str:
    return ["one", "two", "three", "four", "five", "six"][i]


SHAPES = {
    # tatsu-lab/alpaca, yahma/alpaca-cleaned, vicgalle/alpaca-gpt4 (alpaca-gpt4 also ships a rendered `text` column)
    "alpaca": ("alpaca", [{"instruction": f"Spell the number {_n(i)}.", "input": "", "output": _n(i),
                           "text": f"### Instruction: Spell {_n(i)}"} for i in range(4)]),
    # databricks/databricks-dolly-15k
    "dolly": ("alpaca", [{"instruction": f"Summarise note {i}.", "context": f"Note {i} is short.",
                          "response": f"Note {i}: short.", "category": "summarization"} for i in range(4)]),
    # ShareGPT exports and Open-Orca/SlimOrca (`weight` on each turn, a system turn first)
    "slimorca": ("sharegpt", [{"conversations": [
        {"from": "system", "value": "You are helpful.", "weight": None},
        {"from": "human", "value": f"Add {i} and 1.", "weight": 0.0},
        {"from": "gpt", "value": f"{i + 1}", "weight": 1.0}]} for i in range(4)]),
    # teknium/OpenHermes-2.5: conversations plus many metadata columns
    "openhermes": ("sharegpt", [{"conversations": [{"from": "human", "value": f"Capital number {i}?"},
                                                   {"from": "gpt", "value": f"City {i}."}],
                                 "system_prompt": "", "source": "airoboros2.2", "category": "trivia", "id": str(i),
                                 "model_name": None, "skip_prompt_formatting": False, "views": None, "hash": None}
                                for i in range(4)]),
    # OpenAI chat fine-tuning format: content parts, a developer turn
    "openai-messages": ("messages", [{"messages": [
        {"role": "developer", "content": "Answer in one word."},
        {"role": "user", "content": [{"type": "text", "text": f"Colour number {i}?"}]},
        {"role": "assistant", "content": f"colour{i}"}]} for i in range(4)]),
    # HuggingFaceH4/ultrafeedback_binarized: prompt, chosen and rejected conversations, the chosen one again as
    # `messages`, scores and an id
    "ultrafeedback-binarized": ("preference", [{
        "prompt": f"Question {i}?", "prompt_id": f"id{i}",
        "chosen": [{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": f"Good answer {i}."}],
        "rejected": [{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": f"Bad {i}."}],
        "messages": [{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": f"Good answer {i}."}],
        "score_chosen": 8.0, "score_rejected": 3.0} for i in range(4)]),
    # trl-lib/ultrafeedback_binarized: the two conversations only; the turns they share are the prompt
    "trl-lib-ultrafeedback": ("preference", [{
        "chosen": [{"role": "user", "content": f"Fact {i}?"}, {"role": "assistant", "content": f"True fact {i}."}],
        "rejected": [{"role": "user", "content": f"Fact {i}?"}, {"role": "assistant", "content": f"Made up {i}."}],
        "score_chosen": 9.0, "score_rejected": 2.0} for i in range(4)]),
    # Anthropic/hh-rlhf: each side one transcript
    "hh-rlhf": ("preference", [{
        "chosen": f"\n\nHuman: Hello {i}\n\nAssistant: Hi there {i}.\n\nHuman: Help me.\n\nAssistant: Sure, {i}.",
        "rejected": f"\n\nHuman: Hello {i}\n\nAssistant: Hi there {i}.\n\nHuman: Help me.\n\nAssistant: No."}
        for i in range(4)]),
    # argilla/dpo-mix-7k
    "argilla-dpo-mix": ("preference", [{
        "dataset": "capybara",
        "chosen": [{"role": "user", "content": f"Task {i}"}, {"role": "assistant", "content": f"Done well {i}."}],
        "rejected": [{"role": "user", "content": f"Task {i}"}, {"role": "assistant", "content": f"Done badly {i}."}],
        "chosen_rating": 5.0, "rejected_rating": 2.0, "chosen_model": "a", "rejected_model": "b"} for i in range(4)]),
    # argilla/distilabel-intel-orca-dpo-pairs: the prompt in `input`, a system prompt, strings on both sides
    "argilla-orca-pairs": ("preference", [{
        "system": "You are an AI assistant.", "input": f"Translate word {i}.", "chosen": f"Word {i}, translated.",
        "rejected": f"I cannot {i}.", "generations": ["a", "b"], "order": ["chosen", "rejected"],
        "labelling_model": "gpt-4", "status": "tie" if i == 0 else "ok"} for i in range(4)]),
    # trl-lib/kto-mix-14k style: unpaired rows with a desirability label
    "kto": ("unpaired", [{"prompt": f"Greet {i}.", "completion": f"Hello {i}!" if i % 2 else "Go away.",
                          "label": bool(i % 2)} for i in range(4)]),
    # prompt/completion (trl's standard language-modeling-free format)
    "prompt-completion": ("prompt_completion", [{"prompt": f"Double {i}.", "completion": f"{2 * i}"} for i in range(4)]),
    # raw text (pre-training style)
    "text": ("text", [{"text": f"Paragraph number {i} about the sea."} for i in range(4)]),
}
