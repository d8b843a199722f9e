"""The questions file is indexed, never held: records come back from disk exactly as written,
and the index's memory stays far below what the records themselves would take."""

from __future__ import annotations

import json
import tracemalloc

import numpy as np


def write(path, count: int, splits=("train", "valid")) -> list[dict]:
    records = [
        {
            "key": f"photo-{i // 10:07d}",
            "split": splits[(i // 10) % len(splits)],
            "type": ("species", "yes_no", "rank")[i % 3],
            "question": f"What is in photo {i // 10}, question {i % 10}? " + "padding " * 20,
            "answer": "yes" if i % 2 else "no",
        }
        for i in range(count)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return records


class Cache:
    """What `QuestionFile` asks of a feature cache: its keys, labels, classes, photo set."""

    def __init__(self, photos: int, photo_set: str = "data:test", shuffle: bool = False):
        from taxoclip import ClassTable
        from taxoclip.data.features import CacheKeys

        self.path, self.photo_set = "the-cache", photo_set
        self.labels = np.zeros(photos, np.int64)
        self.classes = ClassTable.from_records([{"id": "1", "species": "S"}], origin="test")
        order = np.random.default_rng(0).permutation(photos) if shuffle else np.arange(photos)
        self.keys = CacheKeys([f"photo-{p:07d}" for p in order])


def test_records_come_back_from_disk_as_written(tmp_path):
    from taxoclip.data.question_file import QuestionFile

    path = tmp_path / "qa.jsonl"
    records = write(path, 300)
    questions = QuestionFile(path, Cache(25))  # photos 25..29 are not in the cache
    assert len(questions) == 250 and questions.missing == 50  # nothing lost: kept + counted missing
    train = questions.in_split("train")
    assert len(train) + len(questions.in_split("train", keep=False)) == 250
    picked = [7, 3, 200, 7]
    assert [{k: v for k, v in r.items() if k != "row"} for r in questions.records(picked)] == [
        records[i] for i in picked
    ]
    assert [r["row"] for r in questions.records(picked)] == [0, 0, 20, 0]
    streamed = list(questions.iterate(train, chunk=16))
    assert [r["key"] for r in streamed] == [records[i]["key"] for i in train]
    assert all(r["split"] == "train" for r in streamed)


def test_sample_streams_to_the_sorted_answer(tmp_path):
    """The heap sample equals sorting every record by its hash and taking each type's first."""
    from taxoclip.data.question_file import QuestionFile
    from taxoclip.data.questions import stable
    from taxoclip.eval.vqa import sample

    path = tmp_path / "qa.jsonl"
    write(path, 600)
    questions = QuestionFile(path, Cache(60))
    every = list(questions.iterate(np.arange(len(questions))))
    expected: dict[str, list[dict]] = {}
    for record in sorted(every, key=lambda r: stable(3, "eval", r["key"], r["question"])):
        expected.setdefault(record["type"], []).append(record)
    for per_type in (0, 1, 7, 1000):
        want = [r for group in expected.values() for r in (group[:per_type] if per_type else group)]
        assert sample(questions.iterate(np.arange(len(questions))), per_type, 3) == want
    smallest = questions.smallest(np.arange(len(questions)), 5, key=lambda r: stable(1, r["question"]))
    assert smallest == sorted(every, key=lambda r: stable(1, r["question"]))[:5]


def indexed_with_peak(tmp_path, questions: int, photos: int):
    """A file of ``questions`` about a cache of ``photos``, indexed; and indexing's peak traced bytes."""
    from taxoclip.data.question_file import QuestionFile

    path = tmp_path / "qa.jsonl"
    write(path, questions)
    cache = Cache(photos)
    tracemalloc.start()
    indexed = QuestionFile(path, cache)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return indexed, peak


def test_indexing_holds_no_records(tmp_path):
    """60,000 questions (~13 MB of JSON, ~60 MB as dicts) index in a few MB: 13 bytes a question."""
    questions, peak = indexed_with_peak(tmp_path, 60_000, 6_000)
    assert len(questions) == 60_000
    assert peak < 4 * 2**20, f"indexing peaked at {peak / 2**20:.1f} MB"
    index_bytes = questions.offsets.nbytes + questions.rows.nbytes + questions.split_codes.nbytes
    assert index_bytes == 13 * len(questions)  # int64 offset, int32 row, int8 split
    assert questions.in_split("train").dtype == np.int32


def test_indexing_builds_no_key_dict_of_the_whole_cache(tmp_path):
    """A few questions about a cache of 300,000 photos: the photos' keys are searched where they
    lie, so indexing costs well under what a key -> row dict of them all would (~30 MB)."""
    questions, peak = indexed_with_peak(tmp_path, 2_000, 300_000)
    assert len(questions) == 2_000 and questions.missing == 0
    assert peak < 3 * 2**20, f"indexing peaked at {peak / 2**20:.1f} MB"


def test_keys_are_found_in_any_order_and_unknown_ones_are_missing():
    from taxoclip.data.features import CacheKeys

    keys = [f"photo-{p:07d}" for p in np.random.default_rng(1).permutation(500)]
    table = CacheKeys(keys)
    wanted = [keys[7], keys[499], "photo-0000500", keys[0], "photo-00000011", "", keys[7]]
    assert table.rows_of(wanted).tolist() == [7, 499, -1, 0, -1, -1, 7]
    assert table.rows_of(keys).tolist() == list(range(500))
    assert CacheKeys(sorted(keys)).rows_of(["photo-0000042"]).tolist() == [42]
    assert CacheKeys([]).rows_of(["a"]).tolist() == [-1]


def test_a_cache_in_any_key_order_gives_each_question_its_row(tmp_path):
    from taxoclip.data.question_file import QuestionFile

    path = tmp_path / "qa.jsonl"
    records = write(path, 300)
    cache = Cache(30, shuffle=True)
    questions = QuestionFile(path, cache)
    got = questions.records(range(len(questions)))
    assert [cache.keys[r["row"]] for r in got] == [r["key"] for r in records]


def test_questions_about_other_photos_are_refused_with_both_named(tmp_path):
    """Keys such as photo-0000001 exist in every cache: the source record and each question's class
    tie a file to the photos it was made from."""
    import pytest

    from taxoclip.data.question_file import QuestionFile
    from taxoclip.data.questions import source_file
    from taxoclip.errors import TaxoclipError

    path = tmp_path / "qa.jsonl"
    records = write(path, 40)
    source_file(path).write_text(json.dumps({"photo_set": "shards:other", "source": "/elsewhere/shards"}))
    with pytest.raises(TaxoclipError, match=r"made from /elsewhere/shards \(shards:other\).*the-cache embeds"):
        QuestionFile(path, Cache(4))
    source_file(path).write_text(json.dumps({"photo_set": "data:test", "source": "here"}))
    assert len(QuestionFile(path, Cache(4))) == 40  # the same photos: kept
    for record in records:
        record["class_id"] = "7" if record["key"] == "photo-0000002" else "1"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    with pytest.raises(TaxoclipError, match=r"10 questions name another class.*photo-0000002 is class 7"):
        QuestionFile(path, Cache(4))


def test_a_models_seen_photos_read_back_as_a_sorted_array_not_a_set_of_strings(tmp_path):
    """The leakage list of a model trained on many photos: membership and order as a set's, read
    in a fraction of a set's memory (a set of 200,000 keys takes ~20 MB)."""
    import gzip

    from taxoclip.data.keyset import KeySet
    from taxoclip.models.vqa import SEEN_PHOTOS, read_seen_photos

    keys = [f"train-{p:08d}" for p in np.random.default_rng(2).permutation(200_000)]
    with gzip.open(tmp_path / SEEN_PHOTOS, "wt") as handle:
        handle.writelines(f"{k}\n" for k in sorted(keys))
    tracemalloc.start()
    seen = read_seen_photos(tmp_path)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 6 * 2**20, f"reading peaked at {peak / 2**20:.1f} MB"
    assert len(seen) == 200_000 and list(seen)[:2] == ["train-00000000", "train-00000001"]
    asked = [keys[5], "train-00200000", "train-0000000", keys[199_999], "valid-00000001"]
    assert seen.which(asked).tolist() == [True, False, False, True, False]
    assert keys[17] in seen and "train-0000001" not in seen and 17 not in seen
    both = KeySet.of(["b", "a", "b"]).union(KeySet.of(["c", "a"]))
    assert list(both) == ["a", "b", "c"] and len(KeySet.of([])) == 0 and KeySet.of([]).which(["a"]).tolist() == [False]
