"""Species question answering's data: questions about every photo from its class row."""

import csv
import json
from collections import Counter

import pytest

from conftest import write_image
from taxoclip.apps.cli import main
from taxoclip.data.questions import TYPES, write_questions


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def birds(tmp_path):
    """Five bird classes (two of one genus) with CUB-style attributes, 4 train + 2 valid photos each."""
    root = tmp_path / "birds"
    rows = [
        ("1", "black-footed albatross", "Diomedeidae", "Phoebastria", "nigripes", "grey wing color, hooked bill shape"),
        ("2", "laysan albatross", "Diomedeidae", "Phoebastria", "immutabilis", "white belly color, hooked bill shape"),
        ("3", "crested auklet", "Alcidae", "Aethia", "cristatella", "black crown color"),
        ("4", "brewer blackbird", "Icteridae", "Euphagus", "cyanocephalus", "black eye color"),
        ("5", "house sparrow", "Passeridae", "Passer", "domesticus", "brown back color"),
    ]
    seed = 0
    for class_id, *_ in rows:
        for split, n in (("train", 4), ("valid", 2)):
            for i in range(n):
                seed += 1
                write_image(root / split / class_id / f"{i}.jpg", seed)
    with open(root / "classes.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            [
                "class_id",
                "common_name",
                "kingdom",
                "class",
                "order",
                "family",
                "genus",
                "specific_epithet",
                "attributes",
            ]
        )
        for class_id, common, family, genus, epithet, attributes in rows:
            order = (
                "Procellariiformes"
                if family == "Diomedeidae"
                else "Charadriiformes"
                if family == "Alcidae"
                else "Passeriformes"
            )
            writer.writerow([class_id, common, "Animalia", "Aves", order, family, genus, epithet, attributes])
    return root


def test_every_type_with_its_answer_from_the_class_row(birds, tmp_path):
    counts = write_questions(birds, tmp_path / "qa.jsonl")
    records = read(tmp_path / "qa.jsonl")
    assert set(counts["by_type"]) == set(TYPES) and counts["questions"] == len(records) and counts["photos"] == 30
    by_type = {}
    for record in records:
        by_type.setdefault(record["type"], []).append(record)
    laysan = [r for r in records if r["class_id"] == "2"]
    answers = {(r["type"], r["rank"]): r["answer"] for r in laysan if r["type"] != "yes_no"}
    assert answers[("species", "species")] == "Phoebastria immutabilis"
    assert answers[("common_name", "species")] == "laysan albatross"
    assert answers[("rank", "genus")] == "Phoebastria" and answers[("rank", "family")] == "Diomedeidae"
    assert answers[("attributes", "")] == "white belly color, hooked bill shape"
    assert all("bird" in r["question"] for r in by_type["common_name"])  # the organism's noun, from its class
    for record in by_type["multiple_choice"]:
        assert record["answer"] in record["choices"] and len(set(record["choices"])) == len(record["choices"]) == 4
        assert record["answer"] in record["question"]
    # Look-alikes first: the laysan albatross's options include the other albatross.
    assert all("black-footed albatross" in r["choices"] for r in by_type["multiple_choice"] if r["class_id"] == "2")
    # Several phrasings per type.
    assert len({r["question"] for r in by_type["species"]}) >= 3


def test_yes_no_is_balanced_in_every_class_and_rank_and_a_no_names_a_relative(birds, tmp_path):
    write_questions(birds, tmp_path / "qa.jsonl")
    records = [r for r in read(tmp_path / "qa.jsonl") if r["type"] == "yes_no"]
    answers = Counter(r["answer"] for r in records)
    assert answers["yes"] == answers["no"]
    for (class_id, rank), count in Counter((r["class_id"], r["rank"]) for r in records).items():
        yes = sum(1 for r in records if r["class_id"] == class_id and r["rank"] == rank and r["answer"] == "yes")
        assert abs(2 * yes - count) <= 1, (class_id, rank)
    assert not any(r["rank"] == "class" for r in records)  # every class is Aves: no honest "no" exists
    own = {"1": "Diomedeidae", "2": "Diomedeidae", "3": "Alcidae", "4": "Icteridae", "5": "Passeridae"}
    for record in (r for r in records if r["rank"] == "family"):
        asked = next(f for f in set(own.values()) if f in record["question"])
        assert (asked == own[record["class_id"]]) == (record["answer"] == "yes"), record
        assert record["value"] == asked  # the taxon asked about, for the probe control's answer
    # A "no" names the closest relative that differs: the passerines are asked about each other.
    for record in records:
        if record["rank"] == "family" and record["answer"] == "no" and record["class_id"] in ("4", "5"):
            assert own["4" if record["class_id"] == "5" else "5"] in record["question"]


