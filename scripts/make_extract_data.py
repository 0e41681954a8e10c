"""Write the demo's data under data/extract/: booking messages in free text -> one compact JSON object.

Run: .venv/bin/python scripts/make_extract_data.py [--out data]
Messages come from our own templates filled with our own invented names and towns, with a fixed seed, so
the files are identical on every run. Each chat asks for the booking as JSON with the keys name, town,
day and guests; the reply is that object and nothing else (guests a number even where the message spells
it out). A small instruct model learns this schema and the copying from a few hundred examples.
- data/extract/train.jsonl: 300 chats, names and towns from the training pools only;
- data/extract/valid.jsonl: 40 chats for validation loss, held-out names and towns;
- data/extract/test.jsonl: 24 chats for the demo's before/after scores, held-out names and towns, and
  never used in training or to pick a checkpoint.
No held-out first name, surname or town occurs in train.jsonl.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ortft.fsutil import write_text_atomic  # noqa: E402

SEED = 20261206
SIZES = {"train.jsonl": 300, "valid.jsonl": 40, "test.jsonl": 24}
KEYS = ("name", "town", "day", "guests")
INSTRUCTION = "Extract the booking as JSON with the keys name, town, day and guests."

# Invented names and towns; each pool is split into values for training and held-out values.
FIRST_NAMES = {
    "train": ["Amara", "Tobias", "Leena", "Marek", "Sunniva", "Idris", "Calla", "Bram", "Yusra", "Orrin", "Petra",
              "Kenji", "Odalys", "Fenna", "Ravi", "Solene", "Emeka", "Ilse", "Dorian", "Mirela", "Anselm", "Tove"],
    "held_out": ["Wilhelmina", "Quentin", "Nadira", "Bartholomew", "Ingrid", "Cosimo", "Leocadia", "Thaddeus",
                 "Marisol", "Evander"],
}
LAST_NAMES = {
    "train": ["Okafor", "Lindqvist", "Brennan", "Halvorsen", "Castellano", "Mbeki", "Novak", "Ferreira", "Ashdown",
              "Kowalczyk", "Tanaka", "Ribeiro", "Fairweather", "Oyelaran", "Duchamp", "Varga", "Holloway", "Petrov"],
    "held_out": ["Grimsby", "Zelenka", "Moravec", "Achterberg", "Quintero", "Wolstenholme", "Iwasaki", "Delacourt"],
}
TOWNS = {
    "train": ["Port Elwin", "Marrowdale", "Karsk", "Lindenfeld", "Cape Aurel", "Tessary", "Oskarby", "Vellmar",
              "North Quill", "Brackwater", "Saint Odran", "Halden Bay", "Riveneck", "Dunmore", "Caldera Springs"],
    "held_out": ["Graymoor", "Lake Thessaly", "Pellinore", "Upper Wendell", "Zarandor", "Fennick Point", "Oldcastle Reach"],
}
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
NUMBER_WORDS = {2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight", 9: "nine"}
NUMBER_WORD_SHARE = 0.3

TEMPLATES = [
    "Hi, this is {name}. Please book a table for {guests} in {town} on {day}.",
    "{name} here - could you reserve rooms in {town} for {guests} people, arriving {day}?",
    "Booking request from {name}: {guests} guests, {town}, {day} evening.",
    "Can we get a guided tour of {town} on {day}? We are {guests}. Thanks, {name}",
    "Please hold {guests} seats on the {day} bus to {town}. Name: {name}.",
    "Dear team, I would like a walking tour through {town} on {day} for a group of {guests}. Kind regards, {name}",
    "Reservation: {town}, {day}, party of {guests}, under the name {name}.",
    "Hello! My name is {name} and I'd like {guests} tickets for the {town} museum this {day}.",
    "{guests} people, {day}, {town}. Booked by {name}, please confirm.",
    "Could you arrange a boat trip from {town} next {day}? {guests} of us are coming. Best, {name}",
    "I need a hotel in {town} for {day} night, {guests} adults. Regards, {name}",
    "{day} works for us: a dinner in {town} for {guests}, please. The booking is for {name}.",
]


def person(rng: random.Random, split: str) -> str:
    return f"{rng.choice(FIRST_NAMES[split])} {rng.choice(LAST_NAMES[split])}"


def booking(rng: random.Random, split: str, template: str) -> dict:
    """One chat: the instruction and the message, and the reply as compact JSON."""
    guests = rng.randint(2, 9)
    fields = {"name": person(rng, split), "town": rng.choice(TOWNS[split]), "day": rng.choice(DAYS), "guests": guests}
    spelled = NUMBER_WORDS[guests] if rng.random() < NUMBER_WORD_SHARE else str(guests)
    message = template.format(**{**fields, "guests": spelled})
    return {"messages": [
        {"role": "user", "content": f"{INSTRUCTION}\n\n{message}"},
        {"role": "assistant", "content": json.dumps(fields, ensure_ascii=False)},
    ]}


def build(rng: random.Random) -> dict[str, list[dict]]:
    """train/valid/test chats; no user message repeats within or across the files."""
    files: dict[str, list[dict]] = {}
    seen: set[str] = set()
    for name, size in SIZES.items():
        split = "train" if name == "train.jsonl" else "held_out"
        records: list[dict] = []
        while len(records) < size:
            record = booking(rng, split, TEMPLATES[len(records) % len(TEMPLATES)])
            prompt = record["messages"][0]["content"]
            if prompt not in seen:
                seen.add(prompt)
                records.append(record)
        rng.shuffle(records)
        files[name] = records
    return files


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "data")
    args = parser.parse_args(argv)
    folder = args.out / "extract"
    for name, records in build(random.Random(SEED)).items():
        write_text_atomic(folder / name, "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))
        print(f"{folder / name}: {len(records)} chats")


if __name__ == "__main__":
    main()
