"""Write the sample named-entity data under data/ner/: people (PER), places (LOC) and organisations (ORG).

Run: .venv/bin/python scripts/make_ner_data.py [--out data]
Sentences come from our own templates filled with our own invented names, with a fixed seed, so the
files are identical on every run:
- data/ner/train.jsonl: 400 sentences as {"tokens": [...], "tags": [...]} (IOB2, CoNLL style);
- data/ner/valid.jsonl: 80 sentences as {"text": ..., "entities": [{"start", "end", "label"}]} (character spans);
- data/ner/sentences.jsonl: 6 unlabelled {"text": ...} lines for `ortft predict`.
Validation and prediction sentences use only held-out names: no person's first or last name, place or
organisation of them occurs in train.jsonl; the prediction sentences also use templates train never saw.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ortft.fsutil import write_text_atomic

SEED = 20250325
TRAIN_SIZE = 400
VALID_SIZE = 80
LABELS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG"]
WORD = re.compile(r"\w+|[^\w\s]")  # the words ortft/data_ner.py splits a text into
SLOT = re.compile(r"\{(PER|LOC|ORG)\}")

# Invented names; each pool is split into names for training and held-out names.
FIRST_NAMES = {
    "train": ["Amara", "Tobias", "Leena", "Marek", "Sunniva", "Idris", "Calla", "Bram", "Yusra", "Orrin", "Petra", "Kenji",
              "Odalys", "Fenna", "Ravi", "Solene", "Emeka", "Ilse", "Dorian", "Mirela", "Anselm", "Tove", "Hollis", "Zaira"],
    "held_out": ["Wilhelmina", "Quentin", "Nadira", "Bartholomew", "Ingrid", "Cosimo", "Leocadia", "Thaddeus", "Marisol", "Evander"],
}
LAST_NAMES = {
    "train": ["Okafor", "Lindqvist", "Brennan", "Halvorsen", "Castellano", "Mbeki", "Novak", "Ferreira", "Ashdown", "Kowalczyk",
              "Tanaka", "Ribeiro", "Fairweather", "Oyelaran", "Duchamp", "Varga", "Holloway", "Santangelo", "Petrov", "Abernathy"],
    "held_out": ["Grimsby", "Zelenka", "Moravec", "Achterberg", "Quintero", "Wolstenholme", "Iwasaki", "Delacroix-Bey"],
}
PLACES = {
    "train": ["Port Elwin", "Marrowdale", "Karsk", "Lindenfeld", "Cape Aurel", "Tessary", "Oskarby", "Vellmar", "North Quill",
              "Brackwater", "Saint Odran", "Halden Bay", "Riveneck", "Dunmore Heights", "Caldera Springs", "Ostrava Vale"],
    "held_out": ["Graymoor", "Lake Thessaly", "Pellinore", "Upper Wendell", "Zarandor", "Fennick Point"],
}
ORGANISATIONS = {
    "train": ["Bluefinch Labs", "Harrow Mutual", "Corvid Systems", "Tidewater Rail", "Quarry Lane Bank", "Northstar Textiles",
              "Ember and Vale", "Ostrich Software", "Saltmarsh Energy", "Kestrel Health", "Marlowe Press", "Granite Peak Foods"],
    "held_out": ["Juniper Dynamics", "Wrenfield Insurance", "Obsidian Freight", "Larkspur Media", "Thistle Robotics"],
}

TEMPLATES = [
    "{PER} flew from {LOC} to {LOC} on Monday.",
    "{PER} joined {ORG} as a senior engineer.",
    "The {ORG} office in {LOC} hired {PER} last spring.",
    "{PER} and {PER} met at the station in {LOC}.",
    "According to {PER}, {ORG} will open a lab in {LOC}.",
    "Shares of {ORG} rose after the news from {LOC}.",
    "{PER} was born in {LOC} and studied there.",
    "Yesterday {PER} signed a contract with {ORG}.",
    "{ORG} and {ORG} agreed to merge next year.",
    "The mayor of {LOC}, {PER}, opened the new bridge.",
    "Heavy rain closed the roads around {LOC} on Friday.",
    "{PER} leads the research team at {ORG}.",
    "Flights between {LOC} and {LOC} were cancelled.",
    "{ORG} moved its headquarters to {LOC}.",
    "Ask {PER} about the report before noon.",
    "The museum in {LOC} thanked {PER} for the gift.",
    "{PER} left {ORG} to start a bakery.",
    "Nobody expected the storm to last so long.",
    "The committee will meet again in March.",
    "In {LOC}, {ORG} employs almost two thousand people.",
]
HELD_OUT_TEMPLATES = [
    "{PER} took the night train to {LOC} with a colleague from {ORG}.",
    "Last week {ORG} named {PER} its new director.",
    "The festival in {LOC} drew visitors from {LOC}.",
    "{PER} thinks {ORG} should build the factory near {LOC}.",
    "A spokesperson for {ORG} said {PER} would speak in {LOC}.",
    "We walked along the river until it got dark.",
]


def person(rng: random.Random, split: str) -> str:
    return f"{rng.choice(FIRST_NAMES[split])} {rng.choice(LAST_NAMES[split])}" if rng.random() < 0.75 else rng.choice(FIRST_NAMES[split])


def fill(template: str, rng: random.Random, split: str) -> tuple[str, list[dict]]:
    """The sentence and its entities as character spans."""
    pools = {"PER": lambda: person(rng, split), "LOC": lambda: rng.choice(PLACES[split]), "ORG": lambda: rng.choice(ORGANISATIONS[split])}
    text, entities, position = "", [], 0
    for match in SLOT.finditer(template):
        text += template[position:match.start()]
        name = pools[match.group(1)]()
        entities.append({"start": len(text), "end": len(text) + len(name), "label": match.group(1)})
        text += name
        position = match.end()
    return text + template[position:], entities


def tokens_and_tags(text: str, entities: list[dict]) -> tuple[list[str], list[str]]:
    tokens, tags = [], []
    for match in WORD.finditer(text):
        inside = next((e for e in entities if e["start"] <= match.start() < e["end"]), None)
        tokens.append(match.group())
        if inside is None:
            tags.append("O")
        else:
            tags.append(("B-" if match.start() == inside["start"] else "I-") + inside["label"])
    return tokens, tags


def held_out_names() -> set[str]:
    names = set(FIRST_NAMES["held_out"]) | set(LAST_NAMES["held_out"]) | set(PLACES["held_out"]) | set(ORGANISATIONS["held_out"])
    return names | {word for name in names for word in WORD.findall(name) if len(word) > 3 and word[0].isupper()}


def build(rng: random.Random) -> dict[str, list[dict]]:
    train = []
    for index in range(TRAIN_SIZE):
        text, entities = fill(TEMPLATES[index % len(TEMPLATES)], rng, "train")
        tokens, tags = tokens_and_tags(text, entities)
        train.append({"tokens": tokens, "tags": tags})
    valid = [dict(zip(("text", "entities"), fill(rng.choice(TEMPLATES), rng, "held_out"))) for _ in range(VALID_SIZE)]
    sentences = [{"text": fill(template, rng, "held_out")[0]} for template in HELD_OUT_TEMPLATES]
    train_words = {token for record in train for token in record["tokens"]}
    leaked = sorted(word for word in held_out_names() if all(part in train_words for part in WORD.findall(word)))
    if leaked:
        raise SystemExit(f"held-out names occur in train: {leaked}")
    return {"train.jsonl": train, "valid.jsonl": valid, "sentences.jsonl": sentences}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "data"))
    args = parser.parse_args(argv)
    folder = Path(args.out) / "ner"
    folder.mkdir(parents=True, exist_ok=True)
    for name, records in build(random.Random(SEED)).items():
        write_text_atomic(folder / name, "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))
        print(f"{folder / name}: {len(records)} lines")


if __name__ == "__main__":
    main()