def test_the_same_seed_gives_the_same_questions_and_splits_follow_the_data(birds, tmp_path):
    write_questions(birds, tmp_path / "a.jsonl", seed=1)
    write_questions(birds, tmp_path / "b.jsonl", seed=1)
    write_questions(birds, tmp_path / "c.jsonl", seed=2)
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    assert (tmp_path / "a.jsonl").read_bytes() != (tmp_path / "c.jsonl").read_bytes()
    records = read(tmp_path / "a.jsonl")
    assert Counter(r["split"] for r in records if r["type"] == "common_name") == {"train": 20, "valid": 10}


def test_questions_about_a_feature_cache_join_its_rows(colour_features, tmp_path):
    from taxoclip.data.features import load_features

    write_questions(colour_features, tmp_path / "qa.jsonl", types=("rank", "yes_no"))
    cache = load_features(colour_features)
    row_of = cache.row_of()
    records = read(tmp_path / "qa.jsonl")
    assert {r["type"] for r in records} == {"rank", "yes_no"}
    for record in records:
        row = row_of[record["key"]]
        assert cache.labels[row] == record["class_index"]
        assert cache.split_names[cache.split_codes[row]] == record["split"]


def test_the_command_and_its_bad_input(birds, tmp_path, capsys):
    assert main(["questions", str(birds), "-o", str(tmp_path / "qa.jsonl")]) == 0
    out = capsys.readouterr().out
    assert "questions about 30 photos" in out and "yes/no answers:" in out
    assert main(["questions", str(birds), "-o", str(tmp_path / "x.jsonl"), "--types", "species,riddles"]) == 2
    assert "--types riddles: unknown" in capsys.readouterr().err
    assert main(["questions", str(tmp_path / "nowhere"), "-o", str(tmp_path / "y.jsonl")]) == 2
    assert "nowhere" in capsys.readouterr().err
    assert main(["questions", str(birds), "-o", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err
    assert not (tmp_path / "x.jsonl").exists() and not (tmp_path / "y.jsonl").exists()


def test_questions_about_shards_name_the_same_photos_as_their_feature_cache(colour_shards, colour_features, tmp_path):
    from taxoclip.data.features import load_features

    write_questions(colour_shards, tmp_path / "qa.jsonl", types=("rank",))
    assert {r["key"] for r in read(tmp_path / "qa.jsonl")} == set(load_features(colour_features).keys)


def test_a_photos_questions_cost_the_same_at_300_and_3000_classes(monkeypatch):
    """The same 20 classes' photos asked about within a table of 300 or of 3,000 classes (genera
    of 3, families of 30, one order): the hashes drawn and the class-id lists built do not grow
    with the table (iNat2021's 10,000 classes made `questions` ~10x slower a photo before)."""
    import taxoclip.data.questions as questions_module
    from taxoclip.data.questions import Photo, QuestionMaker
    from taxoclip.taxonomy import ClassTable

    def table(n: int) -> ClassTable:
        rows = [
            {"id": str(i), "kingdom": "Animalia", "class": "Aves", "order": "Passeriformes",
             "family": f"Family{i // 30}", "genus": f"Genus{i // 3}", "specific_epithet": f"e{i}",
             "common_name": f"bird {i}"}
            for i in range(n)
        ]  # fmt: skip
        return ClassTable.from_records(rows, origin="test")

    def cost(n: int) -> tuple[int, int]:
        counts = Counter()
        stable, ids = questions_module.stable, ClassTable.ids

        def counting_stable(*parts):
            counts["hashes"] += 1
            return stable(*parts)

        monkeypatch.setattr(questions_module, "stable", counting_stable)
        monkeypatch.setattr(ClassTable, "ids", property(lambda self: counts.update(["ids"]) or ids.fget(self)))
        maker = QuestionMaker(table(n))
        asked = [q for i in range(200) for q in maker.questions(Photo(f"p{i}", (i % 20) * 7, "train"), i)]
        monkeypatch.undo()
        assert {q["type"] for q in asked} == {"species", "common_name", "rank", "yes_no", "multiple_choice"}
        return counts["hashes"], counts["ids"]

    (small, small_ids), (large, large_ids) = cost(300), cost(3000)
    assert large <= 1.1 * small, (small, large)
    assert small_ids == large_ids == 1
