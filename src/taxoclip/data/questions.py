"""Questions about each photo, generated from its class row: the training and evaluation data of
species question answering (``taxoclip questions``).

For every photo (of a feature cache, shards or any source), in its own split:

  species          "What species is this?" -> the scientific name (classes that name one)
  common_name      "What is this plant called?" -> the common name
  rank             "Which family does this belong to?" -> genus, family, order, class
  yes_no           "Is this a member of the Rosaceae?" -> yes / no, balanced within each class
                   and rank (a "no" names a relative: same order, other family ...)
  multiple_choice  "Which of these is it: A, B, C or D?" -> the true species among look-alikes
                   (same genus first, then family, order)
  attributes       CUB's class attributes where present -> "grey wing color, ..."

Each type has several phrasings, picked per photo by a hash of its key, so the same data and seed
always give the same questions, and a photo's questions never depend on other photos' order.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from taxoclip.errors import TaxoclipError
from taxoclip.taxonomy import ClassTable

TYPES = ("species", "common_name", "rank", "yes_no", "multiple_choice", "attributes")
ASKED_RANKS = ("genus", "family", "order", "class")
CHOICES = 4
RELATIVES = 24  # closest classes kept per class: distractors and "no" answers come from them

PHRASINGS = {
    "species": [
        "What species is this?",
        "Which species is shown in this photo?",
        "Name the species in the picture.",
        "What is the scientific name of this {noun}?",
    ],
    "common_name": [
        "What is this {noun} called?",
        "What is the common name of this {noun}?",
        "What {noun} is this?",
    ],
    "rank": [
        "Which {rank} does this {noun} belong to?",
        "What {rank} is this {noun} in?",
        "Name the {rank} of the {noun} in this photo.",
    ],
    "yes_no": [
        "Is this a member of the {value}?",
        "Does this {noun} belong to the {rank} {value}?",
        "Is the {noun} in this photo part of the {value} {rank}?",
    ],
    "multiple_choice": [
        "Which of these is it: {options}?",
        "Is this {options}?",
        "Choose the species in the photo: {options}.",
    ],
    "attributes": [
        "What does this {noun} look like?",
        "Describe the most visible features of this {noun}.",
    ],
}


@dataclass(frozen=True)
class Photo:
    key: str
    label: int
    split: str


def stable(seed: int, *parts: object) -> int:
    """A deterministic 64-bit number from the seed and the parts (no global random state)."""
    text = "\0".join(str(p) for p in (seed, *parts))
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


def noun_of(row: dict[str, str]) -> str:
    if row.get("kingdom") == "Plantae":
        return "plant"
    if row.get("class") == "Aves":
        return "bird"
    if row.get("kingdom") == "Fungi":
        return "fungus"
    if row.get("class") == "Insecta":
        return "insect"
    return "organism"


def species_name(row: dict[str, str]) -> str:
    """The binomial when the row names one (a genus alone is not a species)."""
    name = row.get("species", "")
    return name if " " in name.strip() else ""


def choice_names(rows: list[dict[str, str]]) -> list[str]:
    """Each class's name as a multiple-choice option: all common names when every class has one,
    else scientific names ("" for a class with neither)."""
    common = all(row.get("common_name") for row in rows)
    return [
        (row.get("common_name") if common else species_name(row) or row.get("common_name", "")) or "" for row in rows
    ]


class QuestionMaker:
    """Questions for photos of one class table."""

    def __init__(self, classes: ClassTable, seed: int = 0, types: tuple[str, ...] = TYPES):
        unknown = [t for t in types if t not in TYPES]
        if unknown:
            raise TaxoclipError(f"--types {','.join(unknown)}: unknown; use some of {', '.join(TYPES)}")
        self.classes, self.rows, self.seed, self.types = classes, list(classes.rows), seed, types
        self.groups: dict[str, dict[str, list[int]]] = {rank: {} for rank in ("genus", "family", "order", "class")}
        for c, row in enumerate(self.rows):
            for rank, members in self.groups.items():
                if row.get(rank):
                    members.setdefault(row[rank], []).append(c)
        self.sorted_values = {rank: sorted(members) for rank, members in self.groups.items()}
        self.near: dict[int, list[int]] = {}
        self.choice_names = choice_names(self.rows)
        self.ids = classes.ids  # a list built once: the table's property builds it anew each call

    def relatives(self, c: int) -> list[int]:
        """Up to RELATIVES other classes, closest first (same genus, then family, order, class,
        then any), ties in hash order; computed once per class from the rank groups, so a table of
        10,000 classes costs no 10,000 x 10,000 comparisons."""
        if c not in self.near:
            row, chosen, seen = self.rows[c], [], {c}
            for rank in ("genus", "family", "order", "class"):
                if len(chosen) == RELATIVES:  # full: the wider ranks' groups (thousands) need no sorting
                    break
                group = self.groups[rank].get(row.get(rank) or "", []) if row.get(rank) else []
                for other in sorted(group, key=lambda o: stable(self.seed, "relative", c, o)):
                    if other not in seen and len(chosen) < RELATIVES:
                        seen.add(other)
                        chosen.append(other)
            if len(chosen) < RELATIVES:  # few relatives: any other classes, in hash order
                rest = sorted(
                    (o for o in range(len(self.rows)) if o not in seen),
                    key=lambda o: stable(self.seed, "relative", c, o),
                )
                chosen += rest[: RELATIVES - len(chosen)]
            self.near[c] = chosen
        return self.near[c]

    def phrase(self, kind: str, photo: Photo, **values: str) -> str:
        options = PHRASINGS[kind]
        template = options[stable(self.seed, kind, photo.key, values.get("rank", "")) % len(options)]
        return template.format(noun=noun_of(self.rows[photo.label]), **values)

    def questions(self, photo: Photo, position_in_class: int) -> Iterator[dict]:
        """This photo's questions. ``position_in_class`` (its place among its class's photos in
        hash order) alternates yes and no, so each class and rank is balanced."""
        row, c = self.rows[photo.label], photo.label
        base = {"key": photo.key, "split": photo.split, "class_index": c, "class_id": self.ids[c]}
        species = species_name(row)
        if "species" in self.types and species:
            yield base | {
                "type": "species",
                "rank": "species",
                "question": self.phrase("species", photo),
                "answer": species,
            }
        if "common_name" in self.types and row.get("common_name"):
            yield base | {
                "type": "common_name",
                "rank": "species",
                "question": self.phrase("common_name", photo),
                "answer": row["common_name"],
            }
        for rank in ASKED_RANKS:
            value = row.get(rank, "")
            if not value:
                continue
            if "rank" in self.types:
                question = self.phrase("rank", photo, rank=rank)
                yield base | {"type": "rank", "rank": rank, "question": question, "answer": value}
            other = self.other_value(c, rank) if "yes_no" in self.types else ""
            if other:  # a rank the whole table shares has no "no" to ask: neither is asked
                yes = (position_in_class + ASKED_RANKS.index(rank)) % 2 == 0
                asked = value if yes else other
                if asked:
                    question = self.phrase("yes_no", photo, rank=rank, value=asked)
                    yield base | {
                        "type": "yes_no",
                        "rank": rank,
                        "value": asked,  # the taxon asked about (the probe control answers from it)
                        "question": question,
                        "answer": "yes" if yes else "no",
                    }
        if "multiple_choice" in self.types:
            names = self.choice_names
            if names[c]:
                distractors = [names[o] for o in self.relatives(c) if names[o] and names[o] != names[c]]
                distractors = list(dict.fromkeys(distractors))[: CHOICES - 1]
                if distractors:
                    choices = sorted([names[c], *distractors], key=lambda n: stable(self.seed, "order", photo.key, n))
                    options = ", ".join(choices[:-1]) + f" or {choices[-1]}"
                    question = self.phrase("multiple_choice", photo, options=options)
                    yield base | {
                        "type": "multiple_choice",
                        "rank": "species",
                        "question": question,
                        "answer": names[c],
                        "choices": choices,
                    }
        if "attributes" in self.types and row.get("attributes"):
            question = self.phrase("attributes", photo)
            yield base | {"type": "attributes", "rank": "", "question": question, "answer": row["attributes"]}

    def other_value(self, c: int, rank: str) -> str:
        """A value of ``rank`` that is not this class's: its closest relative's that differs, else
        any other in the table (drawn by hash); "" when the whole table shares this class's value."""
        mine = self.rows[c].get(rank)
        for other in self.relatives(c):
            value = self.rows[other].get(rank)
            if value and value != mine:
                return value
        values = self.sorted_values[rank]
        if not values or values == [mine]:
            return ""
        # any other value, drawn by one hash (hashing all 4,884 genera per class made the table's
        # set-up grow as classes x values): position i of the values without this class's own
        has_mine = mine in self.groups[rank]
        pick = stable(self.seed, "other", c, rank) % (len(values) - has_mine)
        if has_mine and pick >= bisect.bisect_left(values, mine):
            pick += 1
        return values[pick]


