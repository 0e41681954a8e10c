"""Write the sample datasets under data/: a chat SFT set and a sentiment classification set.

Run: .venv/bin/python scripts/make_sample_data.py [--out data]
Everything is generated from templates with a fixed seed, so the files are identical on every run.

data/sft/{train,valid}.jsonl: a "units and facts assistant" in chat `messages` format. Every reply
has the same distinctive shape, `Answer: <value>. (<short reason>)`, so a small instruct model
(SmolLM2-135M-Instruct) visibly picks it up after a few minutes of CPU training. Validation prompts
and the demo prompts in data/sft/prompts.txt never occur in train.
data/cls/{train,valid}.jsonl: short movie/product reviews with labels "negative"/"positive".
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ortft.fsutil import write_text_atomic  # noqa: E402

SEED = 20240611
SFT_TRAIN_SIZE = 400
SFT_VALID_SIZE = 50
CLS_TRAIN_SIZE = 200
CLS_VALID_SIZE = 40
SYSTEM_MESSAGE = "You are a concise units and facts assistant."
SYSTEM_MESSAGE_SHARE = 0.25

CAPITALS = {
    "France": "Paris", "Italy": "Rome", "Spain": "Madrid", "Germany": "Berlin", "Portugal": "Lisbon",
    "Japan": "Tokyo", "Canada": "Ottawa", "Australia": "Canberra", "Egypt": "Cairo", "Kenya": "Nairobi",
    "Brazil": "Brasilia", "Argentina": "Buenos Aires", "Peru": "Lima", "Chile": "Santiago",
    "Norway": "Oslo", "Sweden": "Stockholm", "Finland": "Helsinki", "Denmark": "Copenhagen",
    "Poland": "Warsaw", "Austria": "Vienna", "Greece": "Athens", "Ireland": "Dublin",
    "Netherlands": "Amsterdam", "Belgium": "Brussels", "Switzerland": "Bern", "Russia": "Moscow",
    "China": "Beijing", "India": "New Delhi", "Thailand": "Bangkok", "Vietnam": "Hanoi",
    "South Korea": "Seoul", "Mexico": "Mexico City", "Cuba": "Havana", "Turkey": "Ankara",
    "Morocco": "Rabat", "Nigeria": "Abuja", "Hungary": "Budapest", "Czechia": "Prague",
    "Iceland": "Reykjavik", "New Zealand": "Wellington",
}

OPPOSITES = {
    "hot": "cold", "big": "small", "fast": "slow", "early": "late", "light": "dark", "happy": "sad",
    "open": "closed", "full": "empty", "high": "low", "strong": "weak", "rich": "poor", "wet": "dry",
    "young": "old", "hard": "soft", "loud": "quiet", "long": "short", "thick": "thin", "clean": "dirty",
    "cheap": "expensive", "heavy": "light", "near": "far", "up": "down", "inside": "outside",
    "true": "false", "win": "lose", "begin": "end", "buy": "sell", "push": "pull", "friend": "enemy",
    "day": "night", "north": "south", "east": "west", "above": "below", "always": "never",
    "accept": "refuse", "arrive": "leave", "brave": "cowardly", "sharp": "blunt", "wide": "narrow",
    "deep": "shallow",
}

PLURALS = {
    "mouse": ("mice", "irregular plural"), "child": ("children", "irregular plural"),
    "foot": ("feet", "irregular plural"), "tooth": ("teeth", "irregular plural"),
    "goose": ("geese", "irregular plural"), "man": ("men", "irregular plural"),
    "woman": ("women", "irregular plural"), "person": ("people", "irregular plural"),
    "ox": ("oxen", "irregular plural"), "sheep": ("sheep", "same in the plural"),
    "fish": ("fish", "same in the plural"), "deer": ("deer", "same in the plural"),
    "box": ("boxes", "add -es after x"), "bus": ("buses", "add -es after s"),
    "church": ("churches", "add -es after ch"), "dish": ("dishes", "add -es after sh"),
    "fox": ("foxes", "add -es after x"), "glass": ("glasses", "add -es after s"),
    "city": ("cities", "consonant + y becomes -ies"), "baby": ("babies", "consonant + y becomes -ies"),
    "party": ("parties", "consonant + y becomes -ies"), "story": ("stories", "consonant + y becomes -ies"),
    "knife": ("knives", "-fe becomes -ves"), "wife": ("wives", "-fe becomes -ves"),
    "leaf": ("leaves", "-f becomes -ves"), "wolf": ("wolves", "-f becomes -ves"),
    "cat": ("cats", "add -s"), "dog": ("dogs", "add -s"), "book": ("books", "add -s"),
    "tree": ("trees", "add -s"), "house": ("houses", "add -s"), "car": ("cars", "add -s"),
    "key": ("keys", "vowel + y takes -s"), "day": ("days", "vowel + y takes -s"),
    "potato": ("potatoes", "add -es after o"), "tomato": ("tomatoes", "add -es after o"),
    "hero": ("heroes", "add -es after o"), "cactus": ("cacti", "Latin plural"),
    "crisis": ("crises", "-is becomes -es"), "phenomenon": ("phenomena", "Greek plural"),
}

# (from unit, to unit, factor, plural of from, plural of to, symbol of to)
CONVERSIONS = [
    ("kilometer", "meter", 1000, "kilometers", "meters", "m"),
    ("meter", "centimeter", 100, "meters", "centimeters", "cm"),
    ("kilogram", "gram", 1000, "kilograms", "grams", "g"),
    ("liter", "milliliter", 1000, "liters", "milliliters", "ml"),
    ("hour", "minute", 60, "hours", "minutes", "min"),
    ("minute", "second", 60, "minutes", "seconds", "s"),
    ("day", "hour", 24, "days", "hours", "h"),
    ("week", "day", 7, "weeks", "days", "days"),
    ("foot", "inch", 12, "feet", "inches", "in"),
    ("dozen", "item", 12, "dozen", "items", "items"),
]

CAPITAL_PROMPTS = [
    "What is the capital of {country}?",
    "Which city is the capital of {country}?",
    "Name the capital city of {country}.",
    "{country}'s capital is which city?",
]
OPPOSITE_PROMPTS = [
    "What is the opposite of {word}?",
    "Give the antonym of \"{word}\".",
    "What word means the opposite of {word}?",
]
PLURAL_PROMPTS = [
    "What is the plural of {word}?",
    "Give the plural form of \"{word}\".",
    "One {word}, two ...?",
]
CONVERSION_PROMPTS = [
    "Convert {amount} {from_units} to {to_units}.",
    "How many {to_units} are in {amount} {from_units}?",
    "{amount} {from_units} is how many {to_units}?",
]
NAMES = ["Tom", "Ana", "Leo", "Mia", "Sam", "Zoe", "Raj", "Eva", "Ben", "Ida", "Kai", "Noa"]
THINGS = ["apples", "pencils", "stickers", "marbles", "books", "cookies", "stamps", "coins"]


def capital_items(rng: random.Random) -> list[tuple[str, str]]:
    items = []
    for country, capital in CAPITALS.items():
        for template in CAPITAL_PROMPTS:
            items.append((template.format(country=country), f"Answer: {capital}. (capital of {country})"))
    return items


def opposite_items(rng: random.Random) -> list[tuple[str, str]]:
    items = []
    for word, opposite in OPPOSITES.items():
        for template in OPPOSITE_PROMPTS:
            items.append((template.format(word=word), f"Answer: {opposite}. (antonym of {word})"))
    return items


def plural_items(rng: random.Random) -> list[tuple[str, str]]:
    items = []
    for word, (plural, rule) in PLURALS.items():
        for template in PLURAL_PROMPTS:
            items.append((template.format(word=word), f"Answer: {plural}. ({rule})"))
    return items


def conversion_items(rng: random.Random, count: int) -> list[tuple[str, str]]:
    items = []
    for _ in range(count):
        from_unit, _to_unit, factor, from_units, to_units, symbol = rng.choice(CONVERSIONS)
        amount = rng.randint(2, 12)
        prompt = rng.choice(CONVERSION_PROMPTS).format(amount=amount, from_units=from_units, to_units=to_units)
        items.append((prompt, f"Answer: {amount * factor} {symbol}. (1 {from_unit} = {factor} {symbol})"))
    return items


def arithmetic_items(rng: random.Random, count: int) -> list[tuple[str, str]]:
    items = []
    for _ in range(count):
        name, thing = rng.choice(NAMES), rng.choice(THINGS)
        kind = rng.choice(["add", "subtract", "multiply"])
        if kind == "add":
            a, b = rng.randint(2, 30), rng.randint(2, 30)
            prompt = f"{name} has {a} {thing} and gets {b} more. How many {thing} does {name} have now?"
            answer = f"Answer: {a + b} {thing}. ({a} + {b} = {a + b})"
        elif kind == "subtract":
            a = rng.randint(10, 40)
            b = rng.randint(1, a - 1)
            prompt = f"{name} had {a} {thing} and gave away {b}. How many {thing} are left?"
            answer = f"Answer: {a - b} {thing}. ({a} - {b} = {a - b})"
        else:
            a, b = rng.randint(2, 9), rng.randint(2, 9)
            prompt = f"{name} buys {a} bags with {b} {thing} in each. How many {thing} is that?"
            answer = f"Answer: {a * b} {thing}. ({a} x {b} = {a * b})"
        items.append((prompt, answer))
    return items


def unique_by_prompt(items: list[tuple[str, str]]) -> list[tuple[str, str]]:
    seen: set[str] = set()
    unique = []
    for prompt, answer in items:
        if prompt not in seen:
            seen.add(prompt)
            unique.append((prompt, answer))
    return unique


def as_chat(prompt: str, answer: str, with_system: bool) -> dict:
    messages = [{"role": "system", "content": SYSTEM_MESSAGE}] if with_system else []
    messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
    return {"messages": messages}


def make_sft(rng: random.Random) -> tuple[list[dict], list[dict], list[str]]:
    """Train and valid chats and demo prompts; no prompt text is shared between the three."""
    pool = unique_by_prompt(
        capital_items(rng) + opposite_items(rng) + plural_items(rng)
        + conversion_items(rng, 150) + arithmetic_items(rng, 150)
    )
    rng.shuffle(pool)
    # Demo prompts: one arithmetic problem, one conversion, one capital, one plural, all held out.
    demo: list[tuple[str, str]] = []
    for marker in (" more. How many", "Convert ", "capital of", "plural of"):
        pick = next(item for item in pool if marker in item[0] and item not in demo)
        demo.append(pick)
    rest = [item for item in pool if item not in demo]
    valid_items = rest[:SFT_VALID_SIZE]
    train_items = rest[SFT_VALID_SIZE : SFT_VALID_SIZE + SFT_TRAIN_SIZE]
    if len(train_items) < SFT_TRAIN_SIZE:
        raise SystemExit(f"the templates gave only {len(rest)} distinct prompts")
    train = [as_chat(p, a, rng.random() < SYSTEM_MESSAGE_SHARE) for p, a in train_items]
    valid = [as_chat(p, a, False) for p, a in valid_items]
    return train, valid, [prompt for prompt, _ in demo]


POSITIVE_WORDS = ["wonderful", "great", "delightful", "excellent", "charming", "superb", "lovely", "brilliant", "fantastic", "enjoyable"]
NEGATIVE_WORDS = ["terrible", "boring", "awful", "dull", "disappointing", "poor", "dreadful", "annoying", "bland", "mediocre"]
SUBJECTS = ["movie", "book", "phone", "meal", "hotel", "concert", "game", "camera", "show", "service"]
REVIEW_TEMPLATES = [
    "The {subject} was {word}.",
    "What a {word} {subject}!",
    "I found the {subject} {word} from start to finish.",
    "Honestly, this {subject} is {word}.",
    "A {word} {subject}, {tail}.",
]
POSITIVE_TAILS = ["I would gladly recommend it", "worth every penny", "I will be back"]
NEGATIVE_TAILS = ["I would not recommend it", "a waste of money", "never again"]


def make_cls(rng: random.Random) -> tuple[list[dict], list[dict]]:
    texts: dict[str, str] = {}
    for label, words, tails in (("positive", POSITIVE_WORDS, POSITIVE_TAILS), ("negative", NEGATIVE_WORDS, NEGATIVE_TAILS)):
        for word in words:
            for subject in SUBJECTS:
                for template in rng.sample(REVIEW_TEMPLATES, 2):
                    texts[template.format(subject=subject, word=word, tail=rng.choice(tails))] = label
    items = sorted(texts.items())
    rng.shuffle(items)
    records = [{"text": text, "label": label} for text, label in items]
    return records[CLS_VALID_SIZE : CLS_VALID_SIZE + CLS_TRAIN_SIZE], records[:CLS_VALID_SIZE]


def to_jsonl(records: list[dict]) -> str:
    return "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "data")
    args = parser.parse_args(argv)
    rng = random.Random(SEED)
    train, valid, demo_prompts = make_sft(rng)
    write_text_atomic(args.out / "sft" / "train.jsonl", to_jsonl(train))
    write_text_atomic(args.out / "sft" / "valid.jsonl", to_jsonl(valid))
    write_text_atomic(args.out / "sft" / "prompts.txt", "".join(prompt + "\n" for prompt in demo_prompts))
    cls_train, cls_valid = make_cls(rng)
    write_text_atomic(args.out / "cls" / "train.jsonl", to_jsonl(cls_train))
    write_text_atomic(args.out / "cls" / "valid.jsonl", to_jsonl(cls_valid))
    print(f"sft: {len(train)} train, {len(valid)} valid, {len(demo_prompts)} demo prompts; "
          f"cls: {len(cls_train)} train, {len(cls_valid)} valid -> {args.out}")


if __name__ == "__main__":
    main()
