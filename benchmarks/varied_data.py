"""Generated instruction data whose row lengths vary the way public instruction data (alpaca) does, for the
throughput benchmarks: the quickstart's rows (examples/data/extract_*.jsonl) are all 72-83 tokens long, so their
batches are hardly padded and say nothing about padding.

    python benchmarks/varied_data.py [ROWS]   # token lengths of the first ROWS (10,000) rows with SmolLM2

Every row is one of four tasks, drawn uniformly, whose answer is fully determined by its input (so a held-out
loss measures learning, not guessing):
- upper: "Copy this text in upper case." over N words (N >= 2);
- reverse: "Reverse the order of these words." over N words (N >= 2);
- numbers: "List the numbers in this text, in order, separated by commas." over N numbers (100-999, N >= 2)
  and 3N words, in random order;
- extract: "Extract the person's name and the city from the sentence. Answer with JSON only." over one fact
  ("Maria was born in Prague.", 4 phrasings) after the first of N filler words (N >= 0).
Words come from a 62-word vocabulary, names from 20 and cities from 30, each of them one SmolLM2 token (and
each word two in upper case), so that a row's length in tokens follows from N: FIXED + PER_UNIT * N beyond
the chat template's 32 tokens (its default system prompt included), to within a token.

The length distribution, exactly: each row draws its task, then a content budget X (its tokens beyond the
template's 32) from LogNormal(mu=4.35, sigma=0.9), that is median e^4.35 = 77, drawn again while X is below
the task's shortest row (FIXED + PER_UNIT * its smallest N: 14 to 41 tokens) or above MAX_TOKENS - 32 = 268;
N is then the one that brings the row nearest X tokens without passing MAX_TOKENS = 300. Rows come from one
random.Random(seed) stream in order; a user turn seen before is skipped.

Measured with smollm2-135m-instruct's tokenizer and chat template ([user, assistant]; run this file), whole
rows in tokens:
- the first 10,000 training rows: mean 130.6, median 116, p90 224, min 46, max 299;
- the first 1,250 held-out rows: mean 127.7, median 110, p90 214, min 46, max 298;
- the quickstart's 400 rows, for comparison: mean 77.3, median 77, max 83.
Every row at the cap is 296-300 tokens (4,000 rows built at X = 268).

Preference pairs are the same rows (preference_pairs(count, seed) and alpaca_rows(count, seed) share their
prompts): prompt = the user turn, chosen = the answer, rejected = a plausible wrong answer of a different
length: upper case stopped part way (or not started), a word, a number or the city left out. prompt + rejected
is 1 to 85 tokens shorter than prompt + chosen (median 5).

Held-out rows are the rows of the stream whose user turn's crc32 is divisible by 8 (about 1 in 8), training
rows the others: the two never share a prompt, whatever the counts, and both keep the same distribution.
"""

from __future__ import annotations

import json
import random
import statistics
import sys
import zlib

MU, SIGMA = 4.35, 0.9
TEMPLATE_TOKENS = 32
MAX_TOKENS = 300
HELD_OUT_EVERY = 8

WORDS = ("apple stone green orange purple forest winter bread water door city farm tree leaf root seed field storm rain "
         "snow wind light dream story song wall gate road path train boat ship clock watch minute hour week month year "
         "writer mother child small bright dark warm cold soft sharp quick slow early late simple reads writes opens "
         "blue white black wild button").split()
NAMES = "Maria Omar Sofia Ivan Carlos Pedro Mei Anton Rosa Felix Diego Hugo Clara Marco Lucas Ada Bruno Iris Oscar Vera".split()
CITIES = ("Prague Oslo Havana Lima Cairo Lisbon Madrid Vienna Dublin Seoul Nairobi Manila Athens Berlin Paris Rome Tokyo "
          "Sydney Toronto Boston Chicago Denver Austin Warsaw Zurich Geneva Munich Milan Naples Helsinki").split()
# each six tokens long
FACTS = ("{name} was born in {city}.", "{name} teaches music in {city}.", "{name} now lives in {city}.",
         "{name} grew up in {city}.")
INSTRUCTIONS = {
    "upper": "Copy this text in upper case.",
    "reverse": "Reverse the order of these words.",
    "numbers": "List the numbers in this text, in order, separated by commas.",
    "extract": "Extract the person's name and the city from the sentence. Answer with JSON only.",
}
# A row's tokens beyond the template with N units: FIXED + PER_UNIT * N (measured with SmolLM2's tokenizer, to
# within a token; a number unit is three words and the number, in the text and in the answer).
FIXED = {"upper": 9, "reverse": 10, "numbers": 14, "extract": 41}
PER_UNIT = {"upper": 3, "reverse": 2, "numbers": 12, "extract": 1}
SHORTEST = {"upper": 2, "reverse": 2, "numbers": 2, "extract": 0}


def budget(rng: random.Random, task: str) -> int:
    """The row's content tokens: log-normal, inside what the task can build and MAX_TOKENS."""
    shortest = FIXED[task] + PER_UNIT[task] * SHORTEST[task]
    while True:
        x = rng.lognormvariate(MU, SIGMA)
        if shortest <= x <= MAX_TOKENS - TEMPLATE_TOKENS:
            return round(x)