@dataclass
class Photos:
    """Every photo as arrays: keys (UTF-8 bytes), labels and split codes into ``split_names``;
    ~30 bytes a photo where one `Photo` object each took ~200 (iNat2021 has 2.7M)."""

    keys: np.ndarray
    labels: np.ndarray
    split_codes: np.ndarray
    split_names: list[str]
    malformed: int = 0  # shard samples skipped as unusable (see `sample_problem`)
    photo_set: str = ""  # which photos the keys name (`photo_set_id`): a questions file records it

    def __len__(self) -> int:
        return len(self.labels)

    def photo(self, i: int) -> Photo:
        return Photo(self.keys[i].decode(), int(self.labels[i]), self.split_names[self.split_codes[i]])

    def order(self, seed: int) -> np.ndarray:
        """Each photo's position among its class's photos, in a seeded order of their keys."""
        hashes = np.fromiter((stable(seed, "order", k.decode()) for k in self.keys), np.uint64, len(self))
        by_class = np.lexsort((hashes, self.labels))  # by class, then by hash (stable: ties keep row order)
        _, starts, counts = np.unique(self.labels[by_class], return_index=True, return_counts=True)
        position = np.empty(len(self), np.int64)
        position[by_class] = np.arange(len(self)) - np.repeat(starts, counts)
        return position

    def by_split_and_key(self) -> np.ndarray:
        """Row order by split name, then key (bytes order is the strings' order in UTF-8)."""
        rank = np.argsort(np.argsort(self.split_names)) if self.split_names else np.zeros(0, np.int64)
        return np.lexsort((self.keys, rank[self.split_codes]))


