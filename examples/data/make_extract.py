"""Generate the example task: extract a person's name and city from a sentence, answer as JSON.

A 135M model learns the format in minutes, and exact match on held-out names and cities (never seen in
training) shows whether it learned the task rather than the examples. Run: python make_extract.py
"""

import json
import random
from pathlib import Path

TRAIN_NAMES = [
    "Maria", "John", "Aisha", "Kenji", "Olga", "Pedro", "Fatima", "Lars", "Mei", "Tomas", "Ingrid", "Rahul",
    "Chloe", "Omar", "Sofia", "Diego", "Hana", "Lukas", "Amara", "Ivan", "Nadia", "Felix", "Leila", "Mateo",
    "Yuki", "Emil", "Zara", "Andre", "Priya", "Noah", "Elena", "Hugo", "Sara", "Kofi", "Lina", "Marco", "Anya",
    "Theo", "Rosa", "Farid"
]
TRAIN_CITIES = [
    "Lisbon", "Berlin", "Nairobi", "Osaka", "Warsaw", "Lima", "Cairo", "Oslo", "Shanghai", "Prague", "Bergen",
    "Mumbai", "Lyon", "Dubai", "Madrid", "Bogota", "Kyoto", "Vienna", "Lagos", "Kazan", "Tunis", "Zurich",
    "Tehran", "Quito", "Sapporo", "Malmo", "Accra", "Porto", "Delhi", "Boston", "Athens", "Geneva", "Seville",
    "Accra", "Dakar", "Milan", "Tallinn", "Leeds", "Havana", "Hanoi"
]
EVAL_NAMES = [
    "Greta", "Samir", "Ilse", "Bruno", "Keiko", "Dmitri", "Alma", "Tariq", "Joana", "Viktor", "Esme", "Rafael",
    "Nora", "Idris", "Paula"
]
EVAL_CITIES = [
    "Denver", "Riga", "Perth", "Krakow", "Manila", "Valencia", "Montreal", "Seoul", "Turin", "Cusco", "Bremen",
    "Ghent", "Lahore", "Nantes", "Tbilisi"
]

TEMPLATES = [
    "{name} moved to {city} last year to work as a {job}.",
    "After years abroad, {name} settled in {city}.",
    "{name} is a {job} who lives in {city}.",
    "In {city}, {name} opened a small bakery.",
    "Our new {job}, {name}, joins us from {city}.",
    "{name} grew up in {city} and still visits every summer.",
    "The {job} {name} gave a talk in {city} on Monday.",
    "Born and raised in {city}, {name} now teaches music.",
]
JOBS = ["nurse", "engineer", "teacher", "pilot", "chef", "designer", "doctor", "farmer", "writer", "lawyer"]
INSTRUCTION = "Extract the person's name and the city from the sentence. Answer with JSON only."


def example(rng, names, cities):
    name, city = rng.choice(names), rng.choice(cities)
    sentence = rng.choice(TEMPLATES).format(name=name, city=city, job=rng.choice(JOBS))
    answer = json.dumps({"name": name, "city": city})
    return name, city, sentence, answer


def misspell(rng, word):
    """The mistakes a small model makes when it copies a name: one letter dropped, doubled or changed."""
    i = rng.randrange(1, len(word))
    vowel = rng.choice([v for v in "aeiou" if v != word[i]])
    return rng.choice([word[:i] + word[i + 1 :], word[:i] + word[i] + word[i:], word[:i] + vowel + word[i + 1 :]])


def rejected(rng, name, city, names, cities):
    return rng.choice([
        json.dumps({"name": misspell(rng, name), "city": city}),
        json.dumps({"name": name, "city": misspell(rng, city)}),
        json.dumps({"name": city, "city": name}),
        f"The person is {name} and the city is {city}.",
    ])


def main():
    rng = random.Random(7)
    here = Path(__file__).parent
    with open(here / "extract_train.jsonl", "w") as f:
        for _ in range(400):
            _, _, sentence, answer = example(rng, TRAIN_NAMES, TRAIN_CITIES)
            f.write(json.dumps({"instruction": INSTRUCTION, "input": sentence, "output": answer}) + "\n")
    with open(here / "extract_preference.jsonl", "w") as f:
        for _ in range(200):
            name, city, sentence, answer = example(rng, TRAIN_NAMES, TRAIN_CITIES)
            prompt = f"{INSTRUCTION}\n\n{sentence}"
            bad = rejected(rng, name, city, TRAIN_NAMES, TRAIN_CITIES)
            f.write(json.dumps({"prompt": prompt, "chosen": answer, "rejected": bad}) + "\n")
    with open(here / "extract_eval.jsonl", "w") as f:
        for _ in range(40):
            _, _, sentence, answer = example(rng, EVAL_NAMES, EVAL_CITIES)
            f.write(json.dumps({"prompt": f"{INSTRUCTION}\n\n{sentence}", "expected": answer, "metric": "exact_match"}) + "\n")


if __name__ == "__main__":
    main()