def words(rng: random.Random, n: int) -> list[str]:
    return [rng.choice(WORDS) for _ in range(n)]


def example(rng: random.Random) -> tuple[str, str, str, str]:
    """One row: instruction, input, the answer, a wrong answer of a different length."""
    task = rng.choice(tuple(INSTRUCTIONS))
    # the N nearest the budget that stays within MAX_TOKENS
    n = min(round((budget(rng, task) - FIXED[task]) / PER_UNIT[task]),
            (MAX_TOKENS - TEMPLATE_TOKENS - FIXED[task]) // PER_UNIT[task])
    n = max(SHORTEST[task], n)
    if task == "upper":
        text = words(rng, n)
        stop = rng.randrange(n)  # the wrong answer stops upper-casing here
        return (INSTRUCTIONS[task], " ".join(text), " ".join(text).upper(),
                " ".join(w.upper() for w in text[:stop]) + (" " if stop else "") + " ".join(text[stop:]))
    if task == "reverse":
        text = words(rng, n)
        answer = text[::-1]
        dropped = answer[:(k := rng.randrange(n))] + answer[k + 1:]
        return INSTRUCTIONS[task], " ".join(text), " ".join(answer), " ".join(dropped)
    if task == "numbers":
        # three words to a number, so that the row's length follows from N
        units = words(rng, 3 * n) + [str(rng.randrange(100, 1000)) for _ in range(n)]
        rng.shuffle(units)
        numbers = [u for u in units if u.isdigit()]
        dropped = numbers[:(k := rng.randrange(len(numbers)))] + numbers[k + 1:]
        return INSTRUCTIONS[task], " ".join(units), ", ".join(numbers), ", ".join(dropped)
    name, city = rng.choice(NAMES), rng.choice(CITIES)
    filler = words(rng, n)
    at = rng.randint(min(n, 1), n)  # after a filler word where there is one: a name that starts the text may take two tokens
    text = " ".join([*filler[:at], rng.choice(FACTS).format(name=name, city=city), *filler[at:]])
    return (INSTRUCTIONS[task], text, json.dumps({"name": name, "city": city}),
            json.dumps({"name": name}))


def user_turn(instruction: str, text: str) -> str:
    # The user turn tuneforge's data-prep (and sft_throughput.as_prompt_completion) builds from an alpaca row.
    return f"{instruction}\n\n{text}"


def examples(count: int, seed: int, held_out: bool):
    """The first `count` training (or held-out) examples of the seed's stream, each user turn once."""
    rng, seen, found = random.Random(seed), set(), 0
    while found < count:
        instruction, text, answer, wrong = example(rng)
        prompt = user_turn(instruction, text)
        if prompt in seen or (zlib.crc32(prompt.encode()) % HELD_OUT_EVERY == 0) != held_out:
            continue
        seen.add(prompt)
        found += 1
        yield instruction, text, answer, wrong


def alpaca_rows(count: int, seed: int = 0, held_out: bool = False) -> list[dict]:
    """Rows {instruction, input, output}."""
    return [{"instruction": i, "input": t, "output": a} for i, t, a, _ in examples(count, seed, held_out)]


def preference_pairs(count: int, seed: int = 0, held_out: bool = False) -> list[dict]:
    """Pairs {prompt, chosen, rejected}: the rows of alpaca_rows(count, seed, held_out) with a wrong answer each."""
    return [{"prompt": user_turn(i, t), "chosen": a, "rejected": w} for i, t, a, w in examples(count, seed, held_out)]


def token_lengths(tokenizer, prompts: list[str], answers: list[str]) -> list[int]:
    """Tokens of [user, assistant] after the chat template."""
    return [len(tokenizer.apply_chat_template([{"role": "user", "content": p}, {"role": "assistant", "content": a}],
                                              tokenize=True, return_dict=True)["input_ids"]) for p, a in zip(prompts, answers, strict=True)]


def describe(lengths: list[int]) -> str:
    ordered = sorted(lengths)
    return (f"mean {statistics.mean(ordered):.1f}, median {statistics.median(ordered):g}, "
            f"p90 {ordered[int(0.9 * len(ordered))]}, min {ordered[0]}, max {ordered[-1]}")


def main() -> None:
    """Token lengths of the first rows (default 10,000) with smollm2-135m-instruct's chat template."""
    from sft_throughput import model_path
    from transformers import AutoTokenizer

    count = int(sys.argv[1]) if len(sys.argv) > 1 else 10_000
    tokenizer = AutoTokenizer.from_pretrained(model_path("smollm2-135m-instruct"))
    for held_out in (False, True):
        pairs = preference_pairs(count if not held_out else count // 8, held_out=held_out)
        prompts = [p["prompt"] for p in pairs]
        chosen = token_lengths(tokenizer, prompts, [p["chosen"] for p in pairs])
        rejected = token_lengths(tokenizer, prompts, [p["rejected"] for p in pairs])
        print(f"{'held-out' if held_out else 'training'} rows ({len(pairs)}): {describe(chosen)}")
        print(f"  chosen - rejected: {describe([c - r for c, r in zip(chosen, rejected, strict=True)])}")


if __name__ == "__main__":
    main()