def photos_of(path: str | Path, **source_options) -> tuple[ClassTable, Photos]:
    """(class table, every photo's key, label and split) of a feature cache, shards or a source;
    keys are the feature cache's, so questions join with cached embeddings."""
    path = Path(path)
    if (path / "meta.json").exists():
        from taxoclip.data.features import load_features

        cache = load_features(path)
        photos = Photos(
            cache.keys.array,
            cache.labels.astype(np.int64),
            cache.split_codes,
            list(cache.split_names),
            photo_set=cache.photo_set,
        )
        return cache.classes, photos
    from taxoclip.data.features import CacheKeys, photo_set_id, plan_data
    from taxoclip.data.shards import iter_tar_samples, sample_problem

    plan = plan_data(path, **source_options)
    keys, labels, splits = [], [], []
    malformed = 0
    for unit in plan.units:
        if unit.shard:
            for sample in iter_tar_samples(Path(unit.shard), only=("json", "cls")):  # no image bytes
                if sample_problem(sample, needs_image=False) or not 0 <= int(sample["cls"]) < len(plan.classes):
                    malformed += 1  # counted and said, never a KeyError
                    continue
                keys.append(sample["__key__"].decode())
                labels.append(int(sample["cls"]))
                splits.append(json.loads(sample["json"])["split"])
        else:
            for key, _, label, split in unit.samples:
                keys.append(key)
                labels.append(label)
                splits.append(split)
    names = sorted(set(splits))
    code = {name: i for i, name in enumerate(names)}
    photos = Photos(
        CacheKeys(keys).array,
        np.array(labels, np.int64),
        np.array([code[s] for s in splits], np.uint8),
        names,
        malformed,
        photo_set_id(plan.description, plan.data_id),
    )
    return ClassTable.from_json(plan.classes), photos


def write_questions(
    path: str | Path, out: str | Path, *, seed: int = 0, types: tuple[str, ...] = TYPES, **source_options
) -> dict:
    """Write one JSON line per question to ``out``; returns the counts (by type, split, answer).
    Photos are held as arrays and made into records one at a time."""
    classes, photos = photos_of(path, **source_options)
    if not len(photos):
        raise TaxoclipError(f"{path}: no photos to ask about")
    maker = QuestionMaker(classes, seed, types)
    position = photos.order(seed)
    counts = {"photos": len(photos), "questions": 0, "by_type": Counter(), "by_split": Counter(), "yes_no": Counter()}
    counts["malformed"] = photos.malformed
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    temporary = out.with_name(out.name + ".tmp")
    with open(temporary, "w") as handle:
        for i in photos.by_split_and_key():
            for record in maker.questions(photos.photo(i), int(position[i])):
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
                counts["questions"] += 1
                counts["by_type"][record["type"]] += 1
                counts["by_split"][record["split"]] += 1
                if record["type"] == "yes_no":
                    counts["yes_no"][record["answer"]] += 1
    temporary.replace(out)
    # The identity of the photos its keys name, beside it: keys such as train-0000000 exist in
    # every cache, so only this ties the file to the one it was made from.
    source = {"photo_set": photos.photo_set, "source": str(path), "classes": len(classes), "photos": len(photos)}
    source_file(out).write_text(json.dumps(source, indent=1))
    return {k: dict(v) if isinstance(v, Counter) else v for k, v in counts.items()}


def source_file(questions: str | Path) -> Path:
    """Where a questions file's source record lives: ``qa.jsonl`` -> ``qa.jsonl.source.json``."""
    questions = Path(questions)
    return questions.with_name(questions.name + ".source.json")


def normalise_answer(text: str) -> str:
    """Lower case, no punctuation or articles, single spaces: what exact match compares."""
    text = re.sub(r"[^\w\s-]", " ", text.lower())
    return " ".join(w for w in text.split() if w not in ("a", "an", "the"))


def candidates_of(record: dict) -> list[str] | None:
    """The answers a closed question allows (None for an open one)."""
    if record.get("type") == "yes_no":
        return ["yes", "no"]
    return record.get("choices") or None
